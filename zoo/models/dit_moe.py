"""DiT-MoE: "Scaling Diffusion Transformers to 16 Billion Parameters" (Fei, Fan, Yu, Li, Huang; arXiv
2407.11633; official code feizc/DiT-MoE, weights HF ``feizhengcong/DiT-MoE``).

A DiT (Peebles & Xie 2023) whose MLP is a sparse Mixture-of-Experts. Each block, with ``c = t_emb + y_emb``::

    shift1, scale1, g1, shift2, scale2, g2 = Linear(SiLU(c), 6D).chunk(6)          # adaLN-Zero
    x = x + g1 * Attn(LN(x) * (1 + scale1) + shift1)                                  # LN: no affine, eps 1e-6
    x = x + g2 * MoE (LN(x) * (1 + scale2) + shift2)

    MoE(h) = sum_{j in topk(s, k)} s_j * SwiGLU_j(h) + SwiGLU_shared(h),   s = softmax(W_g h)  (no renorm)

Routed experts have hidden width ``mlp_ratio * D`` (4D), the shared expert ``num_shared_experts * D`` (the
official code hardcodes 2, i.e. one shared SwiGLU of width 2D). Training adds DeepSeekMoE's expert-level
balance loss ``alpha * sum_i f_i P_i`` (alpha 0.01) per MoE layer. Published models: S/B/L/XL/G with patch 2
on 256x256 ImageNet latents (32x32x4, 1000 classes, learned sigma), 8 or 16 experts, top-2.

In this file: :class:`DiTMoEConfig` and the model :class:`DiTMoE`, :func:`checkpoint_filter_fn` for the
official checkpoints, the spatio-temporal extension :class:`DiTMoEVideo` (clips; see "Video" below), and the
registered entrypoints at the bottom. The shared layers (timm's attention and patch embedding, timestep /
label / position embeddings, adaLN modulation) are in :mod:`moezoo.zoo.layers.blocks`; the diffusion
objectives, schedules and samplers in :mod:`moezoo.zoo.diffusion`.

Decisions (where we differ from, or choose among, the official code):

- The MoE FFN is our :class:`moezoo.zoo.layers.MoE` (stacked expert weights, one kernel layer); the
  checkpoint filter stacks the official per-expert ``gate_proj/up_proj/down_proj`` into it.
- ``forward_with_cfg`` guides every one of the ``in_channels`` prediction channels; the official DiT code
  guides only the first 3 (an inherited quirk kept "for exact reproducibility"), which we do not copy. The
  learned-variance channels (``learn_sigma``) come from the conditional branch.
- Condition dropout for classifier-free guidance happens in :meth:`DiTMoE.training_loss`, not inside
  ``forward`` (the official LabelEmbedder drops labels whenever the module is in train mode); ``forward``
  never drops anything. The null class is always in the table (``[num_classes + 1, D]``).
- Text conditioning (ours, for the small text-to-image models): a pooled text embedding ``[B, text_dim]``
  goes through one Linear and is added to ``c`` like the class embedding. A missing / dropped text is a
  zero vector (the projection's bias is then the "null text"). Pooled conditioning is enough for our small
  models; there is no cross-attention. With ``text_encoder`` set (a :class:`moezoo.encoders.text.TextEncoder`
  config name) the model owns that encoder (``model.text_encoder``, in its state dict, trained jointly) and
  ``model.encode_text(prompts)`` gives the pooled embeddings.
- ``config.objective`` records what the weights were trained for ("ddpm" for the released S/B, "rf" for
  XL/G and our small models); pipelines pick their sampler from it, ``training_loss`` defaults to it.
- The released XL/G checkpoints use a flash-attention module with per-head q/k LayerNorm (``attn.Wqkv``,
  ``attn.q_norm``, ``attn.k_norm``, ``attn.out_proj``); the XL/G configs set ``qk_norm=True`` and the filter
  renames those keys. We compute that attention in the model's dtype (the official module casts q, k to fp16).
- ``attention="moh"`` swaps attention for MoH (:class:`moezoo.zoo.layers.moh.MoHAttention`, ours; not in
  DiT-MoE) with ``moh_shared_heads`` always-on heads and ``moh_top_k_heads`` routed heads per token.
- ``dense_ffn=True`` builds the dense counterpart: one SwiGLU of width ``top_k * mlp_ratio * D +
  num_shared_experts * D``, the same active FFN parameters as the MoE (minus the router).
- The model is agnostic of latent space: pipelines wrap a diffusers ``AutoencoderKL`` ("sd-vae-ft-mse",
  latents scaled by the VAE's ``config.scaling_factor``, 0.18215) for the ImageNet configs; the small bundled
  models work in pixel space.
- MoH layers' head-balance coefficient is divided by ``depth`` per layer, so the sum ``total_aux_loss`` takes
  over all routed layers is the official average over MoH layers.
- Objectives (:meth:`DiTMoE.training_loss`): rectified flow as the official ``--rf`` path (logit-normal
  ``t = sigmoid(n)``, ``z_t = (1 - t) x0 + t eps``, target ``v = eps - x0``, ``t`` in [0, 1] fed raw to the
  timestep embedder) and DDPM epsilon-prediction (linear betas 1e-4..0.02 over 1000 steps, integer ``t``,
  MSE on the first ``in_channels`` output channels). With ``learn_sigma`` we do *not* train the variance
  channels (no VLB term): samplers should use a fixed variance.

Video. :class:`DiTMoEVideo` extends DiT-MoE from images to short clips.

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

import math
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels.experts import BACKENDS
from moezoo.zoo.config import check_choice, check_config_types, check_positive
from moezoo.zoo.diffusion import check_objective, training_pair
from moezoo.zoo.layers.blocks import (
    Attention,
    GatedMLP,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)
from moezoo.zoo.layers.moe import MoE
from moezoo.zoo.layers.moh import MoHAttention
from moezoo.zoo.layers.routed import routing_maps, total_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = [
    "DiTMoEConfig",
    "DiTMoE",
    "DiTMoEVideoConfig",
    "DiTMoEVideo",
    "TemporalAttentionLayer",
    "checkpoint_filter_fn",
    "SPACETIME",
]

ATTENTIONS = ("standard", "moh")
SPACETIME = ("factorized", "full")
# State-dict prefixes of what video adds to the image model (initialised to the identity, not loaded from images).
TEMPORAL_PREFIXES = ("temporal_blocks.", "temporal_text_embedder.", "word_vectors")


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DiTMoEConfig:
    """Everything that defines a DiT-MoE architecture (defaults: DiT-MoE-S/2-8E2A).

    Attributes:
        input_size: height = width of the model's input (latent or pixels).
        patch_size: p; the input is cut into (input_size / p)^2 patches.
        in_channels: C; the output has 2C channels with ``learn_sigma``, else C.
        hidden_size, depth, num_heads: D, blocks, attention heads.
        mlp_ratio: routed expert hidden width = ``int(mlp_ratio * D)``.
        num_experts, top_k: routed experts E and experts per token k.
        num_shared_experts: D-wide shared experts, merged into one SwiGLU of width ``num_shared_experts * D``
            that every token uses (official: 2; 0 = none).
        dense_ffn: replace the MoE by a dense SwiGLU of the MoE's active width (the dense baseline).
        num_classes: class labels (0: no label conditioning). The table has one more row, the null class.
        class_dropout_prob: probability of dropping the condition in training (classifier-free guidance).
        learn_sigma: also output C variance channels (kept for the official checkpoints; not trained here).
        text_dim: width of the pooled text embedding to condition on (None: no text conditioning).
        text_encoder: a ``moezoo.encoders.text.TextEncoder`` config name the model owns and encodes prompts
            with (its output width must be ``text_dim``); None: the caller passes ``text_emb``.
        objective: "rf" (rectified flow, v = eps - x0) or "ddpm" (epsilon): what the model is trained for.
        time_shift: rectified flow only: training times ``t`` (logit-normal) are shifted toward noise,
            ``t' = s t / (1 + (s - 1) t)``, and sampling uses the same shift (SD3's resolution-dependent
            shift, Esser et al. 2024, sec. 5.3.2). Inputs with more redundant pixels (large images, clips whose
            frames all show the object) still show the layout at higher noise, so the steps that decide it
            sit closer to ``t = 1``; 1 = no shift.
        attention: "standard" (timm layout) or "moh" (Mixture-of-Head attention).
        qk_norm: per-head LayerNorm of queries and keys (the official XL/G flash-attention checkpoints).
        moh_shared_heads, moh_top_k_heads: MoH's always-on heads and routed heads per token (None: half the
            heads shared, half of the rest routed per token, i.e. 75% of the heads active).
        moh_aux_loss_coef: MoH head-balance loss coefficient (averaged over layers).
        aux_loss_alpha: the MoE expert-level balance loss coefficient (per layer, summed over layers).
        backend: the MoE compute backend ("auto", "torch", "reference", "triton").
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 2
    dense_ffn: bool = False
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    text_dim: int | None = None
    text_encoder: str | None = None
    objective: str = "rf"
    time_shift: float = 1.0
    attention: str = "standard"
    qk_norm: bool = False
    moh_shared_heads: int | None = None
    moh_top_k_heads: int | None = None
    moh_aux_loss_coef: float = 0.01
    aux_loss_alpha: float = 0.01
    backend: str = "auto"

    def __post_init__(self):
        check_config_types(self)
        check_positive(self, ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                              "num_experts", "top_k", "text_dim"))
        check_positive(self, ("num_shared_experts", "num_classes", "moh_shared_heads", "moh_top_k_heads"), least=0)
        if not self.mlp_ratio > 0 or self.expert_hidden < 1:
            raise ValueError(f"DiTMoEConfig.mlp_ratio must make experts at least 1 wide, got {self.mlp_ratio}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) "
                             "x an even head dim")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos positions), got {self.hidden_size}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"need num_classes >= 0 and class_dropout_prob in [0, 1], got "
                             f"{self.num_classes}, {self.class_dropout_prob}")
        check_objective(self.objective)
        check_choice(self, "backend", BACKENDS)
        if not self.time_shift > 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.text_encoder is not None and not self.text_dim:
            raise ValueError(f"text_encoder={self.text_encoder!r} needs text_dim (its output width)")
        check_choice(self, "attention", ATTENTIONS)
        if self.attention == "moh":
            if self.moh_shared_heads is None:
                self.moh_shared_heads = self.num_heads // 2
            if self.moh_top_k_heads is None:
                self.moh_top_k_heads = max(1, (self.num_heads - self.moh_shared_heads) // 2)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def expert_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def shared_hidden(self) -> int:
        return self.num_shared_experts * self.hidden_size

    @property
    def dense_hidden(self) -> int:
        """The dense counterpart's FFN width: the routed experts a token uses plus the shared expert."""
        return self.top_k * self.expert_hidden + self.shared_hidden


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class DiTMoEBlock(nn.Module):
    """adaLN-Zero block: attention (``attn``) and the MoE FFN (``moe``; ``mlp`` for the dense counterpart)."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        if cfg.attention == "moh":
            # coef / depth per layer: the sum over layers is the official average (module docstring)
            self.attn = MoHAttention(D, cfg.num_heads, cfg.moh_shared_heads, cfg.moh_top_k_heads, qkv_bias=True,
                                     qk_norm=cfg.qk_norm, aux_loss_coef=cfg.moh_aux_loss_coef / cfg.depth)
        else:
            self.attn = Attention(D, cfg.num_heads, qkv_bias=True, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        if cfg.dense_ffn:
            self.mlp = GatedMLP(D, cfg.dense_hidden, activation="silu", gated=True)
        else:
            self.moe = MoE(
                D, cfg.expert_hidden, cfg.num_experts, cfg.top_k, expert="swiglu", router="softmax",
                renormalize=False, num_shared_experts=cfg.num_shared_experts, shared_hidden_dim=D,
                aux_loss_coefs={"expert_balance": cfg.aux_loss_alpha} if cfg.aux_loss_alpha > 0 else {},
                backend=cfg.backend,
            )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    @property
    def ffn(self) -> nn.Module:
        return self.mlp if hasattr(self, "mlp") else self.moe

    def forward(self, x_BND: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c_BD).chunk(6, dim=-1)
        x_BND = x_BND + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x_BND), shift1, scale1))
        return x_BND + gate2.unsqueeze(1) * self.ffn(modulate(self.norm2(x_BND), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to ``p * p * out_channels`` values per patch."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BND: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BND), shift, scale))


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class DiTMoE(nn.Module):
    """DiT with Mixture-of-Experts FFNs: ``forward(x [B, C, H, W], t [B], y [B], text_emb [B, text_dim]) ->
    [B, C_out, H, W]`` (``C_out = 2C`` with ``learn_sigma``).

    After every forward, each block's ``blocks[i].moe.routing`` holds what it routed (ids per token with
    ``tokens_shape == (B, N)``, N patches in raster order); :meth:`routing_maps` turns them into pictures.
    """

    #: the channel axis of inputs and outputs ([B, C, H, W]; video models: [B, F, C, H, W]).
    channel_dim = 1

    def __init__(self, config: DiTMoEConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.in_channels, self.out_channels, self.patch_size = cfg.in_channels, cfg.out_channels, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D)  # timm's
        # Fixed sin-cos positions, a frozen Parameter (as DiT) so official checkpoints carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, D), requires_grad=False)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D) if cfg.num_classes else None
        self.text_embedder = nn.Linear(cfg.text_dim, D) if cfg.text_dim else None
        self.text_encoder = None
        if cfg.text_encoder is not None:
            from moezoo.encoders.text import TextEncoder  # open_clip: imported only by text models

            self.text_encoder = TextEncoder(cfg.text_encoder)
            if self.text_encoder.output_dim != cfg.text_dim:
                raise ValueError(f"text_encoder {cfg.text_encoder!r} outputs {self.text_encoder.output_dim} "
                                 f"features, but text_dim is {cfg.text_dim}")
        self.blocks = nn.ModuleList([DiTMoEBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform Linear weights and zero biases (experts too, each expert's
        gate/up/down like its own Linear), sin-cos positions, N(0, 0.02) label table and timestep MLP, and
        zero adaLN modulations and output layer (every block starts as the identity). Routers keep their
        kaiming-uniform init (the official gate is not an nn.Linear). The text encoder keeps open_clip's."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        for name, module in self.named_modules():
            if not name.startswith("text_encoder"):
                basic_init(module)
        D = self.config.hidden_size
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                bound = math.sqrt(6.0 / (block.moe.hidden_dim + D))  # xavier of a [F, D] / [D, F] Linear
                nn.init.uniform_(block.moe.w_in, -bound, bound)
                nn.init.uniform_(block.moe.w_out, -bound, bound)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(D, self.config.grid_size).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------------ forward

    @property
    def null_class(self) -> int:
        """The label id of "no class" (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    def unpatchify(self, x_BNP: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C_out] -> [B, C_out, H, W]; each patch's values are ordered (row, col, channel)."""
        B, p, c, g = x_BNP.shape[0], self.patch_size, self.out_channels, self.config.grid_size
        x = x_BNP.reshape(B, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, c, g * p, g * p)

    def condition(self, t, y: torch.Tensor | None, text_emb: torch.Tensor | None, batch: int,
                  device: torch.device) -> torch.Tensor:
        """The conditioning vector ``c [B, D]``: timestep + class (+ text) embeddings. ``y=None`` is the null
        class; ``text_emb=None`` is the null text (zeros)."""
        t_B = torch.as_tensor(t, device=device)
        if t_B.dim() == 0:
            t_B = t_B.expand(batch)
        if t_B.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t_B.shape)}")
        c_BD = self.t_embedder(t_B)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
            if y.shape != (batch,) or y.dtype.is_floating_point:
                raise ValueError(f"y must be integer class ids of shape [{batch}], got {y.dtype} {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null_class):
                raise ValueError(f"class ids must be in [0, {self.null_class}] ({self.null_class} = null class)")
            c_BD = c_BD + self.y_embedder(y)
        elif y is not None:
            raise ValueError("this model has no class conditioning (num_classes=0) but got labels y")
        if self.text_embedder is not None:
            text_emb = self.text_or_null(text_emb, batch, c_BD)
            if text_emb.shape != (batch, self.config.text_dim):
                raise ValueError(f"text_emb must be the pooled text embedding [{batch}, {self.config.text_dim}], "
                                 f"got {tuple(text_emb.shape)}")
            c_BD = c_BD + self.text_embedder(text_emb.to(c_BD.dtype))
        elif text_emb is not None:
            raise ValueError("this model has no text conditioning (text_dim=None) but got text_emb")
        return c_BD

    def text_or_null(self, text_emb: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``text_emb``, or the null text (zeros ``[batch, text_dim]`` like ``like``) when it is None."""
        return like.new_zeros(batch, self.config.text_dim) if text_emb is None else text_emb

    def encode_text(self, prompts: str | list[str]) -> torch.Tensor:
        """Pooled text embeddings ``[B, text_dim]`` of ``prompts`` from the model's own text encoder (with
        gradients: it trains with the model)."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder (config.text_encoder is None): "
                             + ("pass text_emb [B, text_dim] yourself" if self.text_embedder is not None
                                else "it is not text-conditioned"))
        return self.text_encoder.encode(prompts)[1]

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None,
                text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Predict for noisy inputs ``x [B, C, H, W]`` at timesteps ``t`` (scalar or [B]; DDPM step ids or
        rectified-flow times in [0, 1]), labels ``y [B]`` (None: null class) and pooled text embeddings
        ``text_emb [B, text_dim]`` (None: null text). Returns ``[B, C_out, H, W]``."""
        size, C = self.config.input_size, self.in_channels
        if x.dim() != 4 or x.shape[1:] != (C, size, size):
            raise ValueError(f"x must be [B, {C}, {size}, {size}], got {tuple(x.shape)}")
        c_BD = self.condition(t, y, text_emb, x.shape[0], x.device)
        x_BND = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            x_BND = block(x_BND, c_BD)
        return self.unpatchify(self.final_layer(x_BND, c_BD))

    def forward_with_cfg(self, x: torch.Tensor, t, y: torch.Tensor | None = None, guidance_scale: float = 1.0,
                         text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched pass of ``2B``: ``uncond + s * (cond - uncond)`` on all
        ``in_channels`` prediction channels (not the official first-3-channels quirk); learned-variance
        channels are the conditional ones. The unconditional branch uses the null class and null text."""
        if self.y_embedder is None and self.text_embedder is None:
            raise ValueError("classifier-free guidance needs a class- or text-conditioned model")
        B = x.shape[0]
        t_B = torch.as_tensor(t, device=x.device)
        t_B = t_B.expand(B) if t_B.dim() == 0 else t_B
        y2 = text2 = None
        if self.y_embedder is not None:
            null = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
            y2 = torch.cat([null if y is None else y, null])
        if self.text_embedder is not None:
            null_text = x.new_zeros(B, self.config.text_dim)
            text2 = torch.cat([null_text if text_emb is None else text_emb, null_text])
        out = self.forward(torch.cat([x, x]), torch.cat([t_B, t_B]), y2, text2)
        cond, uncond = out[:B], out[B:]
        C, dim = self.in_channels, self.channel_dim
        pred, pred_uncond = cond.narrow(dim, 0, C), uncond.narrow(dim, 0, C)
        guided = pred_uncond + guidance_scale * (pred - pred_uncond)
        return torch.cat([guided, cond.narrow(dim, C, cond.shape[dim] - C)], dim=dim)

    # ------------------------------------------------------------------------------------------ routing

    def routing_maps(self) -> list[torch.Tensor]:
        """Per routed layer (each block's MoE FFN; with ``attention="moh"`` its MoH attention first), the top-1
        expert of every patch of the last forward: int64 ``[B, H/p, W/p]`` (an empty list for the dense
        counterpart)."""
        g = self.config.grid_size
        return routing_maps(self, grid=(g, g))

    def aux_loss(self) -> torch.Tensor:
        """The auxiliary losses of the last forward: MoE expert balance (each layer weighted by
        ``aux_loss_alpha``, summed over layers, as the official code) + MoH head balance (averaged over layers)."""
        return total_aux_loss(self).to(self.pos_embed.device)

    # ------------------------------------------------------------------------------------------ training

    def training_loss(self, x0: torch.Tensor, y: torch.Tensor | None = None, text_emb: torch.Tensor | None = None,
                      objective: str | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's losses for clean inputs ``x0 [B, C, H, W]`` (latents or pixels):
        ``(diffusion_loss, aux_loss)``; optimise their sum.

        The condition (label and text together) is dropped with probability ``class_dropout_prob`` per
        sample. ``objective`` (default: ``config.objective``): ``"rf"``, rectified flow (logit-normal t,
        shifted by ``config.time_shift``, target ``eps - x0``), or ``"ddpm"``, epsilon-prediction on DiT's
        linear schedule. Only the first ``in_channels`` output channels are trained. ``generator`` makes t, noise and dropout reproducible.
        """
        objective = check_objective(self.config.objective if objective is None else objective)
        B, C = x0.shape[0], self.in_channels
        if self.config.class_dropout_prob > 0 and (y is not None or text_emb is not None):
            draw_device = generator.device if generator is not None else x0.device
            drop_B = torch.rand((B,), generator=generator, device=draw_device).to(x0.device) < self.config.class_dropout_prob
            if y is not None and self.y_embedder is not None:
                y = torch.where(drop_B, torch.full_like(y, self.null_class), y)
            if text_emb is not None:
                text_emb = text_emb.masked_fill(drop_B[:, None], 0.0)
        z_t, t_B, target = training_pair(x0, objective, time_shift=self.config.time_shift, generator=generator)
        prediction = self(z_t, t_B, y, text_emb).narrow(self.channel_dim, 0, C)
        return F.mse_loss(prediction, target), self.aux_loss()

    # ------------------------------------------------------------------------------------------ sizes

    def num_parameters(self, active: bool = False) -> int:
        """All parameters (incl. the frozen positions), or those one token uses: only ``top_k`` of each
        MoE's ``num_experts`` routed experts count (router and shared expert always do)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.blocks:
                if isinstance(block.ffn, MoE):
                    moe = block.moe
                    expert_params = sum(p.numel() for p in (moe.w_in, moe.w_out, moe.b_in, moe.b_out) if p is not None)
                    total -= expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
        return total


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------

_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_RENAMES = (  # official -> ours, on the part after "blocks.{i}."
    (re.compile(r"^moe\.gate\.weight$"), "moe.router.weight"),
    (re.compile(r"^moe\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$"), r"moe.shared.\1.weight"),
    (re.compile(r"^attn\.Wqkv\.(weight|bias)$"), r"attn.qkv.\1"),
    (re.compile(r"^attn\.out_proj\.(weight|bias)$"), r"attn.proj.\1"),
)
_CONTAINERS = ("model", "ema")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DiTMoE) -> dict[str, torch.Tensor]:
    """Map an official DiT-MoE state dict (``models.py: DiT``; S/B timm attention or the XL/G flash-attention
    variant) onto ``model``'s keys; our own keys pass unchanged.

    Unwraps a ``train.py`` checkpoint ``{"model", "ema", "opt", "args"}`` (``"model"`` first, as
    ``moezoo.zoo.hub.load_checkpoint``; a dict with only ``"ema"`` gives that). Per block: ``moe.gate`` ->
    ``moe.router``; ``moe.experts.{e}.gate_proj/up_proj`` -> rows of ``moe.w_in[e]`` (gate rows, then up rows),
    ``down_proj`` -> ``moe.w_out[e]``; ``moe.shared_experts`` -> ``moe.shared``; ``attn.Wqkv`` / ``attn.out_proj``
    -> ``attn.qkv`` / ``attn.proj`` (``q_norm``/``k_norm`` keep their names: build with ``qk_norm=True``).

    Raises ValueError listing every key that maps to nothing in ``model`` (strict), or naming the experts
    that are incomplete.
    """
    for container in _CONTAINERS:
        if isinstance(state_dict.get(container), dict):
            state_dict = state_dict[container]
            break
    model_keys = model.state_dict().keys()
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    leftovers = []
    for key, value in state_dict.items():
        match = _EXPERT_KEY.match(key)
        if match:
            block, expert, proj = int(match[1]), int(match[2]), match[3]
            experts.setdefault(block, {}).setdefault(expert, {})[proj] = value
            continue
        new_key = key
        block_match = re.match(r"^(blocks\.\d+\.)(.*)$", key)
        if block_match:
            prefix, rest = block_match.groups()
            for pattern, repl in _RENAMES:
                if pattern.match(rest):
                    new_key = prefix + pattern.sub(repl, rest)
                    break
        if new_key in model_keys:
            out[new_key] = value
        else:
            leftovers.append(key)

    for block, by_expert in sorted(experts.items()):
        prefix = f"blocks.{block}.moe."
        if prefix + "w_in" not in model_keys:
            leftovers.extend(f"{prefix}experts.{e}.*" for e in sorted(by_expert))
            continue
        num_experts = model.state_dict()[prefix + "w_in"].shape[0]
        incomplete = [e for e in range(num_experts) if len(by_expert.get(e, {})) != 3]
        extra = [e for e in by_expert if e >= num_experts]
        if incomplete or extra:
            raise ValueError(f"block {block}: the checkpoint's experts do not fit the model's {num_experts}: "
                             f"incomplete {incomplete}, beyond the model's range {sorted(extra)}")
        ordered = [by_expert[e] for e in range(num_experts)]
        out[prefix + "w_in"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]], dim=0) for p in ordered])
        out[prefix + "w_out"] = torch.stack([p["down_proj"] for p in ordered])

    if leftovers:
        hint = ""
        if any(".q_norm." in k or ".k_norm." in k for k in leftovers):
            hint = (" The checkpoint has per-head q/k LayerNorm (the flash-attention XL/G variant): "
                    "build with qk_norm=True.")
        raise ValueError(f"{len(leftovers)} checkpoint key(s) map to nothing in {type(model).__name__}: "
                         f"{', '.join(leftovers[:10])}{' ...' if len(leftovers) > 10 else ''}.{hint}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Video: the spatio-temporal extension (module docstring, "Video")
# ----------------------------------------------------------------------------------------------------------


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
        check_positive(self, ("num_frames",))
        check_choice(self, "spacetime", SPACETIME)
        if self.learned_words and self.text_encoder is None:
            raise ValueError("learned_words needs a text encoder of the model's own (config.text_encoder)")

    def image_config(self) -> DiTMoEConfig:
        """The image DiT-MoE whose weights this video model's non-temporal part shares."""
        image_fields = {f.name for f in fields(DiTMoEConfig)}
        return DiTMoEConfig(**{k: v for k, v in vars(self).items() if k in image_fields})


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
            with torch.device("cpu"):  # token ids are data, also when the model is built on the meta device
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
        """Per routed layer, the top-1 expert of every (frame, patch) token of the last forward: int64
        ``[B, F, H/p, W/p]`` (an empty list for the dense counterpart)."""
        if self._last_clip_shape is None:
            raise RuntimeError("no routing recorded yet: run a forward first")
        g = self.config.grid_size
        return routing_maps(self, grid=(self._last_clip_shape[1], g, g))

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

_CONFIG_FIELDS = tuple(f.name for f in fields(DiTMoEConfig))


def _create(base: DiTMoEConfig, **kwargs) -> DiTMoE:
    unknown = sorted(set(kwargs) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown DiT-MoE argument(s) {', '.join(unknown)}; valid: {', '.join(_CONFIG_FIELDS)}")
    return DiTMoE(replace(base, **kwargs))


# The paper's models: 256x256 ImageNet in sd-vae latents (32x32x4), 1000 classes, learned sigma, patch 2.
# Released S/B weights are DDPM (epsilon) models; XL/G are rectified-flow models with flash attention + q/k norm.
_S = DiTMoEConfig(depth=12, hidden_size=384, num_heads=6, objective="ddpm")
_B = DiTMoEConfig(depth=12, hidden_size=768, num_heads=12, objective="ddpm")
_L = DiTMoEConfig(depth=24, hidden_size=1024, num_heads=16, objective="ddpm")
_XL = DiTMoEConfig(depth=28, hidden_size=1152, num_heads=16, qk_norm=True, objective="rf")
_G = DiTMoEConfig(depth=40, hidden_size=1408, num_heads=16, qk_norm=True, objective="rf")

# CI: a few thousand parameters, 16 tokens.
_TEST = DiTMoEConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_experts=4, top_k=2,
                     num_classes=10)
# Our bundled models, pixel space, 8x8 patch grids (64 tokens: quick on CPU). ~4M parameters (16 MB fp32).
# digits: sklearn's 8x8 digits upsampled to 16x16, 1 channel, 10 classes.
_DIGITS = DiTMoEConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                       mlp_ratio=1.0, num_experts=8, top_k=2, num_shared_experts=2, num_classes=10,
                       learn_sigma=False)
