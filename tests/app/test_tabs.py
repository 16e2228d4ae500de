"""The demo's tabs called directly: one tab per list entry, outputs and routing pictures that match what the
pipeline itself returns for the same seed, the memo that makes a layer change free, and a readable gr.Error
(never a crash) for every kind of bad input."""

import dataclasses
import warnings

import av
import gradio as gr
import numpy as np
import pytest
from PIL import Image

from moezoo.app import demo as demo_module
from moezoo.app.demo import TABS, build_demo
from moezoo.app.pictures import MAP_SHADE, expert_colors

STEPS, GUIDANCE = 2, 2.0


@pytest.fixture(scope="module")
def demo(tiny_loader):
    return build_demo(load_pipeline=tiny_loader)


@pytest.fixture(scope="module")
def apps(demo):
    return demo.tab_apps


def quietly(fn, *args):
    """Call a tab function outside gradio: its gr.Warning notes become Python warnings; return them too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(w.message) for w in caught]


def decode_map(picture: Image.Image, base: Image.Image, grid: int, num_experts: int) -> np.ndarray:
    """Read the routing map back out of a map picture: at each cell's first pixel, the expert whose colour,
    shaded by the base image's brightness (MAP_SHADE), is nearest to what was drawn."""
    array = np.asarray(picture).astype(np.float64)
    base_rgb = np.asarray(base.convert("RGB")).astype(np.float64)
    scale = 256 // base.width  # the picture enlarges the base image by a whole factor to >= 256 px
    cell = base.width // grid  # image pixels per cell
    colors = expert_colors(num_experts).astype(np.float64)
    decoded = np.zeros((grid, grid), dtype=np.int64)
    for i in range(grid):
        for j in range(grid):
            y, x = i * cell, j * cell
            drawn = array[y * scale + scale // 2, x * scale + scale // 2]
            expected = colors * (1 - MAP_SHADE + MAP_SHADE * base_rgb[y, x].max() / 255.0)
            decoded[i, j] = np.abs(expected - drawn).sum(-1).argmin()
    return decoded


# ------------------------------------------------------------------------------------------------ the list


def test_one_tab_per_list_entry_with_its_api_name_and_one_run_per_model_at_a_time(demo, apps):
    assert isinstance(demo, gr.Blocks)
    assert list(apps) == [tab.api_name for tab in TABS]
    listeners = {fn.api_name: fn for fn in demo.fns.values()}
    for tab in TABS:
        for name in (tab.api_name, f"{tab.api_name}_layer"):
            assert listeners[name].concurrency_limit == 1
            assert listeners[name].concurrency_id == tab.model


def test_a_tab_without_weights_shows_why_and_the_others_still_work(tiny_loader):
    def loader(tab):
        if tab.model in ("dit_moe_digits", "dit_moe_shapes"):
            raise FileNotFoundError(f"{tab.model}.safetensors: not found in zoo/weights\ntried: the bundle")
        return tiny_loader(tab)

    demo = build_demo(load_pipeline=loader, cache_examples=False)
    assert list(demo.tab_apps) == ["shapes_video", "deweather", "fusion", "audio", "scene_qa"]
    texts = [block.value or "" for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    for model in ("dit_moe_digits", "dit_moe_shapes"):
        assert any("not available" in t and f"> FileNotFoundError: {model}.safetensors: not found" in t
                   and "> tried: the bundle" in t for t in texts)
    tabs = next(block for block in demo.blocks.values() if isinstance(block, gr.Tabs))
    assert tabs.selected == "shapes_video"  # the demo opens on the first tab that works


def test_tab_names_must_be_unique(tiny_loader):
    with pytest.raises(ValueError, match="unique"):
        build_demo([TABS[0], TABS[0]], load_pipeline=tiny_loader)


# ------------------------------------------------------------------------------------------------ generation


def test_class_to_image_shows_the_pipelines_routing_for_the_seed(apps, tiny_pipelines):
    import torch

    app = apps["digits"]
    for layer in (0, 1):
        (image, picture, chart, notes), _ = quietly(app.run, "7", 5, STEPS, GUIDANCE, layer)
        pipe = tiny_pipelines["dit_moe_digits"]
        reference = pipe(class_labels=["7"], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         generator=torch.Generator().manual_seed(5), return_routing=True)
        expected_map = reference.routing_maps[layer][0]  # [8, 8]
        raw = reference.images[0]  # 16x16
        assert image.size == (256, 256)  # enlarged 16x for display, nearest neighbour
        assert np.array_equal(np.asarray(image)[::16, ::16], np.asarray(raw))
        assert np.array_equal(decode_map(picture, raw, 8, 4), expected_map)
        counts = np.bincount(expected_map.ravel(), minlength=4)
        busiest = int(counts.argmax())
        assert f"Layer {layer}" in notes and f"**e{busiest}**" in notes
        assert f"{counts[busiest] / 64:.0%} of the 64 patches" in notes
        assert isinstance(chart, Image.Image)


def test_same_inputs_are_computed_once_and_another_layer_only_redraws(apps, monkeypatch):
    app = apps["digits"]
    calls = []
    original = app.compute
    monkeypatch.setattr(app, "compute", lambda *a: calls.append(a) or original(*a))
    first, _ = quietly(app.run, "3", 11, STEPS, GUIDANCE, 0)
    again, _ = quietly(app.run, "3", 11, STEPS, GUIDANCE, 1)
    assert len(calls) == 1
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    other_seed, _ = quietly(app.run, "3", 12, STEPS, GUIDANCE, 0)
    assert len(calls) == 2
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other_seed[0]))


