"""Video DataModules for diffusion training: generated moving shapes and your own clips, over the datasets of
:mod:`moezoo.training.datasets.video`. Every one yields the same batch (``collate_video_batch``)::

    {"video": float32 [B, F, C, H, W] in [-1, 1], "caption": list[str] ("": none)}

As the image modules, each splits off a held-out validation set deterministically by ``seed`` and
``predict_dataloader`` yields it in order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..datasets.images import COLOURS, SHAPES
from ..datasets.video import (
    MOTIONS,
    MovingShapesDataset,
    VideoFolderDataset,
    collate_video_batch,
    scan_video_folder,
)
from .base import SplitDataModule, check_sample_counts, check_val_fraction, split_items

__all__ = ["MovingShapesDataModule", "VideoFolderDataModule"]


class _VideoDataModule(SplitDataModule):
    collate_fn = staticmethod(collate_video_batch)


class MovingShapesDataModule(_VideoDataModule):
    """Generated moving-shapes clips with exact captions: a text-to-video diffusion toy task.

    Batches: video float32 [B, num_frames, 3, image_size, image_size] in [-1, 1] (black background = -1) and
    captions like ``"a red square moving left"`` (:func:`parse_video_caption` reads them back). Training uses
    clips ``0 .. num_train - 1`` of ``seed``'s clips and validation the next ``num_val``, so the two never share
    a clip.

    Args:
        num_train: number of training clips (rendered on the fly, nothing is stored).
        num_val: number of validation clips.
        image_size: side of the square frames in pixels.
        num_frames: frames per clip.
        motions: which of "left", "right", "up", "down", "grow", "shrink", "recolour" occur.
        shapes: which of "circle", "square", "triangle" occur.
        colours: which of "red", "green", "blue", "yellow" occur.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (0 renders in the main process).
        seed: which clips, and the order of training batches.
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 256,
        image_size: int = 32,
        num_frames: int = 8,
        motions: list[str] | None = None,
        shapes: list[str] | None = None,
        colours: list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_sample_counts(num_train, num_val)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_train, self.num_val = num_train, num_val
        self.dataset_args = dict(image_size=image_size, num_frames=num_frames, motions=motions or MOTIONS,
                                 shapes=shapes or SHAPES, colours=colours or COLOURS, seed=seed)
        MovingShapesDataset(0, **self.dataset_args)  # check the arguments now, not at setup

    def make_splits(self) -> tuple[MovingShapesDataset, MovingShapesDataset]:
        return (MovingShapesDataset(self.num_train, **self.dataset_args),
                MovingShapesDataset(self.num_val, **self.dataset_args, first_index=self.num_train))


class VideoFolderDataModule(_VideoDataModule):
    """Your own clips: every video under ``root`` (recursively; names starting with "." are ignored), with
    optional caption files.

    Accepted extensions are :data:`VIDEO_EXTENSIONS` in any case (decoded by PyAV/FFmpeg). Each clip gives its
    first ``num_frames`` frames (every ``frame_stride``-th; short clips repeat their last frame), each resized
    on its shorter side to ``image_size`` and centre-cropped: batches hold float32
    [B, num_frames, 3, image_size, image_size] in [-1, 1]. ``clip.txt`` beside ``clip.mp4`` is its caption.

    Args:
        root: the video folder.
        image_size: side of the square frames in pixels.
        num_frames: frames per clip.
        frame_stride: keep every this-many-th frame (2 halves the frame rate).
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        val_fraction: share of the clips held out for validation, chosen at random by ``seed`` (at least one
            clip when > 0; 0 for no validation set).
        seed: seeds the train/val split and the order of training batches.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        num_frames: int = 8,
        frame_stride: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        check_val_fraction(val_fraction)
        if image_size < 1 or num_frames < 1 or frame_stride < 1:
            raise ValueError(f"image_size, num_frames and frame_stride must be >= 1, got {image_size}, "
                             f"{num_frames}, {frame_stride}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size, self.num_frames, self.frame_stride = image_size, num_frames, frame_stride
        self.val_fraction = val_fraction

    def make_splits(self) -> tuple[VideoFolderDataset, VideoFolderDataset]:
        files = scan_video_folder(self.root)
        if len(files) == 1 and self.val_fraction > 0:
            warnings.warn(f"{self.root} holds one video: it is used for training and there is no validation set",
                          stacklevel=3)
            train_files, val_files = files, []
        else:
            train_files, val_files = split_items(files, self.val_fraction, self.seed)

        def subset(part: list[Path]) -> VideoFolderDataset:
            return VideoFolderDataset(part, self.image_size, self.num_frames, self.frame_stride)

        return subset(train_files), subset(val_files)
