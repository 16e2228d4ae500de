"""Training the audio codec: the mel tokenizer and the neural vocoder of :mod:`moezoo.encoders.audio`, each a
LightningModule, on audio batches (:mod:`moezoo.training.datamodules.audio`, usually the balanced
speech + music :class:`~moezoo.training.datamodules.audio.MixedAudioDataModule`)::

    moezoo-train fit --config training/configs/audio_tokenizer.yaml   # first: the vocoder can train on its mels
    moezoo-train fit --config training/configs/audio_vocoder.yaml

- :class:`AudioTokenizerModule`: mel -> :class:`~moezoo.encoders.audio.MelTokenizer` -> mel; loss L1 on the
  normalised log-mel + ``commitment_weight`` x the commitment loss; codebooks by EMA (no gradient). With
  quantiser dropout each clip uses a random number of codebooks with probability ``quantizer_dropout``, so
  that decoding the first q codebooks is good too.
- :class:`AudioVocoderModule`: mel -> :class:`~moezoo.encoders.audio.MelVocoder`'s STFT magnitude (its
  Griffin-Lim makes the phase at inference); loss: the STFT loss of that magnitude against the clip's
  (spectral convergence + log-magnitude, :func:`~moezoo.encoders.audio.magnitude_losses`) + ``mel_weight`` x
  the L1 of its log-mel. With ``tokenizer_path`` and ``tokenized_fraction`` > 0, that share of the clips is
  vocoded from the tokenizer's
  reconstruction of their mel (what the audio LM's tokens will give it), against the real audio.

Both end a fit by writing ``export_path`` (a relative path is inside the run's folder) with
``save_pretrained``: one safetensors file that ``MelTokenizer.from_pretrained`` / ``MelVocoder.from_pretrained``
read. The quantiser's EMA statistics ride in the Lightning checkpoint (``on_save_checkpoint``), so a resumed
tokenizer run continues its codebooks exactly.

``python -m moezoo.training.audio_codec --tokenizer T --vocoder V`` measures a trained pair on held-out clips
(:func:`evaluate_codec`): the tokenizer's mel reconstruction error, and spectral convergence and log-mel L1 of
Griffin-Lim and the neural vocoder, on real and on tokenizer-decoded mels, per domain.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from moezoo.encoders.audio import (
    HOP_LENGTH,
    LOG_MEL_STD,
    N_FFT,
    AudioFrontEnd,
    GriffinLimVocoder,
    MelTokenizer,
    MelVocoder,
    log_mel_l1,
    magnitude_losses,
    multi_resolution_stft_loss,
    normalize_log_mel,
    spectral_convergence,
    stft_magnitude,
)

from .common import adamw, run_path, warmup_cosine_scheduler

__all__ = ["AudioTokenizerModule", "AudioVocoderModule", "evaluate_codec"]

SCHEDULES = ("constant", "cosine")
EXPORT_DTYPES = {"float32": None, "float16": torch.float16}


def _check_training_args(learning_rate: float, warmup_steps: int, lr_schedule: str, export_dtype: str) -> None:
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPES)}, got {export_dtype!r}")


def _optimizers(module: pl.LightningModule, parameters) -> dict:
    """AdamW with warm-up and (by ``hparams.lr_schedule``) a cosine decay to 0 at the run's last step."""
    hp = module.hparams
    optimizer = adamw(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    cosine = hp.lr_schedule == "cosine"
    total = module.trainer.estimated_stepping_batches if cosine else math.inf
    if cosine and not math.isfinite(total):
        raise ValueError("lr_schedule='cosine' needs a finite run: set trainer.max_steps (or max_epochs), or use "
                         "lr_schedule='constant'")
    return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_scheduler(optimizer, hp.warmup_steps, total)}


def _export_when_fit_ends(module: pl.LightningModule, network) -> None:
    if module.hparams.export_path and module.trainer.is_global_zero:
        path = network.save_pretrained(run_path(module.trainer, module.hparams.export_path),
                                       EXPORT_DTYPES[module.hparams.export_dtype])
        print(f"exported {type(network).__name__} to {path}")


