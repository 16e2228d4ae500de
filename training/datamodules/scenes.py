"""DataModules for question answering on pictures: the generated scenes and your own image folders.

Batches (:func:`collate_qa_batch`): ``image`` float32 ``[B, 3, H, W]`` in [-1, 1], ``prompt``, ``answer`` and
``kind`` as lists of B strings; the model tokenizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..datasets.images import ImageTextFolderDataset, QASample
from ..datasets.scenes import ANSWER_KINDS, SceneQADataset
from .base import SplitDataModule, check_sample_counts, check_val_fraction, split_indices

__all__ = ["ScenesQADataModule", "ImageTextFolderDataModule", "collate_qa_batch"]


def collate_qa_batch(samples: Sequence[QASample]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "answer": [s["answer"] for s in samples],
        "kind": [s["kind"] for s in samples],
    }


class ScenesQADataModule(SplitDataModule):
    """Scenes with one question each (:class:`~moezoo.training.datasets.scenes.SceneQADataset`): training on
    the ``"train"`` split (no held-out colour-shape pair ever appears), validation on ``"val"``, and as test loaders
    ``"test"`` (same distribution) and ``"held_out"`` (every scene holds an unseen pair), in that order.

    Args:
        num_train, num_val, num_test: scenes per split (the held-out split has ``num_test`` too).
        image_size: side in pixels. kinds: question kinds asked (default: all, captions included).
        batch_size, num_workers, seed: loaders; ``seed`` also picks the family of scenes.
    """

    collate_fn = staticmethod(collate_qa_batch)

    def __init__(self, num_train: int = 20000, num_val: int = 500, num_test: int = 1000, image_size: int = 64,
                 kinds: Sequence[str] = ANSWER_KINDS, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        check_sample_counts(num_train, num_val)
        if num_test < 0:
            raise ValueError(f"num_test must be >= 0, got {num_test}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.image_size, self.kinds = image_size, tuple(kinds)

    def _split(self, split: str, count: int) -> SceneQADataset:
        return SceneQADataset(split, count, seed=self.seed, image_size=self.image_size, kinds=self.kinds)

    def make_splits(self) -> tuple[Dataset, Dataset | None]:
        return self._split("train", self.num_train), (self._split("val", self.num_val) if self.num_val else None)

    def test_dataloader(self) -> list[DataLoader]:
        """Two loaders: the ``"test"`` split, then ``"held_out"`` (unseen colour-shape pairs)."""
        return [self._loader(self._split(split, self.num_test), shuffle=False) for split in ("test", "held_out")]


class ImageTextFolderDataModule(SplitDataModule):
    """Your own images with questions (:class:`~moezoo.training.datasets.images.ImageTextFolderDataset`: a folder
    and a JSON-lines file), split at random by ``seed`` into training and ``val_fraction`` validation questions."""

    collate_fn = staticmethod(collate_qa_batch)

    def __init__(self, root: str, questions: str = "questions.jsonl", image_size: int = 64, val_fraction: float = 0.1,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        check_val_fraction(val_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root, self.questions, self.image_size, self.val_fraction = root, questions, image_size, val_fraction

    def make_splits(self) -> tuple[Dataset, Dataset | None]:
        data = ImageTextFolderDataset(self.root, self.questions, self.image_size)
        train_ids, val_ids = split_indices(len(data), self.val_fraction, self.seed)
        return Subset(data, train_ids), (Subset(data, val_ids) if val_ids else None)
