"""AudioTokenizerModule and AudioVocoderModule (moezoo.training.audio_codec): their losses by hand, quantiser
dropout, the EMA statistics in the checkpoint, the configs, fit + export + reload, evaluate_codec."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moezoo.encoders.audio import (
    CLIP_SAMPLES,
    SAMPLE_RATE,
    AudioFrontEnd,
    MelTokenizer,
    MelVocoder,
    log_mel_l1,
    multi_resolution_stft_loss,
    spectral_convergence,
)
from moezoo.training.audio_codec import AudioTokenizerModule, AudioVocoderModule, evaluate_codec
from moezoo.training.cli import build_cli
from moezoo.training.datasets.audio import espeak_unavailable_reason

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY_TOKENIZER = {"hidden_dim": 16, "latent_dim": 8, "num_blocks": 1, "num_codebooks": 3, "codebook_size": 16}
TINY_VOCODER = {"dim": 16, "intermediate_dim": 32, "num_blocks": 1}
needs_espeak = pytest.mark.skipif(espeak_unavailable_reason() is not None,
                                  reason=f"eSpeak NG unavailable: {espeak_unavailable_reason()}")


def audio_batch(n: int = 4) -> dict:
    t = torch.arange(CLIP_SAMPLES, dtype=torch.float64) / SAMPLE_RATE
    audio = torch.stack([0.5 * torch.sin(2 * math.pi * (220 + 110 * i) * t) for i in range(n)]).float()
    return {"audio": audio, "caption": [""] * n, "domain": ["music"] * n, "label": torch.full((n,), -1)}


def quiet(module):
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    return logged


def test_tokenizer_step_is_mel_l1_plus_weighted_commitment():
    torch.manual_seed(0)
    module = AudioTokenizerModule(TINY_TOKENIZER, commitment_weight=0.5, quantizer_dropout=0.0)
    twin = copy.deepcopy(module.tokenizer)
    logged = quiet(module)
    batch = audio_batch()
    torch.manual_seed(1)  # the k-means initialisation draws from it
    loss = module.training_step(batch, 0)
    torch.manual_seed(1)
    mel = AudioFrontEnd()(batch["audio"])
    reconstruction, codes, commitment = twin(mel)
    torch.testing.assert_close(loss, F.l1_loss(reconstruction, mel) + 0.5 * commitment)
    assert logged["train/commitment"] == pytest.approx(float(commitment))
    assert codes.shape == (4, 3, 65) and 0.0 < logged["train/codes_alive"] <= 1.0


def test_quantizer_dropout_gives_each_clip_one_to_q_codebooks():
    module = AudioTokenizerModule(TINY_TOKENIZER, quantizer_dropout=1.0)
    torch.manual_seed(0)
    stages = module._active_stages(1000)
    assert set(stages.tolist()) == {1, 2, 3}
    assert AudioTokenizerModule(TINY_TOKENIZER, quantizer_dropout=0.0)._active_stages(5) is None
    assert set(AudioTokenizerModule(TINY_TOKENIZER, quantizer_dropout=0.3)._active_stages(1000).tolist()) == {1, 2, 3}


def test_tokenizer_validation_logs_the_error_of_every_codebook_prefix():
    torch.manual_seed(0)
    module = AudioTokenizerModule(TINY_TOKENIZER)
    logged = quiet(module)
    module.training_step(audio_batch(), 0)  # k-means init
    module.eval()
    batch = audio_batch()
    module.validation_step(batch, 0)
    mel = AudioFrontEnd()(batch["audio"])
    codes = module.tokenizer.encode(mel)
    for q in (1, 2, 3):
        expected = float((module.tokenizer.decode(codes[:, :q]) - mel).abs().mean() * 4.0)
        assert logged[f"val/log_mel_l1_q{q}"] == pytest.approx(expected, rel=1e-5)
    assert logged["val/log_mel_l1"] == logged["val/log_mel_l1_q3"]


def test_checkpoint_carries_the_quantizer_ema_statistics():
    torch.manual_seed(0)
    module = AudioTokenizerModule(TINY_TOKENIZER)
    quiet(module)
    module.training_step(audio_batch(), 0)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    restored = AudioTokenizerModule(TINY_TOKENIZER)
    restored.load_state_dict(checkpoint["state_dict"])
    restored.on_load_checkpoint(checkpoint)
    quantizer, other = module.tokenizer.quantizer, restored.tokenizer.quantizer
    assert torch.equal(other.ema_counts, quantizer.ema_counts) and torch.equal(other.ema_sums, quantizer.ema_sums)
    assert torch.equal(other.codebooks, quantizer.codebooks) and bool(other.initialized)


def test_vocoder_step_is_the_stft_loss_of_its_magnitude_plus_weighted_mel_l1():
    torch.manual_seed(0)
    module = AudioVocoderModule(TINY_VOCODER, mel_weight=2.0)
    torch.nn.init.normal_(module.vocoder.head.weight, std=0.05)  # away from the least-squares start
    logged = quiet(module)
    batch = audio_batch(2)
    loss = module.training_step(batch, 0)
    front_end = AudioFrontEnd()
    mel = front_end(batch["audio"])
    unfloored = module.vocoder.magnitude(mel)
    predicted = unfloored.clamp_min(1e-7**0.5)  # the floor of the log-magnitude terms
    target = torch.stft(batch["audio"], 1024, 256, window=torch.hann_window(1024), return_complex=True)
    target = target.abs().square().clamp_min(1e-7).sqrt()
    convergence = torch.sqrt(((target - predicted) ** 2).sum() / (target**2).sum())
    log_magnitude = (target.log() - predicted.log()).abs().mean()
    predicted_mel = (unfloored.transpose(1, 2) @ front_end.mel_fbank).transpose(1, 2)
    mel_l1 = ((predicted_mel.clamp_min(1e-5).log() + 7.5) / 4.0 - mel).abs().mean()
    torch.testing.assert_close(loss, convergence + log_magnitude + 2.0 * mel_l1)
    assert logged["train/spectral_convergence"] == pytest.approx(float(convergence), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in module.vocoder.parameters())
    module.validation_step(batch, 0)
    waveform = module.vocoder(mel)
    assert logged["val/spectral_convergence"] == pytest.approx(float(spectral_convergence(waveform, batch["audio"])))
    assert logged["val/mr_stft_loss"] == pytest.approx(float(sum(multi_resolution_stft_loss(waveform, batch["audio"]))))


def test_vocoder_can_train_on_tokenizer_reconstructions(tmp_path):
    torch.manual_seed(0)
    tokenizer = MelTokenizer(TINY_TOKENIZER).eval()
    tokenizer.save_pretrained(tmp_path / "tok.safetensors")
    module = AudioVocoderModule(TINY_VOCODER, tokenizer_path=str(tmp_path / "tok.safetensors"), tokenized_fraction=1.0)
    mel = AudioFrontEnd()(audio_batch(3)["audio"])
    torch.testing.assert_close(module._input_mel(mel), tokenizer.decode(tokenizer.encode(mel)))
    assert not any(k.startswith("_tokenizer") or "tokenizer" in k for k in module.state_dict())
    with pytest.raises(ValueError, match="needs tokenizer_path"):
        AudioVocoderModule(TINY_VOCODER, tokenized_fraction=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0.0}, "learning_rate"), ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"export_dtype": "bfloat16"}, "export_dtype"), ({"quantizer_dropout": 1.5}, "quantizer_dropout"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AudioTokenizerModule(TINY_TOKENIZER, **kwargs)


@needs_espeak
def test_configs_fit_export_and_reload(tmp_path):
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--trainer.enable_model_summary", "false",
              "--data.init_args.per_domain", "4", "--data.init_args.val_per_domain", "2",
              "--data.init_args.words", "[up]", "--data.init_args.music_renditions", "1",
              "--data.init_args.music_val_renditions", "1", "--data.init_args.batch_size", "4"]
    build_cli(["fit", "--config", str(CONFIGS / "audio_tokenizer.yaml"), *common,
               "--model.init_args.tokenizer", str(TINY_TOKENIZER).replace("'", '"')])
    tokenizer_file = tmp_path / "audio_tokenizer" / "mel_tokenizer.safetensors"
    tokenizer = MelTokenizer.from_pretrained(tokenizer_file)
    assert tokenizer.config.num_codebooks == 3 and bool(tokenizer.quantizer.initialized)
    assert (tmp_path / "audio_tokenizer" / "checkpoints" / "last.ckpt").is_file()
    build_cli(["fit", "--config", str(CONFIGS / "audio_vocoder.yaml"), *common,
               "--model.init_args.vocoder", str(TINY_VOCODER).replace("'", '"'),
               "--model.init_args.tokenizer_path", str(tokenizer_file)])
    vocoder = MelVocoder.from_pretrained(tmp_path / "audio_vocoder" / "mel_vocoder.safetensors")
    assert vocoder.config.dim == 16
    clips = {"tones": audio_batch(2)["audio"]}
    results = evaluate_codec(tokenizer, vocoder, clips, griffin_lim_iterations=2)["tones"]
    assert set(results["tokenizer_log_mel_l1"]) == {1, 2, 3} and results["clips"] == 2
    mel = AudioFrontEnd()(clips["tones"])
    waveform = vocoder(mel)
    assert results["neural/real_mel"]["spectral_convergence"] == pytest.approx(
        float(spectral_convergence(waveform, clips["tones"])), rel=1e-5)
    assert results["neural/real_mel"]["log_mel_l1"] == pytest.approx(
        float(log_mel_l1(AudioFrontEnd()(waveform), mel)), rel=1e-5)
    assert set(results) == {"clips", "tokenizer_log_mel_l1", "griffin_lim/real_mel", "griffin_lim/tokenized_mel",
                            "neural/real_mel", "neural/tokenized_mel"}
