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


@pytest.mark.parametrize("modality_id", [0, 2])
def test_moiie_on_one_modality_routes_over_its_columns_only(modality_id):
    """Every token of one modality (a decoding step) takes the single-modality router path: the same outputs,
    balance loss, ids and [T, E] probabilities (zero outside the modality's experts) as by hand, and gradients
    reach that modality's router only."""
    torch.manual_seed(4)
    layer = IntraInterMoE(8, 6, 7, 3, top_k=2, num_intra=1, num_shared=4).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    modality = torch.full((1, 5), modality_id)
    expected, balance = moiie_by_hand(layer, x, modality)
    tol = fp_tolerance(torch.float64, 8, layers=2)
    y = layer(x, modality)
    torch.testing.assert_close(y, expected, **tol)
    torch.testing.assert_close(layer.routing.aux_terms["modality_balance"], balance, **tol)
    columns = layer.experts_of(modality_id)
    probs = (x[0] @ layer.routers[modality_id].weight.t()).softmax(-1)
    torch.testing.assert_close(layer.routing.probs_TE[:, columns], probs.detach(), **tol)
    others = [e for e in range(7) if e not in columns]
    assert not layer.routing.probs_TE[:, others].any()
    assert set(layer.routing.ids_TK.reshape(-1).tolist()) <= set(columns)
    (y.sum() + layer.routing.aux_loss).backward()
    assert layer.routers[modality_id].weight.grad.abs().sum() > 0
    assert all(layer.routers[m].weight.grad is None for m in range(3) if m != modality_id)


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


# ------------------------------------------------------------------------------------------------- MoMa

from moezoo.zoo.layers import ModalityGroupMoE  # noqa: E402


def aux_logits_by_hand(layer, m, x):
    first, _, second = layer.aux_routers[m]
    return second.weight @ F.silu(first.weight @ x + first.bias) + second.bias


def moma_by_hand(layer, x, modality, rule):
    """Per modality m with tokens t_1..t_T and E experts in its group (global ids from the group sizes): each
    token's scores are the softmax of its group router's logits; rule "expert_choice": expert e takes the
    C = min(T, ceil(top_k T / E)) tokens with the highest score for e; rule "causal": a token takes the experts
    whose auxiliary sigmoid > 0.5, else its most probable one. Output: sum over its experts of score * SwiGLU.
    Also returns the per-group (auxiliary logits, expert-choice picks) for the BCE."""
    x_TD, modality_T = x.reshape(-1, x.shape[-1]), modality.reshape(-1)
    rows = [x_TD.new_zeros(x.shape[-1]) for _ in range(x_TD.shape[0])]
    groups, sizes = {}, layer.experts_per_group
    for m, size in enumerate(sizes):
        tokens = [t for t in range(len(modality_T)) if int(modality_T[t]) == m]
        if not tokens:
            continue
        first = sum(sizes[:m])
        scores = torch.stack([(layer.routers[m].weight @ x_TD[t]).softmax(0) for t in tokens])
        aux = torch.stack([aux_logits_by_hand(layer, m, x_TD[t].detach()) for t in tokens])
        capacity = min(len(tokens), math.ceil(layer.top_k * len(tokens) / size))
        chosen = torch.zeros(len(tokens), size, dtype=torch.bool)
        for e in range(size):
            for i in sorted(range(len(tokens)), key=lambda i: -float(scores[i, e].detach()))[:capacity]:
                chosen[i, e] = True
        if rule == "expert_choice":
            picked = chosen
        else:
            picked = torch.sigmoid(aux) > 0.5
            for i in range(len(tokens)):
                if not picked[i].any():
                    picked[i, int(aux[i].argmax())] = True
        for i, t in enumerate(tokens):
            for e in range(size):
                if picked[i, e]:
                    rows[t] = rows[t] + scores[i, e] * swiglu(layer, first + e, x_TD[t])
        groups[m] = (aux, chosen, picked)
    return torch.stack(rows).view_as(x), groups


