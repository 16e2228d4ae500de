"""AudioPipeline: a text prompt -> speech or music with UniMoE-Audio, plus how many experts each audio token used.

    from moezoo.pipelines import AudioPipeline, export_to_wav
    pipe = AudioPipeline.from_pretrained("unimoe_audio_tiny")
    out = pipe("the word seven", generator=torch.Generator().manual_seed(0), return_routing=True)
    export_to_wav(out.audios[0], "seven.wav", out.sampling_rate)
    out.experts_per_token[2][0]   # layer 2, prompt 0: experts (null included) each audio frame used

The model samples the tokenizer's codes frame by frame (KV cache, classifier-free guidance on the logits,
temperature and top-k), its own codec decodes them to a mel spectrogram and its vocoder to a waveform.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moezoo.encoders.audio import FRAME_RATE, SAMPLE_RATE
from moezoo.zoo.hub import atomic_path

from .base import Pipeline, check_generators, checked_guidance_scale, checked_max_batch_size, chunk_slices, generator_part

__all__ = ["AudioPipeline", "AudioPipelineOutput", "export_to_wav"]


@dataclass
class AudioPipelineOutput:
    """``audios``: one float32 numpy waveform per prompt, in [-1, 1], at ``sampling_rate`` Hz.
    ``experts_per_token``: when asked for, per routed layer an int array ``[B, frames]``: how many experts
    (routed and null) each generated audio frame used (the step that produced the frame's first code).
    ``codes``: the generated codes ``[B, Q, frames]``."""

    audios: list[np.ndarray]
    sampling_rate: int
    codes: np.ndarray
    experts_per_token: list[np.ndarray] | None = None


class AudioPipeline(Pipeline):
    """Generation with a :class:`moezoo.zoo.models.unimoe_audio.UniMoEAudio` (the ``model``) that owns its codec
    and vocoder."""

    _modules = ("model",)
    max_batch_size: int = 16  # prompts per generation call (twice as many rows with guidance)
    # The sampling defaults (also the app's and bench/audio_quality.py's): chosen by a sweep of guidance,
    # temperature and top-k on the bundled model with seeds the README's numbers do not use (README, "Measured").
    DEFAULT_GUIDANCE: float = 2.0
    DEFAULT_TEMPERATURE: float = 0.5
    DEFAULT_TOP_K: int = 50

    def __init__(self, model):
        super().__init__()
        if getattr(model, "codec", None) is None or getattr(model, "vocoder", None) is None:
            raise ValueError("AudioPipeline needs a UniMoE-Audio model that owns its codec and vocoder "
                             "(config.codec and config.vocoder set), e.g. unimoe_audio_tiny")
        self.model = model.eval()
        self.freeze()

    @classmethod
    def from_pretrained(cls, name: str = "unimoe_audio_tiny", *, cache_dir=None, local_files_only: bool = False,
                        device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        **model_overrides) -> "AudioPipeline":
        """Load a zoo model with its weights (``name``, ``name.tag``, ``local-dir:PATH`` or ``hf-hub:org/repo``)."""
        from moezoo.zoo import create_model

        model = create_model(name, pretrained=True, cache_dir=cache_dir, local_files_only=local_files_only,
                             **model_overrides)
        return cls(model).to(device, torch_dtype)

    @property
    def sampling_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def frame_rate(self) -> float:
        """Audio frames (one token per codebook) per second."""
        return FRAME_RATE

    def _num_frames(self, num_tokens, duration_s) -> int:
        limit = self.model.config.max_frames
        if num_tokens is not None and duration_s is not None:
            raise ValueError("pass num_tokens or duration_s, not both")
        if duration_s is not None:
            if isinstance(duration_s, bool) or not isinstance(duration_s, numbers.Real) or not math.isfinite(duration_s) \
                    or duration_s <= 0:
                raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s!r}")
            num_tokens = max(1, round(duration_s * self.frame_rate))
            if num_tokens > limit:
                raise ValueError(f"duration_s={duration_s} is {num_tokens} frames; this model makes at most {limit} "
                                 f"({limit / self.frame_rate:.2f} s)")
        if num_tokens is None:
            return limit
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or not 1 <= num_tokens <= limit:
            raise ValueError(f"num_tokens must be a whole number of frames in [1, {limit}], got {num_tokens!r}")
        return int(num_tokens)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_tokens: int | None = None,
        duration_s: float | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None | str = "default",
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        return_routing: bool = False,
        max_batch_size: int | None = None,
    ):
        """Generate one clip per prompt.

        Args:
            prompt: a prompt or a list of prompts (words the model does not know are an error).
            num_tokens: audio frames to generate (default: the model's ``max_frames``); or
            duration_s: seconds (rounded to frames).
            guidance_scale: classifier-free guidance on the logits; 1 disables it (one forward per step).
                Default :attr:`DEFAULT_GUIDANCE`.
            temperature: sampling temperature (0: greedy; default :attr:`DEFAULT_TEMPERATURE`); top_k: sample among
                the k likeliest codes (None: all; default :attr:`DEFAULT_TOP_K`).
            generator: a torch.Generator, or one per prompt, for reproducible sampling.
            return_dict: return an :class:`AudioPipelineOutput` (else the tuple ``(audios, sampling_rate)``).
            return_routing: also return how many experts each audio frame used, per routed layer.
            max_batch_size: prompts per generation call (default ``self.max_batch_size``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
        for p in prompts:
            unknown = self.model.unknown_words(p)
            if unknown:
                raise ValueError(f"prompt {p!r} has words this model never learned: {', '.join(unknown)}; it knows: "
                                 f"{', '.join(self.model.config.vocabulary)}")
        num_frames = self._num_frames(num_tokens, duration_s)
        guidance_scale = checked_guidance_scale(self.DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale)
        temperature = self.DEFAULT_TEMPERATURE if temperature is None else temperature
        top_k = self.DEFAULT_TOP_K if isinstance(top_k, str) and top_k == "default" else top_k
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        max_batch_size = checked_max_batch_size(self.max_batch_size if max_batch_size is None else max_batch_size)
        check_generators(generator, len(prompts))
        text_ids = self.model.tokenize(prompts)

        codes, routing = [], []
        for part in self.progress_bar(chunk_slices(len(prompts), max_batch_size), disable=len(prompts) <= max_batch_size):
            out = self.model.generate(text_ids[part], num_frames, guidance_scale=guidance_scale, temperature=temperature,
                                      top_k=top_k, generator=generator_part(generator, part), return_routing=return_routing)
            codes.append(out[0] if return_routing else out)
            if return_routing:
                routing.append(out[1])
        codes_BQT = torch.cat(codes)
        audios = [a.float().clamp(-1, 1).cpu().numpy() for a in self.model.decode_audio(codes_BQT)]
        experts = None
        if return_routing:  # step s produced frame s's first code: keep the first num_frames steps
            experts = [torch.cat([chunk[i] for chunk in routing])[:, :num_frames].cpu().numpy()
                       for i in range(len(routing[0]))]
        if not return_dict:
            return audios, self.sampling_rate
        return AudioPipelineOutput(audios=audios, sampling_rate=self.sampling_rate, codes=codes_BQT.cpu().numpy(),
                                   experts_per_token=experts)


def export_to_wav(audio: np.ndarray | torch.Tensor, path: str | os.PathLike, sampling_rate: int) -> str:
    """Write a mono waveform in [-1, 1] as 16-bit PCM WAV (soundfile), atomically. Only ``.wav`` names."""
    import soundfile

    path = os.fspath(path)
    if not path.lower().endswith(".wav"):
        raise ValueError(f"export_to_wav writes WAV files: the path must end in .wav, got {path!r}")
    array = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"export_to_wav takes one mono waveform [samples], got shape {array.shape}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Integral) or sampling_rate < 1:
        raise ValueError(f"sampling_rate must be a positive integer (Hz), got {sampling_rate!r}")
    with atomic_path(Path(path)) as tmp:
        soundfile.write(tmp, np.clip(array, -1, 1), int(sampling_rate), subtype="PCM_16", format="WAV")
    return path
