"""Building blocks the model families share: attention, MLPs, patch / timestep / label / position embeddings
and adaLN modulation.

Where timm or diffusers has the identical piece it is theirs: attention, patch embedding and the plain MLP
are timm's (the official DiT-MoE code imports the same three from timm, so official checkpoints' keys match),
the sinusoidal timestep features and sin-cos position tables are diffusers'. What is here is only what
neither has in the layout the official checkpoints use (DiT's ``t_embedder.mlp.0/2``, a label table with a
null row that never drops labels by itself) or what the experts need (``GatedMLP.as_shared_expert``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import (
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)
from timm.layers import Mlp, PatchEmbed
from timm.layers import Attention as _TimmAttention
from timm.layers.pos_embed_sincos import apply_rot_embed

from moezoo.kernels.experts import SharedExpert, activation_fn

__all__ = [
    "Attention",
    "CausalSelfAttention",
    "causal_attention",
    "KVCache",
    "Rotary",
    "multimodal_rotary",
    "GatedMLP",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "modulate",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
]


class Attention(_TimmAttention):
    """timm's multi-head self-attention (``qkv [3D, D]``: q, k, v rows, heads contiguous; ``proj``), with the
    per-head q/k LayerNorm at eps 1e-6 (the official DiT-MoE flash-attention variant's) and always on
    ``scaled_dot_product_attention`` (timm reads an environment switch otherwise)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.fused_attn = True


@dataclass
class KVCache:
    """The keys and values a causal attention layer has seen so far, ``[B, H, S, head_dim]`` each (None before
    the first step). Generation keeps one per layer and feeds one new position at a time."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = k_BHSd, v_BHSd
        else:
            self.keys = torch.cat([self.keys, k_BHSd], dim=2)
            self.values = torch.cat([self.values, v_BHSd], dim=2)
        return self.keys, self.values


@dataclass
class Rotary:
    """Rotary position tables of the new positions, ``sin``/``cos`` ``[B or 1, S, head_dim]`` in the rotate-half
    layout (each frequency's angle in both halves of the head, as LLaMA and Qwen2-VL store them)."""

    sin: torch.Tensor
    cos: torch.Tensor

    def rotate(self, x_BHSd: torch.Tensor) -> torch.Tensor:
        return apply_rot_embed(x_BHSd, self.sin[:, None], self.cos[:, None], half=True)


def multimodal_rotary(position_ids_3BS: torch.Tensor, head_dim: int, theta: float = 10000.0) -> Rotary:
    """M-RoPE (Qwen2-VL, arXiv 2409.12191): a position is three ids (temporal, height, width); the head's
    ``head_dim / 2`` frequencies ``theta^(-2i / head_dim)`` fall in three sections in that order (a quarter
    temporal, the rest halved between height and width, as Qwen2-VL's 16/24/24 of 64), each section rotated by
    its own id. A text token carries one id three times, which is plain 1-D RoPE; an image token the grid's
    row and column, so attention sees 2-D offsets between patches."""
    if head_dim % 4:
        raise ValueError(f"M-RoPE needs a head width divisible by 4, got {head_dim}")
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    section = torch.cat([torch.zeros(temporal), torch.ones(height), torch.full((half - temporal - height,), 2)]).long()
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    ids = position_ids_3BS.to(torch.float64)
    angles_BSF = (ids[section.to(ids.device)] * inv_freq.to(ids.device)[:, None, None]).permute(1, 2, 0)
    angles = torch.cat([angles_BSF, angles_BSF], dim=-1).float()
    return Rotary(angles.sin(), angles.cos())


def causal_attention(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor,
                     cache: KVCache | None = None, rotary: Rotary | None = None) -> torch.Tensor:
    """Causal attention of the new positions: each attends to itself, the new positions before it and everything
    ``cache`` holds (which takes the new keys and values first). The same result as one pass over the whole
    sequence. ``rotary``: the new positions' rotary tables, applied to queries and keys before the cache keeps
    the keys."""
    if rotary is not None:
        q_BHSd, k_BHSd = rotary.rotate(q_BHSd), rotary.rotate(k_BHSd)
    past = 0 if cache is None else cache.length
    if cache is not None:
        k_BHSd, v_BHSd = cache.append(k_BHSd, v_BHSd)
    if past == 0:
        return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, is_causal=True)
    S = q_BHSd.shape[2]  # new position i (absolute past + i) sees keys 0 .. past + i
    visible_SK = torch.ones(S, past + S, dtype=torch.bool, device=q_BHSd.device).tril(past)
    return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=visible_SK)


