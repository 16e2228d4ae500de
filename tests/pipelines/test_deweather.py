"""DeweatherPipeline: tiling and blending, routing-map stitching, input checks, and the bundled model."""

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.pipelines.deweather import DeweatherPipeline, blend_window, tile_starts
from moezoo.zoo import create_model


@pytest.fixture(scope="module")
def identity_pipe():
    """test_mofme straight after init is the identity map (its output layer is zero-initialised)."""
    torch.manual_seed(0)
    pipe = DeweatherPipeline(create_model("test_mofme"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained_pipe():
    torch.manual_seed(0)
    model = create_model("test_mofme")
    with torch.no_grad():  # a non-trivial restoration, so tile boundaries would show
        model.tail[-1].weight.normal_(std=0.3)
    pipe = DeweatherPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiles_cover_the_image_and_blend_weights_are_positive():
    assert tile_starts(10, 8, 6) == [0, 6]
    assert tile_starts(8, 8, 6) == [0]
    assert tile_starts(5, 8, 6) == [0]
    assert tile_starts(27, 8, 4) == [0, 4, 8, 12, 16, 20]  # 20 + 8 = 28 >= 27
    w = blend_window(16, 4)
    assert (w > 0).all() and w.max() == 1 and w[8, 8] == 1
    assert torch.allclose(w[0, 8], torch.tensor(0.125))  # (0 + 0.5) / 4
    assert torch.allclose(w[1, 2], torch.tensor(1.5 / 4 * 2.5 / 4))
    rect = blend_window((8, 12), 4)
    assert rect.shape == (8, 12) and torch.allclose(rect[0, 6], torch.tensor(0.125))
    # row 4 of 8: centre 4.5, 3.5 px from the far edge -> 3.5 / 4; column 1: 1.5 / 4; column 6 of 12 is inside
    assert torch.allclose(rect[4, 1], torch.tensor(3.5 / 4 * 1.5 / 4)) and torch.allclose(rect[4, 6], torch.tensor(3.5 / 4))


@pytest.mark.parametrize("size,tile,overlap", [((37, 53), 8, 4), ((8, 8), 8, 0), ((5, 3), 8, 2), ((20, 30), 16, 6)])
def test_identity_model_gives_back_the_image(identity_pipe, size, tile, overlap):
    image = np.random.default_rng(0).random((*size, 3), dtype=np.float32)
    out = identity_pipe(image, tile_size=tile, tile_overlap=overlap, output_type="np").images[0]
    assert out.shape == (*size, 3)
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_an_image_smaller_than_a_tile_is_one_tile_of_its_own_size(trained_pipe):
    x = torch.rand(3, 16, 12)
    out = trained_pipe(x, tile_size=32, tile_overlap=8, output_type="pt").images[0]
    torch.testing.assert_close(out, trained_pipe.model(x[None])[0].clamp(0, 1), atol=1e-5, rtol=1e-5)
    odd = torch.rand(3, 15, 11)  # rounded up to whole patches (2 px): 16 x 12, the extra row/column mirrored
    out = trained_pipe(odd, tile_size=32, tile_overlap=8, output_type="pt").images[0]
    padded = torch.nn.functional.pad(odd[None], (0, 1, 0, 1), mode="reflect")
    torch.testing.assert_close(out, trained_pipe.model(padded)[0, :, :15, :11].clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_overlapping_tiles_are_a_weighted_average_of_tile_outputs(trained_pipe):
    x = torch.rand(3, 12, 12)
    out = trained_pipe(x, tile_size=8, tile_overlap=4, output_type="pt").images[0]
    w = blend_window(8, 4)
    total, weight = torch.zeros(3, 12, 12), torch.zeros(12, 12)
    for y in (0, 4):
        for x0 in (0, 4):
            tile_out = trained_pipe.model(x[None, :, y : y + 8, x0 : x0 + 8])[0].clamp(0, 1)
            total[:, y : y + 8, x0 : x0 + 8] += tile_out * w
            weight[y : y + 8, x0 : x0 + 8] += w
    torch.testing.assert_close(out, total / weight, atol=1e-5, rtol=1e-5)


def test_routing_maps_stitch_tiles_without_overlap(trained_pipe):
    x = torch.rand(3, 16, 16)
    out = trained_pipe(x, tile_size=8, tile_overlap=0, return_routing=True)
    (layer,) = out.routing_maps
    (stitched,) = layer
    assert stitched.shape == (8, 8) and stitched.dtype == np.int64
    for y in (0, 8):
        for x0 in (0, 8):
            trained_pipe.model(x[None, :, y : y + 8, x0 : x0 + 8])
            expected = trained_pipe.model.routing_maps()[0][0].numpy()
            np.testing.assert_array_equal(stitched[y // 2 : y // 2 + 4, x0 // 2 : x0 // 2 + 4], expected)


def test_routing_maps_with_overlap_take_the_most_central_tile(trained_pipe):
    x = torch.rand(3, 12, 12)
    out = trained_pipe(x, tile_size=8, tile_overlap=4, return_routing=True)
    stitched = out.routing_maps[0][0]
    assert stitched.shape == (6, 6)
    # Tiles start at pixels 0 and 4 (patches 0 and 2). Patch weights along a tile are [.25, .75, .75, .25]:
    # patches 0-2 lie deepest in the first tile, patches 3-5 in the last.
    trained_pipe.model(x[None, :, 0:8, 0:8])
    first = trained_pipe.model.routing_maps()[0][0].numpy()
    trained_pipe.model(x[None, :, 4:12, 4:12])
    last = trained_pipe.model.routing_maps()[0][0].numpy()
    np.testing.assert_array_equal(stitched[:3, :3], first[:3, :3])
    np.testing.assert_array_equal(stitched[3:, 3:], last[1:, 1:])


def test_output_types_and_batches(identity_pipe):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8))
    grey = Image.fromarray(np.full((6, 4), 128, np.uint8), mode="L")
    out = identity_pipe([rgb, grey], tile_size=8, tile_overlap=2)
    assert [im.size for im in out.images] == [(14, 10), (4, 6)] and out.images[0].mode == "RGB"
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(rgb))
    assert np.array_equal(np.asarray(out.images[1]), np.full((6, 4, 3), 128, np.uint8))
    images, maps = identity_pipe(rgb, tile_size=8, tile_overlap=2, output_type="pt", return_dict=False)
    assert images[0].shape == (3, 10, 14) and maps is None


@pytest.mark.parametrize("bad,match", [
    (Image.new("RGBA", (8, 8)), "mode 'RGBA'"),
    (np.zeros((8, 8, 4), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((8, 8, 3), np.int32), "uint8"),
    (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
    (torch.rand(1, 3, 8, 8), r"\[3, H, W\]"),
    ("rain.png", "PIL image"),
    ([], "empty list"),
])
def test_bad_images_raise(identity_pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        identity_pipe(bad, tile_size=8, tile_overlap=2)


def test_bad_tiling_raises(identity_pipe):
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        identity_pipe(image, tile_size=7)
    with pytest.raises(ValueError, match="tile_overlap"):
        identity_pipe(image, tile_size=8, tile_overlap=8)
    with pytest.raises(ValueError, match="output_type"):
        identity_pipe(image, tile_size=8, tile_overlap=2, output_type="jpg")


def test_dense_model_has_no_routing_maps():
    pipe = DeweatherPipeline(create_model("test_mofme", ffn="dense"))
    out = pipe(np.zeros((8, 8, 3), np.float32), tile_size=8, tile_overlap=0, return_routing=True)
    assert out.routing_maps == []


def test_bundled_mofme_weather_removes_weather_offline(monkeypatch):
    from moezoo.training.datasets.weather import WEATHER_TYPES, add_weather
    from moezoo.training.datasets.photos import load_photo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = DeweatherPipeline.from_pretrained("mofme_weather")
    pipe.set_progress_bar_config(disable=True)
    clean = load_photo("coffee")[100:196, 200:296]  # a held-out photo
    gains = []
    for i, weather in enumerate(WEATHER_TYPES):
        degraded = add_weather(clean, weather, np.random.default_rng(i))
        out = pipe(Image.fromarray((degraded * 255).round().astype(np.uint8)), return_routing=True)
        restored = np.asarray(out.images[0], np.float32) / 255
        mse = lambda a: np.mean((a - clean) ** 2)  # noqa: E731
        gains.append(10 * np.log10(mse(degraded) / mse(restored)))
        assert isinstance(out.images[0], Image.Image) and out.images[0].size == (96, 96)
        assert len(out.routing_maps) == 2
        for layer in out.routing_maps:
            assert layer[0].shape == (24, 24) and 0 <= layer[0].min() and layer[0].max() < 8
    assert np.mean(gains) > 1.0, gains  # dB better than the input, averaged over the four kinds
