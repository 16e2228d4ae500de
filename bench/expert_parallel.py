"""Expert parallelism on CPU (gloo): equality with one process, speed on this machine, and a model of scale.

Three tables:

1. **Equality.** R ranks (``--ranks``, default 2 and 4) each route their share of one global batch through a
   ``MoE`` block whose experts are sharded (``MoE.shard_experts``, routing over all ranks); the same block runs
   in one process on the whole batch. Per case: the maximum relative difference ``max|a - b| / max|b|`` over the
   output, the input gradient and every parameter gradient (after ``reduce_gradients``).
2. **Speed.** On bench/moe_layer.py's ``dit_moe_s`` and ``E64_k8`` shapes (its ``SHAPES`` and ``make_problem``,
   imported): 1 rank x 2 threads (``expert_mlp`` on all T tokens) against 2 ranks x 1 thread (T/2 tokens and
   E/2 experts each, ``dispatch`` -> ``expert_mlp`` on the received rows -> ``return_results`` + ``combine``),
   forward and forward+backward tokens/s, the forward's time split into dispatch (plan, counts and rows
   exchange), experts, and combine (results back, weighted sum), and the bytes each rank sends to other ranks
   per step, measured from the split sizes, next to the model's prediction. The shared expert of dit_moe_s
   runs on each rank's own tokens (it is not exchanged). Medians of ``--repeats`` calls after two warm-ups.
3. **Model of scale.** All-to-all bytes per token and the compute per token, and the device speed at which the
   exchange takes longer than the experts' compute at Ethernet (10 Gb/s), InfiniBand (200 Gb/s) and NVLink
   (900 GB/s) bandwidths (see ``volume_per_token`` and ``crossover_flops``).

Usage::

    python bench/expert_parallel.py            # the measurement: run it on an otherwise idle machine
    python bench/expert_parallel.py --quick    # T / 16, 3 repeats, 2 ranks: checks that it all runs
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import SHAPES, Shape, make_problem, shape_for  # noqa: E402  (bench/ is not a package)

from moezoo.kernels import build_plan, combine, expert_mlp  # noqa: E402
from moezoo.kernels.expert_parallel import (dispatch, expert_shard, reduce_gradients,  # noqa: E402
                                            return_results, run_ranks)
from moezoo.zoo.layers import MoE  # noqa: E402

BYTES_FP32 = 4
SPEED_SHAPES = ("dit_moe_s", "E64_k8")
INTERCONNECTS = {"Ethernet 10 Gb/s": 10e9 / 8, "InfiniBand 200 Gb/s": 200e9 / 8, "NVLink 900 GB/s": 900e9}

# ------------------------------------------------------------------------------------------------ the model


def volume_per_token(dim: int, top_k: int, ranks: int, *, capacity_factor: float | None = None,
                     backward: bool = True, bytes_per: int = BYTES_FP32) -> float:
    """Bytes one token's rows send to other ranks per step: k rows of D values go to their experts and k results
    come back; with uniform routing a fraction (R-1)/R of them leaves the rank. Capacity-padded splits send
    ``capacity_factor`` times as many rows whatever the routing (padding included). The backward sends the same
    again (gradients of the results out, gradients of the rows back). The per-expert counts (E integers per rank
    per step) and the routing gathers are left out: see ``routing_gather_per_token``."""
    rows = top_k * (capacity_factor if capacity_factor is not None else 1.0)
    one_way = rows * dim * bytes_per * (ranks - 1) / ranks
    return one_way * 2 * (2 if backward else 1)


def routing_gather_per_token(num_experts: int, top_k: int, ranks: int) -> float:
    """Bytes per token of the routing group's all-gathers (scores, logits: E floats; ids, weights: k each), which
    make the record, capacity and aux losses those of the whole batch: every token's row goes to R-1 ranks.
    Grows with R, unlike the exchange: over large groups keep the routing group small."""
    return (ranks - 1) * (2 * num_experts * BYTES_FP32 + top_k * (8 + BYTES_FP32))


def flops_per_token(dim: int, hidden: int, top_k: int, *, gated: bool = True, backward: bool = True) -> float:
    """Multiply-adds x 2 of a token's k experts: D x N_in (N_in = 2F gated) and F x D; the backward doubles it."""
    n_in = 2 * hidden if gated else hidden
    forward = 2 * top_k * (dim * n_in + hidden * dim)
    return forward * (3 if backward else 1)


