"""The multimodal LM's FFN layouts side by side: dense, MoE-LLaVA, MoIIE, MoMa and Mixture-of-Transformers, each
upcycled from one dense model and trained on the same data for the same steps (training/configs/moe_vlm_*.yaml),
scored on questions none of them trained on.

    python bench/mllm_compare.py                      # every layout's run under runs/ (seeds: runs/moe_vlm_<layout>*/export)
    python bench/mllm_compare.py --models moiie=local-dir:runs/moe_vlm_moiie/export moma=local-dir:...
    python bench/mllm_compare.py --json bench/results/mllm_compare.json

Test data (``ScenesSoundsQADataModule.test_dataloader``, seed 0): ``--num-test`` scenes of the ``"test"`` split
(the training distribution, other scenes), as many of the ``"held_out"`` split (every scene holds a colour-shape
pair no training scene had), and ``--num-sounds`` words said by the ``"judge"`` speakers (voices and rates never
trained on) plus as many notes of later renditions. Each scene carries one question, kinds in turn (shape,
colour, count, relation, exists, caption).

Per model: exact-match accuracy of the greedy answer per question kind (captions: the attribute F1 of their
colour-shape pairs), on test and held-out scenes and on sounds; the share of each modality's routed slots per
expert group (intra-modality / shared / the modality's group), read from the routing of the test answers (the
audio tokens' from the sound answers); the
parameters a token uses (``MoEVLM.num_parameters(active=True)``, the decoder blocks) and all of them; training
tokens per second (forward + backward + AdamW step on the same batches, ``--train-steps`` steps each, the models
in turn, after one warm-up step) and milliseconds per answer (one question at a time, greedy, ``--answer-reps``
questions, interleaved); all at ``--threads`` torch threads (default 1) with nothing else running.

With several runs of a layout (``<layout>=...`` given twice, or ``runs/moe_vlm_<layout>_s<k>/export``), the table
shows the mean and the spread (min-max) over them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from moezoo.training.datamodules.scenes import ScenesSoundsQADataModule
from moezoo.training.vqa import answer_score
from moezoo.zoo import create_model
from moezoo.zoo.models.moe_vlm import MODALITIES, MoEVLM

LAYOUTS = ("dense", "dense_more", "dense_wide", "moe_llava", "moiie", "moma", "mot")  # dense_more: stage 3b
SCENE_KINDS = ("shape", "colour", "count", "relation", "exists", "caption")
SOUND_KINDS = ("word", "note")


def discover(runs: Path) -> dict[str, list[str]]:
    """``runs/moe_vlm_<layout>/export`` and ``runs/moe_vlm_<layout>_s<k>/export`` for every layout."""
    found: dict[str, list[str]] = {}
    for layout in LAYOUTS:
        folders = [runs / f"moe_vlm_{layout}"] + sorted(runs.glob(f"moe_vlm_{layout}_s*"))
        exports = [f"local-dir:{f / 'export'}" for f in folders if (f / "export" / "config.json").is_file()]
        if exports:
            found[layout] = exports
    return found


def test_sets(num_test: int, num_sounds: int) -> dict[str, list[dict]]:
    data = ScenesSoundsQADataModule(num_train=1, num_val=0, num_test=num_test, num_test_sounds=num_sounds, cache=False)
    data.setup("test")
    loaders = data.test_dataloader()
    return {name: list(loader) for name, loader in zip(("test", "held_out", "sounds"), loaders)}


def score(model: MoEVLM, batches: list[dict]) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Scores per kind, and per modality the share of routed slots per expert group (per batch)."""
    pipe_scores: dict[str, list[float]] = defaultdict(list)
    shares: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for batch in batches:
        images, audio = batch.get("image"), batch.get("audio")
        out = model.generate(images, audio, batch["prompt"], return_routing=True)
        for kind, predicted, truth in zip(batch["kind"], out.text, batch["answer"]):
            pipe_scores[kind].append(answer_score(kind, predicted, truth))
        for modality_name, group_shares in _group_shares(model, out).items():
            for group, share in group_shares.items():
                shares[modality_name][group].append(share)
    return pipe_scores, shares


