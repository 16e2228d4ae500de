"""DiTMoEPipeline: class labels or text prompts -> images with a DiT-MoE, plus which expert drew each patch.

    from moezoo.pipelines import DiTMoEPipeline
    pipe = DiTMoEPipeline.from_pretrained("dit_moe_digits")
    out = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))  # the model's recommended sampling
    out.images[0].save("three.png")

Sampling uses diffusers' schedulers (:func:`moezoo.zoo.diffusion.make_scheduler`): flow-match Euler for
rectified-flow models (the model predicts ``v = noise - x0``; diffusers' sigmas are DiT-MoE's ``t``), DDIM (or
DDPM) for epsilon models on DiT's linear schedule. Pixel-space models decode directly; latent models decode with
a diffusers ``AutoencoderKL`` the caller supplies (latents scaled by its ``config.scaling_factor``).

Defaults per model: a pretrained model's metadata may recommend its sampling, ``"sampling": {"scheduler":
"flow_match_euler", "num_inference_steps": 25, "guidance_scale": 1.25}`` (any of the three; the bundled models'
values come from ``bench/dit_quality.py sweep``, see the README's "Measured"). The pipeline samples with that
scheduler unless given another, and ``__call__`` uses those steps and guidance when they are not passed (or
passed as None); without a recommendation: :data:`DEFAULT_SAMPLING`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moezoo.zoo.diffusion import make_scheduler, vae_scaling_factor

from .base import (
    Pipeline,
    check_generators,
    check_output_type,
    checked_guidance_scale,
    checked_max_batch_size,
    checked_num_inference_steps,
    chunk_slices,
    generator_part,
    randn,
    to_output,
)



@dataclass
class DiTMoEPipelineOutput:
    """``images``: PIL list, numpy [B, H, W, C] in [0, 1], or torch [B, C, H, W] in [0, 1].
    ``routing_maps``: when asked for, per MoE layer an int array [B, H/p, W/p] — the top-1 expert of every
    patch at the last denoising step (conditional branch)."""

    images: list | np.ndarray | torch.Tensor
    routing_maps: list[np.ndarray] | None = None


# The sampling of a model whose metadata recommends none (DiT's usual settings; scheduler None: the objective's
# first, flow-match Euler or DDIM). The keys are the names of the arguments they default.
DEFAULT_SAMPLING = {"scheduler": None, "num_inference_steps": 30, "guidance_scale": 4.0}


def scheduler_for(transformer, name: str | None = None):
    """:func:`make_scheduler` for what ``transformer`` was trained for (its config's objective and time shift)."""
    config = transformer.config
    return make_scheduler(getattr(config, "objective", "rf"), name, getattr(config, "time_shift", 1.0))


def recommended_sampling(metadata: dict | None) -> dict:
    """The sampling a model's pretrained metadata recommends (its ``"sampling"`` entry) over
    :data:`DEFAULT_SAMPLING`: ``{"scheduler": name or None, "num_inference_steps": int, "guidance_scale":
    float}``. Readable without loading weights: ``recommended_sampling(get_pretrained_cfg(name).metadata)``."""
    given = (metadata or {}).get("sampling", {})
    if not isinstance(given, dict) or set(given) - set(DEFAULT_SAMPLING):
        raise ValueError(f"the model's metadata \"sampling\" must be an object with any of the keys "
                         f"{', '.join(DEFAULT_SAMPLING)}; got {given!r}")
    sampling = {**DEFAULT_SAMPLING, **given}
    try:
        if sampling["scheduler"] is not None and not isinstance(sampling["scheduler"], str):
            raise ValueError(f"scheduler must be a scheduler name, got {sampling['scheduler']!r}")
        sampling["num_inference_steps"] = checked_num_inference_steps(sampling["num_inference_steps"])
        sampling["guidance_scale"] = checked_guidance_scale(sampling["guidance_scale"])
    except ValueError as err:
        raise ValueError(f"the model's metadata \"sampling\" {given!r} is invalid: {err}") from None
    return sampling


class DiTMoEPipeline(Pipeline):
    """Generation with a :class:`moezoo.zoo.models.dit_moe.DiTMoE` (the ``transformer``).

    A request for more than ``max_batch_size`` images is generated in chunks of that many (noise, text
    encoding, denoising and decoding alike), so memory stays bounded however many labels or prompts are
    asked for. Set it per pipeline (``pipe.max_batch_size = 8``) or per call.

    ``default_num_inference_steps`` and ``default_guidance_scale`` are what a call without those arguments uses:
    the model's recommended sampling (:func:`recommended_sampling`), else 30 steps at guidance 4. Set them per
    pipeline too; an argument passed to the call wins.
    """

    _modules = ("transformer", "vae")
    # Images per model call (twice as many rows with guidance). Measured on the bundled digits model (CPU, fp32,
    # guidance 2): a call of 32 takes ~120 MB above the loaded model and costs per image 0.7x what a call of 8
    # does; a call of 128 takes ~220 MB and 0.55x a call of 32. Not more by default: a 256 px DiT-MoE-XL image
    # has 4x the tokens and 9x the width (1152 vs 128) of a digit.
    max_batch_size: int = 32

    def __init__(self, transformer, scheduler=None, vae=None, label_names: list[str] | None = None):
        super().__init__()
        self.transformer = transformer.eval()
        self.objective = getattr(transformer.config, "objective", "rf")
        sampling = recommended_sampling(getattr(getattr(transformer, "pretrained_cfg", None), "metadata", None))
        self.default_num_inference_steps = sampling["num_inference_steps"]
        self.default_guidance_scale = sampling["guidance_scale"]
        if scheduler is None and sampling["scheduler"] is not None:
            try:
                scheduler = scheduler_for(transformer, sampling["scheduler"])
            except ValueError as err:
                raise ValueError(f"the model's metadata \"sampling\" recommends an unusable scheduler: {err}") from None
        self.scheduler = scheduler if scheduler is not None else scheduler_for(transformer)
        self.vae = vae
        num_classes = transformer.config.num_classes
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
        if num_classes and len(self.label_names) != num_classes:
            raise ValueError(f"got {len(self.label_names)} label names for a model of {num_classes} classes")
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        scheduler: str | None = None,
        vae=None,
        cache_dir=None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        **model_overrides,
    ) -> "DiTMoEPipeline":
        """Load a zoo model with its weights (``name``, ``name.tag``, ``local-dir:PATH`` or ``hf-hub:org/repo``).
        ``scheduler``: a scheduler name (``"flow_match_euler"``, ``"flow_match_heun"``; ``"ddim"``, ``"ddpm"``);
        default: the one the model's metadata recommends, else the objective's first."""
        from moezoo.zoo import create_model

        transformer = create_model(
            name, pretrained=True, cache_dir=cache_dir, local_files_only=local_files_only, **model_overrides
        )
        metadata = getattr(getattr(transformer, "pretrained_cfg", None), "metadata", None) or {}
        pipe = cls(transformer, None if scheduler is None else scheduler_for(transformer, scheduler), vae,
                   metadata.get("label_names"))
        return pipe.to(device, torch_dtype)

    def get_label_ids(self, labels: list[str | int] | str | int) -> list[int]:
        """Class names (or ids) -> ids, with an error that lists the accepted names."""
        labels = [labels] if isinstance(labels, (str, int)) else list(labels)
        ids = []
        for label in labels:
            if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                if not 0 <= label < len(self.label_names):
                    raise ValueError(f"class id {label} is out of range [0, {len(self.label_names)})")
                ids.append(int(label))
            elif isinstance(label, str) and label in self.label_names:
                ids.append(self.label_names.index(label))
            else:
                raise ValueError(f"unknown class {label!r}; accepted: {', '.join(self.label_names)} (or their ids)")
        return ids

    def _check_call(self, class_labels, prompt, num_inference_steps, guidance_scale, output_type,
                    max_batch_size) -> tuple[int, float, int]:
        """Check the arguments every generation call shares; returns (steps, guidance scale, chunk size), None
        steps or guidance being the pipeline's defaults."""
        config = self.transformer.config
        if (class_labels is None) == (prompt is None):
            raise ValueError("pass exactly one of class_labels (class-conditional models) or prompt (text models)")
        if class_labels is not None and not config.num_classes:
            raise ValueError("this model is not class-conditional; pass prompt=... instead")
        if prompt is not None and not getattr(config, "text_encoder", None):
            raise ValueError("this model has no text encoder (it is not text-conditioned); pass class_labels=... "
                             "instead")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt is an empty list; pass at least one prompt")
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a list of strings")
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        num_inference_steps = checked_num_inference_steps(num_inference_steps)
        check_output_type(output_type)
        guidance_scale = checked_guidance_scale(guidance_scale)
        max_batch_size = self.max_batch_size if max_batch_size is None else max_batch_size
        return num_inference_steps, guidance_scale, checked_max_batch_size(max_batch_size)

    def denoise(self, sample, y, text_emb, num_inference_steps: int, guidance_scale: float, generator):
        """Run the scheduler from the noise ``sample`` to a clean sample, with classifier-free guidance when
        ``guidance_scale != 1`` (images and clips alike: the model says where its channels are)."""
        model, batch, device = self.transformer, sample.shape[0], sample.device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * getattr(self.scheduler, "init_noise_sigma", 1.0)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_t = t / self.scheduler.config.num_train_timesteps if self.objective == "rf" else t
            t_B = torch.full((batch,), float(model_t), device=device, dtype=self.dtype)
            if self.objective == "ddpm":
                t_B = t_B.long()
            if guidance_scale != 1.0:
                prediction = model.forward_with_cfg(sample, t_B, y, guidance_scale, text_emb=text_emb)
            else:
                prediction = model(sample, t_B, y, text_emb)
            prediction = prediction.narrow(model.channel_dim, 0, model.in_channels)  # drop learned-variance channels
            # Ancestral samplers draw their noise per sample from a generator list (diffusers' randn_tensor), so
            # a sample does not depend on the others in its batch or chunk.
            sample = self.scheduler.step(prediction, t, sample, generator=generator).prev_sample
        return sample

    def generate(self, noise, y, prompts: list[str] | None, num_inference_steps: int, guidance_scale: float,
                 generator, max_batch_size: int, return_routing: bool):
        """Denoise and decode ``noise`` [B, ...] in chunks of at most ``max_batch_size`` samples (class ids ``y``
        or ``prompts`` alike). Returns (decoded samples in [-1, 1], per MoE layer the int routing maps [B, ...]
        of the conditional branch's last forward, or None)."""
        model = self.transformer
        decoded, maps = [], []
        for part in chunk_slices(len(noise), max_batch_size):
            text_emb = model.encode_text(prompts[part]).to(self.device, self.dtype) if prompts is not None else None
            sample = self.denoise(noise[part], None if y is None else y[part], text_emb, num_inference_steps,
                                  guidance_scale, generator_part(generator, part))
            if return_routing:
                # With guidance the last forward ran [conditional; unconditional]: keep the conditional half.
                maps.append([m[: len(sample)].cpu() for m in model.routing_maps()])
            decoded.append(self._decode(sample))
        routing_maps = [torch.cat(layer).numpy() for layer in zip(*maps)] if return_routing else None
        return torch.cat(decoded), routing_maps

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int | str] | int | str | None = None,
        prompt: list[str] | str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_routing: bool = False,
        max_batch_size: int | None = None,
    ):
        """Generate one image per class label or prompt.

        Args:
            class_labels: class ids or names (class-conditional models).
            prompt: a prompt or a list of prompts (text-conditioned models).
            num_inference_steps: denoising steps (default: ``default_num_inference_steps``, the model's
                recommendation).
            guidance_scale: classifier-free guidance scale; 1 disables guidance (one forward per step) (default:
                ``default_guidance_scale``, the model's recommendation).
            generator: a torch.Generator, or one per image, for reproducible noise. With one generator per
                image the result does not depend on ``max_batch_size`` (nor on the other images asked for);
                with a single one, only ancestral DDPM sampling changes with the chunking (its per-step noise).
            output_type: "pil", "np" or "pt".
            return_dict: return a :class:`DiTMoEPipelineOutput` (else a tuple).
            return_routing: also return per-layer routing maps (which expert each patch went to).
            max_batch_size: images per model call (default: the pipeline's ``max_batch_size``, 32); larger
                requests run in chunks.
        """
        num_inference_steps, guidance_scale, max_batch_size = self._check_call(
            class_labels, prompt, num_inference_steps, guidance_scale, output_type, max_batch_size)
        config, device = self.transformer.config, self.device
        if class_labels is not None:
            y, prompts = torch.tensor(self.get_label_ids(class_labels), device=device), None
            batch = len(y)
        else:
            y, prompts = None, [prompt] if isinstance(prompt, str) else list(prompt)
            batch = len(prompts)
        check_generators(generator, batch)

        shape = (batch, config.in_channels, config.input_size, config.input_size)
        # All the noise at once: what a single generator draws does not depend on the chunking.
        noise = randn(shape, generator, device, self.dtype)
        images, routing_maps = self.generate(noise, y, prompts, num_inference_steps, guidance_scale, generator,
                                             max_batch_size, return_routing)
        images = to_output(images, output_type)
        if not return_dict:
            return (images, routing_maps) if return_routing else (images,)
        return DiTMoEPipelineOutput(images=images, routing_maps=routing_maps)

    def _decode(self, sample: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return sample
        return self.vae.decode(sample / vae_scaling_factor(self.vae)).sample
