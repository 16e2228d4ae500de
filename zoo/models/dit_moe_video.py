"""Spatio-temporal DiT-MoE: DiT-MoE (:mod:`moezoo.zoo.models.dit_moe`) extended from images to short clips.

The recipe is the one video models are usually grown from image models with (Latte, Ma et al. 2024,
arXiv 2401.03048, "variant 1"; VDM/AnimateDiff-style temporal layers): keep every image block and its
weights, and interleave temporal layers that start as the identity.

Tokens are (frame, patch) pairs: each frame is patch-embedded like an image and gets the image model's fixed
2-D sin-cos spatial positions. Each of the ``depth`` layers is::

    x = DiTMoEBlock(x, c)              # spatial attention within a frame + MoE FFN (shared experts), per frame
    x = x + g * TAttn(LN(x) * (1 + scale) + shift + temporal_pos)   # attention across frames, per patch

with ``(shift, scale, g) = Linear(SiLU(c_temporal))`` zero-initialised (adaLN-Zero), so a new temporal layer
adds exactly nothing until it trains: a video model initialised from an image checkpoint
(:meth:`DiTMoEVideo.init_from_image`) first computes the image model on every frame independently. The
temporal positions are a fixed 1-D sin-cos table over frames, added to the temporal attention's input only
(so the spatial path stays exactly the image model's); any number of frames works.

Text models give the temporal layers their own view of the caption: ``c_temporal = c + W_t text_emb`` with
``W_t`` (``temporal_text_embedder``) zero-initialised. Why: grown from an image model, the shared text
projection is pulled by the per-frame (spatial) path to *drop* the motion words (to an image model "left"
means "on the left", which is wrong for most frames of a clip moving left), while the temporal layers, still
near the identity, cannot yet pull the other way; with one shared projection the motion words were erased
and directions came out at chance. The temporal path's own projection keeps them.

``learned_words`` (text models): words the text tower never saw while the image model trained ("up" and
"down" never occur in image captions, so the tower maps "moving up" and "moving down" almost to the same
pooled embedding) each get a learned vector, zero-initialised, that :meth:`DiTMoEVideo.encode_text` adds to
the pooled embedding of every caption containing the word: textual inversion (Gal et al. 2022,
arXiv 2208.01618) in the pooled space, so the words become distinct while the tower itself stays frozen.

``spacetime="full"`` instead runs each DiTMoEBlock's attention over all frames' tokens at once (no temporal
layers; the temporal positions are added to the tokens after patch embedding). It costs ``F`` times more
attention and is not the identity-on-init path from an image checkpoint.

Everything else is the image model's: timestep / text / class conditioning (one ``c`` per clip, broadcast to
its frames), adaLN-Zero, MoE FFNs with shared experts and the expert-balance loss, the final layer, the
rectified-flow and DDPM objectives. Inputs and outputs are clips ``[B, F, C, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from moezoo.zoo.models.dit_moe import Attention, DiTMoE, DiTMoEConfig, checkpoint_filter_fn, modulate
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = ["DiTMoEVideoConfig", "DiTMoEVideo", "TemporalAttentionLayer", "sincos_pos_embed_1d", "SPACETIME"]

SPACETIME = ("factorized", "full")
# State-dict prefixes of what video adds to the image model (initialised to the identity, not loaded from images).
TEMPORAL_PREFIXES = ("temporal_blocks.", "temporal_text_embedder.", "word_vectors")


@dataclass
class DiTMoEVideoConfig(DiTMoEConfig):
    """A :class:`DiTMoEConfig` plus what video adds.

    Attributes:
        num_frames: the clip length the model is trained for (the pipelines' default); the model itself
            accepts any number of frames >= 1.
        spacetime: "factorized" (spatial attention per frame, then temporal attention per patch, in every
            layer) or "full" (one attention over all frames' patches).
        learned_words: words (each one token of the text tower's vocabulary) that get a learned vector added
            to the pooled text embedding of captions containing them (see the module docstring).
    """

    num_frames: int = 8
    spacetime: str = "factorized"
    learned_words: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.spacetime not in SPACETIME:
            raise ValueError(f"unknown spacetime {self.spacetime!r}; accepted: {', '.join(SPACETIME)}")
        self.learned_words = tuple(self.learned_words)
        if self.learned_words and self.text_encoder is None:
            raise ValueError("learned_words needs a text encoder of the model's own (config.text_encoder)")

    def image_config(self) -> DiTMoEConfig:
        """The image DiT-MoE whose weights this video model's non-temporal part shares."""
        image_fields = {f.name for f in fields(DiTMoEConfig)}
        return DiTMoEConfig(**{k: v for k, v in vars(self).items() if k in image_fields})


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """A fixed 1-D sin-cos table ``[length, dim]``: row ``f`` is ``[sin(f w), cos(f w)]`` with
    ``w_i = 10000^(-i / (dim / 2))`` (the 1-D half of DiT's 2-D table, on the whole width)."""
    if dim % 2:
        raise ValueError(f"dim must be even for sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class TemporalAttentionLayer(nn.Module):
    """adaLN-Zero attention across frames: ``x + g * Attn(LN(x) * (1 + scale) + shift + temporal_pos)`` on
    sequences ``[B * patches, F, D]``. Zero-initialised modulation: the identity until trained."""

    def __init__(self, cfg: DiTMoEVideoConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads, qkv_bias=True, qk_norm=cfg.qk_norm)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))

    def forward(self, x_SFD: torch.Tensor, c_SD: torch.Tensor, pos_FD: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c_SD).chunk(3, dim=-1)
        h = modulate(self.norm(x_SFD), shift, scale) + pos_FD
        return x_SFD + gate.unsqueeze(1) * self.attn(h)


class DiTMoEVideo(DiTMoE):
    """A DiT-MoE on clips: ``forward(x [B, F, C, H, W], t [B], y [B], text_emb [B, text_dim]) ->
    [B, F, C_out, H, W]``.

    Its state dict is the image model's (same keys, same shapes) plus ``temporal_blocks.*`` and, for text
    models, ``temporal_text_embedder.*`` (factorized layout), so image checkpoints load into it with
    :meth:`init_from_image`.
    """

    channel_dim = 2  # classifier-free guidance (inherited) splits prediction channels on this axis

    def __init__(self, config: DiTMoEVideoConfig):
        super().__init__(config)
        factorized = config.spacetime == "factorized"
        self.temporal_blocks = nn.ModuleList(
            [TemporalAttentionLayer(config) for _ in range(config.depth)] if factorized else []
        )
        # The temporal layers' own projection of the caption (see the module docstring).
        self.temporal_text_embedder = (nn.Linear(config.text_dim, config.hidden_size)
                                       if factorized and config.text_dim else None)
        self.word_vectors = None
        if config.learned_words:
            self.word_vectors = nn.Parameter(torch.zeros(len(config.learned_words), config.text_dim))
            self.register_buffer("word_token_ids", self._single_token_ids(config.learned_words), persistent=False)
        self._init_temporal()
        self._last_clip_shape: tuple[int, int] | None = None  # (clips, frames) of the last forward, for routing_maps

    def _init_temporal(self) -> None:
        for layer in self.temporal_blocks:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        if self.temporal_text_embedder is not None:
            nn.init.zeros_(self.temporal_text_embedder.weight)
            nn.init.zeros_(self.temporal_text_embedder.bias)
        if self.word_vectors is not None:
            nn.init.zeros_(self.word_vectors)

    def _single_token_ids(self, words: tuple[str, ...]) -> torch.Tensor:
        ids = []
        for word in words:
            tokens = self.text_encoder.tokenize(word)[0]
            tokens = tokens[tokens != 0][1:-1]  # drop padding, then the start and end tokens
            if len(tokens) != 1:
                raise ValueError(f"learned word {word!r} is {len(tokens)} tokens of the text encoder's vocabulary; "
                                 "each learned word must be exactly one token (one lower-case word)")
            ids.append(int(tokens[0]))
        return torch.tensor(ids)

    def encode_text(self, prompts: str | list[str]) -> torch.Tensor:
        """Pooled text embeddings ``[B, text_dim]`` of ``prompts``, plus the learned vector of every
        ``config.learned_words`` word a prompt contains (each counted once)."""
        if self.word_vectors is None:
            return super().encode_text(prompts)
        token_ids = self.text_encoder.tokenize(prompts).to(self.word_vectors.device)
        pooled = self.text_encoder(token_ids)[1]
        contains_BW = (token_ids[:, :, None] == self.word_token_ids).any(1).to(pooled.dtype)
        return pooled + contains_BW @ self.word_vectors.to(pooled.dtype)

    # ------------------------------------------------------------------------------------------ forward

    def _check_clip(self, x: torch.Tensor) -> None:
        size, C = self.config.input_size, self.in_channels
        if x.dim() != 5 or x.shape[2:] != (C, size, size) or x.shape[1] < 1:
            raise ValueError(f"x must be a clip [B, F, {C}, {size}, {size}] with F >= 1 frames, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None,
                text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Predict for noisy clips ``x [B, F, C, H, W]`` at timesteps ``t`` (scalar or [B]), labels ``y [B]``
        and pooled text embeddings ``text_emb [B, text_dim]`` (None: null class / null text). Returns
        ``[B, F, C_out, H, W]``."""
        self._check_clip(x)
        B, Fr = x.shape[:2]
        self._last_clip_shape = (B, Fr)
        c_BD = self.condition(t, y, text_emb, B, x.device)
        c_bD = c_BD.repeat_interleave(Fr, dim=0)  # one condition per frame, b = (clip, frame)
        x_bND = self.x_embedder(x.flatten(0, 1)) + self.pos_embed
        N, D = x_bND.shape[1:]
        pos_FD = sincos_pos_embed_1d(D, Fr).to(x_bND)
        if self.config.spacetime == "full":
            x_BTD = (x_bND.view(B, Fr, N, D) + pos_FD[None, :, None]).reshape(B, Fr * N, D)
            for block in self.blocks:
                x_BTD = block(x_BTD, c_BD)
            x_bND = x_BTD.reshape(B * Fr, N, D)
        else:
            c_SD = self._temporal_condition(c_BD, text_emb).repeat_interleave(N, dim=0)  # S = (clip, patch)
            for block, temporal in zip(self.blocks, self.temporal_blocks):
                x_bND = block(x_bND, c_bD)
                x_SFD = x_bND.view(B, Fr, N, D).transpose(1, 2).reshape(B * N, Fr, D)
                x_SFD = temporal(x_SFD, c_SD, pos_FD)
                x_bND = x_SFD.view(B, N, Fr, D).transpose(1, 2).reshape(B * Fr, N, D)
        out = self.unpatchify(self.final_layer(x_bND, c_bD))
        return out.view(B, Fr, *out.shape[1:])

    def _temporal_condition(self, c_BD: torch.Tensor, text_emb: torch.Tensor | None) -> torch.Tensor:
        """``c + W_t text_emb`` (the null text is zeros, as in :meth:`condition`, which checked the shape)."""
        if self.temporal_text_embedder is None:
            return c_BD
        text_emb = self.text_or_null(text_emb, c_BD.shape[0], c_BD)
        return c_BD + self.temporal_text_embedder(text_emb.to(c_BD.dtype))

    # ------------------------------------------------------------------------------------------ routing

    def routing_maps(self) -> list[torch.Tensor]:
        """Per block, the top-1 expert of every (frame, patch) token of the last forward: int64
        ``[B, F, H/p, W/p]`` (an empty list for the dense counterpart)."""
        if self.config.dense_ffn:
            return []
        if self._last_clip_shape is None:
            raise RuntimeError("no routing recorded yet: run a forward first")
        B, Fr = self._last_clip_shape
        g = self.config.grid_size
        maps = []
        for i, block in enumerate(self.blocks):
            record = block.moe.routing
            if record is None or record.ids_TK.shape[0] != B * Fr * g * g:
                raise RuntimeError(f"block {i}'s routing record is not from the last forward of {B} clips x "
                                   f"{Fr} frames x {g * g} patches")
            maps.append(record.ids_TK[:, 0].reshape(B, Fr, g, g))
        return maps

    # ------------------------------------------------------------------------------------------ training

    def training_loss(self, x0: torch.Tensor, y: torch.Tensor | None = None, text_emb: torch.Tensor | None = None,
                      objective: str | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's losses for clean clips ``x0 [B, F, C, H, W]``: ``(diffusion_loss, aux_loss)``.

        As :meth:`DiTMoE.training_loss`, per clip: one timestep, one condition-dropout draw and noise on
        every frame. ``"rf"``: logit-normal t, ``z_t = (1 - t) x0 + t eps``, target ``eps - x0``; ``"ddpm"``:
        epsilon on DiT's linear schedule."""
        self._check_clip(x0)
        return super().training_loss(x0, y, text_emb, objective=objective, generator=generator)

    # ------------------------------------------------------------------------------------------ from images

    def init_from_image(self, image: DiTMoE | dict[str, torch.Tensor] | str) -> "DiTMoEVideo":
        """Copy an image DiT-MoE's weights into every non-temporal part of this model and reset the temporal
        layers to the identity, so the video model starts as the image model applied to each frame.

        ``image``: a :class:`DiTMoE`, its state dict (ours or the official layout, see
        :func:`checkpoint_filter_fn`), or a zoo name loaded with ``create_model(image, pretrained=True)``.
        The image model must have this model's architecture (``config.image_config()``); a ValueError lists
        the keys that are missing or shaped differently. Returns ``self``.
        """
        state = _image_state_dict(image)
        state = checkpoint_filter_fn(state, self)  # official keys -> ours; raises on keys that fit nothing
        own = self.state_dict()
        missing = [k for k in own if k not in state and not k.startswith(TEMPORAL_PREFIXES)]
        mis_shaped = [f"{k} (image {tuple(v.shape)}, video {tuple(own[k].shape)})"
                      for k, v in state.items() if v.shape != own[k].shape]
        if missing or mis_shaped:
            raise ValueError(
                "the image checkpoint does not fit this video model's image part (build the video model from the "
                f"image model's config): missing {_listed(missing)}, mis-shaped {_listed(mis_shaped)}"
            )
        self.load_state_dict(state, strict=False)
        self._init_temporal()
        return self

    @classmethod
    def from_image_checkpoint(cls, image: DiTMoE | str, **video_options) -> "DiTMoEVideo":
        """A video model with ``image``'s architecture and weights (a :class:`DiTMoE` or a zoo name loaded with
        pretrained weights) plus identity temporal layers. ``video_options``: ``num_frames``, ``spacetime``
        or any other :class:`DiTMoEVideoConfig` field to change."""
        if isinstance(image, str):
            from moezoo.zoo import create_model

            image = create_model(image, pretrained=True)
        if not isinstance(image, DiTMoE) or isinstance(image, DiTMoEVideo):
            raise TypeError(f"image must be an image DiTMoE or a zoo name, got {type(image).__name__}")
        config = DiTMoEVideoConfig(**{**vars(image.config), **video_options})
        return cls(config).to(image.pos_embed.device).init_from_image(image)


def _listed(keys: list[str], shown: int = 5) -> str:
    return "[" + ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "") + "]"


def _image_state_dict(image: DiTMoE | dict[str, torch.Tensor] | str) -> dict[str, torch.Tensor]:
    if isinstance(image, str):
        from moezoo.zoo import create_model

        image = create_model(image, pretrained=True)
    if isinstance(image, DiTMoEVideo):
        raise TypeError("init_from_image takes an image DiT-MoE; this is already a video model")
    if isinstance(image, nn.Module):
        return image.state_dict()
    if isinstance(image, dict):
        return dict(image)
    raise TypeError(f"image must be a DiTMoE, a state dict or a zoo name, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Configs and entrypoints
# ----------------------------------------------------------------------------------------------------------

_CONFIG_FIELDS = tuple(f.name for f in fields(DiTMoEVideoConfig))


def _create(base: DiTMoEVideoConfig, init_from_image: str | None = None, **kwargs) -> DiTMoEVideo:
    unknown = sorted(set(kwargs) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown DiT-MoE video argument(s) {', '.join(unknown)}; valid: init_from_image, "
                        f"{', '.join(_CONFIG_FIELDS)}")
    model = DiTMoEVideo(replace(base, **kwargs))
    if init_from_image is not None:
        model.init_from_image(init_from_image)
    return model


# CI: 8x8 RGB, 4 frames, D=32, 2 layers, 4 experts top-2, the tiny text encoder (pipeline tests need text).
_TEST = DiTMoEVideoConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                          num_experts=4, top_k=2, num_classes=0, learn_sigma=False, text_dim=64,
                          text_encoder="moezoo-text-tiny", num_frames=4)
# Bundled: 32x32 RGB clips of 8 frames in pixel space, patch 4 (64 patches per frame, 512 tokens per clip),
# conditioned on its own tiny CLIP text encoder; the image part has dit_moe_shapes' layout at a smaller width.
_SHAPES_VIDEO = DiTMoEVideoConfig(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                                  mlp_ratio=1.0, num_experts=8, top_k=2, num_shared_experts=2, num_classes=0,
                                  learn_sigma=False, text_dim=64, text_encoder="moezoo-text-tiny", num_frames=8,
                                  time_shift=4.0, learned_words=("left", "right", "up", "down"))

_SHAPES_VIDEO_METADATA = {
    "task": "text-to-video",
    "data": "moezoo.training.video_data.MovingShapesDataModule (training/configs/dit_moe_shapes_video.yaml)",
    "frames": 8,
    "image_size": 32,
    "fps": 8,
}


@register_model(checkpoint_filter=checkpoint_filter_fn)
def test_dit_moe_video(pretrained: bool = False, **kwargs) -> DiTMoEVideo:
    """A tiny text-to-video DiT-MoE for CI: 4 frames of 8x8 RGB, D=32, 2 layers, 4 experts top-2."""
    return _create(_TEST, **kwargs)


@register_model(
    pretrained_cfgs={"moving_shapes": PretrainedCfg(
        file="dit_moe_shapes_video.safetensors",
        sha256="8a8847fdf4259bb623eb933c674e7962ed4541a0869b5bcddd5e4e4e5740d450",
        metadata=_SHAPES_VIDEO_METADATA,
    )},
    checkpoint_filter=checkpoint_filter_fn,
)
def dit_moe_shapes_video(pretrained: bool = False, **kwargs) -> DiTMoEVideo:
    """Text-to-video moving shapes: 8 frames of 32x32 RGB, factorized space-time attention, D=128, 6 layers,
    8 experts top-2 + a shared expert, its own tiny CLIP text encoder (plus learned vectors for the words
    left / right / up / down, see ``learned_words``). ``init_from_image="NAME"`` starts it
    from an image DiT-MoE checkpoint of the same layout (temporal layers as the identity)."""
    return _create(_SHAPES_VIDEO, **kwargs)
