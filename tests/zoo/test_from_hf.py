"""MoE.from_hf against the transformers blocks it converts: same output and input gradient, in fp32.

Each block is built from a tiny config, every weight (and DeepSeek-V3's selection bias) is randomised, and
the HF block and the converted MoE (torch and reference backends) run on the same input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from moezoo.zoo.layers.moe import MoE  # noqa: E402
from tolerance import fp_tolerance  # noqa: E402

HIDDEN = 32
# one MoE block computed two ways: the router (HIDDEN-long) and the experts' two products (widths up to 48)
TOL = fp_tolerance(torch.float32, 48, layers=3)
BACKENDS = ("torch", "reference")


def randomise(block: nn.Module, seed: int) -> nn.Module:
    """Every parameter ~ N(0, 1/fan_in) (fan_in: the last dim), so activations stay O(1); the DeepSeek-V3
    selection bias ~ N(0, 0.2^2), the size of the sigmoid score gaps, so it changes which experts win."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, param.shape[-1] ** -0.5)
        for name, buf in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.2)
    return block.float().eval()


def eager(config):
    """Pin the experts to transformers' eager loop (also silences its "standalone Expert Module" notice)."""
    config._experts_implementation = "eager"
    return config


def mixtral(hidden_act: str = "silu") -> nn.Module:
    config = eager(transformers.MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
        hidden_act=hidden_act, router_jitter_noise=0.1,
    ))
    return randomise(MixtralSparseMoeBlock(config), 0)


def qwen2_moe(norm_topk_prob: bool) -> nn.Module:
    config = eager(transformers.Qwen2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
    ))
    return randomise(Qwen2MoeSparseMoeBlock(config), 1)


def deepseek_v3(norm_topk_prob: bool) -> nn.Module:
    config = eager(transformers.DeepseekV3Config(
        hidden_size=HIDDEN, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob,
    ))
    return randomise(DeepseekV3MoE(config), 2)


BLOCKS = {
    "mixtral": mixtral,
    "mixtral-gelu_tanh": lambda: mixtral("gelu_pytorch_tanh"),
    "qwen2_moe-norm": lambda: qwen2_moe(True),
    "qwen2_moe-nonorm": lambda: qwen2_moe(False),
    "deepseek_v3-norm": lambda: deepseek_v3(True),
    "deepseek_v3-nonorm": lambda: deepseek_v3(False),
}


def output_and_grad(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    return y.detach(), grad


@pytest.fixture(scope="module", params=list(BLOCKS))
def case(request):
    block = BLOCKS[request.param]()
    torch.manual_seed(3)
    x = torch.randn(2, 5, HIDDEN)
    upstream = torch.randn(2, 5, HIDDEN)
    return request.param, block, x, upstream, output_and_grad(block, x, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_and_input_grad_match(case, backend):
    _, block, x, upstream, (y_hf, grad_hf) = case
    moe = MoE.from_hf(block, backend=backend)
    assert moe.backend == backend and not moe.training
    y, grad = output_and_grad(moe, x, upstream)
    torch.testing.assert_close(y, y_hf, **TOL)
    torch.testing.assert_close(grad, grad_hf, **TOL)


def test_routing_matches_the_hf_router(case):
    """The same experts per token, with the same weights (HF's gate returns logits, weights, ids)."""
    _, block, x, _, _ = case
    moe = MoE.from_hf(block, backend="torch")
    with torch.no_grad():
        moe(x)
        _, weights_hf, ids_hf = block.gate(x.reshape(-1, HIDDEN))
    ids, weights = moe.routing.ids_TK, moe.routing.weights_TK
    order_hf, order = ids_hf.argsort(-1), ids.argsort(-1)
    assert torch.equal(ids_hf.gather(1, order_hf), ids.gather(1, order))
    torch.testing.assert_close(weights.gather(1, order), weights_hf.float().gather(1, order_hf), **TOL)


def test_options_are_mapped(case):
    name, block, *_ = case
    moe = MoE.from_hf(block)
    router = moe.router
    if name.startswith("mixtral"):
        assert router.kind == "softmax" and router.renormalize and router.jitter == pytest.approx(0.1)
        assert moe.shared is None and router.score_bias is None
        assert moe.activation == ("silu" if name == "mixtral" else "gelu_tanh")
    elif name.startswith("qwen2_moe"):
        assert router.kind == "softmax" and router.renormalize == name.endswith("-norm")
        assert moe.shared.up_proj.out_features == 48 and moe.shared_gate is not None
    else:
        assert router.kind == "sigmoid" and router.renormalize == name.endswith("-norm")
        assert (router.num_groups, router.topk_groups, router.routed_scaling) == (2, 1, 2.5)
        assert torch.equal(router.score_bias, block.gate.e_score_correction_bias)
        assert moe.shared.up_proj.out_features == 2 * 24 and moe.shared_gate is None


def test_weights_are_copied_not_shared(case):
    _, block, *_ = case
    moe = MoE.from_hf(block)
    assert torch.equal(moe.w_in, block.experts.gate_up_proj)
    assert moe.w_in.data_ptr() != block.experts.gate_up_proj.data_ptr()
    assert all(not t.is_meta for t in [*moe.parameters(), *moe.buffers()])


def test_deepseek_selection_bias_and_groups_matter():
    """Guard against a vacuous comparison: with the bias zeroed, or with the group limit lifted, the routing
    (and so the output) of the test block changes."""
    block = deepseek_v3(True)
    torch.manual_seed(3)
    x = torch.randn(2, 5, HIDDEN)
    moe = MoE.from_hf(block, backend="torch")
    with torch.no_grad():
        y = moe(x)
        unbiased = MoE.from_hf(block, backend="torch")
        unbiased.router.score_bias.zero_()
        assert not torch.allclose(unbiased(x), y, atol=1e-3)
        ungrouped = MoE.from_hf(block, backend="torch")
        ungrouped.router.num_groups = ungrouped.router.topk_groups = None
        assert not torch.allclose(ungrouped(x), y, atol=1e-3)


def test_bf16_block_keeps_dtypes():
    block = deepseek_v3(True).to(torch.bfloat16)
    block.gate.e_score_correction_bias.data = block.gate.e_score_correction_bias.float()
    moe = MoE.from_hf(block, backend="torch")
    assert moe.w_in.dtype == moe.router.weight.dtype == moe.shared.down_proj.weight.dtype == torch.bfloat16
    assert moe.router.score_bias.dtype == torch.float32


def test_training_mode_is_kept():
    block = mixtral().train()
    assert MoE.from_hf(block).training


def test_unknown_block_is_a_type_error():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*Qwen2MoeSparseMoeBlock.*DeepseekV3MoE"):
        MoE.from_hf(nn.Linear(HIDDEN, HIDDEN))


def test_unsupported_activation_is_a_value_error():
    with pytest.raises(ValueError, match="hidden_act='gelu_accurate'"):
        MoE.from_hf(mixtral("gelu_accurate"))
