"""Auxiliary losses against their formulas, computed by hand with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import fp_tolerance

from moezoo.kernels.losses import (
    cv_squared,
    expert_balance_loss,
    importance_load_loss,
    router_z_loss,
    routing_entropy,
    switch_load_balance_loss,
)

PROBS = [
    [0.7, 0.2, 0.1],
    [0.1, 0.6, 0.3],
    [0.3, 0.3, 0.4],
    [0.5, 0.25, 0.25],
]
IDS = [[0, 1], [1, 2], [2, -1], [0, 3]]  # -1 (unused top-p slot) and 3 (>= E) are not dispatched
# fp32 losses against the formulas in double precision: every loss here chains at most three reductions (over
# tokens, experts or slots, each of at most 4 terms) and a few elementwise steps
LOSS_TOL = fp_tolerance(torch.float32, 4, layers=3)


def assert_matches(value: float, expected: float) -> None:
    torch.testing.assert_close(value, expected, **LOSS_TOL)


def hand_switch(probs, ids, E):
    counts = [0] * E
    for row in ids:
        for e in row:
            if 0 <= e < E:
                counts[e] += 1
    total = sum(counts)
    P = [sum(r[i] for r in probs) / len(probs) for i in range(E)]
    return E * sum(counts[i] / total * P[i] for i in range(E)), counts, P


def test_switch_load_balance_matches_hand():
    probs = torch.tensor(PROBS)
    ids = torch.tensor(IDS)
    expected, counts, P = hand_switch(PROBS, IDS, 3)
    assert counts == [2, 2, 2]
    loss = switch_load_balance_loss(probs, ids, 3)
    assert loss.shape == ()
    assert_matches(loss.item(), expected)


def test_switch_load_balance_gradient_is_e_f_over_t():
    probs = torch.tensor(PROBS, requires_grad=True)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 0]])
    switch_load_balance_loss(probs, ids, 3).backward()
    f = [5 / 8, 2 / 8, 1 / 8]
    for t in range(4):
        for i in range(3):
            assert_matches(probs.grad[t, i].item(), 3 * f[i] / 4)


def test_switch_load_balance_perfect_balance_is_one():
    probs = torch.full((6, 3), 1 / 3)
    ids = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert_matches(switch_load_balance_loss(probs, ids, 3).item(), 1.0)


def test_switch_load_balance_global_without_distributed_equals_local():
    probs = torch.tensor(PROBS)
    ids = torch.tensor(IDS)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    local = switch_load_balance_loss(probs, ids, 3)
    assert torch.equal(switch_load_balance_loss(probs, ids, 3, global_batch=True), local)


def test_switch_load_balance_global_batch_all_reduces_counts(monkeypatch):
    """Two simulated data-parallel ranks: the all-reduce adds the other rank's counts (a stand-in for
    torch.distributed, so the test needs no second process)."""
    ranks = [
        {"probs": PROBS[:2], "ids": [[0, 0], [0, 1]]},  # counts [3, 1, 0]
        {"probs": PROBS[2:], "ids": [[2, 2], [1, 2]]},  # counts [0, 1, 3]
    ]
    other_counts = {0: [0.0, 1.0, 3.0], 1: [3.0, 1.0, 0.0]}
    sentinel_group = object()
    calls = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        calls.append((op, group))
        tensor += torch.tensor(other_counts[rank], dtype=tensor.dtype)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    f = [3 / 8, 2 / 8, 3 / 8]  # global counts [3, 2, 3] over 8 slots
    for rank in range(2):
        probs = torch.tensor(ranks[rank]["probs"], requires_grad=True)
        ids = torch.tensor(ranks[rank]["ids"])
        loss = switch_load_balance_loss(probs, ids, 3, global_batch=True, group=sentinel_group)
        P = [sum(row[i] for row in ranks[rank]["probs"]) / 2 for i in range(3)]
        assert_matches(loss.item(), 3 * sum(f[i] * P[i] for i in range(3)))
        loss.backward()
        for t in range(2):
            for i in range(3):
                assert_matches(probs.grad[t, i].item(), 3 * f[i] / 2)
        # The micro-batch loss does not communicate.
        n_calls = len(calls)
        local = switch_load_balance_loss(probs, ids, 3)
        assert len(calls) == n_calls
        assert_matches(local.item(), hand_switch(ranks[rank]["probs"], ranks[rank]["ids"], 3)[0])
    assert calls == [(torch.distributed.ReduceOp.SUM, sentinel_group)] * 2


def test_switch_load_balance_global_batch_real_single_rank_group(tmp_path):
    """A real (one-rank gloo) process group: the all-reduce path runs and equals the local loss."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised by another test")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        probs, ids = torch.tensor(PROBS), torch.tensor(IDS)
        got = switch_load_balance_loss(probs, ids, 3, global_batch=True)
        assert_matches(got.item(), switch_load_balance_loss(probs, ids, 3).item())
    finally:
        dist.destroy_process_group()


def test_expert_balance_loss_matches_dit_moe_formula():
    probs = torch.tensor(PROBS)
    ids = torch.tensor([[0, 1], [1, 2], [2, 1], [0, 0]])
    N, k, E = 4, 2, 3
    counts = [0] * E
    for row in ids.tolist():
        for e in row:
            counts[e] += 1
    f = [E / (N * k) * c for c in counts]
    P = [sum(r[i] for r in PROBS) / N for i in range(E)]
    expected = sum(f[i] * P[i] for i in range(E))
    assert_matches(expert_balance_loss(probs, ids, E).item(), expected)
    # With every slot dispatched it equals the Switch loss.
    assert_matches(expert_balance_loss(probs, ids, E).item(), switch_load_balance_loss(probs, ids, E).item())