# shapes: 32x32 RGB, conditioned on the pooled embedding of its own "moezoo-text-tiny" text encoder (64 wide;
# 3.3M parameters, 3.2M of them CLIP's 49408-token embedding table; bundled in fp16 to stay under 20 MB).
_SHAPES = replace(_DIGITS, input_size=32, patch_size=4, in_channels=3, num_classes=0, text_dim=64,
                  text_encoder="moezoo-text-tiny")

_FILTER = dict(checkpoint_filter=checkpoint_filter_fn)


@register_model(**_FILTER)
def dit_moe_s_2_8e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    """DiT-MoE-S/2-8E2A: 199M parameters, 72M active."""
    return _create(replace(_S, num_experts=8), **kwargs)


@register_model(**_FILTER)
def dit_moe_s_2_16e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_S, num_experts=16), **kwargs)


@register_model(**_FILTER)
def dit_moe_b_2_8e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_B, num_experts=8), **kwargs)


@register_model(**_FILTER)
def dit_moe_b_2_16e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_B, num_experts=16), **kwargs)


@register_model(**_FILTER)
def dit_moe_l_2_8e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_L, num_experts=8), **kwargs)


@register_model(**_FILTER)
def dit_moe_l_2_16e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_L, num_experts=16), **kwargs)


@register_model(**_FILTER)
def dit_moe_xl_2_8e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_XL, num_experts=8), **kwargs)


