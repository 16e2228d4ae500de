"""moezoo.kernels.plan / moezoo.kernels.experts (and its torch backend, moezoo.kernels.cpu_backend) against an
independent per-token loop (tests/helpers.py).

The oracle (``loop_moe``) computes ``y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` one token and one slot
at a time from the raw weight tensors with plain torch ops and hand-written activation formulas; gradients
come from autograd through that loop. Capacity is applied by the loop's own GShard counter (all first
choices, in token order, before any second choice).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import act_formula, expert_on_token, gshard_kept, loop_moe
from tolerance import fp_tolerance

import moezoo.kernels.cpu_backend as cpu_backend
from moezoo.kernels import (
    ACTIVATIONS,
    BACKENDS,
    PackedExpertWeights,
    SharedExpert,
    build_plan,
    capacity_for,
    combine,
    expert_mlp,
    grouped_linear,
    pack_expert_weights,
    resolve_backend,
)
from moezoo.kernels.plan import expert_slices

BACKENDS_UNDER_TEST = ("torch", "reference")


@pytest.fixture(autouse=True)
def real_size_paths_for_tiny_shapes(monkeypatch):
    """These tests' products are tiny, which the torch backend hands to torch.mm (``ONEDNN_MIN_MACS``) and,
    without autograd, to padded batched GEMMs (``PADDED_MAX_MACS``); here they take the paths real-size
    products take, so that those are what is tested. ``ONEDNN_GEMMS = False`` tests cover torch.mm, the
    ``padded`` tests the batched path, and ``test_small_products_*`` the size rules themselves. oneDNN is on
    wherever this torch has it, whichever library the CPU kind picks (``test_cpu_gemm_choice_*``), so its paths
    are tested on every machine."""
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", cpu_backend._onednn_linear_available())
    monkeypatch.setattr(cpu_backend, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(cpu_backend, "PADDED_MAX_MACS", 0)


# ------------------------------------------------------------------------------------------------- helpers


def output_tol(w_in, w_out, scale=1.0):
    """An expert MLP's output, computed in another order than the loop's: a reduction over D, then one over F."""
    return fp_tolerance(w_in.dtype, max(w_in.shape[2], w_out.shape[2]), layers=2, scale=scale)


def gradient_tol(case):
    """The gradients of an expert MLP: the forward's two reductions, two more in the backward (over D and N_in),
    and the weight gradients' sums over an expert's rows (at most all T * k slots)."""
    num_slots = case["ids"].numel()
    return fp_tolerance(case["x"].dtype, max(*case["w_in"].shape[1:], num_slots), layers=4)


def make_case(T, k, E, *, D=8, F=6, gated=True, bias=False, seed=0, ids=None, D_out=None):
    g = torch.Generator().manual_seed(seed)
    n_in = 2 * F if gated else F
    x = torch.randn(T, D, generator=g)
    if ids is None:
        if k <= E:
            ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
        else:
            ids = torch.randint(0, E, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g) + 0.1
    w_in = torch.randn(E, n_in, D, generator=g) * D**-0.5
    w_out = torch.randn(E, D_out or D, F, generator=g) * F**-0.5
    b_in = torch.randn(E, n_in, generator=g) * 0.1 if bias else None
    b_out = torch.randn(E, D_out or D, generator=g) * 0.1 if bias else None
    return dict(x=x, weights=weights, ids=ids.long(), w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out)


def leaves(case):
    out = {}
    for name in ("x", "weights", "w_in", "w_out", "b_in", "b_out"):
        value = case[name]
        out[name] = None if value is None else value.detach().clone().requires_grad_(True)
    return out


def grads_of(y, params, upstream):
    names = [n for n, p in params.items() if p is not None]
    tensors = [params[n] for n in names]
    if not y.requires_grad:
        return {n: torch.zeros_like(p) for n, p in zip(names, tensors)}
    gs = torch.autograd.grad((y * upstream).sum(), tensors, allow_unused=True, materialize_grads=True)
    return dict(zip(names, gs))


def run_library(case, backend, activation="silu", gated=True, capacity=None, block_size=None):
    p = leaves(case)
    plan = build_plan(case["ids"], case["w_in"].shape[0], capacity=capacity, block_size=block_size)
    y = expert_mlp(
        p["x"], p["weights"], plan, p["w_in"], p["w_out"], b_in_EN=p["b_in"], b_out_ED=p["b_out"],
        activation=activation, gated=gated, backend=backend,
    )
    return y, p


def run_loop(case, activation="silu", gated=True, capacity=None):
    p = leaves(case)
    y = loop_moe(p["x"], p["weights"], case["ids"], p["w_in"], p["w_out"], p["b_in"], p["b_out"], activation, gated, capacity)
    return y, p


def check_against_loop(case, backend, activation="silu", gated=True, capacity=None):
    y_ref, p_ref = run_loop(case, activation, gated, capacity)
    y, p = run_library(case, backend, activation, gated, capacity)
    assert y.shape == y_ref.shape == (case["x"].shape[0], case["w_out"].shape[1])
    assert y.dtype == case["x"].dtype
    torch.testing.assert_close(y, y_ref, **output_tol(case["w_in"], case["w_out"]))
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
    g_ref = grads_of(y_ref, p_ref, upstream)
    g = grads_of(y, p, upstream)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **gradient_tol(case), msg=lambda m, n=name: f"grad of {n}: {m}")
    return y, g


# ------------------------------------------------------------------------------- expert_mlp vs the loop


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("E", [1, 3, 8, 64])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_expert_mlp_matches_loop_shapes(T, k, E, backend):
    case = make_case(T, k, E, bias=(T + k + E) % 2 == 0, seed=T * 100 + k * 10 + E)
    check_against_loop(case, backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_matches_loop_activations(activation, gated, bias, backend):
    assert set(ACTIVATIONS) == {"silu", "gelu", "gelu_tanh", "relu"}
    case = make_case(7, 2, 3, gated=gated, bias=bias, seed=5)
    check_against_loop(case, backend, activation=activation, gated=gated)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_empty_expert_and_unused_expert_weights_get_zero_grad(backend):
    # Expert 2 of 4 is never chosen.
    ids = torch.tensor([[0, 1], [3, 0], [1, 3], [0, 3], [1, 0]])
    case = make_case(5, 2, 4, bias=True, ids=ids, seed=1)
    y, g = check_against_loop(case, backend)
    plan = build_plan(ids, 4)
    assert plan.counts_E.tolist() == [4, 3, 0, 3]
    for name in ("w_in", "w_out", "b_in", "b_out"):
        assert torch.count_nonzero(g[name][2]) == 0, name
        assert torch.count_nonzero(g[name][0]) > 0, name


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_all_tokens_on_one_expert(backend):
    T, E = 9, 5
    ids = torch.full((T, 1), 3)
    case = make_case(T, 1, E, bias=True, ids=ids, seed=2)
    check_against_loop(case, backend)
    plan = build_plan(ids, E)
    assert plan.counts_E.tolist() == [0, 0, 0, T, 0]
    assert plan.sorted_tokens_S.tolist() == list(range(T))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_duplicate_expert_in_one_token(backend):
    ids = torch.tensor([[1, 1], [0, 1], [2, 2]])
    case = make_case(3, 2, 3, bias=True, ids=ids, seed=3)
    check_against_loop(case, backend)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_dropped_slots_contribute_nothing(backend):
    # -1 (unused top-p slot) and ids >= E (null experts) are not dispatched.
    E = 3
    ids = torch.tensor([[0, -1], [-1, -1], [2, 5], [3, 1], [1, 0]])
    case = make_case(5, 2, E, bias=True, ids=ids, seed=4)
    y, g = check_against_loop(case, backend)
    assert torch.count_nonzero(y[1]) == 0
    assert torch.count_nonzero(g["x"][1]) == 0
    assert g["weights"][~((ids >= 0) & (ids < E))].abs().sum() == 0
    plan = build_plan(ids, E)
    assert plan.kept_TK.tolist() == [[True, False], [False, False], [True, False], [False, True], [True, True]]
    assert plan.num_dispatched == 5


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 100])
def test_capacity_matches_loop(capacity, backend):
    case = make_case(11, 3, 4, bias=True, seed=6)
    check_against_loop(case, backend, capacity=capacity)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_all_slots_dropped_with_tokens_still_backpropagates(backend):
    """T > 0 but nothing dispatched: zero output, and ``backward`` must work (zero grads) on every backend."""
    case = make_case(4, 2, 3, bias=True, ids=torch.full((4, 2), -1), seed=7)
    y, p = run_library(case, backend)
    assert y.shape == (4, 8)
    assert torch.count_nonzero(y) == 0
    y.sum().backward()  # the reference backend returns a graph-less tensor here (see report)
    for name, t in p.items():
        if t is not None:
            assert t.grad is None or torch.count_nonzero(t.grad) == 0, name


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_empty_batch(backend):
    case = make_case(0, 2, 3, bias=True, ids=torch.zeros(0, 2, dtype=torch.long))
    y, p = run_library(case, backend)
    assert y.shape == (0, 8) and y.dtype == torch.float32
    g = grads_of(y, p, torch.ones_like(y))
    assert g["x"].shape == (0, 8)
    assert g["weights"].shape == (0, 2)
    for name, value in g.items():
        assert value.shape == p[name].shape
        assert torch.count_nonzero(value) == 0, name


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_deterministic_bitwise(backend):
    case = make_case(33, 4, 8, bias=True, seed=8)
    upstream = torch.randn(33, 8, generator=torch.Generator().manual_seed(9))
    runs = []
    for _ in range(2):
        y, p = run_library(case, backend)
        runs.append((y.detach(), grads_of(y, p, upstream)))
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("bias", [False, True])
def test_input_without_grad_gets_none_and_weights_match_loop(bias):
    """Features that need no gradient (a frozen encoder's, say): the torch backend skips the input gradient's
    GEMMs; x gets none, and every weight and routing weight gets the loop's gradient."""
    case = make_case(T=24, k=2, E=4, bias=bias, seed=5)
    y_ref, p_ref = run_loop(case)
    p = leaves(case)
    p["x"].requires_grad_(False)
    plan = build_plan(case["ids"], 4)
    y = expert_mlp(p["x"], p["weights"], plan, p["w_in"], p["w_out"], b_in_EN=p["b_in"], b_out_ED=p["b_out"],
                   backend="torch")
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert p["x"].grad is None
    for name in ("weights", "w_in", "w_out", "b_in", "b_out"):
        if p[name] is not None:
            torch.testing.assert_close(p[name].grad, p_ref[name].grad, **gradient_tol(case), msg=lambda m, n=name: f"{n}: {m}")


def test_native_glu_backward_matches_autograd_of_the_formula():
    """``cpu_decode.glu_silu_backward`` on strided rows (a slice of a wider buffer, as the walk's buffers are)
    against autograd in double precision of ``sum(g * w * silu(gate) * up)``: the gate's, up's and weight's
    gradients, and the weighted activation it writes for W_out's gradient."""
    from moezoo.kernels import cpu_decode

    if not cpu_decode.available():
        pytest.skip("no C compiler: the walk runs torch's calls instead (tested with the loop everywhere)")
    gen = torch.Generator().manual_seed(11)
    C, H = 37, 45  # odd widths: the vector loop's tail
    h = (torch.randn(C, 2 * H + 3, generator=gen) * 4)[:, :2 * H]  # pre-activations up to |12|: both sigmoid tails
    g, w = torch.randn(C, H, generator=gen), torch.rand(C, generator=gen)
    aw, grad_h, grad_w = torch.full((C, H + 5), 7.0)[:, :H], torch.empty(C, 2 * H), torch.empty(C)
    cpu_decode.glu_silu_backward(h, g, w, aw, grad_h, grad_w)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    a64 = act_formula("silu", h64[:, :H]) * h64[:, H:]
    (g.double() * w64[:, None] * a64).sum().backward()
    tol = fp_tolerance(torch.float32, H)
    torch.testing.assert_close(grad_h, h64.grad.float(), **tol)
    torch.testing.assert_close(grad_w, w64.grad.float(), **tol)
    torch.testing.assert_close(aw, (w64[:, None] * a64).detach().float(), **tol)
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        cpu_decode.glu_silu_backward(h.double(), g, w, aw, grad_h, grad_w)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_walk_backward_with_and_without_the_native_glu_matches_loop(monkeypatch, fused, bias):
    """The torch backend's backward of gated-SiLU experts runs the native pass where it can
    (``FUSED_GLU_BACKWARD``) and torch's calls otherwise; either way every gradient is the loop's."""
    from moezoo.kernels import cpu_decode

    if fused and not cpu_decode.available():
        pytest.skip("no C compiler")
    calls = []
    native = cpu_decode.glu_silu_backward
    monkeypatch.setattr(cpu_backend, "FUSED_GLU_BACKWARD", fused)
    monkeypatch.setattr(cpu_decode, "glu_silu_backward", lambda *args: calls.append(1) or native(*args))
    case = make_case(T=40, k=2, E=5, D=12, F=9, bias=bias, seed=3)
    check_against_loop(case, "torch")
    assert bool(calls) == fused
    calls.clear()
    check_against_loop(case, "torch", activation="gelu")  # other activations: torch's calls
    assert not calls


@pytest.fixture
def expert_streams(monkeypatch):
    """The torch backend's parallel expert streams switched on for tiny inputs (2 threads, no size floor), on
    every CPU kind."""
    monkeypatch.setattr(cpu_backend, "MIN_STREAM_FLOPS", 0)
    monkeypatch.setattr(cpu_backend, "PARALLEL_STREAMS", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield cpu_backend
    torch.set_num_threads(threads)


def stream_rows(groups):
    """Each stream's (table, expert, first row, end row) pieces."""
    return [[(t, e, r.start, r.stop) for t, e, r in g] for g in groups]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("E", [4, 5, 64])
def test_parallel_expert_streams_match_loop(expert_streams, E, bias):
    case = make_case(33, 3, E, bias=bias, seed=E + 20)
    plan = build_plan(case["ids"], E)
    groups = expert_streams._stream_groups([plan.counts_list()], [1.0], torch.device("cpu"))
    assert len(groups) == 2  # two streams of contiguous rows that cover every routed row exactly once
    rows = [r for group in groups for _, _, r in group]
    assert rows[0].start == 0 and rows[-1].stop == 33 * 3
    assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
    assert [sum(r.stop - r.start for _, _, r in g) for g in groups] == [49, 50]  # equal halves (experts may be cut)
    check_against_loop(case, "torch")
    assert torch.get_num_threads() == 2  # the workers' single-threadedness did not leak into the caller


@pytest.mark.parametrize("bias", [False, True])
def test_one_expert_split_across_three_streams_matches_loop(expert_streams, bias):
    """An expert whose rows span every stream: its weight gradients are the sum of three pieces."""
    torch.set_num_threads(3)
    case = make_case(30, 2, 2, bias=bias, seed=31)
    case["ids"][:, 0] = 0  # expert 0 gets 30 of the 60 rows, expert 1 the other 30 (k=2: both per token)
    case["ids"][:, 1] = 1
    plan = build_plan(case["ids"], 2)
    groups = expert_streams._stream_groups([plan.counts_list()], [1.0], torch.device("cpu"))
    assert stream_rows(groups) == [[(0, 0, 0, 20)], [(0, 0, 20, 30), (0, 1, 30, 40)], [(0, 1, 40, 60)]]
    check_against_loop(case, "torch")


def test_stream_groups_cut_every_table_evenly_and_skip_small_calls(expert_streams):
    # routed rows [5, 0, 7, 1] and a shared expert of 4 rows, on 2 threads: each table cut in half
    groups = expert_streams._stream_groups([[5, 0, 7, 1], [4]], [1.0, 1.0], torch.device("cpu"))
    assert stream_rows(groups) == [[(0, 0, 0, 5), (0, 2, 5, 6), (1, 0, 0, 2)],
                                   [(0, 2, 6, 12), (0, 3, 12, 13), (1, 0, 2, 4)]]
    expert_streams.MIN_STREAM_FLOPS = 100  # 17 rows x 5 flops = 85 < 100: one stream, every piece whole
    assert stream_rows(expert_streams._stream_groups([[5, 0, 7, 1], [4]], [5.0, 5.0], torch.device("cpu"))) == [
        [(0, 0, 0, 5), (0, 2, 5, 12), (0, 3, 12, 13), (1, 0, 0, 4)]]
    torch.set_num_threads(1)
    assert len(expert_streams._stream_groups([[4] * 8], [1.0], torch.device("cpu"))) == 1


def test_forward_runs_whole_experts_with_onednn_and_backward_streams(monkeypatch, expert_streams):
    """With oneDNN GEMMs the forward keeps every expert whole (oneDNN threads each GEMM itself) while the
    backward still cuts the rows into streams; without oneDNN both stream."""
    case = make_case(33, 3, 5, seed=45)
    plan = build_plan(case["ids"], 5)
    tables = expert_streams._expert_tables(case["x"], case["weights"], case["w_in"], case["w_out"], None, None, None,
                                           None, None, plan, "silu", True, None)
    whole = [[(0, e, r.start, r.stop) for e, r in expert_slices(plan.counts_list())]]
    monkeypatch.setattr(expert_streams, "ONEDNN_GEMMS", True)
    assert stream_rows(expert_streams._forward_groups(tables, case["x"])) == whole
    assert len(expert_streams._stream_groups_of(tables, case["x"].device)) == 2  # what the backward walks
    monkeypatch.setattr(expert_streams, "ONEDNN_GEMMS", False)
    assert len(expert_streams._forward_groups(tables, case["x"])) == 2


def test_input_without_grad_in_parallel_streams(expert_streams):
    """The same in two streams, an expert cut between them: no input gradient, the loop's weight gradients."""
    case = make_case(T=40, k=2, E=3, seed=9)
    y_ref, p_ref = run_loop(case)
    p = leaves(case)
    p["x"].requires_grad_(False)
    plan = build_plan(case["ids"], 3)
    assert len(expert_streams._stream_groups([plan.counts_list()], [1e9], torch.device("cpu"))) == 2
    y = expert_mlp(p["x"], p["weights"], plan, p["w_in"], p["w_out"], backend="torch")
    y.sum().backward()
    y_ref.sum().backward()
    assert p["x"].grad is None
    for name in ("weights", "w_in", "w_out"):
        torch.testing.assert_close(p[name].grad, p_ref[name].grad, **gradient_tol(case), msg=lambda m, n=name: f"{n}: {m}")


def test_parallel_expert_streams_are_deterministic_and_follow_inference_mode(expert_streams):
    case = make_case(33, 4, 8, bias=True, seed=8)
    upstream = torch.randn(33, 8, generator=torch.Generator().manual_seed(9))
    runs = []
    for _ in range(2):
        y, p = run_library(case, "torch")
        runs.append((y.detach(), grads_of(y, p, upstream)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    with torch.inference_mode():  # the workers run in the caller's inference mode
        inferred = run_library({**case, "x": case["x"].clone()}, "torch")[0]
    torch.testing.assert_close(inferred, runs[0][0], **output_tol(case["w_in"], case["w_out"]))


@pytest.mark.parametrize("bias", [False, True])
def test_torch_backend_without_onednn_matches_loop(monkeypatch, expert_streams, bias):
    """The plain ``torch.mm`` GEMMs (used where oneDNN is missing, or switched off) give the same answers."""
    monkeypatch.setattr(expert_streams, "ONEDNN_GEMMS", False)
    check_against_loop(make_case(33, 3, 5, bias=bias, seed=40), "torch")
    check_against_loop(make_case(9, 2, 3, gated=False, bias=bias, seed=41), "torch", activation="gelu", gated=False)


@pytest.mark.parametrize("onednn", [False, True])
def test_matmul_nt_against_mm_with_strided_operands(monkeypatch, onednn):
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", onednn and cpu_backend._onednn_linear_available())
    g = torch.Generator().manual_seed(42)
    a, b = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g)
    expected = torch.tensor([[sum(float(a[i, k]) * float(b[j, k]) for k in range(5)) for j in range(6)] for i in range(7)])
    tol = fp_tolerance(torch.float32, 5)  # against sums of 5 products in double precision
    torch.testing.assert_close(cpu_backend._matmul_nt(a, b), expected, **tol)
    torch.testing.assert_close(cpu_backend._matmul_nt(a.t().contiguous().t(), b.t().contiguous().t()), expected, **tol)
    torch.testing.assert_close(cpu_backend._matmul_nt(b, a), expected.t(), **tol)


# ------------------------------------------------------------------------------------------ shared expert


def shared_case(T, D=8, F=5, gated=True, scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(s_w_in=torch.randn(2 * F if gated else F, D, generator=g) * D**-0.5,
                s_w_out=torch.randn(D, F, generator=g) * F**-0.5,
                s_scale=torch.rand(T, generator=g) + 0.2 if scale else None)


def shared_leaves(case, shared):
    """Fresh leaves of the routed case and of the shared expert's tensors."""
    return {**leaves(case), **{n: None if v is None else v.detach().clone().requires_grad_(True) for n, v in shared.items()}}


def loop_with_shared(ids, p, activation, gated, shared_activation):
    """The routed loop plus a per-token loop of the shared expert times its per-token scale."""
    routed = loop_moe(p["x"], p["weights"], ids, p["w_in"], p["w_out"], p["b_in"], p["b_out"], activation, gated)
    shared_rows = []
    for t in range(p["x"].shape[0]):
        y = expert_on_token(p["x"][t], 0, p["s_w_in"][None], p["s_w_out"][None], None, None, shared_activation or activation, gated)
        shared_rows.append(y if p["s_scale"] is None else p["s_scale"][t] * y)
    return routed + torch.stack(shared_rows)


def check_shared_against_loop(case, shared, backend, activation="silu", gated=True, shared_activation=None):
    """Routed loop + a per-token loop of the shared expert, outputs and every gradient (shared ones too)."""
    p = shared_leaves(case, shared)
    y_ref = loop_with_shared(case["ids"], p, activation, gated, shared_activation)

    q = shared_leaves(case, shared)
    plan = build_plan(case["ids"], case["w_in"].shape[0])
    y = expert_mlp(q["x"], q["weights"], plan, q["w_in"], q["w_out"], b_in_EN=q["b_in"], b_out_ED=q["b_out"],
                   activation=activation, gated=gated, backend=backend,
                   shared=SharedExpert(q["s_w_in"], q["s_w_out"], q["s_scale"], shared_activation))
    # the shared expert is one more expert of the same width on every token: the routed case's tolerances hold
    torch.testing.assert_close(y, y_ref, **output_tol(case["w_in"], case["w_out"]))
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(77))
    g_ref, g = grads_of(y_ref, p, upstream), grads_of(y, q, upstream)
    assert g.keys() == g_ref.keys() and {"s_w_in", "s_w_out"} <= g.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **gradient_tol(case), msg=lambda m, n=name: f"grad of {n}: {m}")
    return y


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_shared_expert_matches_loop(backend, scale, bias):
    check_shared_against_loop(make_case(13, 2, 4, bias=bias, seed=50), shared_case(13, scale=scale, seed=51), backend)


@pytest.mark.parametrize("threads", [2, 3])
def test_shared_expert_in_parallel_streams_matches_loop(expert_streams, threads):
    torch.set_num_threads(threads)
    check_shared_against_loop(make_case(31, 3, 5, bias=True, seed=52), shared_case(31, seed=53), "torch")


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh")])
def test_shared_expert_without_grad_matches_loop(expert_streams, gated, activation):
    """The inference path (fused activations with oneDNN) with a shared expert split across two streams."""
    case, shared = make_case(31, 3, 5, gated=gated, bias=True, seed=60), shared_case(31, gated=gated, seed=61)
    ref = loop_with_shared(case["ids"], {**case, **shared}, activation, gated, None)
    plan = build_plan(case["ids"], 5)
    with torch.inference_mode():
        y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], b_in_EN=case["b_in"],
                       b_out_ED=case["b_out"], activation=activation, gated=gated, backend="torch",
                       shared=SharedExpert(shared["s_w_in"], shared["s_w_out"], shared["s_scale"]))
    torch.testing.assert_close(y, ref, **output_tol(case["w_in"], case["w_out"]))