def test_expert_balance_loss_undispatched_slots_still_count_in_nk():
    probs = torch.tensor(PROBS)
    ids = torch.tensor(IDS)
    counts = [2, 2, 2]
    P = [sum(r[i] for r in PROBS) / 4 for i in range(3)]
    expected = sum(3 / 8 * counts[i] * P[i] for i in range(3))
    assert_matches(expert_balance_loss(probs, ids, 3).item(), expected)


def test_router_z_loss_matches_hand():
    logits = [[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]]
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 2
    x = torch.tensor(logits, requires_grad=True)
    loss = router_z_loss(x)
    assert_matches(loss.item(), expected)
    loss.backward()
    # d/dx (lse^2)/T = 2 lse softmax / T
    row = logits[0]
    lse = math.log(sum(math.exp(v) for v in row))
    assert_matches(x.grad[0, 0].item(), 2 * lse * math.exp(row[0] - lse) / 2)


def test_cv_squared_matches_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    mean = sum(x) / 4
    var = sum((v - mean) ** 2 for v in x) / 3  # unbiased
    assert_matches(cv_squared(torch.tensor(x)).item(), var / (mean**2 + 1e-10))
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    assert cv_squared(torch.zeros(0)).item() == 0.0
    assert cv_squared(torch.full((4,), 2.0)).item() == 0.0
    assert_matches(cv_squared(torch.tensor(x), eps=1.0).item(), var / (mean**2 + 1.0))


def test_importance_load_loss_matches_hand():
    gates = [[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.9, 0.0, 0.1]]
    load = [2.0, 1.5, 0.5]

    def cv2(v):
        m = sum(v) / len(v)
        return sum((a - m) ** 2 for a in v) / (len(v) - 1) / (m * m + 1e-10)

    importance = [sum(r[i] for r in gates) for i in range(3)]
    g = torch.tensor(gates, requires_grad=True)
    l = torch.tensor(load, requires_grad=True)
    loss = importance_load_loss(g, l)
    assert_matches(loss.item(), cv2(importance) + cv2(load))
    loss.backward()
    assert g.grad.abs().sum() > 0 and l.grad.abs().sum() > 0


def test_routing_entropy_matches_hand_and_is_safe_at_zero():
    probs = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    expected = sum(-sum(p * math.log(p) for p in row if p > 0) for row in probs) / 3
    x = torch.tensor(probs, requires_grad=True)
    h = routing_entropy(x)
    assert_matches(h.item(), expected)
    h.backward()
    assert bool(torch.isfinite(x.grad).all())
    # d/dp (-p log p) / T = -(log p + 1) / T
    assert_matches(x.grad[1, 0].item(), -(math.log(0.2) + 1) / 3)
    assert_matches(routing_entropy(torch.full((2, 4), 0.25)).item(), math.log(4))


def test_empty_batch_losses_are_zero():
    probs = torch.zeros(0, 3, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.long)
    for loss in (
        switch_load_balance_loss(probs, ids, 3),
        expert_balance_loss(probs, ids, 3),
        router_z_loss(probs),
        routing_entropy(probs),
        importance_load_loss(probs, torch.zeros(3)),
    ):
        assert loss.shape == () and loss.item() == 0.0
    switch_load_balance_loss(probs, ids, 3).backward()  # still attached to the graph


def test_losses_keep_float64():
    probs = torch.tensor(PROBS, dtype=torch.float64)
    assert switch_load_balance_loss(probs, torch.tensor(IDS), 3).dtype == torch.float64
    assert router_z_loss(probs).dtype == torch.float64


def test_loss_bad_inputs():
    probs = torch.tensor(PROBS)
    ids = torch.tensor(IDS)
    with pytest.raises(TypeError, match="floating"):
        switch_load_balance_loss(ids, ids, 3)
    with pytest.raises(TypeError, match="integer"):
        switch_load_balance_loss(probs, ids.float(), 3)
    with pytest.raises(ValueError, match="same number of tokens"):
        switch_load_balance_loss(probs, ids[:3], 3)
    with pytest.raises(ValueError, match="num_experts=4"):
        expert_balance_loss(probs, ids, 4)
    with pytest.raises(ValueError, match="num_experts"):
        switch_load_balance_loss(probs, ids, 0)
    with pytest.raises(ValueError, match=r"2-D"):
        switch_load_balance_loss(probs[0], ids, 3)
    with pytest.raises(TypeError, match="floating"):
        router_z_loss(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        router_z_loss(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="load_E"):
        importance_load_loss(probs, torch.ones(4))
    with pytest.raises(TypeError, match="floating"):
        cv_squared(torch.ones(3, dtype=torch.long))


def test_top1_balance_is_deepspeeds_top2gating_loss_and_mochas_per_sample():
    from moezoo.kernels.losses import top1_balance_loss

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(12, 4, generator=g, dtype=torch.float64).softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    # DeepSpeed sharded_moe.top2gating: me = mean(gates, 0); ce = mean(mask1, 0); l_aux = mean(me * ce) * E * E
    mask1 = torch.nn.functional.one_hot(probs.argmax(-1), 4).double()
    deepspeed = (probs.mean(0) * mask1.mean(0)).mean() * 16
    torch.testing.assert_close(top1_balance_loss(probs, ids, 4), deepspeed)
    # MoCHA: the same per sample (3 samples of 4 tokens), averaged
    per_sample = torch.stack([(probs[s:s + 4].mean(0) * mask1[s:s + 4].mean(0)).mean() * 16 for s in (0, 4, 8)])
    torch.testing.assert_close(top1_balance_loss(probs, ids, 4, num_samples=3), per_sample.mean())
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(top1_balance_loss(uniform, torch.arange(4)[:, None], 4), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot be 5 equal samples"):
        top1_balance_loss(probs, ids, 4, num_samples=5)
