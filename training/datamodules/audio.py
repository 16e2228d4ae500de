"""Audio DataModules: eSpeak words, synthesised notes and chords, both balanced, and your own sound folders, over
the datasets of :mod:`moezoo.training.datasets.audio`. Every one yields the same batch (``collate_audio_batch``)::

    {"audio": float32 [B, CLIP_SAMPLES] (16 kHz mono, 1.024 s), "caption": list[str],
     "domain": list[str] ("speech" / "music" / ""), "label": int64 [B] (word / sound index, -1: none)}

- :class:`SpeechDataModule`: eSpeak NG saying the 20 words; ``split="generator"`` (what generators train on)
  or ``"judge"`` (voices and rates the generator never hears; see the split table in
  :mod:`moezoo.training.datasets.audio`).
- :class:`MusicDataModule`: single notes and triads in four timbres.
- :class:`MixedAudioDataModule`: speech (generator split) and music with the same number of clips each: the
  tokenizer and vocoder train on it, and with ``per_domain`` set it is a small balanced seed set
  (UniMoE-Audio's stage 2).
- :class:`AudioFolderDataModule`: your own ``.wav``/``.flac``/``.ogg`` files with optional caption ``.txt``.

Held-out validation sets are chosen deterministically by ``seed``; ``predict_dataloader`` yields them in order
(their captions are the prompts to generate from). The ``__init__`` arguments are type-hinted and documented,
so ``LightningCLI`` exposes them as ``--data.<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from moezoo.encoders.audio import CLIP_SAMPLES

from ..datasets.audio import (
    TIMBRES,
    WORDS,
    AudioFolderDataset,
    MusicDataset,
    SpeechDataset,
    collate_audio_batch,
    scan_audio_folder,
    speech_items,
)
from .base import MemoryCachedDataset, SplitDataModule, check_val_fraction, split_indices, split_items

__all__ = ["SpeechDataModule", "MusicDataModule", "MixedAudioDataModule", "AudioFolderDataModule"]


class _AudioDataModule(SplitDataModule):
    collate_fn = staticmethod(collate_audio_batch)


def _speech_splits(split: str, words: Sequence[str] | None, val_fraction: float,
                   seed: int) -> tuple[SpeechDataset, SpeechDataset]:
    items = speech_items(split, seed, words or WORDS)
    train, val = split_items(items, val_fraction, seed)
    return SpeechDataset(train), SpeechDataset(val)


def _music_splits(renditions: int, val_renditions: int, seed: int, timbres: Sequence[str],
                  kinds: Sequence[str]) -> tuple[MusicDataset, MusicDataset]:
    return (MusicDataset(renditions, seed, 0, timbres, kinds),
            MusicDataset(val_renditions, seed, first_rendition=renditions, timbres=timbres, kinds=kinds))


class SpeechDataModule(_AudioDataModule):
    """eSpeak NG saying single words (``"the word seven"``), one split of speakers and rates.

    ``split_items`` holds out ``val_fraction`` of the split's clips at random by ``seed`` (same speakers and
    rates, other clips); a judge trained on ``split="judge"`` is tested on the ``"generator"`` clips.

    Args:
        split: ``"generator"`` (72 speakers x 150, 185 wpm) or ``"judge"`` (24 other speakers x 130, 165,
            200 wpm).
        words: a subset of the 20 words (default all). In YAML quote "yes", "no", "on" and "off": unquoted,
            YAML reads them as booleans.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (0 synthesises in the main process, about 2 ms a clip).
        val_fraction: share of the clips held out for validation.
        seed: the clips' pitches, the train/val split and the order of training batches.
    """

    def __init__(
        self,
        split: str = "generator",
        words: list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        check_val_fraction(val_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.split, self.words, self.val_fraction = split, words, val_fraction
        speech_items(split, seed, words or WORDS)  # bad split or words: fail here, not at setup

    @property
    def label_names(self) -> list[str]:
        return list(WORDS)

    def make_splits(self) -> tuple[SpeechDataset, SpeechDataset]:
        return _speech_splits(self.split, self.words, self.val_fraction, self.seed)


class MusicDataModule(_AudioDataModule):
    """Synthesised single notes (MIDI 48-71) and major/minor triads in sine, square, sawtooth and plucked
    timbres (``"a plucked C4 note"``, ``"a C major chord on a square wave"``). Training uses renditions
    ``0 .. renditions - 1`` of every (sound, timbre) and validation the next ``val_renditions``: the same
    sounds with other envelopes and phases.

    Args:
        renditions: training renditions of each of the 36 sounds x 4 timbres (16: 2304 clips).
        val_renditions: validation renditions of each.
        timbres: a subset of the four timbres.
        kinds: ``["note", "chord"]`` or one of them.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (0 renders in the main process, about 4 ms a clip).
        seed: which renditions, and the order of training batches.
    """

    def __init__(
        self,
        renditions: int = 16,
        val_renditions: int = 2,
        timbres: list[str] | None = None,
        kinds: list[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if renditions < 1 or val_renditions < 0:
            raise ValueError(f"need renditions >= 1 and val_renditions >= 0, got {renditions} and {val_renditions}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.renditions, self.val_renditions = renditions, val_renditions
        self.timbres, self.kinds = tuple(timbres or TIMBRES), tuple(kinds or ("note", "chord"))
        MusicDataset(0, seed, 0, self.timbres, self.kinds)  # bad timbres or kinds: fail here

    def make_splits(self) -> tuple[MusicDataset, MusicDataset]:
        return _music_splits(self.renditions, self.val_renditions, self.seed, self.timbres, self.kinds)


def _balanced(speech: Dataset, music: Dataset, per_domain: int | None, seed: int) -> ConcatDataset:
    """``per_domain`` clips of each (default: as many as the smaller has), chosen at random by ``seed``,
    speech first."""
    available = min(len(speech), len(music))
    count = available if per_domain is None else per_domain
    if count > available:
        raise ValueError(f"per_domain={per_domain} asks for more clips than a domain has ({len(speech)} speech, "
                         f"{len(music)} music)")
    generator = torch.Generator().manual_seed(seed)
    return ConcatDataset([Subset(d, sorted(torch.randperm(len(d), generator=generator)[:count].tolist()))
                          for d in (speech, music)])


class MixedAudioDataModule(_AudioDataModule):
    """Speech (the ``"generator"`` split of :class:`SpeechDataModule`) and music (:class:`MusicDataModule`)
    with as many clips of each, in training and in validation: ``per_domain`` (``val_per_domain``) chosen at
    random by ``seed``, or as many as the smaller domain has. Items carry their ``domain``.

    Args:
        per_domain: training clips per domain (None: all of the smaller domain; a few hundred: a balanced seed
            set).
        val_per_domain: validation clips per domain (None: all of the smaller domain's).
        words: a subset of the 20 words (default all; in YAML quote "yes", "no", "on", "off").
        music_renditions: training renditions of each music (sound, timbre) (18: 2592 clips, as many as the
            speech training clips).
        music_val_renditions: validation renditions of each.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the speech clips held out for validation.
        seed: pitches, splits, the balanced choice and the order of training batches.
        cache: keep every clip in memory after it is first made (:class:`MemoryCachedDataset`: the same
            clips, made once; 64 KB each).
    """

    def __init__(
        self,
        per_domain: int | None = None,
        val_per_domain: int | None = None,
        words: list[str] | None = None,
        music_renditions: int = 18,
        music_val_renditions: int = 2,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        check_val_fraction(val_fraction)
        for name, value in (("per_domain", per_domain), ("val_per_domain", val_per_domain)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (as many as the smaller domain has), got {value}")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.per_domain, self.val_per_domain = per_domain, val_per_domain
        self.words, self.val_fraction = words, val_fraction
        self.music_renditions, self.music_val_renditions = music_renditions, music_val_renditions
        self.cache = cache

    def make_splits(self) -> tuple[Dataset, Dataset]:
        speech_train, speech_val = _speech_splits("generator", self.words, self.val_fraction, self.seed)
        music_train, music_val = _music_splits(self.music_renditions, self.music_val_renditions, self.seed,
                                               TIMBRES, ("note", "chord"))
        train = _balanced(speech_train, music_train, self.per_domain, self.seed)
        val = _balanced(speech_val, music_val, self.val_per_domain, self.seed + 1)
        return (MemoryCachedDataset(train), MemoryCachedDataset(val)) if self.cache else (train, val)


class AudioFolderDataModule(_AudioDataModule):
    """Your own sound files: every ``.wav``/``.flac``/``.ogg`` under ``root`` (any case; hidden names skipped),
    read with soundfile, mixed to mono, resampled to 16 kHz, and cut or zero-padded to ``clip_samples``
    (training clips from a random offset with ``random_crop``). ``clip.txt`` beside ``clip.wav`` is its caption.

    Args:
        root: the folder.
        domain: ``"speech"``, ``"music"`` or ``""`` (unknown) for every file.
        clip_samples: clip length in samples at 16 kHz (default 1.024 s).
        random_crop: training clips from a random window of longer files (validation: from the start).
        batch_size: clips per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the files held out for validation, chosen at random by ``seed`` (0: none).
        seed: the train/val split and the order of training batches.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str = "",
        clip_samples: int = CLIP_SAMPLES,
        random_crop: bool = False,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        check_val_fraction(val_fraction)
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        AudioFolderDataset([], domain, clip_samples)  # bad domain or length: fail here
        self.root, self.domain, self.clip_samples = Path(root), domain, clip_samples
        self.random_crop, self.val_fraction = random_crop, val_fraction

    def make_splits(self) -> tuple[AudioFolderDataset, AudioFolderDataset | None]:
        files = scan_audio_folder(self.root)
        train_ids, val_ids = split_indices(len(files), self.val_fraction, self.seed)
        train = AudioFolderDataset([files[i] for i in train_ids], self.domain, self.clip_samples, self.random_crop)
        val = AudioFolderDataset([files[i] for i in val_ids], self.domain, self.clip_samples) if val_ids else None
        return train, val
