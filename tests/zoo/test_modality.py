"""Mixture-of-Transformers layers against the reference code's formulas written per token: each token's
q/k/v/o, FFN and norms are its own modality's, and the attention is global (causal) over all tokens; a KV cache
gives the same result one token at a time; three modalities work."""

import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.zoo.layers.blocks import KVCache
from moezoo.zoo.layers.modality import ModalityUntiedAttention, ModalityUntiedFeedForward
from tolerance import fp_tolerance


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def attention_by_hand(layer, x, modality):
    """Per token: its modality's projections (and q/k norms), softmax over the tokens up to it, its modality's
    output projection and RMSNorm."""
    B, S, D = x.shape
    H, dh = layer.num_heads, layer.head_dim
    out = torch.zeros_like(x)
    for b in range(B):
        q, k, v = [], [], []
        for s in range(S):
            m = int(modality[b, s])
            qs, ks, vs = (layer.qkv[m].weight @ x[b, s]).view(3, H, dh)
            if layer.q_norm is not None:
                qs = rms_norm(qs, layer.q_norm[m].weight, layer.q_norm[m].eps)
                ks = rms_norm(ks, layer.k_norm[m].weight, layer.k_norm[m].eps)
            q.append(qs), k.append(ks), v.append(vs)
        for s in range(S):
            m = int(modality[b, s])
            heads = []
            for h in range(H):
                scores = torch.stack([q[s][h] @ k[j][h] / math.sqrt(dh) for j in range(s + 1)])
                heads.append((scores.softmax(0)[:, None] * torch.stack([v[j][h] for j in range(s + 1)])).sum(0))
            o = layer.proj[m].weight @ torch.cat(heads)
            out[b, s] = rms_norm(o, layer.out_norm[m].weight, layer.out_norm[m].eps)
    return out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_untied_attention_is_per_modality_projections_with_global_attention(qk_norm):
    torch.manual_seed(0)
    layer = ModalityUntiedAttention(16, 2, num_modalities=3, qk_norm=qk_norm).double()
    for norm in [*layer.out_norm, *(layer.q_norm or []), *(layer.k_norm or [])]:
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # not all ones: a norm of the wrong modality would show
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    modality = torch.tensor([[1, 1, 1, 0, 0, 2, 0], [0, 2, 2, 1, 0, 0, 1]])
    torch.testing.assert_close(layer(x, modality), attention_by_hand(layer, x, modality),
                               **fp_tolerance(torch.float64, 16, layers=3))


def test_untied_attention_with_a_kv_cache_matches_one_pass():
    torch.manual_seed(1)
    layer = ModalityUntiedAttention(16, 4, num_modalities=2, qk_norm=True)
    x = torch.randn(2, 9, 16)
    modality = torch.tensor([[1] * 5 + [0] * 4, [1] * 3 + [0] * 6])
    whole = layer(x, modality)
    cache = KVCache()
    steps = [layer(x[:, :5], modality[:, :5], cache)]
    steps += [layer(x[:, s:s + 1], modality[:, s:s + 1], cache) for s in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, **fp_tolerance(torch.float32, 16, layers=3))


def test_untied_feed_forward_is_each_modalitys_swiglu_and_norm():
    torch.manual_seed(2)
    layer = ModalityUntiedFeedForward(8, 12, num_modalities=2)
    for norm in layer.out_norm:
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 5, 8)
    modality = torch.randint(0, 2, (3, 5))
    expected = torch.zeros_like(x)
    for b in range(3):
        for s in range(5):
            m, f = int(modality[b, s]), layer.ffn[int(modality[b, s])]
            hidden = F.silu(f.gate_proj.weight @ x[b, s]) * (f.up_proj.weight @ x[b, s])
            expected[b, s] = rms_norm(f.down_proj.weight @ hidden, layer.out_norm[m].weight, layer.out_norm[m].eps)
    torch.testing.assert_close(layer(x, modality), expected, **fp_tolerance(torch.float32, 12, layers=2))


