"""ImageEncoder: patch tokens of timm and open_clip towers, checked against the towers' own modules run by
hand; input normalisation; the user's weights file (weights-only); readable errors."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from moezoo.encoders.image import IMAGE_CONFIGS, TINY_IMAGE_MODEL, ImageEncoder


def images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tokens_by_hand(tower, x, blocks):
    """The ViT run module by module: patches, position embedding, the first ``blocks`` blocks."""
    t = tower.norm_pre(tower._pos_embed(tower.patch_embed(x)))
    for block in tower.blocks[:blocks]:
        t = block(t)
    return t


def test_our_tiny_vit_sees_minus_one_to_one_unchanged_and_returns_patch_tokens():
    encoder = ImageEncoder().eval()
    x = images()
    with torch.no_grad():
        got = encoder(x)
        expected = encoder.tower.norm(tokens_by_hand(encoder.tower, x, len(encoder.tower.blocks)))[:, 1:]
    assert got.shape == (2, 64, 128) and encoder.dim == 128  # 64 px / patches of 8 -> 8 x 8 tokens
    torch.testing.assert_close(got, expected)


def test_layer_minus_two_is_the_output_of_the_second_to_last_block():
    encoder = ImageEncoder(layer=-2).eval()
    x = images()
    with torch.no_grad():
        expected = tokens_by_hand(encoder.tower, x, len(encoder.tower.blocks) - 1)[:, 1:]
        torch.testing.assert_close(encoder(x), expected)


def test_a_pretrained_towers_normalisation_is_applied():
    encoder = ImageEncoder("convnext_atto").eval()  # ImageNet mean and std
    mean_picture = (encoder.mean * 2 - 1).expand(1, 3, 32, 32)  # normalises to exactly zero
    with torch.no_grad():
        got = encoder(mean_picture)
        expected = encoder.tower.forward_features(torch.zeros(1, 3, 32, 32))
    assert got.shape == (1, 1, 320)
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2))


def test_a_cnn_map_becomes_row_major_tokens():
    encoder = ImageEncoder("convnext_atto").eval()
    x = images(1, 96)
    with torch.no_grad():
        feature_map = encoder.tower.forward_features((((x + 1) / 2) - encoder.mean) / encoder.std)
        tokens = encoder(x)
    h, w = feature_map.shape[-2:]
    assert tokens.shape == (1, h * w, 320)
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(tokens[0, i * w + j], feature_map[0, :, i, j])


def test_the_users_weights_file_is_loaded(tmp_path):
    trained = ImageEncoder(depth=1).eval()
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in trained.tower.state_dict().items()}, str(path))
    again = ImageEncoder(depth=1, checkpoint_path=path).eval()
    fresh = ImageEncoder(depth=1).eval()
    with torch.no_grad():
        x = images()
        torch.testing.assert_close(again(x), trained(x))  # same weights, same [-1, 1] normalisation
        assert not torch.allclose(fresh(x), trained(x))


class Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "hostile.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|WeightsUnpickler"):
        ImageEncoder(depth=1, checkpoint_path=path)
    assert "the payload ran" not in capsys.readouterr().out


def test_open_clip_visual_tower_gives_its_patch_tokens():
    encoder = ImageEncoder.from_open_clip("ViT-B-32").eval()
    with torch.no_grad():
        tokens = encoder(images(1, 224))
    assert tokens.shape == (1, 49, 768) and encoder.dim == 768  # 224 / 32 = 7 x 7 patches, width 768


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(name="not_a_model_at_all"), ValueError, "unknown image encoder"),
    (dict(layer=7), ValueError, "layer must be in"),
    (dict(checkpoint_path="/nonexistent.safetensors"), FileNotFoundError, "is not a file"),
])
def test_bad_arguments_say_what_was_wrong(kwargs, error, message):
    with pytest.raises(error, match=message):
        ImageEncoder(**kwargs)


def test_bad_image_shapes_are_refused():
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        ImageEncoder()(torch.zeros(3, 64, 64))
    assert TINY_IMAGE_MODEL in IMAGE_CONFIGS
