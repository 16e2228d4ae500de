"""Grouped expert compute over a dispatch plan, behind one ``backend=`` switch.

Weights use HF transformers v5's 3-D layout so checkpoints map one to one:
``w_in_ENK``  [E, N_in, D]: the up projection; for gated experts ``N_in = 2F`` with the gate rows first,
                           then the up rows (``gate, up = (x @ w_in[e].T).chunk(2, -1)``).
``w_out_EDF`` [E, D, F]:   the down projection.
Biases, when given, are ``b_in_EN`` [E, N_in] and ``b_out_ED`` [E, D].

Backends:
``reference`` a per-token, per-slot loop with autograd: slow, obviously right, the test oracle.
``torch``     the CPU default: gather rows per expert, one GEMM per expert, and a hand-written backward
              that reuses the forward's buffers (see ``_TorchExpertMLP``).
``triton``    fused gather + grouped GEMM + scatter kernels (``moezoo.kernels.triton_moe``), forward and
              backward; on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
``auto``      triton for CUDA tensors when Triton is importable, torch otherwise.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from .plan import DispatchPlan

BACKENDS = ("auto", "reference", "torch", "triton")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation_fn(name: str):
    """The elementwise nonlinearity by name (SwiGLU uses silu, GeGLU gelu)."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            "backend='triton' needs a CUDA tensor and an importable triton, or TRITON_INTERPRET=1 set before "
            f"triton is imported (got a {device.type} tensor); use backend='torch' on CPU"
        )
    return backend


def expert_mlp(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: DispatchPlan,
    w_in_ENK: torch.Tensor,
    w_out_EDF: torch.Tensor,
    *,
    b_in_EN: torch.Tensor | None = None,
    b_out_ED: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed experts' weighted sum for every token: ``y[t] = sum_j w[t,j] * expert_{ids[t,j]}(x[t])``.

    Only the slots the plan dispatched contribute; tokens with none get zeros. Differentiable with respect
    to ``x_TD``, ``weights_TK`` (so the router learns), and all expert weights and biases.
    """
    _check_expert_inputs(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, gated)
    activation_fn(activation)  # validates the name before any compute
    backend = resolve_backend(backend, x_TD.device)
    if backend == "reference":
        return _reference_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated)
    if backend == "triton":
        from .triton_moe import triton_expert_mlp

        return triton_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated)
    tensors = (x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _TorchExpertMLP.apply(*tensors, plan, activation, gated)
    w_S = weights_TK.reshape(-1).index_select(0, plan.sorted_slots_S).to(x_TD.dtype)
    return _torch_expert_forward(x_TD, w_S, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, False)[0]


def _check_expert_inputs(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, gated):
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x_TD.shape)}")
    if not x_TD.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x_TD.dtype}")
    num_experts, n_in, dim = w_in_ENK.shape
    if x_TD.shape[1] != dim:
        raise ValueError(f"x has last dimension {x_TD.shape[1]} but the experts take D={dim}")
    if num_experts != plan.num_experts:
        raise ValueError(f"the plan is for {plan.num_experts} experts but the weights hold {num_experts}")
    hidden = n_in // 2 if gated else n_in
    if gated and n_in % 2:
        raise ValueError(f"gated experts need w_in with 2F rows (gate then up), got {n_in}")
    if tuple(w_out_EDF.shape) != (num_experts, dim, hidden):
        raise ValueError(f"w_out must be [E, D, F] = {(num_experts, dim, hidden)}, got {tuple(w_out_EDF.shape)}")
    if tuple(weights_TK.shape) != (plan.num_tokens, plan.top_k) or x_TD.shape[0] != plan.num_tokens:
        raise ValueError(
            f"x has {x_TD.shape[0]} tokens and weights shape {tuple(weights_TK.shape)}, "
            f"but the plan is for [T, k] = {(plan.num_tokens, plan.top_k)}"
        )
    if b_in_EN is not None and tuple(b_in_EN.shape) != (num_experts, n_in):
        raise ValueError(f"b_in must be [E, N_in] = {(num_experts, n_in)}, got {tuple(b_in_EN.shape)}")
    if b_out_ED is not None and tuple(b_out_ED.shape) != (num_experts, dim):
        raise ValueError(f"b_out must be [E, D] = {(num_experts, dim)}, got {tuple(b_out_ED.shape)}")


def single_expert(x_D, w_in_NK, w_out_DF, b_in_N, b_out_D, activation, gated):
    """One expert on one or more rows, written out plainly: the definition every backend must match."""
    h = x_D @ w_in_NK.t()
    if b_in_N is not None:
        h = h + b_in_N
    act = activation_fn(activation)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    y = h @ w_out_DF.t()
    return y if b_out_D is None else y + b_out_D


def _reference_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated):
    """Per token, per slot: slow and plain, the oracle the fast backends are tested against."""
    # Every row starts from a zero that is still connected to all inputs, so backward gives zero gradients
    # (not an error) when nothing was dispatched.
    connected_zero = 0.0 * (x_TD.sum() + weights_TK.sum() + w_in_ENK.sum() + w_out_EDF.sum())
    rows = []
    for t in range(plan.num_tokens):
        y_D = x_TD.new_zeros(x_TD.shape[1]) + connected_zero
        for j in range(plan.top_k):
            if not bool(plan.kept_TK[t, j]):
                continue
            e = int(plan.ids_TK[t, j])
            b_in = None if b_in_EN is None else b_in_EN[e]
            b_out = None if b_out_ED is None else b_out_ED[e]
            y_D = y_D + weights_TK[t, j] * single_expert(x_TD[t], w_in_ENK[e], w_out_EDF[e], b_in, b_out, activation, gated)
        rows.append(y_D)
    if not rows:
        return x_TD.new_zeros(0, x_TD.shape[1]) + connected_zero
    return torch.stack(rows)


def _act_grad(name: str, grad_SF: torch.Tensor, pre_SF: torch.Tensor) -> torch.Tensor:
    """d act(pre) / d pre times grad, with aten's fused backward kernels (one pass, no autograd graph)."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad_SF, pre_SF)
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad_SF, pre_SF, approximate="tanh" if name == "gelu_tanh" else "none")
    return torch.ops.aten.threshold_backward(grad_SF, pre_SF, 0)


