"""DeweatherPipeline: photographs with rain, raindrops, snow or haze -> restored photographs, with MoFME.

    from moezoo.pipelines import DeweatherPipeline
    pipe = DeweatherPipeline.from_pretrained("mofme_weather")          # bundled weights, no network
    out = pipe(Image.open("rainy.jpg"), return_routing=True)
    out.images[0].save("clear.png")
    out.routing_maps[0][0]      # layer 0, image 0: int [ceil(H/p), ceil(W/p)], the top-1 expert of each patch

Any image size and any number of images work: images are restored one after another, ``tile_batch_size``
tiles per model call (16 by default), so the model's activations grow with neither the photo nor the number
of photos. Each image is cut into ``tile_size`` tiles that overlap by ``tile_overlap`` pixels, each tile is
restored on its own, and the tiles are blended back with weights that ramp linearly across the overlaps (no
seams). The image is padded on the bottom/right edge up to a whole number of tiles, and tiles start on multiples of ``tile_size - tile_overlap`` (a multiple of the
patch size), so every tile's patches lie on one global patch grid and the routing maps stitch exactly: each
patch takes the expert chosen in the tile where it lies furthest inside. An image smaller than a tile is
restored as one tile of its own size (rounded up to whole patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import IMAGE_INPUTS, Pipeline, check_output_type, image_to_tensor, to_output

# For models without a recommended tile size: 256 px tiles, what bench/mofme_compare.py found best for
# mofme_weather (64 px tiles, its training crop size, score 2.4 dB lower: too little context).
DEFAULT_TILE_SIZE = 256


@dataclass
class DeweatherPipelineOutput:
    """One entry per input image.

    ``images``: a list of PIL images ("pil"), float32 numpy arrays [H, W, 3] in [0, 1] ("np") or float32
    tensors [3, H, W] in [0, 1] ("pt"), each the size of its input.
    ``routing_maps``: when asked for, a list over MoE layers of lists over images of int64 arrays
    [ceil(H/p), ceil(W/p)]: the top-1 expert of every patch (empty for a model without MoE layers).
    """

    images: list
    routing_maps: list[list[np.ndarray]] | None = None


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: ``0, stride, 2 stride, ...`` until the tiles cover ``size``."""
    count = 1 if size <= tile else math.ceil((size - tile) / stride) + 1
    return [i * stride for i in range(count)]


def blend_window(tile: int | tuple[int, int], overlap: int) -> torch.Tensor:
    """[h, w] blending weights for a ``tile`` (side, or (h, w)): 1 inside, ramping linearly (never to 0) across
    ``overlap`` px at each edge."""
    h, w = (tile, tile) if isinstance(tile, int) else tile
    return _ramp(h, overlap)[:, None] * _ramp(w, overlap)[None, :]


def _ramp(length: int, overlap: int) -> torch.Tensor:
    if overlap == 0:
        return torch.ones(length)
    centres = torch.arange(length, dtype=torch.float32) + 0.5
    return torch.minimum(torch.ones(length), torch.minimum(centres, length - centres) / overlap)


