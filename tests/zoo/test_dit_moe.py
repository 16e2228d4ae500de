"""DiT-MoE (moezoo.zoo.models.dit_moe) against an independent re-implementation of the official model.

``OfficialDiT`` below is written here from the equations of feizc/DiT-MoE's ``models.py`` (as summarised in
the reference notes), in the official state-dict layout: timm attention (or the XL/G flash variant with q/k
LayerNorm), ``moe.gate.weight``, a ModuleList of per-expert ``gate_proj/up_proj/down_proj`` Linears looped
over, softmax top-k without renormalisation, a shared expert. Its random weights (adaLN and output layer
included, so nothing is trivially zero) are loaded into our model through ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from moezoo.zoo.layers.moe import MoE
from moezoo.zoo.layers.moh import MoHAttention
from moezoo.zoo import diffusion
from moezoo.zoo.models.dit_moe import DiTMoE, DiTMoEConfig, checkpoint_filter_fn
from moezoo.zoo.registry import create_model
from helpers import randomise
from tolerance import fp_tolerance

# whole test_dit_moe networks: 2 blocks of attention + FFN, the longest reduction the 256 timestep features
TOL = fp_tolerance(torch.float32, 256, layers=4)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden=32, depth=2, heads=2, experts=4, top_k=2, classes=10)


# ------------------------------------------------------------------------------------- official reference


class OfficialAttention(nn.Module):
    def __init__(self, dim, heads, flash=False):
        super().__init__()
        self.heads, self.flash = heads, flash
        if flash:
            self.Wqkv = nn.Linear(dim, 3 * dim)
            self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.out_proj = nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        hd = D // self.heads
        qkv = (self.Wqkv if self.flash else self.qkv)(x).view(B, N, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
        if self.flash:
            q, k = self.q_norm(q), self.k_norm(k)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(hd)
        out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).reshape(B, N, D)
        return (self.out_proj if self.flash else self.proj)(out)


class OfficialExpert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class OfficialGate(nn.Module):
    def __init__(self, dim, experts):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, dim))


class OfficialMoE(nn.Module):
    def __init__(self, dim, experts, top_k, mlp_ratio=4, n_shared=2):
        super().__init__()
        self.top_k = top_k
        self.gate = OfficialGate(dim, experts)
        self.experts = nn.ModuleList(OfficialExpert(dim, mlp_ratio * dim) for _ in range(experts))
        self.shared_experts = OfficialExpert(dim, n_shared * dim)

    def forward(self, h):
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        scores = (h @ self.gate.weight.t()).softmax(-1)
        weight, idx = scores.topk(self.top_k, dim=-1)  # not renormalised
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                y = y.index_add(0, token, weight[token, slot, None] * expert(h[token]))
        return (y + self.shared_experts(h)).reshape(shape)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class OfficialBlock(nn.Module):
    def __init__(self, dim, heads, experts, top_k, flash):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = OfficialAttention(dim, heads, flash)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.moe = OfficialMoE(dim, experts, top_k)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.moe(modulate(self.norm2(x), s2, sc2))


class OfficialDiT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden, depth, heads, experts, top_k, classes,
                 flash=False):
        super().__init__()
        self.p, self.c_out = patch_size, 2 * in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch_size) ** 2, hidden), requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, hidden)
        self.blocks = nn.ModuleList(OfficialBlock(hidden, heads, experts, top_k, flash) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden, patch_size**2 * self.c_out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    @staticmethod
    def timestep_features(t, dim=256):
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, x, t, y):
        B, _, H, W = x.shape
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(self.timestep_features(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(modulate(self.final_layer.norm_final(tokens), shift, scale))
        g, p = H // self.p, self.p
        # out[b, i*g + j, (a*p + b2)*C + ch] is pixel (i*p + a, j*p + b2) of channel ch
        return out.reshape(B, g, g, p, p, self.c_out).permute(0, 5, 1, 3, 2, 4).reshape(B, self.c_out, H, W)


def official_model(flash=False, seed=0):
    return randomise(OfficialDiT(**TINY, flash=flash), seed).eval()


def tiny_inputs(batch=3, seed=1, float_t=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.rand(batch, generator=gen) * (1.0 if float_t else 999)
    y = torch.tensor([3, 10, 7, 0, 9][:batch])  # 10 = the null class
    return x, t, y


def loaded(state_dict, **overrides):
    model = create_model("test_dit_moe", **overrides).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model


# ------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("flash", [False, True], ids=["timm_attention", "flash_qk_norm"])
def test_matches_official_forward(flash):
    official = official_model(flash)
    ours = loaded(official.state_dict(), qk_norm=flash)
    for float_t in (True, False):  # rectified-flow times in [0, 1] and DDPM step ids
        x, t, y = tiny_inputs(float_t=float_t)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, y), official(x, t, y), **TOL)


def test_official_experts_are_stacked_as_documented():
    official = official_model()
    ours = loaded(official.state_dict())
    moe, ref = ours.blocks[1].moe, official.blocks[1].moe
    F = moe.hidden_dim
    for e, expert in enumerate(ref.experts):
        torch.testing.assert_close(moe.w_in[e, :F], expert.gate_proj.weight)
        torch.testing.assert_close(moe.w_in[e, F:], expert.up_proj.weight)
        torch.testing.assert_close(moe.w_out[e], expert.down_proj.weight)
    torch.testing.assert_close(moe.router.weight, ref.gate.weight)
    torch.testing.assert_close(moe.shared.down_proj.weight, ref.shared_experts.down_proj.weight)


def test_train_checkpoint_wrapper_and_registry_checkpoint_path(tmp_path):
    official, other = official_model(seed=0), official_model(seed=5)
    wrapped = {"model": official.state_dict(), "ema": other.state_dict(), "opt": {"state": {}}, "args": {"lr": 1e-4}}
    x, t, y = tiny_inputs()
    with torch.no_grad():
        expected = official(x, t, y)
        torch.testing.assert_close(loaded(wrapped)(x, t, y), expected, **TOL)
        torch.testing.assert_close(loaded({"ema": official.state_dict()})(x, t, y), expected, **TOL)
        path = tmp_path / "checkpoint.pt"
        torch.save(wrapped, path)
        model = create_model("test_dit_moe", checkpoint_path=path).eval()
        torch.testing.assert_close(model(x, t, y), expected, **TOL)
        model = create_model("test_dit_moe", checkpoint_path=path, checkpoint_key="ema").eval()
        torch.testing.assert_close(model(x, t, y), other(x, t, y), **TOL)


def test_filter_passes_our_own_keys():
    model = randomise(create_model("test_dit_moe"))
    again = create_model("test_dit_moe")
    again.load_state_dict(checkpoint_filter_fn(model.state_dict(), again), strict=True)
    x, t, y = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), model(x, t, y))


def test_filter_is_strict():
    sd = official_model().state_dict()
    model = create_model("test_dit_moe")
    with pytest.raises(ValueError, match=r"blocks\.0\.moe\.bogus"):
        checkpoint_filter_fn({**sd, "blocks.0.moe.bogus": torch.zeros(1)}, model)
    incomplete = {k: v for k, v in sd.items() if k != "blocks.1.moe.experts.2.up_proj.weight"}
    with pytest.raises(ValueError, match=r"block 1.*incomplete \[2\]"):
        checkpoint_filter_fn(incomplete, model)
    with pytest.raises(ValueError, match="qk_norm=True"):
        checkpoint_filter_fn(official_model(flash=True).state_dict(), model)
    with pytest.raises(ValueError, match="experts"):
        checkpoint_filter_fn(sd, create_model("test_dit_moe", dense_ffn=True))


def test_sincos_positions_match_mae_formula():
    def mae_1d(dim, pos):  # MAE's get_1d_sincos_pos_embed_from_grid, restated
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 32, 4
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # w first, as MAE
    expected = np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)
    model = create_model("test_dit_moe")
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(expected).float())
    assert not model.pos_embed.requires_grad


# ------------------------------------------------------------------------------------- interface


def test_shapes_class_and_text_conditioning():
    x, t, y = tiny_inputs()
    model = create_model("test_dit_moe")
    assert model(x, t, y).shape == (3, 8, 8, 8)
    assert model(x, 0.5).shape == (3, 8, 8, 8)  # scalar t, no label = null class
    assert create_model("test_dit_moe", learn_sigma=False)(x, t, y).shape == (3, 4, 8, 8)

    text_model = randomise(create_model("test_dit_moe", num_classes=0, text_dim=16)).eval()
    assert text_model.y_embedder is None
    text = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = text_model(x, t, text_emb=text)
        assert out.shape == (3, 8, 8, 8)
        assert not torch.allclose(out, text_model(x, t, text_emb=text.flip(0)))
        torch.testing.assert_close(text_model(x, t), text_model(x, t, text_emb=torch.zeros(3, 16)))
    with pytest.raises(ValueError, match="no class conditioning"):
        text_model(x, t, y)
    with pytest.raises(ValueError, match="text_emb"):
        text_model(x, t, text_emb=torch.randn(3, 5))
    with pytest.raises(ValueError, match="no text conditioning"):
        model(x, t, y, text_emb=text)
    with pytest.raises(ValueError, match=r"x must be"):
        model(torch.randn(3, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, torch.tensor([0, 1, 11]))


def test_initialisation_is_adaln_zero():
    model = create_model("test_dit_moe")
    x, t, y = tiny_inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0  # zero output layer
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


@pytest.mark.parametrize("objective", ["rf", "ddpm"])
def test_training_loss_reaches_experts_and_router(objective):
    model = randomise(create_model("test_dit_moe", num_classes=10, text_dim=8), seed=2).train()
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y, text = torch.tensor([1, 2, 3, 4]), torch.randn(4, 8)
    loss, aux = model.training_loss(x0, y, text, objective=objective, generator=torch.Generator().manual_seed(7))
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(aux) and aux > 0
    expected_aux = sum(block.moe.routing.aux_loss for block in model.blocks)
    torch.testing.assert_close(aux, expected_aux)
    (loss + aux).backward()
    for block in model.blocks:
        for param in (block.moe.w_in, block.moe.w_out, block.moe.router.weight, block.moe.shared.up_proj.weight):
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0
    assert torch.count_nonzero(model.text_embedder.weight.grad) > 0
    again, _ = model.training_loss(x0, y, text, objective=objective, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, loss)  # the generator fixes t, noise and condition dropout


def test_training_loss_objectives_by_hand():
    """rf: logit-normal t, z = (1-t) x0 + t eps, target eps - x0; ddpm: linear-beta alpha_bar, target eps."""
    model = randomise(create_model("test_dit_moe", class_dropout_prob=0.0), seed=4).eval()
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(11)
    eps, n = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, generator=gen)
    t = torch.sigmoid(n)[:, None, None, None]
    with torch.no_grad():
        expected = ((model((1 - t) * x0 + t * eps, t.flatten(), y)[:, :4] - (eps - x0)) ** 2).mean()
        loss, _ = model.training_loss(x0, y, objective="rf", generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(loss, expected)

    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = torch.from_numpy(np.cumprod(1 - betas))
    torch.testing.assert_close(diffusion.ddpm_alphas_cumprod(), alpha_bar)
    gen = torch.Generator().manual_seed(12)
    eps, steps = torch.randn(2, 4, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen)
    a = alpha_bar[steps].float()[:, None, None, None]
    with torch.no_grad():
        expected = ((model(a.sqrt() * x0 + (1 - a).sqrt() * eps, steps, y)[:, :4] - eps) ** 2).mean()
        loss, _ = model.training_loss(x0, y, objective="ddpm", generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="objective"):
        model.training_loss(x0, y, objective="edm")


def test_time_shift_moves_training_times_toward_noise():
    """time_shift s: t' = s t / (1 + (s - 1) t) on the logit-normal draw (SD3); 1 leaves t alone."""
    assert diffusion.shift_time(torch.tensor([0.0, 0.5, 1.0]), 4.0).tolist() == pytest.approx([0.0, 0.8, 1.0])
    model = randomise(create_model("test_dit_moe", class_dropout_prob=0.0, time_shift=3.0), seed=4).eval()
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(11)
    eps, n = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, generator=gen)
    u = torch.sigmoid(n)
    t = (3 * u / (1 + 2 * u))[:, None, None, None]
    with torch.no_grad():
        expected = ((model((1 - t) * x0 + t * eps, t.flatten(), y)[:, :4] - (eps - x0)) ** 2).mean()
        loss, _ = model.training_loss(x0, y, objective="rf", generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="time_shift must be > 0"):
        create_model("test_dit_moe", time_shift=0.0)


