"""Training speed end to end: ``moezoo-train fit`` on the DiT-MoE configs against their dense counterparts.

Issue 18, part 5: the MoE models' training runs at >= 0.9x the tokens/s of a dense DiT of equal active
parameters on the same data. Each run is the real command a user types, in its own process::

    moezoo-train fit --config training/configs/dit_moe_digits.yaml --trainer.max_steps N ...

with the config's model, data, optimizer and EMA, and only what a timing needs changed: ``max_steps``, a
progress line every ``--log-every`` steps, no validation, no sample grids, no checkpoints, the run's folder in a
temporary directory. The dense counterparts: ``dit_dense_digits.yaml`` (the bundled dense model) for digits,
and for shapes the same config with ``--model.init_args.model_args '{"dense_ffn": true}'`` (one SwiGLU of the
MoE's active width per block: 2 experts of 128 + the shared 256 = 512).

Timing: ProgressLog's lines ("step S/N ... elapsed H:MM:SS") give the wall time from the first logged step to
the last, so start-up, data set-up and the first steps (warm-up, allocator growth) are left out; tokens per step
are the batch size times the patches per image. The runs of one pair alternate (MoE, dense, MoE, dense, ...),
``--rounds`` times, one at a time: this VM's speed drifts between minutes, and a second busy process would slow
both. Prints a table per pair: steps/s and tokens/s per run, the median of each, and MoE / dense.

``--profile``: where a training step's time goes instead. Each config's LightningModule and data module are built
from the YAML (as LightningCLI builds them) and stepped by hand in this process: ``training_step``, backward,
AdamW, the EMA update (what ``fit`` runs per step, without Lightning's loop); after 5 untimed steps, 10 steps
under ``torch.profiler``: per aten op, ms of self CPU time per step, MoE beside dense, the ops the MoE adds first.

``--in-process``: the same steps, both models built in this one process and stepped in turn, three steps each
per round after five warm-up steps each: the median ms per step and MoE / dense tokens/s (the pairs take equal
tokens per step). Separate ``moezoo-train`` processes minutes apart see this VM's speed drift by up to 20%; turns
of a few steps in one process see the same machine.

Usage::

    python bench/train_throughput.py --steps 150 --log-every 25 --rounds 2   # ~20 min on 2 cores
    python bench/train_throughput.py --steps 60 --rounds 1 --pairs digits  # a smoke run
    python bench/train_throughput.py --profile --pairs digits              # ~1 min
    python bench/train_throughput.py --in-process --rounds 20              # ~4 min
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
# (pair, label, config, extra arguments, tokens per sample: patches of one image)
RUNS = {
    "digits": (("MoE", "dit_moe_digits.yaml", (), (16 // 2) ** 2),
               ("dense", "dit_dense_digits.yaml", (), (16 // 2) ** 2)),
    "shapes": (("MoE", "dit_moe_shapes.yaml", (), (32 // 4) ** 2),
               ("dense", "dit_moe_shapes.yaml", ("--model.init_args.model_args", '{"dense_ffn": true}'),
                (32 // 4) ** 2)),
}
PROGRESS = re.compile(r"^step (\d+)/\d+ .*elapsed (\d+):(\d\d):(\d\d)")
BATCH = re.compile(r"batch_size:\s*(\d+)")


def train_command(config: str, extra: tuple[str, ...], steps: int, log_every: int, root: Path) -> list[str]:
    """The user's command, with only what a timing needs changed (see the module docstring)."""
    return [str(Path(sys.executable).with_name("moezoo-train")), "fit", "--config", str(CONFIGS / config), *extra,
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(log_every),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks", "moezoo.training.callbacks.ProgressLog",
            "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(root)]


def batch_size(config: str) -> int:
    match = BATCH.search((CONFIGS / config).read_text())
    if match is None:
        raise ValueError(f"{config} names no data batch_size")
    return int(match.group(1))


def timed_span(output: str) -> tuple[int, float]:
    """(steps, seconds) between the first and the last progress line of a run's output."""
    points = [(int(m.group(1)), 3600 * int(m.group(2)) + 60 * int(m.group(3)) + int(m.group(4)))
              for m in map(PROGRESS.match, output.splitlines()) if m]
    if len(points) < 2 or points[-1][1] <= points[0][1]:
        raise RuntimeError("fewer than two progress lines with time between them; the run printed:\n" + output[-3000:])
    return points[-1][0] - points[0][0], float(points[-1][1] - points[0][1])


def run_once(config: str, extra: tuple[str, ...], steps: int, log_every: int) -> tuple[int, float]:
    root = Path(tempfile.mkdtemp(prefix="moezoo_throughput_"))
    try:
        done = subprocess.run(train_command(config, extra, steps, log_every, root), cwd=root, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            raise RuntimeError(f"moezoo-train failed on {config}:\n{(done.stdout + done.stderr)[-3000:]}")
        return timed_span(done.stdout)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build(spec: dict):
    """A ``class_path`` / ``init_args`` entry of a config, instantiated as LightningCLI does."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


def training_stepper(config: str, extra: tuple[str, ...]):
    """One training step of ``config`` as a function of the step's index: its LightningModule and data module
    built from the YAML (as LightningCLI builds them), then ``training_step``, backward, the optimizer step and the
    EMA update (what ``fit`` runs per step, without Lightning's loop)."""
    import torch
    import yaml

    spec = yaml.safe_load((CONFIGS / config).read_text())
    for flag, value in zip(extra[::2], extra[1::2]):  # the only override the pairs use
        if flag != "--model.init_args.model_args":
            raise ValueError(f"cannot apply {flag} outside moezoo-train")
        spec["model"].setdefault("init_args", {})["model_args"] = json.loads(value)
    torch.manual_seed(0)
    module, data = build(spec["model"]), build(spec["data"])
    data.prepare_data()
    data.setup("fit")
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    batches = itertools.cycle(data.train_dataloader())

    def step(index: int) -> None:
        loss = module.training_step(next(batches), index)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.on_train_batch_end(None, None, index)

    return step


def profile_steps(config: str, extra: tuple[str, ...], warmup: int = 5, steps: int = 10) -> dict[str, float]:
    """ms of self CPU time per training step, per aten op (see the module docstring)."""
    import torch

    step = training_stepper(config, extra)
    for index in range(warmup):
        step(index)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for index in range(steps):
            step(warmup + index)
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}


IN_PROCESS_WARMUP, IN_PROCESS_PER_TURN = 5, 3  # --in-process: untimed steps each, then steps each per turn


def print_in_process(pair: str, rounds: int) -> None:
    """Both models of ``pair`` stepped in this process, ``IN_PROCESS_PER_TURN`` steps each in turn for ``rounds``
    rounds after ``IN_PROCESS_WARMUP`` steps each: the median ms per step and MoE / dense tokens/s (equal tokens
    per step)."""
    steppers = {label: training_stepper(config, extra) for label, config, extra, _ in RUNS[pair]}
    times = {label: [] for label in steppers}
    index = dict.fromkeys(steppers, 0)
    for label, step in steppers.items():
        for _ in range(IN_PROCESS_WARMUP):
            step(index[label])
            index[label] += 1
    for _ in range(rounds):
        for label, step in steppers.items():
            for _ in range(IN_PROCESS_PER_TURN):
                start = time.perf_counter()
                step(index[label])
                times[label].append(time.perf_counter() - start)
                index[label] += 1
    moe, dense = (statistics.median(times[label]) * 1e3 for label in ("MoE", "dense"))
    print(f"| {pair} | {moe:.1f} | {dense:.1f} | **{dense / moe:.2f}x** | {rounds * IN_PROCESS_PER_TURN} |", flush=True)


def print_profile(pair: str) -> None:
    (_, moe_config, moe_extra, _), (_, dense_config, dense_extra, _) = RUNS[pair]
    moe, dense = profile_steps(moe_config, moe_extra), profile_steps(dense_config, dense_extra)
    total_moe, total_dense = sum(moe.values()), sum(dense.values())
    print(f"\n## {pair}: self CPU ms per training step (10 steps profiled after 5)\n")
    print(f"total: MoE {total_moe:.1f} ms, dense {total_dense:.1f} ms (MoE / dense {total_moe / total_dense:.2f}x)\n")
    print("| op | MoE ms | dense ms | MoE - dense |\n|---|---:|---:|---:|")
    ops = sorted(set(moe) | set(dense), key=lambda op: moe.get(op, 0.0) - dense.get(op, 0.0), reverse=True)
    for op in ops[:20]:
        a, b = moe.get(op, 0.0), dense.get(op, 0.0)
        print(f"| {op} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    rest = ops[20:]
    print(f"| (the other {len(rest)} ops) | {sum(moe.get(op, 0.0) for op in rest):.2f} | "
          f"{sum(dense.get(op, 0.0) for op in rest):.2f} | |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=20, help="steps between progress lines; the first is "
                                                                 "where timing starts")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each model, alternating")
    parser.add_argument("--profile", action="store_true", help="print where a training step's time goes instead")
    parser.add_argument("--in-process", action="store_true",
                        help="step both models in this process, taking turns, instead of moezoo-train runs")
    args = parser.parse_args(argv)
    if args.profile:
        for pair in args.pairs:
            print_profile(pair)
        return
    if args.in_process:
        import torch

        print(f"# training steps in one process, {time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} threads; {IN_PROCESS_WARMUP} warm-up steps each, then {args.rounds} "
              f"rounds of {IN_PROCESS_PER_TURN} steps each "
              f"in turn\n\n| pair | MoE ms / step | dense ms / step | MoE / dense tokens/s | steps timed each |\n"
              f"|---|---:|---:|---:|---:|")
        for pair in args.pairs:
            print_in_process(pair, args.rounds)
        return
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps {args.steps} leaves fewer than two progress lines at --log-every {args.log_every}")
    print(f"# moezoo-train fit throughput, {time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.steps} steps per run, timed from "
          f"step {args.log_every} on; {args.rounds} round(s), alternating")
    for pair in args.pairs:
        rates = {label: [] for label, *_ in RUNS[pair]}
        print(f"\n## {pair}\n\n| run | round | steps timed | s | steps/s | tokens/s |\n|---|---:|---:|---:|---:|---:|")
        for round_ in range(1, args.rounds + 1):
            for label, config, extra, tokens in RUNS[pair]:
                steps, seconds = run_once(config, extra, args.steps, args.log_every)
                per_s = steps / seconds
                rates[label].append(per_s * batch_size(config) * tokens)
                print(f"| {label} ({config}{' ' + ' '.join(extra) if extra else ''}) | {round_} | {steps} | "
                      f"{seconds:.0f} | {per_s:.3f} | {rates[label][-1]:,.0f} |", flush=True)
        moe, dense = statistics.median(rates["MoE"]), statistics.median(rates["dense"])
        print(f"\n{pair}: MoE {moe:,.0f} tokens/s, dense {dense:,.0f} tokens/s (medians): MoE / dense = "
              f"**{moe / dense:.2f}x** (goal >= 0.9x)")


if __name__ == "__main__":
    main()