def test_text_to_image_runs_a_prompt(apps):
    (image, picture, chart, notes), _ = quietly(apps["shapes"].run, "a large red circle on the left", 0, STEPS,
                                                GUIDANCE, 1)
    assert image.size == (256, 256) and image.mode == "RGB"  # 32 px enlarged 8x
    assert "64 patches" in notes


def test_text_to_video_writes_a_playable_mp4(apps, tiny_pipelines):
    (path, picture, chart, notes), _ = quietly(apps["shapes_video"].run, "a red square moving left", 0, STEPS,
                                               GUIDANCE, 0)
    config = tiny_pipelines["dit_moe_shapes_video"].transformer.config
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == config.num_frames
    assert frames[0].shape == (256, 256, 3)  # 8 px frames enlarged 32x
    grid = config.input_size // config.patch_size
    assert f"{config.num_frames * grid * grid} patches" in notes


@pytest.mark.parametrize("tab, args, message", [
    ("shapes", ("", 0, STEPS, GUIDANCE, 0), "The prompt is empty"),
    ("shapes", ("   ", 0, STEPS, GUIDANCE, 0), "The prompt is empty"),
    ("shapes", ("x" * 301, 0, STEPS, GUIDANCE, 0), "at most 300"),
    ("shapes_video", ("", 0, STEPS, GUIDANCE, 0), "The prompt is empty"),
    ("digits", ("seven", 0, STEPS, GUIDANCE, 0), "Unknown class 'seven'; accepted: 0, 1"),
    ("digits", ("7", -1, STEPS, GUIDANCE, 0), "Seed must be a whole number from 0"),
    ("digits", ("7", 1.5, STEPS, GUIDANCE, 0), "Seed must be a whole number"),
    ("digits", ("7", None, STEPS, GUIDANCE, 0), "Seed must be a whole number"),
    ("digits", ("7", 0, 0, GUIDANCE, 0), "Steps must be a whole number from 1 to 100"),
    ("digits", ("7", 0, 1000, GUIDANCE, 0), "Steps must be a whole number from 1 to 100"),
    ("digits", ("7", 0, STEPS, -1.0, 0), "Guidance must be a number from 0 to 15"),
    ("digits", ("7", 0, STEPS, float("nan"), 0), "Guidance must be a number"),
    ("digits", ("7", 0, STEPS, GUIDANCE, 2), "MoE layer must be a whole number from 0 to 1"),
    ("digits", ("7", 0, STEPS, GUIDANCE, "top"), "MoE layer must be a whole number from 0 to 1"),
    ("digits", ("7", 0, STEPS, GUIDANCE, "2"), "MoE layer must be a whole number from 0 to 1, got '2'"),
    ("digits", ("7", 0, STEPS, GUIDANCE, "0.5"), "MoE layer must be a whole number from 0 to 1, got '0.5'"),
    ("digits", ("7", 0, STEPS, GUIDANCE, "nan"), "MoE layer must be a whole number from 0 to 1, got 'nan'"),
    ("digits", ("7", 0, STEPS, GUIDANCE, ""), "MoE layer must be a whole number from 0 to 1, got ''"),
    ("digits", ("7", "zero", STEPS, GUIDANCE, 0), "Seed must be a whole number"),
])
def test_bad_generation_inputs_raise_readable_errors(apps, tab, args, message):
    with pytest.raises(gr.Error, match=message.replace("(", r"\(")):
        apps[tab].run(*args)


