"""Routers against their formulas, computed independently per token in plain Python."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tolerance import fp_tolerance

from moezoo.kernels.plan import build_plan
from moezoo.kernels.routing import (
    RouterOutput,
    expert_choice_route,
    noisy_topk_route,
    top_p_route,
    topk_route,
)


def softmax_row(row, allowed=None):
    """Plain-Python softmax of a list, over the allowed positions only (others get 0)."""
    allowed = allowed if allowed is not None else [True] * len(row)
    m = max(v for v, a in zip(row, allowed) if a)
    ex = [math.exp(v - m) if a else 0.0 for v, a in zip(row, allowed)]
    s = sum(ex)
    return [e / s for e in ex]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def argsort_desc(values):
    return sorted(range(len(values)), key=lambda i: -values[i])


# fp32 router outputs against the formulas in double precision: a softmax (a reduction over at most 8 experts),
# then a renormalisation over the chosen (a second)
ROUTER_TOL = fp_tolerance(torch.float32, 8, layers=2)


def close(value: float, expected: float, tol: dict = ROUTER_TOL) -> bool:
    """``assert_close``'s rule (``atol + rtol * |expected|``) on two numbers."""
    return abs(value - expected) <= tol["atol"] + tol["rtol"] * abs(expected)


# ------------------------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_matches_hand(renormalize):
    torch.manual_seed(0)
    logits = torch.randn(7, 6)
    out = topk_route(logits, 2, renormalize=renormalize)
    assert isinstance(out, RouterOutput)
    assert out.ids_TK.dtype == torch.int64 and out.ids_TK.shape == (7, 2)
    for t, row in enumerate(logits.tolist()):
        p = softmax_row(row)
        top = argsort_desc(p)[:2]
        w = [p[i] for i in top]
        if renormalize:
            w = [x / sum(w) for x in w]
        assert out.ids_TK[t].tolist() == top
        for j in range(2):
            assert close(out.weights_TK[t, j].item(), w[j])
        for e in range(6):
            assert close(out.probs_TE[t, e].item(), p[e])
    assert out.logits_TE is logits
    assert out.load_E is None


def test_topk_sigmoid_renormalize_scaling():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.5, -2.0, 0.3]])
    out = topk_route(logits, 2, scoring="sigmoid", renormalize=True, scaling=2.5)
    for t, row in enumerate(logits.tolist()):
        s = [sigmoid(v) for v in row]
        top = argsort_desc(s)[:2]
        total = sum(s[i] for i in top)
        assert out.ids_TK[t].tolist() == top
        for j, i in enumerate(top):
            assert close(out.weights_TK[t, j].item(), 2.5 * s[i] / total)
        assert close(out.probs_TE[t, 0].item(), s[0])


