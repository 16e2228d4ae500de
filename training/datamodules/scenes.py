"""DataModules for question answering on pictures: the generated scenes and your own image folders.

Batches (:func:`collate_qa_batch`): ``image`` float32 ``[B, 3, H, W]`` in [-1, 1], ``prompt``, ``answer`` and
``kind`` as lists of B strings; the model tokenizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..datasets.audio import TIMBRES, MusicDataset, SoundQADataset, SpeechDataset, speech_items
from ..datasets.images import ImageTextFolderDataset, QASample
from ..datasets.scenes import ANSWER_KINDS, SceneQADataset
from .base import MemoryCachedDataset, SplitDataModule, check_sample_counts, check_val_fraction, split_indices, split_items

__all__ = ["ScenesQADataModule", "ScenesSoundsQADataModule", "ImageTextFolderDataModule", "collate_qa_batch",
           "collate_sound_qa_batch"]


def collate_qa_batch(samples: Sequence[QASample]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "answer": [s["answer"] for s in samples],
        "kind": [s["kind"] for s in samples],
        "caption": [s.get("caption", "") for s in samples],
    }
    if all("centres" in s for s in samples):  # the generated scenes' object centres (encoder pretraining)
        batch["centres"] = torch.stack([s["centres"] for s in samples])
    return batch


class ScenesQADataModule(SplitDataModule):
    """Scenes with one question each (:class:`~moezoo.training.datasets.scenes.SceneQADataset`): training on
    the ``"train"`` split (no held-out colour-shape pair ever appears), validation on ``"val"``, and as test loaders
    ``"test"`` (same distribution) and ``"held_out"`` (every scene holds an unseen pair), in that order.

    Args:
        num_train, num_val, num_test: scenes per split (the held-out split has ``num_test`` too).
        image_size: side in pixels. kinds: question kinds asked (default: all, captions included).
        batch_size, num_workers, seed: loaders; ``seed`` also picks the family of scenes.
        cache: keep the scenes made in memory for the next epochs and questions (with ``num_workers=0``; each
            worker would keep its own).
        questions_per_scene: training questions asked about each training scene (validation and test: one).
        against_shortcut: training's "closest to" / "furthest from" questions name, with this probability, an
            object whose answer the majority-shape shortcut gets wrong (``ask``); validation and test stay natural.
    """

    collate_fn = staticmethod(collate_qa_batch)

    def __init__(self, num_train: int = 20000, num_val: int = 500, num_test: int = 1000, image_size: int = 64,
                 kinds: Sequence[str] = ANSWER_KINDS, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 cache: bool = False, questions_per_scene: int = 1, against_shortcut: float = 0.0) -> None:
        check_sample_counts(num_train, num_val)
        if num_test < 0:
            raise ValueError(f"num_test must be >= 0, got {num_test}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.image_size, self.kinds, self.cache = image_size, tuple(kinds), cache
        self.questions_per_scene, self.against_shortcut = questions_per_scene, against_shortcut

    def _split(self, split: str, count: int, questions_per_scene: int = 1, cache: bool = False,
               against_shortcut: float = 0.0) -> SceneQADataset:
        return SceneQADataset(split, count, seed=self.seed, image_size=self.image_size, kinds=self.kinds,
                              questions_per_scene=questions_per_scene, cache_scenes=cache,
                              against_shortcut=against_shortcut)

    def make_splits(self) -> tuple[Dataset, Dataset | None]:
        train = self._split("train", self.num_train, self.questions_per_scene, self.cache, self.against_shortcut)
        return train, (self._split("val", self.num_val, cache=self.cache) if self.num_val else None)

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


def collate_sound_qa_batch(samples: Sequence[dict]) -> dict:
    return {
        "audio": torch.stack([s["audio"] for s in samples]),
        **{key: [s[key] for s in samples] for key in ("prompt", "answer", "kind", "caption")},
    }


class ScenesSoundsQADataModule(ScenesQADataModule):
    """Questions about scenes and about sounds, for the multimodal LM: every training batch is a dict
    ``{"image": scene batch, "sound": sound batch}`` (Lightning's CombinedLoader, the shorter cycled), so each
    step sees both; validation and test give the scene loader(s) first, then the sound loader.

    Sounds (:class:`~moezoo.training.datasets.audio.SoundQADataset`): "which word is this?" on eSpeak NG's
    ``"generator"`` speakers (10% held out for validation) and "which note is this?" on notes MIDI 48-71 in four
    timbres (renditions ``0 .. note_renditions - 1``; validation the next 2), as many of each. Test: the
    ``"judge"`` speakers (voices and rates never trained on) and later note renditions, ``num_test_sounds`` of
    each.

    Args (beyond :class:`ScenesQADataModule`'s): sound_batch_size; note_renditions; num_test_sounds;
        describe_sounds: ask "describe the sound." instead (connector alignment); sounds: False leaves them out.
    """

    def __init__(self, num_train: int = 20000, num_val: int = 500, num_test: int = 1000, image_size: int = 64,
                 kinds: Sequence[str] = ANSWER_KINDS, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 cache: bool = True, sounds: bool = True, sound_batch_size: int = 8, note_renditions: int = 27,
                 num_test_sounds: int = 480, describe_sounds: bool = False, questions_per_scene: int = 1,
                 against_shortcut: float = 0.0) -> None:
        super().__init__(num_train, num_val, num_test, image_size, kinds, batch_size, num_workers, seed, cache,
                         questions_per_scene, against_shortcut)
        if sound_batch_size < 1 or note_renditions < 1 or num_test_sounds < 0:
            raise ValueError("sound_batch_size and note_renditions must be >= 1, num_test_sounds >= 0")
        self.sounds, self.sound_batch_size, self.note_renditions = sounds, sound_batch_size, note_renditions
        self.num_test_sounds, self.describe_sounds = num_test_sounds, describe_sounds
        self.sound_train = self.sound_val = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.sounds and self.sound_train is None:
            speech_train, speech_val = split_items(speech_items("generator", self.seed), 0.1, self.seed)
            notes = dict(timbres=TIMBRES, kinds=("note",))
            self.sound_train = self._sounds(SpeechDataset(speech_train), MusicDataset(self.note_renditions, self.seed, **notes))
            val = self._sounds(SpeechDataset(speech_val[:96]),
                               MusicDataset(1, self.seed, first_rendition=self.note_renditions, **notes))
            # words and notes alternate, so the first validation batches (answered greedily) have both kinds
            self.sound_val = Subset(val, [i for pair in zip(range(96), range(96, 192)) for i in pair])

    def _sounds(self, speech: Dataset, music: Dataset) -> Dataset:
        data = ConcatDataset([SoundQADataset(speech, self.describe_sounds), SoundQADataset(music, self.describe_sounds)])
        return MemoryCachedDataset(data) if self.cache else data

    def _sound_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.sound_batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=self._shuffle_generator if shuffle else None, collate_fn=collate_sound_qa_batch)

    def train_dataloader(self):
        scenes = super().train_dataloader()
        return {"image": scenes, "sound": self._sound_loader(self.sound_train, True)} if self.sounds else scenes

    def val_dataloader(self):
        scenes = super().val_dataloader()
        return [scenes, self._sound_loader(self.sound_val, False)] if self.sounds else scenes

    def test_dataloader(self) -> list[DataLoader]:
        """The scene test loaders (test, held-out pairs), then unseen speakers' words and later notes' renditions."""
        loaders = super().test_dataloader()
        if self.sounds:
            count = self.num_test_sounds
            judge = speech_items("judge", self.seed + 1)
            pick = torch.randperm(len(judge), generator=torch.Generator().manual_seed(self.seed))[:count].tolist()
            renditions = -(-count // (24 * len(TIMBRES)))
            music = MusicDataset(renditions, self.seed, first_rendition=self.note_renditions + 10, timbres=TIMBRES,
                                 kinds=("note",))
            test = ConcatDataset([SoundQADataset(SpeechDataset([judge[i] for i in sorted(pick)])),
                                  SoundQADataset(Subset(music, range(min(count, len(music)))))])
            loaders.append(self._sound_loader(test, False))
        return loaders
