"""AudioLMModule: trains UniMoE-Audio's language model over audio codes, one stage of the paper at a time.

One training step: the batch's clips (any audio DataModule: ``audio``, ``caption``, ``domain``) are turned into
codes by the model's own frozen tokenizer (``model.codec``), the captions into word ids, and the model's loss
is the per-codebook cross-entropy plus its DCMoE balance losses.

The paper's curriculum (arXiv 2510.13344, sec. IV-B), each stage a config in training/configs/:

1. ``unimoe_audio_proto_{speech,music}.yaml``: dense proto-experts (``model_args: {ffn: dense}``), one per domain;
2. ``unimoe_audio_stage2.yaml``: ``protos: [...]`` assembles the DCMoE model from them
   (:meth:`UniMoEAudio.from_dense_protos`: attention and norms averaged, each proto's FFN split into routed
   experts); ``trainable`` keeps the routed experts and everything else frozen, so only the gates and the shared
   experts learn, on a balanced speech + music set;
3. ``unimoe_audio_stage3.yaml``: everything unfrozen; the balance-loss weight annealed linearly
   (``aux_weight: [0.025, 0.001]`` over ``aux_anneal_steps``).

Logged: ``train/loss``, ``train/aux_loss``, ``val/loss``, the balance weight, the mean number of experts a
token used per domain (``experts_per_token/<domain>``), and the per-layer expert load.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict

import lightning.pytorch as pl
import torch

from moezoo.zoo import create_model, save_pretrained
from moezoo.zoo.layers.dcmoe import DynamicCapacityMoE, anneal_aux_weight, set_aux_weight
from moezoo.zoo.layers.routed import routed_blocks
from moezoo.zoo.models.unimoe_audio import UniMoEAudio

from .common import adamw_warmup_cosine, export_when_fit_ends, log_training_losses, train_only, update_ema

__all__ = ["AudioLMModule"]


class AudioLMModule(pl.LightningModule):
    """UniMoE-Audio's LM trained on clips of any audio DataModule.

    Args:
        model: a registered model name (e.g. "unimoe_audio_tiny") or ``local-dir:PATH`` of an earlier stage's
            export (its weights are loaded).
        model_args: constructor overrides (e.g. ``{"ffn": "dense"}`` for a proto-expert).
        codec, vocoder: safetensors files of the trained tokenizer and vocoder (``MelTokenizer.save_pretrained``,
            ``MelVocoder.save_pretrained``) loaded into the model; None keeps what the model has.
        protos: ``local-dir:`` exports of dense proto-experts: the model is assembled from them (stage 2).
        trainable: glob patterns of parameter names to train; the rest is frozen (None: everything except the
            codec and vocoder, which never train here).
        aux_weight: the balance-loss weight, ``[start, end]`` annealed linearly over ``aux_anneal_steps``
            (the paper: 0.025 -> 0.001 over 10k steps), or one number; None keeps the model config's.
        learning_rate, weight_decay, warmup_steps: AdamW and its warm-up (cosine decay to 10% by
            ``decay_steps``).
        ema_decay: EMA of the weights (validated and exported); 0 disables it.
        log_expert_load_every: per-layer expert load and experts per token every this many steps (0: never).
        export_dir: when fitting ends, export the (EMA) model here (relative to the run folder).
        architecture: the registered entrypoint the export names (its config fields rebuild the model).
    """

    def __init__(
        self,
        model: str = "unimoe_audio_tiny",
        model_args: dict | None = None,
        codec: str | None = None,
        vocoder: str | None = None,
        protos: list[str] | None = None,
        trainable: list[str] | None = None,
        aux_weight: float | list[float] | None = None,
        aux_anneal_steps: int = 10_000,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        decay_steps: int = 3000,
        ema_decay: float = 0.999,
        log_expert_load_every: int = 50,
        export_dir: str | None = None,
        architecture: str = "unimoe_audio_tiny",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.model_args = model, dict(model_args or {})
        self.model = self._build(model, self.model_args, protos)
        self._load_audio_parts(codec, vocoder)
        self.model.codec.requires_grad_(False).eval()
        self.model.vocoder.requires_grad_(False).eval()
        self._freeze_all_but(trainable)
        self.aux_weights = _checked_aux_weight(aux_weight)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if ema_decay > 0 else None

    # ------------------------------------------------------------------------------------------ building

    @staticmethod
    def _build(model: str, model_args: dict, protos: Sequence[str] | None) -> UniMoEAudio:
        if protos:
            dense = [create_model(p, pretrained=True) for p in protos]
            built = UniMoEAudio.from_dense_protos(dense, **model_args)
        else:
            built = create_model(model, pretrained=model.startswith(("local-dir:", "hf-hub:")), **model_args)
        if not isinstance(built, UniMoEAudio) or built.codec is None or built.vocoder is None:
            raise ValueError(f"{model!r} is not a UniMoE-Audio model that owns a codec and a vocoder")
        return built

    def _load_audio_parts(self, codec: str | None, vocoder: str | None) -> None:
        from moezoo.encoders.audio import MelTokenizer, MelVocoder

        for path, cls, part in ((codec, MelTokenizer, "codec"), (vocoder, MelVocoder, "vocoder")):
            if path is None:
                continue
            trained = cls.from_pretrained(path)
            own = getattr(self.model, part)
            if trained.config != own.config:
                raise ValueError(f"the {part} in {path} has config {trained.config}, the model's is {own.config}")
            own.load_state_dict(trained.state_dict())

    def _freeze_all_but(self, patterns: Sequence[str] | None) -> None:
        if patterns is not None:
            train_only(self.model, patterns, self.model_name)

    def train(self, mode: bool = True) -> "AudioLMModule":
        """The codec and vocoder are fixed parts: they stay in eval mode while the language model trains."""
        super().train(mode)
        for model in (self.model, self.ema):
            if model is not None:
                model.codec.eval()
                model.vocoder.eval()
        return self

    @property
    def sampling_model(self) -> UniMoEAudio:
        return self.ema if self.ema is not None else self.model

    # ------------------------------------------------------------------------------------------ steps

    def _inputs(self, model: UniMoEAudio, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(word ids, codes) of a batch; clips longer than the model's ``max_frames`` keep their first frames."""
        with torch.no_grad():
            codes = model.encode_audio(batch["audio"])[:, :, : model.config.max_frames]
        return model.tokenize(batch["caption"]), codes

    def on_train_batch_start(self, batch, batch_idx):
        if self.aux_weights is not None and any(isinstance(m, DynamicCapacityMoE) for m in self.model.modules()):
            start, end = self.aux_weights
            weight = anneal_aux_weight(self.global_step, self.hparams.aux_anneal_steps, start, end)
            set_aux_weight(self.model, weight)
            self.log("train/aux_weight", weight, batch_size=len(batch["caption"]))

    def training_step(self, batch, batch_idx):
        text_ids, codes = self._inputs(self.model, batch)
        loss, aux_loss = self.model.training_loss(text_ids, codes)
        every = self.hparams.log_expert_load_every
        if every and self.global_step % every == 0:
            self._log_experts_per_token(batch["domain"])
        return log_training_losses(self, loss, aux_loss, codes.shape[0])

    def _log_experts_per_token(self, domains: Sequence[str]) -> None:
        """Mean experts (null included) a token used, over the DCMoE layers of the last forward, per domain."""
        blocks = [b for _, b in routed_blocks(self.model) if isinstance(b, DynamicCapacityMoE)]
        if not blocks:
            return
        used_BS = torch.stack([b.experts_per_token().float() for b in blocks]).mean(0)
        for domain in sorted(set(domains)):
            rows = [i for i, d in enumerate(domains) if d == domain]
            self.log(f"experts_per_token/{domain or 'unknown'}", used_BS[rows].mean(), batch_size=len(rows))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            update_ema(self.ema, self.model, self.hparams.ema_decay, step=self.global_step)

    def validation_step(self, batch, batch_idx):
        model = self.sampling_model
        text_ids, codes = self._inputs(model, batch)
        loss, _ = model.training_loss(text_ids, codes, text_dropout_prob=0.0)  # the conditional model's loss
        self.log("val/loss", loss, prog_bar=True, batch_size=codes.shape[0])

    def configure_optimizers(self):
        return adamw_warmup_cosine([p for p in self.model.parameters() if p.requires_grad], self.hparams)

    # ------------------------------------------------------------------------------------------ export

    def on_fit_end(self):
        export_when_fit_ends(self)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None):
        """Write the (EMA) model in the zoo format: ``create_model("local-dir:DIRECTORY", pretrained=True)``
        loads it, codec and vocoder included; ``dtype=torch.float16`` halves the file."""
        model = self.sampling_model
        args = _architecture_args(model)
        return save_pretrained(model, directory, self.hparams.architecture, args, metadata or {}, dtype=dtype)


def _architecture_args(model: UniMoEAudio) -> dict:
    """The config fields that rebuild ``model`` from the ``unimoe_audio_tiny`` entrypoint (JSON-able)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


def _checked_aux_weight(value) -> tuple[float, float] | None:
    if value is None:
        return None
    pair = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                                 for v in pair):
        raise ValueError(f"aux_weight must be a number >= 0 or [start, end], got {value!r}")
    return float(pair[0]), float(pair[1])
