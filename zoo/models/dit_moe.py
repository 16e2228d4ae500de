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

In this file: :class:`DiTMoEConfig`, the model :class:`DiTMoE`, the two training objectives (DDPM
epsilon-prediction and rectified flow), :func:`checkpoint_filter_fn` for the official checkpoints, and the
registered entrypoints at the bottom.

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
  latents scaled by 0.18215) for the ImageNet configs; the small bundled models work in pixel space.
- Objectives (:meth:`DiTMoE.training_loss`): rectified flow as the official ``--rf`` path (logit-normal
  ``t = sigmoid(n)``, ``z_t = (1 - t) x0 + t eps``, target ``v = eps - x0``, ``t`` in [0, 1] fed raw to the
  timestep embedder) and DDPM epsilon-prediction (linear betas 1e-4..0.02 over 1000 steps, integer ``t``,
  MSE on the first ``in_channels`` output channels). With ``learn_sigma`` we do *not* train the variance
  channels (no VLB term): samplers should use a fixed variance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.zoo.layers.moe import GatedMLP, MoE, total_aux_loss
from moezoo.zoo.layers.moh import MoHAttention, moh_aux_loss
from moezoo.zoo.registry import PretrainedCfg, register_model

__all__ = [
    "DiTMoEConfig",
    "DiTMoE",
    "checkpoint_filter_fn",
    "ddpm_alphas_cumprod",
    "DDPM_NUM_TIMESTEPS",
    "LATENT_SCALING_FACTOR",
]

ATTENTIONS = ("standard", "moh")
OBJECTIVES = ("rf", "ddpm")
DDPM_NUM_TIMESTEPS = 1000
LATENT_SCALING_FACTOR = 0.18215  # sd-vae-ft-mse latents, as DiT / DiT-MoE


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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; accepted: {', '.join(OBJECTIVES)}")
        if not self.time_shift > 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.text_encoder is not None and not self.text_dim:
            raise ValueError(f"text_encoder={self.text_encoder!r} needs text_dim (its output width)")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; accepted: {', '.join(ATTENTIONS)}")
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


