"""What prepacked expert weights buy the torch backend's no-grad forward (CPU, fp32).

Without autograd, ``expert_mlp`` hands oneDNN each expert's weights already reordered into its blocked layout
(``moezoo.kernels.cpu_backend.PACK_WEIGHTS``, made once per weight tensor and kept); with packing off, oneDNN
reorders the plain weights inside every GEMM. This times both, in one process and interleaved call by call
(this VM's speed drifts between processes more than the difference; each timed call follows an untimed one of
its kind, ``few_tokens.interleaved_ms``), on ``bench/moe_layer.py``'s shapes and
layers (same inputs, router outputs and shared expert), under ``torch.inference_mode`` as its ``fwd`` pass.
Prints a markdown table: median ms of each, their ratio, and the memory the packed copies hold.

Usage::

    python bench/packed_weights.py                 # ~1 minute on 2 idle cores
    python bench/packed_weights.py --rounds 20 --shapes dit_moe_s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_layer  # noqa: E402  (this folder's MoE layer benchmark: shapes, problems, layers)
from few_tokens import interleaved_ms  # noqa: E402  (each timed call after an untimed one of its kind)

import moezoo.kernels.cpu_backend as cpu_backend  # noqa: E402


def packed_mib() -> float:
    """Memory held by every packed copy right now."""
    parts = [p for _, packed in cpu_backend._packed.values() for p in packed.parts.values()]
    return sum(p.numel() * p.element_size() for p in parts) / 2**20


def time_shape(name: str, rounds: int) -> dict:
    shape = moe_layer.SHAPES[name]
    problem = moe_layer.make_problem(shape)
    layer = moe_layer.Layer("moezoo", shape, problem)
    inputs = (problem["x_TD"], problem["ids_TK"], problem["weights_TK"], problem["g_TD"])

    def call(pack: bool):
        cpu_backend.PACK_WEIGHTS = pack
        with torch.inference_mode():
            return layer(*inputs[:3])

    cpu_backend.clear_packed_weights()
    plain_out, packed_out = call(False), call(True)  # the packed call packs
    rel_err = ((packed_out - plain_out).abs().max() / plain_out.abs().max()).item()
    ms = interleaved_ms({False: lambda: call(False), True: lambda: call(True)}, rounds)
    mib = packed_mib()
    cpu_backend.clear_packed_weights()
    cpu_backend.PACK_WEIGHTS = True
    return dict(shape=name, plain_ms=ms[False], packed_ms=ms[True], speedup=ms[False] / ms[True], packed_mib=mib,
                rel_err=rel_err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(moe_layer.SHAPES), default=list(moe_layer.SHAPES))
    parser.add_argument("--rounds", type=int, default=10, help="timed calls of each, interleaved (after warm-ups)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.shapes:
        rows.append(time_shape(name, args.rounds))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print("| shape | plain weights ms | prepacked ms | speed-up | packed copies MiB | rel. difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['plain_ms']:.1f} | {r['packed_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['packed_mib']:.0f} | {r['rel_err']:.1e} |")
    print(f"\n# {moe_layer.cpu_model()}, {torch.get_num_threads()} threads, median of {args.rounds} "
          "interleaved calls each, torch.inference_mode")


if __name__ == "__main__":
    main()
