"""moezoo.kernels.triton_moe (the Triton expert MLP, forward and backward) on CPU under TRITON_INTERPRET=1.

The oracle is the per-token ``loop_moe`` of tests/helpers.py: one token and one slot at a time, from the raw
weight tensors, with hand-written activation formulas and its own dropping rules (ids outside ``[0, E)`` and a
GShard capacity counter: all first choices in token order, then all second choices, ...). Gradients of x, the
router weights, the expert weights and the biases come from autograd through that loop.

The interpreter is slow (numpy, one program at a time) and its bf16 ``tl.dot`` is wrong, so shapes are
tiny and only fp32 / fp16 are tested. ``TRITON_INTERPRET`` must be set before triton is first imported
(``triton.jit`` picks the interpreter at decoration time); it stays set for the rest of the session.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import expert_on_token, loop_moe  # noqa: E402
from tolerance import fp_tolerance  # noqa: E402

from moezoo.kernels.experts import SharedExpert, expert_mlp  # noqa: E402
from moezoo.kernels.plan import build_plan  # noqa: E402
from moezoo.kernels.triton_moe import triton_expert_mlp  # noqa: E402


# -------------------------------------------------------------------------------------------------- helpers


def make_inputs(T, D, F, E, k, gated, bias, seed=0, dtype=torch.float32):
    """Random leaves scaled so activations stay O(1) (so tolerances relative to O(1) terms apply)."""
    gen = torch.Generator().manual_seed(seed)
    n_in = 2 * F if gated else F

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    return dict(
        x=randn(T, D),
        weights=torch.rand(T, k, generator=gen).requires_grad_(),
        w_in=randn(E, n_in, D, scale=D**-0.5),
        w_out=randn(E, D, F, scale=F**-0.5),
        b_in=randn(E, n_in, scale=0.1) if bias else None,
        b_out=randn(E, D, scale=0.1) if bias else None,
    )


def random_ids(T, k, E, seed=0):
    """Distinct experts per token when possible (as top-k gives), otherwise with repeats."""
    gen = torch.Generator().manual_seed(seed + 1)
    if k <= E and T:
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return torch.randint(0, E, (T, k), generator=gen)


def output_tol(inputs):
    """fp32: the output, computed in another order than the loop's, is a reduction over D, then one over F."""
    return fp_tolerance(torch.float32, max(inputs["x"].shape[1], inputs["w_out"].shape[2]), layers=2)


def gradient_tol(inputs, ids):
    """fp32: the forward's two reductions, two more in the backward (over D and N_in), and the weight gradients'
    sums over an expert's rows (at most all T * k slots)."""
    return fp_tolerance(torch.float32, max(*inputs["w_in"].shape[1:], ids.numel()), layers=4)


def leaves(inputs):
    return [inputs[name] for name in ("x", "weights", "w_in", "w_out", "b_in", "b_out") if inputs[name] is not None]


def run_triton(inputs, plan, activation, gated):
    i = inputs
    args = (i["x"], i["weights"], plan, i["w_in"], i["w_out"], i["b_in"], i["b_out"])
    return triton_expert_mlp(*args, activation, gated)


def run_loop(inputs, ids, activation, gated, capacity=None):
    i = inputs
    args = (i["x"], i["weights"], ids, i["w_in"], i["w_out"], i["b_in"], i["b_out"])
    return loop_moe(*args, activation, gated, capacity)


