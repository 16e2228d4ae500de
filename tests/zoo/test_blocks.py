"""Shared layers of zoo/layers/blocks.py that are ours (not timm's or diffusers')."""

import math

import pytest
import torch

from moezoo.zoo.layers.blocks import CausalSelfAttention, KVCache, multimodal_rotary
from tolerance import fp_tolerance

TOL = fp_tolerance(torch.float32, 16, layers=3)  # qkv, attention and output products of 16-wide tokens


def causal_attention_by_hand(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head over positions <= i, then the output projection; with QK-norm each
    head's q and k divided by their root mean square (eps 1e-6) and scaled by the norms' weights first."""
    B, S, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)

    def rms(vector, norm):
        if norm is None:
            return vector
        return vector / torch.sqrt(vector.pow(2).mean() + 1e-6) * norm.weight

    out = torch.zeros(B, S, D)
    for b in range(B):
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            for i in range(S):
                query = rms(q[b, i, cols], attn.q_norm)
                scores = torch.stack([query @ rms(k[b, j, cols], attn.k_norm) for j in range(i + 1)]) / math.sqrt(d)
                out[b, i, cols] = scores.softmax(0) @ v[b, : i + 1, cols]
    return out @ attn.proj.weight.T


@pytest.mark.parametrize("qk_norm", [False, True])
def test_causal_attention_matches_the_formula_and_the_cache_reproduces_it(qk_norm):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, qk_norm=qk_norm)
    if qk_norm:  # weights other than 1, so that a norm applied to the wrong axis or not at all shows
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.weight.uniform_(0.5, 2.0)
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


def rope_by_hand(x_d: torch.Tensor, ids: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Qwen2-VL's M-RoPE on one head vector: frequency i = theta^(-2i/d) turns the pair (x_i, x_{i + d/2}) by
    id * frequency, the id being the temporal one for the first quarter of the frequencies, then height, then
    width (for d = 16: 2, 3, 3 frequencies)."""
    d = x_d.shape[0]
    half = d // 2
    temporal = half // 4
    height = (half - temporal) // 2
    out = x_d.clone()
    for i in range(half):
        which = 0 if i < temporal else 1 if i < temporal + height else 2
        angle = ids[which] * theta ** (-2 * i / d)
        a, b = x_d[i], x_d[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_multimodal_rotary_matches_the_formula():
    torch.manual_seed(2)
    ids = torch.tensor([[0, 3, 3, 7], [0, 3, 4, 7], [0, 5, 3, 7]])[:, None]  # [3, 1, S]: text, 2 patches, text
    x = torch.randn(1, 2, 4, 16)
    rotated = multimodal_rotary(ids, 16).rotate(x)
    for h in range(2):
        for s in range(4):
            expected = rope_by_hand(x[0, h, s], tuple(int(v) for v in ids[:, 0, s]))
            torch.testing.assert_close(rotated[0, h, s], expected, **fp_tolerance(torch.float32, 2))


def test_rotary_attention_depends_on_offsets_only_and_the_cache_reproduces_it():
    torch.manual_seed(3)
    attn = CausalSelfAttention(16, 2, qk_norm=True)
    x = torch.randn(2, 6, 16)
    ids = torch.tensor([[0, 1, 1, 1, 3, 4], [0, 1, 1, 2, 3, 4], [0, 1, 2, 1, 3, 4]])[:, None]
    full = attn(x, rotary=multimodal_rotary(ids, 8))
    shifted = attn(x, rotary=multimodal_rotary(ids + 40, 8))  # every id moved alike: the same offsets
    torch.testing.assert_close(shifted, full, **TOL)
    moved = attn(x, rotary=multimodal_rotary(ids.flip(0), 8))  # rows and columns swapped: other offsets
    assert not torch.allclose(moved[:, 3], full[:, 3], **TOL)
    cache = KVCache()
    pieces = [attn(x[:, :4], cache, multimodal_rotary(ids[..., :4], 8))]
    pieces += [attn(x[:, i: i + 1], cache, multimodal_rotary(ids[..., i: i + 1], 8)) for i in (4, 5)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
