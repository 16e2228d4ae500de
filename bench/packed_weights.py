"""What prepacked expert weights buy the torch backend's no-grad forward (CPU, fp32).

``pack_expert_weights(w_in, w_out)`` reorders every expert's weights into oneDNN's blocked layout once, and
``expert_mlp(..., packed=handle)`` computes on those copies; without a handle oneDNN reorders the plain weights
inside every GEMM. This times both, in one process and interleaved call by call (this VM's speed drifts between
processes more than the difference; each timed call follows an untimed one of its kind,
``few_tokens.interleaved_ms``), on ``bench/moe_layer.py``'s shapes and layers (same inputs, router outputs and
shared expert), under ``torch.inference_mode`` as its ``fwd`` pass. Prints a markdown table: median ms of each,
their ratio, the time packing took once, and the memory the packed copies hold.

Usage::

    python bench/packed_weights.py                 # ~1 minute on 2 idle cores
    python bench/packed_weights.py --rounds 20 --shapes dit_moe_s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_layer  # noqa: E402  (this folder's MoE layer benchmark: shapes, problems, layers)
from few_tokens import interleaved_ms  # noqa: E402  (each timed call after an untimed one of its kind)

from moezoo.kernels import pack_expert_weights  # noqa: E402


def time_shape(name: str, rounds: int, quick: bool) -> dict:
    shape = moe_layer.shape_for(name, quick)
    problem = moe_layer.make_problem(shape)
    layer = moe_layer.Layer("moezoo", shape, problem)
    start = time.perf_counter()
    handle = pack_expert_weights(layer.w_in_ENK, layer.w_out_EDF)
    pack_ms = (time.perf_counter() - start) * 1e3
    if handle is None:
        raise SystemExit("pack_expert_weights returned None: this torch has no oneDNN linear, nothing to compare")
    inputs = (problem["x_TD"], problem["ids_TK"], problem["weights_TK"])

    def call(packed):
        layer.packed = packed  # the handle the layer passes to expert_mlp (None: the plain weights)
        with torch.inference_mode():
            return layer(*inputs)

    plain_out, packed_out = call(None), call(handle)
    rel_err = ((packed_out - plain_out).abs().max() / plain_out.abs().max()).item()
    ms = interleaved_ms({"plain": lambda: call(None), "packed": lambda: call(handle)}, rounds)
    return dict(shape=shape.name, T=shape.T, plain_ms=ms["plain"], packed_ms=ms["packed"],
                speedup=ms["plain"] / ms["packed"], pack_ms=pack_ms, packed_mib=handle.nbytes / 2**20, rel_err=rel_err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(moe_layer.SHAPES), default=list(moe_layer.SHAPES))
    parser.add_argument("--rounds", type=int, default=10, help="timed calls of each, interleaved (after warm-ups)")
    parser.add_argument("--quick", action="store_true", help="1/16 of the tokens (a smoke run, not for figures)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.shapes:
        rows.append(time_shape(name, args.rounds, args.quick))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print("| shape | tokens | plain weights ms | prepacked ms | speed-up | packing once ms | packed copies MiB "
          "| rel. difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['plain_ms']:.1f} | {r['packed_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['pack_ms']:.0f} | {r['packed_mib']:.0f} | {r['rel_err']:.1e} |")
    print(f"\n# {moe_layer.cpu_model()}, {torch.get_num_threads()} threads, median of {args.rounds} "
          "interleaved calls each, torch.inference_mode")


if __name__ == "__main__":
    main()
