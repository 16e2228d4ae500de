"""The image DataModules: batch format, digits against scikit-learn, shapes against their own pixels, and
image folders written here on disk."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from moezoo.training.datamodules.images import DigitsDataModule, ImageFolderDataModule, ShapesDataModule
from moezoo.training.datasets.images import (
    COLOURS,
    IMAGE_EXTENSIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    caption_for,
    collate_image_batch,
    label_for,
    parse_caption,
)


def check_batch(batch, batch_size: int, channels: int, size: int) -> None:
    assert set(batch) == {"image", "label", "caption"}
    image, label, caption = batch["image"], batch["label"], batch["caption"]
    assert image.shape == (batch_size, channels, size, size) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert label.shape == (batch_size,) and label.dtype == torch.long
    assert isinstance(caption, list) and len(caption) == batch_size and all(isinstance(c, str) for c in caption)


def test_collate_stacks_samples():
    samples = [
        {"image": torch.zeros(2, 4, 4), "label": 3, "caption": "x"},
        {"image": torch.ones(2, 4, 4), "label": -1, "caption": ""},
    ]
    batch = collate_image_batch(samples)
    check_batch(batch, 2, 2, 4)
    assert batch["label"].tolist() == [3, -1] and batch["caption"] == ["x", ""]


# ----------------------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


def test_digits_batches_and_split(sklearn_digits):
    dm = DigitsDataModule(image_size=16, batch_size=32, val_fraction=0.1, seed=0)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), 32, 1, 16)
    check_batch(next(iter(dm.val_dataloader())), 32, 1, 16)
    assert dm.label_names == [str(d) for d in range(10)]

    train, val = dm.train_set.indices, dm.val_set.indices
    assert len(val) == round(0.1 * 1797) and not set(train) & set(val) and len(train) + len(val) == 1797

    again = DigitsDataModule(seed=0)
    again.setup("fit")
    other = DigitsDataModule(seed=1)
    other.setup("fit")
    assert again.val_set.indices == val and other.val_set.indices != val


def test_digits_labels_and_pixels_match_sklearn(sklearn_digits):
    dm = DigitsDataModule(image_size=8, batch_size=16)
    dm.setup("fit")
    for dataset in (dm.train_set, dm.val_set):
        for j in (0, 5, len(dataset) - 1):
            k = dataset.indices[j]
            sample = dataset[j]
            assert sample["label"] == sklearn_digits.target[k]
            assert sample["caption"] == f"the digit {sklearn_digits.target[k]}"
            # At 8x8 the resize is the identity: pixels are sklearn's 0..16 values mapped to [-1, 1].
            expected = torch.from_numpy(sklearn_digits.images[k]).float() / 8.0 - 1.0
            torch.testing.assert_close(sample["image"][0], expected)

    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == sklearn_digits.target[dm.val_set.indices[:16]].tolist()


def test_digits_upsampled_keep_the_digit(sklearn_digits):
    dm = DigitsDataModule(image_size=32)
    dm.setup("fit")
    j = 3
    image = dm.train_set[j]["image"]  # [1, 32, 32]
    pooled = torch.nn.functional.avg_pool2d(image[None], 4)[0, 0]  # back to 8x8
    original = torch.from_numpy(sklearn_digits.images[dm.train_set.indices[j]]).float() / 8.0 - 1.0
    assert torch.corrcoef(torch.stack([pooled.flatten(), original.flatten()]))[0, 1] > 0.95


def test_digits_augmentation_shifts_only_training_images():
    dm = DigitsDataModule(image_size=16, augment=True)
    dm.setup("fit")
    plain = DigitsDataModule(image_size=16)
    plain.setup("fit")
    torch.manual_seed(0)
    shifted = [dm.train_set[j]["image"] for j in range(20)]
    assert any(not torch.equal(a, plain.train_set[j]["image"]) for j, a in enumerate(shifted))
    assert all(a.shape == (1, 16, 16) and a.min() >= -1 and a.max() <= 1 for a in shifted)
    assert torch.equal(dm.val_set[0]["image"], plain.val_set[0]["image"])


# ----------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------


def test_shapes_batches():
    dm = ShapesDataModule(num_train=64, num_val=16, image_size=32, batch_size=16)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), 16, 3, 32)
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, 16, 3, 32)
    assert batch["label"].min() >= 0 and batch["label"].max() < 12 and len(dm.label_names) == 12
    check_batch(next(iter(dm.predict_dataloader())), 16, 3, 32)


def test_shapes_deterministic_by_seed_and_index():
    a, b, other = ShapesDataset(50, 32, seed=0), ShapesDataset(50, 32, seed=0), ShapesDataset(50, 32, seed=1)
    for i in (0, 7, 49):
        assert torch.equal(a[i]["image"], a[i]["image"])
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert all(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(10))
    with pytest.raises(IndexError):
        a[50]


def test_shapes_val_is_the_next_items_of_the_same_seed():
    dm = ShapesDataModule(num_train=30, num_val=5, image_size=16, seed=3)
    dm.setup("fit")
    continued = ShapesDataset(35, 16, seed=3)
    assert torch.equal(dm.val_set[2]["image"], continued[32]["image"])
    assert torch.equal(dm.train_set[2]["image"], continued[2]["image"])


def test_caption_attribute_round_trip():
    ds = ShapesDataset(200, 16)
    seen = set()
    for i in range(200):
        attrs, sample = ds.attributes(i), ds[i]
        assert set(attrs) == {"shape", "colour", "size", "position"}
        assert parse_caption(sample["caption"]) == attrs
        assert caption_for(parse_caption(sample["caption"])) == sample["caption"]
        assert sample["label"] == label_for(attrs) == SHAPES.index(attrs["shape"]) * 4 + COLOURS.index(attrs["colour"])
        assert ds.label_names[sample["label"]] == f"{attrs['colour']} {attrs['shape']}"
        seen.update(attrs.values())
    assert seen == set(SHAPES) | set(COLOURS) | set(SIZES) | set(POSITIONS)


def test_parse_caption_forms_and_errors():
    assert parse_caption("A Large RED circle, on the LEFT.") == dict(
        size="large", colour="red", shape="circle", position="left"
    )
    assert parse_caption("in the centre: a small blue square") == dict(
        size="small", colour="blue", shape="square", position="center"
    )
    assert parse_caption("red circle") == dict(colour="red", shape="circle")
    assert parse_caption("") == {}
    with pytest.raises(ValueError, match="purple") as info:
        parse_caption("a purple circle")
    for word in SHAPES + COLOURS + SIZES + POSITIONS:
        assert word in str(info.value)
    with pytest.raises(ValueError, match="two colours"):
        parse_caption("a red blue circle")
    with pytest.raises(ValueError, match="colour"):
        caption_for(dict(shape="circle", colour="purple", size="small", position="left"))


def _pixel_geometry(image_CHW: torch.Tensor):
    """From the pixels alone: coverage (how far each pixel is from the black background), mean colour of
    the shape, its coverage-weighted centroid (fractions of the side), area and extent."""
    rgb = (image_CHW + 1) / 2  # [3, H, W] in [0, 1]
    coverage = rgb.max(0).values
    shape_pixels = coverage > 0.2
    mean_rgb = rgb[:, shape_pixels].mean(1)
    size = image_CHW.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    area = coverage.sum()
    cx, cy = (coverage * xx).sum() / area, (coverage * yy).sum() / area
    # Farthest covered pixel from the centroid relative to sqrt(area): circle 0.56, square 0.71, triangle 0.88.
    reach = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()[coverage > 0.5].max() + 0.5
    return mean_rgb, (cx / size).item(), (cy / size).item(), area.item(), (reach / area.sqrt()).item()


EXPECTED_CHANNELS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
REGIONS = {  # where each position's centroid must lie: (x range, y range) as fractions of the side
    "left": ((0.0, 0.4), (0.4, 0.6)),
    "right": ((0.6, 1.0), (0.4, 0.6)),
    "top": ((0.4, 0.6), (0.0, 0.4)),
    "bottom": ((0.4, 0.6), (0.6, 1.0)),
    "center": ((0.4, 0.6), (0.4, 0.6)),
}


def test_shapes_pixels_show_what_the_caption_says():
    ds = ShapesDataset(120, image_size=64, seed=5)
    areas = {"small": [], "large": []}
    for i in range(len(ds)):
        sample = ds[i]
        said = parse_caption(sample["caption"])
        mean_rgb, cx, cy, area, reach = _pixel_geometry(sample["image"])
        for channel, on in enumerate(EXPECTED_CHANNELS[said["colour"]]):
            assert (mean_rgb[channel] > 0.6) if on else (mean_rgb[channel] < 0.02), (i, said, mean_rgb)
        (x0, x1), (y0, y1) = REGIONS[said["position"]]
        assert x0 < cx < x1 and y0 < cy < y1, (i, said, cx, cy)
        shape_seen = "circle" if reach < 0.655 else "square" if reach < 0.76 else "triangle"
        assert shape_seen == said["shape"], (i, said, reach)
        areas[said["size"]].append(area)
    assert areas["small"] and areas["large"] and min(areas["large"]) > max(areas["small"])


def test_shapes_background_is_black():
    image = ShapesDataset(1, 32)[0]["image"]
    assert (image[:, 0, :] == -1).all() and (image[:, :, -1] == -1).all()


# ----------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------


def _solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "pets"
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / "empty").mkdir()
    (root / "cat" / "notes.md").write_text("not an image")
    _solid((8, 8), (9, 9, 9)).save(root / "loose.png")
    for k in range(3):
        _solid((40, 30), (255, 0, 0)).save(root / "cat" / f"c{k}.png")
    _solid((20, 20), 128, mode="L").save(root / "cat" / "grey.JPG")
    _solid((24, 24), (0, 0, 255, 255), mode="RGBA").save(root / "dog" / "d0.png")
    (root / "dog" / "d0.txt").write_text("  a blue dog \n")
    _solid((30, 30), (0, 0, 255)).save(root / "dog" / "d1.webp")
    nested = root / "dog" / "more"
    nested.mkdir()
    _solid((16, 16), (0, 0, 255)).save(nested / "d2.bmp")
    return root


def test_image_folder_classes_captions_and_batches(class_folder):
    dm = ImageFolderDataModule(class_folder, image_size=8, batch_size=4, val_fraction=0.25, seed=0)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = " | ".join(str(w.message) for w in record)
    assert str(class_folder / "empty") in messages and "skipping" in messages
    assert "directly in" in messages and "ignored" in messages
    assert dm.label_names == ["cat", "dog"]
    samples = [ds[j] | {"file": ds.files[j]} for ds in (dm.train_set, dm.val_set) for j in range(len(ds))]
    assert len(samples) == 7 and len(dm.val_set) == 2
    for s in samples:
        assert s["label"] == (0 if s["file"].parent.name == "cat" else 1)
        assert s["caption"] == ("a blue dog" if s["file"].name == "d0.png" else "")
        assert s["image"].shape == (3, 8, 8)
        if s["file"].parent.name != "cat":  # every dog is blue: check the pixels, not just the labels
            assert torch.allclose(s["image"], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 8, 8), atol=0.05)
    check_batch(next(iter(dm.train_dataloader())), 4, 3, 8)
    check_batch(next(iter(dm.val_dataloader())), 2, 3, 8)


def test_image_folder_greyscale_and_center_crop(tmp_path):
    picture = np.zeros((20, 60, 3), dtype=np.uint8)  # three 20x20 thirds: red | green | blue
    picture[:, :20, 0] = picture[:, 20:40, 1] = picture[:, 40:, 2] = 255
    Image.fromarray(picture).save(tmp_path / "wide.png")
    _solid((10, 10), (255, 255, 255)).save(tmp_path / "white.png")

    dm = ImageFolderDataModule(tmp_path, image_size=10, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    assert dm.label_names == []
    wide = dm.train_set[dm.train_set.files.index(tmp_path / "wide.png")]
    assert wide["label"] == -1 and wide["caption"] == ""
    centre = wide["image"][:, :, 2:8]  # the crop keeps the green middle third
    assert torch.allclose(centre, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand_as(centre), atol=0.05)

    grey = ImageFolderDataModule(tmp_path, image_size=10, channels=1, batch_size=2, val_fraction=0.0)
    grey.setup("fit")
    batch = next(iter(grey.train_dataloader()))
    check_batch(batch, 2, 1, 10)
    assert batch["label"].tolist() == [-1, -1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(tmp_path / "missing").setup("fit")
    (tmp_path / "a").mkdir()
    (tmp_path / "b.txt").write_text("no pictures here")
    with pytest.raises(FileNotFoundError, match="no images") as info:
        ImageFolderDataModule(tmp_path).setup("fit")
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(tmp_path, channels=2)
    with pytest.raises(ValueError, match="val_fraction"):
        ImageFolderDataModule(tmp_path, val_fraction=1.0)
    _solid((8, 8), (1, 2, 3)).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match="too few"):
        ImageFolderDataModule(tmp_path, val_fraction=0.5).setup("fit")


# ----------------------------------------------------------------------------------------------------------
# Lightning integration
# ----------------------------------------------------------------------------------------------------------


def test_datamodule_drives_a_trainer():
    from lightning.pytorch import LightningModule, Trainer

    class Denoiser(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 3, 3, padding=1)

        def training_step(self, batch, batch_idx):
            noisy = batch["image"] + torch.randn_like(batch["image"])
            return torch.nn.functional.mse_loss(self.net(noisy), batch["image"])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers on a 2-batch run
        trainer.fit(Denoiser(), datamodule=ShapesDataModule(num_train=32, num_val=8, image_size=16, batch_size=8))


def test_lightning_cli_exposes_the_init_arguments():
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    cli = LightningCLI(
        BoringModel,
        ShapesDataModule,
        run=False,
        args=["--data.num_train=10", "--data.image_size=16", "--trainer.logger=false"],
    )
    assert cli.datamodule.num_train == 10 and cli.datamodule.image_size == 16
