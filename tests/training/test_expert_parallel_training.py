"""ExpertParallelStrategy (moezoo.training.expert_parallel) against Lightning in one process.

A tiny MoE model (``ep_lightning_run.py``) is trained for 3 + 3 steps of SGD with momentum: in one process, on
two CPU ranks with the experts sharded (DDP for the rest), and resumed across the two: from the one-process
checkpoint on two ranks, from the two-rank checkpoint in one process. Every run must end with the same weights
and optimizer state as the one-process run: the gradient reduction (experts over the expert-data-parallel
group, the rest by DDP) and the checkpoints (experts gathered whole; re-sharded on load, optimizer state too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tolerance import fp_tolerance

SCRIPT = Path(__file__).with_name("ep_lightning_run.py")
TIMEOUT_S = 180
TOKENS_PER_STEP = 4 * 3  # the global batch of ep_lightning_run.py: 4 samples of 3 tokens


def start(ranks: int, steps: int, out_dir: Path, ckpt: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, str(SCRIPT), str(ranks), str(steps), str(out_dir)] + ([str(ckpt)] if ckpt else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # its own session: Lightning's launcher starts rank 1 as a child, and a timeout must end both
    return subprocess.Popen(args, env=env, cwd=SCRIPT.parent, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(*runs: subprocess.Popen) -> None:
    try:
        outputs = [run.communicate(timeout=TIMEOUT_S)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, f"{' '.join(run.args[1:])} failed:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_training")
    finish(start(1, 6, root / "one"), start(2, 3, root / "two"))
    finish(start(2, 6, root / "two_from_one", root / "one" / "step=3.ckpt"),
           start(1, 6, root / "one_from_two", root / "two" / "step=3.ckpt"))
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


def test_two_rank_checkpoint_loads_in_one_process(runs):
    """The experts of a checkpoint saved by two ranks are whole: a plain module loads it strictly."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ep_lightning_run import TinyMoEModule
    finally:
        sys.path.remove(str(SCRIPT.parent))
    module = TinyMoEModule()
    module.load_state_dict(load(runs / "two" / "step=3.ckpt")["state_dict"], strict=True)
    assert module.moe.w_in.shape[0] == module.moe.num_experts
