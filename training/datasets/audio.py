"""Audio data for the audio family, as plain torch/numpy datasets (no Lightning): spoken words from eSpeak NG,
synthesised musical notes and chords, and folders of your own sound files. The DataModules that wrap them are
in :mod:`moezoo.training.datamodules.audio`. Every clip is mono at the project's settings
(:mod:`moezoo.encoders.audio`: 16 kHz, :data:`CLIP_SAMPLES` = 16 384 samples = 1.024 s).

Every item is a dict (:class:`AudioSample`), and :func:`collate_audio_batch` stacks items into the one batch
format every audio loader yields::

    {"audio": float32 [B, CLIP_SAMPLES] in [-1, 1], "caption": list[str], "domain": list[str],
     "label": int64 [B]}

``domain`` is ``"speech"`` or ``"music"`` (:data:`DOMAINS`; ``""`` for a folder of unknown domain);
``label`` is the word's index in :data:`WORDS` for speech, the sound's index in :func:`music_sounds` for music
(the note or chord, whatever the timbre), -1 for folders.

Speech (:class:`SpeechDataset` over :func:`speech_items`): eSpeak NG (the ``espeakng-loader`` wheel's
libespeak-ng and espeak-ng-data, driven through ctypes: :func:`espeak_synthesize`) saying one of the 20
:data:`WORDS`. A speaker is an English voice of espeak-ng-data (:data:`ESPEAK_VOICES`, 8 accents) with a
voice variant (:data:`ESPEAK_VARIANTS`, 12: male m1-m7, female f1-f5); each clip also has a rate (words per
minute) and a pitch (espeak's 0-100 scale, drawn per clip by seed). The 96 speakers and the rates are split
so that a judge can be trained and tested on voices and rates the generator never heard
(:func:`speech_speakers`, :data:`SPEECH_RATES`):

=============  ============================================================  ===============  ============
split          speakers (accent ``i``, variant ``j`` of the two lists)       rates (wpm)      clips
=============  ============================================================  ===============  ============
``generator``  ``(i + j) % 4 != 0``: 72 speakers                             150, 185         72x2x20=2880
``judge``      ``(i + j) % 4 == 0``: 24 speakers (every accent, every        130, 165, 200    24x3x20=1440
               variant, never in the same combination as a generator one)
=============  ============================================================  ===============  ============

Captions are ``"the word seven"``. Each word is trimmed of eSpeak's silence, starts 50 ms into the clip and
is peak-normalised to :data:`PEAK_LEVEL`.

Music (:class:`MusicDataset`): single notes MIDI 48-71 (C3-B4) and major/minor triads on C4, D4, E4, F4, G4,
A4 (:func:`music_sounds`: 24 notes + 12 chords) in four :data:`TIMBRES`: band-limited sine, square and
sawtooth waves (additive synthesis up to the Nyquist frequency, so no aliasing moves the pitch) and a plucked
string (Karplus-Strong, tuned to the exact period with a first-order all-pass fractional delay). Each
rendition draws its attack, decay, sustain, release, start phase and level from a seed. Captions:
``"a plucked C4 note"``, ``"a sine A#3 note"``, ``"a C major chord on a square wave"``,
``"a D minor chord on a plucked string"``.

:func:`parse_audio_caption` reads any of these captions back (what the benchmark checks a generation against),
:func:`caption_words` splits a caption into the words of :func:`caption_vocabulary` (every word of every
canonical caption).

Folders (:class:`AudioFolderDataset` over :func:`scan_audio_folder`): your own ``.wav``/``.flac``/``.ogg``
files, read with soundfile, mixed down to mono, resampled to 16 kHz and cropped or zero-padded to the clip
length; ``clip.txt`` beside ``clip.wav`` is its caption.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypedDict

import numpy as np
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from moezoo.encoders.audio import CLIP_SAMPLES, SAMPLE_RATE

from .images import sidecar_caption, visible_files

__all__ = [
    "AudioSample",
    "AudioBatch",
    "collate_audio_batch",
    "DOMAINS",
    "PEAK_LEVEL",
    "LEAD_IN_SAMPLES",
    "WORDS",
    "ESPEAK_VOICES",
    "ESPEAK_VARIANTS",
    "SPEECH_SPLITS",
    "SoundQADataset",
    "SOUND_QUESTIONS",
    "DESCRIBE_SOUND",
    "SPEECH_RATES",
    "PITCH_RANGE",
    "espeak_unavailable_reason",
    "espeak_synthesize",
    "speak",
    "Speaker",
    "SpeechItem",
    "speech_speakers",
    "speech_items",
    "SpeechDataset",
    "TIMBRES",
    "NOTE_RANGE",
    "CHORD_ROOTS",
    "CHORD_QUALITIES",
    "MusicSound",
    "midi_to_hz",
    "note_name",
    "note_midi",
    "music_sounds",
    "render_sound",
    "MusicDataset",
    "speech_caption",
    "music_caption",
    "parse_audio_caption",
    "caption_words",
    "caption_vocabulary",
    "AUDIO_EXTENSIONS",
    "read_audio",
    "fit_length",
    "scan_audio_folder",
    "AudioFolderDataset",
]

# ----------------------------------------------------------------------------------------------------------
# The one sample / batch format
# ----------------------------------------------------------------------------------------------------------

DOMAINS: tuple[str, ...] = ("speech", "music")
#: Every generated clip is scaled so its largest sample is this (headroom below clipping).
PEAK_LEVEL = 0.8
#: Generated sounds start this far into the clip (50 ms), after silence, so onsets line up.
LEAD_IN_SAMPLES = 800


class AudioSample(TypedDict):
    """One item of every dataset here."""

    audio: torch.Tensor  # float32 [CLIP_SAMPLES], mono, 16 kHz, in [-1, 1]
    caption: str  # "" when a folder file has no caption
    domain: str  # "speech", "music", or "" (unknown)
    label: int  # speech: WORDS index; music: music_sounds() index; -1: none


class AudioBatch(TypedDict):
    """What every DataLoader here yields."""

    audio: torch.Tensor  # float32 [B, CLIP_SAMPLES]
    caption: list[str]
    domain: list[str]
    label: torch.Tensor  # int64 [B]


def collate_audio_batch(samples: Sequence[AudioSample]) -> AudioBatch:
    """Stack :class:`AudioSample` dicts into one :class:`AudioBatch` (the collate of every loader here)."""
    return {
        "audio": torch.stack([s["audio"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "domain": [s["domain"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }


def _place(audio: np.ndarray, start: int = LEAD_IN_SAMPLES) -> torch.Tensor:
    """A sound as one clip: starting at ``start``, zero-padded or cut to :data:`CLIP_SAMPLES`, peak
    :data:`PEAK_LEVEL`."""
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float64)
    length = min(len(audio), CLIP_SAMPLES - start)
    clip[start : start + length] = audio[:length]
    peak = np.abs(clip).max()
    if peak > 0:
        clip *= PEAK_LEVEL / peak
    return torch.from_numpy(clip.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# eSpeak NG through ctypes
# ----------------------------------------------------------------------------------------------------------

WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                          "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: English voices of espeak-ng-data (lang/gmw/): American, British, British RP, Scottish, Caribbean, New York,
#: Lancastrian, West Midlands.
ESPEAK_VOICES: tuple[str, ...] = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
                                  "en-gb-x-gbclan", "en-gb-x-gbcwmd")
#: Voice variants of espeak-ng-data (voices/!v/): formant, pitch-range and breathiness changes.
ESPEAK_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SPEECH_SPLITS: tuple[str, ...] = ("generator", "judge")
#: Speaking rates in words per minute, by split (eSpeak's default is 175).
SPEECH_RATES: dict[str, tuple[int, ...]] = {"generator": (150, 185), "judge": (130, 165, 200)}
#: eSpeak's base pitch (0-100, default 50): drawn uniformly from this range, both ends included, per clip.
PITCH_RANGE: tuple[int, int] = (30, 70)

# espeak_AUDIO_OUTPUT: AUDIO_OUTPUT_SYNCHRONOUS (samples go to the callback, espeak_Synth returns when done).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3  # espeak_PARAMETER
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_ESPEAK_CHARS_UTF8 = 1  # espeak_Synth flags
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _ESpeak:
    """libespeak-ng, loaded and initialised once per process. eSpeak keeps one global synthesiser, so every
    call goes through one lock; the samples of the call in progress collect in ``self._chunks``."""

    def __init__(self) -> None:
        import espeakng_loader

        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self.library
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # kept referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count, events) -> int:
        if samples and count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: continue synthesis

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        error = self.library.espeak_SetVoiceByName(voice.encode())
        if error != 0:
            raise ValueError(f"eSpeak has no voice {voice!r} (espeak_SetVoiceByName returned {error}); voices are "
                             f"a language of espeak-ng-data/lang (e.g. {ESPEAK_VOICES[0]}) with an optional "
                             f"+variant of espeak-ng-data/voices/!v (e.g. {ESPEAK_VOICES[0]}+{ESPEAK_VARIANTS[0]})")
        self.library.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
        self.library.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode()
        error = self.library.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r} (returned {error})")
        self.library.espeak_Synchronize()
        samples, self._chunks = self._chunks, []
        return np.concatenate(samples) if samples else np.zeros(0, dtype=np.int16)


_espeak_lock = threading.Lock()
_espeak: _ESpeak | None = None


def _reset_lock_after_fork() -> None:
    global _espeak_lock
    _espeak_lock = threading.Lock()  # a forked DataLoader worker must not inherit a lock another thread held


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def espeak_unavailable_reason() -> str | None:
    """Why eSpeak NG cannot be used here (None when it can): the ``espeakng-loader`` wheel is missing, or its
    library does not load or initialise."""
    try:
        _espeak_engine()
    except ImportError:
        return "the espeakng-loader package is not installed (pip install espeakng-loader)"
    except (OSError, RuntimeError) as error:
        return f"libespeak-ng from espeakng-loader does not load: {error}"
    return None


def _espeak_engine() -> _ESpeak:
    global _espeak
    if _espeak is None:
        with _espeak_lock:
            if _espeak is None:
                _espeak = _ESpeak()
    return _espeak


@functools.lru_cache(maxsize=8192)
def _cached_synthesis(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    engine = _espeak_engine()
    with _espeak_lock:
        samples = engine.synthesize(text, voice, rate, pitch)
    samples.flags.writeable = False  # shared by the cache
    return samples, engine.sample_rate


def espeak_synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """eSpeak NG saying ``text``: ``(int16 samples, sample rate)`` at eSpeak's own rate (22 050 Hz).

    ``voice`` is an espeak-ng-data voice with an optional variant (``"en-gb-x-rp+f3"``), ``rate`` in words per
    minute (80-450), ``pitch`` on eSpeak's 0-100 scale. Thread-safe (one lock around the global synthesiser);
    results are cached in memory (the last 8192 distinct calls, read-only arrays).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be in [80, 450] words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be in [0, 100], got {pitch}")
    return _cached_synthesis(text, voice, int(rate), int(pitch))


