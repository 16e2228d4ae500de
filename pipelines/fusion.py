"""FusionPipeline: a registered infrared + visible pair -> one fused image, plus which experts fused each region.

    from moezoo.pipelines import FusionPipeline
    pipe = FusionPipeline.from_pretrained("moe_fusion_irvis")
    out = pipe(infrared_image, visible_image, return_routing=True)
    out.images[0].save("fused.png")
    out.routing_maps   # per MoE layer, int [B, h, w]: the top-1 expert of every gate cell

The network fuses one channel: the infrared image and the visible image's luminance (BT.601 Y). A colour
visible image gets its colour back — the fused luminance with the visible image's chroma (YCbCr), the usual
practice of infrared/visible fusion — and a greyscale one gives a greyscale result.

Inputs are PIL images or numpy arrays (uint8 / uint16, or float in [0, 1]; [H, W] or [H, W, C]), or lists of
them for a batch (fused ``max_batch_size`` pairs per model call). Nothing is resized or guessed: a pair must
have the same size, the infrared image one channel (or three equal ones, as infrared frames saved as RGB have),
the visible image one or three; anything else raises a ValueError that says what was wrong and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .base import Pipeline, check_output_type, checked_max_batch_size, chunk_slices, to_output

__all__ = ["FusionPipeline", "FusionPipelineOutput", "rgb_to_ycbcr", "ycbcr_to_rgb"]

MIN_SIZE = 8


@dataclass
class FusionPipelineOutput:
    """``images``: PIL list ("L" for greyscale visible inputs, else "RGB"), numpy [B, H, W, C] in [0, 1], or
    torch [B, C, H, W] in [0, 1]. ``routing_maps``: when asked for, per MoE layer an int array [B, h, w], the
    top-1 expert of every gate decision — for MoE-Fusion the foreground MoLE and background MoLE (one entry
    per ``local_cell`` cell; experts below half read the visible image, the rest the infrared) and the MoGE
    decoder ([B, 1, 1]: one choice per image). ``routing_layers`` names those layers in the same order."""

    images: list | np.ndarray | torch.Tensor
    routing_maps: list[np.ndarray] | None = None
    routing_layers: list[str] | None = None


def rgb_to_ycbcr(rgb_BCHW: torch.Tensor) -> torch.Tensor:
    """Full-range (JPEG) BT.601 YCbCr of RGB in [0, 1]; chroma centred on 0.5."""
    r, g, b = rgb_BCHW.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(ycbcr_BCHW: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_ycbcr`."""
    y, cb, cr = ycbcr_BCHW.unbind(1)
    r = y + 1.402 * (cr - 0.5)
    g = y - 0.344136 * (cb - 0.5) - 0.714136 * (cr - 0.5)
    b = y + 1.772 * (cb - 0.5)
    return torch.stack([r, g, b], 1)


