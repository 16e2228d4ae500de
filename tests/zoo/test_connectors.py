"""Connectors against hand-written formulas: LLaVA's projector as two linears around an exact GELU, the query
resampler as per-head softmax attention written out with its own weights; padding and token order."""

import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.zoo.layers.connectors import QueryResampler, mlp_projector
from tolerance import fp_tolerance


def test_mlp_projector_is_linear_gelu_linear():
    projector = mlp_projector(24, 32)
    x = torch.randn(2, 5, 24)
    fc1, fc2 = projector.fc1, projector.fc2
    expected = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    assert fc1.weight.shape == (32, 24) and fc2.weight.shape == (32, 32)
    torch.testing.assert_close(projector(x), expected)


def layer_norm(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def resampler_by_hand(resampler, tokens):
    """Every query, head and token written out: softmax over tokens of q.k / sqrt(head dim), weighted values."""
    kv_all = tokens @ resampler.kv_proj.weight.t()
    out = []
    for b in range(tokens.shape[0]):
        q_all = resampler.queries.clone()
        for layer in resampler.layers:
            kv = layer_norm(kv_all[b], layer.norm_kv)
            q = layer_norm(q_all, layer.norm_q) @ layer.q.weight.t() + layer.q.bias
            k = kv @ layer.k.weight.t() + layer.k.bias
            v = kv @ layer.v.weight.t() + layer.v.bias
            heads, dh = layer.num_heads, q.shape[-1] // layer.num_heads
            attended = torch.zeros_like(q)
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                for i in range(q.shape[0]):
                    scores = torch.stack([q[i, cols] @ k[j, cols] / math.sqrt(dh) for j in range(k.shape[0])])
                    attended[i, cols] = (scores.softmax(0)[:, None] * v[:, cols]).sum(0)
            q_all = q_all + attended @ layer.proj.weight.t() + layer.proj.bias
            hidden = F.gelu(layer_norm(q_all, layer.norm_mlp) @ layer.mlp.fc1.weight.t() + layer.mlp.fc1.bias)
            q_all = q_all + hidden @ layer.mlp.fc2.weight.t() + layer.mlp.fc2.bias
        out.append(layer_norm(q_all, resampler.norm_out))
    return torch.stack(out)


def test_query_resampler_is_per_head_softmax_attention():
    torch.manual_seed(0)
    resampler = QueryResampler(in_dim=12, out_dim=16, num_queries=3, num_heads=2, depth=2)
    tokens = torch.randn(2, 7, 12, dtype=torch.float64)
    resampler = resampler.double()
    got = resampler(tokens)
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got, resampler_by_hand(resampler, tokens), **fp_tolerance(torch.float64, 64, layers=4))


def test_masked_tokens_change_nothing_and_token_order_does_not_matter():
    torch.manual_seed(0)
    resampler = QueryResampler(in_dim=8, out_dim=16, num_queries=4, num_heads=4)
    real = torch.randn(1, 5, 8)
    padded = torch.cat([real, torch.randn(1, 3, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    tol = fp_tolerance(torch.float32, 16, layers=4)
    torch.testing.assert_close(resampler(padded, mask), resampler(real), **tol)
    shuffled = real[:, torch.randperm(5)]
    torch.testing.assert_close(resampler(shuffled), resampler(real), **tol)


@pytest.mark.parametrize("call, message", [
    (lambda r: r(torch.randn(5, 8)), r"tokens must be \[B, N, C\]"),
    (lambda r: r(torch.randn(1, 5, 8), torch.ones(1, 5)), "mask must be bool"),
    (lambda r: r(torch.randn(1, 5, 8), torch.zeros(1, 5, dtype=torch.bool)), "at least one real"),
    (lambda r: QueryResampler(8, 15, num_heads=4), "divisible by num_heads"),
])
def test_bad_input_says_what_is_accepted(call, message):
    with pytest.raises(ValueError, match=message):
        call(QueryResampler(8, 16))


# ------------------------------------------------------------------------------------- MoCHA's MoE connector

from moezoo.zoo.layers import collect_routing, total_aux_loss  # noqa: E402
from moezoo.zoo.layers.connectors import MOCHA_AUX_LOSSES, MoEConnector  # noqa: E402


def mocha_by_hand(connector, tokens):
    """MoCHA's MLPMoE and its losses (moec_builder.py / moec_llava_phi.py) token by token: softmax gate, top-k
    renormalised, Linear-GELU-Linear experts; balance = E^2 mean_{b,e}(mean_tokens(g)[b,e] frac_top1[b,e]),
    z = mean(logsumexp(logits)^2)."""
    B, N, _ = tokens.shape
    E, k = connector.num_experts, connector.top_k
    outputs, balance = torch.zeros(B, N, connector.out_dim, dtype=tokens.dtype), 0.0
    lse_squares = []
    for b in range(B):
        density, top1 = torch.zeros(E, dtype=tokens.dtype), torch.zeros(E, dtype=tokens.dtype)
        for n in range(N):
            x = tokens[b, n]
            logits = connector.gate.weight.to(tokens.dtype) @ x
            g = logits.softmax(0)
            weights, experts = g.topk(k)
            weights = weights / weights.sum()
            for w, e in zip(weights, experts):
                hidden = F.gelu(connector.w_in[e] @ x + connector.b_in[e])
                outputs[b, n] += w * (connector.w_out[e] @ hidden + connector.b_out[e])
            density += g / N
            top1[experts[0]] += 1.0 / N
            lse_squares.append(torch.logsumexp(logits, 0) ** 2)
        balance = balance + (density * top1).mean() / B
    return outputs, balance * E * E, torch.stack(lse_squares).mean()


def test_moe_connector_is_mochas_mixture_of_projectors():
    torch.manual_seed(0)
    connector = MoEConnector(in_dim=12, out_dim=20, num_experts=4, top_k=2).double()
    tokens = torch.randn(3, 5, 12, dtype=torch.float64)
    got = connector(tokens)
    expected, balance, z = mocha_by_hand(connector, tokens)
    tol = fp_tolerance(torch.float64, 20, layers=2)
    torch.testing.assert_close(got, expected, **tol)
    terms = connector.routing.aux_terms
    torch.testing.assert_close(terms["sample_top1_balance"], balance, **tol)
    torch.testing.assert_close(terms["z_loss"], z, **tol)
    torch.testing.assert_close(total_aux_loss(connector), 0.1 * balance + 0.01 * z, **tol)
    assert connector.aux_loss_coefs == MOCHA_AUX_LOSSES and [n for n, _ in collect_routing(connector)] == [""]


def test_moe_connector_backward_reaches_every_part():
    torch.manual_seed(1)
    connector = MoEConnector(in_dim=6, out_dim=8, num_experts=4, top_k=2)
    tokens = torch.randn(2, 16, 6, requires_grad=True)
    (connector(tokens).square().mean() + total_aux_loss(connector)).backward()
    for name, parameter in connector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert tokens.grad.abs().sum() > 0


def test_moe_connector_refuses_tokens_of_another_width():
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, 6\]"):
        MoEConnector(6, 8)(torch.randn(2, 3, 7))
