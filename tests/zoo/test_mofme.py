"""MoFME: the uncertainty router, the FiLM experts and the baselines against hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.zoo import create_model
from tolerance import fp_tolerance
from moezoo.zoo.layers import MoE, collect_routing, total_aux_loss
from moezoo.zoo.models.mofme import FeatureModulatedMoE, MoFME, MoFMEConfig, UncertaintyRouter, make_ffn


def router(samples=4, dropout=0.2, kappa=1.0, dim=12, experts=6, k=3):
    torch.manual_seed(0)
    return UncertaintyRouter(dim, experts, k, samples=samples, dropout=dropout, uncertainty_weight=kappa)


def test_router_eval_is_renormalised_topk_softmax_and_deterministic():
    r = router().eval()
    x = torch.randn(20, 12)
    out1, out2 = r(x), r(x)
    probs = torch.exp(x @ r.weight.detach().T)
    probs = probs / probs.sum(-1, keepdim=True)
    for t in range(20):
        order = sorted(range(6), key=lambda e: -float(probs[t, e]))[:3]
        assert out1.ids_TK[t].tolist() == order
        chosen = probs[t, order]
        torch.testing.assert_close(out1.weights_TK[t], chosen / chosen.sum())
    assert torch.equal(out1.ids_TK, out2.ids_TK) and torch.equal(out1.weights_TK, out2.weights_TK)


def test_router_training_weights_follow_the_mc_formula():
    r = router(samples=5, dropout=0.3, kappa=0.7).train()
    x = torch.randn(16, 12)
    torch.manual_seed(123)
    out = r(x)
    torch.manual_seed(123)  # the same dropout masks, drawn in the same order
    p = torch.stack([torch.softmax(F.dropout(x, 0.3, training=True) @ r.weight.T, -1) for _ in range(5)])
    mu = p.mean(0)
    sigma = ((p - mu) ** 2).mean(0).sqrt()
    for t in range(16):
        ids = out.ids_TK[t]
        assert set(ids.tolist()) == set(mu[t].topk(3).indices.tolist())
        raw = mu[t, ids] * torch.exp(-0.7 * sigma[t, ids] / mu[t, ids])
        torch.testing.assert_close(out.weights_TK[t], raw / raw.sum(), **fp_tolerance(torch.float32, 8))
    torch.testing.assert_close(out.probs_TE, mu)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_router_weights_are_well_formed(mode):
    r = router(samples=4, dropout=0.5, kappa=5.0)
    r.train(mode == "train")
    x = torch.randn(300, 12) * 30  # extreme logits: near-one-hot softmax
    out = r(x)
    assert torch.isfinite(out.weights_TK).all() and (out.weights_TK > 0).all()
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(300))
    assert (out.ids_TK >= 0).all() and (out.ids_TK < 6).all()
    assert all(len(set(row)) == 3 for row in out.ids_TK.tolist())


def test_router_learns_from_the_uncertainty_term():
    r = router().train()
    out = r(torch.randn(32, 12))
    (out.weights_TK[:, 0]).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("film", ["vector", "linear"])
def test_film_moe_matches_a_per_token_loop(film):
    torch.manual_seed(0)
    D, E, k = 8, 4, 2
    moe = FeatureModulatedMoE(D, 16, E, k, film=film, router=UncertaintyRouter(D, E, k)).eval()
    x = torch.randn(2, 5, D)
    y = moe(x)
    record = moe.routing
    x_TD = x.reshape(-1, D)
    expected = []
    for t in range(10):
        u = F.gelu(moe.shared_gate_proj.weight @ x_TD[t] + moe.shared_gate_proj.bias) * (
            moe.shared_up_proj.weight @ x_TD[t] + moe.shared_up_proj.bias)
        mixed = torch.zeros(D)
        for slot in range(k):
            e, w = int(record.ids_TK[t, slot]), record.weights_TK[t, slot]
            if film == "vector":
                scale, shift = moe.scale_ED[e], moe.shift_ED[e]
            else:
                scale = moe.scale_EDD[e] @ u + moe.scale_bias_ED[e]
                shift = moe.shift_EDD[e] @ u + moe.shift_bias_ED[e]
            mixed = mixed + w * (scale * u + shift)
        expected.append(moe.adaptor(mixed))
    torch.testing.assert_close(y.reshape(10, D), torch.stack(expected), **fp_tolerance(torch.float32, 4 * D, layers=3))
    assert record.tokens_shape == (2, 5) and record.load_E.sum() == 10 * k


def test_conventional_moe_is_the_moe_block_with_the_uncertainty_router():
    torch.manual_seed(0)
    cfg = MoFMEConfig(dim=8, num_heads=2, num_experts=4, top_k=2, ffn="moe")
    moe = make_ffn(cfg).eval()
    assert isinstance(moe, MoE) and isinstance(moe.router, UncertaintyRouter)
    x = torch.randn(6, 8)
    y = moe(x)
    H = cfg.hidden_dim
    for t in range(6):
        ref = torch.zeros(8)
        for e, w in zip(moe.routing.ids_TK[t].tolist(), moe.routing.weights_TK[t]):
            hidden = F.gelu(moe.w_in[e] @ x[t] + moe.b_in[e])
            ref = ref + w * (moe.w_out[e] @ hidden + moe.b_out[e])
        torch.testing.assert_close(y[t], ref, **fp_tolerance(torch.float32, H, layers=2))
    assert moe.w_in.shape == (4, H, 8)


def ffn_params(kind, D=16, E=4, H=64):
    linear = lambda i, o: i * o + o  # noqa: E731
    ffn = linear(D, H) + linear(H, D)
    router_params = E * D
    return {
        "dense": ffn,
        "moe": E * ffn + router_params,
        "film": 2 * linear(D, D) + 2 * E * D + ffn + router_params,
    }[kind]


@pytest.mark.parametrize("kind", ["dense", "moe", "film"])
def test_parameter_counts_match_the_formula(kind):
    cfg = MoFMEConfig(dim=16, num_heads=2, num_experts=4, top_k=2, ffn=kind)
    ffn = make_ffn(cfg)
    assert sum(p.numel() for p in ffn.parameters()) == ffn_params(kind)


def test_model_starts_as_identity_and_records_routing():
    model = create_model("test_mofme").eval()
    x = torch.rand(3, 3, 12, 8)
    torch.testing.assert_close(model(x), x)  # zero-initialised tail: restoration starts from the input
    records = collect_routing(model)
    assert [name for name, _ in records] == ["layers.0.ffn"]
    maps = model.routing_maps()
    assert len(maps) == 1 and maps[0].shape == (3, 6, 4)
    assert torch.equal(maps[0].reshape(-1), records[0][1].ids_TK[:, 0])


def test_training_step_reaches_every_part_and_aux_loss():
    model = create_model("test_mofme", aux_loss_coefs={"load_balance": 0.01}).train()
    x = torch.rand(2, 3, 8, 8)
    loss = (model(x) - x.flip(-1)).abs().mean() + model.aux_loss()
    assert model.aux_loss() > 0 and torch.equal(model.aux_loss(), total_aux_loss(model))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_bad_inputs_and_configs_raise():
    model = create_model("test_mofme")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.rand(1, 3, 7, 8))
    with pytest.raises(ValueError, match="unknown ffn"):
        MoFMEConfig(ffn="sparse")
    with pytest.raises(ValueError, match="top_k"):
        MoFMEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown MoFME arguments"):
        create_model("test_mofme", experts=3)


def test_weather_models_are_registered_with_the_stated_savings():
    fme, conv, dense = (create_model(n) for n in
                        ("mofme_weather", "mofme_conventional_weather", "mofme_dense_weather"))
    assert isinstance(fme, MoFME) and fme.config.ffn == "film" and conv.config.ffn == "moe"
    dense(torch.rand(1, 3, 8, 8))
    assert dense.routing_maps() == [] and not dense.has_routing
    assert 1 - fme.num_parameters() / conv.num_parameters() >= 0.70


def test_bundled_weights_load_and_fit_in_20_mb():
    model = create_model("mofme_weather", pretrained=True)
    from moezoo.zoo.hub import WEIGHTS_DIR
    assert (WEIGHTS_DIR / "mofme_weather.safetensors").stat().st_size < 20 * 2**20
    assert all(math.isfinite(float(p.abs().sum())) for p in model.parameters())
    assert model.pretrained_cfg.metadata["tile_size"] == 256