def crossover_flops(shape: Shape, ranks: int, bandwidth: float, capacity_factor: float | None = None) -> float:
    """The device speed (FLOP/s) above which the exchange takes longer than the experts' compute: comm time
    ``bytes / bandwidth`` equals compute time ``flops / speed``. D and k cancel: per token the exchange is
    ~4kD(R-1)/R values against ~18kDF FLOPs (gated, fwd+bwd), so what matters is the expert width F."""
    comm = volume_per_token(shape.d, shape.k, ranks, capacity_factor=capacity_factor) / bandwidth
    return flops_per_token(shape.d, shape.f, shape.k) / comm


def print_model(measured_flops: dict[str, float]) -> None:
    print("\n## Model of scale (fp32 rows, uniform routing, fwd+bwd)\n")
    print("all-to-all bytes per token (dispatch + combine, forward and backward); in brackets the routing "
          "gathers' bytes per token")
    print(f"| shape | E | k | D | {' | '.join(f'R={r}' for r in (2, 8, 64))} | R=8, capacity 1.25 padded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SPEED_SHAPES:
        s = SHAPES[name]
        cells = [f"{volume_per_token(s.d, s.k, r):,.0f} [{routing_gather_per_token(s.E, s.k, r):,.0f}]"
                 for r in (2, 8, 64)]
        print(f"| {name} | {s.E} | {s.k} | {s.d} | {' | '.join(cells)} | "
              f"{volume_per_token(s.d, s.k, 8, capacity_factor=1.25):,.0f} |")
    print("\ndevice speed (TFLOP/s, fp32 experts) above which communication takes longer than compute, R=8")
    print(f"| shape | F | {' | '.join(INTERCONNECTS)} | experts here, 1 thread per rank (measured, fwd+bwd) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in SPEED_SHAPES:
        s = SHAPES[name]
        cells = [f"{crossover_flops(s, 8, bw) / 1e12:.3g}" for bw in INTERCONNECTS.values()]
        here = measured_flops.get(name)
        print(f"| {name} | {s.f} | {' | '.join(cells)} | {'' if here is None else f'{here / 1e12:.4f}'} |")
    print("\nPer token, communication time / compute time = 2 b (R-1)/R / (9 F) x speed / bandwidth (b bytes per "
          "value, gated experts, fwd+bwd, exact splits): wider experts hide the exchange; E, k and D do not change "
          "the ratio; capacity-padded splits multiply the bytes by the capacity factor. Compare the crossover "
          "speeds with your device's: bf16 rows halve b and double them.")


# ------------------------------------------------------------------------------------------------ equality

EQ_DIM, EQ_HIDDEN, EQ_EXPERTS, EQ_TOKENS = 16, 32, 8, 16  # tokens per rank
EQ_CASES = {
    "top_k": dict(top_k=2, aux_loss_coefs={"load_balance": 0.1, "z_loss": 0.01}),
    "top_p": dict(top_k=3, router="top_p", top_p=0.6, aux_loss_coefs={"load_balance": 0.1}),
    "expert_choice": dict(top_k=2, router="expert_choice"),
    "shared_null": dict(top_k=2, num_shared_experts=1, num_null_experts=2, aux_loss_coefs={"load_balance": 0.1}),
    "capacity_drops": dict(top_k=2, capacity_factor=0.5, aux_loss_coefs={"load_balance": 0.1}),
    "padded_splits": dict(top_k=2, capacity_factor=1.0),
}


def equality_block(kwargs: dict) -> MoE:
    torch.manual_seed(0)
    moe = MoE(EQ_DIM, EQ_HIDDEN, EQ_EXPERTS, **kwargs)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def equality_batch(ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(ranks * EQ_TOKENS, EQ_DIM, generator=gen), torch.randn(ranks * EQ_TOKENS, EQ_DIM, generator=gen)


def run_block(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = moe(x)
    ((y * g).sum() / x.shape[0] + moe.routing.aux_loss).backward()
    return {"output": y.detach(), "input grad": x.grad}


def equality_rank(rank: int, ranks: int, port: int, out_dir: str) -> None:
    _join(rank, ranks, port, threads=1)
    x, g = equality_batch(ranks)
    mine = slice(rank * EQ_TOKENS, (rank + 1) * EQ_TOKENS)
    results = {}
    for name, kwargs in EQ_CASES.items():
        moe = equality_block(kwargs).shard_experts(pad_to_capacity=name == "padded_splits")
        got = run_block(moe, x[mine], g[mine])
        got["input grad"] = got["input grad"] / ranks  # the sum of R losses against one process's mean
        reduce_gradients(moe.parameters())
        got.update({f"grad {n}": p.grad for n, p in moe.named_parameters()})
        results[name] = got
    torch.save(results, f"{out_dir}/eq{rank}.pt")
    dist.destroy_process_group()


def equality_table(ranks_list: list[int]) -> None:
    print("## Equality: max |EP - one process| / max |one process| over output, input and parameter gradients\n")
    print(f"| case | {' | '.join(f'{r} ranks' for r in ranks_list)} |")
    print("|---|" + "---:|" * len(ranks_list))
    rows = {name: [] for name in EQ_CASES}
    for ranks in ranks_list:
        with tempfile.TemporaryDirectory() as out_dir:
            _spawn(equality_rank, ranks, out_dir)
            per_rank = [torch.load(f"{out_dir}/eq{r}.pt") for r in range(ranks)]
        x, g = equality_batch(ranks)
        for name, kwargs in EQ_CASES.items():
            moe = equality_block(kwargs)
            ref = run_block(moe, x, g)
            ref.update({f"grad {n}": p.grad for n, p in moe.named_parameters()})
            worst = 0.0
            for rank, results in enumerate(per_rank):
                mine = slice(rank * EQ_TOKENS, (rank + 1) * EQ_TOKENS)
                local = EQ_EXPERTS // ranks
                experts = slice(rank * local, (rank + 1) * local)
                for key, got in results[name].items():
                    want = ref[key][mine] if key in ("output", "input grad") else ref[key]
                    if key.split(" ")[-1] in ("w_in", "w_out", "b_in", "b_out"):
                        want = want[experts]
                    worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-30)))
            rows[name].append(worst)
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(f'{c:.1e}' for c in cells)} |")


