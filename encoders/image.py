"""Image encoders: a vision tower that turns pictures into a sequence of patch tokens for a connector.

:class:`ImageEncoder` wraps any timm model (``timm.create_model``: ViTs, ConvNeXts, ... with random weights, or
with the user's weights through ``pretrained=True`` / ``checkpoint_path=``, which timm reads weights-only) or the
visual tower of an open_clip model (:meth:`ImageEncoder.from_open_clip`):

- input: float ``[B, 3, H, W]`` in [-1, 1] (every moezoo dataset's range); the encoder maps it to the tower's
  own normalisation (its ``mean`` / ``std``: ImageNet's or CLIP's for pretrained towers, 0.5 / 0.5 for ours, so
  that ours see [-1, 1] unchanged);
- output: ``[B, N, C]`` patch tokens from the tower's last (or ``layer``-th) block, class and register tokens
  removed (LLaVA reads the patch tokens of the second-to-last layer: ``layer=-2``); a CNN's final feature map
  ``[B, C, h, w]`` becomes ``h * w`` tokens in row-major order.

Our small configs (:data:`IMAGE_CONFIGS`) are timm ViTs sized for the 64 x 64 scenes, trained here.
"""

from __future__ import annotations

import os

import timm
import torch
import torch.nn as nn

__all__ = ["ImageEncoder", "IMAGE_CONFIGS", "TINY_IMAGE_MODEL"]

TINY_IMAGE_MODEL = "moezoo-vit-tiny"
# name -> (timm architecture, overrides): 64 px, patches of 8 -> 64 tokens of width 128.
IMAGE_CONFIGS: dict[str, tuple[str, dict]] = {
    TINY_IMAGE_MODEL: ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                                    class_token=True, global_pool="token")),
}
_OWN_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [-1, 1] in, unchanged


class ImageEncoder(nn.Module):
    """A timm (or open_clip) vision tower returning patch tokens ``[B, N, C]`` (see the module docstring).

    Args:
        name: one of :data:`IMAGE_CONFIGS`, or any ``timm.list_models()`` name.
        pretrained: timm's pretrained weights for ``name`` (from the Hub or timm's cache; the user's to have).
        checkpoint_path: a local weights file for the tower (safetensors, or a pickle read weights-only).
        layer: the block whose output is read (-1: the last, after the final norm; -2: the one before, ...).
        **timm_kwargs: overrides of the timm config (``img_size``, ``depth``, ...).
    """

    def __init__(self, name: str = TINY_IMAGE_MODEL, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike | None = None, layer: int = -1, **timm_kwargs) -> None:
        super().__init__()
        own = name in IMAGE_CONFIGS
        if not own and not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown image encoder {name!r}: neither one of ours ({', '.join(IMAGE_CONFIGS)}) nor a "
                             f"timm model{'; timm has e.g. ' + ', '.join(close) if close else ''}")
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint_path {os.fspath(checkpoint_path)!r} is not a file")
        architecture, overrides = IMAGE_CONFIGS[name] if own else (name, {})
        self.name = name
        self.tower = timm.create_model(architecture, pretrained=pretrained and not own, num_classes=0,
                                       checkpoint_path=os.fspath(checkpoint_path) if checkpoint_path else "",
                                       **{**overrides, **timm_kwargs})
        config = timm.data.resolve_data_config({}, model=self.tower)
        mean, std = _OWN_MEAN_STD if own else (config["mean"], config["std"])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.layer = self._checked_layer(layer)
        # timm's data config gives the pretrained config's size (224 for a ViT made at 64 px): the patch embedding
        # knows the size the tower was built for.
        built_for = getattr(getattr(self.tower, "patch_embed", None), "img_size", None)
        self.input_size = tuple(built_for) if built_for is not None else tuple(config["input_size"][1:])

    def _checked_layer(self, layer: int) -> int:
        depth = len(self.tower.blocks) if hasattr(self.tower, "blocks") else None
        if layer == -1:
            return -1
        if depth is None:
            raise ValueError(f"layer={layer}: only the last layer (-1) can be read from {self.name!r} (no .blocks)")
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for {self.name!r}, got {layer}")
        return layer

    @property
    def dim(self) -> int:
        return self.tower.num_features

    @property
    def num_prefix_tokens(self) -> int:
        return getattr(self.tower, "num_prefix_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = ((images + 1) / 2 - self.mean) / self.std
        if self.layer == -1:
            features = self.tower.forward_features(x)
        else:
            features = self.tower.forward_intermediates(x, indices=[self.layer % len(self.tower.blocks)],
                                                        intermediates_only=True, output_fmt="NLC")[0]
            return features  # forward_intermediates already drops the prefix tokens
        if features.dim() == 4:  # a CNN's map [B, C, h, w] -> h*w tokens
            return features.flatten(2).transpose(1, 2)
        return features[:, self.num_prefix_tokens:]

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None) -> "ImageEncoder":
        """The visual tower of an open_clip model (``pretrained``: an open_clip tag or a weights file), returning
        its patch tokens."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained)
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder.name = model_name
        encoder.tower = _OpenClipVisual(model.visual)
        mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
        encoder.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        encoder.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        encoder.layer = -1
        size = model.visual.image_size
        encoder.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return encoder


class _OpenClipVisual(nn.Module):
    """open_clip's VisionTransformer with ``output_tokens``: the patch tokens (after ln_post) as features."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if not hasattr(visual, "output_tokens"):
            raise ValueError(f"{type(visual).__name__} has no patch-token output (open_clip ViT towers only)")
        visual.output_tokens = True
        self.visual = visual
        self.num_features = visual.transformer.width
        self.num_prefix_tokens = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(x)
        return tokens