def test_routing_maps():
    model = randomise(create_model("test_dit_moe")).eval()
    with pytest.raises(RuntimeError, match="forward"):
        model.routing_maps()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        model(x, t, y)
    maps = model.routing_maps()
    assert len(maps) == 2
    for block, grid in zip(model.blocks, maps):
        assert grid.shape == (3, 4, 4) and grid.dtype == torch.long
        assert int(grid.min()) >= 0 and int(grid.max()) < 4
        record = block.moe.routing
        assert record.tokens_shape == (3, 16)
        torch.testing.assert_close(grid.flatten(), record.probs_TE.argmax(-1))  # top-1 = the best score
    assert create_model("test_dit_moe", dense_ffn=True).routing_maps() == []


def test_forward_with_cfg():
    model = randomise(create_model("test_dit_moe"), seed=3).eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, guidance_scale=1.0), cond, **TOL)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, guidance_scale=0.0)[:, :4], uncond[:, :4], **TOL)
        guided = model.forward_with_cfg(x, t, y, guidance_scale=4.0)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), **TOL)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:], **TOL)  # every in_channel guided, sigma from cond

    text_model = randomise(create_model("test_dit_moe", num_classes=0, text_dim=8)).eval()
    text = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(text_model.forward_with_cfg(x, t, None, 1.0, text_emb=text),
                                   text_model(x, t, text_emb=text), **TOL)
    with pytest.raises(ValueError, match="guidance"):
        create_model("test_dit_moe", num_classes=0).forward_with_cfg(x, t, None, 2.0)