class CausalSelfAttention(nn.Module):
    """Decoder self-attention in timm's layout (``qkv``, ``proj``): each position attends to itself and the
    positions before it. With a :class:`KVCache`, the new positions also attend to everything the cache holds
    (incremental decoding: the same result as one forward over the whole sequence).

    ``qk_norm``: RMS-normalise each head's queries and keys (Chameleon's QK-norm): the logits' scale no longer
    follows the residual stream's, which a block that normalises only its outputs leaves unnormalised."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | None = None, rotary: Rotary | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).reshape(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o_BHSd = causal_attention(q, k, v, cache, rotary)
        return self.proj(o_BHSd.transpose(1, 2).reshape(B, S, D))


class GatedMLP(nn.Module):
    """A dense (gated) MLP in the experts' layout: the shared expert, and the dense baseline at equal active
    width (``gate_proj``, ``up_proj``, ``down_proj``, as HF's MoE shared experts)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", gated: bool = True, bias: bool = False):
        super().__init__()
        self.activation, self.gated = activation, gated
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = activation_fn(self.activation)
        h = act(self.gate_proj(x)) * self.up_proj(x) if self.gated else act(self.up_proj(x))
        return self.down_proj(h)

    def as_shared_expert(self, scale_T: torch.Tensor | None = None) -> SharedExpert:
        """This MLP in ``expert_mlp``'s shared-expert layout (gate rows, then up rows), differentiable back to
        the three Linear weights."""
        if any(layer is not None and layer.bias is not None for layer in (self.gate_proj, self.up_proj, self.down_proj)):
            raise ValueError("a shared expert is bias-free; this GatedMLP has biases")
        w_in = torch.cat([self.gate_proj.weight, self.up_proj.weight]) if self.gated else self.up_proj.weight
        return SharedExpert(w_in, self.down_proj.weight, scale_T, self.activation)


def modulate(x_BND: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x (1 + scale) + shift``, one shift/scale per sample broadcast over its tokens."""
    return x_BND * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar (integer or fractional) timesteps -> [B, D]: sinusoidal features ``[cos, sin]`` of width 256
    (max period 10000; diffusers' ``get_timestep_embedding`` with DiT's settings), then Linear-SiLU-Linear
    (``mlp.0``, ``mlp.2``: the official DiT keys)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        return get_timestep_embedding(t_B.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0,
                                      max_period=max_period)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t_B, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class ids -> [B, D]; id ``num_classes`` is the null class (classifier-free guidance). Label dropout is
    the training module's job, not the layer's (diffusers' ``LabelEmbedding`` drops by itself in training)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_B)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """DiT's (MAE's) fixed 2-D sin-cos position table ``[grid^2, dim]`` (float32), rows in raster order: the
    first half of the channels encodes the column, the second the row (diffusers' table at its own scale,
    ``base_size = grid_size``)."""
    return get_2d_sincos_pos_embed(dim, grid_size, base_size=grid_size, output_type="pt").float()


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """A fixed 1-D sin-cos table ``[length, dim]`` (float32): row ``f`` is ``[sin(f w), cos(f w)]`` with
    ``w_i = 10000^(-i / (dim / 2))``."""
    if dim % 2:
        raise ValueError(f"dim must be even for sin-cos positions, got {dim}")
    positions = torch.arange(length, dtype=torch.float64)
    return get_1d_sincos_pos_embed_from_grid(dim, positions, output_type="pt").float()
