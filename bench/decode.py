"""Decoding speed on CPU (fp32, no grad): one MoE layer at a few tokens, and the bundled generators per token.

A KV-cached generation step runs every layer on the new tokens only: 1 per sequence, 2 for the audio model's
classifier-free guidance, up to 16 for a batch of prompts. There the MoE layer's fixed costs (router, dispatch,
routing record) weigh against arithmetic that the dense MLP of the same active width does in three GEMMs.

Part 1, one layer at T = 1 / 4 / 16 / 64 tokens, times interleaved call by call in one process
(``few_tokens.interleaved_ms``; median ms):

- ``moezoo``: the layer as the pipelines run it (frozen, ``torch.no_grad``): router, experts, shared experts and
  the routing record included; where the layer is the decode kernel's (``kernels.cpu_decode``: MoE blocks with
  top-k routers, MoIIE's one-modality calls, UniMoE-Audio's DCMoE) one native call;
- ``no decode kernel``: the same with the kernel off (``cpu_decode.MAX_SLOTS = 0``): the eager few-token path
  of the torch backend (no sort; views of the chosen experts' weights), as before the kernel;
- ``dense``: a SwiGLU MLP (``GatedMLP``) of the same active parameters: hidden ``k * f + shared``;
- ``HF eager``: transformers' ``MixtralExperts`` with ``experts_implementation="eager"`` (a Python loop over the
  experts hit, ``bench/moe_layer.py``'s ``hf_experts``) behind the same router (softmax top-k written out as
  Mixtral's code does) plus the shared MLP; its output is checked against moezoo's first (``rel. diff``).

Layers: ``few_tokens.LAYERS`` (the bundled DiT-MoE digits layer, a DiT-MoE-S layer; random weights, random
inputs), and the routed FFNs of the bundled generators with their trained weights, fed the hidden states they
see while generating (captured from real generation calls): ``moe_vlm_tiny``'s MoIIE layer (text tokens: a router
over the text expert and the 2 shared of 5 experts of 128 -> 256, top-2 renormalised) and ``unimoe_audio_tiny``'s
DCMoE layer (8 experts of 160 -> 160 and a null one under top-p 0.7, 2 gated shared experts of 80; its dense
counterpart's hidden is the routed experts it used per token on these inputs, rounded, times 160, plus 160).

Part 2, the bundled generators: ``moe_vlm_tiny`` answering "describe the picture." about test scenes, and
``unimoe_audio_tiny`` saying "the word seven" (guidance 2: two rows per step), each with its KV cache. Timed:
every ``run_blocks`` call of the generation (all decoder layers: attention with the cache, FFN, norms), by
the number of new positions; a decode step is a call with one new position. The same with the decode kernel
off, and with every routed FFN replaced by a dense SwiGLU of the same active parameters (random weights: its
tokens differ, its time per step does not depend on them).

Usage::

    python bench/decode.py                  # ~5 minutes on 2 idle cores
    python bench/decode.py --calls 5        # a quick check
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/decode.py   # an AVX2-only CPU, imitated
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import moezoo.kernels.cpu_decode as cpu_decode
from few_tokens import LAYERS, interleaved_ms  # noqa: E402  (bench/ is not a package)
from moe_layer import CpuShare, Shape, cpu_model, hf_experts  # noqa: E402
from moezoo.zoo.layers import GatedMLP, MoE, freeze

TOKENS = (1, 4, 16, 64)


@contextmanager
def decode_kernel(enabled: bool):
    """The MoE blocks' native decode kernel on (the default) or off."""
    saved = cpu_decode.MAX_SLOTS
    if not enabled:
        cpu_decode.MAX_SLOTS = 0
    try:
        yield
    finally:
        cpu_decode.MAX_SLOTS = saved


def without_kernel(fn):
    def call():
        with decode_kernel(False):
            return fn()
    return call


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------- the layers


class LayerCase:
    """One routed ``block`` called as ``call(inputs(T))``, its ``dense`` counterpart (called on the first input)
    and, where transformers has one, its ``hf`` eager counterpart."""

    def __init__(self, label: str, block, call, dense, hf=None, inputs=None):
        self.label, self.block, self.call, self.dense, self.hf, self.inputs = label, block, call, dense, hf, inputs

    def calls(self, tokens: int) -> tuple[dict, float | None, float]:
        """The timed calls at ``tokens`` tokens, HF's relative difference from moezoo, and the weights the MoE
        call reads over the dense MLP's (experts hit, shared experts)."""
        x = self.inputs(tokens)
        ours = lambda: self.call(x)  # noqa: E731
        calls = {"moezoo": ours, "no decode kernel": without_kernel(ours), "dense": lambda: self.dense(x[0])}
        check = None
        if self.hf is not None:
            calls["HF eager"] = lambda: self.hf(x)
            check = rel_diff(self.hf(x), ours())
        ours()
        return calls, check, weights_read(self.block, self.dense)


