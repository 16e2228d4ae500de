"""AudioPipeline: argument checks before any compute, generation through the model's own codec and vocoder,
per-prompt seeds, chunking, routing, and WAV export."""

import numpy as np
import pytest
import soundfile
import torch

from helpers import randomise
from moezoo.encoders.audio import FRAME_RATE, SAMPLE_RATE
from moezoo.pipelines.audio import AudioPipeline, export_to_wav
from moezoo.zoo import create_model


@pytest.fixture(scope="module")
def pipe():
    pipe = AudioPipeline(randomise(create_model("test_unimoe_audio"), seed=3))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


def test_generates_one_waveform_per_prompt_with_routing(pipe):
    out = pipe(["the word", "a note"], num_tokens=5, generator=seeds(0, 1), return_routing=True)
    assert out.sampling_rate == SAMPLE_RATE and len(out.audios) == 2
    assert all(a.dtype == np.float32 and a.ndim == 1 and np.abs(a).max() <= 1 for a in out.audios)
    assert out.codes.shape == (2, 3, 5)
    assert len(out.experts_per_token) == pipe.model.config.depth
    assert all(layer.shape == (2, 5) and layer.min() >= 1 for layer in out.experts_per_token)
    # the waveform is the model's codec + vocoder applied to the codes it reports
    with torch.no_grad():
        direct = pipe.model.decode_audio(torch.from_numpy(out.codes))
    np.testing.assert_allclose(out.audios[1], direct[1].clamp(-1, 1).numpy(), atol=1e-6)


def test_a_prompts_clip_depends_only_on_its_seed_and_not_on_chunking(pipe):
    both = pipe(["the word", "a note"], num_tokens=4, generator=seeds(5, 6))
    alone = pipe(["a note"], num_tokens=4, generator=seeds(6))
    chunked = pipe(["the word", "a note"], num_tokens=4, generator=seeds(5, 6), max_batch_size=1)
    assert np.array_equal(both.codes[1:], alone.codes) and np.array_equal(both.codes, chunked.codes)


def test_duration_is_rounded_to_frames(pipe):
    out = pipe("a note", duration_s=5 / FRAME_RATE, generator=seeds(0))
    assert out.codes.shape[-1] == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "non-empty string"),
    (dict(prompt=[]), "non-empty string"),
    (dict(prompt="a violin note"), "never learned: violin"),
    (dict(prompt="a note", num_tokens=0), r"num_tokens must be a whole number of frames in \[1, 12\]"),
    (dict(prompt="a note", duration_s=0.0), "duration_s must be a positive"),
    (dict(prompt="a note", duration_s=10.0), "at most 12"),
    (dict(prompt="a note", num_tokens=3, duration_s=0.1), "not both"),
    (dict(prompt="a note", guidance_scale=float("nan")), "guidance_scale"),
    (dict(prompt="a note", temperature=-1.0), "temperature"),
    (dict(prompt="a note", top_k=0), "top_k"),
    (dict(prompt=["a note", "the word"], generator=seeds(1)), "one generator per"),
])
def test_bad_arguments_fail_before_any_compute(pipe, kwargs, message):
    calls = []
    generate = pipe.model.generate
    pipe.model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    try:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    finally:
        del pipe.model.generate
    assert calls == []


def test_a_model_without_codec_is_refused():
    from dataclasses import replace

    from moezoo.zoo.models.unimoe_audio import UniMoEAudio

    config = replace(create_model("test_unimoe_audio").config, codec=None, vocoder=None)
    with pytest.raises(ValueError, match="owns its codec"):
        AudioPipeline(UniMoEAudio(config))


def test_export_to_wav_writes_16_bit_pcm(tmp_path):
    wave = np.sin(np.linspace(0, 100, 1600)).astype(np.float32) * 0.5
    path = export_to_wav(wave, tmp_path / "tone.wav", SAMPLE_RATE)
    read, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and soundfile.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(read, wave, atol=1 / 2**15)
    with pytest.raises(ValueError, match=r"must end in \.wav"):
        export_to_wav(wave, tmp_path / "tone.mp3", SAMPLE_RATE)
    with pytest.raises(ValueError, match="one mono waveform"):
        export_to_wav(np.zeros((2, 10)), tmp_path / "two.wav", SAMPLE_RATE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tone.wav"]