class _Buffers:
    """Scratch rows reused across the experts of one call: every expert's rows fit in the largest expert's
    buffer, so the loop touches a few MB that stay in cache instead of fresh [S, *] tensors per step
    (on CPU, allocating and page-faulting large fresh tensors costs as much as a small GEMM)."""

    def __init__(self, like: torch.Tensor, rows: int):
        self.like, self.rows, self.cache = like, rows, {}

    @classmethod
    def for_group(cls, like: torch.Tensor, group: list[tuple[int, slice]]) -> "_Buffers":
        """Buffers that fit the largest expert of one stream's (expert, rows) group."""
        return cls(like, max((rows.stop - rows.start for _, rows in group), default=0))

    def get(self, name: str, cols: int, count: int) -> torch.Tensor:
        if name not in self.cache:
            self.cache[name] = self.like.new_empty(self.rows, cols)
        return self.cache[name][:count]


def _expert_starts(counts: list[int]) -> list[int]:
    """The first sorted row of every expert."""
    return [0] + list(itertools.accumulate(counts))[:-1]


def _expert_slices(counts: list[int]):
    """(expert, row slice of the sorted order) for every expert that received rows."""
    for expert, (start, count) in enumerate(zip(_expert_starts(counts), counts)):
        if count:
            yield expert, slice(start, start + count)


def _piece_of(per_expert: list[torch.Tensor], starts: list[int], e: int, rows: slice) -> torch.Tensor:
    """The part of expert ``e``'s own tensor (its rows, from ``starts[e]``) that sorted ``rows`` cover."""
    return per_expert[e][rows.start - starts[e]:rows.stop - starts[e]]


# ------------------------------------------------------------------------------------------ expert streams
# With several CPU threads, one GEMM per expert split across all threads wastes much of each call on
# splitting small matrices and waiting at barriers. Instead the sorted rows are cut into as many equal ranges
# ("streams") as there are threads, and each runs on its own worker thread with single-threaded GEMMs (an
# expert on a cut is split between two streams). Each stream adds into its own output, and the outputs are
# summed in a fixed order, so results are still deterministic. Measured (bench/moe_layer.py, 2 threads):
# E=64 fwd+bwd 1.21x -> 1.02x of dense; with whole experts per stream E=8 lost (halves of 4 experts
# balanced poorly), with even row cuts it is level or better.

MIN_STREAM_FLOPS = 2e8  # below this a call is too small to be worth handing to worker threads
MIN_EXPERTS_PER_STREAM = 1  # experts with rows per thread (rows are cut evenly, so even 1 balances)
_stream_pool = None  # (ThreadPoolExecutor, its worker count)


