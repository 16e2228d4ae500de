"""Questions about pictures and sounds with a multimodal LM (:class:`moezoo.zoo.models.moe_vlm.MoEVLM`).

    pipe = VisualQAPipeline.from_pretrained("moe_vlm_tiny.scenes")
    out = pipe(images=Image.open("scene.png"), prompt="what shape is the red object?")
    out.text[0]                                        # "circle"
    pipe(images=scene, prompt="describe the picture.")  # a caption
    pipe(audio=(samples, 44_100), prompt="which note is this?")
    out = pipe(images=scene, prompt="...", return_routing=True)
    out.routing[layer][i]        # the experts of every token of input i in that layer, [S, k] (-1: unused slot)
    out.modality[i]              # each token's modality id (0 text, 1 image, 2 audio)
    out.image_experts(layer, i)  # the first expert of every image token, on the token grid [h, w]

Images of any size are resized to the model's input (with a note in ``out.notes``); audio at another rate is
resampled (also noted); sounds longer than the model reads are refused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .base import IMAGE_INPUTS, Pipeline, checked_max_batch_size, chunk_slices, image_to_tensor

__all__ = ["VisualQAPipeline", "VisualQAPipelineOutput"]

AUDIO_INPUTS = "a 1-D numpy array or torch tensor of samples at 16 kHz, a (samples, sampling_rate) pair, or a list of them"


@dataclass
class VisualQAPipelineOutput:
    """``text``: one answer per input (``token_ids``: its word ids). With ``return_routing``: ``routing[layer][i]`` the experts of every token
    of input i's sequence ``[S, k]`` (None for a layer that does not route), ``modality[i]`` the tokens' modality
    ids ``[S]``, ``expert_names[layer]`` the group of each of that layer's experts (``MoEVLM.expert_groups``). ``notes``: what was changed in the
    inputs (resized, resampled)."""

    text: list[str]
    token_ids: list[list[int]] = field(default_factory=list)
    routing: list[list[np.ndarray | None]] | None = None
    modality: list[np.ndarray] | None = None
    expert_names: list[list[str] | None] | None = None
    image_grid: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def image_experts(self, layer: int, index: int = 0) -> np.ndarray:
        """The first-choice expert of every image token of input ``index`` in ``layer``, on the ``image_grid``."""
        if self.routing is None or self.routing[layer][index] is None:
            raise ValueError(f"no routing for layer {layer}: call with return_routing=True on a routed layer")
        experts = self.routing[layer][index][self.modality[index] == 1, 0]
        return experts.reshape(self.image_grid)

    def modality_shares(self, layer: int, index: int = 0) -> dict[str, dict[str, float]]:
        """For each modality present, the share of its tokens' routed slots per expert name (e.g. how much of the
        image went to intra- vs shared experts)."""
        from moezoo.zoo.models.moe_vlm import MODALITIES

        experts, modality = self.routing[layer][index], self.modality[index]
        names = self.expert_names[layer]
        shares = {}
        for m, name in enumerate(MODALITIES):
            slots = experts[modality == m].flatten()
            slots = slots[slots >= 0]
            if slots.size == 0:
                continue
            labels = [names[e] if names is not None else str(e) for e in slots]
            shares[name] = {label: labels.count(label) / len(labels) for label in sorted(set(labels))}
        return shares


class VisualQAPipeline(Pipeline):
    """Answers with a :class:`~moezoo.zoo.models.moe_vlm.MoEVLM` (the ``model``)."""

    _modules = ("model",)
    max_batch_size: int = 32

    def __init__(self, model):
        super().__init__()
        from moezoo.zoo.models.moe_vlm import MoEVLM

        if not isinstance(model, MoEVLM):
            raise ValueError(f"VisualQAPipeline needs a MoE-VLM model (moezoo.zoo.models.moe_vlm), got {type(model).__name__}")
        self.model = model.eval()
        self.freeze()

    @classmethod
    def from_pretrained(cls, name: str = "moe_vlm_tiny", *, cache_dir=None, local_files_only: bool = False,
                        device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        **model_overrides) -> "VisualQAPipeline":
        """Load a zoo model with its weights (``name``, ``name.tag``, ``local-dir:PATH`` or ``hf-hub:org/repo``)."""
        from moezoo.zoo import create_model

        model = create_model(name, pretrained=True, cache_dir=cache_dir, local_files_only=local_files_only,
                             **model_overrides)
        return cls(model).to(device, torch_dtype)

    # ------------------------------------------------------------------------------------------ inputs

    def _images(self, images, notes: list[str]) -> torch.Tensor | None:
        if images is None:
            return None
        if self.model.image_encoder is None:
            raise ValueError("this model reads no images (it has no image encoder)")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError(f"got an empty list of images; expected {IMAGE_INPUTS}")
        size = self.model.image_size
        tensors = []
        for i, item in enumerate(items):
            tensor = image_to_tensor(item)  # [3, H, W] in [0, 1]
            if tuple(tensor.shape[1:]) != size:
                notes.append(f"image {i} resized from {tensor.shape[2]}x{tensor.shape[1]} to {size[1]}x{size[0]}")
                tensor = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            tensors.append(tensor)
        return torch.stack(tensors).to(self.device, self.dtype) * 2 - 1

    def _audio(self, audio, notes: list[str]) -> torch.Tensor | None:
        from moezoo.encoders.audio import SAMPLE_RATE, AudioFrontEnd

        if audio is None:
            return None
        if self.model.audio_encoder is None:
            raise ValueError("this model hears no sounds (it has no audio encoder)")
        single = isinstance(audio, (np.ndarray, torch.Tensor)) or (isinstance(audio, tuple) and len(audio) == 2
                                                                   and isinstance(audio[1], numbers.Number))
        items = [audio] if single else list(audio)
        if not items:
            raise ValueError(f"got an empty list of sounds; expected {AUDIO_INPUTS}")
        clips = []
        for i, item in enumerate(items):
            samples, rate = item if isinstance(item, tuple) else (item, SAMPLE_RATE)
            if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or rate < 1000:
                raise ValueError(f"sound {i}: the sampling rate must be a whole number of Hz >= 1000, got {rate!r}")
            clip = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
            if clip.dim() == 2 and min(clip.shape) <= 2:  # stereo -> mono, channels either way round
                clip = clip.float().mean(dim=int(clip.shape[0] > clip.shape[1]))
                notes.append(f"sound {i} mixed to mono")
            if clip.dim() != 1 or clip.numel() == 0 or not clip.dtype.is_floating_point:
                raise ValueError(f"sound {i} must be a non-empty 1-D float array of samples; expected {AUDIO_INPUTS}")
            if not bool(torch.isfinite(clip).all()):
                raise ValueError(f"sound {i} holds NaN or infinite samples")
            clip = clip.float()
            if rate != SAMPLE_RATE:
                notes.append(f"sound {i} resampled from {rate} Hz to {SAMPLE_RATE} Hz")
                clip = AudioFrontEnd.resample(clip, int(rate))
            limit = self.model.config.max_audio_seconds
            if clip.numel() > limit * SAMPLE_RATE:
                raise ValueError(f"sound {i} lasts {clip.numel() / SAMPLE_RATE:.2f} s; this model hears at most {limit} s "
                                 "(cut it first)")
            clips.append(F.pad(clip, (0, int(limit * SAMPLE_RATE) - clip.numel())))
        return torch.stack(clips).to(self.device, self.dtype)

    @staticmethod
    def _prompts(prompt, count: int) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
        if len(prompts) == 1 and count > 1:
            prompts = prompts * count  # one question for every input
        return prompts

    # ------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(self, images=None, audio=None, prompt: str | list[str] = "describe the picture.", *,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None, return_routing: bool = False,
                 max_batch_size: int | None = None) -> VisualQAPipelineOutput:
        """Answer ``prompt`` (one, or one per input) about each image and/or sound.

        Args:
            images: one image or a list (:data:`IMAGE_INPUTS`); audio: one sound or a list (:data:`AUDIO_INPUTS`).
                Give images, sounds or both (then as many of each: input i is image i with sound i).
            prompt: the question; "describe the picture." asks for a caption.
            max_new_tokens: the most words to write (default: the model's longest answer).
            do_sample, temperature, generator: sample the words instead of taking the likeliest.
            return_routing: also return the experts of every token per layer (:class:`VisualQAPipelineOutput`).
            max_batch_size: inputs per model call.
        """
        notes: list[str] = []
        if images is None and audio is None:
            raise ValueError("give images=..., audio=... or both: the model answers about a picture or a sound")
        pixels, sounds = self._images(images, notes), self._audio(audio, notes)
        counts = {len(x) for x in (pixels, sounds) if x is not None}
        if len(counts) > 1:
            raise ValueError(f"{len(pixels)} images and {len(sounds)} sounds: give as many of each (input i is both)")
        count = counts.pop()
        prompts = self._prompts(prompt, count)
        if len(prompts) != count:
            raise ValueError(f"{len(prompts)} prompts for {count} inputs: give one prompt, or one per input")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)
                                           or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                          or not 0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be one torch.Generator (it draws the words of every input in turn), "
                             f"got {type(generator).__name__}")
        step = checked_max_batch_size(self.max_batch_size if max_batch_size is None else max_batch_size)
        text, token_ids, routing, modality = [], [], None, []
        for part in chunk_slices(count, step):
            out = self.model.generate(None if pixels is None else pixels[part], None if sounds is None else sounds[part],
                                      prompts[part], max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      temperature=temperature, generator=generator, return_routing=return_routing)
            text += out.text
            token_ids += out.token_ids
            if return_routing:
                chunk = [[None if r is None else r.numpy() for r in layer] for layer in out.routing]
                routing = chunk if routing is None else [a + b for a, b in zip(routing, chunk)]
                modality += [m.numpy() for m in out.modality]
        names = None
        grid = None
        if return_routing:
            names = [self.model.expert_groups(layer) for layer in range(len(self.model.blocks))]
            side = math.isqrt(self.model.num_image_tokens)
            grid = (side, side) if side * side == self.model.num_image_tokens else None
        return VisualQAPipelineOutput(text, token_ids, routing, modality if return_routing else None, names, grid, notes)