@pytest.mark.parametrize("modality, message", [
    (torch.tensor([[0, 1, 2]]), r"must be in \[0, 2\)"),
    (torch.tensor([[0.0, 1.0, 0.0]]), "integer tensor"),
    (torch.tensor([[0, 1]]), r"\[B, S\] = \(1, 3\)"),
])
def test_bad_modality_ids_are_refused(modality, message):
    with pytest.raises(ValueError, match=message):
        ModalityUntiedFeedForward(4, 8, num_modalities=2)(torch.randn(1, 3, 4), modality)


# ------------------------------------------------------------------------------------------------- MoIIE

from moezoo.zoo.layers import total_aux_loss  # noqa: E402
from moezoo.zoo.layers.modality import IntraInterMoE  # noqa: E402


def swiglu(layer, e, x):
    gate, up = (layer.w_in[e] @ x).chunk(2)
    return layer.w_out[e] @ (F.silu(gate) * up)


def moiie_by_hand(layer, x, modality):
    """Per token: its modality's router over (its intra experts, the shared), softmax, top-k renormalised; per
    modality Mixtral's load_balancing_loss_func: G * sum(mean_tokens(expert_mask [T, k, G]) * mean_tokens(p))."""
    out = torch.zeros_like(x)
    masks, probs = {}, {}
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            m = int(modality[b, s])
            experts = layer.experts_of(m)
            p = (layer.routers[m].weight @ x[b, s]).softmax(0)
            weights, local = p.topk(layer.top_k)
            weights = weights / weights.sum()
            for w, j in zip(weights, local):
                out[b, s] += w * swiglu(layer, experts[int(j)], x[b, s])
            masks.setdefault(m, []).append(F.one_hot(local, len(experts)).to(x.dtype))
            probs.setdefault(m, []).append(p)
    balance = sum(len(layer.experts_of(m)) * (torch.stack(masks[m]).mean(0) * torch.stack(probs[m]).mean(0)).sum()
                  for m in masks)
    return out, balance


@pytest.mark.parametrize("num_modalities, num_experts, split", [(2, 8, {}), (3, 7, dict(num_intra=1, num_shared=4))])
def test_moiie_routes_each_modality_over_its_intra_and_the_shared_experts(num_modalities, num_experts, split):
    torch.manual_seed(3)
    layer = IntraInterMoE(8, 6, num_experts, num_modalities, top_k=2, **split).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    modality = torch.randint(0, num_modalities, (2, 9))
    expected, balance = moiie_by_hand(layer, x, modality)
    tol = fp_tolerance(torch.float64, 8, layers=2)
    torch.testing.assert_close(layer(x, modality), expected, **tol)
    torch.testing.assert_close(layer.routing.aux_terms["modality_balance"], balance, **tol)
    torch.testing.assert_close(total_aux_loss(layer), 0.001 * balance, **tol)
    for m in range(num_modalities):  # never another modality's intra experts
        used = set(layer.routing.ids_TK[modality.reshape(-1) == m].reshape(-1).tolist())
        assert used <= set(layer.experts_of(m))


def test_moiie_paper_split_and_its_errors():
    layer = IntraInterMoE(8, 6, num_experts=8)
    assert layer.experts_of(0) == [0, 1, 4, 5, 6, 7] and layer.experts_of(1) == [2, 3, 4, 5, 6, 7]
    assert layer.expert_names == ("m0 intra",) * 2 + ("m1 intra",) * 2 + ("shared",) * 4
    with pytest.raises(ValueError, match="must be divisible by 4"):
        IntraInterMoE(8, 6, num_experts=6)
    with pytest.raises(ValueError, match="num_modalities x num_intra"):
        IntraInterMoE(8, 6, num_experts=8, num_intra=1, num_shared=4)
    with pytest.raises(ValueError, match="unknown aux losses"):
        IntraInterMoE(8, 6, num_experts=8, aux_loss_coefs={"modality_balanse": 0.1})
