"""AudioLMModule: the three stages of UniMoE-Audio's curriculum end to end on a tiny model (two dense protos ->
the DCMoE model -> everything unfrozen with the annealed balance weight -> an export the pipeline loads)."""

import lightning.pytorch as pl
import pytest
import torch

from moezoo.pipelines import AudioPipeline
from moezoo.training.audio_lm import AudioLMModule
from moezoo.training.datamodules.audio import MixedAudioDataModule, MusicDataModule
from moezoo.training.datasets.audio import espeak_unavailable_reason
from moezoo.zoo.layers.dcmoe import DynamicCapacityMoE

TINY = dict(model="test_unimoe_audio", architecture="test_unimoe_audio", ema_decay=0.0, warmup_steps=1,
            decay_steps=4, log_expert_load_every=1)
# the test model's prompt words are "a", "note", "the", "word": captions keep those and drop the rest
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fit(module: AudioLMModule, data, tmp_path, steps: int = 2) -> AudioLMModule:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module


def music(batch_size=4):
    return MusicDataModule(renditions=1, val_renditions=1, timbres=["sine"], kinds=["note"], batch_size=batch_size)


def test_the_three_stages_end_in_a_model_the_pipeline_plays(tmp_path):
    protos = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        proto = fit(AudioLMModule(**TINY, model_args={"ffn": "dense"}), music(), tmp_path)
        protos.append(f"local-dir:{proto.export(tmp_path / f'proto{seed}')}")

    stage2 = AudioLMModule(**TINY, protos=protos, trainable=["blocks.*.moe.gate.weight", "blocks.*.moe.shared_w_*"])
    frozen = {n: p.detach().clone() for n, p in stage2.model.named_parameters() if not p.requires_grad}
    assert any(".moe.w_in" in n for n in frozen) and not any("gate" in n for n in frozen)
    fit(stage2, music(), tmp_path)
    for name, parameter in stage2.model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} trained in stage 2"
    stage2_dir = stage2.export(tmp_path / "stage2")

    stage3 = AudioLMModule(**{**TINY, "model": f"local-dir:{stage2_dir}"}, aux_weight=[0.025, 0.001],
                           aux_anneal_steps=2)
    assert all(p.requires_grad for n, p in stage3.model.named_parameters() if not n.startswith(("codec", "vocoder")))
    fit(stage3, music(), tmp_path, steps=3)
    layers = [m for m in stage3.model.modules() if isinstance(m, DynamicCapacityMoE)]
    assert layers and all(m.aux_loss_coefs["chosen_balance"] == pytest.approx(0.001 / len(layers)) for m in layers)

    pipe = AudioPipeline.from_pretrained(f"local-dir:{stage3.export(tmp_path / 'final')}")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a note", num_tokens=4, generator=torch.Generator().manual_seed(0))
    assert out.audios[0].ndim == 1 and out.audios[0].size > 0


@pytest.mark.skipif(espeak_unavailable_reason() is not None, reason=str(espeak_unavailable_reason()))
def test_a_mixed_batch_logs_experts_per_token_by_domain(tmp_path):
    data = MixedAudioDataModule(per_domain=4, val_per_domain=2, words=["one", "two"], music_renditions=1,
                                music_val_renditions=1, batch_size=8)
    module = AudioLMModule(**TINY, model_args={"max_text_tokens": 8})  # chord captions have 8 words
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.training_step(batch, 0)
    assert {"experts_per_token/speech", "experts_per_token/music"} <= set(logged)
    most = module.model.config.num_experts + module.model.config.num_null_experts
    assert all(1 <= logged[f"experts_per_token/{d}"] <= most for d in ("speech", "music"))


def test_bad_stage_settings_are_refused():
    with pytest.raises(ValueError, match="matches no parameter"):
        AudioLMModule(**TINY, trainable=["nothing.*"])
    with pytest.raises(ValueError, match="aux_weight"):
        AudioLMModule(**TINY, aux_weight=[0.1, 0.2, 0.3])