def check_forward_backward(inputs, ids, E, activation, gated, capacity=None, block_size=16):
    """fp32 kernels against the loop, the output and every gradient."""
    plan = build_plan(ids, E, capacity=capacity, block_size=block_size)
    y = run_triton(inputs, plan, activation, gated)
    y_ref = run_loop(inputs, ids, activation, gated, capacity)
    torch.testing.assert_close(y, y_ref.to(y.dtype), **output_tol(inputs))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves(inputs), grad_y)
    grads_ref = torch.autograd.grad(y_ref, leaves(inputs), grad_y.to(y_ref.dtype))
    names = [n for n in ("x", "weights", "w_in", "w_out", "b_in", "b_out") if inputs[n] is not None]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == inputs[name].dtype, name
        torch.testing.assert_close(g, g_ref.to(g.dtype), **gradient_tol(inputs, ids),
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    return plan


# ---------------------------------------------------------------------------------------------------- tests

# (T, D, F, E, k, activation, gated, bias): D and F are not multiples of the 32-wide blocks, and T*k is
# not a multiple of the 16-row blocks; every activation appears, gated and not, with and without biases.
CASES = [
    pytest.param(1, 16, 16, 1, 1, "silu", True, True, id="T1-E1-k1-silu-gated-bias"),
    pytest.param(7, 24, 40, 4, 2, "gelu", True, False, id="T7-E4-k2-gelu-gated"),
    pytest.param(33, 24, 40, 8, 4, "gelu_tanh", False, True, id="T33-E8-k4-gelutanh-bias"),
    pytest.param(33, 40, 24, 8, 3, "relu", False, False, id="T33-E8-k3-relu"),
]


@pytest.mark.parametrize("T, D, F, E, k, activation, gated, bias", CASES)
def test_matches_loop_fp32(T, D, F, E, k, activation, gated, bias):
    inputs = make_inputs(T, D, F, E, k, gated, bias)
    check_forward_backward(inputs, random_ids(T, k, E), E, activation, gated)


def test_empty_expert_and_repeated_expert_per_token():
    """Expert 2 of 4 gets no rows (its weight gradients must be exactly zero); k=3 > distinct choices."""
    T, D, F, E, k = 9, 24, 40, 4, 3
    ids = torch.tensor([0, 1, 3]).repeat(T, 1)
    ids[::2, 1] = 0  # the same expert twice for one token: two slots, two rows
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=True)
    check_forward_backward(inputs, ids, E, "silu", True)
    y = run_triton(inputs, build_plan(ids, E, block_size=16), "silu", True)
    grads = torch.autograd.grad(y.sum(), [inputs["w_in"], inputs["w_out"], inputs["b_in"], inputs["b_out"]])
    assert all(bool((g[2] == 0).all()) for g in grads)


def test_all_tokens_on_one_expert():
    """One expert owns several row blocks (T*k = 40 rows -> 3 blocks of 16); the others are empty."""
    T, D, F, E, k = 20, 24, 40, 4, 2
    ids = torch.full((T, k), 3)
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=False)
    check_forward_backward(inputs, ids, E, "gelu", True)


def test_dropped_slots_by_id():
    """Ids -1 (unused top-p slot) and >= E (null expert) contribute nothing and get zero router gradient."""
    T, D, F, E, k = 11, 24, 40, 4, 2
    ids = random_ids(T, k, E)
    ids[1, 1] = -1
    ids[4, 0] = -1
    ids[5] = torch.tensor([E, -1])  # a token with no expert at all: output exactly zero
    inputs = make_inputs(T, D, F, E, k, gated=False, bias=True)
    check_forward_backward(inputs, ids, E, "silu", False)
    y = run_triton(inputs, build_plan(ids, E, block_size=16), "silu", False)
    assert bool((y[5] == 0).all())
    grad_w = torch.autograd.grad(y.sum(), inputs["weights"])[0]
    assert grad_w[1, 1] == 0 and grad_w[4, 0] == 0 and bool((grad_w[5] == 0).all())


def test_capacity_drops():
    T, D, F, E, k, capacity = 17, 24, 40, 4, 2, 5
    ids = random_ids(T, k, E)
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=True)
    plan = check_forward_backward(inputs, ids, E, "relu", True, capacity=capacity)
    assert not bool(plan.kept_TK.all()) and int(plan.counts_E.max()) == capacity


def test_all_slots_dropped():
    T, D, F, E, k = 5, 24, 40, 4, 2
    ids = torch.full((T, k), -1)
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=True)
    plan = build_plan(ids, E, block_size=16)
    y = run_triton(inputs, plan, "silu", True)
    assert y.shape == (T, D) and bool((y == 0).all())
    grads = torch.autograd.grad(y.sum(), leaves(inputs))
    assert all(bool((g == 0).all()) for g in grads)


