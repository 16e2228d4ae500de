"""TextEncoder (moezoo.encoders.text): open_clip text towers, no downloads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from moezoo.encoders.text import TINY_TEXT_MODEL, TextEncoder

PROMPTS = ["a red circle", "a small blue square on the left", ""]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(TINY_TEXT_MODEL)


def test_shapes_and_interface(encoder):
    tokens, pooled = encoder.encode(PROMPTS)
    assert encoder.output_dim == 64 and encoder.context_length == 16
    assert tokens.shape == (3, 16, 64) and pooled.shape == (3, 64)
    assert encoder.tokenize(PROMPTS).shape == (3, 16) and encoder.tokenize(PROMPTS).dtype == torch.long
    assert encoder.encode("a red circle")[1].shape == (1, 64)
    assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])
    with pytest.raises(TypeError):
        encoder.encode([1, 2])


def test_deterministic_and_prompts_differ(encoder):
    with torch.no_grad():
        first, again = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], again[1], rtol=0, atol=0)
    pooled = first[1]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(pooled[i], pooled[j], atol=1e-4)


def test_padding_and_batch_do_not_change_a_prompt(encoder):
    with torch.no_grad():
        alone_tokens, alone = encoder.encode(["a red circle"])
        long_prompt = "a very long prompt about many red and green shapes here"
        batch_tokens, batch = encoder.encode([long_prompt, "a red circle"])
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_tokens[1], alone_tokens[0], rtol=1e-5, atol=1e-5)
    # the pooled output is the projected feature of the end-of-text token
    ids = encoder.tokenize(["a red circle"])
    torch.testing.assert_close(alone[0], alone_tokens[0, ids[0].argmax()], rtol=1e-5, atol=1e-5)


def test_open_clip_config_random_init_and_context_length():
    encoder = TextEncoder("RN50", context_length=8)  # a built-in config: width 512, 12 layers, embed 1024
    assert encoder.output_dim == 1024 and encoder.context_length == 8
    tokens, pooled = encoder.encode(["a dog", "a cat"])
    assert tokens.shape == (2, 8, 1024) and pooled.shape == (2, 1024)


def test_pretrained_checkpoint_matches_open_clip_encode_text(tmp_path):
    """A tiny full CLIP registered with open_clip and saved to a file: our text tower's pooled output equals
    the full model's encode_text."""
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "moezoo-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "moezoo-test-clip.json")
    torch.manual_seed(3)
    full = open_clip.create_model("moezoo-test-clip").eval()
    torch.save(full.state_dict(), tmp_path / "weights.pt")
    encoder = TextEncoder("moezoo-test-clip", pretrained=str(tmp_path / "weights.pt"))
    ids = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(PROMPTS)[1], full.encode_text(ids), rtol=1e-5, atol=1e-5)
    assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())


def test_errors():
    with pytest.raises(ValueError, match="unknown text encoder config"):
        TextEncoder("no-such-model")
    with pytest.raises(ValueError, match="pretrained must be None"):
        TextEncoder(TINY_TEXT_MODEL, pretrained="openai")
