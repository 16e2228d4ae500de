"""Synthetic weather, the photo-split datasets and the paired-folder DataModule."""

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.training.datamodules.weather import PairedFolderDataModule, SyntheticWeatherDataModule
from moezoo.training.datasets.photos import TEST_PHOTOS, TRAIN_PHOTOS, load_photo
from moezoo.training.datasets.weather import (
    WEATHER_TYPES,
    SyntheticWeatherDataset,
    add_haze,
    add_rain_streaks,
    add_weather,
    weather_test_set,
)


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


def test_train_and_test_crops_come_from_different_photos():
    train = SyntheticWeatherDataset("train", crop_size=32, length=8, augment=False)
    test = SyntheticWeatherDataset("test", crop_size=32, length=8, augment=False)
    assert set(train.photo_names) == set(TRAIN_PHOTOS) and set(test.photo_names) == set(TEST_PHOTOS)
    assert not set(train.photo_names) & set(test.photo_names)
    for dataset, own, other in ((train, TRAIN_PHOTOS, TEST_PHOTOS), (test, TEST_PHOTOS, TRAIN_PHOTOS)):
        for i in range(2):
            crop = dataset[i]["target"].permute(1, 2, 0).numpy()
            assert any(find_crop(load_photo(n), crop) for n in own)
            assert not any(find_crop(load_photo(n), crop) for n in other)


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


def test_weather_test_set_uses_whole_held_out_photos():
    items = weather_test_set("raindrops", seed=0)
    assert [name for name, _, _ in items] == list(TEST_PHOTOS)
    for name, degraded, clean in items:
        assert degraded.shape == clean.shape == load_photo(name).shape


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