def test_layer_given_as_text_is_the_same_layer(apps):
    # gradio's API schema types the layer dropdown as a string: gradio_client sends "1".
    app = apps["digits"]
    (_, by_number, _, notes), _ = quietly(app.run, "7", 5, STEPS, GUIDANCE, 1)
    for text in ("1", " 1 ", "1.0"):
        (_, by_text, _, text_notes), _ = quietly(app.run, "7", 5, STEPS, GUIDANCE, text)
        assert np.array_equal(np.asarray(by_text), np.asarray(by_number))
        assert text_notes.split(" Computed in")[0] == notes.split(" Computed in")[0]


def test_layer_dropdown_takes_text_before_gradio_compares_it_with_its_choices(demo):
    dropdown = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "digits-layer")
    assert [value for _, value in dropdown.choices] == [0, 1]
    assert dropdown.api_info()["type"] == "string"  # what the API schema advertises
    assert dropdown.preprocess("1") == 1 and dropdown.preprocess(0) == 0
    with pytest.raises(gr.Error, match="MoE layer must be a whole number from 0 to 1, got 'top'"):
        dropdown.preprocess("top")


# ------------------------------------------------------------------------------------------------ uploads


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_restore_returns_before_and_after(apps, photo, tiny_pipelines):
    (pair, picture, chart, notes), _ = quietly(apps["deweather"].run, str(photo), 0)
    before, after = pair
    assert before.size == after.size == (40, 24)
    assert np.array_equal(np.asarray(before), np.asarray(Image.open(photo)))
    reference = tiny_pipelines["mofme_weather"](Image.open(photo), output_type="np").images[0]
    assert np.abs(np.asarray(after) / 255.0 - reference).max() <= 1 / 255 + 1e-6
    patch = tiny_pipelines["mofme_weather"].model.config.patch_size
    assert f"{(24 // patch) * (40 // patch)} patches" in notes


def test_huge_image_is_scaled_down_and_the_user_is_told(tiny_loader, photo):
    small_tab = dataclasses.replace(TABS[3], max_side=20)
    app = small_tab.kind(small_tab, tiny_loader(small_tab))
    (pair, *_rest, notes), caught = quietly(app.run, str(photo), 0)
    assert pair[1].size == (20, 12)
    assert "The input was 40x24; it was scaled down to 20x12" in notes
    assert any("scaled down" in message for message in caught)


def test_too_many_pixels_is_refused_before_decoding(apps, photo, monkeypatch):
    monkeypatch.setattr(demo_module, "MAX_PIXELS", 500)
    with pytest.raises(gr.Error, match=r"\(photo.png\) is 40x24 = 0.00096 megapixels; this demo accepts up to "
                                       r"0.0005 megapixels\."):
        apps["deweather"].run(str(photo), 0)


@pytest.mark.parametrize("width, height, megapixels", [
    (20000, 20000, "400"),  # over PIL's own limit (2 x 89.5 MP): PIL refuses to open it at all
    (12000, 10000, "120"),  # over PIL's warning limit (89.5 MP)
    (8000, 6000, "48"),  # over ours only
])
def test_an_enormous_image_gets_the_demos_limit_and_its_size(apps, png_header_only, width, height, megapixels):
    path = png_header_only("big.png", width, height)
    message = (rf"The photo \(big.png\) is {width}x{height} = {megapixels} megapixels; this demo accepts up to "
               rf"{demo_module.MAX_PIXELS / 1e6:g} megapixels\.")
    with pytest.raises(gr.Error, match=message):
        apps["deweather"].run(str(path), 0)


def test_upload_component_gives_the_pixel_limit_for_a_decompression_bomb(huge_png):
    from gradio.data_classes import ImageData

    component = demo_module.image_input(label="Photo", render=False)
    with pytest.raises(gr.Error, match=r"Photo \(huge.png\) is 20000x20000 = 400 megapixels; this demo accepts up "
                                       r"to 40 megapixels\.") as caught:
        component.preprocess(ImageData(path=str(huge_png), orig_name="huge.png"))
    assert "DecompressionBomb" not in str(caught.value)


