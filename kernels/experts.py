"""Grouped expert compute over a dispatch plan, behind one ``backend=`` switch: the public API.

Weights use HF transformers v5's 3-D layout so checkpoints map one to one:
``w_in_ENK``  [E, N_in, D]: the up projection; for gated experts ``N_in = 2F`` with the gate rows first,
                           then the up rows (``gate, up = (x @ w_in[e].T).chunk(2, -1)``).
``w_out_EDF`` [E, D, F]:   the down projection. Its output width may differ from the input's (``[E, D_out, F]``:
                           a connector's experts map encoder tokens to the language model's width); the
                           result is then ``[T, D_out]``.
Biases, when given, are ``b_in_EN`` [E, N_in] and ``b_out_ED`` [E, D_out].

Backends:
``reference`` a per-token, per-slot loop with autograd, here: slow, obviously right, the test oracle.
``torch``     the CPU default (``moezoo.kernels.cpu_backend``): gather rows per expert, one GEMM per expert,
              and a hand-written backward that reuses the forward's buffers.
``triton``    fused gather + grouped GEMM + scatter kernels (``moezoo.kernels.triton_moe``), forward and
              backward; on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
``auto``      triton for CUDA tensors when Triton is importable, torch otherwise.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .activations import activation_fn
from .cpu_backend import PackedExpertWeights, torch_expert_mlp
from .plan import DispatchPlan, expert_slices

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            "backend='triton' needs a CUDA tensor and an importable triton, or TRITON_INTERPRET=1 set before "
            f"triton is imported (got a {device.type} tensor); use backend='torch' on CPU"
        )
    return backend


class SharedExpert(NamedTuple):
    """An always-on expert (DeepSeekMoE, DiT-MoE, Qwen2-MoE): every token passes through it, and its output
    times ``scale_T`` (one number per token, e.g. Qwen2-MoE's sigmoid gate; None: 1) is added to the routed
    sum. Laid out like one routed expert: ``w_in_NK`` [N_in, D] (gated: the gate rows, then the up rows) and
    ``w_out_DF`` [D, F], bias-free; gated or not as the routed experts are. ``activation`` None: the routed
    experts' own."""

    w_in_NK: torch.Tensor
    w_out_DF: torch.Tensor
    scale_T: torch.Tensor | None = None
    activation: str | None = None


def expert_mlp(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: DispatchPlan,
    w_in_ENK: torch.Tensor,
    w_out_EDF: torch.Tensor,
    *,
    b_in_EN: torch.Tensor | None = None,
    b_out_ED: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
    backend: str = "auto",
    shared: SharedExpert | None = None,
    packed: PackedExpertWeights | None = None,
) -> torch.Tensor:
    """The routed experts' weighted sum for every token: ``y[t] = sum_j w[t,j] * expert_{ids[t,j]}(x[t])``,
    plus ``scale[t] * shared(x[t])`` when a ``shared`` expert is given.

    Only the slots the plan dispatched contribute; tokens with none get zeros (or the shared expert alone).
    Differentiable with respect to ``x_TD``, ``weights_TK`` (so the router learns), all expert weights and
    biases, and the shared expert's weights and scale. The torch backend runs the shared expert inside the
    same parallel walk as the routed ones; the other backends add it with plain torch ops.

    ``packed``: the routed experts' weights prepacked for oneDNN by ``pack_expert_weights(w_in_ENK, w_out_EDF)``
    (inference; 1.04-1.12x faster forward on large experts). Used only by the torch backend without autograd,
    and only while ``packed.matches(w_in_ENK, w_out_EDF)``: the same tensor objects, storage and version
    counter as when packed; otherwise the call computes on the live weights. Without a handle every call
    computes on the live weights. Edits through ``.data`` do not move the version counter, so a handle cannot
    see them: whoever edits weights that way must pack again (see ``PackedExpertWeights``).
    """
    _check_expert_inputs(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, gated)
    if packed is not None and not isinstance(packed, PackedExpertWeights):
        raise TypeError(f"packed must be a PackedExpertWeights from pack_expert_weights(w_in, w_out) or None, "
                        f"got {type(packed).__name__}")
    activation_fn(activation)  # validates the name before any compute
    shared_activation = _check_shared(shared, x_TD, w_out_EDF.shape[1], gated, activation)
    backend = resolve_backend(backend, x_TD.device)
    if backend in ("reference", "triton"):
        if backend == "reference":
            y_TD = _reference_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated)
        else:
            from .triton_moe import triton_expert_mlp

            y_TD = triton_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated)
        if shared is None:
            return y_TD
        shared_TD = single_expert(x_TD, shared.w_in_NK, shared.w_out_DF, None, None, shared_activation, gated)
        return y_TD + (shared_TD if shared.scale_T is None else shared.scale_T[:, None] * shared_TD)
    shared_tensors = (None, None, None) if shared is None else tuple(shared[:3])
    return torch_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated,
                            shared_tensors, shared_activation, packed)


