"""The MoE block (moezoo.zoo.layers.moe) against independent references written here and in tests/helpers.py.

Routing is checked against the router formulas computed by hand from ``moe.router.weight`` (per token,
plain Python/torch ops), and the block's output against a per-token loop over ``moe.routing``'s ids and
weights that evaluates every expert from the raw parameter tensors: routed MLPs, null (nothing), copy
(``x``), constant (``a1 x + a2 v``, ``[a1, a2] = softmax(W x)``) and the shared MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import moezoo.kernels.experts as experts_module
import moezoo.zoo.layers.moe as moe_module
from moezoo.zoo.layers import GatedMLP, MoE, collect_routing, freeze, set_backend, total_aux_loss, unfreeze
from helpers import act_formula, expert_on_token, gshard_kept
from tolerance import fp_tolerance

# a block computed two ways (kernel backends vs the per-token loop): router + two expert products of <= 64
TOL = fp_tolerance(torch.float32, 64, layers=3)
KIND = {"swiglu": ("silu", True), "geglu": ("gelu", True), "mlp": ("gelu", False), "ternary": ("silu", True)}


# ----------------------------------------------------------------------------------------------- helpers


def make_moe(*args, seed=0, scale=0.5, **kwargs):
    """A block whose every parameter and the score-bias buffer are random (biases, constant vectors and the
    shared gate start at zero, which would hide mistakes)."""
    torch.manual_seed(seed)
    moe = MoE(*args, **kwargs)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, scale)
        if moe.router.score_bias is not None:
            moe.router.score_bias.normal_(0.0, 0.3)
    return moe


def inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ternary_effective(w):
    """BitNet b1.58 absmean, per expert: scale = mean |w[e]|, q = clamp(round(w / scale), -1, 1)."""
    scale = w.detach().abs().mean(dim=(1, 2))
    q = torch.clamp(torch.round(w.detach() / scale[:, None, None]), -1, 1)
    return q, scale


def shared_by_hand(moe, x_D):
    activation, gated = KIND[moe.expert_kind]
    s = moe.shared
    up = (s.up_proj.weight * x_D).sum(-1)
    h = act_formula(activation, (s.gate_proj.weight * x_D).sum(-1)) * up if gated else act_formula(activation, up)
    out = (s.down_proj.weight * h).sum(-1)
    if moe.shared_gate is not None:
        out = torch.sigmoid((moe.shared_gate.weight[0] * x_D).sum()) * out
    return out


def block_loop(moe, x_TD, ids, weights, *, capacity=None, w_in=None, w_out=None):
    """The block's output token by token from ids/weights and the raw parameters."""
    activation, gated = KIND[moe.expert_kind]
    w_in = moe.w_in if w_in is None else w_in
    w_out = moe.w_out if w_out is None else w_out
    E, n_null, n_copy = moe.num_experts, moe.num_null_experts, moe.num_copy_experts
    kept = gshard_kept(ids, E, capacity)
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        y = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), weights[t, j]
            if e < 0:
                continue
            if e < E:
                if kept[t][j]:
                    y = y + w * expert_on_token(x, e, w_in, w_out, moe.b_in, moe.b_out, activation, gated)
            elif e < E + n_null:
                pass  # null expert: nothing
            elif e < E + n_null + n_copy:
                y = y + w * x
            else:
                c = e - (E + n_null + n_copy)
                m = (moe.constant_mix.weight[2 * c:2 * c + 2] * x).sum(-1)
                a = torch.exp(m - m.max())
                a = a / a.sum()
                y = y + w * (a[0] * x + a[1] * moe.constant_vectors[c])
        if moe.shared is not None:
            y = y + shared_by_hand(moe, x)
        rows.append(y)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[-1])


def logits_by_hand(moe, x_TD):
    logits = (moe.router.weight[None] * x_TD[:, None, :]).sum(-1)
    if moe.router.bias is not None:
        logits = logits + moe.router.bias
    return logits


def softmax_by_hand(logits, allowed=None):
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def as_dicts(ids, weights):
    """Per token {expert: weight} over the used slots (id >= 0)."""
    return [{int(e): float(w) for e, w in zip(ids[t], weights[t]) if int(e) >= 0} for t in range(ids.shape[0])]


def assert_routing_equal(rec, expected):
    got = as_dicts(rec.ids_TK, rec.weights_TK)
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys(), f"token {t}: chose {sorted(g)} but the formula gives {sorted(e)}"
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), f"token {t} expert {key}"


def topk_by_hand(scores_T_list, k):
    return sorted(range(len(scores_T_list)), key=lambda e: -scores_T_list[e])[:k]


