"""Modality-aware layers: weights chosen by each token's modality id, which travels with the sequence.

Mixture-of-Transformers (Liang et al. 2024; facebookresearch/Mixture-of-Transformers, ``src/simple_Modality
UntiedAttention.py`` and ``simple_ModalityUntiedFeedForward.py``): every non-embedding weight is untied by
modality and chosen deterministically (no router, no aux loss), while the attention stays global over the whole
sequence:

- :class:`ModalityUntiedAttention`: per modality m, ``q, k, v = W_q[m] x, W_k[m] x, W_v[m] x`` for that
  modality's tokens (optionally a per-modality RMSNorm of q and k per head), one causal attention over all
  tokens, then ``RMSNorm_m(W_o[m] o)`` per token;
- :class:`ModalityUntiedFeedForward`: ``RMSNorm_m(SwiGLU_m(x))`` per token.

The norms sit on the sublayer outputs, as the reference code writes them (the residual is added outside).
Modality ids are ``0 .. num_modalities - 1``: nothing here assumes two.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import GatedMLP, KVCache

__all__ = ["ModalityUntiedAttention", "ModalityUntiedFeedForward", "check_modalities"]


def check_modalities(modality_BS: torch.Tensor, shape: tuple[int, int], num_modalities: int) -> None:
    """Modality ids must be integers ``[B, S]`` in ``[0, num_modalities)``."""
    if modality_BS.shape != shape or modality_BS.dtype.is_floating_point or modality_BS.dtype == torch.bool:
        raise ValueError(f"modality ids must be an integer tensor [B, S] = {tuple(shape)}, got "
                         f"{modality_BS.dtype} {tuple(modality_BS.shape)}")
    if modality_BS.numel() and (int(modality_BS.min()) < 0 or int(modality_BS.max()) >= num_modalities):
        raise ValueError(f"modality ids must be in [0, {num_modalities}), got values from {int(modality_BS.min())} "
                         f"to {int(modality_BS.max())}")


def _per_modality(layers, x_BS_: torch.Tensor, modality_BS: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """``layers[m](x)`` for the tokens of modality m (any callables), back in sequence order."""
    out = x_BS_.new_empty(*x_BS_.shape[:2], *out_shape)
    for m, layer in enumerate(layers):
        where = modality_BS == m
        if where.any():
            out[where] = layer(x_BS_[where])
    return out


class ModalityUntiedAttention(nn.Module):
    """Causal self-attention with every projection (and the output norm) untied by modality; global attention.
    ``forward(x [B, S, D], modality [B, S], cache=None)``: with a :class:`KVCache`, the new positions also attend
    to the cached ones (incremental decoding gives the same result as one pass)."""

    def __init__(self, dim: int, num_heads: int, num_modalities: int, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.dim, self.num_heads, self.head_dim, self.num_modalities = dim, num_heads, dim // num_heads, num_modalities
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(num_modalities))
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_modalities))
        self.out_norm = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(num_modalities))
        self.q_norm = nn.ModuleList(nn.RMSNorm(self.head_dim, eps=eps) for _ in range(num_modalities)) if qk_norm else None
        self.k_norm = nn.ModuleList(nn.RMSNorm(self.head_dim, eps=eps) for _ in range(num_modalities)) if qk_norm else None

    def _qkv(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        qkv = _per_modality(self.qkv, x_BSD, modality_BS, (3 * self.dim,))
        qkv = qkv.view(*x_BSD.shape[:2], 3, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            heads = (self.num_heads, self.head_dim)
            q = _per_modality(self.q_norm, qkv[:, :, 0], modality_BS, heads)
            k = _per_modality(self.k_norm, qkv[:, :, 1], modality_BS, heads)
            qkv = torch.stack([q, k, qkv[:, :, 2]], dim=2)
        return qkv

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        check_modalities(modality_BS, (B, S), self.num_modalities)
        q, k, v = self._qkv(x_BSD, modality_BS).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, head_dim]
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            visible = torch.ones(S, past + S, dtype=torch.bool, device=x_BSD.device).tril(past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        o_BSD = o.transpose(1, 2).reshape(B, S, D)
        projected = _per_modality(self.proj, o_BSD, modality_BS, (D,))
        return _per_modality(self.out_norm, projected, modality_BS, (D,))


class ModalityUntiedFeedForward(nn.Module):
    """``RMSNorm_m(SwiGLU_m(x))`` for the tokens of modality m: one FFN and one output norm per modality."""

    def __init__(self, dim: int, hidden_dim: int, num_modalities: int, eps: float = 1e-6):
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.dim, self.num_modalities = dim, num_modalities
        self.ffn = nn.ModuleList(GatedMLP(dim, hidden_dim) for _ in range(num_modalities))
        self.out_norm = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(num_modalities))

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        check_modalities(modality_BS, tuple(x_BSD.shape[:2]), self.num_modalities)
        layers = [lambda x, f=f, n=n: n(f(x)) for f, n in zip(self.ffn, self.out_norm)]
        return _per_modality(layers, x_BSD, modality_BS, (self.dim,))
