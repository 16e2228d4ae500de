"""Connectors: encoder tokens (image patches, audio frames) -> tokens in the language model's width.

- :func:`mlp_projector`: LLaVA-1.5's ``mlp2x_gelu`` (Linear(C_enc, D) - GELU - Linear(D, D)), one output token
  per input token; it is timm's ``Mlp``.
- :class:`QueryResampler`: a fixed number of learned queries cross-attend to the encoder tokens (the resampler of
  Flamingo / Qwen-VL, one layer by default), so any number of encoder tokens becomes ``num_queries`` tokens.

- :class:`MoEConnector`: MoCHA's (and CuMo's) mixture of projectors, a routed block on the shared kernels: a
  bias-free softmax gate, top-k renormalised, each expert a ``Linear(C_enc, D) - GELU - Linear(D, D)``; balance
  from each token's first choice per image, plus the router z-loss (MoCHA: 4 experts, top-2, 0.1 and 0.01).
  One connector per vision backbone; several backbones' tokens are concatenated after their connectors.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from moezoo.kernels import expert_mlp, topk_route
from moezoo.kernels.plan import build_plan

from .moe import init_like_linear_
from .routed import RoutedBlock

__all__ = ["mlp_projector", "QueryResampler", "MoEConnector"]

# MoCHA's losses (moec_llava_phi.py): 0.1 x the per-image top-1 balance + 0.01 x the router z-loss
MOCHA_AUX_LOSSES = {"sample_top1_balance": 0.1, "z_loss": 0.01}


def mlp_projector(in_dim: int, out_dim: int) -> Mlp:
    """LLaVA-1.5's projector: ``Linear(in_dim, out_dim) -> GELU -> Linear(out_dim, out_dim)`` (biases on)."""
    return Mlp(in_dim, hidden_features=out_dim, out_features=out_dim, act_layer=nn.GELU)


class QueryResampler(nn.Module):
    """``num_queries`` learned queries attend to the encoder tokens (keys and values: the tokens projected to
    ``out_dim`` and layer-normed; Qwen-VL's resampler without its 2-D position embedding, which the encoder's
    tokens already carry), then an optional MLP, each with a residual; ``depth`` such layers.

    ``forward(tokens [B, N, C_enc], mask [B, N] bool or None) -> [B, num_queries, out_dim]``; ``mask`` marks the
    real tokens (padding of variable-length audio is ignored by the attention).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 16, num_heads: int = 4, depth: int = 1,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"out_dim {out_dim} must be divisible by num_heads {num_heads}")
        if min(in_dim, out_dim, num_queries, num_heads, depth) < 1:
            raise ValueError("in_dim, out_dim, num_queries, num_heads and depth must be >= 1")
        self.num_heads, self.num_queries = num_heads, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.layers = nn.ModuleList(_CrossAttentionLayer(out_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens_BNC: torch.Tensor, mask_BN: torch.Tensor | None = None) -> torch.Tensor:
        if tokens_BNC.dim() != 3:
            raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens_BNC.shape)}")
        if mask_BN is not None and (mask_BN.shape != tokens_BNC.shape[:2] or mask_BN.dtype != torch.bool):
            raise ValueError(f"mask must be bool [B, N] = {tuple(tokens_BNC.shape[:2])}, got {mask_BN.dtype} "
                             f"{tuple(mask_BN.shape)}")
        if mask_BN is not None and not mask_BN.any(-1).all():
            raise ValueError("every item needs at least one real (unmasked) token")
        kv_BND = self.kv_proj(tokens_BNC)
        q_BQD = self.queries.expand(tokens_BNC.shape[0], -1, -1)
        for layer in self.layers:
            q_BQD = layer(q_BQD, kv_BND, mask_BN)
        return self.norm_out(q_BQD)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU) if mlp_ratio > 0 else None

    def _heads(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        return x_BND.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, q_BQD: torch.Tensor, kv_BND: torch.Tensor, mask_BN: torch.Tensor | None) -> torch.Tensor:
        kv = self.norm_kv(kv_BND)
        q, k, v = self._heads(self.q(self.norm_q(q_BQD))), self._heads(self.k(kv)), self._heads(self.v(kv))
        attn_mask = None if mask_BN is None else mask_BN[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        q_BQD = q_BQD + self.proj(out.transpose(1, 2).reshape(q_BQD.shape))
        return q_BQD if self.mlp is None else q_BQD + self.mlp(self.norm_mlp(q_BQD))


class MoEConnector(RoutedBlock):
    """MoCHA's MoE connector (``MLPMoE`` in ``moec_builder.py``): for every encoder token ``x``,
    ``g = softmax(W_g x)`` (``W_g`` bias-free, in float32 or wider), the top-k experts with their ``g`` renormalised to sum
    to 1, and ``y = sum_e w_e (W2_e GELU(W1_e x + b1_e) + b2_e)`` with ``W1_e: C_enc -> D`` and ``W2_e: D -> D``
    (exact GELU). The experts run through ``kernels.expert_mlp`` (an output width other than the input's).

    ``forward(tokens [B, N, C_enc]) -> [B, N, D]``; the routing record's ``tokens_shape`` is ``[B, N]``, so
    ``sample_top1_balance`` is MoCHA's per-image density loss.
    """

    def __init__(self, in_dim: int, out_dim: int, num_experts: int = 4, top_k: int = 2,
                 aux_loss_coefs: dict[str, float] | None = None, backend: str = "auto") -> None:
        if min(in_dim, out_dim, num_experts) < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need in_dim, out_dim, num_experts >= 1 and 1 <= top_k <= num_experts, got {in_dim}, "
                             f"{out_dim}, {num_experts}, {top_k}")
        coefs = MOCHA_AUX_LOSSES if aux_loss_coefs is None else aux_loss_coefs
        super().__init__(num_experts, top_k, aux_loss_coefs=coefs, backend=backend)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.gate = nn.Linear(in_dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, out_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, out_dim, out_dim))
        self.b_out = nn.Parameter(torch.empty(num_experts, out_dim))
        init_like_linear_(self.w_in, self.b_in)
        init_like_linear_(self.w_out, self.b_out)

    def forward(self, tokens_BNC: torch.Tensor) -> torch.Tensor:
        if tokens_BNC.dim() != 3 or tokens_BNC.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must be [B, N, {self.in_dim}], got shape {tuple(tokens_BNC.shape)}")
        x_TC = tokens_BNC.reshape(-1, self.in_dim)
        gate_dtype = torch.promote_types(x_TC.dtype, torch.float32)  # at least float32, as every router here
        logits_TE = F.linear(x_TC.to(gate_dtype), self.gate.weight.to(gate_dtype))
        routed = topk_route(logits_TE, self.top_k, renormalize=True)
        self.record_routing(routed, tokens_BNC.shape[:2])
        plan = build_plan(routed.ids_TK, self.num_experts)
        y_TD = expert_mlp(x_TC, routed.weights_TK.to(x_TC.dtype), plan, self.w_in, self.w_out, b_in_EN=self.b_in,
                          b_out_ED=self.b_out, activation="gelu", gated=False, backend=self.backend)
        return y_TD.view(*tokens_BNC.shape[:2], self.out_dim)
