"""Routers: router logits ``[T, E]`` -> which experts each token uses, and with what weight.

Every router is a plain function of tensors (no parameters, no state) and returns a :class:`RouterOutput`
in token-major form: ``ids_TK[t, j]`` names the expert of token t's slot j and ``weights_TK[t, j]`` its
weight. An id of ``-1`` marks an unused slot (its weight is 0); :func:`moezoo.kernels.plan.build_plan` does
not dispatch ids outside ``[0, E)``.

Routers:

- :func:`topk_route`: softmax or sigmoid top-k, with the DeepSeek extras (selection-only score bias,
  group-limited top-k, renormalisation, routed scaling) and an optional per-token allowed-expert mask.
- :func:`top_p_route`: the smallest set of experts whose probability mass reaches ``p`` (Dynamic MoE,
  UniMoE-Audio), so the number of experts varies per token.
- :func:`top_p_near_tie_route`: UniMoE-Audio's router: top-p's set, each chosen expert weighted by the softmax
  over the experts whose logits nearly tie with its own, renormalised.
- :func:`expert_choice_route`: every expert picks its ``capacity`` most confident tokens (Zhou et al. 2022).
- :func:`noisy_topk_route`: Shazeer et al. 2017's noisy top-k gating with the smooth load estimate
  (MoE-Fusion).
- :func:`gshard_top2_route`: GShard's / DeepSpeed's top-2 gating (MoE-LLaVA): the argmax, then a second expert
  chosen with Gumbel noise in training; :func:`renormalize_kept` renormalises after a capacity drop, as it does.

Scores and weights are computed in float32 (float64 if the logits are float64), whatever the logits' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RouterOutput",
    "SCORINGS",
    "GROUP_SCORES",
    "topk_route",
    "top_p_route",
    "top_p_near_tie_route",
    "expert_choice_route",
    "noisy_topk_route",
    "gshard_top2_route",
    "renormalize_kept",
]

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2sum")


@dataclass
class RouterOutput:
    """What a router decided for ``T`` tokens over ``E`` experts.

    Attributes:
        ids_TK: int64 [T, k]; the expert of every slot, ``-1`` for an unused slot (top-p, expert-choice).
        weights_TK: float [T, k]; the slot's routing weight, 0 for unused slots.
        probs_TE: float [T, E]; the scores routing chose from (softmax probabilities or sigmoid scores,
            without any selection bias), for the auxiliary losses.
        logits_TE: the raw router logits, as given (for the z-loss).
        load_E: float [E]; the smooth load estimate of noisy top-k routing, otherwise None.
    """

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    load_E: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _check_logits(logits_TE: torch.Tensor, name: str = "logits_TE") -> None:
    if not isinstance(logits_TE, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [T, E], got {type(logits_TE).__name__}")
    if not logits_TE.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {logits_TE.dtype}")
    if logits_TE.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, E] (tokens x experts), got shape {tuple(logits_TE.shape)}")
    if logits_TE.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column, got shape {tuple(logits_TE.shape)}")
    # A finite sum means every logit is finite (a NaN or an infinity makes the sum NaN or infinite): one reduction,
    # where the elementwise test costs two ops and a larger temporary; only a sum that overflowed is looked at again.
    if logits_TE.numel() and not math.isfinite(logits_TE.sum().item()) and not bool(torch.isfinite(logits_TE).all()):
        raise ValueError(f"{name} contains NaN or infinite values; router logits must be finite")


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_k(k, num_experts: int, name: str = "k") -> int:
    k = _check_int(k, name)
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must be between 1 and the number of experts E={num_experts}, got {name}={k}")
    return k


def _check_allowed(allowed_TE: torch.Tensor | None, logits_TE: torch.Tensor) -> torch.Tensor | None:
    if allowed_TE is None:
        return None
    if not isinstance(allowed_TE, torch.Tensor):
        raise TypeError(f"allowed_TE must be a bool tensor [T, E] or None, got {type(allowed_TE).__name__}")
    if allowed_TE.dtype != torch.bool:
        raise TypeError(f"allowed_TE must be a bool tensor [T, E], got dtype {allowed_TE.dtype}")
    if allowed_TE.shape != logits_TE.shape:
        raise ValueError(
            f"allowed_TE must have the logits' shape {tuple(logits_TE.shape)}, got {tuple(allowed_TE.shape)}"
        )
    return allowed_TE.to(logits_TE.device)


def _check_min_allowed(allowed_TE: torch.Tensor | None, need: int) -> None:
    if allowed_TE is None or allowed_TE.shape[0] == 0:
        return
    counts_T = allowed_TE.sum(-1)
    if int(counts_T.min()) >= need:  # one reduction on the common path; which tokens fall short only on the other
        return
    short = torch.nonzero(counts_T < need).flatten()
    if short.numel():
        t = int(short[0])
        raise ValueError(
            f"allowed_TE leaves token {t} only {int(counts_T[t])} allowed expert(s) but k={need} are needed "
            f"({short.numel()} token(s) affected); every token needs at least k allowed experts"
        )


def _compute_dtype(logits_TE: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits_TE.dtype == torch.float64 else torch.float32


def _masked_softmax(logits_TE: torch.Tensor, allowed_TE: torch.Tensor | None) -> torch.Tensor:
    x = logits_TE.to(_compute_dtype(logits_TE))
    if allowed_TE is not None:
        x = x.masked_fill(~allowed_TE, float("-inf"))
    return torch.softmax(x, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Top-k (Mixtral / DiT-MoE / DeepSeek-V2 / DeepSeek-V3)
# ---------------------------------------------------------------------------------------------------------


def topk_route(
    logits_TE: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    score_bias_E: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scaling: float = 1.0,
    allowed_TE: torch.Tensor | None = None,
) -> RouterOutput:
    """Each token takes the k experts with the highest scores (HF ``DeepseekV3TopkRouter`` / vLLM
    ``grouped_topk`` semantics).

    Args:
        logits_TE: floating [T, E] router logits.
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` (over the experts) or ``"sigmoid"`` (each expert independently).
        renormalize: divide the k weights by their sum (Mixtral, ``norm_topk_prob``).
        score_bias_E: [E] bias added to the scores for *choosing* experts only (DeepSeek-V3's aux-loss-free
            balancing); the weights still come from the unbiased scores.
        num_groups, topk_groups: group-limited routing: the experts are split into ``num_groups`` equal
            groups of consecutive ids, each token keeps its ``topk_groups`` best groups and picks its top k
            inside them. Give both or neither.
        group_score: how a group is scored from its (biased) expert scores: ``"max"`` (DeepSeek-V2) or
            ``"top2sum"``, the sum of its two best (DeepSeek-V3). Default: "top2sum" for sigmoid scoring,
            "max" for softmax.
        scaling: multiply the final weights (DeepSeek's ``routed_scaling_factor``).
        allowed_TE: bool [T, E]; token t may only use experts e with ``allowed_TE[t, e]`` (modality-aware
            routing). With softmax scoring the softmax runs over the allowed experts only; with sigmoid the
            disallowed experts' scores are reported as 0. Every token needs at least k allowed experts.

    Returns:
        A RouterOutput whose columns are ordered by descending choice score (biased score).
    """
    _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    k = _check_k(k, num_experts)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    allowed_TE = _check_allowed(allowed_TE, logits_TE)
    _check_min_allowed(allowed_TE, k)
    grouped = _check_groups(num_groups, topk_groups, group_score, scoring, num_experts, k)
    dtype = _compute_dtype(logits_TE)

    if scoring == "softmax":
        scores_TE = _masked_softmax(logits_TE, allowed_TE)
    else:
        scores_TE = torch.sigmoid(logits_TE.to(dtype))
        if allowed_TE is not None:
            scores_TE = scores_TE.masked_fill(~allowed_TE, 0.0)

    if score_bias_E is None and allowed_TE is None and grouped is None:
        # chosen by the scores themselves: topk's values are the weights (differentiable, as gather's would be)
        weights_TK, ids_TK = torch.topk(scores_TE, k, dim=-1, sorted=True)
    else:
        choice_TE = scores_TE.detach()
        if score_bias_E is not None:
            choice_TE = choice_TE + _check_bias(score_bias_E, num_experts, logits_TE.device).to(dtype)
        if allowed_TE is not None:
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
        if grouped is not None:
            choice_TE = _restrict_to_groups(choice_TE, *grouped, allowed_TE, k)
        ids_TK = torch.topk(choice_TE, k, dim=-1, sorted=True).indices
        weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    if scaling != 1.0:
        weights_TK = weights_TK * scaling
    return RouterOutput(ids_TK=ids_TK.long(), weights_TK=weights_TK, probs_TE=scores_TE, logits_TE=logits_TE)


def _check_bias(score_bias_E: torch.Tensor, num_experts: int, device: torch.device) -> torch.Tensor:
    if not isinstance(score_bias_E, torch.Tensor):
        raise TypeError(f"score_bias_E must be a floating tensor [E] or None, got {type(score_bias_E).__name__}")
    if not score_bias_E.dtype.is_floating_point:
        raise TypeError(f"score_bias_E must be a floating tensor [E], got dtype {score_bias_E.dtype}")
    if score_bias_E.shape != (num_experts,):
        raise ValueError(f"score_bias_E must have shape [E]=({num_experts},), got {tuple(score_bias_E.shape)}")
    if not bool(torch.isfinite(score_bias_E).all()):
        raise ValueError("score_bias_E contains NaN or infinite values; it must be finite")
    return score_bias_E.detach().to(device)


def _check_groups(num_groups, topk_groups, group_score, scoring, num_experts, k):
    """Validate the group-limited arguments; None when routing is not group-limited."""
    if num_groups is None and topk_groups is None:
        if group_score is not None and group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {', '.join(GROUP_SCORES)}, got {group_score!r}")
        return None
    if num_groups is None or topk_groups is None:
        raise ValueError(
            "group-limited routing needs both num_groups and topk_groups (or neither), "
            f"got num_groups={num_groups}, topk_groups={topk_groups}"
        )
    num_groups = _check_int(num_groups, "num_groups")
    topk_groups = _check_int(topk_groups, "topk_groups")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups must be >= 1 and divide the number of experts E={num_experts}, got {num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be between 1 and num_groups={num_groups}, got {topk_groups}")
    group_size = num_experts // num_groups
    if k > topk_groups * group_size:
        raise ValueError(
            f"k={k} experts cannot come from topk_groups={topk_groups} groups of {group_size} experts "
            f"(at most {topk_groups * group_size})"
        )
    if group_score is None:
        group_score = "top2sum" if scoring == "sigmoid" else "max"
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {', '.join(GROUP_SCORES)}, got {group_score!r}")
    if group_score == "top2sum" and group_size < 2:
        raise ValueError(
            f"group_score='top2sum' needs at least 2 experts per group, got E={num_experts} / "
            f"num_groups={num_groups} = {group_size}; use group_score='max'"
        )
    return num_groups, topk_groups, group_score


def _restrict_to_groups(
    choice_TE: torch.Tensor,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    allowed_TE: torch.Tensor | None,
    k: int,
) -> torch.Tensor:
    """Set the choice score of every expert outside each token's ``topk_groups`` best groups to -inf."""
    num_tokens, num_experts = choice_TE.shape
    grouped_TGS = choice_TE.view(num_tokens, num_groups, num_experts // num_groups)
    if group_score == "max":
        group_TG = grouped_TGS.max(-1).values
    else:
        top2_TG2 = grouped_TGS.topk(2, dim=-1).values
        # Disallowed experts (-inf) do not count; a group with no allowed expert stays at -inf.
        second_TG = torch.where(torch.isinf(top2_TG2[..., 1]), torch.zeros_like(top2_TG2[..., 1]), top2_TG2[..., 1])
        group_TG = top2_TG2[..., 0] + second_TG
    keep_groups_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_groups_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    keep_TE = keep_groups_TG.repeat_interleave(num_experts // num_groups, dim=1)
    if allowed_TE is not None and num_tokens:
        usable_T = (keep_TE & allowed_TE).sum(-1)
        short = torch.nonzero(usable_T < k).flatten()
        if short.numel():
            t = int(short[0])
            raise ValueError(
                f"token {t}'s topk_groups={topk_groups} best groups hold only {int(usable_T[t])} allowed "
                f"expert(s), fewer than k={k}; allow more experts or raise topk_groups"
            )
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


# ---------------------------------------------------------------------------------------------------------
# Top-p (Dynamic MoE, UniMoE-Audio)
# ---------------------------------------------------------------------------------------------------------


def top_p_route(
    logits_TE: torch.Tensor,
    p: float,
    *,
    max_k: int | None = None,
    renormalize: bool = False,
    allowed_TE: torch.Tensor | None = None,
) -> RouterOutput:
    """Each token takes the smallest set of experts, by descending probability, whose softmax mass is >= p.

    Args:
        logits_TE: floating [T, E] router logits.
        p: probability mass in (0, 1]. With p = 1 a token takes every expert of nonzero probability.
        max_k: at most this many experts per token (``1 <= max_k <= E``); a token whose set would be
            larger keeps its max_k most probable experts.
        renormalize: divide each token's weights by their sum (off in Dynamic MoE).
        allowed_TE: bool [T, E]; the softmax runs over each token's allowed experts only, and a token
            never takes a disallowed expert. Every token needs at least one allowed expert.

    Returns:
        A RouterOutput with ``min(largest set in the batch, max_k)`` columns (0 for an empty batch),
        experts by descending probability, unused slots ``id -1`` / weight 0 at the end of the row.
        The weights are the softmax probabilities of the chosen experts.
    """
    _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"p must be a probability mass in (0, 1], got {p!r}")
    if max_k is not None:
        max_k = _check_k(max_k, num_experts, "max_k")
    allowed_TE = _check_allowed(allowed_TE, logits_TE)
    _check_min_allowed(allowed_TE, 1)

    probs_TE = _masked_softmax(logits_TE, allowed_TE)
    sorted_TE, order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    # Mass strictly before each sorted position, summed in float64 so the p boundary is not blurred by
    # float32 rounding. Position j is needed iff the mass before it is still below p. The first position always
    # is: nothing comes before it (0 < p) and the largest probability is at least 1 / (allowed experts) > 0.
    sorted64_TE = sorted_TE.double()
    keep_TE = (torch.cumsum(sorted64_TE, dim=-1) - sorted64_TE < p) & (sorted_TE > 0)
    if max_k is not None:
        keep_TE[:, max_k:] = False
    cols = int(keep_TE.sum(-1).max()) if num_tokens else 0

    keep_TK = keep_TE[:, :cols]
    ids_TK = torch.where(keep_TK, order_TE[:, :cols], -1)
    weights_TK = probs_TE.gather(1, order_TE[:, :cols]) * keep_TK
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)


def top_p_near_tie_route(
    logits_TE: torch.Tensor,
    p: float,
    *,
    tie_tolerance: float = 0.01,
    renorm_eps: float = 1e-6,
) -> RouterOutput:
    """UniMoE-Audio's dynamic-capacity router, as its shipped configuration runs it (the deterministic path
    its ``ignore_differentiable_router=true`` selects, in training and inference alike).

    Which experts: :func:`top_p_route`'s set, ``k = #(sorted cumulative probabilities < p) + 1``.

    Their weights: the chosen experts are taken one at a time by descending logit. Expert i's multiplier is the
    softmax, evaluated at i, over the experts not taken before it whose logit nearly ties with i's logit
    ``l_i`` — relative gap ``(l_i - l_j) / max(|l_i|, |l_j|) <= 2 * tie_tolerance`` (0/0 counts as a tie) —: 1
    when no other remaining expert is that close, about 1/n among n near-equal logits. The multipliers are then
    divided by ``their sum + renorm_eps``. So the router decides which and how many experts a token uses, and
    mixes them equally unless logits nearly tie; gradients reach the logits only through near ties.

    Args:
        logits_TE: floating [T, E] router logits (in UniMoE-Audio: the routed experts', then the null experts').
        p: probability mass in (0, 1].
        tie_tolerance: UniMoE-Audio's ``router_jitter_noise`` (0.01), >= 0: half the relative logit gap that
            still counts as a tie.
        renorm_eps: added to the multipliers' sum before dividing (UniMoE-Audio: 1e-6), >= 0.

    Returns:
        A RouterOutput like :func:`top_p_route`'s (experts by descending probability, ``-1`` / weight 0 for unused
        slots, ``probs_TE`` the softmax over all E) with these weights.
    """
    for name, value in (("tie_tolerance", tie_tolerance), ("renorm_eps", renorm_eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    chosen = top_p_route(logits_TE, p)
    ids_TK, used_TK = chosen.ids_TK, chosen.ids_TK >= 0
    if ids_TK.numel() <= NEAR_TIE_HOST_MAX_SLOTS and not (torch.is_grad_enabled() and logits_TE.requires_grad):
        weights_TK = _near_tie_weights_on_host(logits_TE, ids_TK, tie_tolerance, renorm_eps).to(chosen.probs_TE.dtype)
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=chosen.probs_TE, logits_TE=logits_TE)
    num_experts = logits_TE.shape[1]
    logits_TE_ = logits_TE.to(chosen.probs_TE.dtype)
    placeholder_TK = ids_TK.clamp(min=0)
    slot_logit_TK = logits_TE_.gather(1, placeholder_TK)

    own_TKE = placeholder_TK[..., None] == torch.arange(num_experts, device=ids_TK.device)
    taken_TKE = own_TKE & used_TK[..., None]
    taken_before_TKE = taken_TKE.cumsum(1) > taken_TKE  # taken by an earlier slot
    with torch.no_grad():
        lead_TK1, others_T1E = slot_logit_TK[..., None], logits_TE_[:, None, :]
        gap_TKE = (lead_TK1 - others_T1E) / torch.maximum(others_T1E.abs(), lead_TK1.abs())
        far_TKE = (gap_TKE > 2 * tie_tolerance) | taken_before_TKE  # a NaN gap (0/0) is not far: a tie
    # An unused slot looks only at its placeholder expert (multiplier 1, then zeroed): no -inf rows, no NaN grads.
    far_TKE = torch.where(used_TK[..., None], far_TKE, ~own_TKE)
    near_logits_TKE = logits_TE_[:, None, :].masked_fill(far_TKE, float("-inf"))
    multiplier_TK = torch.exp(slot_logit_TK - torch.logsumexp(near_logits_TKE, dim=-1)) * used_TK
    weights_TK = multiplier_TK / (multiplier_TK.sum(-1, keepdim=True) + renorm_eps)
    return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=chosen.probs_TE, logits_TE=logits_TE)


# Decoding calls the router on 1-2 tokens per step, where the tensor form above is ~20 small aten calls for a
# few dozen numbers: without autograd and up to this many slots the same multipliers are computed in Python from
# one copy of the logits (the whole DCMoE layer of unimoe_audio_tiny: 0.86x / 0.90x / 0.94x the time at 1 / 2 / 4
# tokens, one Zen 3 thread).
NEAR_TIE_HOST_MAX_SLOTS = 64


def _near_tie_weights_on_host(logits_TE: torch.Tensor, ids_TK: torch.Tensor, tie_tolerance: float,
                              renorm_eps: float) -> torch.Tensor:
    """``top_p_near_tie_route``'s weights for the chosen ``ids_TK`` (-1: unused), token by token in floats."""
    rows = []
    for logits, ids in zip(logits_TE.tolist(), ids_TK.tolist()):
        taken, multipliers = set(), []
        for expert in ids:
            if expert < 0:
                multipliers.append(0.0)
                continue
            lead = logits[expert]
            near = [other for j, other in enumerate(logits) if j not in taken and not _far(lead, other, tie_tolerance)]
            multipliers.append(1.0 / sum(math.exp(other - lead) for other in near))
            taken.add(expert)
        total = sum(multipliers) + renorm_eps
        rows.append([m / total for m in multipliers])
    return torch.tensor(rows, dtype=torch.float64, device=logits_TE.device).reshape(ids_TK.shape)


def _far(lead: float, other: float, tie_tolerance: float) -> bool:
    """Whether ``other`` is beyond a near tie of ``lead``: relative gap above ``2 * tie_tolerance`` (0/0 is a tie)."""
    scale = max(abs(lead), abs(other))
    return scale > 0 and (lead - other) / scale > 2 * tie_tolerance


# ---------------------------------------------------------------------------------------------------------
# Expert choice (Zhou et al. 2022)
# ---------------------------------------------------------------------------------------------------------


def expert_choice_route(logits_TE: torch.Tensor, capacity: int) -> RouterOutput:
    """Every expert picks the ``capacity`` tokens with the highest softmax probability for it.

    Args:
        logits_TE: floating [T, E] router logits; the softmax runs over experts, per token.
        capacity: tokens per expert, ``>= 0``; values above T are clamped to T (every token picked).

    Returns:
        A RouterOutput in token-major form with E columns: ``ids_TK[t, e] = e`` if expert e picked token t,
        else -1; the weight is that probability, else 0. A token may be picked by 0..E experts.
    """
    _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    capacity = _check_int(capacity, "capacity")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (tokens per expert), got {capacity}")
    capacity = min(capacity, num_tokens)

    probs_TE = _masked_softmax(logits_TE, None)
    picked_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
    if capacity:
        picked_TE.scatter_(0, probs_TE.detach().topk(capacity, dim=0).indices, True)
    experts_TE = torch.arange(num_experts, device=logits_TE.device).expand(num_tokens, num_experts)
    ids_TE = torch.where(picked_TE, experts_TE, torch.full_like(experts_TE, -1)).long()
    weights_TE = probs_TE * picked_TE
    return RouterOutput(ids_TK=ids_TE, weights_TK=weights_TE, probs_TE=probs_TE, logits_TE=logits_TE)


# ---------------------------------------------------------------------------------------------------------
# Noisy top-k (Shazeer et al. 2017; MoE-Fusion)
# ---------------------------------------------------------------------------------------------------------


def noisy_topk_route(
    logits_TE: torch.Tensor,
    noise_logits_TE: torch.Tensor | None,
    k: int,
    *,
    training: bool,
    noise_epsilon: float = 1e-2,
    generator: torch.Generator | None = None,
) -> RouterOutput:
    """Noisy top-k gating: ``H = logits + N(0, 1) * (softplus(noise_logits) + noise_epsilon)`` in training,
    ``H = logits`` otherwise; each token takes the top k of H with weights ``softmax`` over those k values.

    Args:
        logits_TE: floating [T, E] clean router logits (``x W_g``).
        noise_logits_TE: floating [T, E] noise logits (``x W_noise``); may be None when not training.
        k: experts per token, ``1 <= k <= E``.
        training: add noise and return the smooth load estimate.
        noise_epsilon: added to the noise standard deviation (>= 0).
        generator: the random generator for the noise (reproducible training steps).

    Returns:
        A RouterOutput with columns by descending H, ``probs_TE = softmax(H)`` over all experts, and
        ``load_E``: in training with k < E, Shazeer's smooth estimate ``sum_t P(expert e in token t's top k
        when only e's noise is re-sampled)`` -- differentiable in both logits; otherwise the hard number of
        tokens per expert as float. Shazeer's sparse ``gates`` (for the importance loss) are the weights
        scattered into [T, E].
    """
    _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    k = _check_k(k, num_experts)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if isinstance(noise_epsilon, bool) or not isinstance(noise_epsilon, (int, float)) or not noise_epsilon >= 0:
        raise ValueError(f"noise_epsilon must be a number >= 0, got {noise_epsilon!r}")
    if noise_logits_TE is None:
        if training:
            raise ValueError("noise_logits_TE is required when training=True (it sets the noise scale)")
    else:
        _check_logits(noise_logits_TE, "noise_logits_TE")
        if noise_logits_TE.shape != logits_TE.shape:
            raise ValueError(
                f"noise_logits_TE must have the logits' shape {tuple(logits_TE.shape)}, "
                f"got {tuple(noise_logits_TE.shape)}"
            )

    dtype = _compute_dtype(logits_TE)
    clean_TE = logits_TE.to(dtype)
    if training:
        std_TE = torch.nn.functional.softplus(noise_logits_TE.to(dtype)) + noise_epsilon
        noise_TE = torch.randn(
            clean_TE.shape, generator=generator, device=clean_TE.device, dtype=dtype
        )
        h_TE = clean_TE + noise_TE * std_TE
    else:
        h_TE = clean_TE

    smooth = training and k < num_experts
    top_TM = torch.topk(h_TE, k + 1 if smooth else k, dim=-1, sorted=True)
    ids_TK = top_TM.indices[:, :k].long()
    weights_TK = torch.softmax(top_TM.values[:, :k], dim=-1)
    probs_TE = torch.softmax(h_TE, dim=-1)

    if smooth:
        load_E = _smooth_load(clean_TE, std_TE, top_TM.values, ids_TK, k)
    else:
        load_E = torch.bincount(ids_TK.flatten(), minlength=num_experts).to(dtype)
    return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE, load_E=load_E)


def _smooth_load(
    clean_TE: torch.Tensor, std_TE: torch.Tensor, top_TM: torch.Tensor, ids_TK: torch.Tensor, k: int
) -> torch.Tensor:
    """Shazeer's load estimator: for each (t, e), the probability that e is in t's top k when e's noise is
    re-drawn and every other expert's noisy value is held fixed, summed over tokens.

    The k-th largest of the *other* experts is the bar e must clear: if e is currently in the top k that is
    the overall (k+1)-th value, otherwise the overall k-th value.
    """
    in_topk_TE = torch.zeros_like(clean_TE, dtype=torch.bool).scatter_(1, ids_TK, True)
    bar_if_in_T1 = top_TM[:, k : k + 1]
    bar_if_out_T1 = top_TM[:, k - 1 : k]
    bar_TE = torch.where(in_topk_TE, bar_if_in_T1, bar_if_out_T1)
    prob_TE = torch.special.ndtr((clean_TE - bar_TE) / std_TE)
    return prob_TE.sum(0)


# ---------------------------------------------------------------------------------------------------------
# GShard / DeepSpeed top-2 gating (MoE-LLaVA)
# ---------------------------------------------------------------------------------------------------------


def gshard_top2_route(logits_TE: torch.Tensor, *, sample_second: bool,
                      generator: torch.Generator | None = None) -> RouterOutput:
    """DeepSpeed's ``top2gating`` (``deepspeed/moe/sharded_moe.py``; MoE-LLaVA's router): ``g = softmax(logits)``,
    the first expert is ``argmax g``; the second is the argmax of the logits without the first, plus Gumbel noise
    when ``sample_second`` (DeepSpeed's Gumbel-max sampling of the second expert from the remaining softmax).
    The weights are the two experts' ``g`` (noise-free); DeepSpeed renormalises them after the capacity drop:
    :func:`renormalize_kept` with the plan's kept slots. Its loss is ``losses.top1_balance_loss``.

    Here the noise is drawn only when asked (training); DeepSpeed's gate samples the second expert in
    evaluation too, which makes its inference random.
    """
    _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    if num_experts < 2:
        raise ValueError(f"top-2 gating needs at least 2 experts, got {num_experts}")
    dtype = _compute_dtype(logits_TE)
    logits = logits_TE.to(dtype)
    probs_TE = logits.softmax(-1)
    first_T = probs_TE.detach().argmax(-1)
    second_logits = logits.detach().clone()
    if sample_second:
        uniform = torch.rand(second_logits.shape, generator=generator, device=logits.device, dtype=dtype)
        tiny = torch.finfo(dtype).tiny
        second_logits += -torch.log((-torch.log(uniform.clamp(min=tiny))).clamp(min=tiny))  # Gumbel(0, 1)
    second_logits[torch.arange(num_tokens, device=logits.device), first_T] = float("-inf")
    ids_TK = torch.stack([first_T, second_logits.argmax(-1)], dim=1)
    return RouterOutput(ids_TK=ids_TK, weights_TK=probs_TE.gather(1, ids_TK), probs_TE=probs_TE, logits_TE=logits_TE)


def renormalize_kept(weights_TK: torch.Tensor, kept_TK: torch.Tensor) -> torch.Tensor:
    """Each token's kept weights divided by their sum (DeepSpeed: ``denom = max(g1 + g2, eps)`` after the drop),
    dropped slots 0: a token whose second expert was dropped gives its first the whole weight."""
    kept = weights_TK * kept_TK.to(weights_TK.dtype)
    return kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps)
