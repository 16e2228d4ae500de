"""The dynamic-capacity MoE (moezoo.zoo.layers.dcmoe) against UniMoE-Audio's formulas evaluated token by token here
from the raw parameters: the gate's logits, the official routing loop (tests/helpers.py:
``unimoe_audio_route_token``), the shared/dynamic softmax over the chosen and shared experts, each SwiGLU expert
written out (``expert_on_token``), and the balance loss ``N * sum_i f_i P_i``. Gradients come from autograd
through that loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from moezoo.kernels import pack_expert_weights
from moezoo.zoo.layers import (
    DynamicCapacityMoE,
    MoE,
    anneal_aux_weight,
    collect_routing,
    freeze,
    routing_maps,
    set_aux_weight,
    set_backend,
    total_aux_loss,
    unfreeze,
)
from helpers import expert_on_token, near_tie_dcmoe, unimoe_audio_route_token
from tolerance import fp_tolerance

DIM, HIDDEN, SHARED_HIDDEN = 12, 8, 6
# the gate's dot product, two softmaxes, then two expert products of length <= DIM
TOL = fp_tolerance(torch.float32, DIM, layers=4)
GRAD_TOL = fp_tolerance(torch.float32, DIM, layers=6)


def make_block(seed: int = 0, num_experts: int = 4, **kwargs) -> DynamicCapacityMoE:
    """``near_tie_dcmoe`` (tests/helpers.py) at this file's sizes: experts 0 and 1 nearly tie for every token. In
    eval mode (no input jitter) unless a test trains it."""
    kwargs.setdefault("shared_hidden_dim", SHARED_HIDDEN)
    return near_tie_dcmoe(DIM, HIDDEN, num_experts, seed, **kwargs)


def inputs(*shape, seed=1, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def block_by_loop(block: DynamicCapacityMoE, x_TD: torch.Tensor, gate_x_TD: torch.Tensor | None = None,
                  kept: list[list[bool]] | None = None):
    """Per token: (output, chosen experts, their weights as applied: w * dynamic mass). ``gate_x_TD``: the gate's
    input if not x (jitter); ``kept``: per token and chosen slot, whether capacity kept it."""
    N, E, S = block.num_dynamic, block.num_experts, block.num_shared_experts
    gate_x_TD = x_TD if gate_x_TD is None else gate_x_TD
    rows, chosen_all, weights_all = [], [], []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        logits = (block.gate.weight * gate_x_TD[t][None, :]).sum(-1)
        chosen, w = unimoe_audio_route_token(logits[:N], block.top_p, block.router_jitter)
        keep = [True] * len(chosen) if kept is None else kept[t]
        if kept is not None:  # the official drop: mask, renormalise again
            w = w * torch.tensor(keep, dtype=w.dtype)
            w = w / (w.sum() + 1e-6)
        visible = [e for e, k in zip(chosen, keep) if k] + [N + s for s in range(S)]
        g = torch.softmax(torch.stack([logits[i] for i in visible]), 0) if S else None
        mass = g[: len(visible) - S].sum() if S else 1.0
        y = torch.zeros_like(x)
        for e, we, k in zip(chosen, w, keep):
            if k and e < E:  # null experts output zero
                y = y + we * mass * expert_on_token(x, e, block.w_in, block.w_out, None, None, "silu", True)
        for s in range(S):
            share = g[len(visible) - S + s]
            y = y + share * expert_on_token(x, s, block.shared_w_in, block.shared_w_out, None, None, "silu", True)
        rows.append(y)
        chosen_all.append(chosen)
        weights_all.append(w * mass)
    return torch.stack(rows), chosen_all, weights_all


PARAMS = ("gate.weight", "w_in", "w_out", "shared_w_in", "shared_w_out")


def grads_of(block, x, y, cotangent):
    named = dict(block.named_parameters())
    return torch.autograd.grad(y, [named[n] for n in PARAMS] + [x], cotangent)


# ----------------------------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_output_and_gradients_follow_the_formulas_token_by_token(backend):
    block = make_block(backend=backend)
    x = inputs(3, 7, DIM, grad=True)
    y = block(x)
    by_loop, chosen, _ = block_by_loop(block, x.reshape(-1, DIM))
    torch.testing.assert_close(y.reshape(-1, DIM), by_loop, **TOL)
    cotangent = inputs(21, DIM, seed=2)
    for got, want in zip(grads_of(block, x, y.reshape(-1, DIM), cotangent), grads_of(block, x, by_loop, cotangent)):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    sizes = {len(c) for c in chosen}
    assert len(sizes) > 1  # the number of experts varies per token
    assert any(0 in c and 1 in c for c in chosen)  # the near tie is exercised


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_with_the_reference_backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    x = inputs(2, 9, DIM, seed=3, grad=True)
    cotangent = inputs(2, 9, DIM, seed=4)
    results = []
    for backend in ("reference", backend):
        block = make_block(seed=5, backend=backend)
        y = block(x)
        results.append((y, *torch.autograd.grad(y, list(block.parameters()) + [x], cotangent)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def test_a_token_that_picks_only_the_null_expert_gets_the_shared_experts_alone():
    block = make_block(seed=1)
    x = inputs(1, DIM, seed=6, grad=True)
    with torch.no_grad():  # the null expert's logit 3|x|^2 dwarfs the routed experts' logits
        block.gate.weight[: block.num_experts] *= 0.01
        block.gate.weight[block.num_experts] = 3 * x.detach()[0]
    y = block(x)
    assert block.routing.ids_TK.tolist() == [[block.num_experts]]
    assert block.experts_per_token().tolist() == [1] and block.experts_per_token(count_null=False).tolist() == [0]
    logits = block.gate.weight @ x[0]
    shares = torch.softmax(logits[block.num_experts :], 0)[1:]  # softmax over {null, shared 0, shared 1}
    shared = [expert_on_token(x[0], s, block.shared_w_in, block.shared_w_out, None, None, "silu", True) for s in (0, 1)]
    torch.testing.assert_close(y[0], shares[0] * shared[0] + shares[1] * shared[1], **TOL)
    y.sum().backward()
    assert torch.equal(block.w_in.grad, torch.zeros_like(block.w_in))  # no routed expert ran
    assert block.shared_w_in.grad.abs().sum() > 0


def test_a_token_that_needs_every_routed_and_null_expert():
    """Equal dynamic logits (0): top-p at 0.95 needs all N experts; every pick ties with all remaining experts, so
    the official multipliers are 1/N, 1/(N-1), ..., 1 before renormalising."""
    block = make_block(seed=2, top_p=0.95)
    with torch.no_grad():
        block.gate.weight[: block.num_dynamic] = 0.0
    x = inputs(2, DIM, seed=7)
    y = block(x)
    N = block.num_dynamic
    assert block.routing.ids_TK.tolist() == [list(range(N))] * 2
    assert block.experts_per_token().tolist() == [N, N]
    torch.testing.assert_close(y, block_by_loop(block, x)[0], **TOL)
    multipliers = torch.tensor([1 / (N - i) for i in range(N)])
    logits = x @ block.gate.weight.T
    mass = torch.softmax(logits, -1)[:, :N].sum(-1, keepdim=True)  # all N visible: the full softmax
    torch.testing.assert_close(block.routing.weights_TK, multipliers / (multipliers.sum() + 1e-6) * mass, **TOL)


def test_p_edge_cases():
    x = inputs(16, DIM, seed=8)
    one = make_block(seed=3, top_p=1e-6)
    y = one(x)
    assert (one.experts_per_token() == 1).all()
    torch.testing.assert_close(y, block_by_loop(one, x)[0], **TOL)
    # p = 1: every dynamic expert (the float32 official sum may fall short of 1 and route the token nowhere)
    everything = make_block(seed=3, top_p=1.0)
    everything(x)
    assert (everything.experts_per_token() == everything.num_dynamic).all()


def test_no_shared_experts_keep_the_renormalised_weights():
    block = make_block(seed=4, num_shared_experts=0)
    x = inputs(10, DIM, seed=9)
    y = block(x)
    by_loop, _, weights = block_by_loop(block, x)
    torch.testing.assert_close(y, by_loop, **TOL)
    assert block.shared_w_in is None and block.gate.weight.shape[0] == block.num_dynamic
    for t, w in enumerate(weights):
        torch.testing.assert_close(block.routing.weights_TK[t, : len(w)], w, **TOL)


# ----------------------------------------------------------------------------------------------- record, loss


def test_the_record_and_experts_per_token():
    block = make_block(seed=6)
    x = inputs(2, 5, DIM, seed=10)
    block(x)
    _, chosen, weights = block_by_loop(block, x.reshape(-1, DIM))
    record = block.routing
    N = block.num_dynamic
    k_max = max(len(c) for c in chosen)
    assert record.ids_TK.shape == (10, k_max) and record.tokens_shape == (2, 5)
    for t, (c, w) in enumerate(zip(chosen, weights)):
        assert record.ids_TK[t].tolist() == c + [-1] * (k_max - len(c))
        torch.testing.assert_close(record.weights_TK[t, : len(c)], w, **TOL)
    logits = x.reshape(-1, DIM) @ block.gate.weight.T
    torch.testing.assert_close(record.probs_TE, torch.softmax(logits[:, :N], -1), **TOL)
    assert record.load_E.tolist() == [float(sum(e in c for c in chosen)) for e in range(N)]
    assert record.dropped == 0
    assert block.experts_per_token().tolist() == [[len(c) for c in chosen[:5]], [len(c) for c in chosen[5:]]]
    routed_only = [[sum(e < block.num_experts for e in c) for c in chosen[i : i + 5]] for i in (0, 5)]
    assert block.experts_per_token(count_null=False).tolist() == routed_only
    assert block.expert_labels() == ["e0", "e1", "e2", "e3", "null 0"]


def test_balance_loss_by_formula_averaged_over_layers_and_annealed():
    net = nn.Sequential(make_block(seed=7), make_block(seed=8), make_block(seed=9))
    x = inputs(20, DIM, seed=11)
    net(x)
    terms = []
    h = x
    for block in net:
        logits = h @ block.gate.weight.T
        N = block.num_dynamic
        _, chosen, _ = block_by_loop(block, h)
        fraction = torch.tensor([sum(e in c for c in chosen) / len(chosen) for e in range(N)])
        restricted = torch.zeros(len(chosen), N)
        for t, c in enumerate(chosen):
            restricted[t, c] = torch.softmax(logits[t, c], 0)
        terms.append(N * (fraction * restricted.mean(0)).sum())
        torch.testing.assert_close(block.routing.aux_terms["chosen_balance"], terms[-1].detach(), **TOL)
        torch.testing.assert_close(block.routing.aux_loss, 0.025 * terms[-1], **TOL)
        h = block(h)
    assert set_aux_weight(net, 0.013) == 3
    net(x)
    torch.testing.assert_close(total_aux_loss(net), 0.013 * torch.stack(terms).mean(), **TOL)
    total_aux_loss(net).backward()
    assert net[0].gate.weight.grad.abs().sum() > 0  # the loss trains the gate


def test_anneal_aux_weight_is_linear_then_flat():
    assert anneal_aux_weight(0, 10_000) == 0.025
    assert anneal_aux_weight(5_000, 10_000) == pytest.approx(0.013)
    assert anneal_aux_weight(9_999, 10_000) == pytest.approx(0.025 - 0.024 * 0.9999)
    assert anneal_aux_weight(10_000, 10_000) == anneal_aux_weight(50_000, 10_000) == 0.001
    assert anneal_aux_weight(3, 4, start=1.0, end=0.0) == 0.25
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        anneal_aux_weight(0, 0)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        anneal_aux_weight(-1, 10)
    with pytest.raises(ValueError, match="has no DynamicCapacityMoE"):
        set_aux_weight(nn.Linear(2, 2), 0.1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        set_aux_weight(make_block(), float("nan"))


# ----------------------------------------------------------------------------------------------- jitter, capacity


def test_input_jitter_multiplies_the_gate_input_in_training_only():
    block = make_block(seed=10, input_jitter=0.3)
    x = inputs(12, DIM, seed=12)
    block.eval()
    torch.testing.assert_close(block(x), block_by_loop(block, x)[0], **TOL)
    block.train()
    torch.manual_seed(123)
    y = block(x)
    torch.manual_seed(123)  # the block draws one uniform tensor shaped like the tokens, first
    noise = torch.empty(12, DIM).uniform_(0.7, 1.3)
    jittered, _, _ = block_by_loop(block, x, gate_x_TD=x * noise)
    torch.testing.assert_close(y, jittered, **TOL)
    assert not torch.allclose(y, block_by_loop(block, x)[0])
    # the router's jitter is a tie tolerance, not noise: without input jitter, training is deterministic
    calm = make_block(seed=10, input_jitter=0.0).train()
    torch.testing.assert_close(calm(x), calm.eval()(x), rtol=0, atol=0)


def test_token_drop_keeps_each_experts_highest_logits():
    block = make_block(seed=11, token_drop=True, capacity_factor=0.5, min_capacity=1)
    x = inputs(20, DIM, seed=13)
    y = block(x)
    N = block.num_dynamic
    capacity = max(math.ceil(20 / N * 0.5), 1)
    logits = x @ block.gate.weight.T
    _, chosen, _ = block_by_loop(block, x)
    kept_pairs = set()
    for e in range(N):
        takers = sorted((t for t, c in enumerate(chosen) if e in c), key=lambda t: -float(logits[t, e].detach()))
        kept_pairs |= {(t, e) for t in takers[:capacity]}
    kept = [[(t, e) in kept_pairs for e in c] for t, c in enumerate(chosen)]
    by_loop, _, weights = block_by_loop(block, x, kept=kept)
    torch.testing.assert_close(y, by_loop, **TOL)
    total = sum(len(c) for c in chosen)
    assert block.routing.dropped == total - len(kept_pairs) > 0
    assert block.routing.load_E.tolist() == [float(sum((t, e) in kept_pairs for t in range(20))) for e in range(N)]
    for t, w in enumerate(weights):
        torch.testing.assert_close(block.routing.weights_TK[t, : len(w)], w, **TOL)


# ----------------------------------------------------------------------------------------------- walkers, errors


def test_walkers_see_it_and_freeze_keeps_the_output():
    net = nn.Sequential(make_block(seed=12), nn.Tanh(), MoE(DIM, HIDDEN, 3, 2), make_block(seed=13))
    x = inputs(2, 6, DIM, seed=14)
    y = net(x)
    assert [name for name, _ in collect_routing(net)] == ["0", "2", "3"]
    maps = routing_maps(net)
    assert [m.shape for m in maps] == [(2, 6)] * 3
    assert torch.equal(maps[0], net[0].routing.ids_TK[:, 0].reshape(2, 6))
    torch.testing.assert_close(total_aux_loss(net), sum(r.aux_loss for _, r in collect_routing(net)))
    set_backend(net, "reference")
    assert net[0].backend == net[3].backend == "reference"
    set_backend(net, "torch")
    packable = pack_expert_weights(net[0].w_in, net[0].w_out) is not None  # packing needs oneDNN's fp32 linear
    with torch.no_grad():
        freeze(net)
        assert net[0].frozen == net[3].frozen == packable
        torch.testing.assert_close(net(x), y, **TOL)
        net[0].w_in.mul_(2.0)  # an in-place change drops the packed copy: the block computes on the live weights
        net(x)
        assert not net[0].frozen
        unfreeze(net)
        assert not net[3].frozen


def test_routing_before_a_forward_is_an_error():
    with pytest.raises(RuntimeError, match="run a forward first"):
        make_block().experts_per_token()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "num_experts must be an integer >= 1"),
    ({"num_null_experts": -1}, "num_null_experts must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0.0, 1.0\]"),
    ({"top_p": 1.2}, r"top_p must be a number in \(0.0, 1.0\]"),
    ({"input_jitter": 1.0}, r"input_jitter must be a number in \[0.0, 1.0\)"),
    ({"router_jitter": -0.01}, "router_jitter must be a number"),
    ({"capacity_factor": 0}, "capacity_factor must be a number"),
    ({"token_drop": 1}, "token_drop must be a bool"),
    ({"activation": "tanh"}, "unknown activation 'tanh'"),
    ({"aux_loss_coef": float("inf")}, "must be a finite number"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = {"num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        DynamicCapacityMoE(DIM, HIDDEN, **args)


def test_bad_inputs_are_refused():
    block = make_block()
    with pytest.raises(ValueError, match=f"last dimension {DIM}"):
        block(torch.zeros(3, DIM + 1))
    with pytest.raises(TypeError, match="floating tensor"):
        block(torch.zeros(3, DIM, dtype=torch.long))
