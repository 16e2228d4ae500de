"""Callbacks: training progress as plain lines, a sample grid saved while a diffusion model trains, and the
weights of the best validation kept for the end of fit."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress import ProgressBar
from torchvision.utils import make_grid, save_image

from moezoo.zoo.layers import routed_blocks


class ProgressLog(ProgressBar):
    """Training progress as one plain line every ``every_n_steps`` optimizer steps and one after each
    validation, on stdout (rank zero), e.g.::

        step 250/3000  epoch 9  train/loss 0.4121  4.12 it/s  elapsed 0:01:01  left 0:11:08
        step 260/3000  epoch 9  val/loss 0.3987  (validation)

    Lines instead of a redrawn bar, so the same progress shows in a terminal and in a log file, a pipe or CI:
    Lightning's bars show nothing until the end when stdout is not a terminal, and count epochs as "1/-2" in
    runs bounded by ``max_steps``. This is the Trainer's progress bar: it replaces the default one, so it cannot
    be combined with ``enable_progress_bar=False`` (drop it from the callbacks instead).

    Args:
        every_n_steps: steps between two lines; None: the Trainer's ``log_every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start_time = self._start_step = self._printed_step = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._start_time, self._start_step = time.monotonic(), trainer.global_step
        total = self._total(trainer)
        end = f" to step {int(total)}" if math.isfinite(total) else ""
        self._line(trainer, f"training from step {trainer.global_step}{end}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        # Once per optimizer step (with gradient accumulation several batches end on the same step).
        if trainer.global_step % every == 0 and trainer.global_step != self._printed_step:
            self._printed_step = trainer.global_step
            self._line(trainer, self._progress(trainer, "train/"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._line(trainer, self._progress(trainer, "val/", rate=False) + "  (validation)")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._line(trainer, f"training done at step {trainer.global_step}, elapsed {self._clock(self._elapsed())}")

    def _line(self, trainer: pl.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, flush=True)

    def _progress(self, trainer: pl.Trainer, metric_prefix: str, rate: bool = True) -> str:
        step, total = trainer.global_step, self._total(trainer)
        parts = [f"step {step}{self._of_total(trainer)}", f"epoch {trainer.current_epoch}"]
        parts += [f"{name} {float(value):.4g}" for name, value in sorted(trainer.progress_bar_metrics.items())
                  if name.startswith(metric_prefix)]
        done, elapsed = step - self._start_step, self._elapsed()
        if rate and done > 0 and elapsed > 0:
            parts.append(f"{done / elapsed:.2f} it/s")
            parts.append(f"elapsed {self._clock(elapsed)}")
            if math.isfinite(total):
                parts.append(f"left {self._clock((total - step) * elapsed / done)}")
        return "  ".join(parts)

    @staticmethod
    def _total(trainer: pl.Trainer) -> float:
        """The step the run ends at, by max_steps or max_epochs (inf when neither bounds it)."""
        total = trainer.estimated_stepping_batches
        return total if total > 0 else math.inf

    def _of_total(self, trainer: pl.Trainer) -> str:
        total = self._total(trainer)
        return f"/{int(total)}" if math.isfinite(total) else ""

    def _elapsed(self) -> float:
        return time.monotonic() - self._start_time if self._start_time is not None else 0.0

    @staticmethod
    def _clock(seconds: float) -> str:
        return str(datetime.timedelta(seconds=round(seconds)))


class BestWeights(pl.Callback):
    """Keeps a copy of the module's weights (all of its state, EMA included) at its best validation score and
    puts them back when fitting ends, before the module's own ``on_fit_end`` exports them.

    Early stopping's partner: Lightning's ``EarlyStopping`` ends a run some validations after the best one, and
    a cosine schedule's last steps may also be worse than an earlier point; with this callback what is exported
    is what validated best, not what came after. The copy travels in checkpoints (``state_dict``), so a resumed
    run still knows its best. It costs one copy of the weights in memory and in each checkpoint.

    Args:
        monitor: the logged metric to follow, e.g. "val/psnr".
        mode: "max" (higher is better) or "min".
    """

    def __init__(self, monitor: str = "val/psnr", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"BestWeights follows {self.monitor!r}, which the module did not log; logged: "
                           f"{', '.join(sorted(trainer.callback_metrics)) or 'nothing'}")
        score = float(trainer.callback_metrics[self.monitor])
        if math.isfinite(score) and self._better(score):
            self.best_score, self.best_step = score, trainer.global_step
            self.weights = {name: value.detach().to("cpu", copy=True) for name, value in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.weights is None:
            return
        pl_module.load_state_dict(self.weights)
        if trainer.is_global_zero:
            print(f"restored the weights of step {self.best_step}, the best {self.monitor} ({self.best_score:.4f})")

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score, self.best_step = state_dict["best_score"], state_dict["best_step"]
        self.weights = state_dict["weights"]


class SampleGrid(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_samples`` images with the EMA weights and save
    them as one PNG grid in ``<log_dir>/samples/epoch=NNN.png``.

    Class models draw the classes in turn; text models draw the first captions of the validation set.

    Args:
        every_n_epochs: how often (in validation epochs).
        num_samples: images in the grid.
        num_inference_steps: sampling steps.
        guidance_scale: classifier-free guidance scale.
        seed: the noise seed (the same noise every time, so grids are comparable across epochs).
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 20, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0, seed: int = 0):
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples
        self.num_inference_steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # every rank asks: trainer.log_dir is a broadcast from rank 0, which waits for all of them
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        # Experts sharded over ranks (ExpertParallelStrategy) compute only when every rank calls them: then every
        # rank samples the same grid, and rank 0 saves it.
        sharded = any(getattr(block, "expert_parallel", False) for _, block in routed_blocks(pl_module))
        if not (trainer.is_global_zero or sharded):
            return
        images = self.sample(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"epoch={trainer.current_epoch:03d}.png"
        save_image(make_grid(images, nrow=min(10, len(images)), padding=1), self.last_path)

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module) -> torch.Tensor:
        model = pl_module.sampling_model
        pipe = pl_module.pipeline()
        generator = torch.Generator().manual_seed(self.seed)
        kwargs = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                      generator=generator, output_type="pt")
        was_training = model.training
        try:
            if model.config.num_classes:
                labels = [i % model.config.num_classes for i in range(self.num_samples)]
                return pipe(class_labels=labels, **kwargs).images
            captions = _validation_captions(trainer, self.num_samples)
            return pipe(prompt=captions, **kwargs).images
        finally:
            model.train(was_training)


def _validation_captions(trainer: pl.Trainer, count: int) -> list[str]:
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "val_set", None)
    if dataset is None:
        raise RuntimeError("SampleGrid on a text model needs a DataModule with a val_set of captioned images")
    captions = [dataset[i]["caption"] for i in range(min(count, len(dataset)))]
    return captions
