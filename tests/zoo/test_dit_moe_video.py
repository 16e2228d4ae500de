"""The spatio-temporal DiT-MoE (DiTMoEVideo in moezoo.zoo.models.dit_moe) against per-frame / per-patch loops written here.

References: the image DiT-MoE run frame by frame (what a video model initialised from it must compute), a
hand-written attention across frames (softmax(q k^T / sqrt(d)) v per head, looped over patches), the sin-cos
formula, and the rectified-flow / DDPM training targets computed by hand from the same random draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moezoo.zoo.models.dit_moe as video_module
from moezoo.zoo import create_model
from moezoo.zoo.hub import WEIGHTS_DIR
from moezoo.zoo.layers.blocks import sincos_pos_embed_1d
from moezoo.zoo.models.dit_moe import DiTMoE, DiTMoEVideo, DiTMoEVideoConfig
from tolerance import fp_tolerance

# whole 2-layer networks (spatial + temporal attention and FFN per layer), longest reduction the 256 timestep
# features; random text embeddings make activations of ~1e2 (hence their scale)
TOL = fp_tolerance(torch.float32, 256, layers=6)
TEXT_TOL = fp_tolerance(torch.float32, 256, layers=6, scale=100.0)
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_experts=4,
             top_k=2, num_classes=5, learn_sigma=False, num_frames=3)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (adaLN and output layers included), so no part is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def clip(batch=2, frames=3, channels=3, size=8, seed=1) -> torch.Tensor:
    return torch.randn(batch, frames, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_sincos_1d_matches_formula():
    table = sincos_pos_embed_1d(8, 5)
    assert table.shape == (5, 8)
    for f in (0, 3, 4):
        for i in range(4):
            w = 10000 ** (-i / 4)
            assert table[f, i].item() == pytest.approx(math.sin(f * w), abs=1e-6)
            assert table[f, 4 + i].item() == pytest.approx(math.cos(f * w), abs=1e-6)


def test_init_from_image_computes_the_image_model_on_every_frame():
    image = randomise(DiTMoE(DiTMoEVideoConfig(**SMALL).image_config())).eval()
    video = DiTMoEVideo.from_image_checkpoint(image).eval()
    x, t, y = clip(), torch.tensor([0.3, 0.8]), torch.tensor([1, 4])
    with torch.no_grad():
        out = video(x, t, y)
        per_frame = torch.stack([image(x[:, f], t, y) for f in range(x.shape[1])], dim=1)
    assert out.shape == x.shape
    torch.testing.assert_close(out, per_frame, **TOL)


def test_init_from_image_resets_temporal_layers_and_rejects_other_architectures():
    config = DiTMoEVideoConfig(**SMALL)
    video = randomise(DiTMoEVideo(config), seed=3)
    image = randomise(DiTMoE(config.image_config()), seed=4)
    video.init_from_image(image.state_dict())
    for layer in video.temporal_blocks:
        assert not layer.adaLN_modulation[-1].weight.any() and not layer.adaLN_modulation[-1].bias.any()
    assert torch.equal(video.blocks[1].moe.w_in, image.blocks[1].moe.w_in)
    wider = DiTMoE(DiTMoEVideoConfig(**{**SMALL, "hidden_size": 64}).image_config())
    with pytest.raises(ValueError, match="mis-shaped"):
        video.init_from_image(wider)
    with pytest.raises(TypeError, match="already a video model"):
        video.init_from_image(DiTMoEVideo(config))


def reference_temporal(layer, x_BFND, c_BD, pos_FD):
    """Attention across frames written out: per patch, per head, softmax(q k^T / sqrt(d)) v."""
    B, Fr, N, D = x_BFND.shape
    H = layer.attn.num_heads
    d = D // H
    shift, scale, gate = layer.adaLN_modulation(c_BD).chunk(3, dim=-1)
    out = x_BFND.clone()
    for b in range(B):
        for n in range(N):
            seq = x_BFND[b, :, n]  # [F, D]
            h = F.layer_norm(seq, (D,), eps=1e-6) * (1 + scale[b]) + shift[b] + pos_FD
            q, k, v = (h @ layer.attn.qkv.weight.T + layer.attn.qkv.bias).split(D, dim=-1)
            heads = []
            for i in range(H):
                qi, ki, vi = (m[:, i * d:(i + 1) * d] for m in (q, k, v))
                heads.append(torch.softmax(qi @ ki.T / math.sqrt(d), dim=-1) @ vi)
            attended = torch.cat(heads, dim=-1) @ layer.attn.proj.weight.T + layer.attn.proj.bias
            out[b, :, n] = seq + gate[b] * attended
    return out


def test_factorized_forward_matches_frame_and_patch_loops():
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**SMALL))).eval()
    x, t, y = clip(), torch.tensor([0.2, 0.7]), torch.tensor([0, 3])
    B, Fr = x.shape[:2]
    with torch.no_grad():
        c_BD = model.t_embedder(t) + model.y_embedder(y)
        pos_FD = sincos_pos_embed_1d(32, Fr)
        h = torch.stack([model.x_embedder(x[:, f]) + model.pos_embed for f in range(Fr)], dim=1)  # [B, F, N, D]
        for block, temporal in zip(model.blocks, model.temporal_blocks):
            h = torch.stack([block(h[:, f], c_BD) for f in range(Fr)], dim=1)
            h = reference_temporal(temporal, h, c_BD, pos_FD)
        expected = torch.stack([model.unpatchify(model.final_layer(h[:, f], c_BD)) for f in range(Fr)], dim=1)
        torch.testing.assert_close(model(x, t, y), expected, **TOL)


def test_text_reaches_temporal_layers_through_their_own_projection():
    """Spatial blocks and the final layer see c = t + W text; temporal layers see c + W_t text."""
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**{**SMALL, "num_classes": 0, "text_dim": 6}))).eval()
    x, t = clip(), torch.tensor([0.2, 0.7])
    text = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    Fr = x.shape[1]
    with torch.no_grad():
        c_BD = model.t_embedder(t) + text @ model.text_embedder.weight.T + model.text_embedder.bias
        c_temporal = c_BD + text @ model.temporal_text_embedder.weight.T + model.temporal_text_embedder.bias
        pos_FD = sincos_pos_embed_1d(32, Fr)
        h = torch.stack([model.x_embedder(x[:, f]) + model.pos_embed for f in range(Fr)], dim=1)
        for block, temporal in zip(model.blocks, model.temporal_blocks):
            h = torch.stack([block(h[:, f], c_BD) for f in range(Fr)], dim=1)
            h = reference_temporal(temporal, h, c_temporal, pos_FD)
        expected = torch.stack([model.unpatchify(model.final_layer(h[:, f], c_BD)) for f in range(Fr)], dim=1)
        torch.testing.assert_close(model(x, t, text_emb=text), expected, **TEXT_TOL)
        # The null text (None) is zeros on both paths.
        null = model(x, t, text_emb=torch.zeros(2, 6))
        torch.testing.assert_close(model(x, t), null, **TOL)


def test_init_from_image_zeroes_the_temporal_text_projection():
    config = DiTMoEVideoConfig(**{**SMALL, "num_classes": 0, "text_dim": 6})
    video = randomise(DiTMoEVideo(config), seed=3)
    image = randomise(DiTMoE(config.image_config()), seed=4)
    video.init_from_image(image)
    assert not video.temporal_text_embedder.weight.any() and not video.temporal_text_embedder.bias.any()
    assert torch.equal(video.text_embedder.weight, image.text_embedder.weight)
    x, t, text = clip(), torch.tensor([0.4, 0.9]), torch.randn(2, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # still exactly the image model on every frame, text included
        per_frame = torch.stack([image.eval()(x[:, f], t, text_emb=text) for f in range(x.shape[1])], dim=1)
        # batched frames vs one frame at a time round differently; random text makes activations of ~1e2
        torch.testing.assert_close(video.eval()(x, t, text_emb=text), per_frame, **TEXT_TOL)


def test_learned_words_add_their_vector_to_captions_that_contain_them():
    """encode_text = the tower's pooled embedding + the sum of the learned vectors of the words a caption has."""
    model = create_model("test_dit_moe_video", learned_words=("up", "down")).eval()
    assert not model.word_vectors.any()  # zero-initialised: a fresh model encodes text as its tower does
    with torch.no_grad():
        model.word_vectors.copy_(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
        captions = ["a red square moving up", "a red square moving down", "a red square moving left", "up and down"]
        pooled = model.text_encoder.encode(captions)[1]
        up, down = model.word_vectors
        expected = pooled + torch.stack([up, down, torch.zeros_like(up), up + down])
        torch.testing.assert_close(model.encode_text(captions), expected)
    # The vectors train (the tower may be frozen) and are part of the state dict (saved with the weights).
    model.text_encoder.requires_grad_(False)
    model.encode_text(["moving up"]).sum().backward()
    assert model.word_vectors.grad[0].abs().sum() > 0 and not model.word_vectors.grad[1].any()
    assert "word_vectors" in model.state_dict()
    with pytest.raises(ValueError, match="exactly one token"):
        create_model("test_dit_moe_video", learned_words=("leftwards and up",))
    with pytest.raises(ValueError, match="needs a text encoder"):
        DiTMoEVideoConfig(**SMALL, learned_words=("up",))


def test_init_from_image_starts_learned_words_at_zero():
    video = create_model("test_dit_moe_video", learned_words=("up",))
    with torch.no_grad():
        video.word_vectors.fill_(1.0)
    image = DiTMoE(video.config.image_config())
    video.init_from_image(image)
    assert not video.word_vectors.any()


def test_full_spacetime_attends_over_all_frames_tokens():
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**SMALL, spacetime="full"))).eval()
    assert len(model.temporal_blocks) == 0
    x, t, y = clip(), torch.tensor([0.2, 0.7]), torch.tensor([0, 3])
    B, Fr = x.shape[:2]
    with torch.no_grad():
        c_BD = model.t_embedder(t) + model.y_embedder(y)
        pos_FD = sincos_pos_embed_1d(32, Fr)
        tokens = torch.cat([model.x_embedder(x[:, f]) + model.pos_embed + pos_FD[f] for f in range(Fr)], dim=1)
        for block in model.blocks:
            tokens = block(tokens, c_BD)
        N = tokens.shape[1] // Fr
        expected = torch.stack([model.unpatchify(model.final_layer(tokens[:, f * N:(f + 1) * N], c_BD))
                                for f in range(Fr)], dim=1)
        torch.testing.assert_close(model(x, t, y), expected, **TOL)
    assert [m.shape for m in model.routing_maps()] == [(2, 3, 4, 4)] * 2  # frame-major tokens -> per frame


