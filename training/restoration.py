"""RestorationModule: trains any zoo image-restoration model (MoFME and its baselines) with Lightning.

One training step: take a batch of :mod:`moezoo.training.datamodules.weather` (``input`` degraded,
``target`` clean, both in [0, 1]), restore, and minimise the pixel loss plus the model's MoE auxiliary losses.
Optionally keep an exponential moving average of the weights; the EMA (if any) is what is validated and
exported.

Logged: ``train/loss`` (pixel), ``train/aux_loss``, per MoE layer the busiest expert's share and the load's
coefficient of variation (``expert_load/...``, as DiffusionModule), and on validation PSNR and SSIM
(torchmetrics, on outputs clamped to [0, 1]) overall (``val/psnr``, ``val/ssim``) and per weather type
(``val/psnr/<weather>``, for batches that carry a known weather index), and ``val/psnr_input``: the PSNR of
the degraded inputs themselves, the score of doing nothing, which a restoration must beat.

With ``export_dir`` set, the end of ``fit`` writes the zoo format there (``model.safetensors`` +
``config.json`` via :func:`moezoo.zoo.save_pretrained`), so one ``moezoo-train fit --config ...`` both trains
and exports.

The pixel loss is L1 by default; the official MoFME adds 0.04 x a VGG16 perceptual loss, left out here (it
needs ImageNet weights and does not help PSNR, which is what we compare).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from moezoo.zoo import create_model, save_pretrained

from .common import adamw, export_when_fit_ends, log_training_losses, update_ema, warmup_cosine_scheduler
from .datasets.weather import WEATHER_TYPES

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}
SCHEDULES = ("constant", "cosine")


class RestorationModule(pl.LightningModule):
    """An image-restoration model from the zoo, trained on (degraded, clean) pairs.

    Args:
        model: a registered model name, e.g. "mofme_weather", "mofme_conventional_weather", "mofme_dense_weather".
        model_args: constructor overrides (e.g. {"num_experts": 16, "top_k": 4}).
        loss: pixel loss, "l1", "mse" or "smooth_l1".
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_schedule: "cosine" (to 0 at the last step, as the official MoFME) or "constant" after warm-up.
        ema_decay: EMA decay per step (0: no EMA, the raw weights are validated and exported).
        log_expert_load_every: log expert load every this many steps (0: never).
        weather_types: names of the ``weather`` indices in batches, for per-type validation metrics.
        export_dir: if set, export the (EMA) weights there at the end of fit (a relative path is inside the run's
            folder, ``<default_root_dir>/<run name>/`` with the shipped configs).
        export_dtype: "float32" or "float16" for the exported floating tensors.
        export_metadata: extra metadata stored in the export's config.json.
    """

    def __init__(
        self,
        model: str = "mofme_weather",
        model_args: dict | None = None,
        loss: str = "l1",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
        ema_decay: float = 0.0,
        log_expert_load_every: int = 50,
        weather_types: Sequence[str] = WEATHER_TYPES,
        export_dir: str | None = None,
        export_dtype: str = "float32",
        export_metadata: dict | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; accepted: {', '.join(LOSSES)}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if export_dtype not in ("float32", "float16"):
            raise ValueError(f"export_dtype must be 'float32' or 'float16', got {export_dtype!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.save_hyperparameters()
        self.model_name, self.model_args = model, dict(model_args or {})
        self.model = create_model(model, **self.model_args)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if ema_decay > 0 else None
        self.weather_types = tuple(weather_types)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNRs
        self.val_psnr_input = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_by_weather = nn.ModuleList(
            PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for _ in self.weather_types
        )

    @property
    def restoration_model(self) -> nn.Module:
        """The weights to validate and export: the EMA if there is one."""
        return self.ema if self.ema is not None else self.model

    def training_step(self, batch, batch_idx):
        restored = self.model(batch["input"])
        loss = LOSSES[self.hparams.loss](restored, batch["target"])
        aux_loss = self.model.aux_loss()
        batch_size = batch["input"].shape[0]
        return log_training_losses(self, loss, aux_loss, batch_size)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            update_ema(self.ema, self.model, self.hparams.ema_decay)

    def validation_step(self, batch, batch_idx):
        restored = self.restoration_model(batch["input"]).clamp(0, 1)
        target = batch["target"]
        self.val_psnr.update(restored, target)
        self.val_psnr_input.update(batch["input"], target)
        self.val_ssim.update(restored, target)
        for index, metric in enumerate(self.val_psnr_by_weather):
            chosen = batch["weather"] == index
            if bool(chosen.any()):
                metric.update(restored[chosen], target[chosen])

    def on_validation_epoch_end(self):
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/psnr_input", self.val_psnr_input.compute())
        self.val_psnr_input.reset()
        self.log("val/ssim", self.val_ssim.compute())
        self.val_psnr.reset()
        self.val_ssim.reset()
        for name, metric in zip(self.weather_types, self.val_psnr_by_weather):
            if metric.update_called:
                self.log(f"val/psnr/{name}", metric.compute())
            metric.reset()

    def configure_optimizers(self):
        optimizer = adamw(self.model.parameters(), lr=self.hparams.learning_rate,
                          weight_decay=self.hparams.weight_decay)
        cosine = self.hparams.lr_schedule == "cosine"
        total = self.trainer.estimated_stepping_batches if cosine else math.inf
        if cosine and not math.isfinite(total):
            raise ValueError("lr_schedule='cosine' decays to 0 at the last step, so it needs a finite run: set "
                             "trainer.max_steps (or max_epochs), or use lr_schedule='constant'")
        schedule = warmup_cosine_scheduler(optimizer, self.hparams.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_fit_end(self):
        export_when_fit_ends(self)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None):
        """Write the (EMA) weights in the zoo format, loadable with
        ``create_model("local-dir:DIRECTORY", pretrained=True)``; fp16 if ``dtype=torch.float16`` or the
        module's ``export_dtype="float16"``."""
        meta = {**dict(self.hparams.export_metadata or {}), **(metadata or {})}
        if dtype is None and self.hparams.export_dtype == "float16":
            dtype = torch.float16
        return save_pretrained(self.restoration_model, directory, self.model_name, self.model_args, meta, dtype)
