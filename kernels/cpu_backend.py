"""The torch backend of the grouped expert MLP: the CPU default, plain torch ops and oneDNN / MKL GEMMs.

Per expert: gather its rows, two GEMMs and the activation, and ``index_add_`` the weighted result into the
output, with a hand-written backward that reuses the forward's buffers (``_TorchExpertMLP``). Around that walk:
which GEMM library runs a product (oneDNN's linear for large fp32 products, ``torch.mm`` below
``ONEDNN_MIN_MACS``), parallel single-threaded streams of rows with several threads, a padded batched path for
few rows per expert without autograd (``PADDED_MAX_MACS``), oneDNN-prepacked weights for inference, and for a
few tokens without autograd (decoding) a path that never sorts (``FEW_TOKENS_MAX_SLOTS``).
Shape checks are the caller's (``moezoo.kernels.experts.expert_mlp``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref

import torch

from . import cpu_decode
from .activations import activation_fn, activation_grad
from .plan import DispatchPlan, expert_slices

__all__ = ["PackedExpertWeights", "few_tokens_pay", "pack_expert_weights", "shared_apart_pays", "torch_expert_mlp"]


def torch_expert_mlp(x_TD, weights_TK, plan: DispatchPlan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation: str,
                     gated: bool, shared_tensors: tuple, shared_activation: str | None,
                     packed: PackedExpertWeights | None = None) -> torch.Tensor:
    """``y[t] = sum_{kept j} weights_TK[t, j] * expert_{ids[t, j]}(x[t])``, plus the shared expert's
    ``scale[t] * shared(x[t])`` when ``shared_tensors`` = (w_in_NK, w_out_DF, scale_T or None) is not
    (None, None, None). Differentiable with respect to every tensor argument; without autograd it runs the
    forward-only paths (padded batched GEMMs for few rows, oneDNN's fused activations), on the routed experts'
    ``packed`` copies while the handle matches ``w_in_ENK`` and ``w_out_EDF``."""
    tensors = (x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, *shared_tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _TorchExpertMLP.apply(*tensors, plan, activation, gated, shared_activation)
    if few_tokens_pay(plan.num_tokens, plan.top_k):
        return _few_tokens_forward(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated,
                                   shared_tensors, shared_activation)
    tables = _expert_tables(*tensors, plan, activation, gated, shared_activation)
    if _padded_pays(tables[0]):
        out_TD = _padded_forward(x_TD, tables[0], plan)
        if len(tables) > 1:  # the shared expert: one expert of T rows, as the walk below runs it
            out_TD += _torch_expert_forward(x_TD, tables[1:], _forward_groups(tables[1:], x_TD), keep_h=False)[0]
        return out_TD
    if packed is not None and _use_onednn(x_TD) and packed.matches(w_in_ENK, w_out_EDF):
        tables[0].packed = packed
    return _torch_expert_forward(x_TD, tables, _forward_groups(tables, x_TD), keep_h=False)[0]


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# On x86 CPUs torch's fp32 ``mm`` calls MKL; oneDNN's linear (the kernel torch.compile uses for CPU linears) is
# the other choice, and which one wins depends on the CPU kind (``python bench/cpu_gemm.py``, the experts'
# products single-threaded, alone or two at once): with AVX-512 (AMD Zen 4) oneDNN runs the forward and
# input-gradient products 1.1-1.2x faster; on an AVX2-only CPU (AMD Zen 3) it is slower (0.89x, geometric mean),
# and ``bench/moe_layer.py`` runs 7-20% faster on MKL. So oneDNN is used where torch's kernels run with AVX-512
# (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY=avx2`` lowers as on a Zen 3), and
# ``MOEZOO_CPU_GEMM=mm`` / ``onednn`` overrides the choice. The weight gradients stay on ``mm`` everywhere: it
# writes them in place, and there oneDNN is not faster. ``ONEDNN_GEMMS`` is the switch (tests run both paths).
ONEDNN_CAPABILITIES = ("AVX512",)  # the torch CPU capabilities on which oneDNN's fp32 GEMMs were measured faster
CPU_GEMM_CHOICES = ("auto", "mm", "onednn")


def _onednn_cpu_kind() -> bool:
    """Whether this CPU is of a kind where oneDNN's GEMMs (and the parallel streams) were measured to pay."""
    return torch.backends.cpu.get_cpu_capability() in ONEDNN_CAPABILITIES


def _onednn_gemms_chosen() -> bool:
    """Whether the experts' fp32 products go to oneDNN on this CPU: ``MOEZOO_CPU_GEMM`` (auto, mm, onednn), auto
    by the CPU kind; never where this torch has no oneDNN linear."""
    choice = os.environ.get("MOEZOO_CPU_GEMM", "auto").strip().lower()
    if choice not in CPU_GEMM_CHOICES:
        raise ValueError(f"MOEZOO_CPU_GEMM={choice!r} is not one of {', '.join(CPU_GEMM_CHOICES)} (auto: oneDNN on "
                         f"CPUs with {' / '.join(ONEDNN_CAPABILITIES)}, torch.mm elsewhere)")
    if not _onednn_linear_available():
        return False
    if choice == "auto":
        return _onednn_cpu_kind()
    return choice == "onednn"


ONEDNN_GEMMS = _onednn_gemms_chosen()
# Below this many multiply-adds a product is mostly call overhead, and oneDNN's (~20 us a call here) is about
# three times MKL's: at 32 rows x 128 x 128 (DiT-MoE digits' experts at one image) torch.mm is 2-3x faster;
# from ~2M multiply-adds up oneDNN wins (``python bench/cpu_gemm.py``, small products).
ONEDNN_MIN_MACS = 1 << 21


def _use_onednn(a: torch.Tensor) -> bool:
    return ONEDNN_GEMMS and a.dtype == torch.float32 and a.device.type == "cpu"


def _onednn_pays(a_MK: torch.Tensor, n_out: int) -> bool:
    """Whether ``a @ W.T`` with ``n_out`` output columns goes to oneDNN: fp32 on CPU and large enough."""
    return _use_onednn(a_MK) and a_MK.shape[0] * a_MK.shape[1] * n_out >= ONEDNN_MIN_MACS


def _matmul_nt(a_MK: torch.Tensor, b_NK: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` as a new tensor: oneDNN's linear for fp32 CPU products large enough to gain from it (``b``
    may be a prepacked oneDNN weight, which only oneDNN takes), else ``torch.mm``."""
    if b_NK.layout == torch._mkldnn or _onednn_pays(a_MK, b_NK.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(a_MK, b_NK, None, "none", [], "")
    return torch.mm(a_MK, b_NK.t())


# oneDNN's names for our activations (attr, algorithm), applied inside the GEMM as a post-op
_ONEDNN_ACTIVATIONS = {"silu": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def _fused_activated(x_CD, w_in_parts: tuple, b_in_N, activation: str, gated: bool) -> torch.Tensor:
    """``act(x @ W_gate^T + b) * (x @ W_up^T + b)`` (or ``act(x @ W^T + b)``) with the activation and the
    product done in oneDNN's GEMM epilogues, as torch.compile does for CPU SwiGLUs: no separate pass over the
    hidden activations. Inference only (the pre-activations are not kept). ``w_in_parts``: (W_gate, W_up) for
    gated experts, (W,) otherwise, each plain [F, D] or prepacked (``PackedExpertWeights``)."""
    linear = torch.ops.mkldnn._linear_pointwise
    attr, algorithm = _ONEDNN_ACTIVATIONS[activation]
    if not gated:
        return linear(x_CD, w_in_parts[0], b_in_N, attr, [], algorithm)
    hidden = w_in_parts[0].shape[0]
    b_gate, b_up = (None, None) if b_in_N is None else (b_in_N[:hidden], b_in_N[hidden:])
    gate_CF = linear(x_CD, w_in_parts[0], b_gate, attr, [], algorithm)
    return linear.binary(x_CD, gate_CF, w_in_parts[1], b_up, "mul")


# ----------------------------------------------------------------------------- prepacked weights (inference)
# oneDNN computes with weights in its own blocked layout and, given a plain [N, K] weight, reorders it inside
# every GEMM. For inference the weights stay the same from call to call, so they can be reordered once and
# kept (what torch.compile's "freezing" and IPEX's ``optimize`` do for CPU linears): the no-grad forward runs
# 1.04-1.12x faster on bench/moe_layer.py's shapes (``python bench/packed_weights.py``). Packing is explicit: the
# owner of the weights packs them (``pack_expert_weights``) and passes the handle (``expert_mlp(packed=...)``),
# and so knows when to pack again. The training path never packs: its weights change every step and its
# backward needs them transposed.

# oneDNN picks the blocked layout for a row count; one fixed count, so that results never depend on which call
# packed the weights (other row counts run on it at the same speed as on their own layout, or faster)
_PACKED_FOR_ROWS = 512


@dataclasses.dataclass(frozen=True)
class _PackedFrom:
    """What a weight tensor was when it was packed: the object itself (weakly: the handle keeps no weight
    alive), its storage, version counter, shape, strides and dtype."""

    ref: weakref.ref
    data_ptr: int
    version: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, w: torch.Tensor) -> "_PackedFrom":
        return cls(weakref.ref(w), w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype)

    def describes(self, w: torch.Tensor) -> bool:
        return (self.ref() is w and w.data_ptr() == self.data_ptr and w._version == self.version
                and tuple(w.shape) == self.shape and w.stride() == self.stride and w.dtype == self.dtype)


class PackedExpertWeights:
    """oneDNN-packed copies of one set of routed experts' weights, for the torch backend's no-grad forward.

    Made by ``pack_expert_weights(w_in_ENK, w_out_EDF)``; passed as ``expert_mlp(..., packed=handle)``, which
    uses it only on the torch backend, without autograd, and only while ``matches(w_in_ENK, w_out_EDF)``:
    the call's weights are the very tensor objects that were packed, on the same storage, with the same
    version counter (and shape, strides, dtype). Otherwise the call computes on the live weights, and the
    owner should drop the stale handle (or pack again).

    The version counter moves with every in-place change autograd knows of: optimizer steps,
    ``load_state_dict``, ``w.copy_(...)`` or ``w.add_(...)`` under ``torch.no_grad()``, changes through a view of
    the same storage. Changes through ``.data`` (``w.data[...] += 1``, ``w.data.copy_(...)``) bypass the version
    counter: the handle cannot see them and keeps computing with the values it packed. That is the contract:
    whoever edits weights through ``.data`` packs them again (a layer: ``unfreeze()``, edit, ``freeze()``).

    Immutable once made, so one handle may serve calls from several threads. Every expert is packed once for
    ``_PACKED_FOR_ROWS`` rows, so a call's result does not depend on which handle it got, and repeated calls
    agree bitwise.
    """

    def __init__(self, w_in_ENK: torch.Tensor, w_out_EDF: torch.Tensor):
        self._w_in_from, self._w_out_from = _PackedFrom.of(w_in_ENK), _PackedFrom.of(w_out_EDF)
        n_in, hidden = w_in_ENK.shape[1], w_out_EDF.shape[2]
        # gated experts' W_in packs as its gate and up halves: the fused forward runs them as two GEMMs
        in_rows = (slice(0, hidden), slice(hidden, n_in)) if n_in == 2 * hidden else (slice(0, n_in),)
        with torch.no_grad():
            self._w_in_parts_E = [tuple(_packed_linear_weight(w_in_ENK[e, rows]) for rows in in_rows)
                                  for e in range(w_in_ENK.shape[0])]
            self._w_out_E = [_packed_linear_weight(w_out_EDF[e]) for e in range(w_out_EDF.shape[0])]

    def matches(self, w_in_ENK: torch.Tensor, w_out_EDF: torch.Tensor) -> bool:
        """Whether these are the weights the handle was packed from, unchanged as far as torch can tell (see
        the class docstring for what it cannot tell: ``.data`` edits)."""
        return self._w_in_from.describes(w_in_ENK) and self._w_out_from.describes(w_out_EDF)

    def w_in_parts(self, expert: int) -> tuple[torch.Tensor, ...]:
        """Expert ``expert``'s packed W_in: (W_gate, W_up) for gated experts, (W,) otherwise."""
        return self._w_in_parts_E[expert]

    def w_out(self, expert: int) -> torch.Tensor:
        return self._w_out_E[expert]

    @property
    def nbytes(self) -> int:
        """Memory held by the packed copies."""
        parts = [p for parts in self._w_in_parts_E for p in parts] + self._w_out_E
        return sum(p.numel() * p.element_size() for p in parts)


def _packed_linear_weight(w_NK: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w_NK.detach().contiguous(), _PACKED_FOR_ROWS)


def pack_expert_weights(w_in_ENK: torch.Tensor, w_out_EDF: torch.Tensor) -> PackedExpertWeights | None:
    """Packs routed experts' weights (laid out as ``expert_mlp`` takes them: ``w_in_ENK`` [E, N_in, D] with
    N_in = 2F gated or F, ``w_out_EDF`` [E, D, F]) into oneDNN's layout, once, for no-grad calls of
    ``expert_mlp(..., backend="torch", packed=handle)``. See ``PackedExpertWeights`` for when the handle is
    used, and why edits through ``.data`` need a new one.

    Returns None where packing does not apply: no oneDNN linear in this torch (or ``ONEDNN_GEMMS`` off), weights
    that are not fp32 CPU tensors (oneDNN runs the torch backend's fp32 products only), or no weights at all.
    """
    if w_in_ENK.dim() != 3 or w_out_EDF.dim() != 3:
        raise ValueError(f"pack_expert_weights takes w_in [E, N_in, D] and w_out [E, D_out, F], got shapes "
                         f"{tuple(w_in_ENK.shape)} and {tuple(w_out_EDF.shape)}")
    (num_experts, n_in, _), hidden = w_in_ENK.shape, w_out_EDF.shape[2]
    if w_out_EDF.shape[0] != num_experts or n_in not in (hidden, 2 * hidden):
        raise ValueError(f"w_out must be [E, D_out, F] with E = {num_experts} and N_in = {n_in} = 2F (gated) or F, "
                         f"got {tuple(w_out_EDF.shape)}")
    if not (_use_onednn(w_in_ENK) and _use_onednn(w_out_EDF)) or w_in_ENK.numel() == 0 or w_out_EDF.numel() == 0:
        return None
    if w_in_ENK.is_inference() or w_out_EDF.is_inference():
        raise ValueError("pack_expert_weights needs weights with a version counter, to tell when they change; "
                         "these were made under torch.inference_mode (which drops it): make the weights "
                         "outside inference mode")
    return PackedExpertWeights(w_in_ENK, w_out_EDF)


class _Buffers:
    """Scratch rows reused across the experts of one call: every expert's rows fit in the largest expert's
    buffer, so the loop touches a few MB that stay in cache instead of fresh [S, *] tensors per step
    (on CPU, allocating and page-faulting large fresh tensors costs as much as a small GEMM)."""

    def __init__(self, like: torch.Tensor, rows: int):
        self.like, self.rows, self.cache = like, rows, {}

    @classmethod
    def for_group(cls, like: torch.Tensor, group: list[tuple[int, int, slice]]) -> "_Buffers":
        """Buffers that fit the largest piece of one stream's (table, expert, rows) group."""
        return cls(like, max((rows.stop - rows.start for _, _, rows in group), default=0))

    def get(self, name: str, cols: int, count: int) -> torch.Tensor:
        if (name, cols) not in self.cache:
            self.cache[name, cols] = self.like.new_empty(self.rows, cols)
        return self.cache[name, cols][:count]


# ------------------------------------------------------------------------------------------ expert streams
# With several CPU threads, one MKL GEMM per expert split across all threads wastes much of each call on
# splitting small matrices and waiting at barriers. Instead the sorted rows are cut into as many equal ranges
# ("streams") as there are threads, and each runs on its own worker thread with single-threaded GEMMs (an
# expert on a cut is split between two streams). Each stream adds into its own output, and the outputs are
# summed in a fixed order, so results are still deterministic. Measured (bench/moe_layer.py, 2 threads, MKL
# GEMMs): E=64 fwd+bwd 1.21x -> 1.02x of dense; with whole experts per stream E=8 lost (halves of 4 experts
# balanced poorly), with even row cuts it is level or better. The backward streams; the forward does only
# without oneDNN, whose own threading of each GEMM is faster there (see ``_forward_groups``). Both only on the
# CPU kinds where streams were measured to pay (``PARALLEL_STREAMS``).

MIN_STREAM_FLOPS = 2e8  # below this a call is too small to be worth handing to worker threads
# Streams were measured to pay on an AVX-512 CPU (Zen 4, above) from ``MIN_STREAM_FLOPS`` up. On an AVX2-only one
# (Zen 3), where the GEMMs run on MKL, they pay only on large calls: forward and backward, 2 threads, in one
# process, interleaved (forward multiply-adds x 2 of the call in brackets), streams against whole experts with MKL
# threading each GEMM took 1.25x the time on a digits-sized layer (4,096 tokens of width 128; 1.6G), 1.02x on
# DiT-MoE-S (2,048 tokens; 18G), 0.91x on DiT-MoE-S at 8,192 tokens (72G), 0.79x on E64_k8 at 1,024 tokens (26G),
# 0.88x at 4,096 (103G), 0.95x on E8_k2 (103G); the forward alone 0.96x on E64_k8 and E8_k2, level on DiT-MoE-S.
# So there the walk streams from ``MKL_MIN_STREAM_FLOPS``. By CPU kind, as the GEMM library
# (``ONEDNN_CAPABILITIES``).
PARALLEL_STREAMS = _onednn_cpu_kind()
MKL_MIN_STREAM_FLOPS = 2e10
_stream_pool = None  # (ThreadPoolExecutor, its worker count)


def _pool_thread_init(barrier) -> None:
    torch.set_num_threads(1)  # this thread's own OpenMP / MKL thread count
    torch.get_num_threads()  # makes torch's per-thread lazy init read 1 now, before the caller restores its count
    barrier.wait()


def _streams_pool(streams: int):
    """A pool of ``streams`` single-threaded workers (made once; remade if the thread count changes)."""
    global _stream_pool
    if _stream_pool is None or _stream_pool[1] != streams:
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


def _one_group(counts: list[list[int]]) -> list[list[tuple[int, int, slice]]]:
    """Every table's experts whole, in one group: no streams."""
    return [[(t, e, rows) for t, table_counts in enumerate(counts) for e, rows in expert_slices(table_counts)]]


def _stream_groups(counts: list[list[int]], flops_per_row: list[float], device: torch.device):
    """Every table's sorted rows (``counts[t]``: its rows per expert) cut into one contiguous range of equal
    length per CPU thread ("stream"), each stream as the (table, expert, row slice) pieces it covers: an expert
    on a cut is split between two streams. Equal cuts of every table give every stream the same work. One
    group (no streams) when torch has one thread or the call is smaller than ``MIN_STREAM_FLOPS`` (on CPU kinds
    where streams were measured to pay: ``PARALLEL_STREAMS``) or ``MKL_MIN_STREAM_FLOPS`` (elsewhere)."""
    slices = [list(expert_slices(table_counts)) for table_counts in counts]
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    flops = sum(sum(table_counts) * f for table_counts, f in zip(counts, flops_per_row))
    if threads < 2 or flops < (MIN_STREAM_FLOPS if PARALLEL_STREAMS else MKL_MIN_STREAM_FLOPS):
        return _one_group(counts)
    groups = [[] for _ in range(threads)]
    for t, (table, table_counts) in enumerate(zip(slices, counts)):
        total = sum(table_counts)
        cuts = [total * i // threads for i in range(threads + 1)]
        for group, begin, end in zip(groups, cuts[:-1], cuts[1:]):
            pieces = [(t, e, slice(max(r.start, begin), min(r.stop, end))) for e, r in table]
            group += [(t, e, r) for t, e, r in pieces if r.start < r.stop]
    return [group for group in groups if group]


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
        if acc is not None:
            accumulators[0].add_(acc)


def _activated(act, h_CN: torch.Tensor, hidden: int, gated: bool, out_CF: torch.Tensor | None) -> torch.Tensor:
    """``act(gate) * up`` for gated experts, ``act(h)`` otherwise, written into ``out_CF`` (None: a new tensor)."""
    if gated:
        return torch.mul(act(h_CN[:, :hidden]), h_CN[:, hidden:], out=out_CF)
    return act(h_CN) if out_CF is None else out_CF.copy_(act(h_CN))


@dataclasses.dataclass
class _ExpertTable:
    """One set of experts the torch backend walks: the plan's routed experts, or the shared expert as a
    one-expert table whose rows are all tokens in order (``tokens_S`` None: row i is token i, so gathering
    and scattering are plain slices)."""

    w_in_ENK: torch.Tensor
    w_out_EDF: torch.Tensor
    b_in_EN: torch.Tensor | None
    b_out_ED: torch.Tensor | None
    tokens_S: torch.Tensor | None
    w_S: torch.Tensor  # each row's weight: its routing weight, or the shared expert's per-token scale
    counts: list[int]
    activation: str
    gated: bool
    packed: PackedExpertWeights | None = None  # prepacked weights: no-grad oneDNN calls only

    @property
    def hidden(self) -> int:
        return self.w_out_EDF.shape[2]

    def w_in_parts(self, e: int) -> tuple:
        """Expert ``e``'s W_in as (W_gate, W_up) for gated experts, (W,) otherwise; prepacked if it can be."""
        if self.packed is not None:
            return self.packed.w_in_parts(e)
        n_in = self.w_in_ENK.shape[1]
        parts = (slice(0, self.hidden), slice(self.hidden, n_in)) if self.gated else (slice(0, n_in),)
        return tuple(self.w_in_ENK[e, rows] for rows in parts)

    def w_out(self, e: int, a_CF: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s W_out for the product with ``a_CF``: prepacked if it can be and oneDNN will run it."""
        if self.packed is None or not _onednn_pays(a_CF, self.w_out_EDF.shape[1]):
            return self.w_out_EDF[e]
        return self.packed.w_out(e)

    @property
    def flops_per_row(self) -> float:
        return 2.0 * (self.w_in_ENK.shape[2] * self.w_in_ENK.shape[1] + self.hidden * self.w_out_EDF.shape[1])

    def gather(self, src_TD: torch.Tensor, rows: slice, out: torch.Tensor) -> torch.Tensor:
        if self.tokens_S is None:
            return src_TD[rows]
        return torch.index_select(src_TD, 0, self.tokens_S[rows], out=out)

    def scatter_add(self, dst_TD: torch.Tensor, rows: slice, y_CD: torch.Tensor) -> None:
        if self.tokens_S is None:
            dst_TD[rows] += y_CD
        else:
            dst_TD.index_add_(0, self.tokens_S[rows], y_CD)


def _expert_tables(x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, shared_w_in_NK, shared_w_out_DF,
                   shared_scale_T, plan, activation, gated, shared_activation) -> list[_ExpertTable]:
    """The routed experts' table, then the shared expert's if there is one."""
    w_S = weights_TK.reshape(-1).index_select(0, plan.sorted_slots_S).to(x_TD.dtype)
    tables = [_ExpertTable(w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, plan.sorted_tokens_S, w_S, plan.counts_list(),
                           activation, gated)]
    if shared_w_in_NK is not None:
        num_tokens = x_TD.shape[0]
        scale_T = x_TD.new_ones(num_tokens) if shared_scale_T is None else shared_scale_T.to(x_TD.dtype)
        tables.append(_ExpertTable(shared_w_in_NK[None], shared_w_out_DF[None], None, None, None, scale_T,
                                   [num_tokens], shared_activation, gated))
    return tables


def _stream_groups_of(tables: list[_ExpertTable], device: torch.device):
    return _stream_groups([t.counts for t in tables], [t.flops_per_row for t in tables], device)


def _forward_groups(tables: list[_ExpertTable], x_TD: torch.Tensor):
    """The forward's pieces. With oneDNN GEMMs, whole experts in the calling thread: oneDNN spreads each GEMM
    over the threads itself (2.05x one thread's speed on these shapes, ``python bench/cpu_gemm.py``), which beat
    parallel streams of single-threaded GEMMs in the forward (bench/moe_layer.py, fwd: DiT-MoE-S 102 vs 109 ms,
    E8 and E64 level or ~1% better). The backward still streams: its weight gradients are MKL GEMMs that
    reduce over an expert's rows, which two threads split poorly (E64 fwd+bwd 1.88 s without streams, 1.82 s
    with)."""
    if _use_onednn(x_TD):
        return _one_group([t.counts for t in tables])
    return _stream_groups_of(tables, x_TD.device)


def _kept_h_for(h_kept: dict, t: int, e: int, rows: slice) -> torch.Tensor:
    """The pre-activations of sorted ``rows`` of expert ``e`` of table ``t``, from the forward's piece that holds
    them (the forward and backward may cut experts differently)."""
    for start, h_CN in h_kept[t, e]:
        if start <= rows.start and rows.stop <= start + h_CN.shape[0]:
            return h_CN[rows.start - start:rows.stop - start]
    raise AssertionError(f"no forward piece holds rows {rows} of expert {e}")


def _torch_expert_forward(x_TD, tables: list[_ExpertTable], groups, keep_h: bool):
    """The forward walk over ``groups``; returns the output and, if ``keep_h``, the pre-activations for
    backward: ``{(table, expert): [(first row, [rows, N_in] tensor) per piece]}``. Kept per piece, not as one
    [S, N_in] tensor: that is often larger than the largest block glibc serves from its heap (32 MiB), so every
    call would map fresh pages and fault through all of them (DiT-MoE-S: 12k faults, ~15 ms a call)."""
    num_tokens, dim = x_TD.shape
    out_dim = tables[0].w_out_EDF.shape[1]  # the experts' output width (a connector's differs from dim)
    h_kept = {}  # (table, expert) -> [(first row, pre-activations)]: two streams may each add a piece of one
    # expert, which is safe (dict.setdefault and list.append are atomic under the GIL)

    def work(group, out_TD):
        buffers = _Buffers.for_group(x_TD, group)
        for t, e, rows in group:
            table, count = tables[t], rows.stop - rows.start
            x_CD = table.gather(x_TD, rows, buffers.get("x", dim, count))
            b_in_N = None if table.b_in_EN is None else table.b_in_EN[e]
            if keep_h or not _onednn_pays(x_CD, table.w_in_ENK.shape[1]):
                h_CN = _matmul_nt(x_CD, table.w_in_ENK[e])
                if b_in_N is not None:
                    h_CN += b_in_N
                if keep_h:
                    h_kept.setdefault((t, e), []).append((rows.start, h_CN))
                act = activation_fn(table.activation)
                a_CF = _activated(act, h_CN, table.hidden, table.gated, buffers.get("a", table.hidden, count))
            else:
                a_CF = _fused_activated(x_CD, table.w_in_parts(e), b_in_N, table.activation, table.gated)
            y_CD = _matmul_nt(a_CF, table.w_out(e, a_CF))
            if table.b_out_ED is not None:
                y_CD += table.b_out_ED[e]
            # the routing weight scales the D-wide output (not the F-wide activation): fewer elements to touch
            table.scatter_add(out_TD, rows, y_CD.mul_(table.w_S[rows, None]))

    outs = [x_TD.new_zeros(num_tokens, out_dim) for _ in groups]
    _run_streams(work, groups, outs)
    return outs[0], h_kept if keep_h else None


# ---------------------------------------------------------------------------- few rows: one batched GEMM
# With few tokens per expert each product is a few microseconds of arithmetic behind ~10 us of fixed cost per
# call, and the walk above makes ~7 calls per expert. Without autograd, such a call instead pads every expert's
# rows to the largest expert's count and runs each projection as one torch.bmm over all experts: the bundled
# DiT-MoE digits' MoE layer at 128 tokens (8 experts of 128 x 128) went 2.5 -> 1.6 ms a call, router and plan
# included (``python bench/few_tokens.py``). Larger experts lose on bmm and on the padding.
PADDED_MAX_MACS = 1 << 22  # the padded path runs while an average expert's input product is at most this


def _padded_pays(table: _ExpertTable) -> bool:
    """Whether the no-grad forward runs ``table`` as padded batched GEMMs: small experts, padding that at most
    doubles the rows."""
    rows, num_experts = sum(table.counts), len(table.counts)
    n_in, dim = table.w_in_ENK.shape[1:]
    return 0 < rows * dim * n_in <= PADDED_MAX_MACS * num_experts and max(table.counts) * num_experts <= 2 * rows


def _padded_forward(x_TD: torch.Tensor, table: _ExpertTable, plan: DispatchPlan) -> torch.Tensor:
    """The routed experts' (``table``, laid out by ``plan``) weighted sum with every expert's rows padded to the
    largest count: the padded row of every sorted row, then ``_padded_experts``."""
    device = x_TD.device
    expert_S = torch.repeat_interleave(torch.arange(len(table.counts), device=device), plan.counts_E)
    # padded row of every sorted row: its expert's block of C rows, then its rank within the expert
    rank_S = torch.arange(len(expert_S), device=device) - plan.offsets_E1[expert_S]
    widest = max(table.counts)
    return _padded_experts(x_TD, table, expert_S * widest + rank_S, widest)


def _padded_experts(x_TD: torch.Tensor, table: _ExpertTable, padded_S: torch.Tensor, widest: int) -> torch.Tensor:
    """``table``'s sorted rows at rows ``padded_S`` of an [E x ``widest``] padded layout: gather into [E, C, D],
    two ``torch.bmm``, then each real row weighted and added to its token (in sorted order, so the sums are
    deterministic). Padding rows are zeros and are never read back."""
    num_tokens, dim = x_TD.shape
    num_experts = len(table.counts)
    x_PD = x_TD.new_zeros(num_experts * widest, dim)
    x_PD[padded_S] = x_TD.index_select(0, table.tokens_S)
    h_ECN = torch.bmm(x_PD.view(num_experts, widest, dim), table.w_in_ENK.transpose(1, 2))
    if table.b_in_EN is not None:
        h_ECN += table.b_in_EN[:, None]
    hidden = table.hidden
    a_PF = _activated(activation_fn(table.activation), h_ECN.view(num_experts * widest, -1), hidden, table.gated,
                      x_TD.new_empty(num_experts * widest, hidden))
    y_ECD = torch.bmm(a_PF.view(num_experts, widest, hidden), table.w_out_EDF.transpose(1, 2))
    if table.b_out_ED is not None:
        y_ECD += table.b_out_ED[:, None]
    out_dim = y_ECD.shape[2]
    y_SD = y_ECD.view(-1, out_dim).index_select(0, padded_S).mul_(table.w_S[:, None])
    return x_TD.new_zeros(num_tokens, out_dim).index_add_(0, table.tokens_S, y_SD)


# ------------------------------------------------------------------ few tokens (decoding): no sort
# A decoding step runs a MoE layer on 1-16 tokens. There the paths above cost more in fixed work than in
# arithmetic: the plan's sort, per-expert gathers into buffers, the padded layout's index bookkeeping, a sync for
# the counts (at one token of the bundled DiT-MoE digits layer, 8 experts of 128 x 128, ~140 us against ~25 us
# for the whole dense MLP of the same active width). Without autograd and with at most ``FEW_TOKENS_MAX_SLOTS``
# slots, nothing is sorted:
# - small experts (all E together at most ``FEW_TOKENS_ALL_EXPERTS_MAX_WEIGHTS`` weights, so they stay in cache) at
#   more than one token all run on every token, with no host work at all: one GEMM over every expert's W_in,
#   the activation, the routing weights as a dense [T, E] gate (zero for experts a token did not choose), one
#   ``torch.bmm`` over the experts' W_out and a sum over experts. It computes E/k times the arithmetic but needs
#   no host copy of the ids, no per-expert row lists and no index tensors: the whole digits MoE layer (Zen 3,
#   1 thread, interleaved against the padded layout built on the host that ran here before) took 0.91x the time
#   at 2 and 4 tokens, 1.01x at 8, 1.05x at 16;
# - otherwise the slots are grouped by expert on the host from one copy of the ids and weights, and each chosen
#   expert runs on views of its own weights with ``torch.mm`` (no weight is copied: at one token the layer reads
#   the same weight bytes as the dense MLP of its active width), on the tokens themselves when it takes every
#   token in order (one token: always), else on its gathered rows; experts are summed in increasing id order, as
#   the walk sums them.
# oneDNN is not used: at a few rows MKL's GEMMs are as fast or faster.
FEW_TOKENS_MAX_SLOTS = 32  # 16 tokens of top-2: faster than the sorted paths on all of bench/decode.py's layers
FEW_TOKENS_ALL_EXPERTS_MAX_WEIGHTS = 1 << 20


def few_tokens_pay(num_tokens: int, top_k: int) -> bool:
    """Whether a no-grad call of ``num_tokens`` tokens of ``top_k`` slots runs the few-token path."""
    return num_tokens * top_k <= FEW_TOKENS_MAX_SLOTS


def shared_apart_pays(num_tokens: int, top_k: int) -> bool:
    """Whether a call should run the shared experts as their own dense MLP (under autograd: with torch's own
    backward), outside the routed walk. Inside, they cost a copy of their gate and up weights into one tensor
    per call, a gather and a scatter of every row, and in the backward the walk's recomputed activation; that
    pays only through oneDNN's fused activations at many rows (``ONEDNN_GEMMS``, the AVX-512 CPUs they were
    measured on). With MKL GEMMs (AVX2, AMD Zen 3) apart took 0.70-0.91x the time without grad at 32-2048
    tokens on the digits and DiT-MoE-S layers, and forward+backward 0.95x on the digits layer at 4,096 tokens
    and 0.94x on DiT-MoE-S at 2,048. The few-token path always runs them apart."""
    return few_tokens_pay(num_tokens, top_k) or not ONEDNN_GEMMS


def _few_tokens_forward(x_TD, weights_TK, plan: DispatchPlan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation,
                        gated, shared_tensors, shared_activation) -> torch.Tensor:
    """``torch_expert_mlp`` without autograd for few tokens: the chosen experts, then the shared one."""
    # (not in float16: an expert a token did not choose could overflow to inf, and inf * 0 gate is NaN)
    if plan.num_tokens > 1 and w_in_ENK.numel() + w_out_EDF.numel() <= FEW_TOKENS_ALL_EXPERTS_MAX_WEIGHTS \
            and x_TD.dtype != torch.float16:
        out_TD = _few_tokens_all_experts(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation,
                                         gated)
    else:
        weights = weights_TK.to(x_TD.dtype).tolist()
        rows_of: dict[int, list[tuple[int, float]]] = {}  # expert -> its (token, weight) rows, in token order
        for token, (ids, row_weights) in enumerate(zip(plan.kept_ids(), weights)):
            for expert, weight in zip(ids, row_weights):
                if expert >= 0:
                    rows_of.setdefault(expert, []).append((token, weight))
        out_TD = x_TD.new_zeros(plan.num_tokens, w_out_EDF.shape[1])
        for e in sorted(rows_of):
            tokens, row_weights = zip(*rows_of[e])
            _add_expert_rows(out_TD, x_TD, tokens, row_weights, w_in_ENK[e], w_out_EDF[e],
                             None if b_in_EN is None else b_in_EN[e], None if b_out_ED is None else b_out_ED[e],
                             activation, gated)
    w_in_NK, w_out_DF, scale_T = shared_tensors
    if w_in_NK is not None:
        _add_expert_rows(out_TD, x_TD, None, scale_T, w_in_NK, w_out_DF, None, None, shared_activation, gated)
    return out_TD


def _few_tokens_all_experts(x_TD, weights_TK, plan: DispatchPlan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation,
                            gated) -> torch.Tensor:
    """Every expert on every token, weighted by a dense [T, E] gate built from the kept slots (zero elsewhere; a
    slot's weight is added, so an expert chosen twice by a token counts twice, as the walk runs it)."""
    num_tokens, dim = x_TD.shape
    num_experts, n_in = w_in_ENK.shape[:2]
    h_TEN = torch.mm(x_TD, w_in_ENK.reshape(num_experts * n_in, dim).t()).view(num_tokens, num_experts, n_in)
    if b_in_EN is not None:
        h_TEN += b_in_EN
    hidden = w_out_EDF.shape[2]
    act = activation_fn(activation)
    a_TEF = act(h_TEN[..., :hidden]) * h_TEN[..., hidden:] if gated else act(h_TEN)
    kept_TK = plan.kept_TK
    gate_TE = x_TD.new_zeros(num_tokens, num_experts).scatter_add_(
        1, torch.where(kept_TK, plan.ids_TK, 0), torch.where(kept_TK, weights_TK.to(x_TD.dtype), 0.0))
    a_TEF = a_TEF * gate_TE[..., None]
    y_ETD = torch.bmm(a_TEF.transpose(0, 1), w_out_EDF.transpose(1, 2))
    if b_out_ED is not None:
        y_ETD += b_out_ED[:, None] * gate_TE.t()[..., None]
    return y_ETD.sum(0)


def _add_expert_rows(out_TD, x_TD, tokens: tuple[int, ...] | None, weights, w_in_NK, w_out_DF, b_in_N, b_out_D,
                     activation, gated) -> None:
    """``out[t] += w * expert(x[t])`` for the expert's ``tokens`` (None: every token in order) with their
    ``weights`` (floats; a [T] tensor or None (1) when ``tokens`` is None)."""
    whole = tokens is None or tokens == tuple(range(len(out_TD)))
    index = None if whole else torch.tensor(tokens, device=x_TD.device)
    x_CD = x_TD if index is None else x_TD.index_select(0, index)
    h_CN = torch.mm(x_CD, w_in_NK.t()) if b_in_N is None else torch.addmm(b_in_N, x_CD, w_in_NK.t())
    a_CF = _activated(activation_fn(activation), h_CN, w_out_DF.shape[1], gated, None)
    if isinstance(weights, tuple) and len(weights) == 1 and index is None:  # one token: its weight as a scalar
        out_TD.addmm_(a_CF, w_out_DF.t(), alpha=weights[0])
        if b_out_D is not None:
            out_TD.add_(b_out_D, alpha=weights[0])
        return
    y_CD = torch.mm(a_CF, w_out_DF.t())
    if b_out_D is not None:
        y_CD += b_out_D
    if weights is not None:
        w_C = torch.as_tensor(weights, dtype=y_CD.dtype, device=y_CD.device)
        y_CD.mul_(w_C[:, None])
    if index is None:
        out_TD += y_CD
    else:
        out_TD.index_add_(0, index, y_CD)


class _TableGrads:
    """The gradients of one table's weights (biases only if it has them) and of its rows' weights."""

    def __init__(self, table: _ExpertTable):
        # Written in place by each expert's GEMMs (out=); only experts without rows need zeros.
        self.w_in, self.w_out = torch.empty_like(table.w_in_ENK), torch.empty_like(table.w_out_EDF)
        for e, count in enumerate(table.counts):
            if not count:
                self.w_in[e].zero_()
                self.w_out[e].zero_()
        self.b_in = None if table.b_in_EN is None else torch.zeros_like(table.b_in_EN)
        self.b_out = None if table.b_out_ED is None else torch.zeros_like(table.b_out_ED)
        self.w_S = table.w_S.new_empty(sum(table.counts))

    def of_expert(self, e: int) -> list[torch.Tensor | None]:
        return [g[e] if g is not None else None for g in (self.w_in, self.w_out, self.b_in, self.b_out)]


# The gated-SiLU part of an expert's backward as one native pass on the calling thread
# (cpu_decode.glu_silu_backward) instead of eight two-threaded torch calls: expert_mlp forward+backward 0.93x the
# time on the digits layer, 0.91x on DiT-MoE-S (AMD Zen 3, AVX2 only, 2 threads, interleaved in one process).
# SiLU only (the zoo's experts), fp32; otherwise, or without the native library, the torch calls. Split over two
# threads (the pass's first, slower version) the walk took 1.01x (digits) and 1.04x (DiT-MoE-S) torch's time.
# The forward's activation stays with torch: one native pass on one thread was 0.96-1.07x torch's two calls on two.
FUSED_GLU_BACKWARD = True


def _fused_glu_backward(table: "_ExpertTable", h_CN: torch.Tensor) -> bool:
    return (FUSED_GLU_BACKWARD and table.gated and table.activation == "silu" and h_CN.dtype == torch.float32
            and h_CN.device.type == "cpu" and cpu_decode.available())


def _torch_activation_backward(table: _ExpertTable, h_CN, grad_wa_CF, w_S, a_buffer_CF, grad_h_CN, grad_w_C):
    """torch's calls for what ``cpu_decode.glu_silu_backward`` does in one pass, for any activation, gated or not:
    ``grad_h_CN`` and the rows' weight gradients ``grad_w_C`` from the gradient at the weighted activation
    ``grad_wa_CF`` (scaled in place); returns w * a (in ``a_buffer_CF`` when gated), W_out's gradient's input."""
    hidden, w_C1 = table.hidden, w_S[:, None]
    pre_CF = h_CN[:, :hidden]
    # the activation is recomputed once and kept: a = act(gate) * up, and up's gradient is dA * act(gate)
    act_CF = activation_fn(table.activation)(pre_CF)
    a_CF = torch.mul(act_CF, h_CN[:, hidden:], out=a_buffer_CF) if table.gated else act_CF
    grad_w_C.copy_(torch.linalg.vecdot(grad_wa_CF, a_CF))
    wa_CF = a_CF.mul_(w_C1)
    grad_a_CF = grad_wa_CF.mul_(w_C1)
    if table.gated:
        torch.mul(grad_a_CF, act_CF, out=grad_h_CN[:, hidden:])
        activation_grad(table.activation, grad_a_CF.mul_(h_CN[:, hidden:]), pre_CF, grad_h_CN[:, :hidden])
    else:
        activation_grad(table.activation, grad_a_CF, pre_CF, grad_h_CN)
    return wa_CF


def _backward_piece(table: _ExpertTable, e: int, rows: slice, h_CN, grads: list, grad_w_S, x_TD, grad_out_TD,
                    grad_x_TD, buffers: _Buffers) -> None:
    """One expert's piece of the backward: its weight gradients into ``grads``, its rows' weight gradients
    into ``grad_w_S``, and its input gradient added into ``grad_x_TD`` (None: not wanted)."""
    g_w_in, g_w_out, g_b_in, g_b_out = grads
    dim, count, hidden = x_TD.shape[1], rows.stop - rows.start, table.hidden
    w_S = table.w_S[rows]
    grad_y_CD = table.gather(grad_out_TD, rows, buffers.get("gy", grad_out_TD.shape[1], count))
    # dA' (the gradient at the weighted activation a' = w a), then the row weight's and W_out's gradients
    grad_wa_CF = _matmul_nt(grad_y_CD, table.w_out_EDF[e].t())
    grad_h_CN = buffers.get("gh", h_CN.shape[1], count)
    wa_CF = buffers.get("a", hidden, count)
    if _fused_glu_backward(table, h_CN):
        cpu_decode.glu_silu_backward(h_CN, grad_wa_CF, w_S, wa_CF, grad_h_CN, grad_w_S[rows])
    else:
        wa_CF = _torch_activation_backward(table, h_CN, grad_wa_CF, w_S, wa_CF, grad_h_CN, grad_w_S[rows])
    if g_b_out is not None:
        grad_w_S[rows] += grad_y_CD @ table.b_out_ED[e]
        torch.mv(grad_y_CD.t(), w_S, out=g_b_out)
    torch.mm(grad_y_CD.t(), wa_CF, out=g_w_out)
    if g_b_in is not None:
        torch.sum(grad_h_CN, 0, out=g_b_in)
    x_CD = table.gather(x_TD, rows, buffers.get("x", dim, count))
    torch.mm(grad_h_CN.t(), x_CD, out=g_w_in)
    if grad_x_TD is not None:  # None: the input needs no gradient (a frozen encoder's features, say)
        table.scatter_add(grad_x_TD, rows, _matmul_nt(grad_h_CN, table.w_in_ENK[e].t()))


class _TorchExpertMLP(torch.autograd.Function):
    """The CPU path: per expert, gather its rows, two GEMMs and the activation, and ``index_add_`` the
    weighted result into the output; a hand-written backward does the same walk. With several threads the
    backward (and, without oneDNN, the forward) runs as parallel single-threaded streams over equal row ranges
    (see ``_stream_groups``, ``_forward_groups``); the shared expert, if any, is one more table of pieces.

    ``w * (a @ W_out^T + b_out)`` is differentiated as ``(w * a) @ W_out^T + w * b_out``: the row weight's
    gradient is ``<dY, a @ W_out^T + b_out>``. Only the pre-activation ``h`` (one [rows, N_in] tensor per
    piece) is kept for backward (as a dense MLP keeps its own); the gathered inputs and activations are
    recomputed per expert, which is cheap next to the GEMMs. On CPU ``index_add_`` walks the rows in order,
    so results are deterministic.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, shared_w_in_NK, shared_w_out_DF,
                shared_scale_T, plan, activation, gated, shared_activation):
        tables = _expert_tables(x_TD, weights_TK, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, shared_w_in_NK,
                                shared_w_out_DF, shared_scale_T, plan, activation, gated, shared_activation)
        out_TD, h_kept = _torch_expert_forward(x_TD, tables, _forward_groups(tables, x_TD), keep_h=True)
        keys = [(key, start) for key, pieces in h_kept.items() for start, _ in pieces]
        ctx.save_for_backward(x_TD, *(h for pieces in h_kept.values() for _, h in pieces))
        ctx.tables, ctx.h_keys, ctx.plan = tables, keys, plan
        ctx.weights_dtype = weights_TK.dtype
        ctx.scale_dtype = None if shared_scale_T is None else shared_scale_T.dtype
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        x_TD, *h_pieces = ctx.saved_tensors
        tables, plan = ctx.tables, ctx.plan
        grad_out_TD = grad_out_TD.contiguous()
        grads = [_TableGrads(table) for table in tables]
        starts = [{e: rows.start for e, rows in expert_slices(table.counts)} for table in tables]
        h_kept = {}
        for (key, start), h_CN in zip(ctx.h_keys, h_pieces):
            h_kept.setdefault(key, []).append((start, h_CN))
        groups = _stream_groups_of(tables, x_TD.device)
        continued = {}  # (table, expert, first row) -> weight gradients of a piece continuing in a later stream

        def work(group, grad_x_TD):
            buffers = _Buffers.for_group(x_TD, group)
            for t, e, rows in group:
                # An expert split between streams: its first piece writes the gradients in place, the later
                # piece into its own tensors, added after the streams join (no two threads write one tensor).
                piece_grads = grads[t].of_expert(e)
                if rows.start != starts[t][e]:
                    piece_grads = [torch.empty_like(g) if g is not None else None for g in piece_grads]
                    continued[t, e, rows.start] = piece_grads
                _backward_piece(tables[t], e, rows, _kept_h_for(h_kept, t, e, rows), piece_grads, grads[t].w_S, x_TD,
                                grad_out_TD, grad_x_TD, buffers)

        # No input gradient where autograd needs none: a MoE connector or a first block on frozen features
        # skips a quarter of its backward GEMMs.
        grad_xs = [torch.zeros_like(x_TD) if ctx.needs_input_grad[0] else None for _ in groups]
        _run_streams(work, groups, grad_xs)
        for (t, e, _), parts in sorted(continued.items()):  # a fixed order: deterministic sums
            for total, part in zip(grads[t].of_expert(e), parts):
                if part is not None:
                    total += part
        routed = grads[0]
        grad_weights = routed.w_S.new_zeros(plan.num_tokens * plan.top_k)
        grad_weights[plan.sorted_slots_S] = routed.w_S
        grad_weights = grad_weights.view(plan.num_tokens, plan.top_k).to(ctx.weights_dtype)
        shared_grads = (None, None, None)
        if len(tables) > 1:
            shared = grads[1]
            shared_grads = (shared.w_in[0], shared.w_out[0], None if ctx.scale_dtype is None else shared.w_S.to(ctx.scale_dtype))
        return (grad_xs[0], grad_weights, routed.w_in, routed.w_out, routed.b_in, routed.b_out, *shared_grads,
                None, None, None, None)