def _trim_silence(samples: np.ndarray, threshold_db: float = -40.0) -> np.ndarray:
    """``samples`` from the first to the last sample within ``threshold_db`` of the peak."""
    level = np.abs(samples.astype(np.float64))
    loud = np.nonzero(level >= level.max() * 10 ** (threshold_db / 20))[0] if level.max() > 0 else []
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples[:0]


def speak(word: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> torch.Tensor:
    """One speech clip: eSpeak saying ``word``, silence trimmed, resampled to 16 kHz (torchaudio), starting at
    :data:`LEAD_IN_SAMPLES`, peak :data:`PEAK_LEVEL`, float32 ``[CLIP_SAMPLES]``."""
    samples, rate_hz = espeak_synthesize(word, voice, rate, pitch)
    trimmed = torch.from_numpy(_trim_silence(samples).astype(np.float32) / 32768.0)
    resampled = AF.resample(trimmed, rate_hz, SAMPLE_RATE)
    if len(resampled) > CLIP_SAMPLES - LEAD_IN_SAMPLES:
        raise ValueError(f"{word!r} at {rate} wpm lasts {len(resampled) / SAMPLE_RATE:.2f} s, longer than a clip "
                         f"after its lead-in ({(CLIP_SAMPLES - LEAD_IN_SAMPLES) / SAMPLE_RATE:.2f} s): speak faster")
    return _place(resampled.double().numpy())


class Speaker(NamedTuple):
    """An eSpeak voice and variant."""

    voice: str
    variant: str

    @property
    def name(self) -> str:
        """The eSpeak voice name, ``"en-us+f3"``."""
        return f"{self.voice}+{self.variant}"


class SpeechItem(NamedTuple):
    """One speech clip: who says which word how fast at which pitch."""

    word: str
    speaker: Speaker
    rate: int
    pitch: int


def speech_speakers(split: str) -> list[Speaker]:
    """The speakers of ``split`` (:data:`SPEECH_SPLITS`): accent ``i`` of :data:`ESPEAK_VOICES` with variant
    ``j`` of :data:`ESPEAK_VARIANTS` belongs to ``"judge"`` when ``(i + j) % 4 == 0``, else to
    ``"generator"`` (a Latin-square split: every accent and every variant is in both splits, no
    accent+variant combination is)."""
    if split not in SPEECH_SPLITS:
        raise ValueError(f"unknown speech split {split!r}; accepted: {', '.join(SPEECH_SPLITS)}")
    return [Speaker(voice, variant)
            for i, voice in enumerate(ESPEAK_VOICES) for j, variant in enumerate(ESPEAK_VARIANTS)
            if ((i + j) % 4 == 0) == (split == "judge")]


def speech_items(split: str = "generator", seed: int = 0, words: Sequence[str] = WORDS) -> list[SpeechItem]:
    """Every clip of ``split``: each speaker of :func:`speech_speakers` at each rate of :data:`SPEECH_RATES`
    saying each word, with a pitch drawn uniformly from :data:`PITCH_RANGE` by ``RandomState(seed)`` (in the
    order speaker, rate, word)."""
    unknown = [w for w in words if w not in WORDS]
    if unknown or not words:
        raise ValueError(f"words must be a non-empty subset of {list(WORDS)}, got unknown {unknown}" if unknown
                         else "words is empty")
    speakers = speech_speakers(split)
    rng = np.random.RandomState(seed % 2**32)
    low, high = PITCH_RANGE
    return [SpeechItem(word, speaker, rate, int(rng.randint(low, high + 1)))
            for speaker in speakers for rate in SPEECH_RATES[split] for word in words]


class SpeechDataset(Dataset):
    """eSpeak NG speaking the words of ``items`` (see :func:`speech_items`); synthesised per item (about 2 ms;
    eSpeak's output is cached in memory, see :func:`espeak_synthesize`).

    Items: audio float32 [CLIP_SAMPLES]; caption ``"the word seven"``; domain ``"speech"``; label = the word's
    index in :data:`WORDS`.
    """

    def __init__(self, items: Sequence[SpeechItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> AudioSample:
        item = self.items[i]
        audio = speak(item.word, item.speaker.name, item.rate, item.pitch)
        return {"audio": audio, "caption": speech_caption(item.word), "domain": "speech",
                "label": WORDS.index(item.word)}


# ----------------------------------------------------------------------------------------------------------
# Music: synthesised notes and chords
# ----------------------------------------------------------------------------------------------------------

TIMBRES: tuple[str, ...] = ("sine", "square", "sawtooth", "plucked")
#: Single notes: MIDI 48 (C3, 130.8 Hz) to 71 (B4, 493.9 Hz), both included.
NOTE_RANGE: tuple[int, int] = (48, 71)
#: Triads are rooted on these notes of octave 4 (C4 = MIDI 60).
CHORD_ROOTS: tuple[str, ...] = ("C", "D", "E", "F", "G", "A")
#: Semitones above the root.
CHORD_QUALITIES: dict[str, tuple[int, ...]] = {"major": (0, 4, 7), "minor": (0, 3, 7)}
_PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# How each timbre reads in a chord caption ("a C major chord on a square wave").
_TIMBRE_NOUNS = {"sine": "sine wave", "square": "square wave", "sawtooth": "sawtooth wave",
                 "plucked": "plucked string"}
_CHORD_OCTAVE = 4


class MusicSound(NamedTuple):
    """A note (one MIDI number) or a chord (root's name and quality, three MIDI numbers)."""

    kind: str  # "note" or "chord"
    midi: tuple[int, ...]
    root: str = ""  # chords: "C", "D", ...
    quality: str = ""  # chords: "major" or "minor"


def midi_to_hz(midi: float) -> float:
    """Equal temperament, A4 = MIDI 69 = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def note_name(midi: int) -> str:
    """MIDI number -> scientific pitch name with sharps: 60 -> ``"C4"``, 70 -> ``"A#4"``."""
    return f"{_PITCH_CLASSES[midi % 12]}{midi // 12 - 1}"


def note_midi(name: str) -> int:
    """Scientific pitch name (case-insensitive, sharps only) -> MIDI number: ``"C4"`` -> 60."""
    match = re.fullmatch(r"([A-Ga-g]#?)(-?\d)", name.strip())
    if match is None or match.group(1).upper() not in _PITCH_CLASSES:
        raise ValueError(f"{name!r} is not a note name like 'C4' or 'F#3' (sharps, not flats: "
                         f"{', '.join(_PITCH_CLASSES)})")
    return _PITCH_CLASSES.index(match.group(1).upper()) + 12 * (int(match.group(2)) + 1)


@functools.lru_cache(maxsize=1)
def music_sounds() -> tuple[MusicSound, ...]:
    """The 36 sounds: the notes of :data:`NOTE_RANGE` in order, then the chords root by root (major, minor)."""
    low, high = NOTE_RANGE
    notes = [MusicSound("note", (m,)) for m in range(low, high + 1)]
    chords = []
    for root in CHORD_ROOTS:
        base = note_midi(f"{root}{_CHORD_OCTAVE}")
        chords += [MusicSound("chord", tuple(base + step for step in steps), root, quality)
                   for quality, steps in CHORD_QUALITIES.items()]
    return tuple(notes + chords)


def _additive_wave(frequency: float, timbre: str, phase: float, t: np.ndarray) -> np.ndarray:
    """A band-limited sine / square / sawtooth wave of peak about 1: its Fourier series (square: odd harmonics
    at 1/k; sawtooth: every harmonic at 1/k) up to the Nyquist frequency."""
    if timbre == "sine":
        harmonics = np.array([1])
    else:
        harmonics = np.arange(1, int((SAMPLE_RATE / 2) // frequency) + 1)
        if timbre == "square":
            harmonics = harmonics[harmonics % 2 == 1]
    angles = 2 * np.pi * frequency * harmonics[:, None] * t[None, :] + phase * harmonics[:, None]
    return (np.sin(angles) / harmonics[:, None]).sum(axis=0)


def _plucked_string(frequency: float, num_samples: int, rng: np.random.RandomState, decay: float,
                    pluck_point: float) -> np.ndarray:
    """Karplus-Strong: one period of the plucked string's shape circulating in a delay loop, through the
    two-point average (a half-sample delay, and the high-frequency damping that makes it a string) and a
    first-order all-pass whose delay supplies the fractional part of the period, so the pitch is exact. The
    loop gain ``decay`` sets how fast it fades. As one IIR filter (torchaudio's ``lfilter``), with
    A(z) = (c + z^-1) / (1 + c z^-1):

        y = x + decay * A(z) * (1 + z^-1) / 2 * z^-N * y
    """
    period = SAMPLE_RATE / frequency
    whole = int(math.floor(period - 0.5 - 0.1))  # leave the all-pass a delay in [0.1, 1.1): well behaved
    fraction = period - 0.5 - whole
    c = (1 - fraction) / (1 + fraction)  # first-order all-pass with low-frequency delay `fraction`
    # Denominator (1 + c z^-1) - decay/2 (c + z^-1)(1 + z^-1) z^-N; numerator (1 + c z^-1).
    a = np.zeros(whole + 3)
    a[0], a[1] = 1.0, c
    a[whole:whole + 3] -= decay / 2 * np.array([c, 1 + c, 1.0])
    b = np.zeros_like(a)
    b[0], b[1] = 1.0, c
    burst = np.zeros(num_samples)
    # The string's shape when released: a triangle peaking at the plucking point (harmonics fall as 1/k^2, so
    # the fundamental leads), roughened by a little noise; without its mean, as the loop keeps DC for the note.
    n = int(round(period))
    position = np.arange(n) / n
    shape = np.minimum(position / pluck_point, (1 - position) / (1 - pluck_point)) + rng.uniform(-0.1, 0.1, n)
    burst[:n] = shape - shape.mean()
    out = AF.lfilter(torch.from_numpy(burst), torch.from_numpy(a), torch.from_numpy(b), clamp=False)
    return out.numpy()


def _envelope(num_samples: int, rng: np.random.RandomState, sustained: bool) -> np.ndarray:
    """An ADSR amplitude envelope: attack 5-30 ms, decay 50-250 ms to a sustain of 0.4-0.9 (plucked strings
    fade by themselves: sustain 1), held until 0.70-0.85 s, release 60-120 ms, then silence."""
    attack = int(rng.uniform(0.005, 0.030) * SAMPLE_RATE)
    decay = int(rng.uniform(0.050, 0.250) * SAMPLE_RATE)
    sustain = rng.uniform(0.4, 0.9) if sustained else 1.0
    release_start = int(rng.uniform(0.70, 0.85) * SAMPLE_RATE)
    release = int(rng.uniform(0.060, 0.120) * SAMPLE_RATE)
    envelope = np.full(num_samples, sustain)
    envelope[:attack] = np.linspace(0, 1, attack, endpoint=False)
    envelope[attack : attack + decay] = np.linspace(1, sustain, decay, endpoint=False)
    envelope[release_start : release_start + release] = np.linspace(sustain, 0, release, endpoint=False)
    envelope[release_start + release :] = 0.0
    return envelope


def render_sound(sound: MusicSound, timbre: str, rng: np.random.RandomState) -> torch.Tensor:
    """``sound`` played in ``timbre``, one clip (float32 ``[CLIP_SAMPLES]``, starting at
    :data:`LEAD_IN_SAMPLES`, peak :data:`PEAK_LEVEL`); envelope and phases drawn from ``rng``."""
    if timbre not in TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; accepted: {', '.join(TIMBRES)}")
    length = CLIP_SAMPLES - LEAD_IN_SAMPLES
    t = np.arange(length) / SAMPLE_RATE
    if timbre == "plucked":
        decay, pluck_point = rng.uniform(0.990, 0.997), rng.uniform(0.15, 0.45)
        tone = sum(_plucked_string(midi_to_hz(m), length, rng, decay, pluck_point) for m in sound.midi)
    else:
        tone = sum(_additive_wave(midi_to_hz(m), timbre, rng.uniform(0, 2 * np.pi), t) for m in sound.midi)
    return _place(tone * _envelope(length, rng, sustained=timbre != "plucked"))


class MusicDataset(Dataset):
    """Every sound of :func:`music_sounds` in every timbre, ``renditions`` times each: item ``i`` is rendition
    ``i // (sounds x timbres)`` of combination ``i % (sounds x timbres)`` (sounds outer, timbres inner), its
    envelope and phases drawn from ``RandomState(seed * 1_000_003 + first_rendition * combinations + i)``.
    Rendered per item (a few ms); the same ``(seed, rendition, sound, timbre)`` is always the same clip.

    Items: audio float32 [CLIP_SAMPLES]; caption ``"a plucked C4 note"`` / ``"a C major chord on a square
    wave"``; domain ``"music"``; label = the sound's index in :func:`music_sounds`.

    Args:
        renditions: how many renditions of each (sound, timbre).
        seed: which renditions.
        first_rendition: global index of rendition 0, so disjoint datasets (train, val) can share one seed.
        timbres: a subset of :data:`TIMBRES`.
        kinds: ``("note", "chord")`` or one of them.
    """

    def __init__(self, renditions: int = 16, seed: int = 0, first_rendition: int = 0,
                 timbres: Sequence[str] = TIMBRES, kinds: Sequence[str] = ("note", "chord")) -> None:
        if renditions < 0:
            raise ValueError(f"renditions must be >= 0, got {renditions}")
        bad = [t for t in timbres if t not in TIMBRES] + [k for k in kinds if k not in ("note", "chord")]
        if bad or not timbres or not kinds:
            raise ValueError(f"timbres must be a non-empty subset of {list(TIMBRES)} and kinds of ['note', "
                             f"'chord'], got {list(timbres)} and {list(kinds)}")
        self.renditions, self.seed, self.first_rendition = renditions, seed, first_rendition
        self.timbres = tuple(timbres)
        self.sound_ids = [i for i, s in enumerate(music_sounds()) if s.kind in kinds]
        self.combinations = len(self.sound_ids) * len(self.timbres)

    def __len__(self) -> int:
        return self.renditions * self.combinations

    def describe(self, i: int) -> tuple[int, str]:
        """(sound index in :func:`music_sounds`, timbre) of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        combination = i % self.combinations
        return self.sound_ids[combination // len(self.timbres)], self.timbres[combination % len(self.timbres)]

    def __getitem__(self, i: int) -> AudioSample:
        sound_id, timbre = self.describe(i)
        sound = music_sounds()[sound_id]
        global_index = self.first_rendition * self.combinations + i
        rng = np.random.RandomState((self.seed * 1_000_003 + global_index) % 2**32)
        return {"audio": render_sound(sound, timbre, rng), "caption": music_caption(sound, timbre),
                "domain": "music", "label": sound_id}


# ----------------------------------------------------------------------------------------------------------
# Captions: written and read back
# ----------------------------------------------------------------------------------------------------------


def speech_caption(word: str) -> str:
    """``"the word seven"``."""
    if word not in WORDS:
        raise ValueError(f"unknown word {word!r}; accepted: {', '.join(WORDS)}")
    return f"the word {word}"


def music_caption(sound: MusicSound, timbre: str) -> str:
    """``"a plucked C4 note"`` for a note, ``"a C major chord on a square wave"`` for a chord."""
    if timbre not in TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; accepted: {', '.join(TIMBRES)}")
    if sound.kind == "note":
        return f"a {timbre} {note_name(sound.midi[0])} note"
    return f"a {sound.root} {sound.quality} chord on a {_TIMBRE_NOUNS[timbre]}"


_SPEECH_PATTERN = re.compile(r"(?:the )?word (?P<word>[a-z]+)")
_NOTE_PATTERN = re.compile(r"(?:an? )?(?P<timbre>[a-z]+) (?P<pitch>[a-g]#?\d) note")
_CHORD_PATTERN = re.compile(r"(?:an? )?(?P<root>[a-g]#?) (?P<quality>[a-z]+) chord on an? (?P<timbre>[a-z]+ [a-z]+)")
_ACCEPTED = ("'the word <word>', 'a <timbre> <note> note' or 'a <root> <major|minor> chord on a <sine wave|square "
             "wave|sawtooth wave|plucked string>'")


def _normalized_caption(text: str) -> str:
    """Lower case, punctuation other than '#' dropped, single spaces."""
    return " ".join(re.findall(r"[a-z0-9#]+", text.lower()))


def parse_audio_caption(text: str) -> dict:
    """What a caption asks for, as written by :func:`speech_caption` / :func:`music_caption`:

    - ``"the word seven"`` -> ``{"domain": "speech", "word": "seven"}``
    - ``"a plucked C4 note"`` -> ``{"domain": "music", "kind": "note", "timbre": "plucked", "pitch": "C4",
      "midi": [60]}``
    - ``"a C major chord on a square wave"`` -> ``{"domain": "music", "kind": "chord", "timbre": "square",
      "root": "C", "quality": "major", "midi": [60, 64, 67]}``

    Case, punctuation and spacing do not matter; "the" and "a"/"an" may be left out.

    Raises:
        ValueError: text in none of the three forms, or a word, timbre, note or chord outside the data (the
            message says what is accepted).
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a string, got {type(text).__name__}")
    normalized = _normalized_caption(text)
    if match := _SPEECH_PATTERN.fullmatch(normalized):
        return {"domain": "speech", "word": _checked(match["word"], WORDS, "word")}
    if match := _NOTE_PATTERN.fullmatch(normalized):
        timbre = _checked(match["timbre"], TIMBRES, "timbre")
        midi = note_midi(match["pitch"])
        low, high = NOTE_RANGE
        if not low <= midi <= high:
            raise ValueError(f"note {match['pitch'].upper()} in {text!r} is outside the notes of the data, "
                             f"{note_name(low)} to {note_name(high)}")
        return {"domain": "music", "kind": "note", "timbre": timbre, "pitch": note_name(midi), "midi": [midi]}
    if match := _CHORD_PATTERN.fullmatch(normalized):
        root = _checked(match["root"].upper(), CHORD_ROOTS, "chord root")
        quality = _checked(match["quality"], tuple(CHORD_QUALITIES), "chord quality")
        nouns = {noun: timbre for timbre, noun in _TIMBRE_NOUNS.items()}
        timbre = nouns[_checked(match["timbre"], tuple(nouns), "instrument")]
        base = note_midi(f"{root}{_CHORD_OCTAVE}")
        return {"domain": "music", "kind": "chord", "timbre": timbre, "root": root, "quality": quality,
                "midi": [base + step for step in CHORD_QUALITIES[quality]]}
    raise ValueError(f"cannot read the audio caption {text!r}: captions are {_ACCEPTED}")


def _checked(value: str, accepted: Sequence[str], what: str) -> str:
    if value not in accepted:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
    return value


def caption_words(text: str) -> list[str]:
    """A caption's words as :func:`caption_vocabulary` spells them: lower case, punctuation other than '#'
    dropped (``"a plucked C#4 note"`` -> ``["a", "plucked", "c#4", "note"]``)."""
    return _normalized_caption(text).split()


@functools.lru_cache(maxsize=1)
def caption_vocabulary() -> tuple[str, ...]:
    """Every word of every canonical caption (speech and music), sorted: a small closed vocabulary for a
    word-level text prompt."""
    captions = [speech_caption(w) for w in WORDS]
    captions += [music_caption(sound, timbre) for sound in music_sounds() for timbre in TIMBRES]
    return tuple(sorted({word for caption in captions for word in caption_words(caption)}))


# ----------------------------------------------------------------------------------------------------------
# Audio folders: your own sound files
# ----------------------------------------------------------------------------------------------------------

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg")


def read_audio(path: str | Path) -> torch.Tensor:
    """A sound file (anything soundfile reads: wav, flac, ogg) as float32 mono ``[N]`` at 16 kHz: channels
    averaged, resampled with torchaudio."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"cannot read {str(path)!r} as audio ({', '.join(AUDIO_EXTENSIONS)} files): {error}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{str(path)!r} holds no samples")
    mono = torch.from_numpy(data).mean(dim=1)
    return AF.resample(mono, int(rate), SAMPLE_RATE) if rate != SAMPLE_RATE else mono


def fit_length(audio: torch.Tensor, length: int = CLIP_SAMPLES, offset: int = 0) -> torch.Tensor:
    """``audio[offset : offset + length]``, zero-padded at the end to ``length``."""
    piece = audio[offset : offset + length]
    return torch.nn.functional.pad(piece, (0, length - len(piece)))


def scan_audio_folder(root: str | Path) -> list[Path]:
    """The sound files of ``root`` and its subfolders (:data:`AUDIO_EXTENSIONS`, any case; hidden names
    skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {str(root)!r} does not exist or is not a directory")
    files = visible_files(root, AUDIO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no sound files found in {str(root)!r} or its subfolders; accepted extensions are "
                                f"{', '.join(AUDIO_EXTENSIONS)} (any case)")
    return files


class AudioFolderDataset(Dataset):
    """Sound files as clips: read per item (:func:`read_audio`), then cut or zero-padded to ``clip_samples``:
    from the start, or (``random_crop``) from a random offset when the file is longer (torch's global RNG).
    Caption: the stripped text of ``<stem>.txt`` beside the file, or ``""``; label -1.

    Args:
        files: sound file paths.
        domain: ``"speech"``, ``"music"`` or ``""`` (unknown), the same for every file.
        clip_samples: clip length in samples at 16 kHz.
        random_crop: take a random window of longer files instead of their start.
    """

    def __init__(self, files: Sequence[str | Path], domain: str = "", clip_samples: int = CLIP_SAMPLES,
                 random_crop: bool = False) -> None:
        if domain not in (*DOMAINS, ""):
            raise ValueError(f"domain must be one of {list(DOMAINS)} or '' (unknown), got {domain!r}")
        if clip_samples < 1:
            raise ValueError(f"clip_samples must be >= 1, got {clip_samples}")
        self.files = [Path(f) for f in files]
        self.domain, self.clip_samples, self.random_crop = domain, clip_samples, random_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> AudioSample:
        audio = read_audio(self.files[i])
        spare = len(audio) - self.clip_samples
        offset = int(torch.randint(spare + 1, ())) if self.random_crop and spare > 0 else 0
        return {"audio": fit_length(audio, self.clip_samples, offset), "caption": sidecar_caption(self.files[i]),
                "domain": self.domain, "label": -1}


# ----------------------------------------------------------------------------------------------------------
# Questions about sounds (the multimodal LM's third modality)
# ----------------------------------------------------------------------------------------------------------

SOUND_QUESTIONS = {"speech": ("word", "which word is this?"), "music": ("note", "which note is this?")}
DESCRIBE_SOUND = "describe the sound."


class SoundQADataset(Dataset):
    """Spoken words and single notes as questions: item ``i`` of ``clips`` (a :class:`SpeechDataset` or a
    :class:`MusicDataset` of notes) with "which word is this?" -> ``"seven"`` or "which note is this?" ->
    ``"c#4"`` (kinds ``"word"`` / ``"note"``); with ``describe``, "describe the sound." -> its caption in lower
    case (``"a square c#4 note"``, kind ``"sound caption"``). Items: ``audio``, ``prompt``, ``answer``, ``kind``
    and ``caption`` (the caption, for text-only training)."""

    def __init__(self, clips: Dataset, describe: bool = False) -> None:
        if isinstance(clips, MusicDataset) and any(music_sounds()[i].kind != "note" for i in clips.sound_ids):
            raise ValueError("sound questions ask for single notes: build the MusicDataset with kinds=('note',)")
        self.clips, self.describe = clips, describe

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        caption = clip["caption"].lower()
        if clip["domain"] not in SOUND_QUESTIONS:
            raise ValueError(f"clip {i} has domain {clip['domain']!r}; sound questions know {list(SOUND_QUESTIONS)}")
        kind, prompt = SOUND_QUESTIONS[clip["domain"]]
        answer = WORDS[clip["label"]] if kind == "word" else note_name(music_sounds()[clip["label"]].midi[0]).lower()
        if self.describe:
            kind, prompt, answer = "sound caption", DESCRIBE_SOUND, caption
        return {"audio": clip["audio"], "prompt": prompt, "answer": answer, "kind": kind, "caption": caption}
