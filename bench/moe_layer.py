"""MoE layer benchmark on CPU, fp32: moezoo's ``torch`` backend vs transformers' Mixtral experts vs a dense MLP.

What is timed (one call of the layer, router excluded)
------------------------------------------------------
``moezoo``         ``build_plan(ids_TK, E)`` + ``expert_mlp(..., backend="torch")``: plan building is part of
                   the layer's cost, so it is inside the timed region. Its ``fwd`` runs on prepacked expert
                   weights (``pack_expert_weights``, once when the layer is built, as an inference model
                   would hold them: ``bench/packed_weights.py``).
``hf_eager``       ``transformers`` ``MixtralExperts`` with ``config._experts_implementation = "eager"``: the
                   class's own forward (one_hot mask, a Python loop over the experts hit, ``index_add_``).
``hf_grouped_mm``  the same module with ``"grouped_mm"``: ``@use_experts_implementation`` swaps the forward for
                   ``transformers.integrations.moe.grouped_mm_experts_forward`` (sort by expert, ``aten::_grouped_mm``
                   for both projections, un-permute, sum over k). The path each setting really takes is checked
                   by recording the aten ops of a tiny call, and printed in the header.
``dense``          a SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (``GatedMLP``: three bias-free ``nn.Linear``) with hidden width
                   ``k * f (+ shared)``: the same active FLOPs per token as the MoE layer.

All MoE implementations get the same router outputs (``ids_TK``, ``weights_TK``), computed once, outside the
timed region, from a fixed random router: ``softmax(x @ W_r^T)``, top-k, renormalised (random inputs and
router, so expert loads are uniform-ish, not exactly balanced). They also get the same expert weights
(copied into ``MixtralExperts``). For ``dit_moe_s`` a shared expert (a dense SwiGLU of hidden 768, one module
instance) is added to the routed output of every MoE implementation, and the dense baseline is widened by 768:
the HF implementations add the module's output; moezoo hands the module's weights to ``expert_mlp`` as a
``SharedExpert`` (``GatedMLP.as_shared_expert``: gate and up weights concatenated inside the timed call), as
moezoo's ``MoE`` layer does, so it runs in the same parallel walk as the routed experts.

Passes: ``fwd`` runs under ``torch.inference_mode``; ``fwd+bwd`` runs the forward and then the backward of
``(y * g).sum()`` for a fixed random ``g``, with gradients to x, all weights (experts, shared, dense) and the
router weights ``weights_TK``. Gradients are set to ``None`` before each run (outside the timer), as
``optimizer.zero_grad()`` does.

Correctness: before any timing, every MoE implementation is run once in the parent process and compared with
moezoo: the forward output (fwd) and the gradients of x, ``weights_TK``, both expert weights and the shared
expert's weights (fwd+bwd).
The max abs difference and the relative error ``max|a - b| / max|b|`` are printed; a row whose relative error
exceeds 1e-3 is not timed and shows the error instead. The dense MLP computes a different function and is not
compared.

Timing: every (shape, impl) runs in a fresh subprocess (same interpreter, torch's default thread count = all
cores), which rebuilds its inputs from the same seeds and runs fwd, then fwd+bwd. Per pass: two warm-up calls,
then ``--repeats`` timed calls, each timed with ``time.perf_counter`` (CPU ops are synchronous); the table
shows the median. To keep the whole run near ten minutes, a pass stops adding timed calls once it has
``MIN_REPEATS`` (3) and they took more than ``--budget`` seconds (this only bites on the slowest cells, HF's
fwd+bwd on E64_k8: eager takes 10+ s a call); the JSON records every run (``ms_runs``).

Rounds: this VM's speed drifts by several percent between processes minutes apart (the same cell measured
99-111 ms in fresh processes), more than a cell's runs vary among themselves. ``--rounds N`` runs every
(shape, impl) cell N times, interleaved (moezoo, HF, HF, dense, moezoo, ...), and reports the median over all
runs of all rounds, plus each round's moezoo / dense ratio so the spread is visible.

Peak memory ("peak MiB"): the extra resident memory of the pass's first full-size call. torch's CPU
allocations are invisible to ``tracemalloc`` and ``ru_maxrss`` is a high-water mark since process start (it
would include setup), so for each pass the subprocess (1) runs the layer on the first 64 tokens, so that
library code and thread pools are paged in, (2) returns freed heap pages to the OS (``gc.collect()`` and
glibc's ``malloc_trim(0)``: otherwise a call could reuse pages an earlier call left resident and look
cheaper), (3) reads ``VmRSS`` from ``/proc/self/status`` as the baseline, (4) resets the kernel's high-water
mark (``echo 5 > /proc/self/clear_refs``), (5) runs the first full-size call (the first warm-up) and reads
``VmHWM``. Extra = ``VmHWM - baseline``: everything the call made resident: activations, the output, saved
tensors and, for fwd+bwd, the gradients it produced (for the MoE implementations these include the E experts'
weight gradients, for dense only its own). Measured this way, a pass's number agrees within a few
percent (or ~10 MiB) whether it runs first in a fresh process or after the other pass. The column is blank if ``clear_refs`` cannot be written.

Usage::

    python bench/moe_layer.py                       # all shapes, ~6-8 minutes on 2 idle cores
    python bench/moe_layer.py --rounds 3            # every cell 3 times, interleaved: ~20 minutes, steadier ratios
    python bench/moe_layer.py --shapes dit_moe_s --repeats 3 --json out.json
    python bench/moe_layer.py --quick               # T / 16: a smoke run

``--json PATH`` writes a list of ``{"shape", "impl", "pass", "ms", "peak_mib", ...}`` records, one per timed
cell (cells that failed their check or crashed are left out; the table shows why); the extra keys are every
timed run, the warm-ups and the minor page faults per timed call. The timings are only as quiet as the
machine: the run ends by printing how much CPU other processes and the hypervisor (steal) took meanwhile.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import torch
import torch.nn as nn

from moezoo.kernels import cpu_backend, expert_mlp, pack_expert_weights
from moezoo.kernels.plan import build_plan
from moezoo.zoo.layers import GatedMLP

IMPLS = ("moezoo", "hf_eager", "hf_grouped_mm", "dense")
PASSES = ("fwd", "fwd+bwd")
WARMUPS = 2
MIN_REPEATS = 3  # a cell stops adding timed runs after this many once they exceed --budget seconds
REL_TOL = 1e-3
SEED = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int
    d: int
    f: int
    E: int
    k: int
    shared: int = 0  # hidden width of the shared expert (0: none)


SHAPES = {
    s.name: s
    for s in (
        Shape("E8_k2", T=4096, d=1024, f=2048, E=8, k=2),
        Shape("E64_k8", T=4096, d=1024, f=512, E=64, k=8),
        Shape("dit_moe_s", T=2048, d=384, f=1536, E=8, k=2, shared=768),
    )
}


def shape_for(name: str, quick: bool) -> Shape:
    return dataclasses.replace(SHAPES[name], T=SHAPES[name].T // 16) if quick else SHAPES[name]


# ----------------------------------------------------------------------------------------------- the layers


def make_problem(shape: Shape, seed: int = SEED) -> dict:
    """Inputs, router outputs, expert weights and the output gradient, all from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    T, d, f, E, k = shape.T, shape.d, shape.f, shape.E, shape.k
    x_TD = torch.randn(T, d, generator=gen)
    router_ED = torch.randn(E, d, generator=gen) / math.sqrt(d)
    probs_TE = torch.softmax(x_TD @ router_ED.t(), dim=-1)
    top_w_TK, ids_TK = probs_TE.topk(k, dim=-1)
    weights_TK = top_w_TK / top_w_TK.sum(-1, keepdim=True)
    w_in_ENK = torch.randn(E, 2 * f, d, generator=gen) / math.sqrt(d)  # gate rows, then up rows
    w_out_EDF = torch.randn(E, d, f, generator=gen) / math.sqrt(f)
    g_TD = torch.randn(T, d, generator=gen)
    torch.manual_seed(seed + 1)  # nn.Linear's init of the shared expert
    shared = GatedMLP(d, shape.shared) if shape.shared else None
    return dict(x_TD=x_TD, ids_TK=ids_TK, weights_TK=weights_TK, w_in_ENK=w_in_ENK, w_out_EDF=w_out_EDF,
                g_TD=g_TD, shared=shared)