def test_moh_attention_option():
    model = randomise(create_model("test_dit_moe", attention="moh", num_heads=4, moh_shared_heads=1,
                                   moh_top_k_heads=2)).train()
    assert all(isinstance(block.attn, MoHAttention) for block in model.blocks)
    x, t, y = tiny_inputs()
    loss, aux = model.training_loss(x, y, objective="rf")
    moe_aux = sum(block.moe.routing.aux_loss for block in model.blocks)
    # the official MoH loss: coefficient x the head balance averaged over the layers
    moh_aux = 0.01 * sum(block.attn.routing.aux_terms["head_balance"] for block in model.blocks) / len(model.blocks)
    torch.testing.assert_close(aux, moe_aux + moh_aux)
    (loss + aux).backward()
    assert torch.count_nonzero(model.blocks[0].attn.routed_router.weight.grad) > 0
    default = create_model("test_dit_moe", attention="moh", num_heads=4).config
    assert (default.moh_shared_heads, default.moh_top_k_heads) == (2, 1)


# ------------------------------------------------------------------------------------- configs


PAPER_PARAMS = {  # reference notes §1: total (E=8, E=16) and activated, in millions
    "s": (199, 369, 72), "b": (796, 1480, 286), "l": (2820, 5240, 1010), "xl": (4170, 7740, 1490),
    "g": (8890, 16500, 3180),
}


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
def test_paper_parameter_counts(size):
    total_8, total_16, active = PAPER_PARAMS[size]
    for experts, total in ((8, total_8), (16, total_16)):
        with torch.device("meta"):
            model = create_model(f"dit_moe_{size}_2_{experts}e2a")
        assert model.num_parameters() / 1e6 == pytest.approx(total, rel=0.02)
        assert model.num_parameters(active=True) / 1e6 == pytest.approx(active, rel=0.02)
        assert model.config.in_channels == 4 and model.out_channels == 8 and model.config.num_classes == 1000
        assert model.config.objective == ("rf" if size in ("xl", "g") else "ddpm")
        assert model.blocks[0].moe.shared.up_proj.weight.shape == (2 * model.config.hidden_size,
                                                                   model.config.hidden_size)
    assert model.config.qk_norm == (size in ("xl", "g"))