def test_temporal_layers_mix_frames_once_trained():
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**SMALL))).eval()
    x = clip(batch=1)
    changed = x.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        a, b = model(x, 0.5, torch.tensor([1])), model(changed, 0.5, torch.tensor([1]))
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3  # frame 2 sees frame 0


def test_routing_maps_are_the_routers_top1_per_frame_and_patch():
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**SMALL))).eval()
    inputs = {}
    hooks = [block.moe.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, block in enumerate(model.blocks)]
    x = clip(batch=2, frames=3)
    with torch.no_grad():
        model(x, 0.5, torch.tensor([0, 1]))
    for hook in hooks:
        hook.remove()
    maps = model.routing_maps()
    assert len(maps) == 2
    for i, block in enumerate(model.blocks):
        h = inputs[i]  # [B * F, N, D], b = clip * F + frame
        top1 = (h @ block.moe.router.weight.T).argmax(-1)
        assert maps[i].shape == (2, 3, 4, 4)
        for b in range(2):
            for f in range(3):
                assert torch.equal(maps[i][b, f].flatten(), top1[b * 3 + f])


@pytest.mark.parametrize("objective", ["rf", "ddpm"])
def test_training_loss_matches_hand_computed_targets(objective):
    model = randomise(DiTMoEVideo(DiTMoEVideoConfig(**SMALL, class_dropout_prob=0.5))).eval()
    x0, y = clip(), torch.tensor([2, 3])
    loss, aux = model.training_loss(x0, y, objective=objective, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws in the same order: dropout, noise, t
    drop = torch.rand(2, generator=g) < 0.5
    y_used = torch.where(drop, torch.full_like(y, 5), y)
    noise = torch.randn(x0.shape, generator=g)
    if objective == "rf":
        t = torch.sigmoid(torch.randn(2, generator=g))
        z = (1 - t.view(2, 1, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1, 1) * noise
        target = noise - x0
    else:
        t = torch.randint(0, 1000, (2,), generator=g)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(2, 1, 1, 1, 1)
        z = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        target = noise
    with torch.no_grad():
        expected = ((model(z, t, y_used) - target) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, **TOL)
    assert aux.item() > 0


def test_bad_inputs_raise_clear_errors():
    model = DiTMoEVideo(DiTMoEVideoConfig(**SMALL))
    with pytest.raises(ValueError, match=r"clip \[B, F, 3, 8, 8\] with F >= 1"):
        model(torch.randn(2, 0, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="clip"):
        model(torch.randn(2, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        DiTMoEVideoConfig(**{**SMALL, "num_frames": 0})
    with pytest.raises(ValueError, match="unknown spacetime"):
        DiTMoEVideoConfig(**SMALL, spacetime="diagonal")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiTMoEVideoConfig(**{**SMALL, "input_size": 9})
    with pytest.raises(RuntimeError, match="run a forward first"):
        model.routing_maps()


def test_registered_models_build_and_bundled_weights_are_small():
    model = create_model("test_dit_moe_video", num_frames=2)
    assert isinstance(model, DiTMoEVideo) and model.config.num_frames == 2
    with pytest.raises(TypeError, match="unknown DiT-MoE video argument"):
        create_model("test_dit_moe_video", frames=2)
    weights = Path(WEIGHTS_DIR) / "dit_moe_shapes_video.safetensors"
    if not weights.is_file():
        pytest.skip("bundled dit_moe_shapes_video weights not present")
    assert weights.stat().st_size < 20 * 2**20
    bundled = create_model("dit_moe_shapes_video", pretrained=True)
    assert bundled.config.num_frames == 8 and bundled.config.input_size == 32
    assert video_module.dit_moe_shapes_video.__name__ == "dit_moe_shapes_video"