def hf_experts(shape: Shape, implementation: str, w_in_ENK, w_out_EDF) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=shape.d, intermediate_size=shape.f, num_local_experts=shape.E,
                           num_experts_per_tok=shape.k, experts_implementation=implementation)
    assert config._experts_implementation == implementation
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w_in_ENK)
        experts.down_proj.copy_(w_out_EDF)
    return experts


class Layer:
    """One implementation, called as ``layer(x_TD, ids_TK, weights_TK)``; ``params`` are the weights to train."""

    def __init__(self, impl: str, shape: Shape, problem: dict):
        self.impl, self.shape, self.shared = impl, shape, problem["shared"]
        self.w_in_ENK = self.w_out_EDF = None
        if impl == "moezoo":
            self.w_in_ENK = nn.Parameter(problem["w_in_ENK"])
            self.w_out_EDF = nn.Parameter(problem["w_out_EDF"])
            self.params = [self.w_in_ENK, self.w_out_EDF]
            self.packed = pack_expert_weights(self.w_in_ENK, self.w_out_EDF)  # used by no-grad calls only
        elif impl in ("hf_eager", "hf_grouped_mm"):
            self.experts = hf_experts(shape, impl.removeprefix("hf_"), problem["w_in_ENK"], problem["w_out_EDF"])
            self.w_in_ENK, self.w_out_EDF = self.experts.gate_up_proj, self.experts.down_proj
            self.params = [self.w_in_ENK, self.w_out_EDF]
        elif impl == "dense":
            torch.manual_seed(SEED + 2)
            self.dense = GatedMLP(shape.d, shape.k * shape.f + shape.shared)
            self.params = list(self.dense.parameters())
        else:
            raise ValueError(f"unknown impl {impl!r}; accepted: {', '.join(IMPLS)}")
        if self.shared is not None and impl != "dense":
            self.params += list(self.shared.parameters())

    def __call__(self, x_TD, ids_TK, weights_TK):
        if self.impl == "dense":
            return self.dense(x_TD)
        if self.impl == "moezoo":
            # as moezoo's MoE layer does: the shared expert goes into expert_mlp (GatedMLP.as_shared_expert), or
            # runs as its own dense MLP where cpu_backend.shared_apart_pays says so
            plan = build_plan(ids_TK, self.shape.E)
            apart = self.shared is not None and cpu_backend.shared_apart_pays(x_TD.shape[0], self.shape.k)
            shared = None if self.shared is None or apart else self.shared.as_shared_expert()
            y_TD = expert_mlp(x_TD, weights_TK, plan, self.w_in_ENK, self.w_out_EDF, backend="torch", shared=shared,
                              packed=self.packed)
            return y_TD + self.shared(x_TD) if apart else y_TD
        y_TD = self.experts(x_TD, ids_TK, weights_TK)
        return y_TD if self.shared is None else y_TD + self.shared(x_TD)