def test_topk_weights_are_float32_and_differentiable():
    logits = torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True)
    out = topk_route(logits, 2)
    assert out.weights_TK.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    out.weights_TK[:, 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_score_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = topk_route(logits, 1, scoring="sigmoid")
    assert plain.ids_TK.tolist() == [[0]]
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    biased = topk_route(logits, 1, scoring="sigmoid", score_bias_E=bias)
    assert biased.ids_TK.tolist() == [[3]]
    # The weight is the unbiased score of the chosen expert.
    assert close(biased.weights_TK[0, 0].item(), sigmoid(-1.0))
    assert torch.equal(biased.probs_TE, plain.probs_TE)
    # Same with softmax scoring and k=2.
    out = topk_route(logits, 2, score_bias_E=torch.tensor([0.0, -1.0, 0.0, 1.0]))
    p = softmax_row(logits[0].tolist())
    assert sorted(out.ids_TK[0].tolist()) == [0, 3]
    assert all(close(got, want) for got, want in zip(sorted(out.weights_TK[0].tolist()), sorted([p[0], p[3]])))


def group_limited_reference(scores, bias, k, num_groups, topk_groups, mode, allowed=None):
    """Per-token DeepSeek group-limited greedy top-k, written as a plain loop."""
    E = len(scores)
    size = E // num_groups
    allowed = allowed if allowed is not None else [True] * E
    choice = [s + b if a else -math.inf for s, b, a in zip(scores, bias, allowed)]
    group_scores = []
    for g in range(num_groups):
        members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
        if mode == "max":
            group_scores.append(members[0])
        else:
            second = members[1] if members[1] != -math.inf else 0.0
            group_scores.append(members[0] + second)
    kept = argsort_desc(group_scores)[:topk_groups]
    candidates = [e for g in kept for e in range(g * size, (g + 1) * size) if allowed[e]]
    candidates.sort(key=lambda e: -choice[e])
    return candidates[:k]


@pytest.mark.parametrize("scoring,mode", [("softmax", "max"), ("sigmoid", "top2sum"), ("softmax", "top2sum"), ("sigmoid", "max")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited_matches_per_token_loop(scoring, mode, with_bias):
    gen = torch.Generator().manual_seed(1)
    T, E, G, TG, k = 12, 8, 4, 2, 3
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.3 if with_bias else torch.zeros(E)
    out = topk_route(
        logits, k, scoring=scoring, score_bias_E=bias if with_bias else None,
        num_groups=G, topk_groups=TG, group_score=mode,
    )
    for t, row in enumerate(logits.tolist()):
        scores = softmax_row(row) if scoring == "softmax" else [sigmoid(v) for v in row]
        expected = group_limited_reference(scores, bias.tolist(), k, G, TG, mode)
        assert out.ids_TK[t].tolist() == expected
        for j, e in enumerate(expected):
            assert close(out.weights_TK[t, j].item(), scores[e])


def test_group_score_default_depends_on_scoring():
    # Group 0 = experts {0,1}: one strong expert; group 1 = experts {2,3}: two fairly strong ones.
    # max picks group 0, top2sum picks group 1.
    logits = torch.tensor([[3.0, -3.0, 2.0, 2.0]])
    sig = topk_route(logits, 1, scoring="sigmoid", num_groups=2, topk_groups=1)
    assert sig.ids_TK.tolist()[0][0] in (2, 3)
    sig_max = topk_route(logits, 1, scoring="sigmoid", num_groups=2, topk_groups=1, group_score="max")
    assert sig_max.ids_TK.tolist() == [[0]]
    soft = topk_route(logits, 1, scoring="softmax", num_groups=2, topk_groups=1)
    assert soft.ids_TK.tolist() == [[0]]


def test_group_limited_with_allowed_mask():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(10, 8, generator=gen)
    allowed = torch.ones(10, 8, dtype=torch.bool)
    allowed[:, 0] = False
    allowed[::2, 5] = False
    out = topk_route(logits, 2, scoring="sigmoid", num_groups=4, topk_groups=2, allowed_TE=allowed)
    for t, row in enumerate(logits.tolist()):
        scores = [sigmoid(v) for v in row]
        expected = group_limited_reference(scores, [0.0] * 8, 2, 4, 2, "top2sum", allowed[t].tolist())
        assert out.ids_TK[t].tolist() == expected


def test_allowed_mask_softmax_over_allowed_only():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=gen)
    allowed = torch.tensor(
        [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    out = topk_route(logits, 2, allowed_TE=allowed)
    for t, row in enumerate(logits.tolist()):
        p = softmax_row(row, allowed[t].tolist())
        top = argsort_desc(p)[:2]
        assert out.ids_TK[t].tolist() == top
        assert all(allowed[t, e] for e in out.ids_TK[t].tolist())
        for e in range(5):
            assert close(out.probs_TE[t, e].item(), p[e])
    sig = topk_route(logits, 2, scoring="sigmoid", allowed_TE=allowed)
    assert bool(allowed.gather(1, sig.ids_TK).all())
    assert float(sig.probs_TE[~allowed].abs().sum()) == 0.0


def test_allowed_mask_too_few_experts_raises():
    allowed = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="token 0"):
        topk_route(torch.zeros(2, 3), 2, allowed_TE=allowed)
    with pytest.raises(TypeError, match="bool"):
        topk_route(torch.zeros(2, 3), 1, allowed_TE=allowed.int())
    with pytest.raises(ValueError, match="shape"):
        topk_route(torch.zeros(2, 3), 1, allowed_TE=allowed[:, :2])


def test_topk_empty_batch():
    out = topk_route(torch.zeros(0, 6), 2, scoring="sigmoid", num_groups=3, topk_groups=2, renormalize=True)
    assert out.ids_TK.shape == (0, 2) and out.weights_TK.shape == (0, 2) and out.probs_TE.shape == (0, 6)


# ------------------------------------------------------------------------------------------------ top-p


def smallest_sets_reaching(probs, p):
    """Brute force: the minimum size n such that some n-subset has mass >= p, and the best mass at n."""
    E = len(probs)
    for n in range(1, E + 1):
        masses = [sum(probs[i] for i in subset) for subset in itertools.combinations(range(E), n)]
        if max(masses) >= p:
            return n, max(masses)
    return E, sum(probs)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.9])
def test_top_p_picks_smallest_set_brute_force(p):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 6, generator=gen) * 1.5
    out = top_p_route(logits, p)
    sizes = []
    for t in range(20):
        probs = [float(v) for v in out.probs_TE[t].double()]
        n, best = smallest_sets_reaching(probs, p)
        chosen = [e for e in out.ids_TK[t].tolist() if e >= 0]
        sizes.append(len(chosen))
        assert len(chosen) == n, (t, chosen, probs)
        assert len(set(chosen)) == n
        mass = sum(probs[e] for e in chosen)
        # two sums of the same (at most 6) doubles, maybe in another order
        assert mass >= p and close(mass, best, fp_tolerance(torch.float64, 6))
        # weights are the (unnormalised) probabilities; unused slots -1 / 0
        for j, e in enumerate(out.ids_TK[t].tolist()):
            if e >= 0:
                assert close(out.weights_TK[t, j].item(), probs[e])
            else:
                assert out.weights_TK[t, j].item() == 0.0
    assert out.ids_TK.shape[1] == max(sizes)