def test_s2_8e2a_checkpoint_shapes():
    with torch.device("meta"):
        sd = create_model("dit_moe_s_2_8e2a").state_dict()
    assert sd["pos_embed"].shape == (1, 256, 384)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)
    assert sd["blocks.0.moe.w_in"].shape == (8, 2 * 1536, 384)
    assert sd["blocks.0.moe.w_out"].shape == (8, 384, 1536)
    assert sd["blocks.11.adaLN_modulation.1.weight"].shape == (2304, 384)
    assert sd["final_layer.linear.weight"].shape == (32, 384)


def test_small_models():
    digits, dense = create_model("dit_moe_digits"), create_model("dit_dense_digits")
    assert digits.num_parameters() * 4 < 20e6  # fp32 bytes
    assert dense.num_parameters() == dense.num_parameters(active=True)
    assert dense.num_parameters() == pytest.approx(digits.num_parameters(active=True), rel=0.01)
    assert dense.blocks[0].mlp.up_proj.weight.shape[0] == 2 * 128 + 2 * 128
    x = torch.randn(2, 1, 16, 16)
    assert digits(x, torch.rand(2), torch.tensor([1, 2])).shape == (2, 1, 16, 16)
    assert digits.config.objective == "rf" and digits.text_encoder is None
    shapes = create_model("dit_moe_shapes")
    assert shapes.num_parameters() * 2 < 20e6  # bundled in fp16
    assert shapes(torch.randn(2, 3, 32, 32), torch.rand(2), text_emb=torch.randn(2, 64)).shape == (2, 3, 32, 32)
    assert isinstance(digits.config, DiTMoEConfig) and dataclasses.asdict(shapes.config)["text_dim"] == 64
    assert shapes.config.text_encoder == "moezoo-text-tiny"
    assert any(k.startswith("text_encoder.") for k in shapes.state_dict())