def run_once(layer: Layer, pass_: str, x_TD, ids_TK, weights_TK, g_TD) -> float:
    """One call in the given pass; returns its wall time in ms. Gradients are reset before the timer."""
    if pass_ == "fwd":
        with torch.inference_mode():
            start = time.perf_counter()
            layer(x_TD, ids_TK, weights_TK)
            return (time.perf_counter() - start) * 1e3
    for t in (x_TD, weights_TK, *layer.params):
        t.grad = None
    start = time.perf_counter()
    (layer(x_TD, ids_TK, weights_TK) * g_TD).sum().backward()
    return (time.perf_counter() - start) * 1e3


# ------------------------------------------------------------------------------------- one cell (subprocess)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_pass(layer: Layer, shape: Shape, pass_: str, problem: dict, repeats: int, budget_s: float) -> dict:
    """Peak memory of the first call, then warm-ups and timed calls of one pass (see the module docstring)."""
    grad = pass_ == "fwd+bwd"
    inputs = (problem["x_TD"].detach().requires_grad_(grad), problem["ids_TK"],
              problem["weights_TK"].detach().requires_grad_(grad), problem["g_TD"])
    # Page in code and thread pools on the first 64 tokens, so that the peak below is the call's own.
    small = min(64, shape.T)
    run_once(layer, pass_, *(t.detach()[:small].requires_grad_(t.requires_grad) for t in inputs))
    for t in layer.params:
        t.grad = None
    _release_free_memory()

    baseline_kib = _proc_status_kib("VmRSS")
    can_reset = _reset_peak_rss()
    warmups = [run_once(layer, pass_, *inputs)]  # warm-up 1, and the memory measurement
    peak_mib = (_proc_status_kib("VmHWM") - baseline_kib) / 1024 if can_reset else None
    warmups += [run_once(layer, pass_, *inputs) for _ in range(WARMUPS - 1)]
    timed, faults_before = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    while len(timed) < repeats and not (len(timed) >= MIN_REPEATS and sum(timed) > budget_s * 1e3):
        timed.append(run_once(layer, pass_, *inputs))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / len(timed)
    for t in (*inputs, *layer.params):
        t.grad = None
    return {"shape": shape.name, "impl": layer.impl, "pass": pass_, "ms": statistics.median(timed),
            "peak_mib": peak_mib, "ms_runs": [round(t, 1) for t in timed],
            "ms_warmups": [round(t, 1) for t in warmups], "page_faults_per_call": round(faults),
            "threads": torch.get_num_threads()}