# ------------------------------------------------------------------------------------------------ speed


def _median_ms(fn, repeats: int) -> tuple[float, list]:
    for _ in range(2):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        extra = fn()
        runs.append(((time.perf_counter() - start) * 1e3, extra))
    ms = statistics.median(r[0] for r in runs)
    return ms, [r[1] for r in runs]


def single_rank_speed(shape: Shape, repeats: int, out_path: str) -> None:
    """1 rank x 2 threads: the whole batch and all experts in one process."""
    torch.set_num_threads(2)
    p = make_problem(shape)
    w_in, w_out = p["w_in_ENK"].requires_grad_(), p["w_out_EDF"].requires_grad_()
    shared = p["shared"]

    def step(backward: bool):
        plan = build_plan(p["ids_TK"], shape.E)
        y = expert_mlp(p["x_TD"], p["weights_TK"], plan, w_in, w_out, backend="torch",
                       shared=None if shared is None else shared.as_shared_expert())
        if backward:
            (y * p["g_TD"]).sum().backward()
            for param in (w_in, w_out, *([] if shared is None else shared.parameters())):
                param.grad = None

    with torch.inference_mode():
        fwd_ms, _ = _median_ms(lambda: step(False), repeats)
    bwd_ms, _ = _median_ms(lambda: step(True), repeats)
    torch.save({"fwd": fwd_ms, "fwd+bwd": bwd_ms}, out_path)