# ---------------------------------------------------------------------------------------------- routers


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_softmax_router_block_output_and_grads(renormalize, backend):
    moe = make_moe(8, 6, 6, 2, router="softmax", renormalize=renormalize, bias=True, router_bias=True, backend=backend)
    x = inputs(10, 8).requires_grad_(True)
    y = moe(x)
    rec = moe.routing

    # Routing by the formula.
    probs = softmax_by_hand(logits_by_hand(moe, x)).detach()
    expected, ids_hand = [], []
    for t in range(10):
        chosen = topk_by_hand(probs[t].tolist(), 2)
        w = {e: float(probs[t, e]) for e in chosen}
        if renormalize:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        expected.append(w)
        ids_hand.append(chosen)
    assert_routing_equal(rec, expected)
    torch.testing.assert_close(rec.probs_TE, probs, **TOL)
    assert rec.ids_TK.dtype == torch.int64 and rec.ids_TK.shape == (10, 2)
    assert rec.dropped == 0
    assert rec.load_E.tolist() == [sum(e in c for c in ids_hand) for e in range(6)]

    # Output and every gradient against the loop, with the routing weights differentiable by formula.
    ids_hand = torch.tensor(ids_hand)
    probs_g = softmax_by_hand(logits_by_hand(moe, x))
    weights = probs_g.gather(1, ids_hand)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    ref = block_loop(moe, x, ids_hand, weights)
    torch.testing.assert_close(y, ref, **TOL)
    params = [x, moe.router.weight, moe.router.bias, moe.w_in, moe.w_out, moe.b_in, moe.b_out]
    up = inputs(10, 8, seed=2)
    g = torch.autograd.grad((y * up).sum(), params)
    g_ref = torch.autograd.grad((ref * up).sum(), params)
    for name, a, b in zip(["x", "router.weight", "router.bias", "w_in", "w_out", "b_in", "b_out"], g, g_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert g[1].abs().sum() > 0  # the router learns


@pytest.mark.parametrize("renormalize", [False, True])
def test_sigmoid_router_score_bias_groups_scaling(renormalize):
    E, G, TG, k, scaling = 8, 4, 2, 3, 2.5
    moe = make_moe(8, 6, E, k, router="sigmoid", score_bias=True, num_groups=G, topk_groups=TG,
                   routed_scaling=scaling, renormalize=renormalize, backend="torch")
    with torch.no_grad():
        moe.router.score_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.3, -0.2, 0.4, -0.6, 0.1]))
    x = inputs(16, 8, seed=3)
    y = moe(x)

    scores = torch.sigmoid(logits_by_hand(moe, x)).detach()
    bias = moe.router.score_bias
    expected, changed_by_bias, changed_by_groups = [], 0, 0
    size = E // G
    for t in range(16):
        choice = [float(scores[t, e] + bias[e]) for e in range(E)]
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(G)]
        kept_groups = sorted(range(G), key=lambda g: -group_score[g])[:TG]
        candidates = [e for e in range(E) if e // size in kept_groups]
        chosen = sorted(candidates, key=lambda e: -choice[e])[:k]
        w = {e: float(scores[t, e]) for e in chosen}
        if renormalize:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        expected.append({e: v * scaling for e, v in w.items()})
        changed_by_bias += set(chosen) != set(topk_by_hand([choice[e] - float(bias[e]) for e in range(E)], k))
        changed_by_groups += set(chosen) != set(topk_by_hand(choice, k))
    assert changed_by_bias and changed_by_groups, "the test case must exercise the bias and the group limit"
    rec = moe.routing
    assert_routing_equal(rec, expected)
    torch.testing.assert_close(rec.probs_TE, scores, **TOL)  # probs are the unbiased sigmoid scores
    torch.testing.assert_close(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK), **TOL)


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_p_router(renormalize):
    E, max_k, p = 6, 3, 0.55
    moe = make_moe(8, 6, E, max_k, router="top_p", top_p=p, renormalize=renormalize, backend="torch", scale=0.8)
    x = inputs(20, 8, seed=4)
    y = moe(x)
    probs = softmax_by_hand(logits_by_hand(moe, x)).detach()
    expected = []
    for t in range(20):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))
        chosen, mass = [], 0.0
        for e in order:
            if mass >= p or len(chosen) == max_k:
                break
            chosen.append(e)
            mass += float(probs[t, e])
        w = {e: float(probs[t, e]) for e in chosen}
        if renormalize:
            s = sum(w.values())
            w = {e: v / s for e, v in w.items()}
        expected.append(w)
    sizes = [len(w) for w in expected]
    assert len(set(sizes)) > 1, "the case must give tokens different numbers of experts"
    rec = moe.routing
    assert rec.ids_TK.shape == (20, max(sizes))
    assert_routing_equal(rec, expected)
    unused = rec.ids_TK < 0
    assert (rec.weights_TK[unused] == 0).all()
    torch.testing.assert_close(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK), **TOL)


def test_expert_choice_router():
    E, k, T = 4, 2, 10
    moe = make_moe(8, 6, E, k, router="expert_choice", backend="torch")
    x = inputs(T, 8, seed=5)
    y = moe(x)
    probs = softmax_by_hand(logits_by_hand(moe, x)).detach()
    capacity = min(T, math.ceil(1.0 * T * k / E))  # 5 tokens per expert
    picked = {e: sorted(range(T), key=lambda t: -float(probs[t, e]))[:capacity] for e in range(E)}
    expected = [{e: float(probs[t, e]) for e in range(E) if t in picked[e]} for t in range(T)]
    rec = moe.routing
    assert_routing_equal(rec, expected)
    assert rec.load_E.tolist() == [capacity] * E
    torch.testing.assert_close(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK), **TOL)


