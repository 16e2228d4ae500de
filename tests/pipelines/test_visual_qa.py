"""VisualQAPipeline: inputs of every accepted kind (resized, resampled, said so), answers equal to the model's own
greedy decoding, chunked calls equal to one call, routing per token, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import randomise
from moezoo.pipelines import VisualQAPipeline
from moezoo.zoo import create_model

QUESTION = "what shape is the red object?"


@pytest.fixture(scope="module")
def pipe():
    return VisualQAPipeline(randomise(create_model("test_moe_vlm", ffn="moiie"), seed=0))


def scenes(count=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_answers_are_the_models_greedy_answers(pipe):
    images = scenes()
    out = pipe(images=images, prompt=QUESTION)
    pixels = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images]) * 2 - 1
    expected = pipe.model.generate(pixels, None, [QUESTION] * 3)
    assert out.text == expected.text and out.notes == []


def test_chunked_calls_equal_one_call(pipe):
    images = scenes(4, seed=1)
    prompts = [QUESTION, "how many circles are there?", "describe the picture.", QUESTION]
    assert pipe(images=images, prompt=prompts, max_batch_size=1).text == pipe(images=images, prompt=prompts).text


def test_other_sizes_and_rates_are_converted_and_noted(pipe):
    out = pipe(images=scenes(1, size=100)[0], prompt=QUESTION)
    assert any("resized from 100x100 to 64x64" in note for note in out.notes)
    tone = np.sin(2 * np.pi * 440 * np.arange(22_050) / 44_100).astype(np.float32)
    out = pipe(audio=(tone, 44_100), prompt="which note is this?")
    assert any("resampled from 44100 Hz to 16000 Hz" in note for note in out.notes)
    assert len(out.text) == 1


def test_routing_per_token_and_image_grid(pipe):
    out = pipe(images=scenes(2, seed=2), prompt=QUESTION, return_routing=True)
    grid = out.image_experts(0, 1)
    assert grid.shape == (4, 4)
    image_experts = set(pipe.model.blocks[0].ffn.experts_of(1))
    assert set(grid.flatten().tolist()) <= image_experts
    shares = out.modality_shares(0, 0)
    assert set(shares) == {"text", "image"}
    for per_group in shares.values():
        assert sum(per_group.values()) == pytest.approx(1.0)
    assert set(shares["image"]) <= {"image intra", "shared"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=QUESTION), "give images=..., audio=... or both"),
    (dict(images=[], prompt=QUESTION), "empty list of images"),
    (dict(images="scene.png", prompt=QUESTION), "expected a PIL image"),
    (dict(images=Image.new("RGBA", (64, 64)), prompt=QUESTION), "mode 'RGBA'"),
    (dict(images=Image.new("RGB", (64, 64)), prompt="  "), "non-empty string"),
    (dict(images=Image.new("RGB", (64, 64)), prompt=[QUESTION] * 2), "2 prompts for 1 inputs"),
    (dict(audio=np.zeros(40_000, np.float32), prompt=QUESTION), "hears at most"),
    (dict(audio=(np.zeros(100, np.float32), 8.5), prompt=QUESTION), "sampling rate"),
    (dict(audio=np.full(100, np.nan, np.float32), prompt=QUESTION), "NaN"),
    (dict(images=Image.new("RGB", (64, 64)), prompt=QUESTION, max_new_tokens=0), "max_new_tokens"),
    (dict(images=Image.new("RGB", (64, 64)), prompt=QUESTION, max_batch_size=0), "max_batch_size"),
    (dict(images=Image.new("RGB", (64, 64)), prompt=QUESTION, do_sample=True, generator=[torch.Generator()]),
     "one torch.Generator"),
])
def test_bad_input_says_what_is_accepted(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