class DeweatherPipeline(Pipeline):
    """Deweathering with a :class:`moezoo.zoo.models.mofme.MoFME` (or one of its baselines), tile by tile."""

    _modules = ("model",)

    def __init__(self, model, default_tile_size: int | None = None):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model.config, "patch_size"):
            raise ValueError("DeweatherPipeline needs a MoFME-family model (with config.patch_size)")
        self.model = model.eval()
        self.default_tile_size = default_tile_size or DEFAULT_TILE_SIZE
        self.freeze()

    @classmethod
    def from_pretrained(cls, name: str = "mofme_weather", *, cache_dir=None, local_files_only: bool = False,
                        device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        **model_overrides) -> "DeweatherPipeline":
        """A zoo model with its weights: ``name``, ``name.tag``, ``local-dir:PATH`` or ``hf-hub:org/repo``.
        Bundled weights (``mofme_weather``) load offline."""
        from moezoo.zoo import create_model

        model = create_model(name, pretrained=True, cache_dir=cache_dir, local_files_only=local_files_only,
                             **model_overrides)
        metadata = getattr(getattr(model, "pretrained_cfg", None), "metadata", None) or {}
        return cls(model, metadata.get("tile_size")).to(device, torch_dtype)

    def _check_tiling(self, tile_size, tile_overlap) -> tuple[int, int]:
        p = self.model.config.patch_size
        if not isinstance(tile_size, int) or tile_size < p or tile_size % p:
            raise ValueError(f"tile_size must be a positive multiple of the patch size {p}, got {tile_size!r}")
        if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile_size or tile_overlap % p:
            raise ValueError(f"tile_overlap must be a multiple of the patch size {p} in [0, tile_size={tile_size}), "
                             f"got {tile_overlap!r}")
        return tile_size, tile_overlap

    @torch.no_grad()
    def __call__(
        self,
        image,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        output_type: str = "pil",
        return_routing: bool = False,
        tile_batch_size: int = 16,
        return_dict: bool = True,
    ):
        """Restore one image or a list of images.

        Args:
            image: a PIL image (RGB or L), numpy [H, W, 3] / [H, W] (uint8, or float in [0, 1]), torch
                [3, H, W] float in [0, 1], or a list of these (sizes may differ).
            tile_size: tile side in pixels, a multiple of the patch size (default: the model's recommended
                size, its metadata ``tile_size``: 256 for mofme_weather). Larger tiles see more context (which
                tells a clean bright sky from haze) and cost more memory. An image smaller than a tile is
                restored as one tile of its own size.
            tile_overlap: pixels shared by neighbouring tiles, a multiple of the patch size, < tile_size
                (default: an eighth of the tile, rounded down to whole patches; 32 for 256 px tiles).
            output_type: "pil", "np" or "pt".
            return_routing: also return the per-layer maps of the top-1 expert of every patch.
            tile_batch_size: tiles restored per model call.
            return_dict: a :class:`DeweatherPipelineOutput`, else the tuple ``(images, routing_maps)``.
        """
        tile_size = tile_size or self.default_tile_size
        if tile_overlap is None and isinstance(tile_size, int):
            p = self.model.config.patch_size
            tile_overlap = tile_size // 8 // p * p
        tile, overlap = self._check_tiling(tile_size, tile_overlap)
        check_output_type(output_type)
        if not isinstance(tile_batch_size, int) or tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be a positive integer, got {tile_batch_size!r}")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError(f"got an empty list; expected {IMAGE_INPUTS}")
        tensors = [image_to_tensor(im) for im in images]
        restored, routing = [], []
        for tensor in tensors:
            out, maps = self._restore(tensor, tile, overlap, tile_batch_size, return_routing)
            restored.append(to_output(out[None] * 2 - 1, output_type)[0])
            routing.append(maps)
        # per image, per layer -> per layer, per image
        routing_maps = [list(layer) for layer in zip(*routing)] if return_routing else None
        if not return_dict:
            return restored, routing_maps
        return DeweatherPipelineOutput(images=restored, routing_maps=routing_maps)

    def _restore(self, image_CHW: torch.Tensor, tile: int, overlap: int, tile_batch_size: int,
                 return_routing: bool) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One image [3, H, W] -> (restored [3, H, W] in [0, 1], per-layer routing maps)."""
        _, H, W = image_CHW.shape
        p, stride = self.model.config.patch_size, tile - overlap
        # An image smaller than a tile is one tile of its own size (rounded up to whole patches), not padded
        # out to the full tile: padding would be most of what the model sees.
        th, tw = min(tile, math.ceil(H / p) * p), min(tile, math.ceil(W / p) * p)
        ys, xs = tile_starts(H, th, stride), tile_starts(W, tw, stride)
        Hp, Wp = ys[-1] + th, xs[-1] + tw
        padded = _pad_bottom_right(image_CHW, Hp - H, Wp - W)
        window = blend_window((th, tw), overlap)
        patch_weight = F.avg_pool2d(window[None, None], p)[0, 0]  # how far inside the tile each patch lies
        out = torch.zeros(3, Hp, Wp)
        weight_sum = torch.zeros(Hp, Wp)
        best_weight = torch.zeros(Hp // p, Wp // p)
        maps: list[torch.Tensor] = []
        positions = [(y, x) for y in ys for x in xs]
        batches = range(0, len(positions), tile_batch_size)
        bar_options = {"disable": True} if len(positions) <= tile_batch_size else {}  # no bar for one model call
        for start in self.progress_bar(batches, desc="tiles", **bar_options):
            chunk = positions[start : start + tile_batch_size]
            tiles = torch.stack([padded[:, y : y + th, x : x + tw] for y, x in chunk])
            pred = self.model(tiles.to(self.device, self.dtype)).float().cpu().clamp(0, 1)
            layer_maps = [m.cpu() for m in self.model.routing_maps()] if return_routing and self.model.has_routing else []
            if not maps:
                maps = [torch.zeros(Hp // p, Wp // p, dtype=torch.long) for _ in layer_maps]
            for i, (y, x) in enumerate(chunk):
                out[:, y : y + th, x : x + tw] += pred[i] * window
                weight_sum[y : y + th, x : x + tw] += window
                py, px, gh, gw = y // p, x // p, th // p, tw // p
                inside = patch_weight > best_weight[py : py + gh, px : px + gw]
                for full, layer in zip(maps, layer_maps):
                    full[py : py + gh, px : px + gw][inside] = layer[i][inside]
                best_weight[py : py + gh, px : px + gw] = torch.maximum(best_weight[py : py + gh, px : px + gw],
                                                                        patch_weight)
        restored = (out / weight_sum)[:, :H, :W].clamp(0, 1)
        h, w = math.ceil(H / p), math.ceil(W / p)
        return restored, [m[:h, :w].numpy() for m in maps]


def _pad_bottom_right(image_CHW: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad to a whole number of tiles: mirror the image where it is big enough, else repeat its edge."""
    if pad_h == 0 and pad_w == 0:
        return image_CHW
    _, H, W = image_CHW.shape
    mode = "reflect" if pad_h < H and pad_w < W else "replicate"
    return F.pad(image_CHW[None], (0, pad_w, 0, pad_h), mode=mode)[0]
