"""Build a moezoo :class:`~moezoo.zoo.layers.moe.MoE` from a transformers (v5) MoE block.

``moe_from_hf(block)`` (also ``MoE.from_hf(block)``) copies the weights of a block and sets the MoE options
that reproduce its routing, so the two compute the same function (to floating-point rounding):

==========================  ==========================================================================
transformers block           moezoo MoE
==========================  ==========================================================================
``MixtralSparseMoeBlock``    softmax top-k, renormalised; ``router_jitter_noise`` -> ``jitter``
``Qwen2MoeSparseMoeBlock``   softmax top-k, ``norm_topk_prob`` -> ``renormalize``; one shared expert of
                             width ``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_gate(x))``
``DeepseekV3MoE``            sigmoid scores, ``e_score_correction_bias`` -> ``router.score_bias`` (selection
                             only), ``n_group``/``topk_group`` group-limited top-k (group score: sum of the
                             two best biased scores), ``norm_topk_prob`` -> ``renormalize``, then
                             ``routed_scaling_factor`` -> ``routed_scaling``; an ungated shared MLP of width
                             ``n_shared_experts * moe_intermediate_size``
==========================  ==========================================================================

All three store their experts as ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``down_proj [E, H, I]``: moezoo's ``w_in`` / ``w_out`` layout, so the tensors are copied as they are. The
expert activation comes from the config's ``hidden_act``.

Known differences, all outside fp32 inference:

- Mixtral and Qwen2-MoE compute the router logits in the model's dtype and only the softmax in fp32; moezoo
  computes the logits in fp32 too. Identical in fp32; in bf16/fp16 moezoo's scores are the more precise ones.
- Mixtral's training-time jitter multiplies the hidden states that both the router *and the experts* see;
  moezoo's ``jitter`` perturbs the router input only. Inference (``eval()``) is unaffected.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from .moe import MoE

__all__ = ["SUPPORTED_BLOCKS", "moe_from_hf"]

# (transformers module, class name) of every block moe_from_hf converts.
SUPPORTED_BLOCKS = (
    ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
)

# transformers ``hidden_act`` names -> moezoo activation names (the same function up to rounding).
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
# The activation module's class, for a module that carries no config.
_HF_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "ReLU": "relu",
}
# moezoo activation -> the MoE expert kind that uses it (others: a swiglu MoE with the activation swapped).
_KIND_FOR_ACTIVATION = {"silu": "swiglu", "gelu": "geglu"}


def moe_from_hf(block: nn.Module, backend: str = "auto") -> MoE:
    """A moezoo MoE with the weights (copied) and routing of a transformers MoE block.

    Args:
        block: a ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock`` or ``DeepseekV3MoE`` instance.
        backend: the expert backend of the new MoE ("auto", "reference", "torch" or "triton").

    Returns:
        An MoE on the block's device, every tensor in the dtype of the tensor it was copied from, in the
        block's train/eval mode. Its output for ``x [..., hidden]`` equals ``block(x)`` (for 3-D ``x``).

    Raises:
        TypeError: ``block`` is not one of the supported transformers blocks.
        ValueError: the block uses an expert layout or activation moezoo cannot represent.
    """
    name = _supported_name(block)
    if name == "MixtralSparseMoeBlock":
        return _convert(block, backend, renormalize=True, jitter=float(block.jitter_noise))
    if name == "Qwen2MoeSparseMoeBlock":
        return _convert(
            block,
            backend,
            renormalize=bool(block.gate.norm_topk_prob),
            shared=block.shared_expert,
            shared_gate=block.shared_expert_gate,
        )
    gate = block.gate  # DeepseekV3MoE
    num_groups, topk_groups = int(gate.num_group), int(gate.topk_group)
    if num_groups <= 1:  # one group holding every expert: no restriction
        num_groups = topk_groups = None
    return _convert(
        block,
        backend,
        router="sigmoid",
        renormalize=bool(gate.norm_topk_prob),
        score_bias=gate.e_score_correction_bias,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling=float(gate.routed_scaling_factor),
        shared=block.shared_experts,
    )


# ---------------------------------------------------------------------------------------------------------


def _supported_name(block: nn.Module) -> str:
    for module_name, class_name in SUPPORTED_BLOCKS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if isinstance(block, cls):
            return class_name
    supported = ", ".join(f"{m}.{c}" for m, c in SUPPORTED_BLOCKS)
    raise TypeError(f"moe_from_hf cannot convert a {type(block).__qualname__}; supported blocks: {supported}")


def _activation(module: nn.Module) -> str:
    """The moezoo name of the activation an HF MLP / experts module applies."""
    config = getattr(module, "config", None)
    hidden_act = getattr(config, "hidden_act", None)
    if isinstance(hidden_act, str):
        if hidden_act not in _HF_ACTIVATIONS:
            raise ValueError(
                f"hidden_act={hidden_act!r} has no moezoo equivalent; supported: {', '.join(_HF_ACTIVATIONS)}"
            )
        return _HF_ACTIVATIONS[hidden_act]
    act_class = type(getattr(module, "act_fn", None)).__name__
    if act_class == "GELU" and getattr(module.act_fn, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if act_class == "GELU":
        return "gelu"
    if act_class not in _HF_ACTIVATION_CLASSES:
        raise ValueError(f"activation {act_class} of {type(module).__name__} has no moezoo equivalent")
    return _HF_ACTIVATION_CLASSES[act_class]


def _expert_tensors(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in [E, 2I, H], w_out [E, H, I])`` of an HF v5 experts module, checked against its layout flags."""
    unsupported = {
        "has_bias": bool(getattr(experts, "has_bias", False)),
        "has_gate": not bool(getattr(experts, "has_gate", True)),
        "is_concatenated": not bool(getattr(experts, "is_concatenated", True)),
        "has_post_expert_norm": bool(getattr(experts, "has_post_expert_norm", False)),
    }
    bad = [flag for flag, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"{type(experts).__name__} uses an expert layout moe_from_hf does not convert ({', '.join(bad)}); "
            "expected gated, concatenated [gate; up] weights without biases or post-expert norm"
        )
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # stored [E, in, out]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    num_experts, two_hidden, dim = gate_up.shape
    if two_hidden % 2 or tuple(down.shape) != (num_experts, dim, two_hidden // 2):
        raise ValueError(
            f"{type(experts).__name__} has gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)}; "
            "expected [E, 2I, H] and [E, H, I]"
        )
    return gate_up, down


def _copy(src: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(src.detach().clone().contiguous(), requires_grad=src.requires_grad)


def _convert(
    block: nn.Module,
    backend: str,
    *,
    router: str = "softmax",
    renormalize: bool,
    jitter: float = 0.0,
    score_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling: float = 1.0,
    shared: nn.Module | None = None,
    shared_gate: nn.Linear | None = None,
) -> MoE:
    w_in, w_out = _expert_tensors(block.experts)
    num_experts, two_hidden, dim = w_in.shape
    router_weight = block.gate.weight
    if tuple(router_weight.shape) != (num_experts, dim):
        raise ValueError(
            f"router weight {tuple(router_weight.shape)} does not match {num_experts} experts of width {dim}"
        )
    activation = _activation(block.experts)
    shared_width = 0 if shared is None else shared.gate_proj.weight.shape[0]
    shared_activation = None if not shared_width else _activation(shared)

    # Built on the meta device: every tensor is then replaced by a copy of the block's (no throwaway init).
    with torch.device("meta"):
        moe = MoE(
            dim,
            two_hidden // 2,
            num_experts,
            int(block.gate.top_k),
            expert=_KIND_FOR_ACTIVATION.get(activation, "swiglu"),
            activation=activation,
            router=router,
            renormalize=renormalize,
            score_bias=score_bias is not None,
            num_groups=num_groups,
            topk_groups=topk_groups,
            routed_scaling=routed_scaling,
            num_shared_experts=1 if shared_width else 0,
            shared_hidden_dim=shared_width or None,
            shared_gate=shared_gate is not None and bool(shared_width),
            jitter=jitter,
            backend=backend,
        )
    moe.w_in, moe.w_out = _copy(w_in), _copy(w_out)
    moe.router.weight = _copy(router_weight)
    if score_bias is not None:
        # Kept in its own dtype (fp32 in HF checkpoints) even when the weights are bf16.
        moe.router.score_bias = score_bias.detach().clone()
    if moe.shared is not None:
        moe.shared.activation = shared_activation
        for proj in ("gate_proj", "up_proj", "down_proj"):
            source = getattr(shared, proj)
            if source.bias is not None:
                raise ValueError(f"the shared expert's {proj} has a bias; moezoo's shared expert has none")
            getattr(moe.shared, proj).weight = _copy(source.weight)
    if moe.shared_gate is not None:
        if shared_gate.bias is not None:
            raise ValueError("the shared expert gate has a bias; moezoo's shared_gate has none")
        moe.shared_gate.weight = _copy(shared_gate.weight)

    left = [n for n, t in (*moe.named_parameters(), *moe.named_buffers()) if t.is_meta]
    if left:  # every tensor the options above create must have been filled in
        raise RuntimeError(f"moe_from_hf left tensors uninitialised: {left}")
    return moe.train(block.training)
