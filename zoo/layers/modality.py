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

MoMa (Lin et al. 2024, arXiv 2407.21770; no public code): :class:`ModalityGroupMoE`, experts partitioned into
one group per modality (the paper: 4 text + 4 image experts), a token only ever processed by its own
modality's group, routed inside the group by expert choice in training and by a per-group auxiliary router
(trained on the expert-choice decisions) at causal inference. What is the paper's and what is our reading is
in the class docstring.

Modality ids are ``0 .. num_modalities - 1``: nothing here assumes two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moezoo.kernels import cpu_decode, expert_mlp, losses, topk_route
from moezoo.kernels.plan import build_plan, capacity_for
from moezoo.kernels.routing import RouterOutput, expert_choice_route

from .blocks import GatedMLP, KVCache, Rotary, causal_attention
from .moe import init_like_linear_
from .routed import RoutedBlock

__all__ = ["ModalityUntiedAttention", "ModalityUntiedFeedForward", "IntraInterMoE", "ModalityGroupMoE",
           "check_modalities"]


def check_modalities(modality_BS: torch.Tensor, shape: tuple[int, int], num_modalities: int) -> tuple[int, int]:
    """Modality ids must be integers ``[B, S]`` in ``[0, num_modalities)``; returns the lowest and highest id
    ((0, 0) when there are none)."""
    if modality_BS.shape != shape or modality_BS.dtype.is_floating_point or modality_BS.dtype == torch.bool:
        raise ValueError(f"modality ids must be an integer tensor [B, S] = {tuple(shape)}, got "
                         f"{modality_BS.dtype} {tuple(modality_BS.shape)}")
    if not modality_BS.numel():
        return 0, 0
    if modality_BS.numel() == 1:  # a one-token decoding step: one read instead of a reduction
        lowest = highest = int(modality_BS.reshape(()))
    else:
        lowest, highest = (int(v) for v in modality_BS.aminmax())
    if lowest < 0 or highest >= num_modalities:
        raise ValueError(f"modality ids must be in [0, {num_modalities}), got values from {lowest} to {highest}")
    return lowest, highest


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

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor, cache: KVCache | None = None,
                rotary: Rotary | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        check_modalities(modality_BS, (B, S), self.num_modalities)
        q, k, v = self._qkv(x_BSD, modality_BS).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, head_dim]
        o_BSD = causal_attention(q, k, v, cache, rotary).transpose(1, 2).reshape(B, S, D)
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
    AUX_STATE = ("last_modality_T",)

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
        self.register_buffer("columns_MG", torch.tensor([self.experts_of(m) for m in range(num_modalities)]),
                             persistent=False)
        self.last_modality_T: torch.Tensor | None = None

    def experts_of(self, modality: int) -> list[int]:
        """The global ids of the experts modality ``modality`` routes over: its intra experts, then the shared."""
        first = modality * self.num_intra
        shared = self.num_modalities * self.num_intra
        return [*range(first, first + self.num_intra), *range(shared, shared + self.num_shared)]

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        lowest, highest = check_modalities(modality_BS, tuple(x_BSD.shape[:2]), self.num_modalities)
        prepared = self._decode_kernel(x_BSD, lowest) if lowest == highest else None
        if prepared is not None:  # a decoding step: router, top-k and experts in one native call (checked width)
            out = prepared(x_BSD if x_BSD.is_contiguous() else x_BSD.contiguous())
            if out is not None:  # (None: a non-finite logit, which the eager path reports)
                y_BSD, ids_TK, weights_TK, probs_TE, logits_TE = out
                # straight into __dict__ (a plain attribute, set in __init__): nn.Module.__setattr__ costs ~8 µs
                self.__dict__["last_modality_T"] = modality_BS.reshape(-1)
                self.record_routing(RouterOutput(ids_TK, weights_TK, probs_TE, logits_TE), x_BSD.shape[:2])
                return y_BSD
        x_TD, modality_T = x_BSD.reshape(-1, self.dim), modality_BS.reshape(-1)
        if lowest == highest:  # one modality (a decoding step, a batch of one kind): route over its columns only
            routed = self._route_one_modality(x_TD, lowest)
        else:
            routed = self._route_mixed(x_TD, modality_T)
        self.last_modality_T = modality_T
        self.record_routing(routed, x_BSD.shape[:2])
        plan = build_plan(routed.ids_TK, self.num_experts)
        y_TD = expert_mlp(x_TD, routed.weights_TK.to(x_TD.dtype), plan, self.w_in, self.w_out, backend=self.backend)
        return y_TD.view_as(x_BSD)

    def _decode_kernel(self, x: torch.Tensor, modality: int) -> cpu_decode.PreparedLayer | None:
        """The native call (``kernels.cpu_decode``) of ``_route_one_modality`` and the experts, when this call can
        be one (``cpu_decode.fits``): the modality's router over its own experts, softmax top-k renormalised."""
        params = self._parameters
        tensors = (self.routers._modules[str(modality)]._parameters["weight"], params["w_in"], params["w_out"])
        if not cpu_decode.fits(x, self.top_k, self.training, self.backend, tensors):
            return None
        frozen = self._decode_frozen
        return cpu_decode.prepared_for(self._decode_prepared, modality, tensors, lambda: cpu_decode.PreparedLayer(
            tensors[0].detach(), None, None, tensors[1].detach(), tensors[2].detach(), None, top_k=self.top_k,
            activation="silu", gated=True, renormalize=True, expert_map_E=self.columns_MG[modality], packed=frozen),
            versions=frozen)

    def _route_mixed(self, x_TD: torch.Tensor, modality_T: torch.Tensor) -> RouterOutput:
        """Each modality's router fills its own columns of [T, E] logits; a softmax top-k over the allowed ones."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        logits_TE = x_TD.new_zeros(x_TD.shape[0], self.num_experts, dtype=dtype)
        for m, router in enumerate(self.routers):
            rows = (modality_T == m).nonzero().squeeze(1)
            if rows.numel():
                own = F.linear(x_TD[rows].to(dtype), router.weight.to(dtype))
                logits_TE = logits_TE.index_put((rows[:, None], self.columns_MG[m]), own)
        return topk_route(logits_TE, self.top_k, renormalize=True, allowed_TE=self.allowed_ME[modality_T])

    def _route_one_modality(self, x_TD: torch.Tensor, modality: int) -> RouterOutput:
        """``_route_mixed`` when every token is of ``modality``: the softmax top-k over its own G columns (the same
        distribution as the masked one over E), then ids, probabilities and logits placed in the E columns."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        own_TG = F.linear(x_TD.to(dtype), self.routers[modality].weight.to(dtype))
        local = topk_route(own_TG, self.top_k, renormalize=True)
        columns_G = self.columns_MG[modality]
        empty_TE = own_TG.new_zeros(x_TD.shape[0], self.num_experts)
        return RouterOutput(ids_TK=columns_G[local.ids_TK], weights_TK=local.weights_TK,
                            probs_TE=empty_TE.index_copy(1, columns_G, local.probs_TE),
                            logits_TE=empty_TE.index_copy(1, columns_G, own_TG))