def _check_shared(shared: SharedExpert | None, x_TD: torch.Tensor, out_dim: int, gated: bool,
                  activation: str) -> str | None:
    """Validates a shared expert against the input; returns the activation it uses."""
    if shared is None:
        return None
    if not isinstance(shared, SharedExpert):
        raise TypeError(f"shared must be a SharedExpert(w_in_NK, w_out_DF, scale_T, activation), got {type(shared).__name__}")
    w_in, w_out, scale = shared.w_in_NK, shared.w_out_DF, shared.scale_T
    dim = x_TD.shape[1]
    if w_in.dim() != 2 or w_in.shape[1] != dim or (gated and w_in.shape[0] % 2):
        raise ValueError(f"shared w_in must be [N_in, D={dim}] ({'2F rows, gate then up' if gated else 'F rows'}), "
                         f"got {tuple(w_in.shape)}")
    hidden = w_in.shape[0] // 2 if gated else w_in.shape[0]
    if tuple(w_out.shape) != (out_dim, hidden):
        raise ValueError(f"shared w_out must be [D_out, F] = {(out_dim, hidden)}, got {tuple(w_out.shape)}")
    if scale is not None and tuple(scale.shape) != (x_TD.shape[0],):
        raise ValueError(f"shared scale must be [T] = {(x_TD.shape[0],)} (one number per token), got {tuple(scale.shape)}")
    shared_activation = shared.activation or activation
    activation_fn(shared_activation)
    return shared_activation


def _check_expert_inputs(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, gated):
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x_TD.shape)}")
    if not x_TD.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x_TD.dtype}")
    num_experts, n_in, dim = w_in_ENK.shape
    if x_TD.shape[1] != dim:
        raise ValueError(f"x has last dimension {x_TD.shape[1]} but the experts take D={dim}")
    if num_experts != plan.num_experts:
        raise ValueError(f"the plan is for {plan.num_experts} experts but the weights hold {num_experts}")
    hidden = n_in // 2 if gated else n_in
    if gated and n_in % 2:
        raise ValueError(f"gated experts need w_in with 2F rows (gate then up), got {n_in}")
    if w_out_EDF.dim() != 3 or (w_out_EDF.shape[0], w_out_EDF.shape[2]) != (num_experts, hidden):
        raise ValueError(f"w_out must be [E, D_out, F] with E = {num_experts}, F = {hidden} (D_out: the output width, "
                         f"usually D = {dim}), got {tuple(w_out_EDF.shape)}")
    out_dim = w_out_EDF.shape[1]
    if tuple(weights_TK.shape) != (plan.num_tokens, plan.top_k) or x_TD.shape[0] != plan.num_tokens:
        raise ValueError(
            f"x has {x_TD.shape[0]} tokens and weights shape {tuple(weights_TK.shape)}, "
            f"but the plan is for [T, k] = {(plan.num_tokens, plan.top_k)}"
        )
    if b_in_EN is not None and tuple(b_in_EN.shape) != (num_experts, n_in):
        raise ValueError(f"b_in must be [E, N_in] = {(num_experts, n_in)}, got {tuple(b_in_EN.shape)}")
    if b_out_ED is not None and tuple(b_out_ED.shape) != (num_experts, out_dim):
        raise ValueError(f"b_out must be [E, D_out] = {(num_experts, out_dim)}, got {tuple(b_out_ED.shape)}")