def _group_shares(model: MoEVLM, out) -> dict[str, dict[str, float]]:
    """Per modality, the share of its routed slots (all routed layers, all rows) per expert-group name."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for layer, block in enumerate(model.blocks):
        if out.routing[layer][0] is None:
            continue
        names = model.expert_groups(layer)
        for experts, modality in zip(out.routing[layer], out.modality):
            for m, name in enumerate(MODALITIES):
                slots = experts[modality == m].flatten()
                for e in slots[slots >= 0].tolist():
                    counts[name][names[e]] += 1
    return {m: {g: c / sum(per.values()) for g, c in per.items()} for m, per in counts.items()}


def train_speed(models: dict[str, MoEVLM], batch: dict, steps: int) -> dict[str, float]:
    """Training tokens per second of each model on the same batch, the models in turn."""
    states = {}
    for name, model in models.items():
        trained = [p for n, p in model.named_parameters() if not n.startswith(("image_encoder.", "audio_encoder."))]
        states[name] = (torch.optim.AdamW(trained, lr=1e-5), [0.0, 0])
    images, prompts, answers = batch["image"], batch["prompt"], batch["answer"]
    any_model = next(iter(models.values()))  # <bos>, the image, the prompt, <sep>, the answer and <eos>
    tokens = sum(2 + any_model.num_image_tokens + len(any_model.encode_prompt(p)) + len(any_model.encode_answer(a))
                 for p, a in zip(prompts, answers))
    for round_ in range(steps + 1):
        for name, model in models.items():
            model.train()
            optimizer, total = states[name]
            start = time.perf_counter()
            loss, aux = model.training_loss(images, None, prompts, answers)
            (loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:  # the first round warms up
                total[0] += time.perf_counter() - start
                total[1] += 1
            model.eval()
    return {name: tokens * total[1] / total[0] for name, (_, total) in states.items()}


def answer_ms(models: dict[str, MoEVLM], batch: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(reps):
        row = i % len(batch["prompt"])
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(batch["image"][row: row + 1], None, [batch["prompt"][row]])
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="layout=source (default: every run under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--num-test", type=int, default=600, help="scenes per split (one question each)")
    parser.add_argument("--num-sounds", type=int, default=240, help="words and as many notes")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--answer-reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.models:
        sources: dict[str, list[str]] = defaultdict(list)
        for item in args.models:
            layout, _, source = item.partition("=")
            sources[layout].append(source)
    else:
        sources = discover(args.runs)
    if not sources:
        raise SystemExit(f"no model: train the configs training/configs/moe_vlm_*.yaml (runs under {args.runs}) or "
                         "give --models layout=source")
    data = test_sets(args.num_test, args.num_sounds)
    results: dict[str, list[dict]] = defaultdict(list)
    first_models: dict[str, MoEVLM] = {}
    for layout, runs in sources.items():
        for source in runs:
            model = create_model(source, pretrained=True).eval()
            first_models.setdefault(layout, model)
            row = {"source": source, "active": model.num_parameters(active=True), "total": model.num_parameters()}
            with torch.no_grad():
                for split in ("test", "held_out", "sounds"):
                    scores, shares = score(model, data[split])
                    for kind, values in scores.items():
                        row[f"{split}/{kind}"] = mean(values)
                    if split in ("test", "sounds"):  # text and image from the scenes, audio from the sounds
                        row.setdefault("shares", {}).update(
                            {m: {g: mean(v) for g, v in per.items()} for m, per in shares.items()
                             if split == "test" or m == "audio"})
            results[layout].append(row)
            print(f"scored {layout} ({source})", flush=True)
    speed = train_speed(first_models, data["test"][0], args.train_steps)
    with torch.no_grad():
        latency = answer_ms(first_models, data["test"][0], args.answer_reps)

    columns = [("test", k) for k in SCENE_KINDS] + [("held_out", k) for k in SCENE_KINDS] + \
              [("sounds", k) for k in SOUND_KINDS]
    header = ["layout", "runs", "active / all params"] + [f"{s[:4]} {k}" for s, k in columns] + ["train tok/s", "ms/answer"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layout, rows in results.items():
        cells = [layout, str(len(rows)), f"{rows[0]['active'] / 1e6:.2f}M / {rows[0]['total'] / 1e6:.2f}M"]
        for split, kind in columns:
            values = [r.get(f"{split}/{kind}", float("nan")) for r in rows]
            spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
            cells.append(f"{mean(values):.3f}{spread}")
        cells += [f"{speed[layout]:.0f}", f"{latency[layout]:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nShare of each modality's routed slots per expert group (text and image: test scenes; audio: sounds; "
          "first run of each layout):")
    for layout, rows in results.items():
        if rows[0].get("shares"):
            print(f"  {layout}: " + "; ".join(f"{m}: " + ", ".join(f"{g} {v:.0%}" for g, v in sorted(per.items()))
                                              for m, per in rows[0]["shares"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "train_tokens_per_s": speed, "ms_per_answer": latency,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