@register_model(**_FILTER)
def dit_moe_xl_2_16e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_XL, num_experts=16), **kwargs)


@register_model(**_FILTER)
def dit_moe_g_2_8e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    return _create(replace(_G, num_experts=8), **kwargs)


@register_model(**_FILTER)
def dit_moe_g_2_16e2a(pretrained: bool = False, **kwargs) -> DiTMoE:
    """DiT-MoE-G/2-16E2A: the paper's 16.5B-parameter model."""
    return _create(replace(_G, num_experts=16), **kwargs)


@register_model(**_FILTER)
def test_dit_moe(pretrained: bool = False, **kwargs) -> DiTMoE:
    """A tiny DiT-MoE for CI: 8x8x4 input, D=32, 2 blocks, 4 experts top-2, 10 classes."""
    return _create(_TEST, **kwargs)


_DIGIT_NAMES = [str(d) for d in range(10)]

# The pipelines' defaults for the bundled models ("sampling" in their metadata, read by DiTMoEPipeline), chosen
# from `python bench/dit_quality.py sweep` (README, "Measured") to meet issue 19's goals: diversity >= 0.8x real
# and recall >= 0.6 with >= 95% of the samples judged right. Digits, Euler 25 steps: guidance 1.25 gives both
# models 99.2% right, recall 83-86%, diversity 0.95x (guidance 1 falls under 95% right; 2 under 0.6 recall).
_DIGITS_SAMPLING = {"scheduler": "flow_match_euler", "num_inference_steps": 25, "guidance_scale": 1.25}
# Shapes (the 6000-step weights, 1000 prompts): guidance 1.5 has the lowest FD (15.9) with 98.6% right, recall 73%
# and diversity 0.99x; 1.25 and 2-2.5 are 98.2-98.7% right at FD 17.4-22.2, 1 falls to 95.8%, 3-4 lose recall
# (52-56%).
_SHAPES_SAMPLING = {"scheduler": "flow_match_euler", "num_inference_steps": 25, "guidance_scale": 1.5}