class AudioTokenizerModule(pl.LightningModule):
    """Trains a :class:`~moezoo.encoders.audio.MelTokenizer` to reconstruct normalised log-mels.

    Logged: ``train/loss``, ``train/mel_l1`` (normalised units), ``train/commitment``,
    ``train/codes_alive`` (share of codes whose EMA count is above the restart threshold); on validation,
    with all codebooks, ``val/mel_l1`` and ``val/log_mel_l1`` (nats: mean |ln mel' - ln mel|), and
    ``val/log_mel_l1_q<q>`` decoding only the first q codebooks.

    Args:
        tokenizer: :class:`~moezoo.encoders.audio.MelTokenizerConfig` fields (default: its defaults).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_schedule: "cosine" (to 0 at the last step) or "constant" after the warm-up.
        commitment_weight: weight of the commitment loss (SoundStream / VQ-VAE's beta).
        quantizer_dropout: probability that a training clip uses a random number 1..Q of codebooks.
        export_path: where the end of ``fit`` writes the tokenizer (relative: inside the run's folder;
            None: nowhere).
        export_dtype: "float32" or "float16" for the exported weights.
    """

    def __init__(
        self,
        tokenizer: dict | None = None,
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
        commitment_weight: float = 0.25,
        quantizer_dropout: float = 0.5,
        export_path: str | None = "mel_tokenizer.safetensors",
        export_dtype: str = "float32",
    ) -> None:
        super().__init__()
        _check_training_args(learning_rate, warmup_steps, lr_schedule, export_dtype)
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        self.save_hyperparameters()
        self.tokenizer = MelTokenizer(tokenizer)

    def _active_stages(self, batch_size: int) -> torch.Tensor | None:
        """Codebooks per clip: Q, or with probability ``quantizer_dropout`` uniform in 1..Q."""
        if self.hparams.quantizer_dropout == 0:
            return None
        q = self.tokenizer.num_codebooks
        dropped = torch.rand(batch_size, device=self.device) < self.hparams.quantizer_dropout
        return torch.where(dropped, torch.randint(1, q + 1, (batch_size,), device=self.device), q)

    def training_step(self, batch, batch_idx):
        mel = self.tokenizer.front_end(batch["audio"])
        reconstruction, _, commitment = self.tokenizer(mel, self._active_stages(mel.shape[0]))
        mel_l1 = F.l1_loss(reconstruction, mel)
        loss = mel_l1 + self.hparams.commitment_weight * commitment
        quantizer = self.tokenizer.quantizer
        alive = (quantizer.ema_counts >= quantizer.dead_code_threshold).float().mean()
        batch_size = mel.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({"train/mel_l1": mel_l1, "train/commitment": commitment, "train/codes_alive": alive},
                      batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        mel = self.tokenizer.front_end(batch["audio"])
        codes = self.tokenizer.encode(mel)
        batch_size = mel.shape[0]
        for q in range(1, self.tokenizer.num_codebooks + 1):
            error = log_mel_l1(self.tokenizer.decode(codes[:, :q]), mel)
            self.log(f"val/log_mel_l1_q{q}", error, batch_size=batch_size)
        reconstruction = self.tokenizer.decode(codes)
        self.log("val/mel_l1", F.l1_loss(reconstruction, mel), prog_bar=True, batch_size=batch_size)
        self.log("val/log_mel_l1", log_mel_l1(reconstruction, mel), batch_size=batch_size)

    def configure_optimizers(self):
        return _optimizers(self, self.tokenizer.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["quantizer_training_state"] = self.tokenizer.quantizer.training_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "quantizer_training_state" in checkpoint:
            self.tokenizer.quantizer.load_training_state(checkpoint["quantizer_training_state"])

    def on_fit_end(self):
        _export_when_fit_ends(self, self.tokenizer)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
        """``moezoo-export``: write ``<directory>/mel_tokenizer.safetensors`` (``metadata`` is not used: the
        file carries its config)."""
        return self.tokenizer.save_pretrained(Path(directory) / "mel_tokenizer.safetensors", dtype)


class AudioVocoderModule(pl.LightningModule):
    """Trains a :class:`~moezoo.encoders.audio.MelVocoder` to turn normalised log-mels into the waveform.

    Logged: ``train/loss``, ``train/spectral_convergence``, ``train/log_magnitude``, ``train/log_mel_l1``
    (nats; all of the predicted magnitude); on validation, of the vocoder's waveform (Griffin-Lim phase) from
    real mels, ``val/spectral_convergence`` (at the project's 1024/256 STFT), ``val/log_mel_l1`` (nats) and
    ``val/mr_stft_loss`` (the sum of the two terms of :func:`~moezoo.encoders.audio.multi_resolution_stft_loss`).

    Args:
        vocoder: :class:`~moezoo.encoders.audio.MelVocoderConfig` fields (default: its defaults).
        tokenizer_path: a trained tokenizer (``MelTokenizer.save_pretrained`` file), frozen; needed when
            ``tokenized_fraction > 0``.
        tokenized_fraction: share of training clips vocoded from the tokenizer's reconstruction of their mel.
        mel_weight: weight of the log-mel L1 (normalised units) next to the STFT loss.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_schedule: "cosine" or "constant".
        export_path: where the end of ``fit`` writes the vocoder (relative: inside the run's folder).
        export_dtype: "float32" or "float16".
    """

    def __init__(
        self,
        vocoder: dict | None = None,
        tokenizer_path: str | None = None,
        tokenized_fraction: float = 0.0,
        mel_weight: float = 1.0,
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
        export_path: str | None = "mel_vocoder.safetensors",
        export_dtype: str = "float32",
    ) -> None:
        super().__init__()
        _check_training_args(learning_rate, warmup_steps, lr_schedule, export_dtype)
        if not 0.0 <= tokenized_fraction <= 1.0:
            raise ValueError(f"tokenized_fraction must be in [0, 1], got {tokenized_fraction}")
        if tokenized_fraction > 0 and not tokenizer_path:
            raise ValueError("tokenized_fraction > 0 needs tokenizer_path (a MelTokenizer.save_pretrained file)")
        self.save_hyperparameters()
        self.vocoder = MelVocoder(vocoder)
        self.front_end = AudioFrontEnd()
        # Frozen and not part of this module's checkpoint: the file is the tokenizer.
        self._tokenizer = [MelTokenizer.from_pretrained(tokenizer_path).requires_grad_(False)] if tokenizer_path else []

    def _input_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """The real mel, with ``tokenized_fraction`` of the clips replaced by their tokenizer reconstruction."""
        if not self._tokenizer or self.hparams.tokenized_fraction == 0:
            return mel
        tokenizer = self._tokenizer[0].to(mel.device)
        chosen = torch.rand(mel.shape[0], device=mel.device) < self.hparams.tokenized_fraction
        if not bool(chosen.any()):
            return mel
        with torch.no_grad():
            decoded = tokenizer.decode(tokenizer.encode(mel[chosen]))
        mel = mel.clone()
        mel[chosen] = decoded
        return mel

    def training_step(self, batch, batch_idx):
        audio = batch["audio"]
        mel = self.front_end(audio)
        magnitude = self.vocoder.magnitude(self._input_mel(mel))
        convergence, log_magnitude = magnitude_losses(magnitude, stft_magnitude(audio, N_FFT, HOP_LENGTH, N_FFT))
        predicted_mel = normalize_log_mel(self.front_end.mel_of_magnitude(magnitude))
        mel_l1 = F.l1_loss(predicted_mel, mel)
        loss = convergence + log_magnitude + self.hparams.mel_weight * mel_l1
        batch_size = audio.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({"train/spectral_convergence": convergence, "train/log_magnitude": log_magnitude,
                       "train/log_mel_l1": mel_l1 * LOG_MEL_STD}, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        audio = batch["audio"]
        mel = self.front_end(audio)
        predicted = self.vocoder(mel)
        batch_size = audio.shape[0]
        self.log("val/spectral_convergence", spectral_convergence(predicted, audio), prog_bar=True,
                 batch_size=batch_size)
        self.log("val/log_mel_l1", log_mel_l1(self.front_end(predicted), mel), batch_size=batch_size)
        self.log("val/mr_stft_loss", sum(multi_resolution_stft_loss(predicted, audio)), batch_size=batch_size)

    def configure_optimizers(self):
        return _optimizers(self, self.vocoder.parameters())

    def on_fit_end(self):
        _export_when_fit_ends(self, self.vocoder)

    def export(self, directory, metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
        """``moezoo-export``: write ``<directory>/mel_vocoder.safetensors``."""
        return self.vocoder.save_pretrained(Path(directory) / "mel_vocoder.safetensors", dtype)


# ----------------------------------------------------------------------------------------------------------
# Measuring a trained codec
# ----------------------------------------------------------------------------------------------------------


def _vocoder_scores(vocoder, mel: torch.Tensor, audio: torch.Tensor, front_end: AudioFrontEnd) -> dict[str, float]:
    with torch.no_grad():
        waveform = vocoder(mel)
        return {"spectral_convergence": float(spectral_convergence(waveform, audio)),
                "log_mel_l1": float(log_mel_l1(front_end(waveform), front_end(audio)))}


@torch.no_grad()
def evaluate_codec(tokenizer: MelTokenizer, vocoder: MelVocoder, clips: dict[str, torch.Tensor],
                   griffin_lim_iterations: int = 64) -> dict[str, dict]:
    """Per group of clips (name -> float32 ``[B, N]`` audio): the tokenizer's log-mel L1 (nats) with the first
    q codebooks for every q, and for Griffin-Lim and the neural vocoder, from the real mel and from the
    tokenizer-decoded mel, the spectral convergence (1024/256 STFT) and log-mel L1 (nats) of the waveform
    against the clip. ``"ceiling"``-style numbers: every score compares with the real clip."""
    front_end = AudioFrontEnd()
    griffin_lim = GriffinLimVocoder(griffin_lim_iterations)
    results = {}
    for name, audio in clips.items():
        mel = front_end(audio)
        codes = tokenizer.encode(mel)
        decoded = tokenizer.decode(codes)
        scores = {"clips": audio.shape[0],
                  "tokenizer_log_mel_l1": {q: float(log_mel_l1(tokenizer.decode(codes[:, :q]), mel))
                                           for q in range(1, tokenizer.num_codebooks + 1)}}
        for vocoder_name, model in (("griffin_lim", griffin_lim), ("neural", vocoder)):
            for source, source_mel in (("real_mel", mel), ("tokenized_mel", decoded)):
                scores[f"{vocoder_name}/{source}"] = _vocoder_scores(model, source_mel, audio, front_end)
        results[name] = scores
    return results


def _held_out_clips(count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` validation clips of each group: speech of the generator split (its validation clips), speech
    of the judge split (voices the tokenizer and vocoder never heard), music (validation renditions)."""
    from .datamodules.audio import MixedAudioDataModule
    from .datasets.audio import SpeechDataset, speech_items

    data = MixedAudioDataModule(seed=seed)
    data.setup()
    speech_val, music_val = data.val_set.datasets
    generator = torch.Generator().manual_seed(seed)
    judge = SpeechDataset(speech_items("judge", seed))

    def pick(dataset) -> torch.Tensor:
        ids = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        return torch.stack([dataset[i]["audio"] for i in ids])

    return {"speech": pick(speech_val), "speech_unseen_voices": pick(judge), "music": pick(music_val)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure a trained mel tokenizer and vocoder on held-out clips.")
    parser.add_argument("--tokenizer", required=True, help="MelTokenizer.save_pretrained file")
    parser.add_argument("--vocoder", required=True, help="MelVocoder.save_pretrained file")
    parser.add_argument("--clips", type=int, default=64, help="held-out clips per group")
    parser.add_argument("--seed", type=int, default=0, help="the data seed the two were trained with")
    parser.add_argument("--griffin-lim-iterations", type=int, default=64)
    args = parser.parse_args(argv)
    tokenizer, vocoder = MelTokenizer.from_pretrained(args.tokenizer), MelVocoder.from_pretrained(args.vocoder)
    start = time.perf_counter()
    results = evaluate_codec(tokenizer, vocoder, _held_out_clips(args.clips, args.seed), args.griffin_lim_iterations)
    for name, path, network in (("tokenizer", args.tokenizer, tokenizer), ("vocoder", args.vocoder, vocoder)):
        results[name] = {"parameters": sum(p.numel() for p in network.parameters()),
                         "state_dict_tensors": sum(t.numel() for t in network.state_dict().values()),
                         "file_mb": round(Path(path).stat().st_size / 1e6, 3)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
