"""The pieces every LightningModule here uses: the EMA of the weights, logging of the task loss, the MoE aux loss
and the per-layer expert load, optimizer parameter groups, the learning-rate schedule, and the export that
ends a fit."""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from moezoo.zoo.layers import collect_routing

__all__ = [
    "update_ema",
    "expert_load_stats",
    "log_expert_load",
    "log_training_losses",
    "parameter_groups",
    "warmup_cosine",
    "warmup_cosine_scheduler",
    "adamw",
    "adamw_warmup_cosine",
    "train_only",
    "run_path",
    "export_when_fit_ends",
]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int | None = None) -> None:
    """ema <- d * ema + (1 - d) * model, parameters only (buffers are copied). ``d = decay``, or with ``step``
    (the optimizer steps taken) ``min(decay, (1 + step) / (10 + step))``: the usual EMA warm-up, without which
    an EMA of decay 0.999 still holds 0.999^1000 = 37% of the random initial weights after a 1000-step run."""
    if step is not None:
        decay = min(decay, (1 + step) / (10 + step))
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p.detach(), 1.0 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def expert_load_stats(model: torch.nn.Module) -> dict[str, float]:
    """Per MoE layer, from its last forward: the busiest expert's share of the routed slots, and the
    coefficient of variation of the load (0 = perfectly balanced)."""
    stats = {}
    for name, record in collect_routing(model):
        load = record.load_E.float()
        total = float(load.sum())
        if total == 0:
            continue
        stats[f"expert_load/{name}/max_share"] = float(load.max()) / total
        stats[f"expert_load/{name}/cv"] = float(load.std(unbiased=False) / load.mean()) if len(load) > 1 else 0.0
    return stats


def log_expert_load(module: pl.LightningModule) -> None:
    """Every ``hparams.log_expert_load_every`` steps (0: never), the expert load of ``module.model``'s last
    forward, straight to the logger: ``self.log`` would repeat this step's value on every step in between."""
    every = module.hparams.log_expert_load_every
    if every and module.global_step % every == 0 and module.logger is not None:
        module.logger.log_metrics(expert_load_stats(module.model), step=module.global_step)


def log_training_losses(module: pl.LightningModule, loss: torch.Tensor, aux_loss: torch.Tensor,
                        batch_size: int) -> torch.Tensor:
    """Log a training step's task loss and MoE aux loss (and, when due, the expert load); returns the loss to
    optimise, their sum."""
    module.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
    module.log("train/aux_loss", aux_loss, batch_size=batch_size)
    log_expert_load(module)
    return loss + aux_loss


def parameter_groups(model: torch.nn.Module, learning_rate: float, multipliers: dict[str, float]) -> list[dict]:
    """The trained parameters of ``model`` as optimizer groups: those whose name starts with a prefix of
    ``multipliers`` at ``factor * learning_rate`` (the first matching prefix), the rest at ``learning_rate``."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    unmatched = [prefix for prefix in multipliers if not any(name.startswith(prefix) for name, _ in trained)]
    if unmatched:
        raise ValueError(f"lr_multipliers prefix(es) {unmatched} match no trained parameter; trained parameters "
                         f"start with: {sorted({name.split('.')[0] for name, _ in trained})}")
    groups = {prefix: [] for prefix in multipliers}
    rest = []
    for name, p in trained:
        prefix = next((prefix for prefix in multipliers if name.startswith(prefix)), None)
        (groups[prefix] if prefix is not None else rest).append(p)
    return [{"params": rest, "lr": learning_rate}] + [
        {"params": params, "lr": learning_rate * multipliers[prefix]} for prefix, params in groups.items()]


def warmup_cosine(step: int, warmup: int, total: float, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a half cosine from 1 down to ``floor``
    at step ``total`` (``total = inf``: constant 1 after the warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    if math.isinf(total):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: float,
                            floor: float = 0.0) -> dict:
    """:func:`warmup_cosine` as Lightning's per-step ``lr_scheduler`` entry for ``configure_optimizers``."""
    factor = functools.partial(warmup_cosine, warmup=warmup, total=total, floor=floor)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def train_only(model: torch.nn.Module, patterns: Sequence[str], what: str) -> None:
    """Train the parameters of ``model`` whose names match one of the glob ``patterns`` and freeze the rest
    (a stage's ``trainable`` argument); ``what`` names the model in the error when nothing matches."""
    trained = {n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    if not trained:
        raise ValueError(f"trainable={list(patterns)} matches no parameter of {what}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)


# Where the training modules' AdamW is fused: CPU only. On GPUs torch's default is already its multi-tensor
# ("foreach") update, and a fused optimizer there stops Lightning's gradient clipping under 16-mixed precision
# (its GradScaler cannot unscale before a fused step).
FUSED_ADAMW_DEVICES = ("cpu",)


def adamw(parameters, **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW(parameters, **options)``, fused when every parameter is a floating CPU tensor
    (``FUSED_ADAMW_DEVICES``). On CPU torch's default is its single-tensor loop, a dozen framework calls per
    parameter: an AdamW step of the DiT-MoE digits model (4.0M parameters in 83 tensors) took 10.1 ms that way
    and 2.8 ms fused, of the shapes model (7.3M, 113 tensors) 25.8 and 5.4 ms (AMD Zen 3, AVX2 only, 2 threads).
    The same update up to rounding."""
    groups = list(parameters)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in tensors)
    return torch.optim.AdamW(groups, **options, fused=fused or None)


def adamw_warmup_cosine(parameters, hparams, floor: float = 0.1) -> dict:
    """``configure_optimizers``' answer for the trained ``parameters``: AdamW at ``hparams.learning_rate`` and
    ``weight_decay``, a linear warm-up over ``hparams.warmup_steps``, then a cosine to ``floor`` of the rate by
    ``hparams.decay_steps``."""
    optimizer = adamw(parameters, lr=hparams.learning_rate, weight_decay=hparams.weight_decay)
    schedule = warmup_cosine_scheduler(optimizer, max(1, hparams.warmup_steps), total=hparams.decay_steps, floor=floor)
    return {"optimizer": optimizer, "lr_scheduler": schedule}


def run_path(trainer: pl.Trainer, path: str | Path) -> Path:
    """``path`` if absolute, else inside the run's folder (the logger's ``log_dir``: with the shipped configs
    ``<default_root_dir>/<run name>/``), so ``--trainer.default_root_dir`` moves it with the run."""
    path = Path(path)
    return path if path.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / path


def export_when_fit_ends(module: pl.LightningModule) -> None:
    """For ``on_fit_end``: write the zoo format to ``hparams.export_dir`` (a relative path is inside the run's
    folder, see :func:`run_path`), if set."""
    if module.hparams.export_dir and module.trainer.is_global_zero:
        path = module.export(run_path(module.trainer, module.hparams.export_dir))
        print(f"exported {module.model_name} to {path}")
