"""Image data for diffusion training: three LightningDataModules that yield the same batch.

Every batch, from every module here, is a dict (:class:`ImageBatch`) made by :func:`collate_image_batch`::

    {"image": float32 [B, C, H, W] in [-1, 1], "label": int64 [B] (-1: no label), "caption": list[str] ("": none)}

Modules:

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download),
  upsampled; label = the digit, caption = ``"the digit 7"``. The smallest real dataset there is.
- :class:`ShapesDataModule` over :class:`ShapesDataset`: generated pictures of one coloured shape on black,
  described by four attributes (:data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`). Sample
  ``i`` of seed ``s`` is always the same picture. :func:`caption_for` and :func:`parse_caption` turn attributes
  into text and back, so pipelines and the quality benchmark can check what a model drew.
- :class:`ImageFolderDataModule`: your own pictures, ``root/<class>/*.png`` (labels from the sorted class
  names) or a flat ``root/*.png`` (label -1); ``photo.txt`` next to ``photo.png`` is its caption.

Each module splits off a small held-out validation set, deterministically by ``seed``; ``predict_dataloader``
yields that split in order (its labels and captions are the conditions to generate from). The ``__init__``
arguments are type-hinted and documented, so ``LightningCLI`` exposes them as ``--data.<name>``.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ImageSample",
    "ImageBatch",
    "collate_image_batch",
    "DigitsDataset",
    "DigitsDataModule",
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "POSITIONS",
    "BACKGROUND_RGB",
    "caption_for",
    "parse_caption",
    "label_for",
    "ShapesDataset",
    "ShapesDataModule",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageFolderDataModule",
]


# ----------------------------------------------------------------------------------------------------------
# The one sample / batch format
# ----------------------------------------------------------------------------------------------------------


class ImageSample(TypedDict):
    """One item of every dataset here."""

    image: torch.Tensor  # float32 [C, H, W] in [-1, 1]
    label: int  # class index, -1 when the data has no classes
    caption: str  # "" when the data has no caption


class ImageBatch(TypedDict):
    """What every DataLoader here yields."""

    image: torch.Tensor  # float32 [B, C, H, W] in [-1, 1]
    label: torch.Tensor  # int64 [B], -1 where there is no label
    caption: list[str]  # B strings, "" where there is no caption


def collate_image_batch(samples: Sequence[ImageSample]) -> ImageBatch:
    """Stack :class:`ImageSample` dicts into one :class:`ImageBatch` (the collate of every loader here)."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
    }


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit "L" or "RGB" PIL image -> float32 [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def _check_loader_args(batch_size: int, num_workers: int, val_fraction: float | None = None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random (train, val) split of ``range(n)``; val gets ``round(n * val_fraction)`` items, at
    least one when ``val_fraction > 0``, and train keeps at least one. Both lists are sorted."""
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{n} samples are too few to hold out val_fraction={val_fraction} and still train")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class _ImageDataModule(LightningDataModule):
    """The loaders shared by the modules below; subclasses build ``train_set`` and ``val_set`` in ``setup``.

    Training batches are shuffled with a generator seeded by ``seed`` (reproducible whatever the global seed);
    validation and prediction batches come in a fixed order.
    """

    train_set: Dataset | None
    val_set: Dataset | None

    #: how samples become a batch (the video modules stack clips instead of images).
    collate_fn = staticmethod(collate_image_batch)

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set = None
        self.val_set = None
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=self._shuffle_generator if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=type(self).collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split in order: its labels and captions are the conditions to sample from."""
        return self._loader(self.val_set, shuffle=False)


# ----------------------------------------------------------------------------------------------------------
# Digits: scikit-learn's bundled 8x8 handwritten digits
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (images float64 [1797, 8, 8] of 0..16 ink values, targets int [1797])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


class DigitsDataset(Dataset):
    """Some of scikit-learn's ``load_digits()`` images as 1-channel ``image_size`` pictures in [-1, 1].

    Item ``j`` is sklearn's image ``indices[j]``: its 0..16 ink values are scaled to [0, 1], resized with
    antialiased bilinear interpolation, and mapped to [-1, 1] (no ink = -1). Label = the digit, caption =
    ``"the digit <d>"``.

    Args:
        image_size: side of the square output image in pixels.
        indices: which of the 1797 sklearn images, in order; None for all.
        augment: shift each image by a random whole number of pixels, up to one source (8x8) pixel each way,
            filling with background; uses torch's global RNG (Lightning seeds it per worker).
    """

    def __init__(self, image_size: int = 16, indices: Sequence[int] | None = None, augment: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        images, targets = _load_digits()
        self.indices = list(range(len(targets))) if indices is None else [int(i) for i in indices]
        ink_N1HW = torch.from_numpy(images[self.indices]).float().unsqueeze(1) / 16.0
        resized = F.interpolate(ink_N1HW, size=(image_size, image_size), mode="bilinear", antialias=True)
        self.images_N1HW = resized.clamp(0.0, 1.0) * 2.0 - 1.0
        self.labels = targets[self.indices].tolist()
        self.augment = augment
        self.max_shift = max(1, round(image_size / 8))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> ImageSample:
        image = self.images_N1HW[j]
        if self.augment:
            image = self._random_shift(image)
        digit = self.labels[j]
        return {"image": image, "label": digit, "caption": f"the digit {digit}"}

    def _random_shift(self, image_CHW: torch.Tensor) -> torch.Tensor:
        m = self.max_shift
        _, h, w = image_CHW.shape
        padded = F.pad(image_CHW, (m, m, m, m), value=-1.0)
        dy, dx = torch.randint(0, 2 * m + 1, (2,)).tolist()
        return padded[:, dy : dy + h, dx : dx + w].clone()


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's 1797 handwritten digits (bundled, no download) as 1-channel images for diffusion.

    Batches: image float32 [B, 1, image_size, image_size] in [-1, 1], label = the digit (0..9), caption =
    ``"the digit <d>"``. ``train_set.indices`` / ``val_set.indices`` are the sklearn indices of each split.

    Args:
        image_size: side of the square images in pixels (the 8x8 originals are resized, antialiased bilinear).
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_fraction: share of the 1797 images held out for validation, chosen at random by ``seed``.
        seed: seeds the train/val split and the order of training batches.
        augment: randomly shift training images by up to one source pixel (off by default).
    """

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        _check_loader_args(batch_size, num_workers, val_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.augment = augment

    @property
    def label_names(self) -> list[str]:
        """Class names by label: ``["0", ..., "9"]``."""
        return [str(d) for d in range(10)]

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = len(_load_digits()[1])
        train_ids, val_ids = _split_indices(n, self.val_fraction, self.seed)
        self.train_set = DigitsDataset(self.image_size, train_ids, augment=self.augment)
        self.val_set = DigitsDataset(self.image_size, val_ids, augment=False)


# ----------------------------------------------------------------------------------------------------------
# Shapes: generated pictures of one coloured shape, with captions that say exactly what is drawn
# ----------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

#: Pure, far-apart colours: every off channel is exactly 0, so a shape's colour is readable from its pixels.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
#: A plain black background, the same in every picture.
BACKGROUND_RGB: tuple[int, int, int] = (0, 0, 0)

# Geometry, as fractions of the image side. A shape's centre is its position's anchor plus a jitter of up to
# _JITTER each way; its "radius" r is drawn from its size's range. Circle: radius r; square: half-side
# 0.89 r (the circle's area); triangle: equilateral, circumradius 1.25 r, centroid on the centre. With these
# numbers every shape stays inside the image, and every large shape has more area than every small one.
_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
_JITTER = 0.02
_RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.085, 0.105), "large": (0.16, 0.19)}
_SUPERSAMPLE = 4  # draw at 4x, then box-filter down: exact-coverage antialiasing

# How each position reads in a caption ("a large red circle on the left").
_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_FILLER_WORDS = frozenset({"a", "an", "the", "at", "on", "in", "of", "to", "image", "picture", "photo"})
_SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "little": "small"}
_ATTRIBUTE_VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
}


def caption_for(attrs: Mapping[str, str]) -> str:
    """The caption of a shapes picture: ``"a large red circle on the left"``.

    ``attrs`` has the keys ``shape``, ``colour``, ``size`` and ``position`` (values from :data:`SHAPES`,
    :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`). :func:`parse_caption` inverts it.
    """
    for key, vocab in _ATTRIBUTE_VOCAB.items():
        if attrs.get(key) not in vocab:
            raise ValueError(f"attrs[{key!r}] must be one of {list(vocab)}, got {attrs.get(key)!r}")
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {_POSITION_PHRASES[attrs['position']]}"


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a shapes caption names, e.g. ``"a large red circle on the left"`` ->
    ``{"size": "large", "colour": "red", "shape": "circle", "position": "left"}``.

    Case, punctuation, word order and filler words ("a", "the", "on", "in", ...) do not matter; "centre" and
    "middle" mean "center", "big" "large", "little" "small". Attributes the text does not mention are absent
    from the result (``parse_caption("a red circle")`` has no size or position).

    Raises:
        ValueError: on a word outside the vocabulary (the message lists the accepted words) or on two
            different values for one attribute ("a red blue circle").
    """
    attrs: dict[str, str] = {}
    for raw in re.findall(r"[a-z]+", text.lower()):
        word = _SYNONYMS.get(raw, raw)
        if word in _FILLER_WORDS:
            continue
        key = next((k for k, vocab in _ATTRIBUTE_VOCAB.items() if word in vocab), None)
        if key is None:
            accepted = "; ".join(f"{k}: {', '.join(v)}" for k, v in _ATTRIBUTE_VOCAB.items())
            raise ValueError(
                f"unknown word {raw!r} in caption {text!r}. Accepted words are {accepted} "
                f"(also {', '.join(sorted(_SYNONYMS))} and the filler words {', '.join(sorted(_FILLER_WORDS))})"
            )
        if key in attrs and attrs[key] != word:
            raise ValueError(f"caption {text!r} names two {key}s: {attrs[key]!r} and {word!r}")
        attrs[key] = word
    return attrs


def label_for(attrs: Mapping[str, str]) -> int:
    """The class label of a shapes picture: ``SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)``,
    one of 12 (shape, colour) classes, so class-conditional models can train on the shapes data too."""
    return SHAPES.index(attrs["shape"]) * len(COLOURS) + COLOURS.index(attrs["colour"])


def _shape_label_names() -> list[str]:
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


class ShapesDataset(Dataset):
    """Generated pictures of one shape on black, each with its caption and (shape, colour) label.

    Sample ``i`` draws its attributes uniformly and independently (shape, colour, size, position, see
    :data:`SHAPES` etc.) plus a small jitter of position and size, all from ``RandomState(seed * 1_000_003 +
    first_index + i)``: the same ``(seed, first_index + i)`` always gives the same picture, and pictures are
    rendered lazily, one per ``__getitem__`` (antialiased: drawn at 4x and box-filtered down).

    Items: image float32 [3, image_size, image_size] in [-1, 1]; label = :func:`label_for` (12 classes,
    names in :attr:`label_names`); caption = :func:`caption_for` (``"a small green square at the top"``).

    Args:
        num_samples: number of pictures.
        image_size: side of the square pictures in pixels (16 or more keeps small shapes recognisable).
        seed: which family of pictures.
        first_index: global index of item 0, so disjoint datasets (train, val) can share one seed.
    """

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, first_index: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.first_index = first_index

    def __len__(self) -> int:
        return self.num_samples

    @property
    def label_names(self) -> list[str]:
        """Class names by label: ``"red circle", "green circle", ..., "yellow triangle"``."""
        return _shape_label_names()

    def _layout(self, i: int) -> tuple[dict[str, str], float, float, float]:
        """(attributes, centre x, centre y, radius) of item ``i``; lengths as fractions of the side."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        rng = np.random.RandomState((self.seed * 1_000_003 + self.first_index + i) % 2**32)
        attrs = {
            "shape": SHAPES[rng.randint(len(SHAPES))],
            "colour": COLOURS[rng.randint(len(COLOURS))],
            "size": SIZES[rng.randint(len(SIZES))],
            "position": POSITIONS[rng.randint(len(POSITIONS))],
        }
        anchor_x, anchor_y = _ANCHORS[attrs["position"]]
        cx, cy = anchor_x + rng.uniform(-_JITTER, _JITTER), anchor_y + rng.uniform(-_JITTER, _JITTER)
        radius = rng.uniform(*_RADIUS_RANGE[attrs["size"]])
        return attrs, cx, cy, radius

    def attributes(self, i: int) -> dict[str, str]:
        """The attributes of item ``i``: ``dict(shape=, colour=, size=, position=)``."""
        return self._layout(i)[0]

    def render(self, i: int) -> Image.Image:
        """Item ``i`` as an RGB PIL image."""
        attrs, cx, cy, radius = self._layout(i)
        side = self.image_size * _SUPERSAMPLE
        canvas = Image.new("RGB", (side, side), BACKGROUND_RGB)
        draw = ImageDraw.Draw(canvas)
        x, y, r, fill = cx * side, cy * side, radius * side, COLOUR_RGB[attrs["colour"]]
        if attrs["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif attrs["shape"] == "square":
            h = 0.89 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:  # triangle, pointing up
            R = 1.25 * r
            corners = [(x + R * math.cos(a), y - R * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, -math.pi / 6)]
            draw.polygon(corners, fill=fill)
        return canvas.resize((self.image_size, self.image_size), Image.BOX)

    def __getitem__(self, i: int) -> ImageSample:
        attrs = self.attributes(i)
        return {"image": _pil_to_tensor(self.render(i)), "label": label_for(attrs), "caption": caption_for(attrs)}


class ShapesDataModule(_ImageDataModule):
    """Generated coloured shapes with exact captions: a text- or class-conditional diffusion toy task.

    Batches: image float32 [B, 3, image_size, image_size] in [-1, 1] (black background = -1); label = the
    (shape, colour) class, ``SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)`` (12 classes,
    :attr:`label_names`); caption like ``"a large red circle on the left"`` (:func:`parse_caption` reads it
    back). Training uses items ``0 .. num_train - 1`` of ``seed``'s pictures and validation the next
    ``num_val``, so the two never share a picture.

    Args:
        num_train: number of training pictures (rendered on the fly, nothing is stored).
        num_val: number of validation pictures.
        image_size: side of the square pictures in pixels.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 renders in the main process).
        seed: which pictures, and the order of training batches.
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 512,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        _check_loader_args(batch_size, num_workers)
        if num_train < 1 or num_val < 0:
            raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size

    @property
    def label_names(self) -> list[str]:
        """Class names by label: ``"red circle", "green circle", ..., "yellow triangle"``."""
        return _shape_label_names()

    @property
    def num_classes(self) -> int:
        return len(SHAPES) * len(COLOURS)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = ShapesDataset(self.num_train, self.image_size, self.seed)
        self.val_set = ShapesDataset(self.num_val, self.image_size, self.seed, first_index=self.num_train)


# ----------------------------------------------------------------------------------------------------------
# Image folders: your own pictures
# ----------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    visible = (p for p in paths if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sorted(p for p in visible if _is_image(p))


def _scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of ``root``: class subfolders if any holds images (searched
    recursively), else the images directly in ``root`` with label -1."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _images_under(d, recursive=True) for d in class_dirs}
    if any(per_class.values()):
        names = []
        for name, files in per_class.items():
            if files:
                names.append(name)
            else:
                warnings.warn(
                    f"class folder {str(root / name)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); skipping it",
                    stacklevel=3,
                )
        loose = _images_under(root, recursive=False)
        if loose:
            warnings.warn(
                f"{len(loose)} image(s) directly in {str(root)!r} are ignored: with class subfolders, every "
                f"image must be in one",
                stacklevel=3,
            )
        files, labels = [], []
        for label, name in enumerate(names):
            files += per_class[name]
            labels += [label] * len(per_class[name])
        return files, labels, names
    files = _images_under(root, recursive=False)
    if not files:
        raise FileNotFoundError(
            f"no images found in {str(root)!r} or its subfolders; accepted extensions are "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case)"
        )
    return files, [-1] * len(files), []


def _load_image(path: Path, image_size: int, mode: str) -> Image.Image:
    """Read an image, flatten any transparency onto black, convert to ``mode``, resize its shorter side to
    ``image_size`` (bicubic, antialiased) and centre-crop it square."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA") if opened.mode in ("RGBA", "LA", "PA", "P") else opened.convert("RGB")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (0, 0, 0))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    image = image.convert(mode)
    w, h = image.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


class ImageFolderDataset(Dataset):
    """Image files with their labels; a caption is the stripped text of ``<image stem>.txt`` beside the image,
    or ``""``. Images are loaded per item (see :class:`ImageFolderDataModule` for the transform).

    Args:
        files: image paths.
        labels: one label per file (-1 for none).
        image_size: side of the square output images in pixels.
        channels: 1 (greyscale, PIL "L") or 3 ("RGB").
        random_flip: flip each image left-right with probability 1/2 (torch's global RNG).
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        image_size: int = 32,
        channels: int = 3,
        random_flip: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [Path(f) for f in files]
        self.labels = [int(label) for label in labels]
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, j: int) -> str:
        """The caption of item ``j``: its ``.txt`` file's stripped text, ``""`` if it has none."""
        text_file = self.files[j].with_suffix(".txt")
        return text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""

    def __getitem__(self, j: int) -> ImageSample:
        image = _pil_to_tensor(_load_image(self.files[j], self.image_size, self.mode))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": self.labels[j], "caption": self.caption(j)}


class ImageFolderDataModule(_ImageDataModule):
    """Your own images: ``root/<class>/*.png`` or a flat ``root/*.png``, with optional caption files.

    Layout:

    - class subfolders: every subfolder of ``root`` holding images (searched recursively) is a class; labels
      number the sorted folder names (:attr:`label_names`). Subfolders without images are skipped with a
      warning; images loose in ``root`` are ignored with a warning.
    - flat: if no subfolder holds images, the images directly in ``root`` are used, with label -1.
    - captions: ``cat.txt`` beside ``cat.png`` is that image's caption (stripped text); otherwise ``""``.

    Accepted extensions are :data:`IMAGE_EXTENSIONS`, in any case; names starting with "." are ignored.
    Each image is converted to ``channels`` (transparency flattened onto black), its shorter side resized to
    ``image_size`` (bicubic, antialiased) and centre-cropped square: batches hold float32
    [B, channels, image_size, image_size] in [-1, 1].

    Args:
        root: the image folder.
        image_size: side of the square images in pixels.
        channels: 1 for greyscale or 3 for RGB.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_fraction: share of the images held out for validation, chosen at random by ``seed``
            (at least one image when > 0; 0 for no validation set).
        seed: seeds the train/val split and the order of training batches.
        random_flip: flip training images left-right at random (off by default).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        random_flip: bool = False,
    ) -> None:
        _check_loader_args(batch_size, num_workers, val_fraction)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.random_flip = random_flip
        self._label_names: list[str] | None = None

    @property
    def label_names(self) -> list[str]:
        """Class names by label (the sorted class folders); empty for a flat folder. Scans ``root`` if
        ``setup`` has not run yet."""
        if self._label_names is None:
            self._label_names = _scan_image_folder(self.root)[2]
        return self._label_names

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files, labels, self._label_names = _scan_image_folder(self.root)
        train_ids, val_ids = _split_indices(len(files), self.val_fraction, self.seed)

        def subset(ids: list[int], flip: bool) -> ImageFolderDataset:
            return ImageFolderDataset(
                [files[i] for i in ids], [labels[i] for i in ids], self.image_size, self.channels, flip
            )

        self.train_set = subset(train_ids, self.random_flip)
        self.val_set = subset(val_ids, False)
