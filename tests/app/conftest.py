"""Tiny pipelines for the app tests: the real pipeline classes around random-weight models a few thousand
parameters large, so every tab runs in well under a second and no trained weights are needed."""

import socket
import struct
import zlib

import pytest
import torch
from helpers import randomise

from moezoo.pipelines import AudioPipeline, DiTMoEPipeline, DiTMoEVideoPipeline, VisualQAPipeline
from moezoo.pipelines.deweather import DeweatherPipeline
from moezoo.pipelines.fusion import FusionPipeline
from moezoo.training.datasets.audio import caption_vocabulary
from moezoo.zoo import create_model

TINY_DIT = dict(depth=2, hidden_size=32, num_heads=2, num_experts=4)
# Random gate logits are O(1), so every token's top-p set over 4 routed + 1 null experts is the same size:
# sharper gates make the number of experts change from frame to frame, which the audio tab's tests must see.
AUDIO_GATE_SHARPNESS = 6.0


def tiny_audio_pipeline(seed: int = 5) -> AudioPipeline:
    """A tiny random text-to-audio pipeline that reads the bundled model's prompts (the caption vocabulary, up
    to 8 words): 12 frames of 3 codebooks, 2 DCMoE layers."""
    model = randomise(create_model("test_unimoe_audio", vocabulary=caption_vocabulary(), max_text_tokens=8), seed=seed)
    with torch.no_grad():
        for block in model.blocks:
            block.moe.gate.weight.mul_(AUDIO_GATE_SHARPNESS)
    return AudioPipeline(model)


def tiny_digits_pipeline(**overrides) -> DiTMoEPipeline:
    """A tiny random class-to-image pipeline of the digits tab's kind (``overrides``: DiT-MoE config fields)."""
    model = randomise(create_model("dit_moe_digits", **{**TINY_DIT, **overrides}))
    return DiTMoEPipeline(model, label_names=[str(d) for d in range(10)])


def make_tiny_pipelines() -> dict:
    """zoo model name -> a tiny pipeline of the class the app uses for it."""
    pipes = {
        "dit_moe_digits": tiny_digits_pipeline(),
        "dit_moe_shapes": DiTMoEPipeline(randomise(create_model("dit_moe_shapes", **TINY_DIT), seed=1)),
        "dit_moe_shapes_video": DiTMoEVideoPipeline(randomise(create_model("test_dit_moe_video"), seed=2)),
        "mofme_weather": DeweatherPipeline(randomise(create_model("test_mofme"), seed=3)),
        "moe_fusion_irvis": FusionPipeline(randomise(create_model("test_moe_fusion"), seed=4)),
        "unimoe_audio_tiny": tiny_audio_pipeline(),
        "moe_vlm_tiny": VisualQAPipeline(randomise(create_model("test_moe_vlm", ffn="moiie"), seed=6)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture
def make_digits_pipeline():
    return tiny_digits_pipeline


@pytest.fixture
def make_audio_pipeline():
    return tiny_audio_pipeline


@pytest.fixture(scope="session")
def tiny_pipelines():
    return make_tiny_pipelines()


@pytest.fixture(scope="session")
def tiny_loader(tiny_pipelines):
    return lambda tab: tiny_pipelines[tab.model]


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_header_only(path, width: int, height: int):
    """A PNG that says it is ``width`` x ``height`` (8-bit RGB) and costs about 80 bytes: signature, IHDR, an
    empty IDAT and IEND, written from the PNG spec. Opening it reads only the header, so it tests size limits
    without the memory of a real picture of that size; decoding it would fail (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def png_header_only(tmp_path):
    """``(name, width, height) -> path``: a header-only PNG of that size in the test's folder."""
    return lambda name, width, height: _png_header_only(tmp_path / name, width, height)


@pytest.fixture
def huge_png(png_header_only):
    """A 20000x20000 PNG (400 megapixels: over PIL's own decompression-bomb limit, 2 x 89.5 megapixels)."""
    return png_header_only("huge.png", 20000, 20000)
