"""The training command line: ``moezoo-train`` (LightningCLI) and ``moezoo-export``.

    moezoo-train fit --config training/configs/dit_moe_digits.yaml
    moezoo-train fit --config training/configs/dit_moe_digits.yaml --ckpt_path last.ckpt   # resume
    moezoo-train fit --print_config
    moezoo-export CHECKPOINT.ckpt OUT_DIR          # trained weights -> model.safetensors + config.json

Any LightningModule / DataModule in moezoo.training can be chosen with ``--model`` / ``--data`` (class path
or name), so the same entry point trains every family.
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from lightning.pytorch.cli import LightningCLI

# Imported so that LightningCLI's --model / --data also accept these classes by their short names.
from . import diffusion, fusion, restoration  # noqa: F401
from .datamodules import fusion_pairs, images, video, weather  # noqa: F401


def main(args=None) -> None:
    """``moezoo-train``: fit / validate / test / predict, configured by YAML and flags."""
    build_cli(args)


def build_cli(args=None, run: bool = True) -> LightningCLI:
    """The LightningCLI behind ``moezoo-train`` (``run=False``: parse and instantiate only, for tests)."""
    import lightning.pytorch as pl

    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


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
    module = module_class(args.checkpoint).load_from_checkpoint(args.checkpoint, map_location="cpu")
    path = module.export(args.out_dir, metadata, dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {path}")


def module_class(checkpoint: str) -> type:
    """The LightningModule class that wrote ``checkpoint``: LightningCLI records its class path in the
    hyperparameters; checkpoints without one are DiffusionModule's. Only moezoo's training modules are
    imported (a class path is code to run, and the checkpoint is a pickle of our own making)."""
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters", {})
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
