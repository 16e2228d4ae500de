"""MoE-Fusion: conv-expert routing against a per-cell loop, routing records, the CV² loss and the fusion
losses against hand computation."""

import pytest
import torch
import torch.nn as nn

from moezoo.zoo import create_model
from tolerance import fp_tolerance
from moezoo.zoo.layers import collect_routing, total_aux_loss
from moezoo.zoo.models.moe_fusion import (
    ConvExpertMoE,
    cell_tokens,
    fusion_loss,
    gradient_loss,
    intensity_loss,
    sobel_gradient,
)


def _conv_moe(sources=(0, 0, 1, 1), channels=2, top_k=2, gate_dim=4):
    torch.manual_seed(0)
    experts = [nn.Conv2d(channels, channels, 3, padding=1) for _ in sources]
    return ConvExpertMoE(gate_dim, experts, channels, top_k, expert_sources=sources).eval()


def test_cell_tokens_average_the_pixels_each_cell_has():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    tokens = cell_tokens(x, 2)
    assert tokens.shape == (2, 3, 3, 1)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cell = x[b, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # edge cells are 1 pixel wide
                assert tokens[b, i, j, 0] == pytest.approx(float(cell.mean()))
    assert torch.allclose(cell_tokens(x, None)[:, 0, 0, 0], x.mean((1, 2, 3)))


def test_conv_expert_moe_matches_a_per_cell_loop():
    moe = _conv_moe()
    cell, height, width = 4, 10, 7  # partial cells at the right and bottom edges
    inputs = [torch.randn(3, 2, height, width), torch.randn(3, 2, height, width)]
    tokens = cell_tokens(torch.cat(inputs, 1), cell)
    out = moe(inputs, tokens, cell)

    logits = tokens.reshape(-1, 4) @ moe.router.weight.T  # eval: the clean logits, no noise
    expected = torch.zeros_like(out)
    grid_w = tokens.shape[2]
    for t in range(logits.shape[0]):
        b, i, j = t // (tokens.shape[1] * grid_w), (t // grid_w) % tokens.shape[1], t % grid_w
        top = torch.topk(logits[t], 2)
        weights = torch.softmax(top.values, 0)
        rows, cols = slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell)
        for w, e in zip(weights, top.indices.tolist()):
            full = moe.experts[e](inputs[moe.expert_sources[e]][b : b + 1])[0]
            expected[b, :, rows, cols] += w * full[:, rows, cols]
    # two 3x3 convs (reductions of 9 x channels) per expert, computed per image vs batched
    torch.testing.assert_close(out, expected, **fp_tolerance(torch.float32, 9 * 8, layers=2))
    assert moe.routing.tokens_shape == (3, 3, 2)


def test_local_experts_read_only_their_modality():
    moe = _conv_moe(gate_dim=2)
    with torch.no_grad():  # experts 0, 1 (visible input) win every cell with positive tokens
        moe.router.weight.copy_(torch.tensor([[1.0, 1.0], [0.5, 0.5], [-1.0, -1.0], [-2.0, -2.0]]))
    visible, infrared = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    tokens = torch.ones(1, 2, 2, 2)
    out = moe([visible, infrared], tokens, 4)
    assert torch.equal(out, moe([visible, infrared * 5 + 1], tokens, 4))  # infrared experts never ran
    assert not torch.allclose(out, moe([visible * 5 + 1, infrared], tokens, 4))
    assert set(moe.routing.ids_TK.flatten().tolist()) == {0, 1}


def test_routing_records_and_maps():
    model = create_model("test_moe_fusion").eval()
    ir, vis = torch.rand(2, 1, 20, 12), torch.rand(2, 1, 20, 12)
    fused = model(ir, vis)
    assert fused.shape == (2, 1, 20, 12)
    names = [name for name, _ in collect_routing(model)]
    assert names == ["local_foreground", "local_background", "global_decoder"]
    maps = model.routing_maps()
    assert [tuple(m.shape) for m in maps] == [(2, 3, 2), (2, 3, 2), (2, 1, 1)]  # 8-pixel cells; one per image
    for m in maps:
        assert m.dtype == torch.int64 and 0 <= int(m.min()) and int(m.max()) < 4


