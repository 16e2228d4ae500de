"""Ternary (MoTE) quantisation, packing and the straight-through estimator."""

from __future__ import annotations

import pytest
import torch
from tolerance import fp_tolerance

from moezoo.kernels.ternary import (
    pack_ternary,
    ternary_dequantize,
    ternary_quantize,
    ternary_ste,
    unpack_ternary,
)


def test_quantize_matches_hand():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.0], [-0.1, 0.25, 0.3, -0.95]])
    q, scale = ternary_quantize(w)
    for e, row in enumerate(w.tolist()):
        s = sum(abs(v) for v in row) / len(row)
        torch.testing.assert_close(scale[e].item(), s, **fp_tolerance(torch.float32, len(row)))  # fp32 mean vs double
        expected = [max(-1, min(1, round(v / s))) for v in row]
        assert q[e].tolist() == expected
    assert q.tolist() == [[0, -1, 1, 0], [0, 1, 1, -1]]
    assert q.dtype == torch.int8 and scale.shape == (2,)


def test_quantize_values_scale_per_expert_and_zero_expert():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, 5, generator=gen) * torch.tensor([0.01, 1.0, 100.0, 0.0]).view(4, 1, 1)
    q, scale = ternary_quantize(w)
    assert q.shape == w.shape
    assert set(q.unique().tolist()) <= {-1, 0, 1}
    assert scale.shape == (4,)
    for e in range(3):
        torch.testing.assert_close(scale[e].item(), w[e].abs().mean().item(), **fp_tolerance(torch.float32, w[e].numel()))
        assert set(q[e].unique().tolist()) == {-1, 0, 1}
    assert scale[3].item() == torch.tensor(1e-8).item() and bool((q[3] == 0).all())  # exactly the fp32 floor eps


def test_dequantize():
    q = torch.tensor([[[1, 0], [-1, 1]], [[0, -1], [1, 1]]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0])
    out = ternary_dequantize(q, scale)
    assert out.tolist() == [[[0.5, 0.0], [-0.5, 0.5]], [[0.0, -2.0], [2.0, 2.0]]]
    assert out.dtype == torch.float32


def test_pack_known_byte():
    packed = pack_ternary(torch.tensor([1, -1, 0, 1, -1], dtype=torch.int8))
    # codes 0->0, 1->1, -1->2, least significant pair first; the 5th value starts a new (padded) byte
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1 | (2 << 2) | (0 << 4) | (1 << 6), 2]


@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (4,), (5,), (2, 3), (3, 5, 7), (4, 8)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    q = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    packed = pack_ternary(q)
    numel = q.numel()
    assert packed.shape == ((numel + 3) // 4,)
    out = unpack_ternary(packed, shape)
    assert out.dtype == torch.int8 and out.shape == q.shape
    assert torch.equal(out, q)


def test_quantize_pack_unpack_dequantize_pipeline():
    w = torch.randn(3, 16, 9)
    q, scale = ternary_quantize(w)
    restored = ternary_dequantize(unpack_ternary(pack_ternary(q), q.shape), scale)
    assert torch.equal(restored, ternary_dequantize(q, scale))


def test_ste_forward_and_identity_gradient():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, 3, generator=gen, requires_grad=True)
    out = ternary_ste(w)
    q, scale = ternary_quantize(w.detach())
    assert torch.equal(out.detach(), ternary_dequantize(q, scale))
    upstream = torch.randn(2, 4, 3, generator=gen)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_ste_in_a_matmul_reaches_latent_weights():
    w = torch.randn(2, 3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    y = torch.einsum("td,end->etn", x, ternary_ste(w))
    y.sum().backward()
    # d(sum)/dw[e, n, d] = sum_t x[t, d]: identity STE passes the full-precision gradient straight through
    torch.testing.assert_close(w.grad, x.sum(0).expand(2, 3, 4), **fp_tolerance(torch.float32, x.shape[0]))


def test_ste_keeps_dtype():
    w = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    out = ternary_ste(w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16


def test_ternary_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        ternary_quantize(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dims"):
        ternary_quantize(torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        ternary_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="finite"):
        ternary_ste(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        pack_ternary(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        pack_ternary(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        unpack_ternary(torch.tensor([1, 2]), (8,))
    with pytest.raises(ValueError, match="bytes"):
        unpack_ternary(torch.tensor([1, 2], dtype=torch.uint8), (9,))
    with pytest.raises(ValueError, match="0b11"):
        unpack_ternary(torch.tensor([3], dtype=torch.uint8), (1,))
    with pytest.raises(ValueError, match="one entry per expert"):
        ternary_dequantize(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