def test_shared_expert_ungated_with_its_own_activation_and_tokens_without_routes():
    case = make_case(6, 2, 3, gated=False, seed=54)
    case["ids"][2] = -1  # token 2 gets only the shared expert
    y = check_shared_against_loop(case, shared_case(6, gated=False, seed=55), "torch", activation="relu",
                                  gated=False, shared_activation="gelu_tanh")
    assert torch.count_nonzero(y[2]) > 0


def test_shared_expert_bad_input_errors():
    case = make_case(4, 2, 3, seed=56)
    plan = build_plan(case["ids"], 3)
    sh = shared_case(4, seed=57)
    args = (case["x"], case["weights"], plan, case["w_in"], case["w_out"])
    with pytest.raises(ValueError, match=r"shared w_in must be \[N_in, D=8\]"):
        expert_mlp(*args, shared=SharedExpert(sh["s_w_in"][:, :5], sh["s_w_out"]))
    with pytest.raises(ValueError, match=r"shared w_out must be \[D_out, F\] = \(8, 5\)"):
        expert_mlp(*args, shared=SharedExpert(sh["s_w_in"], sh["s_w_out"][:, :4]))
    with pytest.raises(ValueError, match=r"shared scale must be \[T\] = \(4,\)"):
        expert_mlp(*args, shared=SharedExpert(sh["s_w_in"], sh["s_w_out"], sh["s_scale"][:, None]))
    with pytest.raises(TypeError, match="shared must be a SharedExpert"):
        expert_mlp(*args, shared=(sh["s_w_in"], sh["s_w_out"]))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        expert_mlp(*args, shared=SharedExpert(sh["s_w_in"], sh["s_w_out"], activation="swish"))