@pytest.mark.parametrize("format_name, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                                 ("GIF", "gif"), ("TIFF", "tif")])
def test_header_size_reads_every_accepted_format(tmp_path, format_name, suffix):
    path = tmp_path / f"image.{suffix}"
    Image.new("RGB", (37, 23), (200, 10, 10)).save(path, format=format_name)
    assert demo_module.header_size(path) == (37, 23)


def test_header_size_of_a_file_no_accepted_format_reads_is_none(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    assert demo_module.header_size(text) is None


def test_not_an_image_and_a_corrupt_image_raise_readable_errors(apps, photo, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(gr.Error, match="notes.png\\) is not an image this demo can read; accepted: PNG"):
        apps["deweather"].run(str(text), 0)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(photo.read_bytes()[:200])
    with pytest.raises(gr.Error, match="truncated.png\\) is damaged"):
        apps["deweather"].run(str(truncated), 0)
    with pytest.raises(gr.Error, match="Upload the photo first"):
        apps["deweather"].run(None, 0)


def test_upload_component_turns_decoding_failures_into_gr_errors(apps, tmp_path):
    from gradio.data_classes import ImageData

    text = tmp_path / "notes.jpg"
    text.write_text("not a jpeg")
    component = demo_module.image_input(label="Photo", render=False)
    with pytest.raises(gr.Error, match="Photo: notes.jpg is not an image this demo can read"):
        component.preprocess(ImageData(path=str(text), orig_name="notes.jpg"))


def test_transparent_upload_is_put_on_white(apps, tmp_path):
    path = tmp_path / "alpha.png"
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(path)
    (pair, *_), _ = quietly(apps["deweather"].run, str(path), 0)
    assert np.asarray(pair[0]).min() == 255


def test_fusion_fuses_a_pair_and_names_modality_experts(apps, tmp_path, tiny_pipelines):
    rng = np.random.default_rng(1)
    ir, vis = tmp_path / "ir.png", tmp_path / "vis.png"
    Image.fromarray(rng.integers(0, 256, (32, 48), dtype=np.uint8), mode="L").save(ir)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(vis)
    (fused, picture, chart, notes), _ = quietly(apps["fusion"].run, str(ir), str(vis), 0)
    reference = tiny_pipelines["moe_fusion_irvis"](Image.open(ir), Image.open(vis)).images[0]
    assert np.array_equal(np.asarray(fused), np.asarray(reference))
    assert "local_foreground" in notes and "gate cells" in notes
    layers = {layer.name: layer for layer in apps["fusion"].layers}  # legend labels come from the blocks
    assert layers["local_background"].labels == ("e0 visible", "e1 visible", "e2 infrared", "e3 infrared")
    assert layers["global_decoder"].labels == ("e0", "e1", "e2", "e3")


def test_fusion_pair_of_different_sizes_is_refused(apps, tmp_path):
    ir, vis = tmp_path / "ir.png", tmp_path / "vis.png"
    Image.new("L", (48, 32)).save(ir)
    Image.new("RGB", (48, 40)).save(vis)
    with pytest.raises(gr.Error, match="infrared image is 48x32 but the visible image is 48x40"):
        apps["fusion"].run(str(ir), str(vis), 0)


def test_colour_infrared_is_converted_to_grey_with_a_note(apps, tmp_path):
    ir, vis = tmp_path / "ir.png", tmp_path / "vis.png"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ir)  # a pseudo-coloured frame
    Image.new("L", (16, 16), 128).save(vis)
    (fused, *_rest, notes), _ = quietly(apps["fusion"].run, str(ir), str(vis), 0)
    assert "converted to greyscale" in notes and fused.size == (16, 16)


def test_moh_attention_layers_join_the_layer_menu_with_no_app_change(make_digits_pipeline):
    """The app walks the routed-block base: a DiT-MoE with MoH attention shows its attention layers (heads as
    experts) beside the MoE FFNs, drawn from the pipeline's routing maps like any other layer."""
    pipe = make_digits_pipeline(attention="moh", num_heads=4, moh_shared_heads=1, moh_top_k_heads=2)
    pipe.set_progress_bar_config(disable=True)
    tab = TABS[0]
    app = tab.kind(tab, pipe)
    names = [layer.name for layer in app.layers]
    assert names[:2] == ["blocks.0.attn", "blocks.0.moe"] and len(names) == 2 * len(pipe.transformer.blocks)
    assert app.layers[0].labels == ("e0 head 1", "e1 head 2", "e2 head 3")
    (image, picture, chart, notes), _ = quietly(app.run, "3", 0, 2, 2.0, 0)
    assert picture is not None and "blocks.0.attn" in notes


def test_model_without_moe_layers_says_so(tiny_loader):
    from moezoo.pipelines.deweather import DeweatherPipeline
    from moezoo.zoo import create_model

    tab = TABS[3]
    app = tab.kind(tab, DeweatherPipeline(create_model("test_mofme", ffn="dense")))
    (pair, picture, chart, notes), _ = quietly(app.run, Image.new("RGB", (8, 8)), None)
    assert picture is None and chart is None and "has no MoE layers" in notes


def test_package_exports_build_demo_lazily():
    import moezoo.app

    assert moezoo.app.build_demo is build_demo and moezoo.app.TABS is TABS
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moezoo.app.nope  # noqa: B018