def weights_read(block, dense) -> float:
    """Weights a call of ``block`` reads (the routed experts its last forward hit, the shared experts; routers
    left out) over those of ``dense``: at one token the two are equal, the lower bound of a call that
    streams its weights from memory."""
    ids = block.routing.ids_TK
    hit = ids[(ids >= 0) & (ids < block.num_experts)].unique().numel()
    shared = sum(p.numel() for name, p in block.named_parameters() if name.startswith("shared"))
    return (hit * (block.w_in[0].numel() + block.w_out[0].numel()) + shared) / sum(p.numel() for p in dense.parameters())


def hf_eager_moe(moe: MoE):
    """``moe`` (softmax top-k, SwiGLU experts, shared MLP) as transformers' Mixtral-style code computes it."""
    shape = Shape("layer", T=0, d=moe.dim, f=moe.hidden_dim, E=moe.num_experts, k=moe.top_k)
    experts = hf_experts(shape, "eager", moe.w_in.detach(), moe.w_out.detach())

    def call(x):
        x = x[0]
        weights, ids = F.linear(x, moe.router.weight).softmax(-1).topk(moe.top_k, dim=-1)
        y = experts(x, ids, weights)
        return y if moe.shared is None else y + moe.shared(x)
    return call


def random_layer_cases() -> list[LayerCase]:
    cases = []
    for label, (dim, hidden, num_experts, top_k, shared) in LAYERS.items():
        torch.manual_seed(0)
        moe = MoE(dim, hidden, num_experts, top_k, num_shared_experts=1, shared_hidden_dim=shared).eval()
        freeze(moe)
        dense = GatedMLP(dim, top_k * hidden + shared).eval()

        def inputs(tokens, dim=dim):
            return (torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens)),)

        cases.append(LayerCase(label, moe, lambda x, moe=moe: moe(x[0]), dense, hf_eager_moe(moe), inputs))
    return cases