def test_torch_and_reference_agree_on_mixed_case():
    case = make_case(33, 4, 8, bias=True, gated=False, seed=10)
    case["ids"][3, 1] = -1
    case["ids"][5] = 9
    y_t, p_t = run_library(case, "torch", activation="gelu_tanh", gated=False, capacity=15)
    y_r, p_r = run_library(case, "reference", activation="gelu_tanh", gated=False, capacity=15)
    torch.testing.assert_close(y_t, y_r, **output_tol(case["w_in"], case["w_out"]))
    up = torch.randn(33, 8)
    g_t, g_r = grads_of(y_t, p_t, up), grads_of(y_r, p_r, up)
    for name in g_t:
        torch.testing.assert_close(g_t[name], g_r[name], **gradient_tol(case))


def test_int32_ids_and_noncontiguous_inputs():
    case = make_case(7, 2, 3, bias=True, seed=11)
    ref, _ = run_loop(case)
    x_nc = case["x"].t().contiguous().t()  # same values, column-major
    w_in_nc = case["w_in"].transpose(1, 2).contiguous().transpose(1, 2)
    plan = build_plan(case["ids"].int(), 3)
    y = expert_mlp(x_nc, case["weights"], plan, w_in_nc, case["w_out"], b_in_EN=case["b_in"], b_out_ED=case["b_out"],
                   backend="torch")
    torch.testing.assert_close(y, ref, **output_tol(case["w_in"], case["w_out"]))