def _pool_thread_init(barrier) -> None:
    torch.set_num_threads(1)  # this thread's own OpenMP / MKL thread count
    torch.get_num_threads()  # makes torch's per-thread lazy init read 1 now, before the caller restores its count
    barrier.wait()


def _streams_pool(streams: int):
    """A pool of ``streams`` single-threaded workers (made once; remade if the thread count changes)."""
    global _stream_pool
    if _stream_pool is None or _stream_pool[1] != streams:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        barrier = threading.Barrier(streams + 1)
        pool = ThreadPoolExecutor(streams, thread_name_prefix="moezoo-experts",
                                  initializer=_pool_thread_init, initargs=(barrier,))
        futures = [pool.submit(lambda: None) for _ in range(streams)]
        barrier.wait()  # every worker has set its own thread count ...
        torch.set_num_threads(threads)  # ... so the process-wide default can go back to the caller's
        for future in futures:
            future.result()
        if _stream_pool is not None:
            _stream_pool[0].shutdown(wait=False)
        _stream_pool = (pool, streams)
    return _stream_pool[0]


def _stream_groups(counts: list[int], flops_per_row: float, device: torch.device) -> list[list[tuple[int, slice]]]:
    """The sorted rows cut into one contiguous range of equal length per CPU thread ("stream"), each as the
    (expert, row slice) pieces it covers: an expert on a cut is split between two streams. One group (no
    streams) when torch has one thread, the call is small, or there are fewer than
    ``MIN_EXPERTS_PER_STREAM`` experts per thread."""
    slices = list(_expert_slices(counts))
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    rows = sum(counts)
    if threads < 2 or len(slices) < MIN_EXPERTS_PER_STREAM * threads or rows * flops_per_row < MIN_STREAM_FLOPS:
        return [slices]
    cuts = [rows * i // threads for i in range(threads + 1)]
    groups = []
    for begin, end in zip(cuts[:-1], cuts[1:]):
        pieces = [(e, slice(max(r.start, begin), min(r.stop, end))) for e, r in slices]
        groups.append([(e, r) for e, r in pieces if r.start < r.stop])
    return [g for g in groups if g]


def _run_streams(work, groups: list, accumulators: list[torch.Tensor]) -> None:
    """``work(group, accumulator)`` for every group: inline for one group, else one worker per group; the
    accumulators after the first are added into the first, in order."""
    if len(groups) == 1:
        work(groups[0], accumulators[0])
        return
    pool = _streams_pool(len(groups))
    # grad and inference mode are per thread: the workers take the caller's
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_caller_grad_mode(group, accumulator):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
            work(group, accumulator)

    for future in [pool.submit(in_caller_grad_mode, g, acc) for g, acc in zip(groups, accumulators)]:
        future.result()
    for acc in accumulators[1:]:
        accumulators[0].add_(acc)


def _torch_expert_forward(x_TD, w_S, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, keep_h):
    """The forward walk; returns the output and, if ``keep_h``, the pre-activations for backward (one
    ``[rows of the expert, N_in]`` tensor per expert)."""
    num_tokens, dim = x_TD.shape
    counts = plan.counts_list()
    tokens_S = plan.sorted_tokens_S
    n_in = w_in_ENK.shape[1]
    hidden = n_in // 2 if gated else n_in
    # With a backward to come, h is kept, one tensor per expert; otherwise it is scratch like the rest. Not one
    # [S, N_in] tensor: that is often larger than the largest block glibc serves from its heap (32 MiB), so
    # every call would map fresh pages and fault through all of them (DiT-MoE-S: 12k faults, ~15 ms a call).
    starts = _expert_starts(counts)
    h_E = [x_TD.new_empty(count, n_in) for count in counts] if keep_h else None
    act = activation_fn(activation)

    def work(group, out_TD):
        buffers = _Buffers.for_group(x_TD, group)
        for e, rows in group:
            count = rows.stop - rows.start
            x_CD = torch.index_select(x_TD, 0, tokens_S[rows], out=buffers.get("x", dim, count))
            h_CN = _piece_of(h_E, starts, e, rows) if keep_h else buffers.get("h", n_in, count)
            torch.mm(x_CD, w_in_ENK[e].t(), out=h_CN)
            if b_in_EN is not None:
                h_CN += b_in_EN[e]
            a_CF = buffers.get("a", hidden, count)
            if gated:
                torch.mul(act(h_CN[:, :hidden]), h_CN[:, hidden:], out=a_CF)
            else:
                a_CF.copy_(act(h_CN))
            a_CF.mul_(w_S[rows, None])
            y_CD = torch.mm(a_CF, w_out_EDF[e].t(), out=buffers.get("y", dim, count))
            if b_out_ED is not None:
                y_CD.addr_(w_S[rows], b_out_ED[e])
            out_TD.index_add_(0, tokens_S[rows], y_CD)

    groups = _stream_groups(counts, 2.0 * dim * (n_in + hidden), x_TD.device)
    outs = [x_TD.new_zeros(num_tokens, dim) for _ in groups]
    _run_streams(work, groups, outs)
    return outs[0], h_E


class _TorchExpertMLP(torch.autograd.Function):
    """The CPU path: per expert, gather its rows, two GEMMs and the activation in reused scratch buffers,
    and ``index_add_`` the weighted result into the output; a hand-written backward does the same walk.
    With several threads the experts run as parallel single-threaded streams (see ``_stream_groups``).

    The routing weight is applied to the hidden activation (F wide) rather than to the output (D wide):
    ``w * (a @ W_out^T) == (w * a) @ W_out^T``, and the router gradient is ``<dA', a>``. Only the
    pre-activation ``h`` (one [rows, N_in] tensor per expert) is kept for backward (as a dense MLP keeps its own); the gathered
    inputs and activations are recomputed per expert, which is cheap next to the GEMMs. On CPU
    ``index_add_`` walks the rows in order, so results are deterministic.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, plan, activation, gated):
        w_S = weights_TK.reshape(-1).index_select(0, plan.sorted_slots_S).to(x_TD.dtype)
        out_TD, h_E = _torch_expert_forward(x_TD, w_S, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated, True)
        ctx.save_for_backward(x_TD, w_S, w_in_ENK, w_out_EDF, b_out_ED, *h_E)
        ctx.plan, ctx.counts, ctx.activation, ctx.gated = plan, plan.counts_list(), activation, gated
        ctx.has_b_in, ctx.has_b_out = b_in_EN is not None, b_out_ED is not None
        ctx.weights_dtype = weights_TK.dtype
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        x_TD, w_S, w_in_ENK, w_out_EDF, b_out_ED, *h_E = ctx.saved_tensors
        plan, counts, gated = ctx.plan, ctx.counts, ctx.gated
        tokens_S = plan.sorted_tokens_S
        grad_out_TD = grad_out_TD.contiguous()
        dim, n_in = x_TD.shape[1], w_in_ENK.shape[1]
        hidden = n_in // 2 if gated else n_in
        act = activation_fn(ctx.activation)
        # Written in place by each expert's GEMMs (out=); only experts without rows need zeros.
        grad_w_in, grad_w_out = torch.empty_like(w_in_ENK), torch.empty_like(w_out_EDF)
        for e, count in enumerate(counts):
            if not count:
                grad_w_in[e].zero_()
                grad_w_out[e].zero_()
        grad_b_in = x_TD.new_zeros(w_in_ENK.shape[:2]) if ctx.has_b_in else None
        grad_b_out = torch.zeros_like(b_out_ED) if ctx.has_b_out else None
        grad_w_S = w_S.new_empty(len(tokens_S))
        expert_starts = _expert_starts(counts)
        continued = {}  # (expert, first row) -> weight gradients of a piece continuing an expert in a later stream

        def work(group, grad_x_TD):
            buffers = _Buffers.for_group(x_TD, group)
            for e, rows in group:
                count = rows.stop - rows.start
                # An expert split between streams: its first piece writes the gradients in place, the later
                # piece into its own tensors, added after the streams join (no two threads write one tensor).
                grads = [g[e] if g is not None else None for g in (grad_w_in, grad_w_out, grad_b_in, grad_b_out)]
                if rows.start != expert_starts[e]:
                    grads = [torch.empty_like(g) if g is not None else None for g in grads]
                    continued[e, rows.start] = grads
                g_w_in, g_w_out, g_b_in, g_b_out = grads
                w_C1 = w_S[rows, None]
                grad_y_CD = torch.index_select(grad_out_TD, 0, tokens_S[rows], out=buffers.get("gy", dim, count))
                h_CN = _piece_of(h_E, expert_starts, e, rows)
                pre_CF = h_CN[:, :hidden]
                a_CF = buffers.get("a", hidden, count)
                if gated:
                    torch.mul(act(pre_CF), h_CN[:, hidden:], out=a_CF)
                else:
                    a_CF.copy_(act(pre_CF))
                # dA' (the gradient at the weighted activation), then the router weight's and W_out's gradients.
                grad_wa_CF = torch.mm(grad_y_CD, w_out_EDF[e], out=buffers.get("gwa", hidden, count))
                grad_w_S[rows] = (grad_wa_CF * a_CF).sum(-1)
                if ctx.has_b_out:
                    grad_w_S[rows] += grad_y_CD @ b_out_ED[e]
                    torch.mv(grad_y_CD.t(), w_S[rows], out=g_b_out)
                torch.mm(grad_y_CD.t(), a_CF.mul_(w_C1), out=g_w_out)
                grad_a_CF = grad_wa_CF.mul_(w_C1)
                grad_h_CN = buffers.get("gh", n_in, count)
                if gated:
                    up_CF = h_CN[:, hidden:]
                    torch.mul(grad_a_CF, act(pre_CF), out=grad_h_CN[:, hidden:])
                    grad_h_CN[:, :hidden] = _act_grad(ctx.activation, grad_a_CF.mul_(up_CF), pre_CF)
                else:
                    grad_h_CN.copy_(_act_grad(ctx.activation, grad_a_CF, pre_CF))
                if ctx.has_b_in:
                    torch.sum(grad_h_CN, 0, out=g_b_in)
                x_CD = torch.index_select(x_TD, 0, tokens_S[rows], out=buffers.get("x", dim, count))
                torch.mm(grad_h_CN.t(), x_CD, out=g_w_in)
                grad_x_CD = torch.mm(grad_h_CN, w_in_ENK[e], out=buffers.get("gx", dim, count))
                grad_x_TD.index_add_(0, tokens_S[rows], grad_x_CD)

        groups = _stream_groups(counts, 4.0 * dim * (n_in + hidden), x_TD.device)
        grad_xs = [torch.zeros_like(x_TD) for _ in groups]
        _run_streams(work, groups, grad_xs)
        for (e, _), grads in sorted(continued.items()):  # a fixed order: deterministic sums
            for total, part in zip((grad_w_in, grad_w_out, grad_b_in, grad_b_out), grads):
                if part is not None:
                    total[e] += part
        grad_weights = grad_w_S.new_zeros(plan.num_tokens * plan.top_k)
        grad_weights[plan.sorted_slots_S] = grad_w_S
        grad_weights = grad_weights.view(plan.num_tokens, plan.top_k).to(ctx.weights_dtype)
        return grad_xs[0], grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None


def grouped_linear(
    x_TD: torch.Tensor, plan: DispatchPlan, w_ENK: torch.Tensor, b_EN: torch.Tensor | None = None
) -> torch.Tensor:
    """Each dispatched slot's row through its expert's linear map: gathered input [T, K] -> sorted rows [S, N].

    The building block for experts that are not a two-layer MLP (ternary, LoRA, FiLM-modulated): rows come
    out in the plan's sorted order; ``combine`` brings them back to token order. Autograd differentiates it.
    """
    if x_TD.shape[-1] != w_ENK.shape[-1]:
        raise ValueError(f"x has last dimension {x_TD.shape[-1]} but the weights take K={w_ENK.shape[-1]}")
    x_SK = x_TD.index_select(0, plan.sorted_tokens_S)
    pieces = []
    for e, rows in _expert_slices(plan.counts_list()):
        piece = x_SK[rows] @ w_ENK[e].t()
        pieces.append(piece if b_EN is None else piece + b_EN[e])
    if not pieces:
        return x_SK.new_zeros(0, w_ENK.shape[1])
    return torch.cat(pieces)


def combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted sum of sorted expert outputs back into token order, deterministically: rows are written to
    their (token, slot) place and reduced over the k slots, with no atomics."""
    num_tokens, top_k = plan.num_tokens, plan.top_k
    slots_TKD = y_SD.new_zeros(num_tokens * top_k, y_SD.shape[-1])
    slots_TKD = slots_TKD.index_copy(0, plan.sorted_slots_S, y_SD)
    weighted = slots_TKD.view(num_tokens, top_k, y_SD.shape[-1]) * (weights_TK * plan.kept_TK).unsqueeze(-1).to(y_SD.dtype)
    return weighted.sum(1)