def captured_ffn_inputs(module: torch.nn.Module, run) -> list[tuple]:
    """The inputs ``module`` is called with while ``run()`` runs (a forward pre-hook)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(tuple(a.detach() for a in args)))
    try:
        run()
    finally:
        handle.remove()
    return seen


def decode_rows(seen: list[tuple], tokens: int) -> torch.Tensor:
    """``tokens`` hidden states [T, D] from the decode steps among ``seen`` (calls of one new position)."""
    rows = torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args in seen if args[0].shape[1] == 1])
    if len(rows) < tokens:
        raise RuntimeError(f"only {len(rows)} decode-step states captured, {tokens} needed")
    return rows[:tokens]


def vlm_layer_case(pipe, images) -> LayerCase:
    from moezoo.zoo.models.moe_vlm import TEXT

    model = pipe.model
    block = model.blocks[model.config.routed_layers[-1]].ffn  # an IntraInterMoE
    seen = captured_ffn_inputs(block, lambda: pipe(images=images, prompt="describe the picture."))
    rows = {t: decode_rows(seen, t)[None] for t in TOKENS}
    modality = {t: torch.full((1, t), TEXT, dtype=torch.long) for t in TOKENS}
    columns = torch.tensor(block.experts_of(TEXT))
    shape = Shape("moiie", T=0, d=block.dim, f=block.hidden_dim, E=block.num_experts, k=block.top_k)
    experts = hf_experts(shape, "eager", block.w_in.detach(), block.w_out.detach())

    def hf(x):  # Mixtral's router over the text modality's experts, renormalised, then the experts' loop
        x_TD = x[0][0]
        weights, local = F.linear(x_TD, block.routers[TEXT].weight).softmax(-1).topk(block.top_k, dim=-1)
        return experts(x_TD, columns[local], weights / weights.sum(-1, keepdim=True))[None]

    dense = GatedMLP(block.dim, block.top_k * block.hidden_dim).eval()
    return LayerCase("moe_vlm_tiny MoIIE layer (text)", block, lambda x: block(*x), dense, hf,
                     lambda t: (rows[t], modality[t]))


def audio_layer_case(pipe) -> tuple[LayerCase, float]:
    model = pipe.model
    block = model.blocks[-1].ffn  # a DynamicCapacityMoE
    seen = captured_ffn_inputs(block, lambda: pipe("the word seven", generator=torch.Generator().manual_seed(0)))
    rows = {t: decode_rows(seen, t) for t in TOKENS}
    with torch.no_grad():
        block(rows[TOKENS[-1]])
    routed = block.experts_per_token(count_null=False).float().mean().item()
    dense = GatedMLP(block.dim, round(routed) * block.hidden_dim + block.num_shared_experts * block.shared_hidden_dim)
    return LayerCase("unimoe_audio_tiny DCMoE layer", block, lambda x: block(x[0]), dense.eval(), None,
                     lambda t: (rows[t],)), routed


def layer_rows(cases: list[LayerCase], repeats: int) -> list[tuple]:
    rows = []
    for case in cases:
        for tokens in TOKENS:
            with torch.no_grad():
                calls, check, weights = case.calls(tokens)
                ms = interleaved_ms(calls, repeats)
            rows.append((case.label, tokens, ms, check, weights))
    return rows


# ----------------------------------------------------------------------------------------------- generators


class StepTimer:
    """Times every ``run_blocks`` call of ``model`` (an instance attribute wrapping the method) by the number
    of new positions."""

    def __init__(self, model):
        self.model, self.times = model, {}
        inner = model.run_blocks

        def timed(x_BSD, *args, **kwargs):
            start = time.perf_counter()
            out = inner(x_BSD, *args, **kwargs)
            self.times.setdefault(x_BSD.shape[1], []).append((time.perf_counter() - start) * 1e3)
            return out

        model.run_blocks = timed

    def decode_ms(self) -> float:
        return statistics.median(self.times[1])

    def reset(self):
        self.times = {}


def dense_counterpart(name: str, make_dense) -> torch.nn.Module:
    """The bundled model ``name`` with every routed FFN replaced by a dense SwiGLU of its active width
    (``make_dense(ffn)``, random weights)."""
    from moezoo.zoo import create_model
    from moezoo.zoo.layers import RoutedBlock

    model = create_model(name, pretrained=True)
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, RoutedBlock):
            if hasattr(block, "moe"):  # the audio model's block: its ffn is `mlp` when it has one
                del block.moe
                block.mlp = make_dense(ffn)
            else:
                block.ffn = make_dense(ffn)
    return model.eval()


def generator_rows(vlm_pipe, images, audio_pipe, audio_routed: float, repeats: int) -> list[tuple]:
    from moezoo.pipelines import AudioPipeline, VisualQAPipeline

    vlm_dense = VisualQAPipeline(dense_counterpart(
        "moe_vlm_tiny", lambda ffn: GatedMLP(ffn.dim, ffn.top_k * ffn.hidden_dim)))
    audio_dense = AudioPipeline(dense_counterpart(
        "unimoe_audio_tiny", lambda ffn: GatedMLP(ffn.dim, round(audio_routed) * ffn.hidden_dim
                                               + ffn.num_shared_experts * ffn.shared_hidden_dim)))
    runs = {
        "moe_vlm_tiny (1 row)": (vlm_pipe, vlm_dense, lambda p: p(images=images[:1], prompt="describe the picture.")),
        "unimoe_audio_tiny (2 rows: guidance)": (
            audio_pipe, audio_dense, lambda p: p("the word seven", generator=torch.Generator().manual_seed(0))),
    }
    rows = []
    for label, (pipe, dense_pipe, run) in runs.items():
        timers = {"moezoo": StepTimer(pipe.model), "dense": StepTimer(dense_pipe.model)}
        calls = {"moezoo": lambda: run(pipe), "no decode kernel": without_kernel(lambda: run(pipe)),
                 "dense": lambda: run(dense_pipe)}
        per_step = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                timer = timers["dense" if name == "dense" else "moezoo"]
                timer.reset()
                call()
                per_step[name].append(timer.decode_ms())
        steps = len(timers["moezoo"].times.get(1, []))
        rows.append((label, steps, {name: statistics.median(v) for name, v in per_step.items()}))
    return rows


# --------------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="timed calls of each layer (generators: a tenth)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moezoo.pipelines import AudioPipeline, VisualQAPipeline
    from moezoo.training.datasets.scenes import render_scene, sample_scene, scene_rng

    cpu_share = CpuShare()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    print(f"# CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
          + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""))
    print(f"# fp32, no grad; median ms, interleaved call by call; load average {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    vlm_pipe = VisualQAPipeline.from_pretrained("moe_vlm_tiny")
    images = [render_scene(sample_scene(scene_rng("test", 0, i), "test")) for i in range(8)]
    audio_pipe = AudioPipeline.from_pretrained("unimoe_audio_tiny")
    audio_case, audio_routed = audio_layer_case(audio_pipe)
    cases = random_layer_cases() + [vlm_layer_case(vlm_pipe, images), audio_case]

    print("\n| layer | T | moezoo ms | no decode kernel | dense | HF eager | moezoo / dense | weights read / dense "
          "| HF eager / moezoo | rel. diff HF |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, tokens, ms, check, weights in layer_rows(cases, args.calls):
        hf = ms.get("HF eager")
        print(f"| {label} | {tokens} | {ms['moezoo']:.3f} | {ms['no decode kernel']:.3f} | {ms['dense']:.3f} | "
              + (f"{hf:.3f}" if hf else "-") + f" | {ms['moezoo'] / ms['dense']:.2f} | {weights:.2f} | "
              + (f"{hf / ms['moezoo']:.2f} | {check:.1e} |" if hf else "- | - |"))
    print(f"\n(unimoe_audio_tiny's layer used {audio_routed:.2f} routed experts per token on these inputs: its dense "
          f"counterpart has {round(audio_routed)} experts' width plus the shared experts')")

    print("\n| generator, one decode step (all layers) | steps | moezoo ms | no decode kernel ms | dense ms | "
          "moezoo / dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, steps, ms in generator_rows(vlm_pipe, images, audio_pipe, audio_routed, max(3, args.calls // 10)):
        print(f"| {label} | {steps} | {ms['moezoo']:.2f} | {ms['no decode kernel']:.2f} | {ms['dense']:.2f} | "
              f"{ms['moezoo'] / ms['dense']:.2f} |")
    print(f"\n# CPU use during the run: {cpu_share.report()}")


if __name__ == "__main__":
    main()