# ----------------------------------------------------------------------------------------- build_plan


def test_build_plan_counts_offsets_sorted_order_by_hand():
    ids = torch.tensor([[2, 0], [0, 1], [2, 4], [-1, 2]])  # E = 4: id 4 and -1 are not dispatched
    plan = build_plan(ids, 4)
    # flat slots: 0:e2 1:e0 2:e0 3:e1 4:e2 5:x 6:x 7:e2
    assert plan.num_tokens == 4 and plan.top_k == 2 and plan.num_experts == 4
    assert plan.counts_E.tolist() == [2, 1, 3, 0]
    assert plan.offsets_E1.tolist() == [0, 2, 3, 6, 6]
    assert plan.sorted_slots_S.tolist() == [1, 2, 3, 0, 4, 7]
    assert plan.sorted_tokens_S.tolist() == [0, 1, 1, 0, 2, 3]
    assert plan.kept_TK.tolist() == [[True, True], [True, True], [True, False], [False, True]]
    assert plan.num_dispatched == 6
    assert plan.counts_list() == [2, 1, 3, 0]
    for t in (plan.sorted_slots_S, plan.sorted_tokens_S, plan.counts_E, plan.offsets_E1, plan.ids_TK):
        assert t.dtype == torch.int64
    assert plan.padded_rows_P is None and plan.block_experts_B is None


