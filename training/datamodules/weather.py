"""Deweathering DataModules (MoFME), over the datasets of :mod:`moezoo.training.datasets.weather`: synthetic
weather on the bundled photographs, and paired folders of real benchmarks. Both yield the same batch
(``collate_restoration_batch``)::

    {"input": float32 [B, 3, H, W] in [0, 1] (degraded), "target": float32 [B, 3, H, W] in [0, 1] (clean),
     "weather": int64 [B] (index into the module's ``weather_types``; -1: unknown)}

- :class:`SyntheticWeatherDataModule`: crops of the "train" photos with one weather kind each, validated on
  crops of the held-out "val" photos (the "test" photos are the benchmark's, never used to choose anything).
- :class:`PairedFolderDataModule`: ``root/input/*`` + ``root/gt/*`` matched by file name — the layout of
  Allweather, Outdoor-Rain and Snow100K (folder names are arguments).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader

from ..datasets.weather import (
    WEATHER_TYPES,
    PairedFolderDataset,
    SyntheticWeatherDataset,
    check_weather_types,
    collate_restoration_batch,
)
from .base import SplitDataModule, check_val_fraction, split_items

__all__ = ["SyntheticWeatherDataModule", "PairedFolderDataModule"]


class _RestorationDataModule(SplitDataModule):
    collate_fn = staticmethod(collate_restoration_batch)


class SyntheticWeatherDataModule(_RestorationDataModule):
    """Multi-weather training on the packaged photos: training crops from the "train" photos, validation crops
    from the held-out "val" photos (split by photograph; the "test" photos are left to the benchmark).

    Args:
        crop_size: side of the square training and validation crops.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        train_length: training items (each is a new random crop; make it at least steps x batch size).
        val_length: validation items (fixed crops of the held-out photos, no augmentation).
        weather_types: the kinds to train on, in turn.
        seed: seeds the training items (validation uses seed + 1).
    """

    def __init__(self, crop_size: int = 64, batch_size: int = 16, num_workers: int = 0, train_length: int = 100_000,
                 val_length: int = 128, weather_types: Sequence[str] = WEATHER_TYPES, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.crop_size, self.train_length, self.val_length = crop_size, train_length, val_length
        self.weather_types = check_weather_types(weather_types)

    def make_splits(self) -> tuple[SyntheticWeatherDataset, SyntheticWeatherDataset]:
        return (SyntheticWeatherDataset("train", self.crop_size, self.train_length, self.weather_types,
                                        seed=self.seed, augment=True),
                SyntheticWeatherDataset("val", self.crop_size, self.val_length, self.weather_types,
                                        seed=self.seed + 1, augment=False))


class PairedFolderDataModule(_RestorationDataModule):
    """A real deweathering benchmark on disk: ``train_root/{input,gt}`` and optionally ``val_root/{input,gt}``
    (without ``val_root``, ``val_fraction`` of the training pairs are held out, chosen by ``seed``).

    Training pairs are random ``crop_size`` crops with flips (numpy's global RNG, which Lightning seeds per
    worker); validation pairs are centre crops of ``val_crop_size`` (None: whole images, batch size 1).

    Args:
        train_root: folder with the training pairs.
        val_root: folder with the validation pairs (e.g. Allweather's test set).
        input_dir, target_dir: sub-folder names of degraded and clean images.
        crop_size: training crop side.
        val_crop_size: validation centre-crop side (a multiple of the model's patch size), or None.
        batch_size: pairs per training batch.
        num_workers: DataLoader worker processes.
        val_fraction: share held out when there is no ``val_root``.
        seed: the hold-out split and the shuffling.
    """

    def __init__(self, train_root: str, val_root: str | None = None, input_dir: str = "input",
                 target_dir: str = "gt", crop_size: int = 64, val_crop_size: int | None = 256, batch_size: int = 16,
                 num_workers: int = 0, val_fraction: float = 0.05, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        check_val_fraction(val_fraction)
        self.save_hyperparameters()
        self.train_root, self.val_root = train_root, val_root
        self.input_dir, self.target_dir = input_dir, target_dir
        self.crop_size, self.val_crop_size, self.val_fraction = crop_size, val_crop_size, val_fraction

    def make_splits(self) -> tuple[PairedFolderDataset, PairedFolderDataset | None]:
        def pairs(root: str, training: bool, names: list[str] | None = None) -> PairedFolderDataset:
            return PairedFolderDataset(root, self.input_dir, self.target_dir, random_crop=training, names=names,
                                       crop_size=self.crop_size if training else self.val_crop_size)

        if self.val_root is not None:
            return pairs(self.train_root, training=True), pairs(self.val_root, training=False)
        train_names, val_names = split_items(pairs(self.train_root, training=True).names, self.val_fraction, self.seed)
        val = pairs(self.train_root, training=False, names=val_names) if val_names else None
        return pairs(self.train_root, training=True, names=train_names), val

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or self.val_crop_size:
            return super().val_dataloader()
        return self._loader(self.val_set, shuffle=False, batch_size=1)  # whole images: their sizes may differ