def run_impl(shape: Shape, impl: str, passes: list[str], repeats: int, budget_s: float) -> list[dict]:
    """The given passes of one implementation, in this (fresh) process."""
    problem = make_problem(shape)
    layer = Layer(impl, shape, problem)
    return [measure_pass(layer, shape, pass_, problem, repeats, budget_s) for pass_ in passes]


def run_impl_subprocess(shape_name: str, impl: str, passes: list[str], args) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", shape_name, impl, *passes,
           "--repeats", str(args.repeats), "--budget", str(args.budget)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    error = f"subprocess exit {proc.returncode}: {tail}"
    return [{"shape": shape_name, "impl": impl, "pass": pass_, "error": error} for pass_ in passes]


# ---------------------------------------------------------------------------------- checks (parent process)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a.detach() - ref.detach()).abs().max().item()
    return diff, diff / max(ref.detach().abs().max().item(), 1e-30)


def check_shape(shape: Shape) -> dict:
    """Run every MoE implementation once against moezoo; returns {(impl, pass): error message or None}."""
    problem = make_problem(shape)
    x_TD, ids_TK, weights_TK, g_TD = problem["x_TD"], problem["ids_TK"], problem["weights_TK"], problem["g_TD"]
    results, errors = {}, {}
    for impl in ("moezoo", "hf_eager", "hf_grouped_mm"):
        layer = Layer(impl, shape, {**problem, "w_in_ENK": problem["w_in_ENK"].clone(),
                                    "w_out_EDF": problem["w_out_EDF"].clone()})
        with torch.inference_mode():
            y_fwd = layer(x_TD, ids_TK, weights_TK)
        x, w = x_TD.clone().requires_grad_(), weights_TK.clone().requires_grad_()
        (layer(x, ids_TK, w) * g_TD).sum().backward()
        results[impl] = {"y": y_fwd, "grad x": x.grad, "grad weights_TK": w.grad,
                         "grad w_in": layer.w_in_ENK.grad, "grad w_out": layer.w_out_EDF.grad}
        if layer.shared is not None:  # moezoo computes the shared expert's gradients itself: compare them too
            results[impl].update({f"grad shared {n}": p.grad.clone() for n, p in layer.shared.named_parameters()})
            layer.shared.zero_grad(set_to_none=True)
        del layer
    ref = results["moezoo"]
    for impl in ("hf_eager", "hf_grouped_mm"):
        grad_keys = [key for key in ref if key.startswith("grad")]
        for pass_, keys in (("fwd", ["y"]), ("fwd+bwd", grad_keys)):
            failure = None
            for key in keys:
                diff, rel = _rel_err(results[impl][key], ref[key])
                print(f"  check {shape.name:<10} {impl:<14} {key:<22} max|diff| {diff:.2e}  rel {rel:.2e}")
                if rel > REL_TOL and failure is None:
                    failure = f"{key} differs from moezoo: max|diff| {diff:.2e}, rel {rel:.2e} > {REL_TOL:g}"
            errors[(impl, pass_)] = failure
    return errors