def test_cv2_aux_loss_by_hand():
    model = create_model("test_moe_fusion").eval()  # eval: no noise, the load is the hard count
    model(torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16))
    total = 0.0
    for name, record in collect_routing(model):
        importance = [0.0] * 4
        load = [0.0] * 4
        for ids, weights in zip(record.ids_TK.tolist(), record.weights_TK.tolist()):
            for e, w in zip(ids, weights):
                importance[e] += w
                load[e] += 1

        def cv2(values):
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            return var / (mean**2 + 1e-10)

        expected = cv2(importance) + cv2(load)
        assert float(record.aux_terms["cv2"]) == pytest.approx(expected, rel=1e-5)
        total += (0.02 if name == "global_decoder" else 0.01) * expected
    assert float(total_aux_loss(model).detach()) == pytest.approx(total, rel=1e-5)


def test_gates_learn_through_the_fusion_loss():
    torch.manual_seed(1)
    model = create_model("test_moe_fusion").train()
    ir, vis = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    loss = fusion_loss(model(ir, vis), ir, vis)["loss"] + model.aux_loss()
    loss.backward()
    for moe in (model.local_foreground, model.local_background, model.global_decoder):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert moe.router.noise.weight.grad is not None  # the noise scale learns through the smooth load


def test_eval_is_deterministic():
    model = create_model("test_moe_fusion").eval()
    ir, vis = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    assert torch.equal(model(ir, vis), model(ir, vis))


def _sobel_by_loops(image):
    h, w = image.shape
    out = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            def at(r, c):
                return float(image[r, c]) if 0 <= r < h and 0 <= c < w else 0.0
            sx = sum(k * (at(i + d, j + 1) - at(i + d, j - 1)) for d, k in ((-1, 1), (0, 2), (1, 1)))
            sy = sum(k * (at(i + 1, j + d) - at(i - 1, j + d)) for d, k in ((-1, 1), (0, 2), (1, 1)))
            out[i, j] = abs(sx) + abs(sy)
    return out


def test_sobel_gradient_and_gradient_loss_by_hand():
    step = torch.zeros(5, 6)
    step[:, 3:] = 1.0
    grad = sobel_gradient(step[None, None])[0, 0]
    assert torch.allclose(grad[1:-1, 2:4], torch.full((3, 2), 4.0))  # |Sobel_x| of a unit step: 1 + 2 + 1
    assert torch.allclose(grad, _sobel_by_loops(step))
    noise = torch.rand(5, 6)
    target = torch.maximum(_sobel_by_loops(step), _sobel_by_loops(noise))
    fused = torch.rand(5, 6)
    expected = (_sobel_by_loops(fused) - target).abs().mean()
    loss = gradient_loss(fused[None, None], noise[None, None], step[None, None])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_intensity_loss_by_hand():
    fused = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    infrared = torch.tensor([[[[0.9, 0.1], [0.2, 0.4]]]])
    visible = torch.tensor([[[[0.3, 0.7], [0.6, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # inside: |0.5-0.9| + |0.5-0.7|; outside: |0.5-0.4| + |0.5-0.2|; averaged over 4 pixels
    assert float(intensity_loss(fused, infrared, visible, mask)) == pytest.approx((0.4 + 0.2 + 0.1 + 0.3) / 4)
    # no mask: max(V, I) everywhere -> |0.5-0.9| + |0.5-0.7| + |0.5-0.6| + |0.5-0.4|
    assert float(intensity_loss(fused, infrared, visible)) == pytest.approx((0.4 + 0.2 + 0.1 + 0.1) / 4)
    terms = fusion_loss(fused, infrared, visible, mask)
    assert float(terms["loss"]) == pytest.approx(10 * float(terms["grad_loss"]) + float(terms["intensity_loss"]))


def test_official_config_widths_and_input_errors():
    official = create_model("moe_fusion")
    assert official.config.fused_channels == 160  # the official decoder input (64 + 64 + 16 + 16)
    model = create_model("test_moe_fusion")
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 12))
    with pytest.raises(ValueError, match="one channel"):
        model(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="even"):
        create_model("test_moe_fusion", num_local_experts=3)
    with pytest.raises(TypeError, match="unknown MoE-Fusion options"):
        create_model("test_moe_fusion", depth=3)