def test_own_text_encoder_trains_with_the_model():
    model = randomise(create_model("test_dit_moe", num_classes=0, text_dim=64, text_encoder="moezoo-text-tiny",
                                   class_dropout_prob=0.0), seed=5)
    text_emb = model.encode_text(["a red circle", "a blue square"])
    assert text_emb.shape == (2, 64)
    loss, aux = model.training_loss(torch.randn(2, 4, 8, 8), text_emb=text_emb)
    (loss + aux).backward()
    assert torch.count_nonzero(model.text_encoder.text.token_embedding.weight.grad) > 0
    # initialize_weights leaves open_clip's text initialisation alone
    fresh = create_model("test_dit_moe", num_classes=0, text_dim=64, text_encoder="moezoo-text-tiny")
    assert fresh.text_encoder.text.transformer.resblocks[0].mlp.c_fc.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="outputs 64 features"):
        create_model("test_dit_moe", text_dim=128, text_encoder="moezoo-text-tiny")
    with pytest.raises(ValueError, match="needs text_dim"):
        create_model("test_dit_moe", text_encoder="moezoo-text-tiny")
    with pytest.raises(ValueError, match="no text encoder"):
        create_model("test_dit_moe").encode_text(["a"])


def test_entrypoint_overrides():
    model = create_model("test_dit_moe", num_experts=6, top_k=1)
    assert isinstance(model, DiTMoE) and isinstance(model.blocks[0].moe, MoE)
    assert model.blocks[0].moe.num_experts == 6 and model.config.top_k == 1
    with pytest.raises(TypeError, match="valid: input_size"):
        create_model("test_dit_moe", hiden_size=64)