def single_expert(x_D, w_in_NK, w_out_DF, b_in_N, b_out_D, activation, gated):
    """One expert on one or more rows, written out plainly: the definition every backend must match."""
    h = x_D @ w_in_NK.t()
    if b_in_N is not None:
        h = h + b_in_N
    act = activation_fn(activation)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    y = h @ w_out_DF.t()
    return y if b_out_D is None else y + b_out_D


def _reference_expert_mlp(x_TD, weights_TK, plan, w_in_ENK, w_out_EDF, b_in_EN, b_out_ED, activation, gated):
    """Per token, per slot: slow and plain, the oracle the fast backends are tested against."""
    # Every row starts from a zero that is still connected to all inputs, so backward gives zero gradients
    # (not an error) when nothing was dispatched.
    connected_zero = 0.0 * (x_TD.sum() + weights_TK.sum() + w_in_ENK.sum() + w_out_EDF.sum())
    out_dim = w_out_EDF.shape[1]
    rows = []
    for t in range(plan.num_tokens):
        y_D = x_TD.new_zeros(out_dim) + connected_zero
        for j in range(plan.top_k):
            if not bool(plan.kept_TK[t, j]):
                continue
            e = int(plan.ids_TK[t, j])
            b_in = None if b_in_EN is None else b_in_EN[e]
            b_out = None if b_out_ED is None else b_out_ED[e]
            y_D = y_D + weights_TK[t, j] * single_expert(x_TD[t], w_in_ENK[e], w_out_EDF[e], b_in, b_out, activation, gated)
        rows.append(y_D)
    if not rows:
        return x_TD.new_zeros(0, out_dim) + connected_zero
    return torch.stack(rows)


def grouped_linear(
    x_TD: torch.Tensor, plan: DispatchPlan, w_ENK: torch.Tensor, b_EN: torch.Tensor | None = None
) -> torch.Tensor:
    """Each dispatched slot's row through its expert's linear map: gathered input [T, K] -> sorted rows [S, N].

    The building block for experts that are not a two-layer MLP (ternary, LoRA, FiLM-modulated): rows come
    out in the plan's sorted order; ``combine`` brings them back to token order. Autograd differentiates it.
    """
    if x_TD.shape[-1] != w_ENK.shape[-1]:
        raise ValueError(f"x has last dimension {x_TD.shape[-1]} but the weights take K={w_ENK.shape[-1]}")
    x_SK = x_TD.index_select(0, plan.sorted_tokens_S)
    pieces = []
    for e, rows in expert_slices(plan.counts_list()):
        piece = x_SK[rows] @ w_ENK[e].t()
        pieces.append(piece if b_EN is None else piece + b_EN[e])
    if not pieces:
        return x_SK.new_zeros(0, w_ENK.shape[1])
    return torch.cat(pieces)


def combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted sum of sorted expert outputs back into token order, deterministically: rows are written to
    their (token, slot) place and reduced over the k slots, with no atomics."""
    num_tokens, top_k = plan.num_tokens, plan.top_k
    slots_TKD = y_SD.new_zeros(num_tokens * top_k, y_SD.shape[-1])
    slots_TKD = slots_TKD.index_copy(0, plan.sorted_slots_S, y_SD)
    weighted = slots_TKD.view(num_tokens, top_k, y_SD.shape[-1]) * (weights_TK * plan.kept_TK).unsqueeze(-1).to(y_SD.dtype)
    return weighted.sum(1)
