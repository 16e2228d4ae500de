"""Audio encoders: the project's audio settings, the log-mel front end, a mel tokenizer (residual vector
quantisation of mel frames) and two vocoders back to a waveform.

Everything audio in moezoo runs at one setting (:data:`SAMPLE_RATE` etc. below), so a token, a mel frame
and a sample mean the same in the data, the tokenizer, the vocoders, the audio LM and the pipeline:

- :class:`AudioFrontEnd`: audio at any rate -> resampled to 16 kHz -> log-mel ``[B, N_MELS, T]``,
  normalised with fixed constants (:func:`normalize_log_mel`), one frame per :data:`HOP_LENGTH` samples.
- :class:`MelTokenizer`: a small conv encoder over mel frames, a :class:`ResidualVectorQuantizer`
  (``num_codebooks`` codebooks of ``codebook_size`` codes, EMA updates, k-means init on the first batch,
  dead-code restarts) and a conv decoder: ``encode(audio or mel) -> codes [B, Q, T]``,
  ``decode(codes) -> mel [B, N_MELS, T]``; one code per codebook per mel frame (62.5 frames per second).
  UniMoE-Audio tokenizes with DAC's 12 codebooks of 1024; ours is trained here on the project's data.
- :class:`GriffinLimVocoder`: torchaudio's InverseMelScale + GriffinLim (no weights; the baseline).
- :class:`AudioEncoder` (understanding): log-mel -> convolutions -> transformer tokens, Whisper's layout.
- :class:`MelVocoder`: a small network (ConvNeXt blocks at the mel frame rate) predicts the STFT magnitude
  from the mel, as a learned correction of the least-squares one, and Griffin-Lim finds its phase. Trained
  in minutes on one CPU thread with the STFT loss of that magnitude (:func:`magnitude_losses`) + a log-mel
  L1; :func:`multi_resolution_stft_loss` measures its waveforms.

Both vocoders map a normalised log-mel ``[B, N_MELS, T]`` to ``(T - 1) * HOP_LENGTH`` samples, so a clip of
:data:`CLIP_SAMPLES` samples -> :data:`CLIP_FRAMES` frames -> the same number of samples back.

The tokenizer and the neural vocoder save to and load from one safetensors file whose metadata holds their
config (:meth:`MelTokenizer.save_pretrained`, :meth:`MelTokenizer.from_pretrained`, same for
:class:`MelVocoder`); their ``state_dict`` holds inference tensors only, so a model that bundles them as
submodules (``MelTokenizer(config)``) carries them in its own safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF
import torchaudio.transforms as AT

from moezoo.zoo.hub import atomic_path

__all__ = [
    "SAMPLE_RATE",
    "CLIP_SAMPLES",
    "CLIP_SECONDS",
    "N_FFT",
    "HOP_LENGTH",
    "N_MELS",
    "F_MIN",
    "F_MAX",
    "FRAME_RATE",
    "CLIP_FRAMES",
    "LOG_MEL_FLOOR",
    "LOG_MEL_MEAN",
    "LOG_MEL_STD",
    "MR_STFT_RESOLUTIONS",
    "num_frames",
    "num_samples",
    "normalize_log_mel",
    "denormalize_log_mel",
    "AudioFrontEnd",
    "stft_magnitude",
    "multi_resolution_stft_loss",
    "magnitude_losses",
    "spectral_convergence",
    "log_mel_l1",
    "GriffinLimVocoder",
    "nearest_codes",
    "ResidualVectorQuantizer",
    "MelTokenizerConfig",
    "MelTokenizer",
    "MelVocoderConfig",
    "MelVocoder",
    "AudioEncoder",
]

# ----------------------------------------------------------------------------------------------------------
# The project's audio settings: the one place they are defined
# ----------------------------------------------------------------------------------------------------------

#: 16 kHz mono: DAC-16k's rate (UniMoE-Audio's codec), enough for speech (formants below 5 kHz) and for the
#: notes here (fundamentals 131-740 Hz, harmonics to the 8 kHz Nyquist), and a third of 48 kHz's compute.
SAMPLE_RATE = 16_000
#: One clip is 1.024 s = 64 hops: the longest word at the slowest eSpeak rate (about 0.6 s) after a 0.05 s
#: lead-in, or one note with its release; a whole number of hops, so vocoders give back exactly the clip.
CLIP_SAMPLES = 16_384
CLIP_SECONDS = CLIP_SAMPLES / SAMPLE_RATE
#: 64 ms windows: 15.6 Hz bins resolve the harmonics of the lowest note (C3, 131 Hz).
N_FFT = 1024
#: 16 ms hops: 62.5 frames per second, 65 frames per clip; every mel frame becomes one token per codebook.
HOP_LENGTH = 256
#: 80 Slaney-scale mel bands over 0-8 kHz (Slaney area normalisation), magnitude (not power) spectrogram.
N_MELS = 80
F_MIN = 0.0
F_MAX = SAMPLE_RATE / 2
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH
CLIP_FRAMES = 1 + CLIP_SAMPLES // HOP_LENGTH
#: Log-mel = ln(max(mel magnitude, LOG_MEL_FLOOR)); the floor is -100 dB of full scale, below any sound here.
LOG_MEL_FLOOR = 1e-5
#: Fixed normalisation, (log-mel - MEAN) / STD, so tokens mean the same everywhere: the rounded mean and
#: standard deviation of the log-mel over the speech + music training data (measured once, kept fixed).
LOG_MEL_MEAN = -7.5
LOG_MEL_STD = 4.0
#: (n_fft, hop, window) of the multi-resolution STFT loss: Parallel WaveGAN's three scales, at 16 kHz.
MR_STFT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))


def num_frames(num_samples: int) -> int:
    """Mel frames of a signal of ``num_samples`` samples (centred STFT frames: one per hop, plus one)."""
    return 1 + num_samples // HOP_LENGTH


def num_samples(num_frames: int) -> int:
    """Samples a vocoder makes from ``num_frames`` mel frames: ``(num_frames - 1) * HOP_LENGTH``."""
    return (num_frames - 1) * HOP_LENGTH


def normalize_log_mel(mel_magnitude: torch.Tensor) -> torch.Tensor:
    """Mel magnitudes -> the normalised log-mel every model here reads."""
    return (mel_magnitude.clamp_min(LOG_MEL_FLOOR).log() - LOG_MEL_MEAN) / LOG_MEL_STD


def denormalize_log_mel(log_mel: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalize_log_mel` (above the floor): normalised log-mel -> mel magnitudes."""
    return (log_mel * LOG_MEL_STD + LOG_MEL_MEAN).exp()


