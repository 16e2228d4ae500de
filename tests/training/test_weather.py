"""Synthetic weather (the training renderer's variety, and the benchmark's second renderer that training never
imports), the packaged photographs and their splits, the photo-split datasets and the paired-folder DataModule."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from moezoo.training.datamodules.weather import PairedFolderDataModule, SyntheticWeatherDataModule
from moezoo.training.datasets.photos import PHOTO_NAMES, TEST_PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS, load_photo, photos
from moezoo.training.datasets.weather import (
    WEATHER_TYPES,
    SyntheticWeatherDataset,
    add_haze,
    add_raindrops,
    add_rain_streaks,
    add_weather,
    weather_test_set,
)

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_crop(size=48):
    return load_photo("astronaut")[100 : 100 + size, 200 : 200 + size].copy()


@pytest.mark.parametrize("weather", WEATHER_TYPES)
def test_weather_is_a_seeded_visible_degradation(weather):
    clean = clean_crop()
    a = add_weather(clean, weather, np.random.default_rng(3))
    b = add_weather(clean, weather, np.random.default_rng(3))
    c = add_weather(clean, weather, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == clean.shape
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    psnr = -10 * np.log10(np.mean((a - clean) ** 2))
    assert 8 < psnr < 40  # visible, but the scene is still there


def test_rain_streaks_only_add_light():
    clean = clean_crop()
    rainy = add_rain_streaks(clean, np.random.default_rng(0))
    assert (rainy >= clean - 1e-6).all() and (rainy > clean + 0.05).mean() > 0.01


def test_haze_follows_the_scattering_model():
    # I = J t + A (1 - t) with the same t and A for the same seed: I(J1) - I(J2) = t (J1 - J2), t in (0, 1),
    # the same t in every channel.
    rng = np.random.default_rng(0)
    j1, j2 = rng.random((32, 40, 3), dtype=np.float32), rng.random((32, 40, 3), dtype=np.float32)
    i1, i2 = add_haze(j1, np.random.default_rng(7)), add_haze(j2, np.random.default_rng(7))
    apart = np.abs(j1 - j2).min(-1) > 0.1  # where the ratio is well conditioned in every channel
    t = ((i1 - i2) / (j1 - j2))[apart]
    assert apart.sum() > 100
    assert np.allclose(t, t[:, :1], atol=1e-4)
    assert (t > 0).all() and (t < 1).all()
    airlight = (i1[apart] - j1[apart] * t) / (1 - t)
    assert np.allclose(airlight, airlight.mean(0), atol=1e-3)  # one airlight colour


def streak_angle(clean: np.ndarray, rainy: np.ndarray) -> float:
    """The streaks' direction in degrees from vertical (rows pointing down, so the sign is the mirror of the
    renderer's wind), from the structure tensor of the added light: a line's gradients are across it."""
    layer = (rainy - clean).mean(-1)
    gy, gx = np.gradient(layer)
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    across = 0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy))  # from the x axis, of the gradients
    return (across + 90) % 180 - 90 if abs(across) < 90 else across  # along = across rotated by 90 degrees


def test_rain_streaks_vary_in_direction_and_amount_between_images():
    clean = np.full((96, 96, 3), 0.3, np.float32)
    rainy = [add_rain_streaks(clean, np.random.default_rng(seed)) for seed in range(12)]
    angles = [streak_angle(clean, r) for r in rainy]
    assert max(angles) - min(angles) > 25  # the wind is drawn per image (-30..30 degrees)
    covered = [float(((r - clean).mean(-1) > 0.05).mean()) for r in rainy]
    assert max(covered) > 3 * min(covered)  # layers, densities and lengths drawn per image


def test_raindrops_come_in_several_sizes():
    clean = np.full((160, 160, 3), 0.3, np.float32)
    drops = add_raindrops(clean, np.random.default_rng(1))
    labels, count = ndimage.label(np.abs(drops - clean).max(-1) > 0.02)
    areas = np.bincount(labels.ravel())[1:]
    assert count > 20 and areas.max() > 15 * np.median(areas)  # many small drops, a few large ones


def test_haze_depth_varies_across_the_image_and_rises_up_the_frame():
    # With two flat scenes J1, J2 the scattering model gives t exactly at every pixel: t = (I1 - I2) / (J1 - J2).
    dark, light = np.full((64, 48, 3), 0.2, np.float32), np.full((64, 48, 3), 0.8, np.float32)
    tops, bottoms, spreads = [], [], []
    for seed in range(16):
        t = (add_haze(dark, np.random.default_rng(seed)) - add_haze(light, np.random.default_rng(seed)))[..., 0] / -0.6
        tops.append(t[:8].mean()), bottoms.append(t[-8:].mean()), spreads.append(t.std())
    assert np.mean(bottoms) - np.mean(tops) > 0.03  # on average the top of the frame is farther (hazier)
    assert max(spreads) > 0.05  # density maps, not one haze level per image
    assert np.ptp([np.mean(t) for t in tops]) > 0.2  # and the level itself varies between images


def test_unknown_weather_and_bad_images_raise():
    with pytest.raises(ValueError, match="accepted: rain_streaks"):
        add_weather(clean_crop(), "fog", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        add_weather(np.zeros((8, 8)), "haze", np.random.default_rng(0))


def find_crop(photo, crop):
    """Positions (y, x) where ``crop`` is exactly a block of ``photo``."""
    s = crop.shape[0]
    if min(photo.shape[:2]) < s:
        return []
    h, w = photo.shape[0] - s + 1, photo.shape[1] - s + 1
    candidates = np.ones((h, w), bool)
    for d in (0, s // 2, s - 1):  # three pixels on the diagonal narrow the search before full comparisons
        candidates &= (photo[d : d + h, d : d + w] == crop[d, d]).all(-1)
    ys, xs = np.nonzero(candidates)
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(photo[y : y + s, x : x + s], crop)]


def test_packaged_photos_load_and_split_by_photograph():
    assert len(PHOTO_NAMES) == len(set(PHOTO_NAMES)) == 22
    assert set(TRAIN_PHOTOS) | set(VAL_PHOTOS) | set(TEST_PHOTOS) == set(PHOTO_NAMES)
    assert len(TRAIN_PHOTOS) + len(VAL_PHOTOS) + len(TEST_PHOTOS) == len(PHOTO_NAMES)  # disjoint
    for name, image in photos("all"):
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3, name
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05, name
        assert min(image.shape[:2]) >= 256, name
    # scikit-learn's and gradio's files are the photos they are, not a stand-in: their known sizes
    assert load_photo("china").shape == (427, 640, 3) and load_photo("tower").shape == (600, 377, 3)
    with pytest.raises(ValueError, match="accepted: astronaut"):
        load_photo("lena")
    with pytest.raises(ValueError, match="accepted: train, val, test, all"):
        photos("validation")


def test_train_val_and_test_crops_come_from_different_photos():
    sets = {split: SyntheticWeatherDataset(split, crop_size=32, length=8, augment=False)
            for split in ("train", "val", "test")}
    names = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS, "test": TEST_PHOTOS}
    for split, dataset in sets.items():
        assert set(dataset.photo_names) == set(names[split])
        others = [n for other, own in names.items() if other != split for n in own]
        for i in range(2):
            crop = dataset[i]["target"].permute(1, 2, 0).numpy()
            assert any(find_crop(load_photo(n), crop) for n in names[split])
            assert not any(find_crop(load_photo(n), crop) for n in others)


def test_dataset_items_are_reproducible_and_cycle_weather():
    ds = SyntheticWeatherDataset("train", crop_size=24, length=10, seed=5)
    assert [ds[i]["weather"] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert torch.equal(ds[6]["input"], SyntheticWeatherDataset("train", 24, 10, seed=5)[6]["input"])
    assert not torch.equal(ds[6]["input"], ds[6]["target"])
    with pytest.raises(ValueError, match="crop_size"):
        SyntheticWeatherDataset("test", crop_size=1000)


def test_datamodule_batches():
    dm = SyntheticWeatherDataModule(crop_size=16, batch_size=4, train_length=8, val_length=4,
                                    weather_types=["snow", "haze"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == batch["target"].shape == (4, 3, 16, 16)
    assert batch["input"].dtype == torch.float32 and 0 <= batch["input"].min() and batch["input"].max() <= 1
    assert set(batch["weather"].tolist()) <= {0, 1}
    val = next(iter(dm.val_dataloader()))
    assert val["weather"].tolist() == [0, 1, 0, 1]
    assert dm.val_set.photo_names == list(VAL_PHOTOS)  # early stopping never looks at the benchmark's photos


def test_weather_test_set_uses_whole_held_out_photos():
    items = weather_test_set("raindrops", seed=0)
    assert [name for name, _, _ in items] == list(TEST_PHOTOS)
    for name, degraded, clean in items:
        assert degraded.shape == clean.shape == load_photo(name).shape


# ------------------------------------------------------------------ the benchmark's second renderer


@pytest.mark.parametrize("weather", WEATHER_TYPES)
def test_unseen_renderer_is_a_seeded_visible_degradation_unlike_training(weather):
    unseen = load_bench_module("unseen_weather")
    clean = clean_crop(64)
    a = unseen.add_unseen_weather(clean, weather, np.random.default_rng(3))
    assert a.dtype == np.float32 and a.shape == clean.shape and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, unseen.add_unseen_weather(clean, weather, np.random.default_rng(3)))
    assert not np.array_equal(a, unseen.add_unseen_weather(clean, weather, np.random.default_rng(4)))
    psnr = -10 * np.log10(np.mean((a - clean) ** 2))
    assert 8 < psnr < 40
    assert not np.allclose(a, add_weather(clean, weather, np.random.default_rng(3)), atol=0.02)


def test_unseen_haze_scatters_blue_more_than_red():
    # the training haze has one transmission for all channels; this one's is per channel (t_blue < t_red)
    unseen = load_bench_module("unseen_weather")
    dark, light = np.full((32, 32, 3), 0.2, np.float32), np.full((32, 32, 3), 0.8, np.float32)
    t = (unseen.haze(dark, np.random.default_rng(5)) - unseen.haze(light, np.random.default_rng(5))) / -0.6
    assert (t[..., 2] < t[..., 0] - 0.005).all() and ((0 < t) & (t < 1)).all()


def test_unseen_test_set_and_errors():
    unseen = load_bench_module("unseen_weather")
    items = unseen.unseen_weather_test_set("snow", seed=1)
    assert [name for name, _, _ in items] == list(TEST_PHOTOS)
    assert all(d.shape == c.shape == load_photo(n).shape for n, d, c in items)
    with pytest.raises(ValueError, match="accepted: rain_streaks"):
        unseen.add_unseen_weather(clean_crop(), "hail", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        unseen.add_unseen_weather(np.zeros((8, 8)), "haze", np.random.default_rng(0))


def test_training_never_imports_the_unseen_renderer():
    sources = [p for p in (ROOT / "training").rglob("*.py")]
    assert len(sources) > 20
    assert not [p for p in sources if "unseen_weather" in p.read_text()]


def write_pairs(root, names, size=(20, 24), input_dir="input", target_dir="gt"):
    (root / input_dir).mkdir(parents=True)
    (root / target_dir).mkdir(parents=True)
    for i, name in enumerate(names):
        value = 10 * (i + 1)
        Image.fromarray(np.full((*size, 3), value, np.uint8)).save(root / input_dir / f"{name}.png")
        Image.fromarray(np.full((*size, 3), value + 1, np.uint8)).save(root / target_dir / f"{name}.png")


def test_paired_folders_match_by_name_and_split(tmp_path):
    names = [f"im{i:02d}" for i in range(10)]
    write_pairs(tmp_path, names)
    (tmp_path / "input" / "unpaired.png").write_bytes((tmp_path / "input" / "im00.png").read_bytes())
    dm = PairedFolderDataModule(str(tmp_path), crop_size=16, val_crop_size=16, batch_size=3, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    assert not set(dm.train_set.names) & set(dm.val_set.names)
    for dataset in (dm.train_set, dm.val_set):
        for i in range(len(dataset)):
            item = dataset[i]
            value = 10 * (names.index(dataset.names[i]) + 1)
            assert item["input"].shape == (3, 16, 16) and item["weather"] == -1
            assert torch.allclose(item["input"], torch.full_like(item["input"], value / 255))
            assert torch.allclose(item["target"], torch.full_like(item["target"], (value + 1) / 255))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (3, 3, 16, 16)


def test_paired_folders_with_a_val_root_and_custom_names(tmp_path):
    write_pairs(tmp_path / "train", ["a", "b"], input_dir="synthetic")
    write_pairs(tmp_path / "test", ["c"], input_dir="synthetic")
    dm = PairedFolderDataModule(str(tmp_path / "train"), val_root=str(tmp_path / "test"), input_dir="synthetic",
                                val_crop_size=None)
    dm.setup("fit")
    assert dm.train_set.names == ["a", "b"] and dm.val_set.names == ["c"]
    assert next(iter(dm.val_dataloader()))["input"].shape == (1, 3, 20, 24)  # whole image, batch size 1


def test_paired_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        PairedFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "input").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "input" / "x.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "gt" / "y.png")
    with pytest.raises(ValueError, match="matched by file name"):
        PairedFolderDataModule(str(tmp_path)).setup("fit")