def test_top_p_explicit_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    out = top_p_route(logits, 0.75)
    assert out.ids_TK.tolist() == [[0, 1], [2, -1]]
    assert out.weights_TK[1, 1].item() == 0.0
    assert top_p_route(logits, 0.4).ids_TK.tolist() == [[0], [2]]
    assert top_p_route(logits, 0.85).ids_TK.tolist() == [[0, 1, 2], [2, 0, -1]]  # ties: lower id first


def test_top_p_max_k_renormalize_and_p_one():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 8, generator=gen) * 0.2  # flat: the sets are large
    full = top_p_route(logits, 0.9)
    capped = top_p_route(logits, 0.9, max_k=3)
    assert full.ids_TK.shape[1] > 3 and capped.ids_TK.shape[1] == 3
    assert torch.equal(capped.ids_TK, full.ids_TK[:, :3])
    renorm = top_p_route(logits, 0.6, renormalize=True)
    torch.testing.assert_close(renorm.weights_TK.sum(-1), torch.ones(9), **fp_tolerance(torch.float32, 8, layers=2))
    every = top_p_route(logits, 1.0)
    assert every.ids_TK.shape == (9, 8) and bool((every.ids_TK >= 0).all())


def test_top_p_allowed_mask():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(8, 6, generator=gen)
    allowed = torch.rand(8, 6, generator=gen) > 0.4
    allowed[:, 0] = True
    out = top_p_route(logits, 1.0, allowed_TE=allowed)
    for t in range(8):
        chosen = sorted(e for e in out.ids_TK[t].tolist() if e >= 0)
        assert chosen == [e for e in range(6) if allowed[t, e]]
        p = softmax_row(logits[t].tolist(), allowed[t].tolist())
        for e in range(6):
            assert close(out.probs_TE[t, e].item(), p[e])
    with pytest.raises(ValueError, match="token"):
        top_p_route(logits, 0.5, allowed_TE=torch.zeros(8, 6, dtype=torch.bool))