def merge_rounds(rounds: list[dict]) -> dict:
    """One cell's records from several rounds as one: the median over every timed run of every round (each
    round's median kept in ``ms_rounds``), the largest peak memory, the median page-fault count."""
    if len(rounds) == 1 or any("error" in r for r in rounds):
        return next((r for r in rounds if "error" in r), rounds[0])
    runs = [ms for r in rounds for ms in r["ms_runs"]]
    return {**rounds[0], "ms": statistics.median(runs), "ms_runs": runs, "ms_rounds": [r["ms"] for r in rounds],
            "ms_warmups": [ms for r in rounds for ms in r["ms_warmups"]],
            "peak_mib": max((r["peak_mib"] for r in rounds if r["peak_mib"] is not None), default=None),
            "page_faults_per_call": statistics.median(r["page_faults_per_call"] for r in rounds)}


def hf_code_paths() -> dict:
    """Which code each experts_implementation really runs on this machine: the aten ops of a tiny fwd+bwd."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    shape = Shape("tiny", T=32, d=16, f=32, E=4, k=2)
    problem = make_problem(shape)
    paths = {}
    for impl in ("eager", "grouped_mm"):
        layer = Layer(f"hf_{impl}", shape, problem)
        forward = ALL_EXPERTS_FUNCTIONS.get_interface(layer.experts.config._experts_implementation, None)
        with RecordOps() as rec:
            x = problem["x_TD"].clone().requires_grad_()
            layer(x, problem["ids_TK"], problem["weights_TK"]).sum().backward()
        marks = sorted(op for op in rec.ops if any(s in op for s in ("mm", "one_hot", "index_add", "fallback")))
        name = "MixtralExperts.forward (own loop)" if forward is None else f"{forward.__module__}.{forward.__name__}"
        paths[impl] = f"{name}; ops: {', '.join(marks)}"
    if "aten._grouped_mm" not in paths["grouped_mm"] or "aten._grouped_mm" in paths["eager"]:
        raise RuntimeError(f"unexpected transformers experts code paths: {paths}")
    return paths


# --------------------------------------------------------------------------------------------------- report


class CpuShare:
    """How busy the machine was while we ran: CPU time of other processes and hypervisor steal, from
    /proc/stat, minus this process's and its children's own CPU time."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        t = os.times()
        return (time.time(), (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"),
                steal / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system)

    def report(self) -> str:
        try:
            (w0, busy0, steal0, own0), (w1, busy1, steal1, own1) = self.start, self._read()
        except (OSError, ValueError):
            return "unknown (no /proc/stat)"
        wall = w1 - w0
        others = max(0.0, (busy1 - busy0) - (own1 - own0))
        return (f"this benchmark {(own1 - own0) / wall:.2f} cores, other processes {others / wall:.2f} cores, "
                f"hypervisor steal {(steal1 - steal0) / wall:.2f} cores (averages over {wall:.0f} s)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(records: list[dict], shapes: list[str]) -> None:
    print("| shape | impl | pass | ms (median) | × dense | peak MiB |")
    print("|---|---|---|---:|---:|---:|")
    by_key = {(r["shape"], r["impl"], r["pass"]): r for r in records}
    for shape in shapes:
        for impl in IMPLS:
            for pass_ in PASSES:
                r = by_key.get((shape, impl, pass_))
                if r is None:
                    continue
                if "error" in r:
                    print(f"| {shape} | {impl} | {pass_} | ERROR: {r['error']} | | |")
                    continue
                dense = by_key.get((shape, "dense", pass_), {}).get("ms")
                ratio = f"{r['ms'] / dense:.2f}" if dense else "-"
                peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else ""
                print(f"| {shape} | {impl} | {pass_} | {r['ms']:.1f} | {ratio} | {peak} |")
    print()
    for shape in shapes:
        parts = []
        for pass_ in PASSES:
            ours = by_key.get((shape, "moezoo", pass_), {}).get("ms")
            hf = [(by_key[(shape, i, pass_)]["ms"], i) for i in ("hf_eager", "hf_grouped_mm")
                  if "ms" in by_key.get((shape, i, pass_), {})]
            if ours and hf:
                best_ms, best = min(hf)
                parts.append(f"{pass_} {ours / best_ms:.2f}× of {best} ({ours:.0f} vs {best_ms:.0f} ms)")
        print(f"{shape}: moezoo vs HF's best: " + ("; ".join(parts) if parts else "n/a"))
    for shape in shapes:  # with rounds: how much the ratio to dense moved from round to round
        for pass_ in PASSES:
            ours, dense = (by_key.get((shape, impl, pass_), {}).get("ms_rounds") for impl in ("moezoo", "dense"))
            if ours and dense:
                print(f"{shape} {pass_}: moezoo / dense per round: "
                      + ", ".join(f"{a / b:.2f}" for a, b in zip(ours, dense)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per cell (after %d warm-ups)" % WARMUPS)
    parser.add_argument("--quick", action="store_true", help="T / 16: a smoke run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (shape, impl) cell this many times, interleaved (moezoo, HF, dense, moezoo, "
                             "...), and take the median over all runs: ratios then do not hang on one moment's "
                             "machine speed")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed runs per cell after which no more runs are added, once there are "
                             "at least %d (default 20)" % MIN_REPEATS)
    parser.add_argument("--child", nargs="+", metavar="SHAPE IMPL PASS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        shape_name, impl, *passes = args.child
        results = run_impl(shape_for(shape_name, args.quick), impl, passes, args.repeats, args.budget)
        print("RESULT " + json.dumps(results), flush=True)
        return

    import transformers

    started, cpu_share = time.time(), CpuShare()
    print(f"# moezoo MoE layer benchmark, fp32, CPU  ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})")
    print(f"# CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"# torch CPU capability {torch.backends.cpu.get_cpu_capability()}: moezoo's expert GEMMs on "
          f"{'oneDNN' if cpu_backend.ONEDNN_GEMMS else 'torch.mm (MKL)'} (MOEZOO_CPU_GEMM="
          f"{os.environ.get('MOEZOO_CPU_GEMM', 'auto')})")
    print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# {WARMUPS} warm-ups + median of {args.repeats} runs per cell, one subprocess per (shape, impl)"
          + (f"; {args.rounds} interleaved rounds, median over all their runs" if args.rounds > 1 else "")
          + (" (QUICK: T / 16)" if args.quick else ""))
    for impl, path in hf_code_paths().items():
        print(f"# HF experts_implementation={impl!r} -> {path}")
    print(flush=True)

    records = []
    for name in args.shapes:
        shape = shape_for(name, args.quick)
        print(f"## {name}: T={shape.T} d={shape.d} f={shape.f} E={shape.E} k={shape.k}"
              + (f" shared={shape.shared}" if shape.shared else ""), flush=True)
        errors = check_shape(shape)
        gc.collect()
        by_cell = {}
        for round_ in range(args.rounds):
            for impl in IMPLS:
                failed = [{"shape": name, "impl": impl, "pass": p, "error": errors[impl, p]}
                          for p in PASSES if errors.get((impl, p))]
                passes = [p for p in PASSES if not errors.get((impl, p))]
                for r in failed + (run_impl_subprocess(name, impl, passes, args) if passes else []):
                    status = r.get("error") or (f"{r['ms']:.1f} ms  runs {r['ms_runs']}  warm-ups {r['ms_warmups']}  "
                                                f"peak {r['peak_mib']:.0f} MiB  page faults/call "
                                                f"{r['page_faults_per_call']}")
                    label = f"r{round_ + 1} " if args.rounds > 1 else ""
                    print(f"  {label}{name:<10} {impl:<14} {r['pass']:<8} {status}", flush=True)
                    by_cell.setdefault((impl, r["pass"]), []).append(r)
        records += [merge_rounds(rounds) for rounds in by_cell.values()]
        print(flush=True)

    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} after {time.time() - started:.0f} s; "
          f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# CPU use during the run: {cpu_share.report()}\n")
    print_table(records, args.shapes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for r in records if "error" not in r], f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
