"""ExpertParallelStrategy and ExpertParallelFSDPStrategy (moezoo.training.expert_parallel) against Lightning in
one process.

A tiny MoE model (``ep_lightning_run.py``) is trained for 3 + 3 steps of SGD with momentum: in one process, on
two CPU ranks with the experts sharded (DDP for the rest), and resumed across the two: from the one-process
checkpoint on two ranks, from the two-rank checkpoint in one process; and on two ranks with FSDP2 for the rest
(Lightning's ModelParallelStrategy), resumed from the one-process checkpoint. The two-rank run goes on past its
step-3 checkpoint until its whole process group is killed (SIGKILL) mid-training, and is resumed from that
checkpoint. Every run must end with the same weights and optimizer state as the one-process run: the gradient
reduction (experts over the expert-data-parallel group, the rest by DDP or FSDP2) and the checkpoints (experts
gathered whole; re-sharded on load, optimizer state too). With gradient clipping by norm, both strategies clip
as one process does: by the norm of the whole model's gradient, every rank's experts included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import rendezvous_ports
from tolerance import fp_tolerance

SCRIPT = Path(__file__).with_name("ep_lightning_run.py")
TIMEOUT_S = 180
TOKENS_PER_STEP = 4 * 3  # the global batch of ep_lightning_run.py: 4 samples of 3 tokens


def start(ranks: int, steps: int, out_dir: Path, ckpt: Path | None = None, *args: str) -> subprocess.Popen:
    args = [sys.executable, str(SCRIPT), str(ranks), str(steps), str(out_dir), *args]
    args += ["--ckpt", str(ckpt)] if ckpt else []
    # runs go on at the same time: each its own rendezvous port (Lightning's own pick can repeat between them)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "MASTER_PORT": str(rendezvous_ports(1)[0])}
    # its own session: Lightning's launcher starts rank 1 as a child, and a timeout must end both; the output
    # to a file (a pipe nobody reads while the run is polled could fill and block it)
    log = open(f"{out_dir}.log", "w")
    try:
        return subprocess.Popen(args, env=env, cwd=SCRIPT.parent, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()


def kill_group(run: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (every rank) and wait until none of its processes is left."""
    try:
        os.killpg(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.wait()
    deadline = time.monotonic() + 10
    while group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for their parent do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def finish(*runs: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for run in runs:
            run.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for run in runs:
            if run.poll() is None:
                kill_group(run)
    for run in runs:
        assert run.returncode == 0, f"{' '.join(run.args[1:])} failed:\n{log_tail(run)}"


def log_tail(run: subprocess.Popen) -> str:
    return Path(f"{run.args[4]}.log").read_text()[-4000:]


def kill_after(run: subprocess.Popen, out_dir: Path, step: int) -> None:
    """Kill the run (all its ranks, SIGKILL) as soon as it reports ``step`` done (``--stall-after``)."""
    deadline = time.monotonic() + TIMEOUT_S
    progress = out_dir / "progress"
    try:
        while not (progress.exists() and int(progress.read_text()) >= step):
            assert run.poll() is None, f"the run to kill ended on its own:\n{log_tail(run)}"
            assert time.monotonic() < deadline, f"no step {step} within {TIMEOUT_S} s:\n{log_tail(run)}"
            time.sleep(0.05)
    finally:
        kill_group(run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_training")
    one, two = start(1, 6, root / "one"), start(2, 30, root / "two", None, "--stall-after", "3")
    try:
        kill_after(two, root / "two", 4)  # steps after 3 take a second more: killed after step 4
    finally:
        finish(one)
    assert two.returncode == -signal.SIGKILL and not group_alive(two.pid), "the killed run"
    assert (root / "two" / "step=3.ckpt").exists() and not (root / "two" / "step=6.ckpt").exists()
    finish(start(2, 6, root / "two_from_one", root / "one" / "step=3.ckpt"),
           start(1, 6, root / "one_from_two", root / "two" / "step=3.ckpt"),
           start(2, 6, root / "two_resumed", root / "two" / "step=3.ckpt"),
           start(2, 6, root / "fsdp_from_one", root / "one" / "step=3.ckpt", "--strategy", "fsdp"))
    return root


CLIP = 0.02  # below every step's gradient norm here: every step is clipped


@pytest.fixture(scope="module")
def clipped_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_clipping")
    for runs in (((1, "one", ()), (2, "two", ()), (2, "fsdp", ("--strategy", "fsdp"))),
                 # 4 ranks as a 2 x 2 mesh: experts over pairs, the pairs data parallel (FSDP2: HSDP, 2 replicas)
                 ((4, "ddp_2x2", ("--ep-size", "2")), (4, "fsdp_2x2", ("--strategy", "fsdp", "--ep-size", "2")))):
        finish(*(start(ranks, 3, root / name, None, "--clip", str(CLIP), *args) for ranks, name, args in runs))
    return root


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training(got: dict, want: dict, steps: int, where: str) -> None:
    tol = fp_tolerance(torch.float32, TOKENS_PER_STEP, layers=steps)
    assert got["global_step"] == want["global_step"] == steps, where
    assert got["state_dict"].keys() == want["state_dict"].keys(), where
    for key, tensor in want["state_dict"].items():  # experts whole: shapes are one process's
        torch.testing.assert_close(got["state_dict"][key], tensor, **tol, msg=lambda m: f"{where}: {key}\n{m}")
    got_state, want_state = got["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"]
    assert got_state.keys() == want_state.keys(), where
    for index, entry in want_state.items():
        torch.testing.assert_close(got_state[index]["momentum_buffer"], entry["momentum_buffer"], **tol,
                                   msg=lambda m: f"{where}: momentum of parameter {index}\n{m}")


def test_two_ranks_train_as_one_process(runs):
    assert_same_training(load(runs / "two" / "step=3.ckpt"), load(runs / "one" / "step=3.ckpt"), 3, "2 ranks")


def test_resume_across_settings(runs):
    want = load(runs / "one" / "step=6.ckpt")
    assert_same_training(load(runs / "two_from_one" / "step=6.ckpt"), want, 6, "2 ranks from a 1-process checkpoint")
    assert_same_training(load(runs / "one_from_two" / "step=6.ckpt"), want, 6, "1 process from a 2-rank checkpoint")


def test_resume_after_kill(runs):
    """Two ranks killed mid-training (SIGKILL of the process group after the step-3 checkpoint) and resumed
    from that checkpoint end where one uninterrupted process does."""
    assert_same_training(load(runs / "two_resumed" / "step=6.ckpt"), load(runs / "one" / "step=6.ckpt"), 6,
                         "2 ranks resumed after a kill")


def test_fsdp2_trains_as_one_process(runs):
    """ExpertParallelFSDPStrategy (Lightning's ModelParallelStrategy, FSDP2 for the dense parameters on CPU/gloo)
    resumed from the one-process checkpoint: its 3 steps and its checkpoint (one file, one process's keys and
    shapes) are one process's."""
    assert_same_training(load(runs / "fsdp_from_one" / "step=6.ckpt"), load(runs / "one" / "step=6.ckpt"), 6,
                         "2 ranks with FSDP2 from a 1-process checkpoint")


def test_two_rank_checkpoint_loads_in_one_process(runs):
    """The experts of a checkpoint saved by two ranks (DDP or FSDP2) are whole: a plain module loads it strictly."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ep_lightning_run import TinyMoEModule
    finally:
        sys.path.remove(str(SCRIPT.parent))
    for saved in (runs / "two" / "step=3.ckpt", runs / "fsdp_from_one" / "step=6.ckpt"):
        module = TinyMoEModule()
        module.load_state_dict(load(saved)["state_dict"], strict=True)
        assert module.moe.w_in.shape[0] == module.moe.num_experts, saved


def test_clipping_by_norm_counts_every_ranks_experts(clipped_runs, runs):
    """gradient_clip_val under both strategies: each rank holds half the experts, and the clip coefficient must
    come from the norm of the whole model's gradient, as one process computes it (each rank clipping by its own
    experts' norm would scale the ranks' gradients differently and end elsewhere)."""
    want = load(clipped_runs / "one" / "step=3.ckpt")
    unclipped = load(runs / "one" / "step=3.ckpt")["state_dict"]
    moved = {key: (want["state_dict"][key] - unclipped[key]).abs().max().item() for key in unclipped}
    assert max(moved.values()) > 1e-3, f"clipping at {CLIP} changed nothing: {moved}"
    assert_same_training(load(clipped_runs / "two" / "step=3.ckpt"), want, 3, "2 ranks, clipped")
    assert_same_training(load(clipped_runs / "fsdp" / "step=3.ckpt"), want, 3, "2 ranks with FSDP2, clipped")


def test_two_by_two_mesh_trains_as_one_process(clipped_runs):
    """4 ranks, experts sharded over pairs and the pairs data parallel (DDP, and FSDP2 as HSDP with 2 replicas),
    clipped by norm: one process's 3 steps, and a checkpoint in one process's shapes."""
    want = load(clipped_runs / "one" / "step=3.ckpt")
    assert_same_training(load(clipped_runs / "ddp_2x2" / "step=3.ckpt"), want, 3, "2 x 2 mesh, DDP, clipped")
    assert_same_training(load(clipped_runs / "fsdp_2x2" / "step=3.ckpt"), want, 3, "2 x 2 mesh, FSDP2 (HSDP), clipped")


def test_cli_fit_on_two_ranks_with_the_expert_parallel_strategy(tmp_path):
    """What a user types: ``moezoo-train fit --config training/configs/dit_moe_digits.yaml --trainer.devices 2
    --trainer.strategy expert_parallel`` (with clipping by norm), a few steps. Its checkpoint holds every expert
    whole (a one-process DiffusionModule loads it strictly, the EMA copy included) and exports to a zoo model."""
    from moezoo.training.cli import export_main
    from moezoo.training.diffusion import DiffusionModule
    from moezoo.zoo import create_model

    repo = Path(__file__).resolve().parents[2]
    args = [str(Path(sys.executable).with_name("moezoo-train")), "fit",
            "--config", str(repo / "training" / "configs" / "dit_moe_digits.yaml"),
            "--trainer.devices", "2", "--trainer.strategy", "expert_parallel", "--trainer.max_steps", "3",
            "--trainer.gradient_clip_val", "1.0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(rendezvous_ports(1)[0])}
    log = tmp_path / "fit.log"
    with open(log, "w") as out:
        run = subprocess.Popen(args, env=env, cwd=tmp_path, start_new_session=True, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        run.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if run.poll() is None:
            kill_group(run)
    assert run.returncode == 0, f"moezoo-train failed:\n{log.read_text()[-4000:]}"

    ckpt = tmp_path / "dit_moe_digits" / "checkpoints" / "last.ckpt"
    saved = load(ckpt)
    assert saved["global_step"] == 3
    module = DiffusionModule(model="dit_moe_digits")
    module.load_state_dict(saved["state_dict"], strict=True)  # shapes are one process's: experts gathered
    export_main([str(ckpt), str(tmp_path / "export")])
    model = create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, module.ema.state_dict()[name], rtol=0, atol=0, msg=name)
