"""The training command line: ``moezoo-train`` (LightningCLI) and ``moezoo-export``.

    moezoo-train fit --config training/configs/dit_moe_digits.yaml
    moezoo-train fit --config training/configs/dit_moe_digits.yaml --ckpt_path last       # resume the run
    moezoo-train fit --config training/configs/dit_moe_digits.yaml --trainer.default_root_dir /data/runs
    moezoo-train fit --print_config
    moezoo-export runs/dit_moe_digits/checkpoints/last.ckpt OUT_DIR   # trained weights -> safetensors + config.json

Any LightningModule / DataModule in moezoo.training can be chosen with ``--model`` / ``--data`` (class path
or name), so the same entry point trains every family.

A run lives in ``<default_root_dir>/<run name>/`` (:mod:`moezoo.training.runs`): ``--trainer.default_root_dir``
is linked to the logger's ``save_dir``, so it moves logs, checkpoints, samples and exports together.
``--ckpt_path last`` resumes from that folder's ``checkpoints/last.ckpt`` (and starts a new run if there is
none yet); a fit without ``--ckpt_path`` in a folder that has one warns that it will replace it.

Checkpoints are read weights-only (:mod:`moezoo.training.checkpoints`): a ``.ckpt`` that would run code is
refused, and ``--weights_only false`` is not accepted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that LightningCLI's --model / --data also accept these classes by their short names.
from . import diffusion, fusion, restoration  # noqa: F401
from . import expert_parallel  # noqa: F401  (registers --trainer.strategy expert_parallel)
from .checkpoints import UnsafeCheckpointError, load_checkpoint, safe_checkpoint_globals
from .datamodules import fusion_pairs, images, video, weather  # noqa: F401
from .runs import RunCheckpoint

# Values of --ckpt_path that Lightning resolves itself (not file paths).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def main(args=None) -> None:
    """``moezoo-train``: fit / validate / test / predict, configured by YAML and flags."""
    build_cli(args)


def build_cli(args=None, run: bool = True) -> LightningCLI:
    """The CLI behind ``moezoo-train`` (``run=False``: parse and instantiate only, for tests)."""
    import lightning.pytorch as pl

    # Lightning reads --ckpt_path's hyper-parameters while parsing, and the trainer loads it in the subcommand:
    # both weights-only, with our few safe types allowed.
    with safe_checkpoint_globals():
        return MoezooCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def _runs_folder(default_root_dir: str | None) -> str:
    return default_root_dir or os.getcwd()  # the Trainer's own default


class MoezooCLI(LightningCLI):
    """LightningCLI with one folder per run, weights-only checkpoints and ``--ckpt_path last`` for that folder."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir",
                              compute_fn=_runs_folder)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            parser.error("--weights_only false is refused: moezoo-train reads checkpoints weights-only, so a "
                         "checkpoint cannot run code (moezoo.training.checkpoints)")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            self._check_checkpoint(ckpt_path)

    def _check_checkpoint(self, path) -> None:
        try:
            load_checkpoint(path)
        except (OSError, ValueError, UnsafeCheckpointError) as error:
            self.parser.error(f"--ckpt_path: {error}")

    def _prepare_run(self) -> None:
        """Before the subcommand runs: resolve ``--ckpt_path last`` to this run's checkpoint, warn before a new
        fit replaces an existing one, and make the trainer load weights-only."""
        config = self.config_init[self.subcommand]
        run_checkpoints = [c for c in self.trainer.callbacks if isinstance(c, RunCheckpoint)]
        existing = run_checkpoints[0].path(self.trainer) if run_checkpoints else None
        if existing is not None and config.get("ckpt_path") == "last":
            if existing.is_file():
                self._check_checkpoint(existing)
                config["ckpt_path"] = str(existing)
            else:
                print(f"--ckpt_path last: no checkpoint at {existing} yet; starting a new run there", flush=True)
                config["ckpt_path"] = None
        elif (self.subcommand == "fit" and config.get("ckpt_path") is None and existing is not None
              and existing.is_file()):
            warnings.warn(f"{existing} exists and this fit starts from step 0: its first save replaces it. To "
                          "continue that run instead, pass --ckpt_path last; to keep both, give this run another "
                          "name (--trainer.logger.init_args.name) or --trainer.default_root_dir", stacklevel=1)
        config["weights_only"] = True

    def before_fit(self) -> None:
        self._prepare_run()

    def before_validate(self) -> None:
        self._prepare_run()

    def before_test(self) -> None:
        self._prepare_run()

    def before_predict(self) -> None:
        self._prepare_run()


def export_main(argv=None) -> None:
    """``moezoo-export``: a training checkpoint (.ckpt) -> the zoo format, loadable with
    ``create_model("local-dir:OUT_DIR", pretrained=True)``."""
    parser = argparse.ArgumentParser(description="Export a moezoo training checkpoint to the zoo format.")
    parser.add_argument("checkpoint", help="a .ckpt written by moezoo-train")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--metadata", default="{}", help="JSON object stored in config.json (e.g. label names)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    args = parser.parse_args(argv)
    try:
        metadata = json.loads(args.metadata)
    except json.JSONDecodeError as error:
        parser.error(f"--metadata must be a JSON object: {error}")
    if not isinstance(metadata, dict):
        parser.error(f"--metadata must be a JSON object, got {args.metadata!r}")
    try:
        cls = module_class(args.checkpoint)
    except (OSError, ValueError, UnsafeCheckpointError) as error:
        parser.error(str(error))
    with safe_checkpoint_globals():
        module = cls.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
    path = module.export(args.out_dir, metadata, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {path}")


def module_class(checkpoint: str | Path) -> type:
    """The LightningModule class that wrote ``checkpoint``: LightningCLI records its class path in the
    hyperparameters; checkpoints without one are DiffusionModule's. The checkpoint is read weights-only, and
    only moezoo's training modules are imported (a class path names code to run)."""
    hparams = load_checkpoint(checkpoint).get("hyper_parameters", {})
    path = hparams.get("_class_path", "moezoo.training.diffusion.DiffusionModule")
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("moezoo.training."):
        raise ValueError(f"{checkpoint} was written by {path}; moezoo-export reads checkpoints of moezoo.training "
                         "modules that can export (DiffusionModule, FusionModule, RestorationModule)")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not hasattr(cls, "export"):
        raise ValueError(f"{path} has no export(); moezoo-export needs a module that can write the zoo format")
    return cls


if __name__ == "__main__":
    main()
