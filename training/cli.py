"""The training command line: ``moezoo-train`` (LightningCLI) and ``moezoo-export``.

    moezoo-train fit --config training/configs/dit_moe_digits.yaml
    moezoo-train fit --config training/configs/dit_moe_digits.yaml --ckpt_path last.ckpt   # resume
    moezoo-train fit --print_config
    moezoo-export CHECKPOINT.ckpt OUT_DIR          # EMA weights -> model.safetensors + config.json

Any LightningModule / DataModule in moezoo.training can be chosen with ``--model`` / ``--data`` (class path
or name), so the same entry point trains every family.
"""

from __future__ import annotations

import argparse
import json

from lightning.pytorch.cli import LightningCLI

from .diffusion import DiffusionModule


def main(args=None) -> LightningCLI:
    """``moezoo-train``: fit / validate / test / predict, configured by YAML and flags."""
    import lightning.pytorch as pl

    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def export_main(argv=None) -> None:
    """``moezoo-export``: a training checkpoint (.ckpt) -> the zoo format, loadable with
    ``create_model("local-dir:OUT_DIR", pretrained=True)``."""
    parser = argparse.ArgumentParser(description="Export a moezoo training checkpoint to the zoo format.")
    parser.add_argument("checkpoint", help="a .ckpt written by moezoo-train")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--metadata", default="{}", help="JSON object stored in config.json (e.g. label names)")
    args = parser.parse_args(argv)
    module = DiffusionModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    path = module.export(args.out_dir, json.loads(args.metadata))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
