"""Connectors: encoder tokens (image patches, audio frames) -> tokens in the language model's width.

- :func:`mlp_projector`: LLaVA-1.5's ``mlp2x_gelu`` (Linear(C_enc, D) - GELU - Linear(D, D)), one output token
  per input token; it is timm's ``Mlp``.
- :class:`QueryResampler`: a fixed number of learned queries cross-attend to the encoder tokens (the resampler of
  Flamingo / Qwen-VL, one layer by default), so any number of encoder tokens becomes ``num_queries`` tokens.

The MoE connector (MoCHA) is a routed block and lives with them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

__all__ = ["mlp_projector", "QueryResampler"]


def mlp_projector(in_dim: int, out_dim: int) -> Mlp:
    """LLaVA-1.5's projector: ``Linear(in_dim, out_dim) -> GELU -> Linear(out_dim, out_dim)`` (biases on)."""
    return Mlp(in_dim, hidden_features=out_dim, out_features=out_dim, act_layer=nn.GELU)


class QueryResampler(nn.Module):
    """``num_queries`` learned queries attend to the encoder tokens (keys and values: the tokens projected to
    ``out_dim`` and layer-normed; Qwen-VL's resampler without its 2-D position embedding, which the encoder's
    tokens already carry), then an optional MLP, each with a residual; ``depth`` such layers.

    ``forward(tokens [B, N, C_enc], mask [B, N] bool or None) -> [B, num_queries, out_dim]``; ``mask`` marks the
    real tokens (padding of variable-length audio is ignored by the attention).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 16, num_heads: int = 4, depth: int = 1,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"out_dim {out_dim} must be divisible by num_heads {num_heads}")
        if min(in_dim, out_dim, num_queries, num_heads, depth) < 1:
            raise ValueError("in_dim, out_dim, num_queries, num_heads and depth must be >= 1")
        self.num_heads, self.num_queries = num_heads, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.layers = nn.ModuleList(_CrossAttentionLayer(out_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens_BNC: torch.Tensor, mask_BN: torch.Tensor | None = None) -> torch.Tensor:
        if tokens_BNC.dim() != 3:
            raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens_BNC.shape)}")
        if mask_BN is not None and (mask_BN.shape != tokens_BNC.shape[:2] or mask_BN.dtype != torch.bool):
            raise ValueError(f"mask must be bool [B, N] = {tuple(tokens_BNC.shape[:2])}, got {mask_BN.dtype} "
                             f"{tuple(mask_BN.shape)}")
        if mask_BN is not None and not mask_BN.any(-1).all():
            raise ValueError("every item needs at least one real (unmasked) token")
        kv_BND = self.kv_proj(tokens_BNC)
        q_BQD = self.queries.expand(tokens_BNC.shape[0], -1, -1)
        for layer in self.layers:
            q_BQD = layer(q_BQD, kv_BND, mask_BN)
        return self.norm_out(q_BQD)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU) if mlp_ratio > 0 else None

    def _heads(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        return x_BND.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, q_BQD: torch.Tensor, kv_BND: torch.Tensor, mask_BN: torch.Tensor | None) -> torch.Tensor:
        kv = self.norm_kv(kv_BND)
        q, k, v = self._heads(self.q(self.norm_q(q_BQD))), self._heads(self.k(kv)), self._heads(self.v(kv))
        attn_mask = None if mask_BN is None else mask_BN[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        q_BQD = q_BQD + self.proj(out.transpose(1, 2).reshape(q_BQD.shape))
        return q_BQD if self.mlp is None else q_BQD + self.mlp(self.norm_mlp(q_BQD))