MOMA_CASES = [(2, (3, 2), 2), (3, (2, 3, 1), 1.5)]  # (modalities, experts per group, top_k)


def moma_layer(num_modalities, groups, top_k, seed, **kwargs):
    torch.manual_seed(seed)
    layer = ModalityGroupMoE(8, 6, groups, num_modalities, top_k, **kwargs).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    modality = torch.arange(18).remainder(num_modalities)[torch.randperm(18)].view(2, 9)  # every modality present
    return layer, x, modality


@pytest.mark.parametrize("num_modalities, groups, top_k", MOMA_CASES)
def test_moma_training_is_expert_choice_inside_each_modality_group(num_modalities, groups, top_k):
    layer, x, modality = moma_layer(num_modalities, groups, top_k, seed=4)
    expected, _ = moma_by_hand(layer, x, modality, "expert_choice")
    torch.testing.assert_close(layer(x, modality), expected, **fp_tolerance(torch.float64, 8, layers=2))
    # eval with inference_routing="expert_choice" keeps the training rule
    layer.eval()
    layer.inference_routing = "expert_choice"
    torch.testing.assert_close(layer(x, modality), expected, **fp_tolerance(torch.float64, 8, layers=2))


@pytest.mark.parametrize("num_modalities, groups, top_k", MOMA_CASES)
def test_moma_tokens_stay_in_their_group_and_every_expert_takes_its_capacity(num_modalities, groups, top_k):
    layer, x, modality = moma_layer(num_modalities, groups, top_k, seed=5)
    layer(x, modality)
    record, modality_T = layer.routing, modality.reshape(-1)
    first = 0
    for m, size in enumerate(groups):
        own = range(first, first + size)
        assert layer.experts_of(m) == list(own)
        assert layer.expert_names[first:first + size] == (f"m{m} group",) * size
        used = set(record.ids_TK[modality_T == m].reshape(-1).tolist()) - {-1}
        assert used <= set(own), f"modality {m} reached experts {sorted(used - set(own))} outside its group"
        tokens = int((modality_T == m).sum())
        capacity = min(tokens, math.ceil(top_k * tokens / size))
        assert record.load_E[first:first + size].tolist() == [capacity] * size
        assert all(int((record.ids_TK == e).sum()) == capacity for e in own)
        first += size
    # slots by descending weight, unused last: column 0 is each token's top expert
    weights = torch.where(record.ids_TK >= 0, record.weights_TK, -1.0)
    assert bool((weights[:, :-1] >= weights[:, 1:]).all())


def test_moma_gradients_match_the_loop_reference():
    layer, x, modality = moma_layer(3, (2, 3, 1), 1.5, seed=6)
    x.requires_grad_(True)
    probe = torch.randn(x.shape, dtype=torch.float64)
    params = [x, layer.w_in, layer.w_out, *(r.weight for r in layer.routers)]
    got = torch.autograd.grad((layer(x, modality) * probe).sum(), params)
    want = torch.autograd.grad((moma_by_hand(layer, x, modality, "expert_choice")[0] * probe).sum(), params)
    for name, g, w in zip(["x", "w_in", "w_out", "router 0", "router 1", "router 2"], got, want):
        torch.testing.assert_close(g, w, **fp_tolerance(torch.float64, 8, layers=3), msg=name)
        assert name == "router 2" or g.abs().sum() > 0  # (a one-expert group's softmax is constant 1)