def test_noisy_router_in_eval_is_deterministic_top_k():
    E, k = 5, 2
    moe = make_moe(8, 6, E, k, router="noisy", backend="torch").eval()
    assert moe.router.noise.weight.abs().sum() > 0  # noise weights are set, but eval must ignore them
    x = inputs(12, 8, seed=6)
    y = moe(x)
    logits = logits_by_hand(moe, x).detach()
    expected = []
    for t in range(12):
        chosen = topk_by_hand(logits[t].tolist(), k)
        vals = torch.tensor([float(logits[t, e]) for e in chosen])
        sm = torch.exp(vals - vals.max())
        sm = sm / sm.sum()
        expected.append({e: float(s) for e, s in zip(chosen, sm)})
    rec = moe.routing
    assert_routing_equal(rec, expected)
    torch.testing.assert_close(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK), **TOL)
    assert torch.equal(moe(x), y)


@pytest.mark.parametrize("expert", ["swiglu", "geglu", "mlp"])
def test_expert_kinds(expert):
    moe = make_moe(8, 6, 4, 2, expert=expert, bias=True, backend="torch")
    n_in = 12 if KIND[expert][1] else 6
    assert moe.w_in.shape == (4, n_in, 8) and moe.w_out.shape == (4, 8, 6)
    x = inputs(9, 8, seed=7)
    y = moe(x)
    torch.testing.assert_close(y, block_loop(moe, x, moe.routing.ids_TK, moe.routing.weights_TK), **TOL)


# ------------------------------------------------------------------------------------- shared / special


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts_see_every_token(shared_gate):
    moe = make_moe(8, 6, 4, 2, num_shared_experts=2, shared_hidden_dim=5, shared_gate=shared_gate, backend="torch")
    assert moe.shared.up_proj.weight.shape == (10, 8)
    assert (moe.shared_gate is not None) == shared_gate
    x = inputs(7, 8, seed=8).requires_grad_(True)
    y = moe(x)
    ref = block_loop(moe, x, moe.routing.ids_TK, moe.routing.weights_TK)
    torch.testing.assert_close(y, ref, **TOL)
    # The shared MLP (and its gate) are trained like any dense layer; routing weights by formula so the
    # gradient to x and the router is comparable too.
    ref = block_loop(moe, x, moe.routing.ids_TK, softmax_by_hand(logits_by_hand(moe, x)).gather(1, moe.routing.ids_TK))
    params = [x, moe.router.weight, moe.shared.gate_proj.weight, moe.shared.up_proj.weight, moe.shared.down_proj.weight, moe.w_in]
    if shared_gate:
        params.append(moe.shared_gate.weight)
    up = inputs(7, 8, seed=24)
    g = torch.autograd.grad((y * up).sum(), params)
    g_ref = torch.autograd.grad((ref * up).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)
        assert a.abs().sum() > 0
    x = x.detach()
    y = y.detach()
    # routed part alone (shared removed by hand) matches a block without the shared expert
    shared = torch.stack([shared_by_hand(moe, x[t]) for t in range(7)])
    plain = MoE(8, 6, 4, 2, backend="torch")
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    torch.testing.assert_close(y - shared, plain(x), **TOL)


