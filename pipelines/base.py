"""What every moezoo pipeline shares: device/dtype moves, the progress bar, seeds, and output conversion.

Pipelines follow diffusers' conventions: ``from_pretrained``, one ``__call__`` with the same argument names
everywhere (``num_inference_steps``, ``guidance_scale``, ``generator``, ``output_type``, ``return_dict``),
CPU float32 by default, noise drawn from the caller's CPU generators so a seed gives the same picture on any
device, and a tqdm progress bar that ``set_progress_bar_config(disable=True)`` turns off.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from moezoo.zoo.layers import freeze, unfreeze

OUTPUT_TYPES = ("pil", "np", "pt")
IMAGE_INPUTS = "a PIL image (mode RGB or L), a numpy array [H, W, 3] or [H, W], a torch tensor [3, H, W], or a list of them"


class Pipeline:
    """Base class: subclasses list their torch modules in ``_modules`` and implement ``__call__``."""

    _modules: tuple[str, ...] = ()

    def __init__(self):
        self._progress_bar_config: dict = {}

    @property
    def device(self) -> torch.device:
        """Where the first of the pipeline's models lives (CPU when it has none)."""
        parameter = self._first_parameter()
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        parameter = self._first_parameter()
        return parameter.dtype if parameter is not None else torch.float32

    def _first_parameter(self) -> torch.Tensor | None:
        modules = self._torch_modules()
        return next(modules[0].parameters()) if modules else None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        for module in self._torch_modules():
            module.to(device=device, dtype=dtype)
        return self.freeze()  # moved weights are new tensors: pack them again

    def freeze(self) -> "Pipeline":
        """Prepare the pipeline's models for inference on fixed weights: every routed block packs its expert
        weights once (:func:`moezoo.zoo.layers.freeze`; the pipelines call this when built and after ``to``).
        A weight changed in place or reloaded is noticed and computed on live; after an edit through ``.data``
        call :meth:`unfreeze` (or ``freeze`` again)."""
        for module in self._torch_modules():
            freeze(module)
        return self

    def unfreeze(self) -> "Pipeline":
        """Undo :meth:`freeze`: the models compute on their live weights."""
        for module in self._torch_modules():
            unfreeze(module)
        return self

    def _torch_modules(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, name, None) for name in self._modules) if isinstance(m, torch.nn.Module)]

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising bar, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable, **kwargs):
        return tqdm(iterable, **{**self._progress_bar_config, **kwargs})


def check_generators(generator, batch_size: int) -> None:
    """A list of generators must give one generator per output (diffusers' rule)."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch_size} outputs; pass one generator per "
            "output, or a single generator"
        )


def checked_num_inference_steps(num_inference_steps) -> int:
    """A number of denoising steps: a positive integer (bool and floats refused)."""
    if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    return int(num_inference_steps)


def checked_guidance_scale(guidance_scale) -> float:
    """A classifier-free guidance scale: a finite real number >= 0 (bool, strings, None, NaN and inf refused)."""
    if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
            or not math.isfinite(guidance_scale) or guidance_scale < 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), "
                         f"got {guidance_scale!r}")
    return float(guidance_scale)


def checked_max_batch_size(max_batch_size) -> int:
    """Samples per model call: a positive integer (bool refused)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, numbers.Integral) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer (samples per model call), got {max_batch_size!r}")
    return int(max_batch_size)


def chunk_slices(batch_size: int, max_batch_size: int) -> list[slice]:
    """``[0, batch_size)`` cut into consecutive slices of at most ``max_batch_size``."""
    return [slice(start, min(start + max_batch_size, batch_size)) for start in range(0, batch_size, max_batch_size)]


def generator_part(generator, part: slice):
    """The generators of the samples in ``part``: a slice of a per-sample list, a single generator as it is."""
    return generator[part] if isinstance(generator, list) else generator


def randn(shape: tuple[int, ...], generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generators' device (CPU by default) then moved, one generator per sample
    when a list is given: the same seed gives the same noise on every device."""
    if isinstance(generator, list):
        samples = [randn((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(samples)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)


def to_output(images_BCHW: torch.Tensor, output_type: str):
    """Images in [-1, 1] -> PIL list, numpy [B, H, W, C] float in [0, 1], or a torch tensor [B, C, H, W] in [0, 1]."""
    images = (images_BCHW.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return numpy_to_pil(array)


def numpy_to_pil(array_BHWC: np.ndarray) -> list[Image.Image]:
    uint8 = (array_BHWC * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in uint8]
    return [Image.fromarray(image) for image in uint8]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; accepted: {', '.join(OUTPUT_TYPES)}")


def image_to_tensor(image) -> torch.Tensor:
    """One image -> float32 [3, H, W] in [0, 1]; greyscale becomes grey RGB. ValueError for anything else."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            raise ValueError(f"PIL image mode {image.mode!r} is not supported; accepted: RGB, L "
                             "(convert first, e.g. image.convert('RGB'))")
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"a numpy image must be [H, W, 3] (RGB) or [H, W] (grey), got shape {image.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        else:
            raise ValueError(f"a numpy image must be uint8 (0..255) or float (0..1), got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.dtype.is_floating_point:
            raise ValueError(f"a torch image must be a float tensor [3, H, W] in [0, 1], got {image.dtype} "
                             f"{tuple(image.shape)}")
        tensor = image.detach().float().cpu()
    else:
        raise ValueError(f"expected {IMAGE_INPUTS}; got {type(image).__name__}")
    if min(tensor.shape[1:]) < 1:
        raise ValueError(f"the image is empty: {tuple(tensor.shape[1:])} pixels")
    if not bool(torch.isfinite(tensor).all()) or tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
        raise ValueError("float images must hold finite values in [0, 1] (uint8 arrays may use 0..255)")
    return tensor.clamp(0, 1).contiguous()
