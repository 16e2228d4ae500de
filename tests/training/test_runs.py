"""One resumable folder per run: when RunCheckpoint saves, what RunLogger keeps on resume, the progress lines,
the best validation's weights kept for the end (BestWeights, with and without early stopping),
--trainer.default_root_dir, the shipped configs and their headers, and real kills: SIGKILL then resume, SIGTERM
then resume, in subprocesses running moezoo-train on a tiny model."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.demos.boring_classes import BoringModel

from moezoo.training.callbacks import BestWeights, ProgressLog
from moezoo.training.checkpoints import load_checkpoint
from moezoo.training.cli import main
from moezoo.training.runs import RunCheckpoint, RunLogger

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2, "num_experts": 4}


def boring_trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, logger=RunLogger("run", save_dir=root, flush_logs_every_n_steps=1),
                      callbacks=callbacks, enable_model_summary=False, log_every_n_steps=1, **kwargs)


def saved_step(path: Path) -> int | None:
    return load_checkpoint(path)["global_step"] if path.is_file() else None


class SavedStepSpy(pl.Callback):
    """At the start of each training batch: the step of the run's last.ckpt, i.e. what the steps before saved."""

    def __init__(self):
        self.seen: dict[int, int | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = saved_step(trainer.checkpoint_callback.path(trainer))


def test_run_checkpoint_saves_every_n_steps_after_validation_and_at_the_end(tmp_path):
    spy = SavedStepSpy()
    trainer = boring_trainer(tmp_path, [RunCheckpoint(every_n_train_steps=3), spy], max_steps=8,
                             limit_train_batches=5, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(BoringModel())
    # Saves after steps 3 and 6 (every 3), 5 (the validation closing epoch 0) and 8 (the end).
    assert spy.seen == {0: None, 1: None, 2: None, 3: 3, 4: 3, 5: 5, 6: 6, 7: 6}
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert saved_step(last) == 8
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


def metric_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_run_logger_continues_metrics_and_replaces_the_steps_trained_again(tmp_path):
    first = RunLogger("run", save_dir=tmp_path)
    for step in range(6):
        first.log_metrics({"loss": 10.0 - step}, step=step)
    first.save()
    assert first.log_dir == str(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", "a") as file:
        file.write("3")  # a row cut short by a SIGKILL during the write
    # A resumed attempt restarts at step 4 and logs a new metric too: steps 4 and 5 are replaced, not repeated.
    second = RunLogger("run", save_dir=tmp_path)
    for step in (4, 5, 6):
        second.log_metrics({"loss": 1.0 * step, "lr": 0.5}, step=step)
    second.save()
    rows = metric_rows(tmp_path / "run" / "metrics.csv")
    assert [(int(r["step"]), float(r["loss"]), r["lr"]) for r in rows] == [
        (0, 10.0, ""), (1, 9.0, ""), (2, 8.0, ""), (3, 7.0, ""), (4, 4.0, "0.5"), (5, 5.0, "0.5"), (6, 6.0, "0.5")]
    with pytest.raises(ValueError, match="one folder name"):
        RunLogger("../elsewhere")


def test_progress_log_prints_steps_and_validations_as_lines(tmp_path, capsys):
    trainer = boring_trainer(tmp_path, [ProgressLog(every_n_steps=2), RunCheckpoint(0)], max_steps=6,
                             limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(BoringModel())
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if line.startswith("step") and "(validation)" not in line]
    assert [line.split()[1] for line in train] == ["2/6", "4/6", "6/6"]
    assert all(re.search(r"\d+\.\d\d it/s  elapsed \d+:\d\d:\d\d  left \d+:\d\d:\d\d$", line) for line in train)
    assert "step 4/6  epoch 0  (validation)" in lines  # the validation closing epoch 0 (4 batches)
    assert lines[0] == "training from step 0 to step 6" and lines[-1].startswith("training done at step 6")


class ScriptedScores(BoringModel):
    """Logs the next of ``scores`` as "val/score" at each validation and keeps a copy of its weights there."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.weights_at_validation = list(scores), []

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.log("val/score", self.scores[len(self.weights_at_validation)])
            self.weights_at_validation.append({k: v.clone() for k, v in self.state_dict().items()})


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("mode, best", [("max", 1), ("min", 3)])
def test_best_weights_puts_back_the_best_validation_at_the_end(tmp_path, mode, best):
    model = ScriptedScores([1.0, 3.0, 2.0, 0.5])
    keep = BestWeights(monitor="val/score", mode=mode)
    trainer = boring_trainer(tmp_path, [keep, RunCheckpoint(0)], max_steps=8, limit_train_batches=2,
                             limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model)
    assert len(model.weights_at_validation) == 4
    assert not torch.equal(model.weights_at_validation[1]["layer.weight"], model.weights_at_validation[3]["layer.weight"])
    assert_same_weights(model.state_dict(), model.weights_at_validation[best])
    assert keep.best_step == 2 * (best + 1) and keep.best_score == model.scores[best]
    # last.ckpt (saved before fit ends) has the last weights and carries the best ones for a resumed run
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_same_weights(ckpt["state_dict"], model.weights_at_validation[3])
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("BestWeights"))
    assert state["best_step"] == keep.best_step
    assert_same_weights(state["weights"], model.weights_at_validation[best])
    resumed = BestWeights(monitor="val/score", mode=mode)
    resumed.load_state_dict(state)
    assert resumed.best_score == keep.best_score


def test_best_weights_with_early_stopping_exports_the_best_not_the_last(tmp_path):
    model = ScriptedScores([1.0, 3.0, 2.0, 2.5, 2.9, 4.0])
    trainer = boring_trainer(tmp_path, [EarlyStopping("val/score", mode="max", patience=3),
                                        BestWeights("val/score", mode="max")],
                             max_steps=12, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model)
    assert len(model.weights_at_validation) == 5  # stopped 3 validations after the best, before the 4.0
    assert_same_weights(model.state_dict(), model.weights_at_validation[1])


def test_best_weights_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="'max' or 'min'"):
        BestWeights(mode="highest")
    trainer = boring_trainer(tmp_path, [BestWeights(monitor="val/psnr")], max_steps=2, limit_train_batches=2,
                             limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.raises(KeyError, match="'val/psnr', which the module did not log; logged: val/score"):
        trainer.fit(ScriptedScores([1.0]))


def test_default_root_dir_moves_logs_checkpoints_and_export(tmp_path, monkeypatch, capsys):
    workdir, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    args = ["fit", "--config", str(CONFIGS / "moe_fusion_irvis.yaml"), "--model.init_args.model", "test_moe_fusion",
            "--trainer.default_root_dir", str(elsewhere), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_model_summary", "false", "--data.init_args.image_size", "16",
            "--data.init_args.num_train_samples", "8", "--data.init_args.num_val_samples", "2",
            "--data.init_args.batch_size", "4"]
    main([*args, "--ckpt_path", "last"])  # nothing to resume yet: a new run
    run = elsewhere / "moe_fusion_irvis"
    out = capsys.readouterr().out
    assert f"--ckpt_path last: no checkpoint at {run / 'checkpoints' / 'last.ckpt'} yet" in out
    assert f"exported test_moe_fusion to {run / 'export'}" in out
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in elsewhere.iterdir()) == ["moe_fusion_irvis"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "export", "hparams.yaml",
                                                    "metrics.csv"]
    assert (run / "export" / "model.safetensors").is_file() and saved_step(run / "checkpoints" / "last.ckpt") == 2
    with pytest.warns(UserWarning, match="exists and this fit starts from step 0: its first save replaces it"):
        main(args)


def header_commands(config: Path) -> list[str]:
    return [line.removeprefix("#").strip() for line in config.read_text().splitlines()
            if line.startswith("#   moezoo-")]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_has_a_resumable_run_folder_and_its_header_says_how(config):
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    trainer, name = cfg["trainer"], config.removesuffix(".yaml")
    assert trainer["logger"]["class_path"] == "moezoo.training.runs.RunLogger"
    assert "save_dir" not in trainer["logger"]["init_args"]  # it comes from default_root_dir
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert callbacks["moezoo.training.runs.RunCheckpoint"]["every_n_train_steps"] > 0
    assert "moezoo.training.callbacks.ProgressLog" in callbacks
    assert "lightning.pytorch.callbacks.ModelCheckpoint" not in callbacks
    export_dir = cfg["model"]["init_args"].get("export_dir")
    assert export_dir in (None, "export")  # relative: it moves with the run
    # The header's commands name this file and the folder the config really writes to.
    run = f"{trainer['default_root_dir']}/{trainer['logger']['init_args']['name']}"
    assert run == f"runs/{name}"
    commands = header_commands(CONFIGS / config)
    resume = [c for c in commands if "--ckpt_path" in c]
    assert resume == [f"moezoo-train fit --config training/configs/{config} --ckpt_path {run}/checkpoints/last.ckpt"]
    for command in commands:
        for path in re.findall(r"runs/\S+", command):
            assert path.startswith(f"{run}/"), (command, path)


# ----------------------------------------------------------------------------------------------------------
# Real kills: moezoo-train in a subprocess on the digits config with a tiny model
# ----------------------------------------------------------------------------------------------------------


def digits_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "dit_moe_digits.yaml"), "--model.init_args.model_args", json.dumps(TINY),
            "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.flush_logs_every_n_steps", "1",
            "--data.init_args.batch_size", "8", *extra]


def start_training(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "moezoo.training.cli", *digits_args(root, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def read_until_step(process: subprocess.Popen, step: int, timeout: float = 90.0) -> list[str]:
    """The child's stdout lines up to its progress line for ``step``."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(f"step {step}/"):
            return lines
    process.kill()
    raise AssertionError(f"no progress line for step {step}; output: {lines}")


def train_steps(run: Path) -> list[int]:
    return [int(row["step"]) for row in metric_rows(run / "metrics.csv") if row.get("train/loss")]


def test_sigkill_then_resume_continues_from_the_saved_step_in_the_same_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    # 4 batches per epoch and a validation after each: checkpoints at steps 4, 8, ... and nothing in between.
    validate_often = ("--trainer.max_steps", "1000", "--trainer.check_val_every_n_epoch", "1",
                      "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1")
    child = start_training(root, *validate_often)
    read_until_step(child, 6)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    run = root / "dit_moe_digits"
    last = run / "checkpoints" / "last.ckpt"
    saved = saved_step(last)
    assert saved is not None and saved >= 4 and saved % 4 == 0, saved

    capsys.readouterr()
    main(digits_args(root, *validate_often[2:], "--trainer.max_steps", str(saved + 3), "--ckpt_path", str(last)))
    out = capsys.readouterr().out
    assert f"training from step {saved} to step {saved + 3}" in out
    assert saved_step(last) == saved + 3
    assert sorted(p.name for p in root.iterdir()) == ["dit_moe_digits"]  # the same folder, no version_N
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    # metrics.csv holds the killed attempt's steps before the checkpoint and the resumed ones after, once each.
    assert train_steps(run) == list(range(saved + 3))


def test_sigterm_saves_exits_cleanly_and_last_resumes(tmp_path, capsys):
    root = tmp_path / "runs"
    child = start_training(root, "--trainer.max_steps", "1000")  # first regular save would be at step 250
    read_until_step(child, 3)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    last = root / "dit_moe_digits" / "checkpoints" / "last.ckpt"
    saved = saved_step(last)
    assert 3 <= saved < 250
    assert f"SIGTERM: saved step {saved} to {last}" in out

    capsys.readouterr()
    main(digits_args(root, "--trainer.max_steps", str(saved + 2), "--ckpt_path", "last"))
    assert f"training from step {saved} to step {saved + 2}" in capsys.readouterr().out
    assert saved_step(last) == saved + 2
