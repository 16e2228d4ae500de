"""MoE inference at few tokens (CPU, fp32): the case of one image, where fixed costs per call decide.

With few tokens each expert's products are small, and the torch backend changes path (``kernels/cpu_backend.py``):
products under ``ONEDNN_MIN_MACS`` multiply-adds go to ``torch.mm`` (oneDNN's per-call cost is ~3x MKL's), and
without autograd, experts under ``PADDED_MAX_MACS`` run padded to the largest expert's rows as two ``torch.bmm``.
This times, in one process with the three interleaved call by call (this VM drifts between processes):

- ``moezoo``: the defaults, on a frozen layer as the pipelines hold it (the decode kernel takes calls of up to 128
  tokens of top-2, ``kernels/cpu_decode.py``);
- ``one path``: how it ran before the few-token work: no decode kernel, oneDNN at every size and the per-expert
  walk at every size (both thresholds 0);
- ``dense``: a SwiGLU MLP with the same active FLOPs (hidden ``k * f + shared``), as in ``bench/moe_layer.py``.

Part 1, one ``moezoo.zoo.layers.MoE`` (softmax top-k router, SwiGLU experts, shared experts; router, plan and
routing record included) under ``torch.no_grad``, for the bundled DiT-MoE digits layer (d=128, f=128, E=8, k=2,
shared 256) and a DiT-MoE-S layer (d=384, f=1536, E=8, k=2, shared 768), at 32 / 128 / 512 tokens.
Part 2, the bundled pipelines making one image (25 steps, guidance 2: 128 tokens per forward): ``dit_moe_digits``
and ``dit_moe_shapes`` with the defaults and with one path, and ``dit_dense_digits``.

Usage::

    python bench/few_tokens.py               # ~1 minute on 2 idle cores
    python bench/few_tokens.py --calls 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import moezoo.kernels.cpu_backend as cpu_backend
import moezoo.kernels.cpu_decode as cpu_decode
from moezoo.zoo.layers import MoE, GatedMLP

LAYERS = {  # name: (dim, hidden per expert, experts, k, shared hidden)
    "dit_moe_digits layer": (128, 128, 8, 2, 256),
    "DiT-MoE-S layer": (384, 1536, 8, 2, 768),
}
TOKENS = (32, 128, 512)


@contextmanager
def one_path(enabled: bool):
    """While enabled, the code path before the few-token work: no decode kernel, oneDNN at every size and the
    per-expert walk at every size (both thresholds off)."""
    saved = cpu_backend.ONEDNN_MIN_MACS, cpu_backend.PADDED_MAX_MACS, cpu_decode.MAX_SLOTS
    if enabled:
        cpu_backend.ONEDNN_MIN_MACS, cpu_backend.PADDED_MAX_MACS, cpu_decode.MAX_SLOTS = 0, 0, 0
    try:
        yield
    finally:
        cpu_backend.ONEDNN_MIN_MACS, cpu_backend.PADDED_MAX_MACS, cpu_decode.MAX_SLOTS = saved


def interleaved_ms(calls: dict, repeats: int) -> dict:
    """Median ms of each named zero-argument call, the calls taken in turn ``repeats`` times. Each timed call
    follows an untimed one of the same kind: otherwise a call would find the caches as the previous kind left
    them (a path after another on the same weights would run measurably faster than after the dense MLP)."""
    times = {name: [] for name in calls}
    for _ in range(2):
        for fn in calls.values():
            fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_rows(repeats: int) -> list[tuple]:
    rows = []
    for label, (dim, hidden, num_experts, top_k, shared) in LAYERS.items():
        torch.manual_seed(0)
        moe = MoE(dim, hidden, num_experts, top_k, num_shared_experts=1, shared_hidden_dim=shared).eval()
        moe.freeze()  # as the pipelines hold it
        dense = GatedMLP(dim, top_k * hidden + shared).eval()
        for tokens in TOKENS:
            x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                with one_path(True):
                    before = moe(x)
                now = moe(x)
                rel = ((now - before).abs().max() / before.abs().max()).item()

                def run_one_path():
                    with one_path(True):
                        moe(x)

                ms = interleaved_ms({"moezoo": lambda: moe(x), "one path": run_one_path, "dense": lambda: dense(x)},
                                    repeats)
            rows.append((label, tokens, ms["moezoo"], ms["one path"], ms["dense"], rel))
    return rows


def pipeline_rows(repeats: int) -> list[tuple]:
    from moezoo.pipelines import DiTMoEPipeline

    pipes = {name: DiTMoEPipeline.from_pretrained(name) for name in ("dit_moe_digits", "dit_dense_digits",
                                                                      "dit_moe_shapes")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    args = {"dit_moe_digits": dict(class_labels=[3]), "dit_dense_digits": dict(class_labels=[3]),
            "dit_moe_shapes": dict(prompt="a red circle at the top left")}

    def image(name: str, old: bool = False):
        def make():
            with one_path(old):
                pipes[name](**args[name], num_inference_steps=25, guidance_scale=2.0, output_type="pt",
                            generator=torch.Generator().manual_seed(0))
        return make

    calls = {"dit_moe_digits": image("dit_moe_digits"), "dit_moe_digits, one path": image("dit_moe_digits", True),
             "dit_dense_digits": image("dit_dense_digits"), "dit_moe_shapes": image("dit_moe_shapes"),
             "dit_moe_shapes, one path": image("dit_moe_shapes", True)}
    return list(interleaved_ms(calls, max(3, repeats // 4)).items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="timed layer calls of each (pipelines: a quarter)")
    args = parser.parse_args(argv)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, no grad; median ms, interleaved")
    print("\n| layer | tokens | moezoo | one path (before) | dense MLP | moezoo / dense | one path / moezoo | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, tokens, now, before, dense, rel in layer_rows(args.calls):
        print(f"| {label} | {tokens} | {now:.3f} | {before:.3f} | {dense:.3f} | {now / dense:.2f} | "
              f"{before / now:.2f} | {rel:.1e} |")
    print("\n| pipeline, one image (25 steps, guidance 2) | ms |")
    print("|---|---:|")
    for name, ms in pipeline_rows(args.calls):
        print(f"| {name} | {ms:.0f} |")


if __name__ == "__main__":
    main()