def test_zero_tokens():
    T, D, F, E, k = 0, 24, 40, 4, 2
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=True)
    plan = build_plan(torch.zeros(0, k, dtype=torch.long), E, block_size=16)
    y = run_triton(inputs, plan, "silu", True)
    assert y.shape == (0, D) and y.dtype == torch.float32
    grads = torch.autograd.grad(y.sum(), leaves(inputs))
    for g, leaf in zip(grads, leaves(inputs)):
        assert g.shape == leaf.shape and bool((g == 0).all())
    with torch.no_grad():
        assert run_triton(inputs, plan, "silu", True).shape == (0, D)


@pytest.mark.parametrize("block_size", [None, 8, 32], ids=["no-padding", "too-small", "bigger"])
def test_plan_block_size_is_adapted(block_size):
    """A plan built without (or with an unusable) block size is re-padded; a bigger power of two is used."""
    T, D, F, E, k = 7, 24, 40, 4, 2
    ids = random_ids(T, k, E)
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=False)
    expected = run_triton(inputs, build_plan(ids, E, block_size=16), "silu", True)
    got = run_triton(inputs, build_plan(ids, E, block_size=block_size), "silu", True)
    torch.testing.assert_close(got, expected, **output_tol(inputs))


def test_fp16_forward_and_backward():
    """fp16 activations and weights (fp32 router weights) against the loop in fp32 on the same values. The kernels
    accumulate in fp32, so the reductions add next to nothing at fp16's scale: what differs is the fp16 rounding
    of each stored intermediate, one per chained step (forward: the activation, the output; backward two more:
    the gradient at the activation and at the pre-activation)."""
    T, D, F, E, k = 33, 24, 40, 4, 2
    ids = random_ids(T, k, E)
    inputs16 = make_inputs(T, D, F, E, k, gated=True, bias=True, dtype=torch.float16)
    inputs32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in inputs16.items()}
    plan = build_plan(ids, E, block_size=16)
    y16 = run_triton(inputs16, plan, "silu", True)
    assert y16.dtype == torch.float16
    y32 = run_loop(inputs32, ids, "silu", True)
    torch.testing.assert_close(y16.float(), y32, **fp_tolerance(torch.float16, 1, layers=2))
    grads16 = torch.autograd.grad(y16.sum(), leaves(inputs16))
    grads32 = torch.autograd.grad(y32.sum(), leaves(inputs32))
    for g16, g32, leaf in zip(grads16, grads32, leaves(inputs16)):
        assert g16.dtype == leaf.dtype
        torch.testing.assert_close(g16.float(), g32, **fp_tolerance(torch.float16, 1, layers=4))


def test_no_grad_path_and_determinism():
    """Without autograd the same kernels run (no pre-activation saved); repeated calls are bit-identical."""
    T, D, F, E, k = 13, 24, 40, 4, 3
    ids = random_ids(T, k, E)
    inputs = make_inputs(T, D, F, E, k, gated=True, bias=True)
    plan = build_plan(ids, E, block_size=16)
    y = run_triton(inputs, plan, "gelu", True)
    grads = torch.autograd.grad(y.sum(), leaves(inputs))
    with torch.no_grad():
        y_eval = run_triton(inputs, plan, "gelu", True)
    assert not y_eval.requires_grad
    assert torch.equal(y_eval, y.detach())
    y_again = run_triton(inputs, plan, "gelu", True)
    grads_again = torch.autograd.grad(y_again.sum(), leaves(inputs))
    assert torch.equal(y_again, y) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))