def test_top_p_ids_work_with_build_plan_and_gradients():
    logits = torch.randn(5, 4, requires_grad=True)
    out = top_p_route(logits, 0.8)
    plan = build_plan(out.ids_TK, 4)
    assert bool((plan.kept_TK == (out.ids_TK >= 0)).all())
    out.weights_TK.sum().backward()
    assert logits.grad is not None


def test_top_p_empty_batch():
    out = top_p_route(torch.zeros(0, 4), 0.5, max_k=2)
    assert out.ids_TK.shape[0] == 0 and out.weights_TK.shape == out.ids_TK.shape and out.probs_TE.shape == (0, 4)


# ------------------------------------------------------------------------------------------------ expert choice


@pytest.mark.parametrize("capacity", [1, 3, 5])
def test_expert_choice_respects_capacity_and_picks_top_tokens(capacity):
    gen = torch.Generator().manual_seed(7)
    T, E = 6, 4
    logits = torch.randn(T, E, generator=gen)
    out = expert_choice_route(logits, capacity)
    assert out.ids_TK.shape == (T, E) and out.weights_TK.shape == (T, E)
    probs = [softmax_row(r) for r in logits.tolist()]
    for e in range(E):
        column = [probs[t][e] for t in range(T)]
        expected = sorted(argsort_desc(column)[:capacity])
        picked = [t for t in range(T) if out.ids_TK[t, e].item() == e]
        assert picked == expected
        assert all(out.ids_TK[t, e].item() == -1 for t in range(T) if t not in expected)
        for t in range(T):
            want = column[t] if t in expected else 0.0
            assert close(out.weights_TK[t, e].item(), want)


def test_expert_choice_capacity_edges():
    logits = torch.randn(3, 4)
    assert bool((expert_choice_route(logits, 10).ids_TK >= 0).all())  # clamped to T
    assert bool((expert_choice_route(logits, 0).ids_TK == -1).all())
    assert expert_choice_route(torch.zeros(0, 4), 0).ids_TK.shape == (0, 4)
    with pytest.raises(ValueError, match="capacity"):
        expert_choice_route(logits, -1)
    with pytest.raises(TypeError, match="capacity"):
        expert_choice_route(logits, 1.5)


# ------------------------------------------------------------------------------------------------ noisy top-k


