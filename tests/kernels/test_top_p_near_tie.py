"""UniMoE-Audio's router (kernels.routing.top_p_near_tie_route) and balance loss (kernels.losses.
chosen_set_balance_loss) against per-token transcriptions of the official algorithm with Python loops: the routing
in tests/helpers.py (``unimoe_audio_route_token``), the loss (``audio_load_balancing_loss_func``) here."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.kernels.losses import chosen_set_balance_loss
from moezoo.kernels import routing
from moezoo.kernels.routing import top_p_near_tie_route
from helpers import unimoe_audio_route_token
from tolerance import fp_tolerance

TOL = fp_tolerance(torch.float32, 16, layers=2)


def logits_with_near_ties(num_tokens: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Random logits where experts 1 and 2, and 3..5, nearly tie with expert 0 and 3 for many tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    wiggle = 1 + 0.03 * (torch.rand(num_tokens, 4, generator=g) - 0.5)
    logits[:, 1] = logits[:, 0] * wiggle[:, 0]
    logits[:, 2] = logits[:, 0] * wiggle[:, 1]
    logits[:, 4] = logits[:, 3] * wiggle[:, 2]
    logits[:, 5] = logits[:, 3] * wiggle[:, 3]
    return logits


@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("p, tolerance", [(0.7, 0.01), (0.4, 0.01), (0.95, 0.05), (0.7, 0.0)])
def test_ids_and_weights_follow_the_official_loop(monkeypatch, p, tolerance, on_host):
    """The tensor form and (without autograd, few slots: decoding) the host form of the weights."""
    monkeypatch.setattr(routing, "NEAR_TIE_HOST_MAX_SLOTS", 1 << 20 if on_host else 0)
    host_calls = []
    host_weights = routing._near_tie_weights_on_host
    monkeypatch.setattr(routing, "_near_tie_weights_on_host", lambda *a: host_calls.append(1) or host_weights(*a))
    logits = logits_with_near_ties(48, 9)
    out = top_p_near_tie_route(logits, p, tie_tolerance=tolerance)
    torch.testing.assert_close(out.probs_TE, torch.softmax(logits, -1), **TOL)
    ties_seen = 0
    for t in range(logits.shape[0]):
        chosen, weights = unimoe_audio_route_token(logits[t], p, tolerance)
        k = len(chosen)
        assert out.ids_TK[t, :k].tolist() == chosen
        assert (out.ids_TK[t, k:] == -1).all() and (out.weights_TK[t, k:] == 0).all()
        torch.testing.assert_close(out.weights_TK[t, :k], weights, **TOL)
        ties_seen += bool((weights - weights.max()).abs().max() > 0.1)
    # the near ties did change weights for many tokens; with no tolerance every weight is 1/(k + 1e-6)
    assert ties_seen > 5 if tolerance else ties_seen == 0
    assert host_calls == ([1] if on_host else [])


def test_gradients_reach_the_logits_through_near_ties_only():
    logits = logits_with_near_ties(24, 9, seed=3).requires_grad_()
    cotangent = torch.randn(24, 9, generator=torch.Generator().manual_seed(4))
    out = top_p_near_tie_route(logits, 0.7)
    (out.weights_TK * cotangent[:, : out.weights_TK.shape[1]]).sum().backward()
    by_loop = logits.detach().clone().requires_grad_()
    total = 0.0
    for t in range(24):
        _, weights = unimoe_audio_route_token(by_loop[t], 0.7, 0.01)
        total = total + (weights * cotangent[t, : weights.shape[0]]).sum()
    total.backward()
    torch.testing.assert_close(logits.grad, by_loop.grad, **TOL)
    assert logits.grad.abs().sum() > 0
    no_ties = logits.detach().clone().requires_grad_()
    top_p_near_tie_route(no_ties, 0.7, tie_tolerance=0.0).weights_TK.sum().backward()
    assert torch.equal(no_ties.grad, torch.zeros_like(no_ties))


def test_equal_logits_take_the_official_pick_order_weights():
    """All logits 0: every remaining expert ties at each pick (0/0 gaps count as ties), so the i-th pick's
    multiplier is 1 / (E - i): 1/9, 1/8, ..., 1 for nine experts, then renormalised."""
    out = top_p_near_tie_route(torch.zeros(2, 9), 0.95)
    assert out.ids_TK.tolist() == [list(range(9))] * 2
    multipliers = torch.tensor([1 / (9 - i) for i in range(9)])
    torch.testing.assert_close(out.weights_TK, (multipliers / (multipliers.sum() + 1e-6)).expand(2, 9), **TOL)


def test_p_edge_cases():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.1], [0.3, 0.2, 0.1, 0.0]])
    tiny = top_p_near_tie_route(logits, 1e-9, tie_tolerance=0.0)
    assert tiny.ids_TK.tolist() == [[0], [0]]
    torch.testing.assert_close(tiny.weights_TK, torch.full((2, 1), 1 / (1 + 1e-6)))
    everything = top_p_near_tie_route(logits, 1.0, tie_tolerance=0.0)
    assert [sorted(row) for row in everything.ids_TK.tolist()] == [[0, 1, 2, 3]] * 2
    # p equal to the top probability: its cumulative sum is not below p, so one expert; a hair more needs two
    top = float(torch.softmax(logits[:1], -1).max())
    assert top_p_near_tie_route(logits[:1], top).ids_TK.shape[1] == 1
    assert top_p_near_tie_route(logits[:1], math.nextafter(top, 1.0)).ids_TK.shape[1] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"p": 0.0}, "p must be a probability mass"),
    ({"p": 1.5}, "p must be a probability mass"),
    ({"p": 0.7, "tie_tolerance": -0.1}, "tie_tolerance must be a finite number >= 0"),
    ({"p": 0.7, "renorm_eps": float("nan")}, "renorm_eps must be a finite number >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        top_p_near_tie_route(torch.zeros(2, 3), **kwargs)


# ------------------------------------------------------------------------------------------------ balance loss


def balance_by_loop(logits: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
    num_tokens, num_experts = logits.shape
    fraction = [sum(e in row for row in chosen) / num_tokens for e in range(num_experts)]
    mean_prob = [0.0] * num_experts
    for t, row in enumerate(chosen):
        restricted = torch.softmax(torch.stack([logits[t, e] for e in row]), 0)
        for e, prob in zip(row, restricted):
            mean_prob[e] = mean_prob[e] + prob / num_tokens
    return num_experts * sum(f * pr for f, pr in zip(fraction, mean_prob))


def test_balance_loss_by_formula_and_its_gradient():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, generator=g).requires_grad_()
    chosen = [[0], [3, 1], [4, 0, 2], [0, 1, 2, 3, 4], [2], [1, 0]]
    ids = torch.full((6, 5), -1)
    for t, row in enumerate(chosen):
        ids[t, : len(row)] = torch.tensor(row)
    loss = chosen_set_balance_loss(logits, ids, 5)
    by_hand = balance_by_loop(logits, chosen)
    torch.testing.assert_close(loss, by_hand, **TOL)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_by_hand,) = torch.autograd.grad(by_hand, logits)
    torch.testing.assert_close(grad, grad_by_hand, **TOL)


def test_balance_loss_edge_cases_and_errors():
    # one expert per token, all to expert 0: f = (1, 0, ...), P = (1, 0, ...): E * 1
    all_to_zero = torch.zeros(4, 1, dtype=torch.long)
    assert float(chosen_set_balance_loss(torch.randn(4, 3), all_to_zero, 3)) == pytest.approx(3.0)
    assert float(chosen_set_balance_loss(torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.long), 3)) == 0.0
    with pytest.raises(ValueError, match="logits_TE must have num_experts=4 columns"):
        chosen_set_balance_loss(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long), 4)