def test_strided_weights_and_input():
    """Kernels address memory through strides: non-contiguous x and expert weights give the same result."""
    T, D, F, E, k = 7, 24, 40, 4, 2
    ids = random_ids(T, k, E)
    inputs = make_inputs(T, D, F, E, k, gated=False, bias=True)
    plan = build_plan(ids, E, block_size=16)
    expected = run_triton(inputs, plan, "silu", False)
    strided = dict(inputs)
    strided["x"] = inputs["x"].detach().t().contiguous().t()
    strided["w_in"] = inputs["w_in"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    strided["w_out"] = inputs["w_out"].detach().transpose(0, 2).contiguous().transpose(0, 2)
    assert not strided["w_in"].is_contiguous() and not strided["w_out"].is_contiguous()
    torch.testing.assert_close(run_triton(strided, plan, "silu", False), expected, **output_tol(inputs))


def test_expert_mlp_dispatches_to_triton():
    """The public ``expert_mlp(backend="triton")`` reaches these kernels and agrees with the torch backend."""
    T, D, F, E, k = 7, 24, 40, 4, 2
    ids = random_ids(T, k, E)
    i = make_inputs(T, D, F, E, k, gated=True, bias=True)
    plan = build_plan(ids, E, block_size=16)
    kwargs = dict(b_in_EN=i["b_in"], b_out_ED=i["b_out"], activation="silu", gated=True)
    y = expert_mlp(i["x"], i["weights"], plan, i["w_in"], i["w_out"], backend="triton", **kwargs)
    y_torch = expert_mlp(i["x"], i["weights"], plan, i["w_in"], i["w_out"], backend="torch", **kwargs)
    torch.testing.assert_close(y, y_torch, **output_tol(i))


def test_rejects_mixed_dtypes_and_unknown_activation():
    T, D, F, E, k = 3, 16, 16, 2, 1
    i = make_inputs(T, D, F, E, k, gated=True, bias=False)
    plan = build_plan(random_ids(T, k, E), E, block_size=16)
    with pytest.raises(TypeError, match="one dtype"):
        triton_expert_mlp(i["x"].half(), i["weights"], plan, i["w_in"], i["w_out"])
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        triton_expert_mlp(i["x"], i["weights"], plan, i["w_in"], i["w_out"], activation="tanh")


def test_shared_expert_with_triton_matches_loop():
    """``expert_mlp(backend="triton", shared=...)``: the routed kernels plus the shared expert (plain torch ops),
    against the routed loop plus a per-token shared-expert loop, outputs and the shared weights' gradients."""
    T, D, F, E, k, F_shared = 6, 16, 24, 3, 2, 8
    ids = random_ids(T, k, E, seed=3)
    i = make_inputs(T, D, F, E, k, gated=True, bias=False, seed=3)
    gen = torch.Generator().manual_seed(4)
    w_in_s = (torch.randn(2 * F_shared, D, generator=gen) * D**-0.5).requires_grad_()
    w_out_s = (torch.randn(D, F_shared, generator=gen) * F_shared**-0.5).requires_grad_()
    scale = (torch.rand(T, generator=gen) + 0.5).requires_grad_()
    plan = build_plan(ids, E, block_size=16)
    y = expert_mlp(i["x"], i["weights"], plan, i["w_in"], i["w_out"], backend="triton",
                   shared=SharedExpert(w_in_s, w_out_s, scale))
    shared_rows = [scale[t] * expert_on_token(i["x"][t], 0, w_in_s[None], w_out_s[None], None, None, "silu", True)
                   for t in range(T)]
    ref = run_loop(i, ids, "silu", True) + torch.stack(shared_rows)
    torch.testing.assert_close(y, ref, **output_tol(i))
    upstream = torch.randn(T, D, generator=gen)
    params = [w_in_s, w_out_s, scale, i["x"]]
    for a, b in zip(torch.autograd.grad((y * upstream).sum(), params), torch.autograd.grad((ref * upstream).sum(), params)):
        torch.testing.assert_close(a, b, **gradient_tol(i, ids))


@pytest.mark.parametrize("bias", [False, True])
def test_output_width_other_than_input_matches_loop(bias):
    """A connector's experts: w_out [E, D_out, F] with D_out != D (here wider, then narrower)."""
    for D, D_out in ((24, 40), (40, 24)):
        inputs = make_inputs(13, D, 16, 4, 2, False, bias)
        gen = torch.Generator().manual_seed(3)
        inputs["w_out"] = (torch.randn(4, D_out, 16, generator=gen) * 0.25).requires_grad_()
        if bias:
            inputs["b_out"] = (torch.randn(4, D_out, generator=gen) * 0.1).requires_grad_()
        check_forward_backward(inputs, random_ids(13, 2, 4), 4, "gelu", False)
