"""Modality-aware layers: weights chosen by each token's modality id, which travels with the sequence.

Mixture-of-Transformers (Liang et al. 2024; facebookresearch/Mixture-of-Transformers, ``src/simple_Modality
UntiedAttention.py`` and ``simple_ModalityUntiedFeedForward.py``): every non-embedding weight is untied by
modality and chosen deterministically (no router, no aux loss), while the attention stays global over the whole
sequence:

- :class:`ModalityUntiedAttention`: per modality m, ``q, k, v = W_q[m] x, W_k[m] x, W_v[m] x`` for that
  modality's tokens (optionally a per-modality RMSNorm of q and k per head), one causal attention over all
  tokens, then ``RMSNorm_m(W_o[m] o)`` per token;
- :class:`ModalityUntiedFeedForward`: ``RMSNorm_m(SwiGLU_m(x))`` per token.

The norms sit on the sublayer outputs, as the reference code writes them (the residual is added outside).

MoIIE (AlenjandroWang/MoIIE, ``phi3_moe_mm_s/modeling_phi3.py: MoESparseMoeBlock``): :class:`IntraInterMoE`,
a routed block whose experts are each modality's own (intra-modality) experts plus experts shared by all
(inter-modality); every modality has its own bias-free router over its intra experts and the shared ones,
softmax top-k renormalised, and its own Switch balance loss over its tokens and those experts (Mixtral's
``load_balancing_loss_func``), 0.001 each in the paper. With 2 modalities, E/4 intra experts each and E/2
shared this is the paper's layout, for any E divisible by 4 (the official code's expert offsets only hold for
E = 4). The official code counts an image's last token as text (its mask is "vision and the next token is
vision"); here a token routes by the modality id it carries.

Modality ids are ``0 .. num_modalities - 1``: nothing here assumes two.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels import expert_mlp, losses, topk_route
from moezoo.kernels.plan import build_plan
from moezoo.kernels.routing import RouterOutput

from .blocks import GatedMLP, KVCache, causal_attention
from .moe import init_like_linear_
from .routed import RoutedBlock

__all__ = ["ModalityUntiedAttention", "ModalityUntiedFeedForward", "IntraInterMoE", "check_modalities"]


def check_modalities(modality_BS: torch.Tensor, shape: tuple[int, int], num_modalities: int) -> None:
    """Modality ids must be integers ``[B, S]`` in ``[0, num_modalities)``."""
    if modality_BS.shape != shape or modality_BS.dtype.is_floating_point or modality_BS.dtype == torch.bool:
        raise ValueError(f"modality ids must be an integer tensor [B, S] = {tuple(shape)}, got "
                         f"{modality_BS.dtype} {tuple(modality_BS.shape)}")
    if modality_BS.numel() and (int(modality_BS.min()) < 0 or int(modality_BS.max()) >= num_modalities):
        raise ValueError(f"modality ids must be in [0, {num_modalities}), got values from {int(modality_BS.min())} "
                         f"to {int(modality_BS.max())}")


def _per_modality(layers, x_BS_: torch.Tensor, modality_BS: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """``layers[m](x)`` for the tokens of modality m (any callables), back in sequence order."""
    out = x_BS_.new_empty(*x_BS_.shape[:2], *out_shape)
    for m, layer in enumerate(layers):
        where = modality_BS == m
        if where.any():
            out[where] = layer(x_BS_[where])
    return out


class ModalityUntiedAttention(nn.Module):
    """Causal self-attention with every projection (and the output norm) untied by modality; global attention.
    ``forward(x [B, S, D], modality [B, S], cache=None)``: with a :class:`KVCache`, the new positions also attend
    to the cached ones (incremental decoding gives the same result as one pass)."""

    def __init__(self, dim: int, num_heads: int, num_modalities: int, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.dim, self.num_heads, self.head_dim, self.num_modalities = dim, num_heads, dim // num_heads, num_modalities
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(num_modalities))
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_modalities))
        self.out_norm = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(num_modalities))
        self.q_norm = nn.ModuleList(nn.RMSNorm(self.head_dim, eps=eps) for _ in range(num_modalities)) if qk_norm else None
        self.k_norm = nn.ModuleList(nn.RMSNorm(self.head_dim, eps=eps) for _ in range(num_modalities)) if qk_norm else None

    def _qkv(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        qkv = _per_modality(self.qkv, x_BSD, modality_BS, (3 * self.dim,))
        qkv = qkv.view(*x_BSD.shape[:2], 3, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            heads = (self.num_heads, self.head_dim)
            q = _per_modality(self.q_norm, qkv[:, :, 0], modality_BS, heads)
            k = _per_modality(self.k_norm, qkv[:, :, 1], modality_BS, heads)
            qkv = torch.stack([q, k, qkv[:, :, 2]], dim=2)
        return qkv

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        check_modalities(modality_BS, (B, S), self.num_modalities)
        q, k, v = self._qkv(x_BSD, modality_BS).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, head_dim]
        o_BSD = causal_attention(q, k, v, cache).transpose(1, 2).reshape(B, S, D)
        projected = _per_modality(self.proj, o_BSD, modality_BS, (D,))
        return _per_modality(self.out_norm, projected, modality_BS, (D,))


class ModalityUntiedFeedForward(nn.Module):
    """``RMSNorm_m(SwiGLU_m(x))`` for the tokens of modality m: one FFN and one output norm per modality."""

    def __init__(self, dim: int, hidden_dim: int, num_modalities: int, eps: float = 1e-6):
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.dim, self.num_modalities = dim, num_modalities
        self.ffn = nn.ModuleList(GatedMLP(dim, hidden_dim) for _ in range(num_modalities))
        self.out_norm = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(num_modalities))

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        check_modalities(modality_BS, tuple(x_BSD.shape[:2]), self.num_modalities)
        layers = [lambda x, f=f, n=n: n(f(x)) for f, n in zip(self.ffn, self.out_norm)]
        return _per_modality(layers, x_BSD, modality_BS, (self.dim,))


def _modality_balance(block: "IntraInterMoE", routed: RouterOutput, tokens_shape: tuple[int, ...]) -> torch.Tensor:
    """Sum over modalities of Mixtral's ``G * sum_e (slots of e / tokens) * mean prob of e`` over that
    modality's tokens and its G = intra + shared experts (k times the Switch loss's slot fraction)."""
    modality_T = block.last_modality_T
    total = routed.probs_TE.new_zeros(())
    for m in range(block.num_modalities):
        rows = (modality_T == m).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        columns = block.experts_of(m)
        local_E = torch.full((block.num_experts,), -1, dtype=torch.long, device=rows.device)
        local_E[columns] = torch.arange(len(columns), device=rows.device)
        ids_TK = local_E[routed.ids_TK[rows]]
        probs_TG = routed.probs_TE[rows][:, columns]
        total = total + block.top_k * losses.switch_load_balance_loss(probs_TG, ids_TK, len(columns))
    return total


class IntraInterMoE(RoutedBlock):
    """MoIIE's mixture of intra- and inter-modality experts (see the module docstring), SwiGLU experts on the
    shared kernels. Expert ids: modality m's intra experts ``m * num_intra .. (m + 1) * num_intra - 1``, then the
    ``num_shared`` shared ones. ``forward(x [B, S, D], modality [B, S]) -> [B, S, D]``."""

    OWN_AUX_LOSSES = {"modality_balance": _modality_balance}

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_modalities: int = 2, top_k: int = 2, *,
                 num_intra: int | None = None, num_shared: int | None = None,
                 aux_loss_coefs: dict[str, float] | None = None, backend: str = "auto") -> None:
        if num_intra is None and num_shared is None:  # the paper's split for two modalities: E/4, E/4, E/2
            if num_experts % (2 * num_modalities):
                raise ValueError(f"num_experts ({num_experts}) must be divisible by {2 * num_modalities} for half "
                                 f"shared experts and an equal intra share per modality; or give num_intra, num_shared")
            num_intra, num_shared = num_experts // (2 * num_modalities), num_experts // 2
        if num_intra is None or num_shared is None or num_modalities * num_intra + num_shared != num_experts:
            raise ValueError(f"num_modalities x num_intra + num_shared must be num_experts ({num_experts}), got "
                             f"{num_modalities} x {num_intra} + {num_shared}")
        if not 1 <= top_k <= num_intra + num_shared:
            raise ValueError(f"top_k must be between 1 and the {num_intra + num_shared} experts a modality sees, got {top_k}")
        coefs = {"modality_balance": 0.001} if aux_loss_coefs is None else aux_loss_coefs
        super().__init__(num_experts, top_k, aux_loss_coefs=coefs, backend=backend,
                         expert_names=[f"m{m} intra" for m in range(num_modalities) for _ in range(num_intra)]
                         + ["shared"] * num_shared)
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_modalities, self.num_intra, self.num_shared = num_modalities, num_intra, num_shared
        self.routers = nn.ModuleList(nn.Linear(dim, num_intra + num_shared, bias=False) for _ in range(num_modalities))
        self.w_in = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # gate rows, then up rows
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        init_like_linear_(self.w_in)
        init_like_linear_(self.w_out)
        allowed = torch.zeros(num_modalities, num_experts, dtype=torch.bool)
        for m in range(num_modalities):
            allowed[m, self.experts_of(m)] = True
        self.register_buffer("allowed_ME", allowed, persistent=False)
        self.last_modality_T: torch.Tensor | None = None

    def experts_of(self, modality: int) -> list[int]:
        """The global ids of the experts modality ``modality`` routes over: its intra experts, then the shared."""
        first = modality * self.num_intra
        shared = self.num_modalities * self.num_intra
        return [*range(first, first + self.num_intra), *range(shared, shared + self.num_shared)]

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        check_modalities(modality_BS, tuple(x_BSD.shape[:2]), self.num_modalities)
        x_TD, modality_T = x_BSD.reshape(-1, self.dim), modality_BS.reshape(-1)
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        logits_TE = x_TD.new_zeros(x_TD.shape[0], self.num_experts, dtype=dtype)
        for m, router in enumerate(self.routers):  # each modality's router fills its own columns
            rows = (modality_T == m).nonzero().squeeze(1)
            if rows.numel():
                own = F.linear(x_TD[rows].to(dtype), router.weight.to(dtype))
                logits_TE = logits_TE.index_put((rows[:, None], torch.tensor(self.experts_of(m), device=rows.device)), own)
        routed = topk_route(logits_TE, self.top_k, renormalize=True, allowed_TE=self.allowed_ME[modality_T])
        self.last_modality_T = modality_T
        self.record_routing(routed, x_BSD.shape[:2])
        plan = build_plan(routed.ids_TK, self.num_experts)
        y_TD = expert_mlp(x_TD, routed.weights_TK.to(x_TD.dtype), plan, self.w_in, self.w_out, backend=self.backend)
        return y_TD.view_as(x_BSD)
