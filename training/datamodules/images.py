"""Image DataModules for diffusion training: digits, generated shapes and your own image folders, over the
datasets of :mod:`moezoo.training.datasets.images`. Every one yields the same batch (``collate_image_batch``)::

    {"image": float32 [B, C, H, W] in [-1, 1], "label": int64 [B] (-1: no label), "caption": list[str] ("": none)}

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits, upsampled.
- :class:`ShapesDataModule`: generated pictures of one coloured shape on black with exact captions.
- :class:`ImageFolderDataModule`: your own pictures, ``root/<class>/*.png`` or a flat ``root/*.png``.

Each module splits off a small held-out validation set, deterministically by ``seed``; ``predict_dataloader``
yields that split in order (its labels and captions are the conditions to generate from). The ``__init__``
arguments are type-hinted and documented, so ``LightningCLI`` exposes them as ``--data.<name>``.
"""

from __future__ import annotations

from pathlib import Path

from ..datasets.images import (
    COLOURS,
    SHAPES,
    DigitsDataset,
    ImageFolderDataset,
    ShapesDataset,
    collate_image_batch,
    scan_image_folder,
    shape_label_names,
    sklearn_digits,
)
from .base import SplitDataModule, check_sample_counts, check_val_fraction, split_indices

__all__ = ["DigitsDataModule", "ShapesDataModule", "ImageFolderDataModule"]


class _ImageDataModule(SplitDataModule):
    collate_fn = staticmethod(collate_image_batch)


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
        check_val_fraction(val_fraction)
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

    def make_splits(self) -> tuple[DigitsDataset, DigitsDataset]:
        train_ids, val_ids = split_indices(len(sklearn_digits()[1]), self.val_fraction, self.seed)
        return (DigitsDataset(self.image_size, train_ids, augment=self.augment),
                DigitsDataset(self.image_size, val_ids, augment=False))


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
        check_sample_counts(num_train, num_val)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = image_size

    @property
    def label_names(self) -> list[str]:
        """Class names by label: ``"red circle", "green circle", ..., "yellow triangle"``."""
        return shape_label_names()

    @property
    def num_classes(self) -> int:
        return len(SHAPES) * len(COLOURS)

    def make_splits(self) -> tuple[ShapesDataset, ShapesDataset]:
        return (ShapesDataset(self.num_train, self.image_size, self.seed),
                ShapesDataset(self.num_val, self.image_size, self.seed, first_index=self.num_train))


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
        check_val_fraction(val_fraction)
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
            self._label_names = scan_image_folder(self.root)[2]
        return self._label_names

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def make_splits(self) -> tuple[ImageFolderDataset, ImageFolderDataset]:
        files, labels, self._label_names = scan_image_folder(self.root)
        train_ids, val_ids = split_indices(len(files), self.val_fraction, self.seed)

        def subset(ids: list[int], flip: bool) -> ImageFolderDataset:
            return ImageFolderDataset(
                [files[i] for i in ids], [labels[i] for i in ids], self.image_size, self.channels, flip
            )

        return subset(train_ids, self.random_flip), subset(val_ids, False)