def test_build_plan_random_against_hand_loop():
    g = torch.Generator().manual_seed(12)
    E, T, K = 6, 25, 3
    ids = torch.randint(-1, E + 2, (T, K), generator=g)
    plan = build_plan(ids, E)
    expected_order = []
    for e in range(E):
        expected_order += [t * K + j for t in range(T) for j in range(K) if int(ids[t, j]) == e]
    counts = [sum(int(ids[t, j]) == e for t in range(T) for j in range(K)) for e in range(E)]
    assert plan.sorted_slots_S.tolist() == expected_order
    assert plan.counts_E.tolist() == counts
    assert plan.offsets_E1.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    assert plan.sorted_tokens_S.tolist() == [s // K for s in expected_order]


def test_expert_slices_by_hand():
    # counts [2, 0, 3, 1]: expert 1 has no rows and is skipped
    assert list(expert_slices([2, 0, 3, 1])) == [(0, slice(0, 2)), (2, slice(2, 5)), (3, slice(5, 6))]
    assert list(expert_slices([0, 0])) == []


def test_capacity_gshard_priority_first_choices_before_second():
    # Token order alone would keep both slots of tokens 0 and 1; GShard keeps every first choice first.
    ids = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    plan = build_plan(ids, 2, capacity=2)
    assert plan.kept_TK.tolist() == [[True, False]] * 4
    assert plan.counts_E.tolist() == [2, 2]
    assert plan.sorted_slots_S.tolist() == [4, 6, 0, 2]

    plan = build_plan(ids, 2, capacity=3)
    # expert 0: t2/j0, t3/j0 (first choices), then t0/j1; t1/j1 dropped. expert 1: t0, t1, then t2/j1.
    assert plan.kept_TK.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    assert plan.counts_E.tolist() == [3, 3]
    assert plan.offsets_E1.tolist() == [0, 3, 6]
    assert plan.sorted_slots_S.tolist() == [1, 4, 6, 0, 2, 5]  # stable: slot order within an expert

    plan = build_plan(ids, 2, capacity=0)
    assert plan.num_dispatched == 0 and not plan.kept_TK.any()


def test_capacity_ignores_undispatched_slots():
    # Slots with -1 or ids >= E must not use up capacity.
    ids = torch.tensor([[-1, 0], [5, 0], [0, 1]])
    plan = build_plan(ids, 2, capacity=1)
    # first choices: t2 -> e0 (kept). second: t0 -> e0 (dropped: full), t1 -> e0 (dropped), t2 -> e1 (kept)
    assert plan.kept_TK.tolist() == [[False, False], [False, False], [True, True]]


def test_capacity_for_formula():
    assert capacity_for(7, 2, 3, 1.0) == math.ceil(14 / 3)
    assert capacity_for(8, 2, 4, 1.0) == 4
    assert capacity_for(8, 2, 4, 1.25) == 5
    assert capacity_for(1, 1, 64, 1.0) == 1
    assert capacity_for(0, 2, 4, 1.0) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_for(8, 2, 4, 0.0)


def test_block_padding_layout_by_hand():
    # counts [3, 0, 5, 1] with block_size 4.
    ids = torch.tensor([[0], [2], [0], [2], [2], [3], [2], [0], [2]])
    plan = build_plan(ids, 4, block_size=4)
    assert plan.counts_E.tolist() == [3, 0, 5, 1]
    assert plan.offsets_E1.tolist() == [0, 3, 3, 8, 9]
    assert plan.block_size == 4
    assert plan.block_experts_B.tolist() == [0, 2, 2, 3]
    assert plan.padded_rows_P.tolist() == [
        0, 1, 2, -1,
        3, 4, 5, 6,
        7, -1, -1, -1,
        8, -1, -1, -1,
    ]


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_padding_invariants(block_size):
    g = torch.Generator().manual_seed(block_size)
    E = 5
    ids = torch.randint(-1, E, (13, 2), generator=g)
    plan = build_plan(ids, E, block_size=block_size)
    counts = plan.counts_E.tolist()
    expected_blocks = [e for e in range(E) for _ in range(-(-counts[e] // block_size))]
    assert plan.block_experts_B.tolist() == expected_blocks
    rows = plan.padded_rows_P.view(-1, block_size)
    assert rows.shape[0] == len(expected_blocks)
    real = plan.padded_rows_P[plan.padded_rows_P >= 0]
    assert real.tolist() == list(range(plan.num_dispatched))  # every sorted row exactly once, in order
    for b, e in enumerate(expected_blocks):
        for r in rows[b].tolist():
            if r >= 0:
                assert plan.offsets_E1[e] <= r < plan.offsets_E1[e + 1]


def test_build_plan_empty_batch():
    plan = build_plan(torch.zeros(0, 3, dtype=torch.long), 4, capacity=2, block_size=8)
    assert plan.num_tokens == 0 and plan.num_dispatched == 0
    assert plan.counts_E.tolist() == [0, 0, 0, 0]
    assert plan.offsets_E1.tolist() == [0, 0, 0, 0, 0]
    assert plan.padded_rows_P.numel() == 0 and plan.block_experts_B.numel() == 0


def test_build_plan_bad_input():
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        build_plan(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="integer"):
        build_plan(torch.zeros(4, 2), 2)
    with pytest.raises(TypeError, match="integer"):
        build_plan(torch.zeros(4, 2, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="num_experts"):
        build_plan(torch.zeros(4, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="capacity"):
        build_plan(torch.zeros(4, 2, dtype=torch.long), 2, capacity=-1)
    with pytest.raises(ValueError, match="block_size"):
        build_plan(torch.zeros(4, 2, dtype=torch.long), 2, block_size=0)


# --------------------------------------------------------------------------- grouped_linear + combine


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity", [None, 2])
def test_grouped_linear_and_combine_match_loop(bias, capacity):
    g = torch.Generator().manual_seed(13)
    T, K, E, D, N = 9, 2, 4, 5, 3
    ids = torch.randint(-1, E + 1, (T, K), generator=g)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(E, N, D, generator=g, requires_grad=True)
    b = torch.randn(E, N, generator=g, requires_grad=True) if bias else None
    weights = torch.rand(T, K, generator=g, requires_grad=True)
    plan = build_plan(ids, E, capacity=capacity)
    # a reduction over D, then the weighted sum over the K slots; the weight gradients sum over up to T * K rows
    tol = fp_tolerance(torch.float32, max(D, T * K), layers=2)

    y_SN = grouped_linear(x, plan, w, b)
    assert y_SN.shape == (plan.num_dispatched, N)
    # Each sorted row is its slot's token through its expert's linear map.
    for s, slot in enumerate(plan.sorted_slots_S.tolist()):
        t, j = divmod(slot, K)
        e = int(ids[t, j])
        expected = (w[e] * x[t][None]).sum(-1) + (b[e] if bias else 0)
        torch.testing.assert_close(y_SN[s], expected, **tol)
    out = combine(y_SN, weights, plan)

    kept = gshard_kept(ids, E, capacity)
    rows = []
    for t in range(T):
        acc = torch.zeros(N)
        for j in range(K):
            if kept[t][j]:
                e = int(ids[t, j])
                acc = acc + weights[t, j] * ((w[e] * x[t][None]).sum(-1) + (b[e] if bias else 0))
        rows.append(acc)
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref, **tol)

    params = [p for p in (x, w, b, weights) if p is not None]
    up = torch.randn(T, N, generator=g)
    g_lib = torch.autograd.grad((out * up).sum(), params, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad((ref * up).sum(), params, allow_unused=True, materialize_grads=True)
    for a, r in zip(g_lib, g_ref):
        torch.testing.assert_close(a, r, **tol)


def test_grouped_linear_two_layer_mlp_equals_expert_mlp_loop():
    """grouped_linear -> activation -> grouped_linear over sorted rows -> combine == the loop's expert MLP."""
    case = make_case(7, 2, 3, gated=False, bias=False, seed=14)
    plan = build_plan(case["ids"], 3)
    h = grouped_linear(case["x"], plan, case["w_in"])
    a = act_formula("relu", h)
    # Second layer on rows already in sorted order: per-expert matmul on contiguous ranges.
    pieces, start = [], 0
    for e, c in enumerate(plan.counts_list()):
        pieces.append(a[start:start + c] @ case["w_out"][e].t())
        start += c
    out = combine(torch.cat(pieces), case["weights"], plan)
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], activation="relu", gated=False)
    torch.testing.assert_close(out, ref, **output_tol(case["w_in"], case["w_out"]))


def test_grouped_linear_and_combine_empty_batch():
    plan = build_plan(torch.zeros(0, 2, dtype=torch.long), 3)
    x = torch.zeros(0, 4)
    y = grouped_linear(x, plan, torch.randn(3, 5, 4))
    assert y.shape == (0, 5)
    out = combine(y, torch.zeros(0, 2), plan)
    assert out.shape == (0, 5)


def test_grouped_linear_wrong_last_dim():
    plan = build_plan(torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="last dimension 4"):
        grouped_linear(torch.randn(3, 4), plan, torch.randn(2, 5, 6))


# ------------------------------------------------------------------------------------------- bad input


def _good():
    case = make_case(5, 2, 3, bias=True, seed=15)
    plan = build_plan(case["ids"], 3)
    return case, plan


def test_bad_input_wrong_last_dim():
    case, plan = _good()
    with pytest.raises(ValueError, match=r"last dimension 7 .*D=8"):
        expert_mlp(torch.randn(5, 7), case["weights"], plan, case["w_in"], case["w_out"], backend="torch")


def test_bad_input_not_2d():
    case, plan = _good()
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        expert_mlp(case["x"][None], case["weights"], plan, case["w_in"], case["w_out"], backend="torch")


def test_bad_input_integer_x():
    case, plan = _good()
    with pytest.raises(TypeError, match="floating"):
        expert_mlp(case["x"].long(), case["weights"], plan, case["w_in"], case["w_out"], backend="torch")


def test_bad_input_mismatched_shapes():
    case, plan = _good()
    x, wt, wi, wo = case["x"], case["weights"], case["w_in"], case["w_out"]
    with pytest.raises(ValueError, match="plan is for 4 experts but the weights hold 3"):
        expert_mlp(x, wt, build_plan(case["ids"], 4), wi, wo)
    with pytest.raises(ValueError, match="w_out must be"):
        expert_mlp(x, wt, plan, wi, wo[..., :-1])
    with pytest.raises(ValueError, match="gated experts need"):
        expert_mlp(x, wt, plan, wi[:, :-1], wo)
    with pytest.raises(ValueError, match="tokens"):
        expert_mlp(x[:4], wt, plan, wi, wo)
    with pytest.raises(ValueError, match="weights shape"):
        expert_mlp(x, wt[:, :1], plan, wi, wo)
    with pytest.raises(ValueError, match="b_in must be"):
        expert_mlp(x, wt, plan, wi, wo, b_in_EN=case["b_in"][:, :-1])
    with pytest.raises(ValueError, match="b_out must be"):
        expert_mlp(x, wt, plan, wi, wo, b_out_ED=case["b_out"][:2])


def test_bad_input_unknown_backend_and_activation():
    case, plan = _good()
    args = (case["x"], case["weights"], plan, case["w_in"], case["w_out"])
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_fast'.*auto, reference, torch, triton"):
        expert_mlp(*args, backend="cuda_fast")
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*silu, gelu, gelu_tanh, relu"):
        expert_mlp(*args, activation="swish")


def test_backend_resolution_on_cpu(monkeypatch):
    assert set(BACKENDS) == {"auto", "reference", "torch", "triton"}
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))


# ------------------------------------------------------------------------------- inference (no-grad) path


@pytest.mark.parametrize(
    "activation,gated,bias,capacity",
    [("silu", True, False, None), ("gelu", False, True, None), ("gelu_tanh", True, True, 3), ("relu", False, False, 2)],
)
@pytest.mark.parametrize("onednn", [True, False])
def test_torch_backend_without_grad_matches_loop(monkeypatch, activation, gated, bias, capacity, onednn):
    """Inputs that need no grad (and under torch.no_grad) take the forward-only path (with oneDNN: the
    activation fused into the GEMM): same values."""
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", onednn and cpu_backend._onednn_linear_available())
    case = make_case(13, 3, 5, gated=gated, bias=bias, seed=16)
    case["ids"][2, 0] = -1
    case["ids"][4, 2] = 7
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], case["b_in"], case["b_out"],
                   activation, gated, capacity)
    plan = build_plan(case["ids"], 5, capacity=capacity)
    args = (case["x"], case["weights"], plan, case["w_in"], case["w_out"])
    kwargs = dict(b_in_EN=case["b_in"], b_out_ED=case["b_out"], activation=activation, gated=gated, backend="torch")
    y = expert_mlp(*args, **kwargs)
    assert not y.requires_grad
    tol = output_tol(case["w_in"], case["w_out"])
    torch.testing.assert_close(y, ref, **tol)
    leaf = case["w_in"].clone().requires_grad_(True)
    with torch.no_grad():
        y2 = expert_mlp(case["x"], case["weights"], plan, leaf, case["w_out"], **kwargs)
    assert not y2.requires_grad
    torch.testing.assert_close(y2, ref, **tol)
    # The grad path gives the same forward values as the no-grad path (bitwise without the fused epilogue).
    y3 = expert_mlp(case["x"], case["weights"], plan, leaf, case["w_out"], **kwargs)
    torch.testing.assert_close(y3.detach(), y, **tol)
    if not cpu_backend.ONEDNN_GEMMS:
        assert torch.equal(y3.detach(), y)


