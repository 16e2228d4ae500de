"""The decode kernel: a whole MoE layer on a few tokens in one native call (CPU, fp32, no autograd).

A KV-cached generation step runs each MoE layer on 1-16 new tokens, one guided image of a small DiT-MoE on ~128.
There the eager path's two dozen framework calls (router, top-k, a GEMV pair per expert, the shared expert, the
sums; a few µs each) cost more than the arithmetic. ``cpu_decode.c`` does it all in one call:

- ``moe_decode_f32`` (:class:`PreparedLayer`): the router, softmax or sigmoid top-k (``topk_route``'s rule), each
  chosen expert once over the tokens that chose it, and the shared MLP; optionally a router over a subset of the
  experts (MoIIE's per-modality routers);
- ``dcmoe_decode_f32`` (:class:`PreparedDynamicLayer`): UniMoE-Audio's top-p with near-tie weights, null and gated
  shared experts.

The same library holds one piece of the training walk (``moezoo.kernels.cpu_backend``): :func:`glu_silu_backward`,
a gated SiLU's backward over an expert's rows in one pass.

Both decode calls multiply the weights where they live (dot products along the rows), or, for frozen blocks, packed copies in
panels of 16 outputs (:func:`pack_panels`), which reach MKL's GEMM speed at 64-128 tokens.

The C file is compiled on first use with the machine's C compiler (``$CC``, else ``cc``) for the running CPU
(``-march=native``: AVX2 on one CPU kind, AVX-512 on another; ``$MOEZOO_KERNEL_MARCH`` overrides it) into the cache folder (``$MOEZOO_KERNEL_CACHE``,
else ``$XDG_CACHE_HOME/moezoo/kernels``, else ``~/.cache/moezoo/kernels``), named by a hash of the source, the
flags and the CPU's feature flags, so a cache shared between CPU kinds never runs code built for another; the
library is written to a temporary name and renamed (never half-written). Without a compiler, or with
``MOEZOO_DECODE_KERNEL=0``, :func:`available` is False: the MoE blocks take their eager few-token path and the
training walk torch's elementwise calls.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["MAX_TOKENS", "MAX_SLOTS", "MAX_DYNAMIC", "ACTIVATION_CODES", "PreparedLayer", "PreparedDynamicLayer",
           "available", "fits", "glu_silu_backward", "library_path", "pack_panels", "prepared_for"]

MAX_TOKENS = 256  # the C file's MAX_TOKENS
MAX_DYNAMIC = 64  # the C file's MAX_DYNAMIC: a dynamic-capacity layer's routed + null experts
# The MoE blocks call it up to this many token-expert slots (128 tokens of top-2: one image of the digits model with
# guidance). Frozen blocks (pipelines freeze their models), against the eager path on the same layer (interleaved,
# in-process; AMD EPYC Zen 3, AVX2 only): with 1 thread 0.27-0.63x the time of the digits layer at 16-256 tokens and
# 0.41-0.80x of a DiT-MoE-S layer, level at 512; with 2 threads (the kernel runs on one) 0.27-0.95x and 0.48-0.94x up
# to 128 tokens, 0.95x / 1.22x at 256.
MAX_SLOTS = 256
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ("-O3", "-fopenmp-simd", "-fno-trapping-math", "-shared", "-fPIC")


def _flags() -> tuple[str, ...]:
    """The compiler flags: :data:`FLAGS` and ``-march=$MOEZOO_KERNEL_MARCH`` (default ``native``: the running CPU;
    ``x86-64-v3`` builds AVX2 code on an AVX-512 CPU, as ``make test-avx2`` does to test the other CPU kind)."""
    return ("-march=" + os.environ.get("MOEZOO_KERNEL_MARCH", "native"), *FLAGS)

_state: dict = {}  # "functions": the loaded C functions by name, or None once building or loading failed


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` builds for), or the machine name where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    if os.environ.get("MOEZOO_KERNEL_CACHE"):
        return Path(os.environ["MOEZOO_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moezoo" / "kernels"


def library_path() -> Path:
    """Where the library for this source, compiler flags and CPU lives (built or not)."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *_flags(), _cpu_flags()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_decode-{key}.so"