def expert_parallel_speed_rank(rank: int, ranks: int, port: int, out_dir: str, shape: Shape, repeats: int) -> None:
    """2 ranks x 1 thread: T/R tokens and E/R experts each; the forward timed piece by piece."""
    _join(rank, ranks, port, threads=1)
    p = make_problem(shape)
    shard = expert_shard(shape.E)
    mine, experts = slice(rank * shape.T // ranks, (rank + 1) * shape.T // ranks), shard.experts
    x, ids, weights, g = p["x_TD"][mine], p["ids_TK"][mine], p["weights_TK"][mine], p["g_TD"][mine]
    w_in = p["w_in_ENK"][experts.start:experts.stop].clone().requires_grad_()
    w_out = p["w_out_EDF"][experts.start:experts.stop].clone().requires_grad_()
    shared = p["shared"]

    def forward(split: bool):
        marks = [time.perf_counter()]
        plan = build_plan(ids, shape.E)
        rows, exchange = dispatch(x, plan, shard)
        marks.append(time.perf_counter())
        y_rows = expert_mlp(rows, rows.new_ones(rows.shape[0], 1), exchange.local_plan, w_in, w_out, backend="torch")
        y = shared(x) if shared is not None else 0.0
        marks.append(time.perf_counter())
        y = y + combine(return_results(y_rows, exchange), weights, plan)
        marks.append(time.perf_counter())
        sent_rows = sum(exchange.send_splits) - exchange.send_splits[rank]
        return y, [b - a for a, b in zip(marks, marks[1:])], sent_rows

    with torch.inference_mode():
        fwd_ms, extras = _median_ms(lambda: forward(True)[1:], repeats)
    splits = [statistics.median(e[0][i] for e in extras) * 1e3 for i in range(3)]
    sent_rows = extras[0][1]

    def step():
        y, _, _ = forward(False)
        (y * g).sum().backward()
        for param in (w_in, w_out, *([] if shared is None else shared.parameters())):
            param.grad = None

    bwd_ms, _ = _median_ms(step, repeats)
    # rows there and back in the forward, gradients again in the backward; plus E counts (int64) each forward
    sent_bytes = {"fwd": 2 * sent_rows * shape.d * BYTES_FP32 + shape.E * 8}
    sent_bytes["fwd+bwd"] = 2 * sent_bytes["fwd"] - shape.E * 8
    torch.save({"fwd": fwd_ms, "fwd+bwd": bwd_ms, "split": splits, "bytes": sent_bytes}, f"{out_dir}/speed{rank}.pt")
    dist.destroy_process_group()


def speed_table(shapes: list[str], quick: bool, repeats: int) -> dict[str, float]:
    """Prints the speed table; returns the measured FLOP/s of one thread per shape (experts, fwd+bwd)."""
    print("\n## Speed: 1 rank x 2 threads vs 2 ranks x 1 thread (fp32, torch backend)\n")
    print("| shape | T | setting | fwd tok/s | fwd+bwd tok/s | fwd dispatch / experts / combine ms | "
          "bytes sent per rank per step (fwd+bwd) | model |")
    print("|---|---:|---|---:|---:|---|---:|---:|")
    flops = {}
    for name in shapes:
        shape = shape_for(name, quick)
        with tempfile.TemporaryDirectory() as out_dir:
            process = multiprocessing.get_context("spawn").Process(
                target=single_rank_speed, args=(shape, repeats, f"{out_dir}/single.pt"))
            process.start()
            process.join()
            one = torch.load(f"{out_dir}/single.pt")
            _spawn(expert_parallel_speed_rank, 2, out_dir, shape, repeats)
            two = [torch.load(f"{out_dir}/speed{r}.pt") for r in range(2)]
        print(f"| {name} | {shape.T} | 1 rank x 2 threads | {shape.T / one['fwd'] * 1e3:,.0f} | "
              f"{shape.T / one['fwd+bwd'] * 1e3:,.0f} | | | |")
        slowest = {p: max(r[p] for r in two) for p in ("fwd", "fwd+bwd")}  # the step ends with the last rank
        split = " / ".join(f"{v:.1f}" for v in two[0]["split"])
        sent = max(r["bytes"]["fwd+bwd"] for r in two)
        model = volume_per_token(shape.d, shape.k, 2) * shape.T / 2
        print(f"| {name} | {shape.T} | 2 ranks x 1 thread | {shape.T / slowest['fwd'] * 1e3:,.0f} | "
              f"{shape.T / slowest['fwd+bwd'] * 1e3:,.0f} | {split} | {sent:,} | {model:,.0f} |")
        flops[name] = flops_per_token(shape.d, shape.f, shape.k) * shape.T / 2 / (slowest["fwd+bwd"] / 1e3)
    print("\n'model': volume_per_token x T/2 tokens per rank (uniform routing); the measured bytes follow the "
          "real routing (random router here) and add E counts per step.")
    return flops


# ------------------------------------------------------------------------------------------------ processes


def _join(rank: int, ranks: int, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=600))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target, ranks: int, out_dir: str, *args) -> None:
    """``target(rank, ranks, port, out_dir, *args)`` in ``ranks`` fresh processes; any failure ends them all."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    codes = run_ranks([context.Process(target=target, args=(rank, ranks, port, out_dir, *args))
                       for rank in range(ranks)])
    if any(codes):
        raise RuntimeError(f"a rank of {target.__name__} failed (exit codes {codes})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T / 16, 3 repeats, 2 ranks only: a smoke run")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="equality table's group sizes")
    parser.add_argument("--shapes", nargs="+", default=list(SPEED_SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    ranks = args.ranks or ([2] if args.quick else [2, 4])
    repeats = args.repeats or (3 if args.quick else 10)
    print(f"# bench/expert_parallel.py{' --quick' if args.quick else ''}: torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, gloo\n")
    equality_table(ranks)
    measured = speed_table(args.shapes, args.quick, repeats)
    print_model(measured)


if __name__ == "__main__":
    main()