def _bundled(file: str, sha256: str, **metadata) -> dict:
    """The ``pretrained_cfgs`` of a model whose weights ship in zoo/weights/ (trained by training/configs/)."""
    return {"pretrained_cfgs": {"default": PretrainedCfg(file=file, sha256=sha256, metadata={"objective": "rf", **metadata})}}


@register_model(**_FILTER, **_bundled(
    "dit_moe_digits.safetensors", "875bcc0f0df85907e0bbf0ece263dc57618abd67813394db557a9458b2b0ff17",
    label_names=_DIGIT_NAMES, sampling=_DIGITS_SAMPLING))
def dit_moe_digits(pretrained: bool = False, **kwargs) -> DiTMoE:
    """Class-conditional 16x16 digits in pixel space: D=128, 6 blocks, 8 experts top-2 + a 2D shared expert."""
    return _create(_DIGITS, **kwargs)


@register_model(**_FILTER, **_bundled(
    "dit_dense_digits.safetensors", "1423ac6233074196e94f1364a038039813132e61b4bcb71d9f6c89c4f5e13fbd",
    label_names=_DIGIT_NAMES, sampling=_DIGITS_SAMPLING))
def dit_dense_digits(pretrained: bool = False, **kwargs) -> DiTMoE:
    """The dense counterpart of dit_moe_digits: one SwiGLU of width 2*128 + 256 = 512 per block, the same
    active parameters (the MoE-vs-dense comparison)."""
    return _create(replace(_DIGITS, dense_ffn=True), **kwargs)