def modulate(x_BND: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BND * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """DiT's (MAE's) fixed 2-D sin-cos position table ``[grid^2, dim]``, rows in raster order. The first half
    of the channels encodes the column, the second the row; each half is ``[sin(pos w), cos(pos w)]`` with
    ``w_i = 10000^(-i / (dim / 4))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)(W/p), D] by a p x p stride-p convolution (timm's PatchEmbed layout)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar (integer or fractional) timesteps -> [B, D]: sinusoidal features ``[cos, sin]`` of width 256
    (max period 10000), then Linear-SiLU-Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
        args = t_B.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t_B, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class ids -> [B, D]; id ``num_classes`` is the null class (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_B)


class Attention(nn.Module):
    """Multi-head self-attention in timm's layout (``qkv [3D, D]``: q, k, v rows, heads contiguous; ``proj``),
    with optional per-head q/k LayerNorm (eps 1e-6, as the official flash-attention variant)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o_BHNd = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(o_BHNd.transpose(1, 2).reshape(B, N, D))


class DiTMoEBlock(nn.Module):
    """adaLN-Zero block: attention (``attn``) and the MoE FFN (``moe``; ``mlp`` for the dense counterpart)."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        if cfg.attention == "moh":
            self.attn = MoHAttention(D, cfg.num_heads, cfg.moh_shared_heads, cfg.moh_top_k_heads, qkv_bias=True,
                                     qk_norm=cfg.qk_norm, aux_loss_coef=cfg.moh_aux_loss_coef)
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


def ddpm_alphas_cumprod(num_timesteps: int = DDPM_NUM_TIMESTEPS, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """DiT's linear DDPM schedule (float64): ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, betas linear from
    ``beta_start * 1000 / T`` to ``beta_end * 1000 / T`` (diffusers: ``DDPMScheduler(beta_schedule="linear")``)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Rectified-flow time shifted toward noise: ``s t / (1 + (s - 1) t)`` (0 and 1 stay put; diffusers'
    FlowMatchEulerDiscreteScheduler(shift=s) shifts its sigmas the same way)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU generators give the same numbers everywhere), then moved."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


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
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
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
        """Per block, the top-1 expert of every patch of the last forward: int64 ``[B, H/p, W/p]`` (an empty
        list for the dense counterpart)."""
        if self.config.dense_ffn:
            return []
        g = self.config.grid_size
        maps = []
        for i, block in enumerate(self.blocks):
            record = block.moe.routing
            if record is None:
                raise RuntimeError("no routing recorded yet: run a forward first")
            B, N = record.tokens_shape
            if N != g * g:
                raise RuntimeError(f"block {i} routed {N} tokens per sample, expected {g * g} patches")
            maps.append(record.ids_TK[:, 0].reshape(B, g, g))
        return maps

    def aux_loss(self) -> torch.Tensor:
        """The auxiliary losses of the last forward: MoE expert balance (summed over layers, each weighted by
        ``aux_loss_alpha``, as the official code) + MoH head balance (averaged over layers)."""
        device = self.pos_embed.device
        return total_aux_loss(self).to(device) + moh_aux_loss(self).to(device)

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
        objective = self.config.objective if objective is None else objective
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
        B, C = x0.shape[0], self.in_channels
        if self.config.class_dropout_prob > 0 and (y is not None or text_emb is not None):
            drop_B = _rand((B,), generator, x0) < self.config.class_dropout_prob
            if y is not None and self.y_embedder is not None:
                y = torch.where(drop_B, torch.full_like(y, self.null_class), y)
            if text_emb is not None:
                text_emb = text_emb.masked_fill(drop_B[:, None], 0.0)
        noise = _randn(x0.shape, generator, x0)
        per_sample = (B,) + (1,) * (x0.dim() - 1)  # one t per image (or per clip: every frame shares it)
        if objective == "rf":
            t_B = shift_time(torch.sigmoid(_randn((B,), generator, x0)), self.config.time_shift)
            t_bc = t_B.view(per_sample)
            z_t = (1 - t_bc) * x0 + t_bc * noise
            target = noise - x0
        else:
            t_B = torch.randint(0, DDPM_NUM_TIMESTEPS, (B,), generator=generator,
                                device=generator.device if generator is not None else x0.device).to(x0.device)
            alpha_bar = ddpm_alphas_cumprod().to(x0.device)[t_B].view(per_sample).to(x0.dtype)
            z_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            target = noise
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


def _bundled(file: str, sha256: str, **metadata) -> dict:
    """The ``pretrained_cfgs`` of a model whose weights ship in zoo/weights/ (trained by training/configs/)."""
    return {"pretrained_cfgs": {"default": PretrainedCfg(file=file, sha256=sha256, metadata={"objective": "rf", **metadata})}}


@register_model(**_FILTER, **_bundled(
    "dit_moe_digits.safetensors", "875bcc0f0df85907e0bbf0ece263dc57618abd67813394db557a9458b2b0ff17",
    label_names=_DIGIT_NAMES))
def dit_moe_digits(pretrained: bool = False, **kwargs) -> DiTMoE:
    """Class-conditional 16x16 digits in pixel space: D=128, 6 blocks, 8 experts top-2 + a 2D shared expert."""
    return _create(_DIGITS, **kwargs)


@register_model(**_FILTER, **_bundled(
    "dit_dense_digits.safetensors", "1423ac6233074196e94f1364a038039813132e61b4bcb71d9f6c89c4f5e13fbd",
    label_names=_DIGIT_NAMES))
def dit_dense_digits(pretrained: bool = False, **kwargs) -> DiTMoE:
    """The dense counterpart of dit_moe_digits: one SwiGLU of width 2*128 + 256 = 512 per block, the same
    active parameters (the MoE-vs-dense comparison)."""
    return _create(replace(_DIGITS, dense_ffn=True), **kwargs)


@register_model(**_FILTER, **_bundled(
    "dit_moe_shapes.safetensors", "f46006dec9ffbe8f4986b855c6ab20b1241166b42083b2e65acce8b378654d06"))
def dit_moe_shapes(pretrained: bool = False, **kwargs) -> DiTMoE:
    """Text-conditioned 32x32 RGB shapes in pixel space (patch 4), with its own tiny CLIP text encoder."""
    return _create(_SHAPES, **kwargs)
