"""What every DataModule here shares: the loaders over a train and a validation dataset built once, argument
checks, and the seeded train/validation split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

__all__ = ["MemoryCachedDataset", "SplitDataModule", "check_loader_args", "check_sample_counts", "check_val_fraction", "split_indices",
           "split_items"]

Item = TypeVar("Item")


class MemoryCachedDataset(Dataset):
    """The items of ``dataset``, each kept in memory after its first read: for the generated datasets, which give
    the same item for the same index, it only saves the making (a 1 s clip is 64 KB, a 64 px scene 48 KB; a scene
    with its rejection sampling takes ~6 ms to make). With DataLoader workers each worker keeps its own copy."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._items: dict = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if i not in self._items:
            self._items[i] = self.dataset[i]
        return self._items[i]


def check_loader_args(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def check_sample_counts(num_train: int, num_val: int) -> None:
    """For generated data: how many training and validation samples to make."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random (train, val) split of ``range(n)``; val gets ``round(n * val_fraction)`` items, at
    least one when ``val_fraction > 0``, and train keeps at least one. Both lists are sorted."""
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{n} samples are too few to hold out val_fraction={val_fraction} and still train")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_items(items: Sequence[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """``items`` split into (train, val) by :func:`split_indices`; each part keeps the items' order."""
    train_ids, val_ids = split_indices(len(items), val_fraction, seed)
    return [items[i] for i in train_ids], [items[i] for i in val_ids]


class SplitDataModule(LightningDataModule):
    """Loaders over ``train_set`` and ``val_set``, which subclasses build in :meth:`make_splits`.

    Training batches are shuffled with a generator seeded by ``seed`` (reproducible whatever the global seed);
    validation and prediction batches come in a fixed order. A subclass without a validation set leaves
    ``val_set`` None after ``setup`` (no validation then).
    """

    #: how samples become a batch (None: torch's default collate).
    collate_fn: Callable | None = None

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        check_loader_args(batch_size, num_workers)
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits once: Lightning calls ``setup`` again for each stage (fit, validate, predict)."""
        if self.train_set is None:
            self.train_set, self.val_set = self.make_splits()

    def make_splits(self) -> tuple[Dataset, Dataset | None]:
        """The (train, validation) datasets; validation None when there is none."""
        raise NotImplementedError(f"{type(self).__name__} must define make_splits()")

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=self._shuffle_generator if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=type(self).collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is not None and self.val_set is None:
            return []  # set up without a validation set: Lightning skips validation
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split in order: its labels and captions are the conditions to sample from."""
        return self._loader(self.val_set, shuffle=False)
