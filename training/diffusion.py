"""DiffusionModule: trains any zoo diffusion model (DiT-MoE and its dense counterpart) with Lightning.

What one training step does: take a batch from any of the image DataModules (``image``, ``label``,
``caption``), condition on labels (class models) or captions (text models, through the model's own text
encoder, trained jointly), ask the model for its diffusion loss (rectified flow or DDPM epsilon) and its MoE
auxiliary losses, add them, and keep an exponential moving average of the weights — the EMA weights are the
ones validated, sampled from and exported.

Logged: ``train/loss`` (diffusion), ``train/aux_loss``, ``val/loss`` (EMA weights, fixed noise), and every
``log_expert_load_every`` steps per MoE layer the share of tokens of its busiest expert and the coefficient
of variation of its load (``expert_load/<layer>/max_share``, ``.../cv``).
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch

from moezoo.zoo import create_model, save_pretrained

from .common import adamw, log_training_losses, parameter_groups, update_ema, warmup_cosine_scheduler


class DiffusionModule(pl.LightningModule):
    """A diffusion model from the zoo, trained with EMA and classifier-free-guidance dropout.

    Args:
        model: a registered model name, e.g. "dit_moe_digits", "dit_dense_digits", "dit_moe_shapes".
        model_args: constructor overrides for the model (e.g. {"num_experts": 16}).
        objective: "rf" (rectified flow) or "ddpm" (epsilon); None: the model config's own.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        ema_decay: EMA decay per step (0 disables the EMA: the raw weights are used everywhere).
        log_expert_load_every: log per-layer expert load every this many steps (0: never).
        freeze_text_encoder: keep the model's own text encoder as it is (no gradients, not in the optimizer).
            For a model grown from a trained one (``init_from_image``): the text tower already tells the
            caption words apart, and training it jointly from there can erase words the new parts need
            before those parts learn to use them.
        lr_multipliers: ``{parameter name prefix: factor}``: those parameters train at ``factor *
            learning_rate`` (e.g. ``{"word_vectors": 10}``: new word embeddings learn at textual inversion's
            usual rate, ~5e-3, while the rest is fine-tuned gently). Every prefix must name a trained parameter.
    """

    def __init__(
        self,
        model: str = "dit_moe_digits",
        model_args: dict | None = None,
        objective: str | None = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        log_expert_load_every: int = 50,
        freeze_text_encoder: bool = False,
        lr_multipliers: dict[str, float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.model_args = model, dict(model_args or {})
        self.model = create_model(model, **self.model_args)
        self.objective = objective or getattr(self.model.config, "objective", "rf")
        if self.objective not in ("rf", "ddpm"):
            raise ValueError(f"unknown objective {self.objective!r}; accepted: 'rf', 'ddpm'")
        if freeze_text_encoder:
            if getattr(self.model, "text_encoder", None) is None:
                raise ValueError(f"freeze_text_encoder=True, but {model} has no text encoder of its own")
            self.model.text_encoder.requires_grad_(False)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if ema_decay > 0 else None

    @property
    def sampling_model(self):
        """The weights to validate, sample from and export: the EMA if there is one."""
        return self.ema if self.ema is not None else self.model

    def conditions(self, model, batch):
        """(labels or None, pooled text embeddings or None) for the batch, by what the model is conditioned on."""
        labels = batch["label"] if model.config.num_classes else None
        if labels is not None and bool((labels < 0).any()):
            raise ValueError("a class-conditional model needs a label for every image; this data has unlabeled images")
        text_emb = model.encode_text(batch["caption"]) if getattr(model.config, "text_dim", None) else None
        return labels, text_emb

    def training_step(self, batch, batch_idx):
        labels, text_emb = self.conditions(self.model, batch)
        clean = clean_input(batch)
        loss, aux_loss = self.model.training_loss(clean, labels, text_emb, objective=self.objective)
        batch_size = clean.shape[0]
        return log_training_losses(self, loss, aux_loss, batch_size)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            update_ema(self.ema, self.model, self.hparams.ema_decay)

    def validation_step(self, batch, batch_idx):
        model = self.sampling_model
        labels, text_emb = self.conditions(model, batch)
        # Fixed noise and timesteps per batch, so validation losses are comparable across epochs.
        generator = torch.Generator(device="cpu").manual_seed(batch_idx)
        clean = clean_input(batch)
        loss, _ = model.training_loss(clean, labels, text_emb, objective=self.objective, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=clean.shape[0])

    def predict_step(self, batch, batch_idx):
        """Generate one image per label / caption of the batch: float [B, C, H, W] in [0, 1]."""
        pipe = self.pipeline()
        generator = torch.Generator().manual_seed(batch_idx)
        if self.sampling_model.config.num_classes:
            out = pipe(class_labels=batch["label"].tolist(), generator=generator, output_type="pt")
        else:
            out = pipe(prompt=list(batch["caption"]), generator=generator, output_type="pt")
        return out.images

    def pipeline(self, label_names: list[str] | None = None):
        from moezoo.pipelines import DiTMoEPipeline

        pipe = DiTMoEPipeline(self.sampling_model, label_names=label_names)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def configure_optimizers(self):
        groups = parameter_groups(self.model, self.hparams.learning_rate, self.hparams.lr_multipliers or {})
        optimizer = adamw(groups, weight_decay=self.hparams.weight_decay)
        schedule = warmup_cosine_scheduler(optimizer, max(1, self.hparams.warmup_steps), total=math.inf)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None):
        """Write the EMA weights in the zoo format (model.safetensors + config.json), loadable with
        ``create_model("local-dir:DIRECTORY", pretrained=True)``; ``dtype=torch.float16`` halves the file."""
        meta = {"objective": self.objective, **(metadata or {})}
        # Where the training started from (init_from_image) is history, not architecture: the exported weights
        # replace it, and reloading must not need the starting checkpoint.
        args = {k: v for k, v in self.model_args.items() if k != "init_from_image"}
        return save_pretrained(self.sampling_model, directory, self.model_name, args, meta, dtype=dtype)


def clean_input(batch) -> torch.Tensor:
    """The clean data of a batch: ``"video"`` [B, F, C, H, W] (video DataModules) or ``"image"`` [B, C, H, W]."""
    if "video" in batch:
        return batch["video"]
    if "image" in batch:
        return batch["image"]
    raise KeyError(f"a diffusion batch needs an 'image' or a 'video' tensor; got keys {sorted(batch)}")
