"""DiT-MoE against a dense DiT where the judge is not at its ceiling: equal active parameters, equal training
time, short training, judged by Fréchet distance and precision/recall as well as accuracy; two seeds.

Fully trained, both digits models draw the asked digit 99% of the time and the comparison says nothing. Here
each pair (``dit_moe_digits`` and ``dit_dense_digits``: 2.27M and 2.26M active parameters, the shipped
configs, one seed) trains for the same wall-clock budget (``--budget-minutes``, Lightning's ``max_time``),
both runs at once on one thread each so that they share the machine alike; the learning rate is constant after
warm-up in these configs, so stopping on time cuts no schedule short. Each run's EMA weights are exported and
judged as ``bench/dit_quality.py digits`` judges the bundled models (a CNN trained on real digits; FD,
precision, recall and within-class diversity against the held-out real digits), at the bundled models'
sampling (Euler, 25 steps, guidance 1.25). The table gives every run and, per model, the mean and the spread
(half the range) over the seeds.

The judged weights are the raw ones by default (``--weights raw``), not the configs' EMA: its decay of 0.998
averages over ~500 steps, so after the few hundred steps of a short run the EMA is still about a third the
random initialisation (0.998^600 = 0.30) and draws noise for both models.

    python bench/dit_moe_vs_dense.py                        # 2 seeds x 12 minutes a pair, then the judging
    python bench/dit_moe_vs_dense.py --budget-minutes 4 --seeds 0 --samples-per-class 10   # a quick look
    python bench/dit_moe_vs_dense.py --skip-training        # judge the runs already in --runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import dit_quality  # bench/ is this script's folder
from moezoo.training.checkpoints import load_checkpoint, safe_checkpoint_globals
from moezoo.training.diffusion import DiffusionModule
from moezoo.zoo import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"MoE": "dit_moe_digits", "dense": "dit_dense_digits"}
LABEL_NAMES = {"label_names": [str(d) for d in range(10)]}


def run_name(kind: str, seed: int) -> str:
    return f"{KINDS[kind]}_s{seed}"


def train_pair(seed: int, minutes: float, runs: Path) -> None:
    """Both kinds at once, one thread each, for the same wall-clock budget."""
    seconds = int(minutes * 60)
    budget = f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for kind, config in KINDS.items():
        log = open(runs / f"{run_name(kind, seed)}.log", "w")
        command = [sys.executable, "-m", "moezoo.training.cli", "fit",
                   "--config", str(ROOT / "training" / "configs" / f"{config}.yaml"),
                   "--seed_everything", str(seed), "--trainer.max_steps", "-1", "--trainer.max_time", budget,
                   "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.name", run_name(kind, seed)]
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, kind))
    print(f"seed {seed}: training MoE and dense for {minutes:g} minutes each, at once ...", flush=True)
    for proc, log, kind in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"training {run_name(kind, seed)} failed: see {log.name}")
        log.close()


def export(kind: str, seed: int, runs: Path, weights: str) -> tuple[Path, int]:
    """The run's raw or EMA weights in the zoo format, and the steps it trained."""
    ckpt = runs / run_name(kind, seed) / "checkpoints" / "last.ckpt"
    out = runs / run_name(kind, seed) / f"export_{weights}"
    with safe_checkpoint_globals():
        module = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    model = module.sampling_model if weights == "ema" else module.model
    save_pretrained(model, out, module.model_name, module.model_args, {"objective": module.objective, **LABEL_NAMES})
    return out, int(load_checkpoint(ckpt)["global_step"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "moe_vs_dense"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget-minutes", type=float, default=12.0)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw", help="which weights of each run to judge")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.25)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--judge-epochs", type=int, default=15)
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if not args.skip_training:
        for seed in args.seeds:
            train_pair(seed, args.budget_minutes, runs)

    torch.set_num_threads(1)
    judge, real, real_features = dit_quality.digits_judge(args)
    labels = [d for d in range(10) for _ in range(args.samples_per_class)]
    results = {}
    for kind in KINDS:
        for seed in args.seeds:
            path, steps = export(kind, seed, runs, args.weights)
            pipe = dit_quality.load_pipeline(f"local-dir:{path}", {})
            images, _ = dit_quality.generate(pipe, args.steps, args.guidance, args.batch, 0, class_labels=labels)
            accuracy = dit_quality.judge_accuracy(judge, images, {"digit": torch.tensor(labels)})["digit"]
            metrics = dit_quality.measure(judge, real_features, real["val"][1], images, labels)
            results[kind, seed] = {"steps": steps, "accuracy": accuracy, **metrics}
            print(f"{run_name(kind, seed)}: {steps} steps, {accuracy:.1%} right, FD {metrics['fd']:.2f}", flush=True)

    columns = ("steps", "accuracy", "fd", "precision", "recall", "diversity_ratio")
    percent = {"accuracy", "precision", "recall"}

    def cell(column: str, value: float, spread: float | None = None) -> str:
        text = f"{value:.1%}" if column in percent else f"{value:.0f}" if column == "steps" else f"{value:.2f}"
        if spread is None:
            return text
        return text + (f" ± {spread:.1%}" if column in percent else f" ± {spread:.0f}" if column == "steps"
                       else f" ± {spread:.2f}")

    budget = "the runs found in --runs" if args.skip_training else f"{args.budget_minutes:g} min a run"
    print(f"\nEqual training time ({budget}, MoE and dense at once, 1 thread each), {args.weights} weights; "
          f"{len(labels)} samples, Euler {args.steps} steps, guidance {args.guidance:g}; FD / precision / recall "
          f"(k = 3) / diversity (generated over real) in the judge's features against {len(real['val'][1])} "
          "held-out real digits\n")
    print("| run | steps trained | judged right | FD | precision | recall | diversity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (kind, seed), r in results.items():
        print(f"| {kind}, seed {seed} | " + " | ".join(cell(c, r[c]) for c in columns) + " |")
    for kind in KINDS:
        values = {c: [results[kind, s][c] for s in args.seeds] for c in columns}
        print(f"| **{kind}**, mean ± half range | " + " | ".join(
            cell(c, float(np.mean(v)), (max(v) - min(v)) / 2) for c, v in values.items()) + " |")


if __name__ == "__main__":
    main()