def test_noisy_topk_eval_is_deterministic_plain_topk():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 5, generator=gen)
    noise = torch.randn(10, 5, generator=gen)
    a = noisy_topk_route(logits, noise, 2, training=False)
    b = noisy_topk_route(logits, None, 2, training=False)
    assert torch.equal(a.ids_TK, b.ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    counts = [0.0] * 5
    for t, row in enumerate(logits.tolist()):
        top = argsort_desc(row)[:2]
        assert a.ids_TK[t].tolist() == top
        w = softmax_row([row[i] for i in top])
        assert close(a.weights_TK[t, 0].item(), w[0]) and close(a.weights_TK[t, 1].item(), w[1])
        for e in top:
            counts[e] += 1
    assert a.load_E.tolist() == counts


def test_noisy_topk_training_formula_and_seeded_generator():
    gen = torch.Generator().manual_seed(9)
    T, E, k, eps = 8, 5, 2, 1e-2
    logits = torch.randn(T, E, generator=gen)
    noise_logits = torch.randn(T, E, generator=gen)
    a = noisy_topk_route(logits, noise_logits, k, training=True, generator=torch.Generator().manual_seed(123))
    b = noisy_topk_route(logits, noise_logits, k, training=True, generator=torch.Generator().manual_seed(123))
    c = noisy_topk_route(logits, noise_logits, k, training=True, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.ids_TK, b.ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    assert torch.equal(a.load_E, b.load_E)
    assert not torch.equal(a.probs_TE, c.probs_TE)

    draws = torch.randn(T, E, generator=torch.Generator().manual_seed(123)).tolist()
    expected_load = [0.0] * E
    for t in range(T):
        clean = logits[t].tolist()
        std = [math.log1p(math.exp(v)) + eps for v in noise_logits[t].tolist()]
        h = [clean[e] + draws[t][e] * std[e] for e in range(E)]
        top = argsort_desc(h)[:k]
        assert a.ids_TK[t].tolist() == top
        w = softmax_row([h[i] for i in top])
        for j in range(k):
            assert close(a.weights_TK[t, j].item(), w[j])
        for e in range(E):
            others = sorted((h[o] for o in range(E) if o != e), reverse=True)
            bar = others[k - 1]  # e is in the top k iff it beats the k-th best of the others
            z = (clean[e] - bar) / std[e]
            expected_load[e] += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    # each load is a sum over the T tokens of a normal CDF reached through a few elementwise fp32 steps (softplus,
    # the noisy logit, the margin over the k-th best, erf)
    load_tol = fp_tolerance(torch.float32, T, layers=4)
    for e in range(E):
        assert close(a.load_E[e].item(), expected_load[e], load_tol)


def test_noisy_topk_load_is_differentiable():
    logits = torch.randn(6, 4, requires_grad=True)
    noise_logits = torch.randn(6, 4, requires_grad=True)
    out = noisy_topk_route(logits, noise_logits, 1, training=True, generator=torch.Generator().manual_seed(0))
    out.load_E.var().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert noise_logits.grad is not None and noise_logits.grad.abs().sum() > 0


def test_noisy_topk_k_equals_e_and_missing_noise():
    logits = torch.randn(4, 3)
    out = noisy_topk_route(logits, torch.zeros(4, 3), 3, training=True, generator=torch.Generator().manual_seed(0))
    assert out.load_E.tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="noise_logits_TE"):
        noisy_topk_route(logits, None, 1, training=True)
    with pytest.raises(ValueError, match="shape"):
        noisy_topk_route(logits, torch.zeros(4, 2), 1, training=True)
    with pytest.raises(ValueError, match="noise_epsilon"):
        noisy_topk_route(logits, torch.zeros(4, 3), 1, training=True, noise_epsilon=-1.0)


# ------------------------------------------------------------------------------------------------ bad input


ROUTERS = [
    lambda x, **kw: topk_route(x, kw.get("k", 1)),
    lambda x, **kw: top_p_route(x, 0.5),
    lambda x, **kw: expert_choice_route(x, 1),
    lambda x, **kw: noisy_topk_route(x, None, kw.get("k", 1), training=False),
]


@pytest.mark.parametrize("route", ROUTERS)
def test_bad_logits(route):
    with pytest.raises(TypeError, match="floating"):
        route(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        route(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.ones(4))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(3, 4)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="finite"):
            route(x)


@pytest.mark.parametrize("route", [ROUTERS[0], ROUTERS[3]])
@pytest.mark.parametrize("k", [0, -1, 5])
def test_bad_k_names_k_and_e(route, k):
    with pytest.raises(ValueError, match=rf"E=4.*k={k}"):
        route(torch.zeros(3, 4), k=k)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.01, 2])
def test_bad_p(p):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_p_route(torch.zeros(3, 4), p)


def test_bad_topk_options():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="scoring"):
        topk_route(x, 1, scoring="relu")
    with pytest.raises(ValueError, match="both num_groups and topk_groups"):
        topk_route(x, 1, num_groups=4)
    with pytest.raises(ValueError, match="divide"):
        topk_route(x, 1, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="topk_groups"):
        topk_route(x, 1, num_groups=4, topk_groups=5)
    with pytest.raises(ValueError, match="k=5"):
        topk_route(x, 5, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="top2sum"):
        topk_route(x, 1, num_groups=8, topk_groups=2, group_score="top2sum")
    with pytest.raises(ValueError, match="group_score"):
        topk_route(x, 1, num_groups=4, topk_groups=2, group_score="mean")
    with pytest.raises(ValueError, match="score_bias_E"):
        topk_route(x, 1, score_bias_E=torch.zeros(7))
    with pytest.raises(ValueError, match="max_k"):
        top_p_route(x, 0.5, max_k=9)