# ------------------------------------------------------------------------- prepacked weights (inference)

needs_onednn = pytest.mark.skipif(not cpu_backend._onednn_linear_available(), reason="this torch has no oneDNN linear")


def no_grad_call(case, w_in, w_out, activation="silu", gated=True, packed=None, backend="torch"):
    plan = build_plan(case["ids"], w_in.shape[0])
    with torch.no_grad():
        return expert_mlp(case["x"], case["weights"], plan, w_in, w_out, b_in_EN=case["b_in"], b_out_ED=case["b_out"],
                          activation=activation, gated=gated, backend=backend, packed=packed)


def loop_of(case, w_in, w_out, activation="silu", gated=True):
    return loop_moe(case["x"], case["weights"], case["ids"], w_in, w_out, case["b_in"], case["b_out"], activation, gated)


def parameters_of(case):
    return torch.nn.Parameter(case["w_in"].clone()), torch.nn.Parameter(case["w_out"].clone())


def test_data_edit_is_seen_by_the_next_call_without_a_handle():
    """Issue 20's probe: a 256-wide, 8-expert, top-2 MoE in eval; ``w_in.data[:, 1:50, 1:50] += 0.5`` (which does
    not move the version counter) is seen by the next no-grad call, which equals the reference backend on the
    edited weights."""
    case = make_case(64, 2, 8, D=256, F=256, seed=80)
    w_in, w_out = parameters_of(case)
    before = no_grad_call(case, w_in, w_out)
    w_in.data[:, 1:50, 1:50] += 0.5
    after = no_grad_call(case, w_in, w_out)
    reference = no_grad_call(case, w_in, w_out, backend="reference")
    tol = output_tol(w_in, w_out)
    assert not torch.allclose(after, before, **tol)
    torch.testing.assert_close(after, reference, **tol)


@needs_onednn
@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu", False, True), ("gelu_tanh", True, True)])
def test_packed_handle_gives_the_unpacked_result_and_every_call_agrees_bitwise(activation, gated, bias):
    case = make_case(29, 2, 4, gated=gated, bias=bias, seed=60)
    w_in, w_out = parameters_of(case)
    handle = pack_expert_weights(w_in, w_out)
    assert isinstance(handle, PackedExpertWeights) and handle.matches(w_in, w_out)
    first = no_grad_call(case, w_in, w_out, activation, gated, packed=handle)
    tol = output_tol(w_in, w_out)
    torch.testing.assert_close(first, no_grad_call(case, w_in, w_out, activation, gated), **tol)
    torch.testing.assert_close(first, loop_of(case, w_in.detach(), w_out.detach(), activation, gated), **tol)
    assert torch.equal(no_grad_call(case, w_in, w_out, activation, gated, packed=handle), first)
    # other routing (other row counts, one token alone) on the same handle; the result does not depend on which
    # handle it got: the same as on a handle packed from equal weights for this call
    for other_case in (make_case(29, 2, 4, seed=61), make_case(1, 2, 4, seed=62)):
        other = {**case, "x": other_case["x"], "ids": other_case["ids"], "weights": other_case["weights"]}
        y = no_grad_call(other, w_in, w_out, activation, gated, packed=handle)
        torch.testing.assert_close(y, loop_of(other, w_in.detach(), w_out.detach(), activation, gated), **tol)
        fresh = parameters_of({"w_in": w_in.detach(), "w_out": w_out.detach()})
        assert torch.equal(y, no_grad_call(other, *fresh, activation, gated, packed=pack_expert_weights(*fresh)))


@needs_onednn
def test_packed_handle_of_strided_weights_matches_loop():
    case = make_case(23, 2, 3, seed=66)
    w_in = torch.nn.Parameter(case["w_in"].transpose(1, 2).contiguous().transpose(1, 2))  # column-major experts
    w_out = torch.nn.Parameter(case["w_out"].transpose(1, 2).contiguous().transpose(1, 2))
    handle = pack_expert_weights(w_in, w_out)
    torch.testing.assert_close(no_grad_call(case, w_in, w_out, packed=handle), loop_of(case, case["w_in"], case["w_out"]),
                               **output_tol(w_in, w_out))


