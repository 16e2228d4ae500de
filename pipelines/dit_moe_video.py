"""DiTMoEVideoPipeline: text prompts (or class labels) -> short clips with a spatio-temporal DiT-MoE, plus which
expert drew each (frame, patch).

    from moezoo.pipelines import DiTMoEVideoPipeline, export_to_video
    pipe = DiTMoEVideoPipeline.from_pretrained("dit_moe_shapes_video")
    out = pipe(prompt=["a red square moving left"], generator=torch.Generator().manual_seed(0))
    export_to_video(out.frames[0], "square.mp4", fps=8, scale=8)

The same call as :class:`moezoo.pipelines.DiTMoEPipeline` (``prompt`` / ``class_labels``,
``num_inference_steps``, ``guidance_scale``, ``generator``, ``output_type``, ``return_dict``,
``return_routing``, ``max_batch_size``) plus ``num_frames``, ``height`` and ``width``; the same samplers
(flow-match Euler for rectified flow, DDIM/DDPM for epsilon models). Every argument is checked before any
compute; more than ``max_batch_size`` clips are generated in chunks of that many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import check_generators, numpy_to_pil, randn
from .dit_moe import DiTMoEPipeline


@dataclass
class DiTMoEVideoPipelineOutput:
    """``frames``: numpy [B, F, H, W, C] in [0, 1] (``output_type="np"``), torch [B, F, C, H, W] in [0, 1]
    ("pt"), or per clip a list of PIL frames ("pil").
    ``routing_maps``: when asked for, per MoE layer an int array [B, F, H/p, W/p] — the top-1 expert of every
    (frame, patch) token at the last denoising step (conditional branch)."""

    frames: list | np.ndarray | torch.Tensor
    routing_maps: list[np.ndarray] | None = None


class DiTMoEVideoPipeline(DiTMoEPipeline):
    """Generation with a :class:`moezoo.zoo.models.dit_moe.DiTMoEVideo` (the ``transformer``).
    ``from_pretrained``, ``to``, ``set_progress_bar_config`` and ``get_label_ids`` are the image pipeline's, and
    so is the chunking, counted in clips."""

    # Clips per model call (twice as many rows with guidance): 4 clips of the bundled model's 8 frames are the
    # image pipeline's 32 images' worth of tokens, about 130 MB at once (CPU, fp32).
    max_batch_size: int = 4

    def _check_video_call(self, num_frames, height, width, generator, batch: int) -> tuple[int, int, int]:
        config = self.transformer.config
        if num_frames is None:
            num_frames = config.num_frames
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1 (the model was trained with "
                             f"{config.num_frames}), got {num_frames!r}")
        height = config.input_size if height is None else height
        width = config.input_size if width is None else width
        p = config.patch_size
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value % p:
                raise ValueError(f"{name}={value} is not divisible by the patch size {p}; the model generates "
                                 f"{config.input_size}x{config.input_size} frames")
        if (height, width) != (config.input_size, config.input_size):
            raise ValueError(f"this model generates {config.input_size}x{config.input_size} frames (its position "
                             f"table is fixed), got height={height}, width={width}")
        check_generators(generator, batch)
        return int(num_frames), int(height), int(width)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int | str] | int | str | None = None,
        prompt: list[str] | str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        return_routing: bool = False,
        max_batch_size: int | None = None,
    ):
        """Generate one clip per prompt (or class label).

        Args:
            class_labels: class ids or names (class-conditional models).
            prompt: a prompt or a list of prompts (text-conditioned models).
            num_frames: frames per clip (default: the model's ``config.num_frames``).
            height, width: frame size; must be divisible by the patch size and equal the model's input size.
            num_inference_steps: denoising steps (default: ``default_num_inference_steps``, the model's
                recommendation).
            guidance_scale: classifier-free guidance scale; 1 disables guidance (one forward per step) (default:
                ``default_guidance_scale``, the model's recommendation).
            generator: a torch.Generator, or one per clip, for reproducible noise.
            output_type: "np" (default, as diffusers' video pipelines), "pt" or "pil".
            return_dict: return a :class:`DiTMoEVideoPipelineOutput` (else a tuple).
            return_routing: also return per-layer routing maps [B, F, H/p, W/p].
            max_batch_size: clips per model call (default: the pipeline's ``max_batch_size``, 4); larger
                requests run in chunks. With one generator per clip the clips do not depend on it.
        """
        num_inference_steps, guidance_scale, max_batch_size = self._check_call(
            class_labels, prompt, num_inference_steps, guidance_scale, output_type, max_batch_size)
        config, device = self.transformer.config, self.device
        if class_labels is not None:
            ids = self.get_label_ids(class_labels)
            batch, prompts = len(ids), None
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch, ids = len(prompts), None
        num_frames, height, width = self._check_video_call(num_frames, height, width, generator, batch)

        y = torch.tensor(ids, device=device) if ids is not None else None
        shape = (batch, num_frames, config.in_channels, height, width)
        noise = randn(shape, generator, device, self.dtype)
        frames, routing_maps = self.generate(noise, y, prompts, num_inference_steps, guidance_scale, generator,
                                             max_batch_size, return_routing)
        frames = frames_to_output(frames, output_type)
        if not return_dict:
            return (frames, routing_maps) if return_routing else (frames,)
        return DiTMoEVideoPipelineOutput(frames=frames, routing_maps=routing_maps)

    def _decode(self, sample: torch.Tensor) -> torch.Tensor:
        """Clips [B, F, C, H, W]: a VAE decodes frames, so the clip axis is folded into the batch and back."""
        return super()._decode(sample.flatten(0, 1)).unflatten(0, sample.shape[:2])


def frames_to_output(clips_BFCHW: torch.Tensor, output_type: str):
    """Clips in [-1, 1] -> numpy [B, F, H, W, C] in [0, 1], torch [B, F, C, H, W] in [0, 1], or per clip a list
    of PIL frames."""
    clips = (clips_BFCHW.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return clips.cpu()
    array = clips.permute(0, 1, 3, 4, 2).cpu().numpy()
    if output_type == "np":
        return array
    return [numpy_to_pil(clip) for clip in array]