def test_null_experts_do_no_compute_and_give_zero(monkeypatch):
    E, n_null = 3, 2
    moe = make_moe(8, 6, E, 2, num_null_experts=n_null, num_shared_experts=1, router_bias=True, backend="torch")
    with torch.no_grad():
        moe.router.bias[E:] = 50.0  # every token picks both null experts
    plans = []
    real_expert_mlp = moe_module.expert_mlp

    def spy(x_TD, weights_TK, plan, *args, **kwargs):
        plans.append(plan)
        return real_expert_mlp(x_TD, weights_TK, plan, *args, **kwargs)

    monkeypatch.setattr(moe_module, "expert_mlp", spy)
    x = inputs(6, 8, seed=9)
    y = moe(x)
    rec = moe.routing
    assert sorted(set(rec.ids_TK.flatten().tolist())) == [E, E + 1]
    assert plans[-1].num_dispatched == 0  # nothing went to the computed experts
    shared = torch.stack([shared_by_hand(moe, x[t]) for t in range(6)])
    torch.testing.assert_close(y, shared, **TOL)
    shared_module, moe.shared = moe.shared, None
    assert torch.count_nonzero(moe(x)) == 0  # without the shared expert the output is exactly zero
    moe.shared = shared_module
    assert rec.load_E.tolist() == [0, 0, 0, 6, 6]
    assert rec.dropped == 0

    # Mixed routing: only slots on computed experts are dispatched.
    with torch.no_grad():
        moe.router.bias.zero_()
    y = moe(x)
    ids = moe.routing.ids_TK
    assert ((ids >= E) & (ids < E + n_null)).any() and (ids < E).any()
    assert plans[-1].num_dispatched == int((ids < E).sum())
    torch.testing.assert_close(y, block_loop(moe, x, ids, moe.routing.weights_TK), **TOL)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_only_null_experts_chosen_still_backpropagates(backend):
    """Every token on a null expert and no shared expert: zero output, and a training step must still run
    (the torch backend gives zero grads; every backend must behave the same)."""
    moe = make_moe(8, 6, 3, 1, num_null_experts=1, router_bias=True, backend=backend)
    with torch.no_grad():
        moe.router.bias[3] = 50.0
    x = inputs(4, 8, seed=25).requires_grad_(True)
    y = moe(x)
    assert moe.routing.ids_TK.flatten().tolist() == [3] * 4
    assert torch.count_nonzero(y) == 0
    y.sum().backward()  # the reference backend returns a graph-less tensor here (see report)
    assert moe.w_in.grad is None or torch.count_nonzero(moe.w_in.grad) == 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_copy_and_constant_experts(backend):
    E, n_null, n_copy, n_const = 2, 1, 1, 2
    moe = make_moe(8, 6, E, 2, num_null_experts=n_null, num_copy_experts=n_copy, num_constant_experts=n_const,
                   backend=backend, scale=0.8)
    assert moe.num_routable == 6 and moe.constant_vectors.shape == (2, 8) and moe.constant_mix.weight.shape == (4, 8)
    x = inputs(40, 8, seed=10).requires_grad_(True)
    y = moe(x)
    rec = moe.routing
    used = set(rec.ids_TK.flatten().tolist())
    assert {0, 1, 2, 3, 4, 5} <= used, f"every expert kind must be exercised, got {used}"
    ref = block_loop(moe, x, rec.ids_TK, rec.weights_TK)
    torch.testing.assert_close(y, ref, **TOL)

    # Copy alone: one copy expert with k=1 gives exactly w * x.
    only_copy = make_moe(8, 6, 1, 1, num_copy_experts=1, router_bias=True, backend=backend)
    with torch.no_grad():
        only_copy.router.bias[1] = 50.0
    out = only_copy(x)
    torch.testing.assert_close(out, only_copy.routing.weights_TK * x, **TOL)

    # Gradients flow to the constant vectors and mixer like the formula says.
    params = [x, moe.constant_vectors, moe.constant_mix.weight, moe.router.weight]
    probs = softmax_by_hand(logits_by_hand(moe, x))
    ref_g = block_loop(moe, x, rec.ids_TK, probs.gather(1, rec.ids_TK))
    up = inputs(40, 8, seed=11)
    g = torch.autograd.grad((y * up).sum(), params)
    g_ref = torch.autograd.grad((ref_g * up).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_capacity_dropping_recorded(backend):
    E, k, T, cf = 4, 2, 12, 0.5
    moe = make_moe(8, 6, E, k, capacity_factor=cf, backend=backend, scale=0.8)
    x = inputs(T, 8, seed=12)
    y = moe(x)
    rec = moe.routing
    capacity = math.ceil(cf * T * k / E)  # 3
    kept = gshard_kept(rec.ids_TK, E, capacity)
    n_kept = sum(map(sum, kept))
    assert rec.dropped == T * k - n_kept > 0
    load = [sum(kept[t][j] and int(rec.ids_TK[t, j]) == e for t in range(T) for j in range(k)) for e in range(E)]
    assert rec.load_E.tolist() == load
    assert max(load) <= capacity
    torch.testing.assert_close(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK, capacity=capacity), **TOL)


def test_capacity_drops_second_choices_first():
    E, T, cf = 2, 8, 1.0
    moe = make_moe(4, 3, E, 2, capacity_factor=cf, backend="torch")
    x = inputs(T, 4, seed=13)
    moe(x)
    rec = moe.routing
    # capacity = ceil(1 * 8 * 2 / 2) = 8 >= all slots: nothing dropped.
    assert rec.dropped == 0
    moe.capacity_factor = 0.5  # capacity 4: each expert holds exactly its first choices up to 4
    moe(x)
    rec = moe.routing
    first = rec.ids_TK[:, 0].tolist()
    kept = gshard_kept(rec.ids_TK, E, 4)
    for e in range(E):
        firsts = [t for t in range(T) if first[t] == e]
        kept_firsts = [t for t in firsts if kept[t][0]]
        assert kept_firsts == firsts[:4]
    assert rec.load_E.tolist() == [4.0, 4.0]


def test_ternary_experts_use_ternary_weights_and_get_gradients():
    moe = make_moe(8, 6, 3, 2, expert="ternary", backend="torch")
    x = inputs(9, 8, seed=14)
    y = moe(x)
    rec = moe.routing
    q_in, s_in = ternary_effective(moe.w_in)
    q_out, s_out = ternary_effective(moe.w_out)
    assert set(q_in.unique().tolist()) <= {-1.0, 0.0, 1.0} and set(q_out.unique().tolist()) == {-1.0, 0.0, 1.0}
    w_in_eff = (q_in * s_in[:, None, None]).requires_grad_(True)
    w_out_eff = (q_out * s_out[:, None, None]).requires_grad_(True)
    ref = block_loop(moe, x, rec.ids_TK, rec.weights_TK, w_in=w_in_eff, w_out=w_out_eff)
    torch.testing.assert_close(y, ref, **TOL)
    # Not the full-precision weights:
    assert not torch.allclose(y, block_loop(moe, x, rec.ids_TK, rec.weights_TK), **TOL)
    # Straight-through: the latent weights get the gradient of the effective ternary weights.
    up = inputs(9, 8, seed=15)
    g_in, g_out = torch.autograd.grad((y * up).sum(), [moe.w_in, moe.w_out])
    r_in, r_out = torch.autograd.grad((ref * up).sum(), [w_in_eff, w_out_eff])
    torch.testing.assert_close(g_in, r_in, **TOL)
    torch.testing.assert_close(g_out, r_out, **TOL)
    assert g_in.abs().sum() > 0 and g_out.abs().sum() > 0