def test_moma_causal_router_loss_is_bce_on_the_expert_choice_and_trains_only_the_aux_routers():
    layer, x, modality = moma_layer(2, (3, 2), 2, seed=7)
    x.requires_grad_(True)
    layer(x, modality)
    _, groups = moma_by_hand(layer, x, modality, "expert_choice")
    expected = sum(F.binary_cross_entropy_with_logits(aux, chosen.double()) for aux, chosen, _ in groups.values())
    tol = fp_tolerance(torch.float64, 8, layers=2)
    torch.testing.assert_close(layer.routing.aux_terms["causal_router"], expected, **tol)
    torch.testing.assert_close(total_aux_loss(layer), 1.0 * expected, **tol)  # default coefficient 1.0
    layer.routing.aux_loss.backward()
    aux_params = {id(p) for p in layer.aux_routers.parameters()}
    for name, p in layer.named_parameters():
        if id(p) in aux_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"the causal-router loss reached {name}"
    assert x.grad is None


def test_moma_causal_inference_uses_the_aux_router_threshold_and_each_token_alone():
    layer, x, modality = moma_layer(2, (3, 2), 2, seed=8)
    with torch.no_grad():  # some tokens pass several experts, some none (then the most probable one)
        layer.aux_routers[0][2].bias.copy_(torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64))
        layer.aux_routers[1][2].bias.copy_(torch.tensor([-0.8, -0.6], dtype=torch.float64))
    layer.eval()
    y = layer(x, modality)
    expected, groups = moma_by_hand(layer, x, modality, "causal")
    tol = fp_tolerance(torch.float64, 8, layers=2)
    torch.testing.assert_close(y, expected, **tol)
    passed = torch.cat([(torch.sigmoid(aux) > 0.5).sum(-1) for aux, _, _ in groups.values()])
    assert (passed == 0).any() and (passed >= 2).any()  # both branches of the rule are exercised
    # A token's output depends on itself only: other tokens (and their modalities) changed, or alone.
    other_x, other_modality = torch.randn_like(x), torch.randint(0, 2, modality.shape)
    other_x[:, 4], other_modality[:, 4] = x[:, 4], modality[:, 4]
    torch.testing.assert_close(layer(other_x, other_modality)[:, 4], y[:, 4], **tol)
    alone = torch.cat([layer(x[:, s:s + 1], modality[:, s:s + 1]) for s in range(x.shape[1])], dim=1)
    torch.testing.assert_close(alone, y, **tol)
    # ... which expert choice is not: one token alone is taken by every expert of its group.
    layer.inference_routing = "expert_choice"
    ec_alone = torch.cat([layer(x[:, s:s + 1], modality[:, s:s + 1]) for s in range(x.shape[1])], dim=1)
    assert not torch.allclose(ec_alone, layer(x, modality), **tol)


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts_per_group=(4,), num_modalities=2), r"one group size per modality \(2\), got 1"),
    (dict(experts_per_group=(4, 0)), r"experts_per_group\[1\] must be a positive integer, got 0"),
    (dict(experts_per_group=2.5), "positive integer .* or one per modality"),
    (dict(num_modalities=0), "num_modalities must be a positive integer"),
    (dict(top_k=0), r"top_k .* must be a number in \(0, 4\]"),
    (dict(experts_per_group=(2, 3), top_k=4), r"top_k .* in \(0, 3\] \(the largest group\), got 4"),
    (dict(top_k=float("nan")), "top_k"),
    (dict(aux_router_hidden=0), "aux_router_hidden must be a positive integer"),
    (dict(inference_routing="greedy"), "unknown inference_routing 'greedy'; accepted: causal, expert_choice"),
    (dict(aux_loss_coefs={"causal_routr": 1.0}), "unknown aux losses"),
])
def test_moma_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModalityGroupMoE(8, 6, **kwargs)


def test_moma_bad_modality_ids_and_switches_are_refused():
    layer = ModalityGroupMoE(8, 6, (2, 2, 1), num_modalities=3)
    with pytest.raises(ValueError, match=r"must be in \[0, 3\), got values from 0 to 3"):
        layer(torch.randn(1, 3, 8), torch.tensor([[0, 3, 1]]))
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.randn(1, 3, 8), torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown inference_routing"):
        layer.inference_routing = "top_k"
    with pytest.raises(ValueError, match=r"modality must be in \[0, 3\)"):
        layer.experts_of(3)
