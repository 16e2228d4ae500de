"""MoHAttention (moezoo.zoo.layers.moh) against a per-token, per-head loop written from the MoH equations:

    g_shared = h_s * softmax(W_s x)                        (1 for a single shared head)
    p = softmax(W_r x); keep top-k; renormalise; * k       (0 for unchosen routed heads)
    [b_s, b_r] = 2 * softmax(W_0 x)                        (when both kinds exist)
    out = proj(concat_h  weight_h * softmax(q_h . K_h / sqrt(d)) V_h)
    balance = E^2 * mean_i(mean_t p[t, i] * frac of tokens choosing i)
"""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.zoo.layers import total_aux_loss
from moezoo.zoo.layers.moh import MoHAttention
from tolerance import fp_tolerance

# attention of 16-wide tokens computed two ways: qkv / output products (16 long) and the softmax over <= 16 keys
TOL = fp_tolerance(torch.float32, 16, layers=3)


def make(dim=16, heads=4, shared=1, top_k=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    attn = MoHAttention(dim, heads, shared, top_k, **kwargs)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    return attn


@torch.no_grad()
def reference(attn: MoHAttention, x: torch.Tensor):
    """Loop over batch, token and head; returns the output and each token's head weights [B, N, H]."""
    B, N, D = x.shape
    H, d, hs, k = attn.num_heads, attn.head_dim, attn.num_shared_heads, attn.top_k_heads
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias
    out = torch.zeros(B, N, D)
    weights = torch.zeros(B, N, H)
    for b in range(B):
        for n in range(N):
            xt = x[b, n]
            w = torch.zeros(H)
            shared = torch.softmax(attn.shared_router.weight @ xt, 0) * hs if hs > 1 else torch.ones(hs)
            w[:hs] = shared
            if k:
                p = torch.softmax(attn.routed_router.weight @ xt, 0)
                chosen = sorted(range(len(p)), key=lambda i: -float(p[i]))[:k]
                total = sum(float(p[i]) for i in chosen)
                for i in chosen:
                    w[hs + i] = p[i] / total * k
                if hs:
                    mix = torch.softmax(attn.mix_router.weight @ xt, 0) * 2
                    w[:hs] = w[:hs] * mix[0]
                    w[hs:] = w[hs:] * mix[1]
            heads = []
            for h in range(H):
                q = qkv[b, n, h * d:(h + 1) * d]
                keys = qkv[b, :, D + h * d:D + (h + 1) * d]
                values = qkv[b, :, 2 * D + h * d:2 * D + (h + 1) * d]
                att = torch.softmax(keys @ q / math.sqrt(d), 0)
                heads.append(w[h] * (att @ values))
            out[b, n] = attn.proj.weight @ torch.cat(heads) + attn.proj.bias
            weights[b, n] = w
    return out, weights


@pytest.mark.parametrize(
    "heads,shared,top_k",
    [(4, 1, 2), (4, 2, 1), (6, 2, 4), (4, 0, 2), (4, 4, 0), (4, 3, 1)],
    ids=["1shared+2of3", "2shared+1of2", "2shared+4of4", "routed_only", "shared_only", "3shared+1of1"],
)
def test_matches_per_token_loop(heads, shared, top_k):
    attn = make(dim=4 * heads, heads=heads, shared=shared, top_k=top_k)
    x = torch.randn(2, 5, 4 * heads, generator=torch.Generator().manual_seed(1))
    expected, weights = reference(attn, x)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, **TOL)
    if top_k:
        record = attn.routing
        assert record.tokens_shape == (2, 5) and record.ids_TK.shape == (10, top_k)
        chosen = weights[..., shared:].reshape(10, -1)
        torch.testing.assert_close(record.weights_TK, chosen.gather(1, record.ids_TK), **TOL)
        assert torch.all(chosen.gather(1, record.ids_TK) > 0)
        assert int(record.load_E.sum()) == 10 * top_k
    else:
        assert attn.routing is None


def test_balance_loss_by_hand():
    attn = make(heads=4, shared=1, top_k=2, aux_loss_coef=0.5)
    x = torch.randn(3, 7, 16)
    attn(x)
    probs = torch.softmax(x.reshape(-1, 16) @ attn.routed_router.weight.t(), -1)
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(2, dim=-1).indices, 1.0)
    E = 3
    expected = E * E * (probs.mean(0) * chosen.mean(0)).mean()
    torch.testing.assert_close(attn.routing.aux_terms["head_balance"], expected)
    torch.testing.assert_close(attn.routing.aux_loss, 0.5 * expected)
    model = torch.nn.Sequential(attn, make(heads=4, shared=2, top_k=1, seed=3))
    model(x)
    torch.testing.assert_close(total_aux_loss(model), model[0].routing.aux_loss + model[1].routing.aux_loss)


def test_gradients_reach_every_router():
    attn = make(heads=4, shared=2, top_k=1)
    x = torch.randn(2, 6, 16, requires_grad=True)
    (attn(x).square().mean() + attn.routing.aux_loss).backward()
    for router in (attn.shared_router, attn.routed_router, attn.mix_router):
        assert torch.count_nonzero(router.weight.grad) > 0
    assert torch.count_nonzero(x.grad) > 0


def test_all_heads_equal_weight_is_plain_attention():
    """With zero routers every chosen head gets weight 1 (the x k and x 2 scalings): top_k = all routed heads
    makes MoH exactly multi-head attention."""
    attn = make(heads=4, shared=2, top_k=2)
    with torch.no_grad():
        for router in (attn.shared_router, attn.routed_router, attn.mix_router):
            router.weight.zero_()
    x = torch.randn(2, 5, 16)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], **TOL)


def test_invalid_configurations():
    with pytest.raises(ValueError, match="top_k_heads"):
        MoHAttention(16, 4, 2, 3)
    with pytest.raises(ValueError, match="at least one"):
        MoHAttention(16, 4, 0, 0)
    with pytest.raises(ValueError, match="multiple"):
        MoHAttention(18, 4, 1, 1)
