"""No code from checkpoints: a .ckpt whose pickle would run os.system is refused by every path that reads one
(moezoo-export, moezoo-train fit / validate / predict --ckpt_path, --ckpt_path last), and the file the payload
would create never appears. Legitimate checkpoints still load."""

import json
import os
import pathlib
from pathlib import Path

import pytest
import torch

from moezoo.training.checkpoints import UnsafeCheckpointError, load_checkpoint
from moezoo.training.cli import export_main, main

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2, "num_experts": 4}


class Payload:
    """Unpickling this calls os.system: the attack of issue 20."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    """(a Lightning-looking checkpoint whose hyper-parameters hold the payload, the file the payload creates)."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "hostile.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, "hyper_parameters": {
        "_class_path": "moezoo.training.diffusion.DiffusionModule", "model": "dit_moe_digits", "x": Payload(marker)}},
        path)
    return path, marker


def cli_args(subcommand: str, root: Path, *extra: str) -> list[str]:
    return [subcommand, "--config", str(CONFIGS / "dit_moe_digits.yaml"), "--model.init_args.model_args",
            json.dumps(TINY), "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_predict_batches", "1",
            "--data.init_args.batch_size", "4", *extra]


def test_load_checkpoint_refuses_the_payload_and_names_it(hostile):
    path, marker = hostile
    with pytest.raises(UnsafeCheckpointError, match=r"refusing checkpoint .*names posix\.system, which is code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_accepts_data_and_paths_and_explains_other_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 7, "state_dict": {"w": torch.ones(2)},
                "datamodule_hyper_parameters": {"root": pathlib.Path("/data/pictures")}}, good)
    loaded = load_checkpoint(good)
    assert loaded["global_step"] == 7 and loaded["datamodule_hyper_parameters"]["root"] == Path("/data/pictures")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_export_refuses_the_payload(hostile, tmp_path, capsys):
    path, marker = hostile
    with pytest.raises(SystemExit):
        export_main([str(path), str(tmp_path / "out")])
    assert "names posix.system" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_train_refuses_the_payload_as_ckpt_path(subcommand, hostile, tmp_path, capsys, monkeypatch):
    path, marker = hostile
    # Even with torch told to default to weights_only=False, nothing here relies on the default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit):
        main(cli_args(subcommand, tmp_path / "runs", "--ckpt_path", str(path)))
    assert "names posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_train_refuses_the_payload_as_the_runs_last_checkpoint(hostile, tmp_path, capsys):
    path, marker = hostile
    run_checkpoints = tmp_path / "runs" / "dit_moe_digits" / "checkpoints"
    run_checkpoints.mkdir(parents=True)
    path.rename(run_checkpoints / "last.ckpt")
    with pytest.raises(SystemExit):
        main(cli_args("fit", tmp_path / "runs", "--ckpt_path", "last"))
    assert "names posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_weights_only_false_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(cli_args("validate", tmp_path / "runs", "--weights_only", "false"))
    assert "--weights_only false is refused" in capsys.readouterr().err