def _batched_audio(audio: torch.Tensor) -> torch.Tensor:
    """``[N]`` or ``[B, N]`` float audio -> ``[B, N]``."""
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise TypeError(f"audio must be a floating-point tensor [N] or [B, N], got {type(audio).__name__}"
                        + (f" of {audio.dtype}" if isinstance(audio, torch.Tensor) else ""))
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be [N] or [B, N] (mono samples), got shape {tuple(audio.shape)}")
    return audio.unsqueeze(0) if audio.ndim == 1 else audio


def _batched_mel(mel: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """``[n_mels, T]`` or ``[B, n_mels, T]`` -> ``[B, n_mels, T]``."""
    if mel.ndim == 2:
        mel = mel.unsqueeze(0)
    if mel.ndim != 3 or mel.shape[1] != n_mels:
        raise ValueError(f"mel must be [{n_mels}, T] or [B, {n_mels}, T] (normalised log-mel), got shape "
                         f"{tuple(mel.shape)}")
    return mel


# ----------------------------------------------------------------------------------------------------------
# Front end: resampling and the normalised log-mel spectrogram
# ----------------------------------------------------------------------------------------------------------


class AudioFrontEnd(nn.Module):
    """Audio -> normalised log-mel ``[B, N_MELS, T]`` with ``T = 1 + N // HOP_LENGTH``.

    A centred STFT (Hann window of :data:`N_FFT`, hop :data:`HOP_LENGTH`, reflect padding), its magnitude,
    80 Slaney mel bands over 0-8 kHz (torchaudio's ``melscale_fbanks``), then :func:`normalize_log_mel`.
    Input at another rate is first resampled with torchaudio (windowed sinc). The window and filter bank are
    non-persistent buffers: they are computed, never stored in a checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        fbank = AF.melscale_fbanks(N_FFT // 2 + 1, F_MIN, F_MAX, N_MELS, SAMPLE_RATE, norm="slaney",
                                   mel_scale="slaney")
        self.register_buffer("mel_fbank", fbank, persistent=False)  # [N_FFT // 2 + 1, N_MELS]

    @staticmethod
    def resample(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``audio`` at ``sample_rate`` -> at :data:`SAMPLE_RATE` (unchanged if already there)."""
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate}")
        if sample_rate == SAMPLE_RATE:
            return audio
        return AF.resample(audio, int(sample_rate), SAMPLE_RATE)

    def mel_magnitude(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` audio at 16 kHz -> mel magnitudes ``[B, N_MELS, T]`` (before the log)."""
        if audio.shape[-1] <= N_FFT // 2:
            raise ValueError(f"audio of {audio.shape[-1]} samples is too short: the centred STFT needs more than "
                             f"{N_FFT // 2} samples ({N_FFT // 2 / SAMPLE_RATE * 1000:.0f} ms at {SAMPLE_RATE} Hz)")
        spectrum = torch.stft(audio.float(), N_FFT, HOP_LENGTH, window=self.window, center=True,
                              pad_mode="reflect", return_complex=True)
        return self.mel_of_magnitude(spectrum.abs())

    def mel_of_magnitude(self, magnitude_BFT: torch.Tensor) -> torch.Tensor:
        """STFT magnitudes ``[B, N_FFT // 2 + 1, T]`` -> mel magnitudes ``[B, N_MELS, T]``."""
        return torch.matmul(magnitude_BFT.transpose(-1, -2), self.mel_fbank).transpose(-1, -2)

    def forward(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """``audio [N] or [B, N]`` at ``sample_rate`` -> normalised log-mel ``[B, N_MELS, T]``."""
        audio = self.resample(_batched_audio(audio), sample_rate)
        return normalize_log_mel(self.mel_magnitude(audio))


# ----------------------------------------------------------------------------------------------------------
# Spectral losses and metrics
# ----------------------------------------------------------------------------------------------------------


def stft_magnitude(audio: torch.Tensor, n_fft: int, hop_length: int, win_length: int) -> torch.Tensor:
    """``[B, N]`` -> ``[B, n_fft // 2 + 1, frames]`` magnitudes of a centred Hann STFT, as
    ``sqrt(max(re^2 + im^2, 1e-7))``: the floor keeps the log and the gradient of the square root finite."""
    window = torch.hann_window(win_length, device=audio.device)
    spectrum = torch.stft(audio.float(), n_fft, hop_length, win_length, window=window, center=True,
                          return_complex=True)
    return (spectrum.real.square() + spectrum.imag.square()).clamp_min(1e-7).sqrt()


def magnitude_losses(predicted_magnitude: torch.Tensor, target_magnitude: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of an STFT loss, from magnitudes floored as :func:`stft_magnitude` floors them:
    ``(spectral convergence || |S| - |S_pred| ||_F / || |S| ||_F`` over the whole batch, log-magnitude
    ``mean | ln |S| - ln |S_pred| |)``."""
    floor = 1e-7**0.5
    predicted, target = predicted_magnitude.clamp_min(floor), target_magnitude.clamp_min(floor)
    convergence = torch.linalg.norm(target - predicted) / torch.linalg.norm(target)
    return convergence, (target.log() - predicted.log()).abs().mean()


def spectral_convergence(predicted: torch.Tensor, target: torch.Tensor, n_fft: int = N_FFT,
                         hop_length: int = HOP_LENGTH, win_length: int = N_FFT) -> torch.Tensor:
    """``|| |S_target| - |S_pred| ||_F / || |S_target| ||_F`` over the whole batch ``[B, N]`` (0 is perfect)."""
    return magnitude_losses(stft_magnitude(predicted, n_fft, hop_length, win_length),
                            stft_magnitude(target, n_fft, hop_length, win_length))[0]


def multi_resolution_stft_loss(predicted: torch.Tensor, target: torch.Tensor,
                               resolutions: Sequence[tuple[int, int, int]] = MR_STFT_RESOLUTIONS,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel WaveGAN's multi-resolution STFT loss of ``[B, N]`` waveforms: ``(spectral convergence,
    log-magnitude L1)`` of :func:`magnitude_losses`, each the mean over ``resolutions`` of
    ``(n_fft, hop, window)``."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    terms = [magnitude_losses(stft_magnitude(predicted, n_fft, hop, window), stft_magnitude(target, n_fft, hop, window))
             for n_fft, hop, window in resolutions]
    return torch.stack([t[0] for t in terms]).mean(), torch.stack([t[1] for t in terms]).mean()


def log_mel_l1(predicted_mel: torch.Tensor, target_mel: torch.Tensor) -> torch.Tensor:
    """Mean ``|ln mel_pred - ln mel_target|`` (natural-log units) of two normalised log-mels."""
    return (predicted_mel - target_mel).abs().mean() * LOG_MEL_STD


# ----------------------------------------------------------------------------------------------------------
# Griffin-Lim: the baseline vocoder (no weights)
# ----------------------------------------------------------------------------------------------------------


class GriffinLimVocoder(nn.Module):
    """Normalised log-mel ``[B, N_MELS, T]`` -> waveform ``[B, (T - 1) * HOP_LENGTH]``: undo the normalisation,
    map mel back to a linear magnitude spectrogram by least squares (torchaudio ``InverseMelScale``, negative
    values clipped), and estimate the phase with ``n_iter`` Griffin-Lim iterations (torchaudio ``GriffinLim``,
    momentum 0.99). The phase starts at zero, not random, so the output is deterministic.

    Args:
        n_iter: Griffin-Lim iterations (more: better phase, slower; 32 is torchaudio's default).
    """

    def __init__(self, n_iter: int = 64) -> None:
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.inverse_mel = AT.InverseMelScale(N_FFT // 2 + 1, N_MELS, SAMPLE_RATE, F_MIN, F_MAX, norm="slaney",
                                              mel_scale="slaney")
        self.griffin_lim = AT.GriffinLim(N_FFT, n_iter, N_FFT, HOP_LENGTH, power=1.0, rand_init=False)

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        mel = _batched_mel(mel)
        magnitude = self.inverse_mel(denormalize_log_mel(mel.float()))
        self.griffin_lim.length = num_samples(mel.shape[-1])
        return self.griffin_lim(magnitude)


# ----------------------------------------------------------------------------------------------------------
# Residual vector quantisation
# ----------------------------------------------------------------------------------------------------------


def nearest_codes(x_ND: torch.Tensor, codebook_KD: torch.Tensor) -> torch.Tensor:
    """For each row of ``x_ND``, the index of the nearest codeword (squared Euclidean distance), ``[N]``."""
    distance_NK = (x_ND.square().sum(-1, keepdim=True) - 2.0 * x_ND @ codebook_KD.T
                   + codebook_KD.square().sum(-1)[None, :])
    return distance_NK.argmin(-1)


def _kmeans_plus_plus(x_ND: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """k-means++ seeding: the first centre a random row, each next one a row drawn with probability
    proportional to its squared distance to the nearest centre so far (torch's global RNG)."""
    centres = [x_ND[int(torch.randint(x_ND.shape[0], ()))]]
    nearest_N = (x_ND - centres[0]).square().sum(-1)
    for _ in range(num_clusters - 1):
        if float(nearest_N.sum()) <= 0:  # fewer distinct rows than centres: repeat random rows
            centres.append(x_ND[int(torch.randint(x_ND.shape[0], ()))])
            continue
        centres.append(x_ND[int(torch.multinomial(nearest_N, 1))])
        nearest_N = torch.minimum(nearest_N, (x_ND - centres[-1]).square().sum(-1))
    return torch.stack(centres)


def _kmeans(x_ND: torch.Tensor, num_clusters: int, iterations: int) -> torch.Tensor:
    """``num_clusters`` k-means centres of ``x_ND`` from k-means++ seeds (a centre that loses all its points
    keeps its place)."""
    centres_KD = _kmeans_plus_plus(x_ND, num_clusters)
    for _ in range(iterations):
        ids_N = nearest_codes(x_ND, centres_KD)
        counts_K = torch.bincount(ids_N, minlength=num_clusters).to(x_ND.dtype)
        sums_KD = torch.zeros_like(centres_KD).index_add_(0, ids_N, x_ND)
        filled = counts_K > 0
        centres_KD[filled] = sums_KD[filled] / counts_K[filled, None]
    return centres_KD


class ResidualVectorQuantizer(nn.Module):
    """``num_codebooks`` codebooks of ``codebook_size`` vectors of ``dim``: stage q quantises what stages
    ``0..q-1`` left (the residual) to its nearest codeword, and the quantised vector is the sum of the chosen
    codewords of every stage.

    Training (as SoundStream / EnCodec): codebooks are not trained by gradient but follow an exponential
    moving average of the residuals assigned to each code (decay ``ema_decay``, Laplace-smoothed counts);
    before the first training step each stage is initialised by k-means on the first batch's residuals; a
    code whose EMA count falls below ``dead_code_threshold`` (expected uses per batch) is restarted at a
    random residual of the current batch. The encoder gets the straight-through gradient and a commitment
    loss ``mean (z - sg(quantised))^2``. The EMA statistics are non-persistent buffers (not inference
    weights): :meth:`training_state` / :meth:`load_training_state` carry them through a training checkpoint.
    Single-process statistics: with data parallelism each process would update its own copy.

    Args:
        num_codebooks: Q, the number of residual stages.
        codebook_size: K, codes per codebook.
        dim: D, the vector size.
        ema_decay: EMA decay per training step.
        dead_code_threshold: EMA count below which a code is restarted.
        kmeans_iterations: k-means iterations of the first-batch initialisation.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, ema_decay: float = 0.99,
                 dead_code_threshold: float = 0.5, kmeans_iterations: int = 10) -> None:
        super().__init__()
        if num_codebooks < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"need num_codebooks >= 1, codebook_size >= 2 and dim >= 1, got {num_codebooks}, "
                             f"{codebook_size}, {dim}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.num_codebooks, self.codebook_size, self.dim = num_codebooks, codebook_size, dim
        self.ema_decay, self.dead_code_threshold = ema_decay, dead_code_threshold
        self.kmeans_iterations = kmeans_iterations
        self.register_buffer("codebooks", torch.randn(num_codebooks, codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("ema_counts", torch.zeros(num_codebooks, codebook_size), persistent=False)
        self.register_buffer("ema_sums", torch.zeros(num_codebooks, codebook_size, dim), persistent=False)

    def _check_num_codebooks(self, num_codebooks: int | None) -> int:
        if num_codebooks is None:
            return self.num_codebooks
        if not 1 <= num_codebooks <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be in [1, {self.num_codebooks}], got {num_codebooks}")
        return num_codebooks

    @torch.no_grad()
    def quantize(self, x_ND: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """Codes ``[N, Q]`` of ``x_ND`` with the first ``num_codebooks`` stages (all by default); no update."""
        residual_ND = x_ND.float()
        codes = []
        for codebook_KD in self.codebooks[: self._check_num_codebooks(num_codebooks)]:
            ids_N = nearest_codes(residual_ND, codebook_KD)
            residual_ND = residual_ND - codebook_KD[ids_N]
            codes.append(ids_N)
        return torch.stack(codes, dim=-1)

    def lookup(self, codes_NQ: torch.Tensor) -> torch.Tensor:
        """The quantised vectors ``[N, D]`` of codes ``[N, q]`` (``q <= Q``): the sum of each stage's codeword."""
        if codes_NQ.ndim != 2 or not 1 <= codes_NQ.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes must be [N, q] with 1 <= q <= {self.num_codebooks}, got shape "
                             f"{tuple(codes_NQ.shape)}")
        if codes_NQ.dtype not in (torch.int64, torch.int32) or codes_NQ.min() < 0 or \
                codes_NQ.max() >= self.codebook_size:
            raise ValueError(f"codes must be integers in [0, {self.codebook_size}), got {codes_NQ.dtype} in "
                             f"[{int(codes_NQ.min())}, {int(codes_NQ.max())}]")
        stages = torch.arange(codes_NQ.shape[1], device=codes_NQ.device)
        return self.codebooks[stages[None, :], codes_NQ.long()].sum(dim=1)

    def forward(self, x_ND: torch.Tensor, active_stages_N: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``x_ND`` (and, in training mode, update the codebooks).

        Args:
            x_ND: the vectors.
            active_stages_N: per row, how many stages to use (quantiser dropout); None: all.

        Returns:
            ``(quantised_ND, codes_NQ, commitment_loss)``: quantised with the straight-through gradient to
            ``x_ND``; codes of all Q stages (stages past a row's active count are not applied to it).
        """
        if self.training and not bool(self.initialized):
            self._initialize(x_ND.detach().float())
        residual_ND = x_ND.detach().float()
        quantized_ND = torch.zeros_like(residual_ND)
        codes = []
        for q in range(self.num_codebooks):
            ids_N = nearest_codes(residual_ND, self.codebooks[q])
            active_N = None if active_stages_N is None else active_stages_N > q
            if self.training:
                self._ema_update(q, residual_ND, ids_N, active_N)
            chosen_ND = self.codebooks[q][ids_N]
            if active_N is not None:
                chosen_ND = chosen_ND * active_N[:, None]
            residual_ND = residual_ND - chosen_ND
            quantized_ND = quantized_ND + chosen_ND
            codes.append(ids_N)
        commitment_loss = F.mse_loss(x_ND.float(), quantized_ND)
        straight_through_ND = x_ND + (quantized_ND - x_ND).detach()
        return straight_through_ND, torch.stack(codes, dim=-1), commitment_loss

    @torch.no_grad()
    def _initialize(self, x_ND: torch.Tensor) -> None:
        residual_ND = x_ND
        for q in range(self.num_codebooks):
            self.codebooks[q] = _kmeans(residual_ND, self.codebook_size, self.kmeans_iterations)
            ids_N = nearest_codes(residual_ND, self.codebooks[q])
            counts_K = torch.bincount(ids_N, minlength=self.codebook_size).float()
            self.ema_counts[q] = counts_K
            self.ema_sums[q] = self.codebooks[q] * counts_K[:, None]
            residual_ND = residual_ND - self.codebooks[q][ids_N]
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, q: int, residual_ND: torch.Tensor, ids_N: torch.Tensor,
                    active_N: torch.Tensor | None) -> None:
        if active_N is not None:
            residual_ND, ids_N = residual_ND[active_N], ids_N[active_N]
        if residual_ND.shape[0] == 0:
            return
        size = self.codebook_size
        counts_K = torch.bincount(ids_N, minlength=size).float()
        sums_KD = torch.zeros(size, self.dim, device=residual_ND.device).index_add_(0, ids_N, residual_ND)
        self.ema_counts[q].lerp_(counts_K, 1.0 - self.ema_decay)
        self.ema_sums[q].lerp_(sums_KD, 1.0 - self.ema_decay)
        total = self.ema_counts[q].sum()
        smoothed_K = (self.ema_counts[q] + 1e-5) / (total + size * 1e-5) * total  # no code divides by zero
        self.codebooks[q] = self.ema_sums[q] / smoothed_K[:, None]
        dead_K = self.ema_counts[q] < self.dead_code_threshold
        num_dead = int(dead_K.sum())
        if num_dead:
            restart_ND = residual_ND[torch.randint(residual_ND.shape[0], (num_dead,), device=residual_ND.device)]
            self.codebooks[q][dead_K] = restart_ND
            self.ema_sums[q][dead_K] = restart_ND
            self.ema_counts[q][dead_K] = 1.0

    def training_state(self) -> dict[str, torch.Tensor]:
        """The EMA statistics, for a training checkpoint (they are not in ``state_dict``)."""
        return {"ema_counts": self.ema_counts.clone(), "ema_sums": self.ema_sums.clone()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.ema_counts.copy_(state["ema_counts"])
        self.ema_sums.copy_(state["ema_sums"])


# ----------------------------------------------------------------------------------------------------------
# Saving and loading: one safetensors file, its config in the metadata
# ----------------------------------------------------------------------------------------------------------


def _save_file(module: nn.Module, config, path: str | Path, dtype: torch.dtype | None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save to a .safetensors file, got {str(path)!r}")
    tensors = {}
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    metadata = {"format": "pt", "class": type(module).__name__, "config": json.dumps(asdict(config))}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)
    return path


def _load_file(cls, config_cls, path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {cls.__name__} weights at {str(path)!r}")
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("class") != cls.__name__ or "config" not in metadata:
        raise ValueError(f"{str(path)!r} is not a {cls.__name__} file written by save_pretrained (its metadata "
                         f"names class {metadata.get('class')!r})")
    module = cls(config_cls(**json.loads(metadata["config"])))
    state = safetensors.torch.load_file(str(path), device="cpu")
    module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in state.items()})
    return module.eval()


def _config_from(config_cls, config):
    """A config dataclass from itself or a dict of its fields (what a model's own config stores)."""
    if isinstance(config, config_cls):
        return config
    if isinstance(config, dict):
        unknown = set(config) - {f.name for f in fields(config_cls)}
        if unknown:
            raise ValueError(f"unknown {config_cls.__name__} field(s) {sorted(unknown)}; accepted: "
                             f"{[f.name for f in fields(config_cls)]}")
        return config_cls(**config)
    raise TypeError(f"config must be a {config_cls.__name__} or a dict, got {type(config).__name__}")


# ----------------------------------------------------------------------------------------------------------
# The mel tokenizer
# ----------------------------------------------------------------------------------------------------------


class _ResidualConvBlock(nn.Module):
    """x + conv1x1(GELU(conv_k,dilated(GELU(x)))): keeps the frame count, widens the view by ``dilation``."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size - 1) // 2)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return x_BCT + self.mix(F.gelu(self.conv(F.gelu(x_BCT))))


def _conv_stack(in_channels: int, hidden: int, out_channels: int, num_blocks: int, kernel_size: int) -> nn.Sequential:
    """in conv -> residual blocks with dilations 1, 2, 4, ... -> GELU -> out conv (frame count unchanged)."""
    pad = (kernel_size - 1) // 2
    blocks = [_ResidualConvBlock(hidden, kernel_size, 2**i) for i in range(num_blocks)]
    return nn.Sequential(nn.Conv1d(in_channels, hidden, kernel_size, padding=pad), *blocks, nn.GELU(),
                         nn.Conv1d(hidden, out_channels, kernel_size, padding=pad))


@dataclass
class MelTokenizerConfig:
    """The shape of a :class:`MelTokenizer` (JSON-able; stored with its weights).

    Attributes:
        n_mels: mel bands in (the project's :data:`N_MELS`).
        hidden_dim: channels of the encoder and decoder convs.
        latent_dim: size of the quantised vectors.
        num_blocks: residual conv blocks in the encoder and in the decoder (dilations 1, 2, 4, ...).
        kernel_size: time kernel of the convs (odd).
        num_codebooks: Q residual quantisation stages.
        codebook_size: K codes per codebook.
        ema_decay, dead_code_threshold: codebook training (see :class:`ResidualVectorQuantizer`).
    """

    n_mels: int = N_MELS
    hidden_dim: int = 128
    latent_dim: int = 64
    num_blocks: int = 3
    kernel_size: int = 3
    num_codebooks: int = 8
    codebook_size: int = 256
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.5


class MelTokenizer(nn.Module):
    """Normalised log-mel frames <-> discrete codes: conv encoder -> residual VQ -> conv decoder.

    One code per codebook per mel frame (no time downsampling): ``encode`` gives ``[B, Q, T]`` for a
    ``[B, N_MELS, T]`` mel, ``T = 1 + N // HOP_LENGTH`` for ``N`` samples (65 per clip). ``decode`` accepts the
    first ``q <= Q`` codebooks (the residual stages are coarse to fine), so a model may use fewer.

    Args:
        config: a :class:`MelTokenizerConfig` or a dict of its fields (default: the default config).
    """

    def __init__(self, config: MelTokenizerConfig | dict | None = None) -> None:
        super().__init__()
        self.config = _config_from(MelTokenizerConfig, config or MelTokenizerConfig())
        c = self.config
        if c.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convs keep the frame count), got {c.kernel_size}")
        self.front_end = AudioFrontEnd()
        self.encoder = _conv_stack(c.n_mels, c.hidden_dim, c.latent_dim, c.num_blocks, c.kernel_size)
        self.quantizer = ResidualVectorQuantizer(c.num_codebooks, c.codebook_size, c.latent_dim, c.ema_decay,
                                                 c.dead_code_threshold)
        self.decoder = _conv_stack(c.latent_dim, c.hidden_dim, c.n_mels, c.num_blocks, c.kernel_size)

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _mel(self, x: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Audio ``[N]``/``[B, N]`` -> mel; a mel ``[B, n_mels, T]`` passes through."""
        if x.ndim == 3:
            return _batched_mel(x, self.config.n_mels)
        return self.front_end(x, sample_rate)

    def _latent_NTD(self, mel_BMT: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel_BMT.float()).transpose(1, 2)

    def _decode_latent(self, latent_BTD: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent_BTD.transpose(1, 2))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_codebooks: int | None = None, sample_rate: int = SAMPLE_RATE,
               ) -> torch.Tensor:
        """Codes ``int64 [B, Q, T]`` of audio ``[N]``/``[B, N]`` (at ``sample_rate``) or of a normalised
        log-mel ``[B, n_mels, T]``; ``num_codebooks``: only the first that many stages (default all)."""
        mel = self._mel(x, sample_rate)
        latent_BTD = self._latent_NTD(mel)
        b, t, d = latent_BTD.shape
        codes_NQ = self.quantizer.quantize(latent_BTD.reshape(b * t, d), num_codebooks)
        return codes_NQ.reshape(b, t, -1).transpose(1, 2).contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, q, T]`` (``q <= Q``, the first q codebooks) -> normalised log-mel ``[B, n_mels, T]``."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, q, T], got shape {tuple(codes.shape)}")
        b, q, t = codes.shape
        latent_ND = self.quantizer.lookup(codes.transpose(1, 2).reshape(b * t, q))
        return self._decode_latent(latent_ND.reshape(b, t, -1))

    def forward(self, mel: torch.Tensor, active_stages: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on a normalised log-mel ``[B, n_mels, T]``: ``(reconstruction [B, n_mels, T],
        codes [B, Q, T], commitment loss)``; ``active_stages [B]``: codebooks used per clip (quantiser
        dropout), None for all."""
        mel = _batched_mel(mel, self.config.n_mels)
        latent_BTD = self._latent_NTD(mel)
        b, t, d = latent_BTD.shape
        active_N = None if active_stages is None else active_stages.repeat_interleave(t)
        quantized_ND, codes_NQ, commitment = self.quantizer(latent_BTD.reshape(b * t, d), active_N)
        reconstruction = self._decode_latent(quantized_ND.reshape(b, t, d))
        return reconstruction, codes_NQ.reshape(b, t, -1).transpose(1, 2), commitment

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the weights and config to one ``.safetensors`` file (``dtype``: e.g. float16 to halve it)."""
        return _save_file(self, self.config, path, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MelTokenizer:
        """A tokenizer from a file written by :meth:`save_pretrained`, in eval mode, float32."""
        return _load_file(cls, MelTokenizerConfig, path)


# ----------------------------------------------------------------------------------------------------------
# The neural vocoder
# ----------------------------------------------------------------------------------------------------------


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt block over frames: depthwise conv -> LayerNorm -> MLP (GELU) -> layer scale -> residual."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, intermediate_dim)
        self.project = nn.Linear(intermediate_dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        h_BTC = self.norm(self.depthwise(x_BCT).transpose(1, 2))
        h_BTC = self.project(F.gelu(self.expand(h_BTC))) * self.scale
        return x_BCT + h_BTC.transpose(1, 2)


@dataclass
class MelVocoderConfig:
    """The shape of a :class:`MelVocoder` (JSON-able; stored with its weights).

    Attributes:
        n_mels: mel bands in (the project's :data:`N_MELS`; the STFT is the project's).
        dim: channels of the ConvNeXt blocks.
        intermediate_dim: width of each block's MLP.
        num_blocks: ConvNeXt blocks.
        kernel_size: time kernel of the depthwise convs (odd).
        griffin_lim_iterations: Griffin-Lim iterations that find the phase (as :class:`GriffinLimVocoder`).
        max_log_magnitude: the predicted log-magnitude is clamped here (e^8 ~ 3000, above any real STFT bin
            of audio in [-1, 1] with a 1024 Hann window, whose largest is 512).
    """

    n_mels: int = N_MELS
    dim: int = 128
    intermediate_dim: int = 384
    num_blocks: int = 4
    kernel_size: int = 7
    griffin_lim_iterations: int = 64
    max_log_magnitude: float = 8.0


class MelVocoder(nn.Module):
    """Normalised log-mel ``[B, n_mels, T]`` -> waveform ``[B, (T - 1) * HOP_LENGTH]``: a network predicts the
    STFT magnitude, Griffin-Lim finds its phase.

    The mel filter bank merges many STFT bins into one band (8 kHz into 80 bands), so the least-squares inverse
    that :class:`GriffinLimVocoder` uses smears every harmonic over its band; given the true magnitude,
    Griffin-Lim itself loses little (spectral convergence 0.035 on the project's clips, against 0.37 from the
    mel). So the network learns what the mel does not say directly: ConvNeXt blocks at the frame rate (a conv
    embedding, LayerNorm, blocks, a linear head) predict a correction of the least-squares magnitude in the
    log domain, ``ln|S| = ln max(pinv(fbank) mel, floor) + head(...)``; Griffin-Lim (torchaudio, momentum
    0.99, zero initial phase, so deterministic) turns it into samples. Learning the phase too (Vocos'
    design, tried here) needed far more training than the few minutes of CPU this project gives it: spectral
    convergence 0.78 after 800 steps, where this design starts at the baseline's 0.37 and goes down.

    Trained by :class:`moezoo.training.audio_codec.AudioVocoderModule` on the STFT loss of the magnitude it
    predicts (:func:`magnitude_losses`) and the log-mel L1 of that magnitude.

    Args:
        config: a :class:`MelVocoderConfig` or a dict of its fields (default: the default config).
    """

    def __init__(self, config: MelVocoderConfig | dict | None = None) -> None:
        super().__init__()
        self.config = _config_from(MelVocoderConfig, config or MelVocoderConfig())
        c = self.config
        if c.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convs keep the frame count), got {c.kernel_size}")
        if c.griffin_lim_iterations < 1:
            raise ValueError(f"griffin_lim_iterations must be >= 1, got {c.griffin_lim_iterations}")
        self.embed = nn.Conv1d(c.n_mels, c.dim, c.kernel_size, padding=(c.kernel_size - 1) // 2)
        self.embed_norm = nn.LayerNorm(c.dim)
        self.blocks = nn.ModuleList(
            _ConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size, 1.0 / c.num_blocks) for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, N_FFT // 2 + 1)
        nn.init.zeros_(self.head.weight)  # start from the least-squares magnitude
        nn.init.zeros_(self.head.bias)
        self.front_end = AudioFrontEnd()
        self.register_buffer("mel_inverse", torch.linalg.pinv(self.front_end.mel_fbank.T), persistent=False)

    def magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """The predicted STFT magnitude ``[B, N_FFT // 2 + 1, T]`` (the project's STFT)."""
        mel = _batched_mel(mel, self.config.n_mels).float()
        least_squares_BFT = torch.matmul(self.mel_inverse, denormalize_log_mel(mel))
        x_BCT = self.embed_norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x_BCT = block(x_BCT)
        correction_BFT = self.head(self.final_norm(x_BCT.transpose(1, 2))).transpose(1, 2)
        log_magnitude = least_squares_BFT.clamp_min(LOG_MEL_FLOOR).log() + correction_BFT
        return log_magnitude.clamp(max=self.config.max_log_magnitude).exp()

    @torch.no_grad()
    def forward(self, mel: torch.Tensor, griffin_lim_iterations: int | None = None) -> torch.Tensor:
        """The waveform; ``griffin_lim_iterations`` overrides the config's (fewer: faster, rougher phase).
        Not differentiable (training uses :meth:`magnitude`)."""
        magnitude = self.magnitude(mel)
        iterations = griffin_lim_iterations or self.config.griffin_lim_iterations
        return AF.griffinlim(magnitude, self.front_end.window, N_FFT, HOP_LENGTH, N_FFT, 1.0, iterations, 0.99,
                             num_samples(magnitude.shape[-1]), False)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the weights and config to one ``.safetensors`` file (``dtype``: e.g. float16 to halve it)."""
        return _save_file(self, self.config, path, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MelVocoder:
        """A vocoder from a file written by :meth:`save_pretrained`, in eval mode, float32."""
        return _load_file(cls, MelVocoderConfig, path)


# ----------------------------------------------------------------------------------------------------------
# Audio encoder (understanding): log-mel frames -> tokens for a connector
# ----------------------------------------------------------------------------------------------------------


class AudioEncoder(nn.Module):
    """Whisper's encoder layout at CPU size: the log-mel front end, two 1-D convolutions (the second of stride 2,
    so 31.25 tokens a second), fixed sinusoidal positions, ``depth`` timm ViT blocks and a final LayerNorm.

    ``forward(audio [B, N] or [N], sample_rate=16000, lengths=None) -> (tokens [B, T, dim], mask [B, T] bool)``:
    audio at another rate is resampled by the front end; ``lengths`` (samples, at ``sample_rate``) marks each
    clip's real part in a padded batch, and the attention ignores the padding (``mask``: real tokens).
    """

    def __init__(self, dim: int = 128, depth: int = 2, num_heads: int = 4, max_tokens: int = 1500) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        from moezoo.zoo.layers.blocks import sincos_pos_embed_1d

        if min(dim, depth, num_heads, max_tokens) < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}); depth and "
                             f"max_tokens >= 1")
        self.dim, self.max_tokens = dim, max_tokens
        self.front_end = AudioFrontEnd()
        self.conv1 = nn.Conv1d(N_MELS, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", sincos_pos_embed_1d(dim, max_tokens), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def num_tokens(num_frames: int) -> int:
        return (num_frames - 1) // 2 + 1  # the stride-2 convolution with padding 1 and kernel 3

    def forward(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE,
                lengths: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mel_BMT = self.front_end(audio, sample_rate)
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel_BMT)))).transpose(1, 2)  # [B, T, dim]
        if x.shape[1] > self.max_tokens:
            raise ValueError(f"audio of {x.shape[1]} tokens is longer than this encoder's {self.max_tokens} "
                             f"({self.max_tokens / FRAME_RATE * 2:.1f} s)")
        mask_BT = self._mask(lengths, x.shape[0], x.shape[1], sample_rate, x.device)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        attn_mask = mask_BT[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x), mask_BT

    def _mask(self, lengths, batch: int, num_tokens: int, sample_rate: int, device) -> torch.Tensor:
        if lengths is None:
            return torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
        lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten()
        if lengths.numel() != batch or (lengths < 1).any():
            raise ValueError(f"lengths must hold one positive sample count per clip ({batch}), got {lengths.tolist()}")
        samples = torch.ceil(lengths * SAMPLE_RATE / sample_rate).long()
        real = torch.tensor([self.num_tokens(num_frames(int(n))) for n in samples], device=device)
        return torch.arange(num_tokens, device=device)[None, :] < real[:, None]