def _image_to_array(image, name: str) -> np.ndarray:
    """One PIL image or numpy array -> float32 [H, W, C] in [0, 1], C in (1, 3, or what was given)."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA"):
            raise ValueError(
                f"{name} has an alpha channel (PIL mode {image.mode!r}); pass it without transparency, e.g. "
                f"image.convert('RGB') or image.convert('L')"
            )
        if image.mode == "P":
            image = image.convert("RGB")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit frames (thermal cameras): 0..65535
            array = np.asarray(image, dtype=np.float64)
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(f"{name} is a PIL {image.mode!r} image with values outside 0..65535; "
                                 "accepted: 8-bit ('L', 'RGB') or 16-bit greyscale")
            return (array / 65535.0).astype(np.float32)[..., None]
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"{name} has PIL mode {image.mode!r}; accepted: 'L', 'RGB', 'P', 'I;16', 'I' (16-bit)")
        array = np.asarray(image, dtype=np.float32) / 255.0
    elif isinstance(image, np.ndarray):
        array = _numpy_to_unit(image, name)
    else:
        raise TypeError(f"{name} must be a PIL image or a numpy array (or a list of them), got {type(image).__name__}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [H, W, C], got shape {array.shape}")
    return array


def _numpy_to_unit(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"a float {name} must hold finite values in [0, 1], got range [{array.min()}, {array.max()}]")
    return array.astype(np.float32)


def _infrared_channel(array: np.ndarray, name: str) -> np.ndarray:
    """The one channel of an infrared image: [H, W, 1] as is, [H, W, 3] only if the three are equal."""
    channels = array.shape[-1]
    if channels == 3 and np.abs(array - array[..., :1]).max() <= 1 / 255:
        return array[..., :1]  # a greyscale frame stored as RGB (LLVIP's infrared JPEGs are)
    if channels != 1:
        detail = "three different colour channels" if channels == 3 else f"{channels} channels"
        raise ValueError(
            f"{name} has {detail}; an infrared image must be single-channel: [H, W], [H, W, 1], PIL 'L', or "
            f"greyscale stored as three equal channels (convert a pseudo-coloured thermal picture to grey first)"
        )
    return array


def _visible_channels(array: np.ndarray, name: str) -> np.ndarray:
    if array.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name} has {array.shape[-1]} channels; a visible image must be greyscale (1 channel) or RGB (3)"
        )
    return array


def _as_list(images, name: str) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name} is an empty list; pass at least one image")
        return list(images)
    return [images]


class FusionPipeline(Pipeline):
    """Infrared/visible fusion with a zoo fusion model (:class:`moezoo.zoo.models.moe_fusion.MoEFusion`).

    A batch of more than ``max_batch_size`` pairs (default 4) is fused in chunks of that many, so the network's
    activations stay bounded: about 2 KB per pixel of a pair for ``moe_fusion_irvis`` in fp32 (120 MB at
    256x256, 760 MB at 640x640). Each pair's result does not depend on the chunking. Set it per pipeline
    (``pipe.max_batch_size = 1`` for large images) or per call.
    """

    _modules = ("model",)
    max_batch_size: int = 4

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        name: str = "moe_fusion_irvis",
        *,
        cache_dir=None,
        local_files_only: bool = False,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        **model_overrides,
    ) -> "FusionPipeline":
        """Load a zoo fusion model with its weights (``name``, ``name.tag``, ``local-dir:PATH``, ``hf-hub:...``)."""
        from moezoo.zoo import create_model

        model = create_model(
            name, pretrained=True, cache_dir=cache_dir, local_files_only=local_files_only, **model_overrides
        )
        return cls(model).to(device, torch_dtype)

    def prepare_pairs(self, infrared_image, visible_image) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the inputs: (infrared [B, 1, H, W], visible [B, 1 or 3, H, W]) float in [0, 1]."""
        infrared_list = _as_list(infrared_image, "infrared_image")
        visible_list = _as_list(visible_image, "visible_image")
        if len(infrared_list) != len(visible_list):
            raise ValueError(
                f"got {len(infrared_list)} infrared and {len(visible_list)} visible images; pass one of each per pair"
            )
        infrared_arrays, visible_arrays = [], []
        for i, (ir, vis) in enumerate(zip(infrared_list, visible_list)):
            which = f" (pair {i})" if len(infrared_list) > 1 else ""
            ir = _infrared_channel(_image_to_array(ir, "infrared_image" + which), "infrared_image" + which)
            vis = _visible_channels(_image_to_array(vis, "visible_image" + which), "visible_image" + which)
            if ir.shape[:2] != vis.shape[:2]:
                raise ValueError(
                    f"infrared_image{which} is {ir.shape[1]}x{ir.shape[0]} but visible_image is "
                    f"{vis.shape[1]}x{vis.shape[0]} (width x height): a pair must be registered to the same size; "
                    f"this pipeline does not resize or crop"
                )
            if min(ir.shape[:2]) < MIN_SIZE:
                raise ValueError(
                    f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {ir.shape[1]}x{ir.shape[0]}"
                )
            if infrared_arrays and ir.shape[:2] != infrared_arrays[0].shape[:2]:
                raise ValueError(
                    f"all pairs of one call must share a size: pair 0 is {infrared_arrays[0].shape[1]}x"
                    f"{infrared_arrays[0].shape[0]}, pair {i} is {ir.shape[1]}x{ir.shape[0]}; call once per size"
                )
            infrared_arrays.append(ir)
            visible_arrays.append(vis)
        colour = any(v.shape[-1] == 3 for v in visible_arrays)
        if colour:
            visible_arrays = [np.repeat(v, 3, -1) if v.shape[-1] == 1 else v for v in visible_arrays]

        def stack(arrays):
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device, self.dtype)

        return stack(infrared_arrays), stack(visible_arrays)

    @torch.no_grad()
    def __call__(
        self,
        infrared_image,
        visible_image,
        output_type: str = "pil",
        return_dict: bool = True,
        return_routing: bool = False,
        max_batch_size: int | None = None,
    ):
        """Fuse registered pairs.

        Args:
            infrared_image: a PIL image or numpy array, or a list of them (one per pair).
            visible_image: the same, registered to it (same size); greyscale or RGB.
            output_type: "pil", "np" or "pt".
            return_dict: return a :class:`FusionPipelineOutput` (else a tuple).
            return_routing: also return per-layer routing maps.
            max_batch_size: pairs per model call (default: the pipeline's ``max_batch_size``, 4).
        """
        check_output_type(output_type)
        max_batch_size = checked_max_batch_size(self.max_batch_size if max_batch_size is None else max_batch_size)
        infrared, visible = self.prepare_pairs(infrared_image, visible_image)
        colour = visible.shape[1] == 3
        ycbcr = rgb_to_ycbcr(visible) if colour else None
        luma = ycbcr[:, :1] if colour else visible
        fused, maps = [], []
        for part in chunk_slices(len(infrared), max_batch_size):
            fused.append(self.model(infrared[part], luma[part]).clamp(0, 1))
            if return_routing:
                maps.append([m.cpu() for m in self.model.routing_maps()])
        fused = torch.cat(fused)
        if colour:
            fused = ycbcr_to_rgb(torch.cat([fused, ycbcr[:, 1:]], 1)).clamp(0, 1)
        images = to_output(fused * 2 - 1, output_type)  # to_output takes [-1, 1]
        routing_maps = routing_layers = None
        if return_routing:
            routing_maps = [torch.cat(layer).numpy() for layer in zip(*maps)]
            routing_layers = self.model.routing_layer_names()
        if not return_dict:
            return (images, routing_maps) if return_routing else (images,)
        return FusionPipelineOutput(images=images, routing_maps=routing_maps, routing_layers=routing_layers)