@needs_onednn
@pytest.mark.parametrize("weight", ["w_in", "w_out"])
@pytest.mark.parametrize("how", ["add_", "copy_", "load_state_dict", "new tensor", "in place through a view"])
def test_handle_stops_matching_when_the_weights_change_and_the_output_follows_them(weight, how):
    case = make_case(17, 2, 3, seed=62)
    layer = torch.nn.Module()
    layer.w_in, layer.w_out = parameters_of(case)
    handle = pack_expert_weights(layer.w_in, layer.w_out)
    delta = 0.5 * torch.randn(case[weight].shape, generator=torch.Generator().manual_seed(63))
    changed = getattr(layer, weight)
    if how == "add_":
        with torch.no_grad():
            changed.add_(delta)
    elif how == "copy_":
        with torch.no_grad():
            changed.copy_(case[weight] + delta)
    elif how == "load_state_dict":
        layer.load_state_dict({**{n: p.detach().clone() for n, p in layer.named_parameters()}, weight: case[weight] + delta})
    elif how == "new tensor":
        setattr(layer, weight, torch.nn.Parameter(case[weight] + delta))
    else:  # one expert, through a view that shares the version counter
        with torch.no_grad():
            changed[1].add_(delta[1])
            delta[[0, 2]] = 0
    assert not handle.matches(layer.w_in, layer.w_out)
    live = {**case, weight: case[weight] + delta}
    torch.testing.assert_close(no_grad_call(case, layer.w_in, layer.w_out, packed=handle),
                               loop_of(case, live["w_in"], live["w_out"]), **output_tol(layer.w_in, layer.w_out))


@needs_onednn
def test_data_edits_bypass_the_handle_until_packed_again():
    """The documented contract, and proof that the handle is what the call computes with: an edit through
    ``.data`` leaves the version counter alone, so the handle still matches and the output stays what it packed;
    packing again (or no handle) follows the edit."""
    case = make_case(23, 2, 3, seed=67)
    w_in, w_out = parameters_of(case)
    handle = pack_expert_weights(w_in, w_out)
    packed_output = no_grad_call(case, w_in, w_out, packed=handle)
    w_in.data[:, 1:4, 1:4] += 0.5
    assert handle.matches(w_in, w_out)
    assert torch.equal(no_grad_call(case, w_in, w_out, packed=handle), packed_output)
    edited = loop_of(case, w_in.detach(), w_out.detach())
    tol = output_tol(w_in, w_out)
    assert not torch.allclose(edited, packed_output, **tol)
    torch.testing.assert_close(no_grad_call(case, w_in, w_out, packed=pack_expert_weights(w_in, w_out)), edited, **tol)
    torch.testing.assert_close(no_grad_call(case, w_in, w_out), edited, **tol)


@needs_onednn
def test_handle_is_not_used_with_autograd_or_other_backends():
    """A handle made stale through ``.data`` (it still matches) shows which weights a call computes with: with
    autograd, and on the reference backend, the live ones."""
    case = make_case(13, 2, 3, seed=65)
    w_in, w_out = parameters_of(case)
    handle = pack_expert_weights(w_in, w_out)
    w_in.data *= 2
    live = loop_of(case, w_in.detach(), w_out.detach())
    plan = build_plan(case["ids"], 3)
    y = expert_mlp(case["x"], case["weights"], plan, w_in, w_out, backend="torch", packed=handle)
    y.sum().backward()
    assert w_in.grad is not None and w_out.grad is not None
    tol = output_tol(w_in, w_out)
    torch.testing.assert_close(y.detach(), live, **tol)
    torch.testing.assert_close(no_grad_call(case, w_in, w_out, packed=handle, backend="reference"), live, **tol)


@needs_onednn
def test_handle_keeps_no_weight_alive():
    import gc
    import weakref

    case = make_case(11, 2, 3, seed=64)
    w_in, w_out = parameters_of(case)
    handle = pack_expert_weights(w_in, w_out)
    assert handle.nbytes >= (w_in.numel() + w_out.numel()) * 4  # every expert packed, gate and up halves apiece
    w_in_ref = weakref.ref(w_in)
    del w_in
    gc.collect()
    assert w_in_ref() is None
    assert not handle.matches(torch.nn.Parameter(case["w_in"].clone()), w_out)


def test_pack_expert_weights_declines_where_packing_does_not_apply(monkeypatch):
    case = make_case(5, 2, 3, seed=68)
    assert pack_expert_weights(case["w_in"].double(), case["w_out"].double()) is None  # oneDNN runs fp32 only
    assert pack_expert_weights(case["w_in"][:0], case["w_out"][:0]) is None  # no experts
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", False)
    assert pack_expert_weights(case["w_in"], case["w_out"]) is None


def test_pack_expert_weights_and_packed_bad_input():
    case = make_case(5, 2, 3, seed=69)
    with pytest.raises(ValueError, match=r"w_in \[E, N_in, D\] and w_out \[E, D_out, F\]"):
        pack_expert_weights(case["w_in"][0], case["w_out"][0])
    with pytest.raises(ValueError, match=r"w_out must be \[E, D_out, F\] with E = 3 and N_in = 12"):
        pack_expert_weights(case["w_in"], case["w_out"][..., :5])
    plan = build_plan(case["ids"], 3)
    with pytest.raises(TypeError, match="packed must be a PackedExpertWeights"):
        expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], packed=(case["w_in"], case["w_out"]))


@needs_onednn
def test_pack_expert_weights_refuses_inference_tensors():
    case = make_case(5, 2, 3, seed=70)
    with torch.inference_mode():
        w_in, w_out = case["w_in"].clone(), case["w_out"].clone()
    with pytest.raises(ValueError, match="torch.inference_mode"):
        pack_expert_weights(w_in, w_out)


@needs_onednn
def test_small_products_go_to_torch_mm_and_large_ones_to_onednn(monkeypatch):
    monkeypatch.setattr(cpu_backend, "ONEDNN_MIN_MACS", 1 << 21)
    assert not cpu_backend._onednn_pays(torch.zeros(32, 128), 128)  # 0.5M multiply-adds
    assert cpu_backend._onednn_pays(torch.zeros(128, 128, dtype=torch.float32), 128)  # exactly 2M
    assert not cpu_backend._onednn_pays(torch.zeros(4096, 1024, dtype=torch.float64), 1024)  # oneDNN runs fp32 only
    fused_calls = []

    def counting_fused_activated(*args):
        fused_calls.append(1)
        return real_fused_activated(*args)

    real_fused_activated = cpu_backend._fused_activated
    monkeypatch.setattr(cpu_backend, "_fused_activated", counting_fused_activated)
    # rows per expert ~6 (x 128 x 256: tiny, torch.mm) and ~470 (15M: oneDNN's fused GEMM, on the packed weights)
    for T, on_onednn in ((9, False), (700, True)):
        fused_calls.clear()
        case = make_case(T, 2, 3, D=128, F=128, seed=67)
        w_in, w_out = parameters_of(case)
        y = no_grad_call(case, w_in, w_out, packed=pack_expert_weights(w_in, w_out))
        torch.testing.assert_close(y, loop_of(case, case["w_in"], case["w_out"]), **output_tol(w_in, w_out))
        assert bool(fused_calls) == on_onednn


# ------------------------------------------------------------------ few rows: padded batched GEMMs (no grad)


@pytest.fixture
def padded(monkeypatch):
    monkeypatch.setattr(cpu_backend, "PADDED_MAX_MACS", 1 << 40)  # every no-grad call below takes the padded path
    return cpu_backend


@pytest.mark.parametrize(
    "activation,gated,bias,capacity",
    [("silu", True, False, None), ("gelu", False, True, None), ("gelu_tanh", True, True, 3), ("relu", False, False, 2)],
)
def test_padded_forward_matches_loop(padded, activation, gated, bias, capacity):
    case = make_case(21, 3, 5, gated=gated, bias=bias, seed=70)
    case["ids"][2, 0] = -1  # a slot routed nowhere
    case["ids"][:, 0] = torch.where(case["ids"][:, 0] == 4, 3, case["ids"][:, 0])  # fewer rows on expert 4
    plan = build_plan(case["ids"], 5, capacity=capacity)
    assert padded._padded_pays(padded._expert_tables(case["x"], case["weights"], case["w_in"], case["w_out"],
                                                     case["b_in"], case["b_out"], None, None, None, plan,
                                                     activation, gated, None)[0])
    with torch.no_grad():
        y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], b_in_EN=case["b_in"],
                       b_out_ED=case["b_out"], activation=activation, gated=gated, backend="torch")
    ref = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], case["b_in"], case["b_out"],
                   activation, gated, capacity)
    torch.testing.assert_close(y, ref, **output_tol(case["w_in"], case["w_out"]))


