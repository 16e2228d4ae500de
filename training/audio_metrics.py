"""What a generated sound is judged by (numpy/torch, no Lightning): the pitch of a note, the pitch classes of a
chord, which frames are silence, the word judge's network, and the experts a generated clip's tokens used.
``bench/audio_quality.py`` applies them to real clips first (the ceilings) and then to generated ones.

Pitch (:func:`median_f0`): YIN (de Cheveigné & Kawahara 2002) on frames of :data:`PITCH_FRAME` samples every
:data:`PITCH_HOP`: the difference function ``d(tau) = sum_{j < W} (x_j - x_{j+tau})^2`` over the first
``W = PITCH_FRAME - tau_max`` samples, its cumulative-mean normalisation ``d'(tau) = d(tau) tau / sum_{k<=tau}
d(k)``, the first lag in ``[fs / PITCH_FMAX_HZ, fs / PITCH_FMIN_HZ)`` with ``d' <`` :data:`YIN_THRESHOLD` (else
the smallest ``d'``), walked down to its local minimum and refined by a parabola through ``d`` there and at its
neighbours. A frame counts when its RMS is within :data:`SOUNDING_DB` of the clip's loudest frame and its ``d'`` at the
chosen lag is below :data:`VOICED_APERIODICITY` (periodic); the clip's F0 is the median over those frames
(NaN when there is none: a silent or noisy clip has no pitch). torchaudio's ``detect_pitch_frequency`` was
measured first on 192 rendered notes (MIDI 48-71, four timbres): only 46-88% within +-50 cents per timbre
(octave errors, and a 7.8-cent lag quantisation); this YIN reads 100%, the largest error 2.7 cents.

Chords (:func:`pitch_class_energy`, :func:`heard_pitch_classes`): the power ``|X|^2`` of an STFT
(:data:`CHROMA_N_FFT` Hann window, 3.9 Hz bins, hop :data:`CHROMA_HOP`) summed over the whole clip and over the
bins between :data:`CHROMA_FMIN_HZ` and :data:`CHROMA_FMAX_HZ`, each bin to the pitch class of its nearest
equal-tempered note (A4 = 440 Hz), divided by the strongest class. A class is heard when its energy is at least
:data:`CHROMA_THRESHOLD` of the strongest: on 96 rendered triads the weakest chord note is at 0.36 of the
strongest (plucked strings, whose higher notes fade faster) and the strongest other class at 0.15 (harmonics),
so 0.25 (-6 dB) sits between them. :func:`pitch_class_f1` compares the heard set with the prompted triad's.

Silence (:func:`frame_energy_db`, :func:`silent_frames`): frame ``t`` of a clip is the Hann window of
``N_FFT`` samples centred on sample ``t * HOP_LENGTH`` (zeros outside the clip), the window of the mel frame
that token ``t`` encodes; its energy is the window-weighted mean power ``sum (w x)^2 / sum w^2`` in dB of full
scale. A frame is silent when it is more than :data:`SILENCE_BELOW_PEAK_DB` below the clip's loudest frame or
below :data:`SILENCE_FLOOR_DB` (so a clip that is all near-silence is silent throughout).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.encoders.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, AudioFrontEnd

__all__ = [
    "PITCH_FRAME",
    "PITCH_HOP",
    "PITCH_FMIN_HZ",
    "PITCH_FMAX_HZ",
    "YIN_THRESHOLD",
    "VOICED_APERIODICITY",
    "SOUNDING_DB",
    "CENTS_TOLERANCE",
    "CHROMA_N_FFT",
    "CHROMA_HOP",
    "CHROMA_FMIN_HZ",
    "CHROMA_FMAX_HZ",
    "CHROMA_THRESHOLD",
    "SILENCE_BELOW_PEAK_DB",
    "SILENCE_FLOOR_DB",
    "yin_track",
    "median_f0",
    "cents_error",
    "pitch_class_energy",
    "heard_pitch_classes",
    "pitch_class_f1",
    "frame_energy_db",
    "silent_frames",
    "WordJudge",
    "teacher_forced_routing",
]

#: YIN frames: 64 ms every 16 ms; the integration window ``PITCH_FRAME - fs / PITCH_FMIN_HZ`` = 704 samples
#: holds two periods of the lowest pitch searched.
PITCH_FRAME = 1024
PITCH_HOP = 256
#: The pitches searched: well around the data's notes (131-494 Hz) so a wrong octave is read, not clipped.
PITCH_FMIN_HZ = 50.0
PITCH_FMAX_HZ = 2000.0
#: YIN's absolute threshold on d' (the paper's 0.1-0.15) and the d' above which a frame is not periodic.
YIN_THRESHOLD = 0.15
VOICED_APERIODICITY = 0.3
#: Frames more than this far below the loudest frame's RMS carry no pitch estimate (fades, silence).
SOUNDING_DB = 30.0
#: A note is right when its median F0 is within this many cents of the prompted one (a quarter tone).
CENTS_TOLERANCE = 50.0
CHROMA_N_FFT = 4096
CHROMA_HOP = 512
CHROMA_FMIN_HZ = 100.0
CHROMA_FMAX_HZ = 4000.0
CHROMA_THRESHOLD = 0.25
SILENCE_BELOW_PEAK_DB = 40.0
SILENCE_FLOOR_DB = -60.0


def _mono(audio) -> np.ndarray:
    array = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected one mono clip [samples], got shape {array.shape}")
    return array


# ----------------------------------------------------------------------------------------------------------
# Pitch
# ----------------------------------------------------------------------------------------------------------


def _difference_functions(frames_FN: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """YIN's difference ``d[F, max_lag + 1]`` of each frame and its cumulative-mean normalisation ``d'``
    (``d'(0) = 1``)."""
    num_frames, length = frames_FN.shape
    window = length - max_lag
    size = 1 << int(math.ceil(math.log2(length + window)))
    head = np.fft.rfft(frames_FN[:, :window], size)
    whole = np.fft.rfft(frames_FN, size)
    correlation = np.fft.irfft(np.conj(head) * whole, size)[:, : max_lag + 1]  # sum_{j<W} x_j x_{j+tau}
    energy = np.concatenate([np.zeros((num_frames, 1)), np.cumsum(frames_FN**2, axis=1)], axis=1)
    lags = np.arange(max_lag + 1)
    difference = energy[:, [window]] + energy[:, lags + window] - energy[:, lags] - 2 * correlation
    difference[:, 0] = 0.0
    normalised = np.ones_like(difference)
    running_mean = np.cumsum(difference[:, 1:], axis=1) / lags[1:]
    normalised[:, 1:] = difference[:, 1:] / np.maximum(running_mean, 1e-12)
    return difference, normalised


def _best_lag(difference: np.ndarray, normalised: np.ndarray, min_lag: int, max_lag: int) -> float:
    """The first dip of ``d'`` under the threshold (else its minimum), at its local minimum, refined by a
    parabola through ``d`` there and at the neighbours (on ``d``, not ``d'``, whose normalisation skews the
    parabola at short lags: 3 cents at 1 kHz)."""
    below = np.nonzero(normalised[min_lag:max_lag] < YIN_THRESHOLD)[0]
    lag = int(below[0]) + min_lag if len(below) else int(np.argmin(normalised[min_lag:max_lag])) + min_lag
    while lag + 1 < max_lag and normalised[lag + 1] < normalised[lag]:
        lag += 1
    left, centre, right = difference[lag - 1], difference[lag], difference[lag + 1]
    if not left >= centre <= right or left == right == centre:  # at an end of the range: no vertex inside
        return float(lag)
    return lag + 0.5 * (left - right) / (left - 2 * centre + right)  # the vertex, within half a sample


def yin_track(audio, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame (:data:`PITCH_FRAME` samples every :data:`PITCH_HOP`, from the clip's start): the YIN F0 in
    Hz, the aperiodicity ``d'`` at its lag, and the frame's RMS. A clip shorter than one frame is an error."""
    x = _mono(audio)
    if len(x) < PITCH_FRAME:
        raise ValueError(f"a clip of {len(x)} samples is shorter than one pitch frame ({PITCH_FRAME} samples)")
    min_lag = int(sample_rate / PITCH_FMAX_HZ)
    max_lag = int(math.ceil(sample_rate / PITCH_FMIN_HZ))
    frames_FN = np.lib.stride_tricks.sliding_window_view(x, PITCH_FRAME)[::PITCH_HOP]
    difference, normalised = _difference_functions(frames_FN, max_lag)
    lags = np.array([_best_lag(d, d_norm, min_lag, max_lag) for d, d_norm in zip(difference, normalised)])
    aperiodicity = normalised[np.arange(len(lags)), np.round(lags).astype(int)]
    return sample_rate / lags, aperiodicity, np.sqrt((frames_FN**2).mean(axis=1))


def median_f0(audio, sample_rate: int = SAMPLE_RATE) -> float:
    """The clip's fundamental in Hz: the median YIN F0 over its sounding, periodic frames; NaN if none."""
    f0, aperiodicity, rms = yin_track(audio, sample_rate)
    sounding = rms > rms.max() * 10 ** (-SOUNDING_DB / 20) if rms.max() > 0 else np.zeros_like(rms, bool)
    counted = sounding & (aperiodicity < VOICED_APERIODICITY)
    return float(np.median(f0[counted])) if counted.any() else math.nan


def cents_error(f0_hz: float, target_hz: float) -> float:
    """``1200 log2(f0 / target)``: + sharp, - flat, +-1200 an octave off; NaN for a NaN F0."""
    if not target_hz > 0:
        raise ValueError(f"the target pitch must be a positive frequency in Hz, got {target_hz}")
    return 1200.0 * math.log2(f0_hz / target_hz) if f0_hz > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------
# Chords
# ----------------------------------------------------------------------------------------------------------


def pitch_class_energy(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip's chroma ``[12]`` (C, C#, ..., B): STFT power per pitch class over the clip, divided by the
    strongest class (all zeros for a silent clip)."""
    x = torch.from_numpy(_mono(audio))
    spectrum = torch.stft(x, CHROMA_N_FFT, CHROMA_HOP, window=torch.hann_window(CHROMA_N_FFT, dtype=torch.float64),
                          center=True, return_complex=True)
    power_per_bin = spectrum.abs().square().sum(dim=1).numpy()
    frequencies = np.arange(CHROMA_N_FFT // 2 + 1) * sample_rate / CHROMA_N_FFT
    band = (frequencies >= CHROMA_FMIN_HZ) & (frequencies <= CHROMA_FMAX_HZ)
    classes = np.round(12 * np.log2(frequencies[band] / 440.0) + 69).astype(int) % 12
    chroma = np.bincount(classes, weights=power_per_bin[band], minlength=12)
    return chroma / chroma.max() if chroma.max() > 0 else chroma


def heard_pitch_classes(audio, sample_rate: int = SAMPLE_RATE, threshold: float = CHROMA_THRESHOLD) -> frozenset[int]:
    """The pitch classes (0 = C ... 11 = B) whose chroma is at least ``threshold`` of the strongest."""
    chroma = pitch_class_energy(audio, sample_rate)
    return frozenset(int(c) for c in np.nonzero((chroma >= threshold) & (chroma > 0))[0])


def pitch_class_f1(heard: Iterable[int], target: Iterable[int]) -> float:
    """F1 of a heard set of pitch classes against the target set: ``2 |heard & target| / (|heard| + |target|)``
    (0 when nothing is heard)."""
    heard, target = {int(c) % 12 for c in heard}, {int(c) % 12 for c in target}
    if not target:
        raise ValueError("the target chord has no pitch class")
    return 2 * len(heard & target) / (len(heard) + len(target))


# ----------------------------------------------------------------------------------------------------------
# Silence
# ----------------------------------------------------------------------------------------------------------


def frame_energy_db(audio) -> np.ndarray:
    """Energy in dB of full scale of every mel frame of the clip (``1 + samples // HOP_LENGTH`` frames): the
    Hann-weighted mean power of the ``N_FFT`` samples centred on the frame, zeros beyond the clip."""
    x = torch.from_numpy(_mono(audio))
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    frames = F.pad(x, (N_FFT // 2, N_FFT // 2)).unfold(0, N_FFT, HOP_LENGTH)
    power = (frames * window).square().sum(dim=1) / window.square().sum()
    return 10 * np.log10(np.maximum(power.numpy(), 1e-12))


def silent_frames(audio) -> np.ndarray:
    """bool per mel frame: more than :data:`SILENCE_BELOW_PEAK_DB` under the loudest frame, or under
    :data:`SILENCE_FLOOR_DB`."""
    energy = frame_energy_db(audio)
    return energy < max(energy.max() - SILENCE_BELOW_PEAK_DB, SILENCE_FLOOR_DB)


# ----------------------------------------------------------------------------------------------------------
# The word judge
# ----------------------------------------------------------------------------------------------------------


class WordJudge(nn.Module):
    """Which word a clip says: the project's log-mel front end, four 3x3 conv blocks (conv, batch norm, ReLU;
    max-pooling 2x2 after the first three) and a linear layer over the mean and the max of the last feature
    map over frequency and time, so it reads clips of any length.

    Args:
        num_words: classes (the 20 words of the speech data).
        width: channels of the first block (doubled twice).
    """

    def __init__(self, num_words: int = 20, width: int = 32) -> None:
        super().__init__()
        if num_words < 2 or width < 1:
            raise ValueError(f"need num_words >= 2 and width >= 1, got {num_words} and {width}")
        self.front_end = AudioFrontEnd()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 4 * width), nn.MaxPool2d(2), *block(4 * width, 4 * width))
        self.head = nn.Linear(8 * width, num_words)

    def classify_mel(self, mel_BMT: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel ``[B, N_MELS, T]`` (T >= 8) -> word logits ``[B, num_words]``."""
        if mel_BMT.ndim != 3 or mel_BMT.shape[1] != N_MELS or mel_BMT.shape[2] < 8:
            raise ValueError(f"mel must be [B, {N_MELS}, T >= 8], got shape {tuple(mel_BMT.shape)}")
        h = self.features(mel_BMT[:, None])
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio ``[N]`` or ``[B, N]`` at 16 kHz -> word logits ``[B, num_words]``."""
        return self.classify_mel(self.front_end(audio))


# ----------------------------------------------------------------------------------------------------------
# Routing of a generated clip
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_routing(model, text_ids: torch.Tensor, codes_BQT: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per dynamic-capacity MoE layer of a UniMoE-Audio ``model``, what each frame of ``codes_BQT`` used when the
    model reads the prompts ``text_ids`` and the codes in one pass (the conditional branch of generation):
    ``{"experts": int [B, T] routed + null experts chosen, "null": bool [B, T] a null expert among them}``.
    Frame t is the step that predicts frame t's first code (the one after the BOS frame and frames < t), as
    the pipeline's ``experts_per_token`` counts it."""
    from moezoo.zoo.layers.dcmoe import DynamicCapacityMoE
    from moezoo.zoo.layers.routed import routed_blocks
    from moezoo.zoo.models.unimoe_audio import delay_codes

    cfg = model.config
    B, Q, T = codes_BQT.shape
    delayed_BQS = delay_codes(codes_BQT, cfg.pad_code)
    codes_in = torch.cat([delayed_BQS.new_full((B, Q, 1), cfg.bos_code), delayed_BQS[:, :, :-1]], dim=2)
    model(text_ids, codes_in)
    layers = []
    start = text_ids.shape[1]
    for _, block in routed_blocks(model):
        if not isinstance(block, DynamicCapacityMoE):
            continue
        ids_BSK = block.routing.ids_TK.reshape(B, -1, block.routing.ids_TK.shape[-1])[:, start:start + T]
        chosen = (ids_BSK >= 0) & (ids_BSK < block.num_dynamic)
        layers.append({"experts": chosen.sum(-1), "null": (chosen & (ids_BSK >= block.num_experts)).any(-1)})
    return layers
