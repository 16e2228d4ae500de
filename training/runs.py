"""One folder per training run, which a killed run resumes in.

With the shipped configs everything of a run goes to ``<default_root_dir>/<run name>/``::

    metrics.csv  hparams.yaml  config.yaml      RunLogger (CSV) and LightningCLI
    checkpoints/last.ckpt                        RunCheckpoint: the state to resume from
    samples/  export/                            SampleGrid; export_dir of the fusion and restoration modules

``--trainer.default_root_dir`` moves all of it (the CLI links it to the logger's ``save_dir``), and a run resumed
with ``--ckpt_path <run folder>/checkpoints/last.ckpt`` (or ``--ckpt_path last``) writes to the same folder:
there is no ``version_N``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .common import run_path

__all__ = ["RunLogger", "RunCheckpoint"]


class _ContinuedMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted.

    The first rows this process writes start at the step training resumed from; rows of the earlier attempt at
    that step or later were trained again, so they are dropped then (a checkpoint is older than the rows
    flushed after it), and so is a last row cut short by a kill."""

    def _check_log_dir_exists(self) -> None:  # Lightning's writer deletes an existing metrics.csv here
        self.earlier_rows: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self.earlier_rows = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def save(self) -> None:
        if self.earlier_rows is not None and self.metrics:
            first_step = min(row["step"] for row in self.metrics)
            kept = [row for row in self.earlier_rows if _step(row) < first_step]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self.earlier_rows = None
        super().save()


def _step(row: dict) -> float:
    """A metrics.csv row's step; a row cut short by a kill during its write has none and counts as the newest."""
    try:
        return float(row["step"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


class RunLogger(CSVLogger):
    """CSV logs in the run's folder ``<save_dir>/<name>/`` itself (no ``version_N`` subfolder), continued by a
    resumed run: ``metrics.csv`` keeps the earlier rows. ``moezoo-train`` sets ``save_dir`` from
    ``--trainer.default_root_dir``.

    Args:
        name: the run's name: its folder under ``save_dir``.
        save_dir: the folder that holds runs.
        flush_logs_every_n_steps: write buffered metrics to ``metrics.csv`` every this many steps.
    """

    def __init__(self, name: str, save_dir: str | Path = ".", flush_logs_every_n_steps: int = 100):
        if not name or Path(name).name != name:
            raise ValueError(f"a run name is one folder name (no '/' or '..'), got {name!r}")
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _ContinuedMetricsWriter(log_dir=self.log_dir)
        return self._experiment


class RunCheckpoint(Checkpoint):
    """Keeps ``<run folder>/checkpoints/last.ckpt`` current, so that a run killed at any moment (even with
    SIGKILL) resumes from its last save: every ``every_n_train_steps`` optimizer steps, after every validation
    of a fit, when the fit ends, and on SIGTERM (Lightning stops after the current batch; this saves, and the
    process then exits with status 0).

    Each save writes a temporary file and renames it over ``last.ckpt``, so a kill during a save leaves the
    previous checkpoint whole.

    Args:
        every_n_train_steps: save every this many optimizer steps (0: only at validations, the end and SIGTERM).
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int = 500):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None

    def path(self, trainer: pl.Trainer) -> Path:
        """Where the run's checkpoint is: ``<run folder>/checkpoints/last.ckpt``."""
        return run_path(trainer, "checkpoints") / self.FILENAME

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the trainer's state to :meth:`path` (once per optimizer step)."""
        path = self.path(trainer)
        if self._saved_step == trainer.global_step and path.is_file():
            return path
        partial = path.with_name(path.name + ".partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the whole training state, not only weights
        if trainer.is_global_zero:
            os.replace(partial, path)
        trainer.strategy.barrier()
        self._saved_step = trainer.global_step
        return path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_train_steps
        if every and trainer.global_step % every == 0:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        # Only SIGTERM: Lightning raises it between two batches, where the state is whole. Other exceptions can
        # come from inside a step (a half-applied optimizer update), and the last regular save is the safer one.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            path = self.save(trainer)
            if trainer.is_global_zero:
                print(f"SIGTERM: saved step {trainer.global_step} to {path}; resume with --ckpt_path {path}",
                      flush=True)