# ----------------------------------------------------------------------------------------------------------
# MoMa: modality expert groups, expert choice inside each group, auxiliary routers for causal inference
# ----------------------------------------------------------------------------------------------------------

INFERENCE_ROUTINGS = ("causal", "expert_choice")


def _causal_router_loss(block: "ModalityGroupMoE", routed: RouterOutput, tokens_shape: tuple[int, ...]) -> torch.Tensor:
    """Sum over the modality groups in the batch of the mean binary cross-entropy (with logits) between the
    group's auxiliary-router logits ``[T_m, E_m]`` and its experts' expert-choice decisions (1: the expert
    picked the token). Input and targets are detached: only the auxiliary routers learn from it."""
    total = routed.probs_TE.new_zeros(())
    for logits_TG, picked_TG in block.last_causal_targets:
        total = total + F.binary_cross_entropy_with_logits(logits_TG, picked_TG.to(logits_TG.dtype))
    return total


class ModalityGroupMoE(RoutedBlock):
    """MoMa's modality-aware experts: one expert group per modality, expert-choice routing inside the group,
    an auxiliary router per group for causal inference. SwiGLU experts on the shared kernels.
    ``forward(x [B, S, D], modality [B, S]) -> [B, S, D]``.

    From the paper's abstract (Lin et al. 2024, arXiv 2407.21770): the experts are divided into
    modality-specific groups (its 1.4B model: 4 text + 4 image experts); a group exclusively processes its
    modality's tokens, with learned routing inside the group. From the paper's method: that routing is expert
    choice (Zhou et al. 2022), each expert taking a fixed number of its modality's tokens, so the load is
    balanced by construction; expert choice is not causal (an expert's choice depends on later tokens of the
    batch), so for autoregressive inference an auxiliary router per group predicts from the token alone whether
    each expert would select it, trained behind a stop-gradient so it does not affect the main model.

    Our reading (there is no public code; these are choices):

    - scores: the group's bias-free router ``Linear(D, E_m)`` (float32 or wider logits), softmax over the
      group's experts per token; expert e of group m takes the ``C_m = min(T_m, ceil(top_k * T_m / E_m))``
      tokens of modality m with the highest score for e (:func:`~moezoo.kernels.plan.capacity_for`, capacity
      factor 1: on average ``top_k`` experts per token; a group of fewer than ``top_k`` experts gives every
      token all of them); a token's output is ``sum over the experts that picked it of score * expert(x)``,
      not renormalised (a token may be picked by no expert: output 0, the residual carries it);
    - auxiliary router: ``Linear(D, H) - SiLU - Linear(H, E_m)`` per group, ``H = aux_router_hidden`` or
      ``max(1, D // 2)``, on ``x.detach()``; its loss ``"causal_router"`` (an ``OWN_AUX_LOSSES`` entry,
      coefficient 1.0 by default) is the binary cross-entropy with logits against that step's 0/1
      expert-choice selection, mean over the group's tokens x experts, summed over the groups. Input and
      targets are detached, so it trains only the auxiliary routers. Drop it from ``aux_loss_coefs`` and they
      are not trained;
    - causal inference (``inference_routing="causal"``, the default; used whenever the module is in eval
      mode): a token's experts are those of its group whose auxiliary probability ``sigmoid(logit) > 0.5``,
      or the single most probable one if none passes; weights: the main router's softmax scores of those
      experts (not renormalised, as in training). Each token's output then depends on that token alone.
      ``inference_routing="expert_choice"`` keeps expert choice in eval too (teacher-forced scoring of whole
      sequences). In eval the ``"causal_router"`` term still compares the auxiliary routers with the expert
      choice the batch would have made (a validation metric; degenerate for one-token decoding steps).

    Expert ids: group m owns ``offset_m .. offset_m + E_m - 1``, groups in modality order
    (:meth:`experts_of`). The routing record's ``ids_TK`` has ``max_m E_m`` columns in every mode: a token's
    experts by descending weight, then ``-1`` (column 0 is its top expert, what ``expert_map`` shows; all
    ``-1`` for a token no expert picked); ``probs_TE`` holds each token's group softmax (0 for other groups'
    experts) and ``logits_TE`` its group's logits (the dtype's lowest value elsewhere, so the z-loss sees the
    group's logsumexp)."""

    OWN_AUX_LOSSES = {"causal_router": _causal_router_loss}
    AUX_STATE = ("last_causal_targets",)

    def __init__(self, dim: int, hidden_dim: int, experts_per_group: int | Sequence[int] = 4, num_modalities: int = 2,
                 top_k: float | int = 2, *, aux_router_hidden: int | None = None,
                 aux_loss_coefs: dict[str, float] | None = None, inference_routing: str = "causal",
                 backend: str = "auto") -> None:
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            return value

        positive_int("dim", dim)
        positive_int("hidden_dim", hidden_dim)
        positive_int("num_modalities", num_modalities)
        if isinstance(experts_per_group, (str, bytes)) or not isinstance(experts_per_group, (int, Sequence)):
            raise ValueError(f"experts_per_group must be a positive integer (every group) or one per modality, "
                             f"got {experts_per_group!r}")
        if isinstance(experts_per_group, int):
            groups = (positive_int("experts_per_group", experts_per_group),) * num_modalities
        else:
            groups = tuple(experts_per_group)
            if len(groups) != num_modalities:
                raise ValueError(f"experts_per_group must give one group size per modality ({num_modalities}), "
                                 f"got {len(groups)}: {groups!r}")
            for m, size in enumerate(groups):
                positive_int(f"experts_per_group[{m}]", size)
        if (isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not math.isfinite(top_k)
                or not 0 < top_k <= max(groups)):
            raise ValueError(f"top_k (the average experts per token) must be a number in (0, {max(groups)}] (the "
                             f"largest group), got {top_k!r}")
        hidden = max(1, dim // 2) if aux_router_hidden is None else positive_int("aux_router_hidden", aux_router_hidden)
        coefs = {"causal_router": 1.0} if aux_loss_coefs is None else aux_loss_coefs
        super().__init__(sum(groups), max(1, math.ceil(top_k)), aux_loss_coefs=coefs, backend=backend,
                         expert_names=[f"m{m} group" for m, size in enumerate(groups) for _ in range(size)])
        self.top_k = top_k  # the average experts per token (the base only accepts the integer ceiling)
        self.dim, self.hidden_dim, self.num_modalities = dim, hidden_dim, num_modalities
        self.experts_per_group, self.aux_router_hidden = groups, hidden
        self.offsets = tuple(sum(groups[:m]) for m in range(num_modalities))
        self.routers = nn.ModuleList(nn.Linear(dim, size, bias=False) for size in groups)
        self.aux_routers = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, size))
                                         for size in groups)
        self.w_in = nn.Parameter(torch.empty(self.num_experts, 2 * hidden_dim, dim))  # gate rows, then up rows
        self.w_out = nn.Parameter(torch.empty(self.num_experts, dim, hidden_dim))
        init_like_linear_(self.w_in)
        init_like_linear_(self.w_out)
        self.inference_routing = inference_routing
        self.last_modality_T: torch.Tensor | None = None
        # (auxiliary logits [T_m, E_m], expert-choice selection [T_m, E_m]) per group of the last forward.
        self.last_causal_targets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def inference_routing(self) -> str:
        return self._inference_routing

    @inference_routing.setter
    def inference_routing(self, value: str) -> None:
        if value not in INFERENCE_ROUTINGS:
            raise ValueError(f"unknown inference_routing {value!r}; accepted: {', '.join(INFERENCE_ROUTINGS)}")
        self._inference_routing = value

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts_per_group={self.experts_per_group}, "
                f"top_k={self.top_k}, aux_router_hidden={self.aux_router_hidden}, "
                f"inference_routing={self.inference_routing!r}, backend={self.backend!r}")

    def experts_of(self, modality: int) -> list[int]:
        """The global ids of modality ``modality``'s expert group."""
        if not 0 <= modality < self.num_modalities:
            raise ValueError(f"modality must be in [0, {self.num_modalities}), got {modality}")
        return list(range(self.offsets[modality], self.offsets[modality] + self.experts_per_group[modality]))

    def capacity(self, num_tokens: int, modality: int) -> int:
        """Tokens each expert of ``modality``'s group takes from its ``num_tokens`` tokens in expert choice:
        ``min(T_m, ceil(top_k * T_m / E_m))``."""
        if num_tokens == 0:
            return 0
        return min(num_tokens, capacity_for(num_tokens, self.top_k, self.experts_per_group[modality], 1.0))

    def _aux_logits(self, modality: int, x_TD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        first, act, second = self.aux_routers[modality]
        h = act(F.linear(x_TD.detach().to(dtype), first.weight.to(dtype), first.bias.to(dtype)))
        return F.linear(h, second.weight.to(dtype), second.bias.to(dtype))

    def forward(self, x_BSD: torch.Tensor, modality_BS: torch.Tensor) -> torch.Tensor:
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, S, D={self.dim}], got shape {tuple(x_BSD.shape)}")
        check_modalities(modality_BS, tuple(x_BSD.shape[:2]), self.num_modalities)
        x_TD, modality_T = x_BSD.reshape(-1, self.dim), modality_BS.reshape(-1)
        num_tokens, device = x_TD.shape[0], x_TD.device
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        expert_choice = self.training or self.inference_routing == "expert_choice"
        wants_targets = "causal_router" in self.aux_loss_coefs

        ids_TK = torch.full((num_tokens, max(self.experts_per_group)), -1, dtype=torch.long, device=device)
        weights_TK = x_TD.new_zeros(ids_TK.shape, dtype=dtype)
        probs_TE = x_TD.new_zeros(num_tokens, self.num_experts, dtype=dtype)
        logits_TE = x_TD.new_full((num_tokens, self.num_experts), torch.finfo(dtype).min, dtype=dtype)
        self.last_causal_targets = []
        for m, router in enumerate(self.routers):  # one pass per modality group, never per expert
            rows = (modality_T == m).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            size = self.experts_per_group[m]
            local = torch.arange(size, device=device)
            logits_TG = F.linear(x_TD[rows].to(dtype), router.weight.to(dtype))
            chosen_TG = None
            if expert_choice or wants_targets:
                routed_m = expert_choice_route(logits_TG, self.capacity(rows.numel(), m))
                probs_TG, chosen_TG = routed_m.probs_TE, routed_m.ids_TK >= 0
            else:
                probs_TG = logits_TG.softmax(-1)
            aux_TG = None
            if not expert_choice or wants_targets:
                aux_TG = self._aux_logits(m, x_TD[rows], dtype)
            if expert_choice:
                picked_TG = chosen_TG
            else:  # sigmoid(logit) > 0.5, else the most probable expert alone
                picked_TG = aux_TG > 0
                fallback_TG = F.one_hot(aux_TG.argmax(-1), size).bool() & ~picked_TG.any(-1, keepdim=True)
                picked_TG = picked_TG | fallback_TG
            if wants_targets:
                self.last_causal_targets.append((aux_TG, chosen_TG.detach()))
            ids_TK[rows, :size] = torch.where(picked_TG, local + self.offsets[m], -1)
            weights_TK = weights_TK.index_put((rows[:, None], local), probs_TG * picked_TG)
            columns = local + self.offsets[m]
            probs_TE = probs_TE.index_put((rows[:, None], columns), probs_TG)
            logits_TE = logits_TE.index_put((rows[:, None], columns), logits_TG)

        # Each token's experts by descending weight, unused slots last: column 0 is its top expert (expert_map).
        order_TK = torch.sort(torch.where(ids_TK >= 0, weights_TK.detach(), -1.0), dim=-1, descending=True,
                              stable=True).indices
        ids_TK, weights_TK = ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
        routed = RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)
        self.last_modality_T = modality_T
        self.record_routing(routed, x_BSD.shape[:2])
        plan = build_plan(ids_TK, self.num_experts)
        y_TD = expert_mlp(x_TD, weights_TK.to(x_TD.dtype), plan, self.w_in, self.w_out, backend=self.backend)
        return y_TD.view_as(x_BSD)