@register_model(**_FILTER, **_bundled(
    "dit_moe_shapes.safetensors", "e6c689e1b90f7524e63b4db99c44f88e088848573a3ca8d104c5bdf2ddee1bf7",
    sampling=_SHAPES_SAMPLING))
def dit_moe_shapes(pretrained: bool = False, **kwargs) -> DiTMoE:
    """Text-conditioned 32x32 RGB shapes in pixel space (patch 4), with its own tiny CLIP text encoder."""
    return _create(_SHAPES, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Video entrypoints
# ----------------------------------------------------------------------------------------------------------

_VIDEO_CONFIG_FIELDS = tuple(f.name for f in fields(DiTMoEVideoConfig))


def _create_video(base: DiTMoEVideoConfig, init_from_image: str | None = None, **kwargs) -> DiTMoEVideo:
    unknown = sorted(set(kwargs) - set(_VIDEO_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown DiT-MoE video argument(s) {', '.join(unknown)}; valid: init_from_image, "
                        f"{', '.join(_VIDEO_CONFIG_FIELDS)}")
    model = DiTMoEVideo(replace(base, **kwargs))
    if init_from_image is not None:
        model.init_from_image(init_from_image)
    return model


# CI: 8x8 RGB, 4 frames, D=32, 2 layers, 4 experts top-2, the tiny text encoder (pipeline tests need text).
_TEST_VIDEO = DiTMoEVideoConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
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
    "data": "moezoo.training.datamodules.video.MovingShapesDataModule (training/configs/dit_moe_shapes_video.yaml)",
    "frames": 8,
    "image_size": 32,
    "fps": 8,
    # The setting bench/video_quality.py measures (README, "Measured"): direction 100%, colour 100%, recall 67%,
    # diversity 1.08x real. Not swept.
    "sampling": {"scheduler": "flow_match_euler", "num_inference_steps": 30, "guidance_scale": 4.0},
}


@register_model(**_FILTER)
def test_dit_moe_video(pretrained: bool = False, **kwargs) -> DiTMoEVideo:
    """A tiny text-to-video DiT-MoE for CI: 4 frames of 8x8 RGB, D=32, 2 layers, 4 experts top-2."""
    return _create_video(_TEST_VIDEO, **kwargs)


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
    return _create_video(_SHAPES_VIDEO, **kwargs)