# ------------------------------------------------------------------------------------------ allowed mask


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "top_p"])
def test_allowed_experts_mask(router):
    E, k = 6, 2
    kwargs = dict(top_p=0.7) if router == "top_p" else {}
    moe = make_moe(8, 6, E, k, router=router, backend="torch", **kwargs)
    x = inputs(2, 5, 8, seed=16)
    g = torch.Generator().manual_seed(17)
    allowed = torch.rand(2, 5, E, generator=g) < 0.5
    allowed[..., 0] = True
    allowed[..., 5] = True
    y = moe(x, allowed_experts=allowed)
    assert y.shape == x.shape
    rec = moe.routing
    flat_allowed = allowed.reshape(10, E)
    for t in range(10):
        for e in rec.ids_TK[t].tolist():
            if e >= 0:
                assert flat_allowed[t, e], f"token {t} routed to disallowed expert {e}"
    logits = logits_by_hand(moe, x.reshape(10, 8)).detach()
    if router in ("softmax", "top_p"):
        probs = softmax_by_hand(logits, flat_allowed)
        torch.testing.assert_close(rec.probs_TE, probs, **TOL)
    if router == "sigmoid":  # disallowed experts are reported with score 0
        torch.testing.assert_close(rec.probs_TE, torch.sigmoid(logits) * flat_allowed, **TOL)
        expected = []
        for t in range(10):
            sc = [float(torch.sigmoid(logits[t, e])) if flat_allowed[t, e] else -1.0 for e in range(E)]
            expected.append({e: sc[e] for e in topk_by_hand(sc, k)})
        assert_routing_equal(rec, expected)
    if router == "softmax":
        expected = []
        for t in range(10):
            sc = [float(probs[t, e]) if flat_allowed[t, e] else -1.0 for e in range(E)]
            expected.append({e: sc[e] for e in topk_by_hand(sc, k)})
        assert_routing_equal(rec, expected)
    torch.testing.assert_close(y.reshape(10, 8), block_loop(moe, x.reshape(10, 8), rec.ids_TK, rec.weights_TK), **TOL)