def _build(path: Path) -> None:
    """Compile the C file to ``path`` atomically: into a temporary file of the same folder, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        command = [os.environ.get("CC", "cc"), *_flags(), "-o", tmp, str(SOURCE), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    """The C functions by name (built and loaded on first use), or None when they cannot be."""
    if "functions" in _state:
        return _state["functions"]
    _state["functions"] = None
    if os.environ.get("MOEZOO_DECODE_KERNEL", "1") == "0":
        return None
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"moezoo's decode kernel is unavailable ({error}); MoE layers use their eager few-token path",
                      RuntimeWarning, stacklevel=3)
        return None
    topk, dynamic, glu = library.moe_decode_f32, library.dcmoe_decode_f32, library.glu_silu_backward_f32
    topk.restype = dynamic.restype = ctypes.c_int
    topk.argtypes = [ctypes.c_int] * 10 + [ctypes.c_float, ctypes.c_int] + [ctypes.c_void_p] * 20
    dynamic.argtypes = [ctypes.c_int] * 8 + [ctypes.c_double] * 3 + [ctypes.c_void_p] * 16
    glu.restype = None
    glu.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    _state["functions"] = {"topk": topk, "dynamic": dynamic, "glu_silu_backward": glu}
    return _state["functions"]


def _function(name: str):
    functions = _load()
    if functions is None:
        raise RuntimeError("the decode kernel is unavailable: check cpu_decode.available() first")
    return functions[name]


def available() -> bool:
    """Whether the decode kernel is built and loaded (it is built on the first call)."""
    return _load() is not None


def pack_panels(w_NK: torch.Tensor) -> torch.Tensor:
    """Weights ``[..., N, K]`` (N outputs, each a dot product over K) as the kernel's panels ``[..., ceil(N/16), K,
    16]``: 16 outputs' weights side by side for each k, zero past N (the C file's ``panel_times``)."""
    pad = -w_NK.shape[-2] % 16
    padded = torch.nn.functional.pad(w_NK, (0, 0, 0, pad)) if pad else w_NK
    return padded.unflatten(-2, (-1, 16)).transpose(-1, -2).contiguous()


class PreparedLayer:
    """One MoE layer's weights and routing rule, checked once and kept as the C call's arguments.

    The kernel reads the weights where they live, so in-place updates (optimizer steps, ``load_state_dict``)
    need nothing; a layer whose tensors are replaced (a new Parameter, ``.to()``, ``.data = ...``) is prepared
    again (:func:`prepared_for`).

    Args:
        router_w_ED, router_b_E, score_bias_E: the router's weight, bias (or None) and choice-only bias (or None).
        w_in_ENK, w_out_EDF: the routed experts ([E, G*H, D] gate rows then up rows when gated; [E, D, H]).
        shared: ``(gate_HD or None, up_HD, down_DH)`` of a shared MLP, or None.
        expert_map_E: int64 [E] or None: router row e scores expert ``expert_map_E[e]`` of ``w_in`` / ``w_out``
            (MoIIE's per-modality routers over their own experts); ids and the record's columns are then those
            experts'.
        packed: also copy the experts' and shared MLP's weights into panels (:func:`pack_panels`), which the
            kernel multiplies about twice as fast at several tokens. The copies do not follow later changes of
            the weights: only frozen layers pack (the blocks re-prepare when a weight's version moves).
        top_k, activation, gated, sigmoid_scoring, renormalize, scaling: the routing rule and experts
            (``topk_route``'s and ``expert_mlp``'s meanings).
    Raises ValueError when a tensor is not contiguous fp32 on the CPU or the shapes disagree.
    """

    def __init__(self, router_w_ED, router_b_E, score_bias_E, w_in_ENK, w_out_EDF, shared, *, top_k: int,
                 activation: str, gated: bool, sigmoid_scoring: bool = False, renormalize: bool = False,
                 scaling: float = 1.0, expert_map_E: torch.Tensor | None = None, packed: bool = False):
        gate, up, down = shared if shared is not None else (None, None, None)
        self.tensors = (router_w_ED, router_b_E, score_bias_E, w_in_ENK, w_out_EDF, gate, up, down)
        num_experts = w_in_ENK.shape[0]
        if expert_map_E is not None:
            expert_map_E = expert_map_E.to(torch.long).contiguous()
            if expert_map_E.shape != router_w_ED.shape[:1] or not bool(
                    ((expert_map_E >= 0) & (expert_map_E < num_experts)).all()):
                raise ValueError(f"expert_map_E must hold one expert id below {num_experts} per router row")
        self.expert_map = expert_map_E
        _check_weights(self.tensors)
        E, G = router_w_ED.shape[0], 2 if gated else 1
        self.D, self.E, self.H, self.K = router_w_ED.shape[1], E, w_out_EDF.shape[2], top_k
        self.E_out = E if expert_map_E is None else num_experts
        self.HS = 0 if up is None else up.shape[0]
        if (w_in_ENK.shape != (self.E_out, G * self.H, self.D) or w_out_EDF.shape != (self.E_out, self.D, self.H)
                or (up is not None and (down.shape != (self.D, self.HS) or (gated and gate is None)))):
            raise ValueError("the decode kernel's weights disagree in shape")
        self.panels = (None,) * 4
        if packed:
            shared_in = None if up is None else (up if gate is None else torch.cat([gate, up]))
            self.panels = (pack_panels(w_in_ENK), pack_panels(w_out_EDF),
                           None if up is None else pack_panels(shared_in), None if up is None else pack_panels(down))
        self.pointers = tuple(None if t is None else t.data_ptr() for t in (*self.tensors, *self.panels))
        self.scratch_per_token = G * max(self.H, self.HS) + 3 * self.D + 2 * E
        self.macs_per_token = top_k * (G + 1) * self.H * self.D + (G + 1) * self.HS * self.D
        self.function = _function("topk")
        self.settings = (self.D, self.E, self.H, top_k, self.HS, int(gated), ACTIVATION_CODES[activation],
                         int(sigmoid_scoring), int(renormalize), float(scaling), self.E_out,
                         None if expert_map_E is None else expert_map_E.data_ptr())

    def __call__(self, x: torch.Tensor):
        """The layer on the tokens ``x [..., D]`` (contiguous fp32 CPU, at most :data:`MAX_TOKENS` of them):
        ``(y [..., D], ids_TK, weights_TK, probs_TE, logits_TE)``, or None when a router logit is not finite (the
        eager path then raises its error)."""
        _check_tokens(x, self.D)
        return self.run(x)

    def run(self, x: torch.Tensor):
        """:meth:`__call__` without its checks, for the blocks, which made them already (``fits`` and their own)."""
        T = x.numel() // self.D
        y, ids, weights, probs, logits = _outputs(x, T, self.K, self.E_out)
        if T > 1 and T * self.macs_per_token >= SPLIT_MIN_MACS and torch.get_num_threads() > 1:
            outputs = (x, y, ids, weights, probs, logits)

            def rows(first: int, count: int) -> int:  # the C call on tokens first .. first + count - 1
                # every tensor here is contiguous with one row of numel / T elements per token
                x_at, *out_at = (t.data_ptr() + first * (t.numel() // T) * t.element_size() for t in outputs)
                return self.function(count, *self.settings, x_at, *self.pointers, *out_at,
                                     _scratch(count * self.scratch_per_token))

            code = _on_two_threads(rows, T)
        else:  # one call, its arguments written out: at one token every µs of Python shows
            code = self.function(T, *self.settings, x.data_ptr(), *self.pointers, y.data_ptr(), ids.data_ptr(),
                                 weights.data_ptr(), probs.data_ptr(), logits.data_ptr(),
                                 _scratch(T * self.scratch_per_token))
        return None if code else (y, ids, weights, probs, logits)


class PreparedDynamicLayer:
    """UniMoE-Audio's dynamic-capacity layer (``zoo.layers.dcmoe``, without token dropping) as one C call: the
    gate, top-p over the dynamic experts with the near-tie weights (``routing.top_p_near_tie_route``), the gated
    shares of the shared experts, and the SwiGLU experts. Weights are read where they live (see
    :class:`PreparedLayer`).

    Args:
        gate_GD: the gate [N + S, D] (dynamic experts' rows: the E computed ones, then the null ones; then the S
            shared ones). w_in_ENK [E, 2H, D], w_out_EDF [E, D, H]: the computed experts.
        shared_w_in_SNK [S, 2HS, D], shared_w_out_SDF [S, D, HS]: the shared experts, or None (S = 0).
        num_dynamic: N; top_p, tie_tolerance, renorm_eps, activation: the layer's.
        packed: also copy the experts' weights into panels (see :class:`PreparedLayer`; frozen layers only).
    """

    def __init__(self, gate_GD, w_in_ENK, w_out_EDF, shared_w_in_SNK, shared_w_out_SDF, *, num_dynamic: int,
                 top_p: float, tie_tolerance: float, renorm_eps: float, activation: str, packed: bool = False):
        self.tensors = (gate_GD, w_in_ENK, w_out_EDF, shared_w_in_SNK, shared_w_out_SDF)
        _check_weights(self.tensors)
        E, H = w_out_EDF.shape[0], w_out_EDF.shape[2]
        S = 0 if shared_w_in_SNK is None else shared_w_in_SNK.shape[0]
        HS = 0 if S == 0 else shared_w_out_SDF.shape[2]
        self.D, self.N = gate_GD.shape[1], num_dynamic
        if gate_GD.shape[0] != num_dynamic + S or num_dynamic > MAX_DYNAMIC or E > num_dynamic \
                or w_in_ENK.shape != (E, 2 * H, self.D):
            raise ValueError("the decode kernel's dynamic-capacity weights disagree in shape or are too many")
        self.settings = (self.D, num_dynamic, E, S, H, HS, ACTIVATION_CODES[activation], float(top_p),
                         float(tie_tolerance), float(renorm_eps))
        self.panels = (None,) * 4
        if packed:
            self.panels = (pack_panels(w_in_ENK), pack_panels(w_out_EDF),
                           *((None, None) if S == 0 else (pack_panels(shared_w_in_SNK), pack_panels(shared_w_out_SDF))))
        self.pointers = tuple(None if t is None else t.data_ptr() for t in (*self.tensors, *self.panels))
        self.scratch_per_token = 2 * max(H, HS) + 3 * self.D + 2 * (num_dynamic + S)
        self.function = _function("dynamic")

    def __call__(self, x: torch.Tensor):
        """The layer on the tokens ``x [..., D]`` (contiguous fp32 CPU, at most :data:`MAX_TOKENS`): ``(y [..., D],
        ids_TK, weights_TK, probs_TN, logits_TN)`` with as many slot columns as the most experts a token chose
        (-1 / 0 after a token's own), or None when a gate logit is not finite."""
        _check_tokens(x, self.D)
        return self.run(x)

    def run(self, x: torch.Tensor):
        """:meth:`__call__` without its checks, for the block, which made them already."""
        T = x.numel() // self.D
        y, ids, weights, probs, logits = _outputs(x, T, self.N, self.N)
        k = self.function(T, *self.settings, x.data_ptr(), *self.pointers, y.data_ptr(), ids.data_ptr(),
                          weights.data_ptr(), probs.data_ptr(), logits.data_ptr(), _scratch(T * self.scratch_per_token))
        if k < 0:
            return None
        return y, ids[:, :k], weights[:, :k], probs, logits  # the columns of the most experts a token chose


def _outputs(x: torch.Tensor, T: int, slots: int, experts: int) -> tuple:
    """A call's outputs, for the C function to fill: y like x, ids and weights [T, slots], scores and logits
    [T, experts]."""
    return (torch.empty(x.shape), torch.empty(T, slots, dtype=torch.long), torch.empty(T, slots),
            torch.empty(T, experts), torch.empty(T, experts))


def _check_weights(tensors: tuple) -> None:
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError(f"the decode kernel needs contiguous fp32 CPU weights, got {t.dtype} on {t.device} "
                             f"(contiguous: {t.is_contiguous()})")


def _check_tokens(x: torch.Tensor, width: int) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() < 1 \
            or x.shape[-1] != width:
        raise ValueError(f"the decode kernel needs contiguous fp32 CPU tokens of width {width}, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if x.numel() // width > MAX_TOKENS:
        raise ValueError(f"the decode kernel takes at most {MAX_TOKENS} tokens, got {x.numel() // width}")


# With torch allowed 2+ threads, a call of at least this many multiply-adds is split in two halves of tokens run at
# once (ctypes releases the GIL; each half routes its own tokens and streams the experts it hits). Measured against
# one thread (interleaved, in-process, 2 threads; AMD EPYC Zen 3, AVX2 only): a DiT-MoE-S layer (4.4M per token)
# 0.88x the time at 16 tokens, 0.61x at 128; the digits layer (0.2M per token) 1.11-1.58x at 16-128 tokens (the
# helper's start and torch's spinning OpenMP threads cost more than half its work).
SPLIT_MIN_MACS = 50_000_000
_pool: dict = {}  # the helper thread's executor, by the process that made it (a forked child makes its own)


def _on_two_threads(rows, T: int) -> int:
    """``rows(first, count)`` over tokens [0, T) as two halves, one on a helper thread: the two codes or'ed."""
    executor = _pool.get(os.getpid())
    if executor is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool.clear()
        executor = _pool[os.getpid()] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moezoo-decode")
    half = T // 2
    second = executor.submit(rows, half, T - half)
    return rows(0, half) | second.result()


def glu_silu_backward(h_CN: torch.Tensor, grad_CF: torch.Tensor, w_C: torch.Tensor, aw_CF: torch.Tensor,
                      grad_h_CN: torch.Tensor, grad_w_C: torch.Tensor) -> None:
    """The backward of ``w * (silu(gate) * up)`` over C rows in one pass of the C kernel (fp32, CPU; rows may be
    strided, columns contiguous): from the pre-activations ``h_CN`` = [gate | up] (H each), the gradient
    ``grad_CF`` at the weighted activation and the rows' weights ``w_C``, writes ``aw_CF`` = w a (a = silu(gate)
    up), ``grad_h_CN`` = [dL/dgate | dL/dup] and ``grad_w_C`` = <grad, a> per row. On the calling thread: split
    over two threads right after torch's GEMMs, whose OpenMP threads still spin, it made the walk slower than
    torch's own calls (measured: ``cpu_backend.FUSED_GLU_BACKWARD``)."""
    rows, hidden = grad_CF.shape
    tensors = (h_CN, grad_CF, w_C, aw_CF, grad_h_CN, grad_w_C)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors) \
            or h_CN.shape != (rows, 2 * hidden) or grad_h_CN.shape != h_CN.shape or aw_CF.shape != grad_CF.shape \
            or w_C.shape != (rows,) or grad_w_C.shape != (rows,):
        raise ValueError("glu_silu_backward takes fp32 CPU tensors with contiguous columns: h [C, 2H], grad [C, H], "
                         "w [C], aw [C, H], grad_h [C, 2H], grad_w [C]; got " + ", ".join(
                             f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors))
    if rows:
        _function("glu_silu_backward")(
            rows, hidden, h_CN.data_ptr(), h_CN.stride(0), grad_CF.data_ptr(), grad_CF.stride(0), w_C.data_ptr(),
            aw_CF.data_ptr(), aw_CF.stride(0), grad_h_CN.data_ptr(), grad_h_CN.stride(0), grad_w_C.data_ptr())


_per_thread = threading.local()


def _scratch(floats: int) -> int:
    """The address of this thread's scratch buffer of at least ``floats`` floats (kept between calls: a decoding
    step allocates its outputs only)."""
    buffer = getattr(_per_thread, "scratch", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _per_thread.scratch = torch.empty(max(floats, 1 << 14))
    return buffer.data_ptr()


def fits(x: torch.Tensor, top_k: int, training: bool, backend: str, tensors: tuple) -> bool:
    """Whether a routed block's call on the tokens ``x [..., D]`` may run here, before the layer itself is looked
    at: a few fp32 CPU tokens (at most :data:`MAX_SLOTS` slots), eval mode, the torch backend (or auto), and no
    autograd."""
    num_tokens = x.numel() // x.shape[-1] if x.dim() else 0
    if (num_tokens * top_k > MAX_SLOTS or num_tokens > MAX_TOKENS or training or x.dtype != torch.float32
            or x.device.type != "cpu" or backend not in ("auto", "torch")):
        return False
    return not (torch.is_grad_enabled()
                and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)))


def prepared_for(cache: dict, key, tensors: tuple, make, *, versions: bool = False) -> PreparedLayer | None:
    """The layer prepared for these very ``tensors`` (the same objects on the same storage, and with ``versions``
    the same version counters: for layers whose weights were copied into panels), from ``cache[key]`` or else
    made by ``make()`` and kept there; None when the kernel cannot take the layer (remembered until the tensors
    change). ``tensors``: the live Parameters the layer reads; () when the block already knows the kernel cannot
    take it. Without ``versions`` in-place changes need nothing: the kernel reads the weights where they live."""
    state = (versions, *(None if t is None else (t.data_ptr(), t._version if versions else 0) for t in tensors))
    entry = cache.get(key)
    if entry is not None and entry[1] == state and len(entry[0]) == len(tensors) \
            and all(a is b for a, b in zip(entry[0], tensors)):
        return entry[2]
    prepared = None
    if tensors and available():
        try:
            with torch.no_grad():
                prepared = make()
        except ValueError:  # another dtype or layout
            pass
    cache[key] = (tensors, state, prepared)
    return prepared
