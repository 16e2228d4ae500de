"""FusionModule: trains an infrared/visible fusion model from the zoo (MoE-Fusion) with Lightning.

One training step: fuse the batch's pairs, take the fusion losses (gradient loss against the larger source
gradient, intensity loss inside / outside the warm-object mask), the attention loss when the batch has a mask
(our stand-in for the detector that trains MoE-Fusion's attention officially), and the MoE gates' CV²
importance + load losses; add them.

Logged: ``train/loss`` (the total), ``train/grad_loss``, ``train/intensity_loss``, ``train/attention_loss``,
``train/aux_loss``, the same ``val/...`` on the validation pairs, and every ``log_expert_load_every`` steps
per MoE layer the busiest expert's share and the load's coefficient of variation (``expert_load/...``).
With ``export_dir`` set, the weights are exported there in the zoo format when fitting ends.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from moezoo.zoo import create_model, save_pretrained
from moezoo.zoo.models.moe_fusion import fusion_loss

from .common import export_when_fit_ends, log_expert_load, warmup_cosine_scheduler


def attention_loss(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the foreground attention and the warm-object mask."""
    return F.binary_cross_entropy(attention.clamp(1e-6, 1 - 1e-6), mask)


class FusionModule(pl.LightningModule):
    """An infrared/visible fusion model from the zoo, trained with the MoE-Fusion losses.

    Args:
        model: a registered model name, e.g. "moe_fusion_irvis", "moe_fusion", "test_moe_fusion".
        model_args: constructor overrides for the model (e.g. {"local_cell": 32}).
        learning_rate: Adam peak learning rate (after warm-up, decayed by a half cosine to 5% at the end).
        weight_decay: Adam weight decay (official 1e-4).
        warmup_steps: linear learning-rate warm-up steps.
        grad_weight: weight of the gradient loss (official 10).
        intensity_weight: weight of the intensity loss (official 1).
        attention_weight: weight of the attention loss on batches with a warm-object mask (0: unsupervised).
        gradient_clip: clip the gradient norm to this (official 35); 0 disables.
        log_expert_load_every: log per-layer expert load every this many steps (0: never).
        export_dir: if set, export the trained weights there (config.json + model.safetensors) at fit end (a
            relative path is inside the run's folder, ``<default_root_dir>/<run name>/`` with the shipped configs).
    """

    def __init__(
        self,
        model: str = "moe_fusion_irvis",
        model_args: dict | None = None,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        grad_weight: float = 10.0,
        intensity_weight: float = 1.0,
        attention_weight: float = 1.0,
        gradient_clip: float = 35.0,
        log_expert_load_every: int = 50,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.model_args = model, dict(model_args or {})
        self.model = create_model(model, **self.model_args)
        self._checkpoint_step = 0  # global_step of a loaded checkpoint (a module outside a Trainer reads 0)

    def on_load_checkpoint(self, checkpoint) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """All loss terms of a batch and their weighted total ``"loss"``."""
        infrared, visible, mask = batch["ir"], batch["vis"], batch.get("mask")
        fused, attention = self.model(infrared, visible, return_attention=True)
        hp = self.hparams
        terms = fusion_loss(fused, infrared, visible, mask, hp.grad_weight, hp.intensity_weight)
        total = terms.pop("loss")
        if mask is not None and hp.attention_weight > 0:
            terms["attention_loss"] = attention_loss(attention, mask)
            total = total + hp.attention_weight * terms["attention_loss"]
        terms["aux_loss"] = self.model.aux_loss()
        terms["loss"] = total + terms["aux_loss"]
        return terms

    def logged_losses(self, batch, stage: str) -> torch.Tensor:
        """The batch's loss terms logged as ``<stage>/<term>`` (the total ``<stage>/loss`` in the progress bar);
        returns the total."""
        terms = self.losses(batch)
        batch_size = batch["ir"].shape[0]
        self.log(f"{stage}/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=batch_size)
        return terms["loss"]

    def training_step(self, batch, batch_idx):
        loss = self.logged_losses(batch, "train")
        log_expert_load(self)
        return loss

    def validation_step(self, batch, batch_idx):
        self.logged_losses(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 10_000
        schedule = warmup_cosine_scheduler(optimizer, max(1, hp.warmup_steps), total, floor=0.05)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val or self.hparams.gradient_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def on_fit_end(self):
        export_when_fit_ends(self)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None):
        """Write the weights in the zoo format (model.safetensors + config.json), loadable with
        ``create_model("local-dir:DIRECTORY", pretrained=True)`` or ``FusionPipeline.from_pretrained``;
        ``dtype=torch.float16`` halves the file. (The same signature as ``DiffusionModule.export``.)"""
        meta = {"trained_steps": max(int(self.global_step), self._checkpoint_step), **(metadata or {})}
        return save_pretrained(self.model, directory, self.model_name, self.model_args, meta, dtype=dtype)