def test_allowed_experts_bad_shape_and_unsupported_router():
    moe = make_moe(8, 6, 4, 2)
    with pytest.raises(ValueError, match="allowed_experts must have shape"):
        moe(inputs(3, 8), allowed_experts=torch.ones(3, 5, dtype=torch.bool))
    ec = make_moe(8, 6, 4, 2, router="expert_choice")
    with pytest.raises(ValueError, match="softmax, sigmoid and top_p"):
        ec(inputs(3, 8), allowed_experts=torch.ones(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- backends


CONFIGS = {
    "softmax_full": dict(router="softmax", bias=True, num_shared_experts=1, shared_gate=True, num_null_experts=1,
                         num_copy_experts=1, num_constant_experts=1, capacity_factor=0.75, router_bias=True),
    "sigmoid_groups": dict(router="sigmoid", score_bias=True, num_groups=2, topk_groups=1, routed_scaling=1.5,
                           renormalize=True),
    "top_p": dict(router="top_p", top_p=0.5, expert="geglu"),
    "expert_choice": dict(router="expert_choice", expert="mlp", bias=True),
    "noisy": dict(router="noisy"),
    "ternary": dict(expert="ternary", num_shared_experts=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_backends_agree_on_output_and_gradients(config):
    results = {}
    for backend in ("reference", "torch"):
        moe = make_moe(8, 6, 4, 2, backend=backend, seed=3, **CONFIGS[config])
        moe.eval() if config == "noisy" else moe.train()
        x = inputs(11, 8, seed=18).requires_grad_(True)
        y = moe(x)
        y.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
        results[backend] = (y.detach(), x.grad.clone(), grads, moe.routing.ids_TK)
    (y_r, gx_r, g_r, ids_r), (y_t, gx_t, g_t, ids_t) = results["reference"], results["torch"]
    assert torch.equal(ids_r, ids_t)
    torch.testing.assert_close(y_t, y_r, **TOL)
    torch.testing.assert_close(gx_t, gx_r, **TOL)
    assert g_t.keys() == g_r.keys() and "w_in" in g_t and "router.weight" in g_t
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_backend_switch_after_construction_and_set_backend(monkeypatch):
    calls = []
    real_reference = experts_module._reference_expert_mlp

    def counting(*args, **kwargs):
        calls.append(1)
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(experts_module, "_reference_expert_mlp", counting)
    model = nn.Sequential(make_moe(8, 6, 4, 2, backend="torch", seed=1), nn.Identity(),
                          make_moe(8, 6, 4, 2, backend="torch", seed=2))
    x = inputs(5, 8)
    y_torch = model(x)
    assert calls == []
    model[0].backend = "reference"
    model(x)
    assert len(calls) == 1
    set_backend(model, "reference")
    assert model[0].backend == model[2].backend == "reference"
    y_ref = model(x)
    assert len(calls) == 3
    torch.testing.assert_close(y_ref, y_torch, **TOL)
    set_backend(model, "auto")
    assert model(x).shape == x.shape and len(calls) == 3  # auto on CPU is the torch backend
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*auto, reference, torch, triton"):
        set_backend(model, "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        model[0].backend = "nope"  # refused when set, not at the next forward
    assert model[0].backend == "auto"


# ------------------------------------------------------------------------------------------------ shapes


def test_forward_keeps_shape():
    moe = make_moe(8, 6, 4, 2, backend="torch")
    x = inputs(2, 3, 8, seed=19)
    y = moe(x)
    assert y.shape == (2, 3, 8)
    assert moe.routing.tokens_shape == (2, 3)
    assert moe.routing.ids_TK.shape == (6, 2)
    torch.testing.assert_close(y.reshape(6, 8), moe(x.reshape(6, 8)), **TOL)

    v = inputs(8, seed=20)
    yv = moe(v)
    assert yv.shape == (8,)
    assert moe.routing.tokens_shape == () and moe.routing.ids_TK.shape == (1, 2)
    torch.testing.assert_close(yv, moe(v[None])[0], **TOL)

    image = inputs(2, 4, 4, 8, seed=21)
    assert moe(image).shape == image.shape
    assert moe.routing.ids_TK.reshape(*moe.routing.tokens_shape, -1).shape == (2, 4, 4, 2)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "top_p", "expert_choice", "noisy"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_batch(router, backend):
    kwargs = dict(top_p=0.5) if router == "top_p" else {}
    moe = make_moe(8, 6, 4, 2, router=router, backend=backend, num_shared_experts=1,
                   aux_loss_coefs={"load_balance": 0.01, "z_loss": 0.001}, **kwargs)
    x = torch.zeros(0, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 8)
    assert moe(torch.zeros(2, 0, 8)).shape == (2, 0, 8)
    aux = moe.routing.aux_loss
    assert torch.isfinite(aux) and float(aux.detach()) == 0.0


# ------------------------------------------------------------------------------------------- aux losses


def test_aux_terms_match_formulas():
    coefs = {"load_balance": 0.01, "global_load_balance": 0.02, "z_loss": 0.001, "expert_balance": 0.1,
             "cv2": 0.5, "entropy": 0.3}
    E, k, T = 5, 2, 14
    moe = make_moe(8, 6, E, k, router_bias=True, aux_loss_coefs=coefs, backend="torch")
    x = inputs(T, 8, seed=22)
    moe(x)
    rec = moe.routing
    logits = logits_by_hand(moe, x).detach().double()
    probs = softmax_by_hand(logits)
    counts = torch.tensor([float((rec.ids_TK == e).sum()) for e in range(E)], dtype=torch.float64)
    f = counts / counts.sum()
    P = probs.mean(0)
    switch = E * (f * P).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    expert_balance = ((counts * E / (T * k)) * P).sum()
    gates = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            gates[t, rec.ids_TK[t, j]] += float(rec.weights_TK[t, j])

    def cv2(v):
        return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)

    cv = cv2(gates.sum(0)) + cv2(counts)
    entropy = -(probs * probs.log()).sum(-1).mean()
    expected = {"load_balance": switch, "global_load_balance": switch, "z_loss": z, "expert_balance": expert_balance,
                "cv2": cv, "entropy": entropy}
    assert set(rec.aux_terms) == set(coefs)
    for name, value in expected.items():
        assert float(rec.aux_terms[name]) == pytest.approx(float(value), rel=1e-5), name
        assert not rec.aux_terms[name].requires_grad
    total = sum(coefs[n] * float(v) for n, v in expected.items())
    assert float(rec.aux_loss.detach()) == pytest.approx(total, rel=1e-5)


def test_total_aux_loss_sums_blocks_and_reaches_router():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = make_moe(8, 6, 4, 2, aux_loss_coefs={"load_balance": 0.5}, seed=1)
            self.mid = nn.Linear(8, 8)
            self.b = make_moe(8, 6, 3, 1, aux_loss_coefs={"z_loss": 0.25, "load_balance": 1.0}, seed=2)
            self.c = make_moe(8, 6, 3, 1, seed=3)  # no aux losses

        def forward(self, x):
            return self.c(self.b(self.mid(self.a(x))))

    net = Net()
    assert float(total_aux_loss(net)) == 0.0  # nothing run yet
    x = inputs(10, 8, seed=23)
    net(x)
    a_terms, b_terms = net.a.routing.aux_terms, net.b.routing.aux_terms
    expected = 0.5 * a_terms["load_balance"] + 0.25 * b_terms["z_loss"] + 1.0 * b_terms["load_balance"]
    total = total_aux_loss(net)
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(net.c.routing.aux_loss.detach()) == 0.0
    # z-loss of block b by formula, on its own input
    h = net.mid(net.a(x)).detach()
    z = (torch.logsumexp(logits_by_hand(net.b, h), -1) ** 2).mean()
    assert float(b_terms["z_loss"]) == pytest.approx(float(z.detach()), rel=1e-5)
    total.backward()
    assert net.a.router.weight.grad is not None and net.a.router.weight.grad.abs().sum() > 0
    assert net.b.router.weight.grad is not None and net.b.router.weight.grad.abs().sum() > 0


def test_collect_routing_names():
    model = nn.ModuleDict({
        "enc": nn.Sequential(make_moe(8, 6, 4, 2, seed=1), make_moe(8, 6, 4, 2, seed=2)),
        "dec": make_moe(8, 6, 4, 2, seed=3),
        "unused": make_moe(8, 6, 4, 2, seed=4),
    })
    assert collect_routing(model) == []
    x = inputs(3, 8)
    model["dec"](model["enc"](x))
    records = collect_routing(model)
    assert [name for name, _ in records] == ["enc.0", "enc.1", "dec"]
    assert records[0][1] is model["enc"][0].routing and records[2][1] is model["dec"].routing


# -------------------------------------------------------------------------------------------- bad input


def test_bad_input_wrong_last_dim():
    moe = make_moe(8, 6, 4, 2)
    with pytest.raises(ValueError, match=r"last dimension 8.*\(3, 7\)"):
        moe(inputs(3, 7))
    with pytest.raises(ValueError, match="last dimension 8"):
        moe(torch.tensor(1.0))


def test_bad_input_integer():
    moe = make_moe(8, 6, 4, 2)
    with pytest.raises(TypeError, match="floating"):
        moe(torch.ones(3, 8, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_input_non_finite(bad):
    moe = make_moe(8, 6, 4, 2)
    x = inputs(3, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        moe(x)


def test_bad_config_k_too_large():
    with pytest.raises(ValueError, match=r"top_k must be between 1 and the 5 routable experts, got 6"):
        MoE(8, 6, 3, 6, num_null_experts=1, num_copy_experts=1)
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 6, 3, 0)
    MoE(8, 6, 3, 5, num_null_experts=2)  # k may exceed the computed experts when specials make up the rest


def test_bad_config_unknown_names():
    with pytest.raises(ValueError, match=r"unknown aux losses \['balance'\].*load_balance.*z_loss"):
        MoE(8, 6, 4, 2, aux_loss_coefs={"balance": 1.0})
    with pytest.raises(ValueError, match=r"unknown router 'hash'.*softmax, sigmoid, top_p, expert_choice, noisy"):
        MoE(8, 6, 4, 2, router="hash")
    with pytest.raises(ValueError, match=r"unknown expert kind 'moe'.*swiglu, geglu, mlp, ternary"):
        MoE(8, 6, 4, 2, expert="moe")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*auto, reference, torch, triton"):
        MoE(8, 6, 4, 2, backend="gpu")
    with pytest.raises(ValueError, match="top_p"):
        MoE(8, 6, 4, 2, router="top_p")
    with pytest.raises(ValueError, match=">= 1"):
        MoE(8, 6, 0, 1, num_null_experts=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "top_p", "expert_choice", "noisy"])
def test_block_in_other_dtypes(router, dtype):
    """A block cast with ``.to(dtype)`` runs on inputs of that dtype and matches the float32 block."""
    kwargs = dict(top_p=0.5) if router == "top_p" else {}
    moe = make_moe(8, 6, 4, 2, router=router, backend="torch", num_shared_experts=1, **kwargs).eval()
    x = inputs(6, 8, seed=26)
    y32 = moe(x)
    y = moe.to(dtype)(x.to(dtype))  # noisy: Router.forward runs self.noise(x.float()) on a non-float32 Linear
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(y.float(), y32, **tol)


def test_gated_mlp_as_shared_expert_layout_and_bias_error():
    mlp = GatedMLP(8, 5)
    shared = mlp.as_shared_expert()
    assert torch.equal(shared.w_in_NK, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert shared.w_out_DF is mlp.down_proj.weight and shared.scale_T is None and shared.activation == "silu"
    ungated = GatedMLP(8, 5, activation="gelu", gated=False)
    assert ungated.as_shared_expert().w_in_NK is ungated.up_proj.weight
    with pytest.raises(ValueError, match="a shared expert is bias-free; this GatedMLP has biases"):
        GatedMLP(8, 5, bias=True).as_shared_expert()


# ------------------------------------------------------------------------------------------------ freezing


def _close_to(got: torch.Tensor, expected: torch.Tensor, hidden: int) -> None:
    """Two orders of summing an expert MLP (D- then F-long reductions) on outputs of ``expected``'s size."""
    torch.testing.assert_close(got, expected, **fp_tolerance(torch.float32, hidden, layers=2,
                                                             scale=float(expected.abs().max())))


def _reference_output(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    backend = moe.backend
    moe.backend = "reference"
    try:
        return moe(x)
    finally:
        moe.backend = backend


@torch.no_grad()
def test_unfrozen_layer_sees_a_data_edit():
    """Issue 20's probe: a 256-wide, 8-expert MoE in eval mode, weights edited through ``.data``; the next
    no-grad forward must follow the edit."""
    moe = make_moe(256, 512, 8, 2).eval()
    x = inputs(128, 256)
    before = moe(x)
    moe.w_in.data[:, 1:50, 1:50] += 0.5
    after = moe(x)
    assert (after - before).abs().max() > 0.1
    _close_to(after, _reference_output(moe, x), 512)


@torch.no_grad()
def test_frozen_layer_computes_the_same_and_drops_stale_copies(monkeypatch):
    from moezoo.kernels import cpu_backend

    # packing is oneDNN's: on wherever this torch has it, whichever GEMM library the CPU kind picks by default
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", cpu_backend._onednn_linear_available())
    moe = make_moe(256, 512, 8, 2).eval()
    x = inputs(128, 256)
    plain = moe(x)
    freeze(moe)
    if not moe.frozen:
        pytest.skip("no oneDNN packing in this torch build")
    _close_to(moe(x), plain, 512)
    moe.w_out.mul_(2.0)  # an in-place change: the version counter moves
    doubled = moe(x)
    assert not moe.frozen
    _close_to(doubled, _reference_output(moe, x), 512)
    freeze(moe)
    moe.load_state_dict({k: v.clone() for k, v in moe.state_dict().items()})
    moe(x)
    assert not moe.frozen
    freeze(moe)
    moe.w_in.data[:, :, :8] = 0.0  # .data bypasses the version counter: the documented contract is unfreeze
    unfreeze(moe)
    _close_to(moe(x), _reference_output(moe, x), 512)


def test_freeze_walks_every_routed_block_and_ternary_experts_stay_unpacked():
    model = nn.Sequential(make_moe(16, 8, 4, 2), make_moe(16, 8, 4, 2, expert="ternary"))
    freeze(model)
    assert model[1].frozen is False
    unfreeze(model)
    assert not model[0].frozen


# ------------------------------------------------------------------------- MoE-LLaVA: DeepSpeed's top-2 gating

def expert_output(moe, e, x_D):
    return expert_on_token(x_D, e, moe.w_in, moe.w_out, None, None, moe.activation, moe.gated)


def deepspeed_top2_by_hand(logits, capacity_factor, min_capacity):
    """deepspeed/moe/sharded_moe.py top2gating without noise, written with its one-hot masks: locations by
    cumsum (all first choices before second ones), capacity ceil(T / E * 2 cf) at least min_capacity, gates
    renormalised after the drop; returns per-token (expert, weight) pairs and l_aux."""
    gates = logits.softmax(1)
    T, E = gates.shape
    mask1 = torch.nn.functional.one_hot(gates.argmax(1), E)
    mask2 = torch.nn.functional.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(1), E)
    locations1 = torch.cumsum(mask1, 0) - 1
    locations2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    l_aux = (gates.mean(0) * mask1.float().mean(0)).mean() * E * E
    capacity = max(min_capacity, math.ceil(T / E * capacity_factor * 2))
    mask1 = mask1 * (locations1 < capacity)
    mask2 = mask2 * (locations2 < capacity)
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
    return mask1.argmax(1), g1 / denom, mask2.argmax(1), g2 / denom, l_aux


@pytest.mark.parametrize("capacity_factor, min_capacity", [(1.0, 1), (1.0, 4), (0.5, 1), (1.5, 4)])
def test_gshard_top2_moe_is_deepspeeds_gating_in_eval(capacity_factor, min_capacity):
    torch.manual_seed(0)
    moe = MoE(8, 12, num_experts=4, top_k=2, router="gshard_top2", capacity_factor=2.0,
              eval_capacity_factor=capacity_factor, min_capacity=min_capacity,
              aux_loss_coefs={"top1_balance": 0.01}).double().eval()
    x = torch.randn(24, 8, dtype=torch.float64) * 2
    y = moe(x)
    logits = x.float() @ moe.router.weight.float().t()  # the router runs in float32, as DeepSpeed's gate
    e1, w1, e2, w2, l_aux = (v.double() if v.is_floating_point() else v
                             for v in deepspeed_top2_by_hand(logits, capacity_factor, min_capacity))
    expected = torch.stack([w1[t] * expert_output(moe, int(e1[t]), x[t]) + w2[t] * expert_output(moe, int(e2[t]), x[t])
                            for t in range(24)])
    tol = fp_tolerance(torch.float32, 8, layers=2)  # float32 gates
    torch.testing.assert_close(y, expected, **tol)
    torch.testing.assert_close(moe.routing.aux_terms["top1_balance"].double(), l_aux, **tol)
    if capacity_factor < 1:
        assert moe.routing.dropped > 0  # the test covers the renormalisation after a drop


def test_gshard_top2_samples_the_second_expert_from_the_remaining_softmax_in_training():
    from moezoo.kernels import gshard_top2_route

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).expand(40000, 4)
    out = gshard_top2_route(logits, sample_second=True, generator=torch.Generator().manual_seed(0))
    assert (out.ids_TK[:, 0] == 0).all()
    frequencies = torch.bincount(out.ids_TK[:, 1], minlength=4).double() / 40000
    remaining = torch.tensor([1.0, 0.5, -1.0]).softmax(0).double()  # Gumbel-max: softmax over the others
    assert frequencies[0] == 0
    torch.testing.assert_close(frequencies[1:], remaining, atol=0.01, rtol=0)  # ~4 standard errors
    deterministic = gshard_top2_route(logits[:3], sample_second=False)
    assert deterministic.ids_TK.tolist() == [[0, 1]] * 3


def test_gshard_top2_needs_top_k_2_and_eval_capacity_needs_a_training_one():
    with pytest.raises(ValueError, match="top_k must be 2"):
        MoE(8, 12, num_experts=4, top_k=1, router="gshard_top2")
    with pytest.raises(ValueError, match="eval_capacity_factor needs a capacity_factor"):
        MoE(8, 12, num_experts=4, top_k=2, eval_capacity_factor=1.0)
