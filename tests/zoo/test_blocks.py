"""Shared layers of zoo/layers/blocks.py that are ours (not timm's or diffusers')."""

import math

import torch

from moezoo.zoo.layers.blocks import CausalSelfAttention, KVCache
from tolerance import fp_tolerance

TOL = fp_tolerance(torch.float32, 16, layers=3)  # qkv, attention and output products of 16-wide tokens


def causal_attention_by_hand(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head over positions <= i, then the output projection."""
    B, S, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)
    out = torch.zeros(B, S, D)
    for b in range(B):
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            for i in range(S):
                scores = torch.stack([q[b, i, cols] @ k[b, j, cols] for j in range(i + 1)]) / math.sqrt(d)
                out[b, i, cols] = scores.softmax(0) @ v[b, : i + 1, cols]
    return out @ attn.proj.weight.T


def test_causal_attention_matches_the_formula_and_the_cache_reproduces_it():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4)
    x = torch.randn(2, 7, 16)
    full = attn(x)
    torch.testing.assert_close(full, causal_attention_by_hand(attn, x), **TOL)
    cache = KVCache()
    pieces = [attn(x[:, :3], cache)] + [attn(x[:, i : i + 1], cache) for i in range(3, 7)]
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def test_a_position_never_sees_later_positions():
    torch.manual_seed(1)
    attn = CausalSelfAttention(16, 2)
    x = torch.randn(1, 5, 16)
    changed = x.clone()
    changed[:, 3:] += 1.0
    assert torch.equal(attn(x)[:, :3], attn(changed)[:, :3])
