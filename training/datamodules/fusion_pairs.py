"""Infrared/visible fusion DataModules (MoE-Fusion), over the datasets of
:mod:`moezoo.training.datasets.fusion_pairs`: synthetic pairs from the bundled photographs, and registered pairs
from folders laid out as M3FD / LLVIP / TNO (``ir/`` + ``vis/``). Batches::

    {"ir": float32 [B, 1, H, W] in [0, 1], "vis": float32 [B, 1, H, W] in [0, 1] (luminance),
     "mask": float32 [B, 1, H, W] in {0, 1} (warm objects; synthetic data only), "name": list[str]}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..datasets.fusion_pairs import DEGRADATIONS, PairedFolderDataset, SyntheticFusionDataset, find_pairs
from .base import SplitDataModule, check_val_fraction, split_items

__all__ = ["SyntheticFusionDataModule", "PairedFolderDataModule"]


class SyntheticFusionDataModule(SplitDataModule):
    """Synthetic infrared/visible pairs: training pairs from the train photos, validation pairs from the
    held-out test photos (different scenes).

    Args:
        image_size: side of the square crops in pixels.
        num_train_samples: pairs per training epoch (each a different crop and rendering).
        num_val_samples: validation pairs (fixed).
        degradations: visible-image conditions to draw from ("low_light", "fog").
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the pairs and the order of training batches.
    """

    def __init__(
        self,
        image_size: int = 64,
        num_train_samples: int = 20000,
        num_val_samples: int = 64,
        degradations: Sequence[str] = DEGRADATIONS,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.image_size, self.degradations = image_size, tuple(degradations)
        self.num_train_samples, self.num_val_samples = num_train_samples, num_val_samples

    def make_splits(self) -> tuple[SyntheticFusionDataset, SyntheticFusionDataset]:
        train = SyntheticFusionDataset("train", self.num_train_samples, self.image_size, self.seed, self.degradations)
        # A different seed stream for validation, on photos training never sees.
        val = SyntheticFusionDataset("test", self.num_val_samples, self.image_size, self.seed + 10_000,
                                     self.degradations)
        return train, val


class PairedFolderDataModule(SplitDataModule):
    """Real registered pairs: ``root/ir/NAME.ext`` + ``root/vis/NAME.ext`` (M3FD, LLVIP and TNO ship in this
    layout, under their own folder names: set ``ir_dir`` / ``vis_dir``). Visible images are used as luminance.
    Training takes random ``crop`` x ``crop`` windows (same place in both) with flips; validation the centre
    window. Batches have no ``"mask"``: the intensity loss then targets ``max(V, I)`` everywhere.

    Args:
        root: the folder holding the two image folders.
        ir_dir, vis_dir: the names of the infrared and visible folders.
        crop: side of the training / validation windows in pixels.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the pairs held out for validation (seeded; 0 for none).
        seed: seeds the split and the order of training batches.
    """

    def __init__(
        self,
        root: str | Path,
        ir_dir: str = "ir",
        vis_dir: str = "vis",
        crop: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        check_val_fraction(val_fraction)
        if crop < 8:
            raise ValueError(f"crop must be >= 8 pixels, got {crop}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root, self.ir_dir, self.vis_dir, self.crop = Path(root), ir_dir, vis_dir, crop
        self.val_fraction = val_fraction

    def make_splits(self) -> tuple[PairedFolderDataset, PairedFolderDataset | None]:
        train_pairs, val_pairs = split_items(find_pairs(self.root, self.ir_dir, self.vis_dir), self.val_fraction,
                                             self.seed)
        val = PairedFolderDataset(val_pairs, self.crop, random_crop=False) if val_pairs else None
        return PairedFolderDataset(train_pairs, self.crop, random_crop=True), val