def test_padded_forward_with_shared_expert_and_empty_experts_matches_loop(padded):
    case = make_case(13, 2, 6, seed=71)
    case["ids"] = case["ids"] % 3  # experts 3..5 get nothing (and a token may pick one expert twice)
    sh = shared_case(13, seed=72)
    plan = build_plan(case["ids"], 6)
    with torch.no_grad():
        y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], backend="torch",
                       shared=SharedExpert(sh["s_w_in"], sh["s_w_out"], sh["s_scale"]))
    ref = loop_with_shared(case["ids"], {**case, **sh}, "silu", True, "silu")
    torch.testing.assert_close(y, ref, **output_tol(case["w_in"], case["w_out"]))


def test_padded_path_only_for_small_experts_and_modest_padding(monkeypatch):
    monkeypatch.setattr(cpu_backend, "PADDED_MAX_MACS", 1 << 22)  # the default (the autouse fixture turns it off)

    def table(counts, dim, n_in):
        return cpu_backend._ExpertTable(torch.zeros(len(counts), n_in, dim), torch.zeros(len(counts), dim, n_in // 2),
                                    None, None, torch.zeros(sum(counts), dtype=torch.long), torch.zeros(sum(counts)),
                                    counts, "silu", True)

    # DiT-MoE digits at one image: 8 experts, 32 rows each, 128 x 256: 1M multiply-adds each
    assert cpu_backend._padded_pays(table([32] * 8, 128, 256))
    assert not cpu_backend._padded_pays(table([512] * 8, 384, 3072))  # dit_moe_s: 604M each
    assert not cpu_backend._padded_pays(table([60, 1, 1, 1, 1, 1, 1, 1], 128, 256))  # padding would be 7x the rows
    assert not cpu_backend._padded_pays(table([0] * 8, 128, 256))  # nothing routed


# ------------------------------------------------------------------- output width other than the input's
# A connector's experts map encoder tokens (width D) to the language model's width D_out: w_out [E, D_out, F].


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("D, D_out", [(8, 12), (12, 5)])
def test_output_width_other_than_input_matches_loop(D, D_out, gated, bias, backend):
    check_against_loop(make_case(19, 2, 4, D=D, D_out=D_out, gated=gated, bias=bias), backend, "gelu", gated)


@pytest.mark.parametrize("D, D_out", [(8, 12), (12, 5)])
def test_output_width_other_than_input_on_the_no_grad_paths(monkeypatch, expert_streams, D, D_out):
    """The padded batched path, parallel streams and prepacked weights, without autograd."""
    case = make_case(40, 2, 4, D=D, D_out=D_out, bias=True)
    expected = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"], case["b_in"],
                        case["b_out"], "silu", True)
    plan = build_plan(case["ids"], 4)
    tol = output_tol(case["w_in"], case["w_out"])
    for padded_macs in (0, 1 << 30):
        monkeypatch.setattr(cpu_backend, "PADDED_MAX_MACS", padded_macs)
        with torch.no_grad():
            y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], b_in_EN=case["b_in"],
                           b_out_ED=case["b_out"], backend="torch")
        torch.testing.assert_close(y, expected, **tol)
    packed = pack_expert_weights(case["w_in"], case["w_out"])
    with torch.no_grad():
        y = expert_mlp(case["x"], case["weights"], plan, case["w_in"], case["w_out"], b_in_EN=case["b_in"],
                       b_out_ED=case["b_out"], backend="torch", packed=packed)
    torch.testing.assert_close(y, expected, **tol)


def test_output_width_with_a_shared_expert_matches_loop():
    case = make_case(9, 2, 3, D=8, D_out=6)
    g = torch.Generator().manual_seed(5)
    shared = SharedExpert(torch.randn(10, 8, generator=g) * 0.3, torch.randn(6, 5, generator=g) * 0.4)
    y = expert_mlp(case["x"], case["weights"], build_plan(case["ids"], 3), case["w_in"], case["w_out"],
                   shared=shared, backend="torch")
    expected = loop_moe(case["x"], case["weights"], case["ids"], case["w_in"], case["w_out"]) + torch.stack(
        [expert_on_token(x, 0, shared.w_in_NK[None], shared.w_out_DF[None], None, None, "silu", True) for x in case["x"]])
    torch.testing.assert_close(y, expected, **output_tol(case["w_in"], case["w_out"]))
    with pytest.raises(ValueError, match=r"shared w_out must be \[D_out, F\]"):
        expert_mlp(case["x"], case["weights"], build_plan(case["ids"], 3), case["w_in"], case["w_out"],
                   shared=SharedExpert(shared.w_in_NK, torch.randn(8, 5)), backend="torch")


def test_mismatched_output_bias_is_refused():
    case = make_case(5, 1, 2, D=8, D_out=6, bias=True)
    with pytest.raises(ValueError, match=r"b_out must be \[E, D_out\] = \(2, 6\)"):
        expert_mlp(case["x"], case["weights"], build_plan(case["ids"], 2), case["w_in"], case["w_out"],
                   b_out_ED=torch.zeros(2, 8), backend="torch")


@pytest.mark.parametrize("capability, setting, want", [
    ("AVX512", "auto", True), ("AVX2", "auto", False), ("DEFAULT", "auto", False),
    ("AVX2", "onednn", True), ("AVX512", "mm", False), ("AVX512", " MM ", False)])
def test_cpu_gemm_choice_follows_the_cpu_kind(monkeypatch, capability, setting, want):
    """oneDNN for the experts' products where torch's kernels run with AVX-512 (measured faster there, slower on
    AVX2-only CPUs: bench/cpu_gemm.py), unless MOEZOO_CPU_GEMM says otherwise; never without oneDNN's linear."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("MOEZOO_CPU_GEMM", setting)
    assert cpu_backend._onednn_gemms_chosen() == (want and cpu_backend._onednn_linear_available())
    monkeypatch.setattr(cpu_backend, "_onednn_linear_available", lambda: False)
    assert not cpu_backend._onednn_gemms_chosen()


def test_cpu_gemm_choice_refuses_unknown_settings(monkeypatch):
    monkeypatch.setenv("MOEZOO_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match=r"MOEZOO_CPU_GEMM='mkl' is not one of auto, mm, onednn"):
        cpu_backend._onednn_gemms_chosen()


def test_streams_floor_by_cpu_kind(monkeypatch, expert_streams):
    """Where streams were measured to pay on every size (PARALLEL_STREAMS) the walk streams from MIN_STREAM_FLOPS;
    elsewhere (AVX2-only CPUs on MKL: whole experts with MKL's threads win on small calls) only from
    MKL_MIN_STREAM_FLOPS of forward multiply-adds x 2, forward and backward alike."""
    counts = [[40, 0, 25, 60]]  # 125 rows
    monkeypatch.setattr(expert_streams, "MIN_STREAM_FLOPS", 1e3)
    monkeypatch.setattr(expert_streams, "MKL_MIN_STREAM_FLOPS", 1e6)
    cpu = torch.device("cpu")
    assert len(expert_streams._stream_groups(counts, [10.0], cpu)) == 2  # 1250 flops >= 1e3
    monkeypatch.setattr(expert_streams, "PARALLEL_STREAMS", False)
    assert expert_streams._stream_groups(counts, [10.0], cpu) == expert_streams._one_group(counts)  # < 1e6
    assert expert_streams._stream_groups(counts, [7999.0], cpu) == expert_streams._one_group(counts)  # 999,875
    assert len(expert_streams._stream_groups(counts, [8000.0], cpu)) == 2  # 1e6
