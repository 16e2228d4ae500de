"""Auxiliary router losses, as plain functions of the router's tensors.

Conventions: ``probs_TE`` are the router's scores over E experts (:attr:`RouterOutput.probs_TE`),
``ids_TK`` the chosen expert of every slot; ids outside ``[0, E)`` (unused top-p slots, -1) are ignored.
None of these losses carries a coefficient: multiply by your alpha. They are differentiable through
``probs_TE`` / ``logits_TE`` / ``gates_TE`` / ``load_E``; expert counts are constants.

- :func:`switch_load_balance_loss`: ``E * sum_i f_i P_i`` (Switch / GShard / Mixtral), with the optional
  global-batch counts of "Demons in the Detail" (Qwen3-MoE).
- :func:`expert_balance_loss`: DiT-MoE's / DeepSeekMoE's expert-level loss.
- :func:`top1_balance_loss`: DeepSpeed's top-2 gating loss (MoE-LLaVA) and, per sample, MoCHA's connector loss:
  ``E * sum_i f_i P_i`` with ``f_i`` from each token's first choice only.
- :func:`chosen_set_balance_loss`: UniMoE-Audio's ``E * sum_i f_i P_i`` with P from each token's chosen set.
- :func:`router_z_loss`: ST-MoE's ``mean(logsumexp(logits)^2)``.
- :func:`cv_squared`, :func:`importance_load_loss`: Shazeer et al. 2017 (MoE-Fusion).
- :func:`routing_entropy`: mean per-token routing entropy (Dynamic MoE's dynamic loss).

All losses are returned as float32 scalars (float64 if the input is float64).
"""

from __future__ import annotations

import torch

__all__ = [
    "switch_load_balance_loss",
    "router_z_loss",
    "expert_balance_loss",
    "chosen_set_balance_loss",
    "top1_balance_loss",
    "cv_squared",
    "importance_load_loss",
    "routing_entropy",
    "expert_counts",
]


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_float(x: torch.Tensor, name: str, dims: int | None, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor ({what}), got dtype {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D ({what}), got shape {tuple(x.shape)}")


def _check_num_experts(num_experts) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return num_experts


def _check_probs_ids(probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int, name: str = "probs_TE") -> None:
    _check_float(probs_TE, name, 2, "[T, E] router scores")
    if not isinstance(ids_TK, torch.Tensor):
        raise TypeError(f"ids_TK must be an integer tensor [T, k], got {type(ids_TK).__name__}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype.is_complex or ids_TK.dtype == torch.bool:
        raise TypeError(f"ids_TK must be an integer tensor [T, k], got dtype {ids_TK.dtype}")
    if ids_TK.dim() != 2:
        raise ValueError(f"ids_TK must be 2-D [T, k], got shape {tuple(ids_TK.shape)}")
    if ids_TK.shape[0] != probs_TE.shape[0]:
        raise ValueError(
            f"{name} and ids_TK must have the same number of tokens, got {probs_TE.shape[0]} and {ids_TK.shape[0]}"
        )
    if probs_TE.shape[1] != num_experts:
        raise ValueError(
            f"{name} must have num_experts={num_experts} columns, got shape {tuple(probs_TE.shape)}"
        )


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how many slots chose each expert; ids outside ``[0, E)`` are not counted."""
    ids = ids_TK.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    return torch.bincount(ids[valid], minlength=num_experts)


def _mean_probs(probs_TE: torch.Tensor) -> torch.Tensor:
    """P_i = mean_t probs[t, i]; 0 for an empty batch (instead of NaN), graph kept."""
    return probs_TE.to(_float_dtype(probs_TE)).sum(0) / max(probs_TE.shape[0], 1)


def switch_load_balance_loss(
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    num_experts: int,
    *,
    global_batch: bool = False,
    group=None,
) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` with ``f_i`` = the fraction of dispatched slots that went to expert i and
    ``P_i`` = the mean score of expert i over the tokens. 1 at perfect balance (softmax scores).

    Args:
        probs_TE: floating [T, E] router scores (gradients flow through these).
        ids_TK: integer [T, k] chosen experts; ids outside ``[0, E)`` are not counted.
        num_experts: E, the number of columns of probs_TE.
        global_batch: if torch.distributed is initialised, all-reduce (sum) the per-expert counts over
            ``group`` before forming ``f`` ("Demons in the Detail": balance over the global batch, not each
            micro-batch); ``P`` stays local. Without an initialised process group this is the
            micro-batch loss.
        group: the process group for the all-reduce (None: the default group).

    Returns 0 when no slot was dispatched (or T = 0).
    """
    num_experts = _check_num_experts(num_experts)
    _check_probs_ids(probs_TE, ids_TK, num_experts)
    dtype = _float_dtype(probs_TE)
    counts_E = expert_counts(ids_TK, num_experts).to(device=probs_TE.device, dtype=dtype)
    if global_batch and torch.distributed.is_available() and torch.distributed.is_initialized():
        counts_E = counts_E.clone()
        torch.distributed.all_reduce(counts_E, op=torch.distributed.ReduceOp.SUM, group=group)
    f_E = counts_E / counts_E.sum().clamp(min=1.0)
    return num_experts * (f_E * _mean_probs(probs_TE)).sum()


def expert_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DiT-MoE's (DeepSeekMoE's) expert-level balance loss, without alpha:
    ``sum_i f_i * P_i`` with ``f_i = E / (N k) * count_i`` and ``P_i = (1/N) sum_t s[t, i]``.

    N = T tokens, k = the columns of ids_TK; count_i = slots with id i (ids outside ``[0, E)`` are not
    counted but still count in ``N k``). Returns 0 for an empty batch.
    """
    num_experts = _check_num_experts(num_experts)
    _check_probs_ids(probs_TE, ids_TK, num_experts)
    dtype = _float_dtype(probs_TE)
    num_slots = ids_TK.shape[0] * ids_TK.shape[1]
    counts_E = expert_counts(ids_TK, num_experts).to(device=probs_TE.device, dtype=dtype)
    f_E = counts_E * (num_experts / max(num_slots, 1))
    return (f_E * _mean_probs(probs_TE)).sum()


def chosen_set_balance_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """UniMoE-Audio's balance loss over its top-p pool (routed and null experts), without coefficient:
    ``E * sum_i f_i P_i`` with ``f_i`` = the fraction of tokens that chose expert i and ``P_i`` = the mean over
    tokens of the softmax of the token's logits restricted to the experts it chose (0 elsewhere).

    Unlike :func:`switch_load_balance_loss`, ``f`` counts tokens (a token choosing 3 experts adds 1 to three f's,
    so ``sum_i f_i`` is the mean number of experts per token) and ``P`` is not the full softmax. Ids outside
    ``[0, E)`` (unused slots) are ignored; a token that chose none gets the uniform softmax, as the official
    masking with the dtype's lowest value gives. Differentiable through ``logits_TE``; 0 for an empty batch.
    """
    num_experts = _check_num_experts(num_experts)
    _check_probs_ids(logits_TE, ids_TK, num_experts, "logits_TE")
    dtype = _float_dtype(logits_TE)
    ids = ids_TK.long().to(logits_TE.device)
    # Unused slots write into a spare column that is cut off (a scatter of False could overwrite a True).
    spare_TK = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    chosen_TE = torch.zeros(logits_TE.shape[0], num_experts + 1, dtype=torch.bool, device=logits_TE.device)
    chosen_TE = chosen_TE.scatter_(1, spare_TK, True)[:, :num_experts]
    logits = logits_TE.to(dtype)
    probs_TE = logits.masked_fill(~chosen_TE, torch.finfo(dtype).min).softmax(-1)
    f_E = chosen_TE.to(dtype).sum(0) / max(logits_TE.shape[0], 1)
    return num_experts * (f_E * _mean_probs(probs_TE)).sum()


def top1_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int, num_samples: int = 1) -> torch.Tensor:
    """``E * sum_i f_i P_i`` with ``f_i`` the fraction of tokens whose first choice (``ids_TK[:, 0]``, the top-1)
    is expert i and ``P_i`` the mean score of expert i, computed over each of ``num_samples`` equal consecutive
    groups of tokens and averaged over them.

    ``num_samples=1``: DeepSpeed's ``top2gating`` ``l_aux = E^2 mean_i(me_i ce_i)`` (MoE-LLaVA), counted before
    any capacity drop. ``num_samples=B`` over ``[B, N]`` tokens: MoCHA's / CuMo's MoE-connector balance, one
    density per image, ``E^2 mean_{b,i}(P_bi f_bi)``. 1 at perfect balance; 0 for an empty batch."""
    num_experts = _check_num_experts(num_experts)
    _check_probs_ids(probs_TE, ids_TK, num_experts)
    num_tokens = probs_TE.shape[0]
    if num_samples < 1 or num_tokens % num_samples:
        raise ValueError(f"{num_tokens} tokens cannot be {num_samples} equal samples")
    if num_tokens == 0:
        return probs_TE.new_zeros((), dtype=_float_dtype(probs_TE))
    dtype = _float_dtype(probs_TE)
    first_T = ids_TK[:, 0]
    chosen_TE = torch.zeros_like(probs_TE, dtype=dtype)
    valid_T = (first_T >= 0) & (first_T < num_experts)
    chosen_TE[valid_T.nonzero().squeeze(1), first_T[valid_T]] = 1.0
    f_BE = chosen_TE.view(num_samples, -1, num_experts).mean(1)
    P_BE = probs_TE.to(dtype).view(num_samples, -1, num_experts).mean(1)
    return num_experts * (f_BE * P_BE).sum(-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: ``mean_t (logsumexp_e logits[t, e])^2``; 0 for an empty batch.

    Raises ValueError for non-finite logits."""
    _check_float(logits_TE, "logits_TE", 2, "[T, E] router logits")
    if logits_TE.numel() and not bool(torch.isfinite(logits_TE).all()):
        raise ValueError("logits_TE contains NaN or infinite values; router logits must be finite")
    lse_T = torch.logsumexp(logits_TE.to(_float_dtype(logits_TE)), dim=-1)
    return lse_T.square().sum() / max(logits_TE.shape[0], 1)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + eps)`` over all elements of x, with the
    unbiased variance (as in Shazeer's code); 0 for fewer than 2 elements."""
    _check_float(x, "x", None, "any shape")
    flat = x.reshape(-1).to(_float_dtype(x))
    if flat.numel() < 2:
        return flat.sum() * 0.0
    return flat.var(unbiased=True) / (flat.mean().square() + eps)


def importance_load_loss(gates_TE: torch.Tensor, load_E: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017's balance loss without coefficient: ``cv²(importance) + cv²(load)``, with
    importance = ``gates_TE.sum(0)`` (the sparse gates: chosen weights scattered into [T, E]) and load the
    per-expert load (``RouterOutput.load_E``, the smooth estimate in training)."""
    _check_float(gates_TE, "gates_TE", 2, "[T, E] sparse gates")
    _check_float(load_E, "load_E", 1, "[E] per-expert load")
    if load_E.shape[0] != gates_TE.shape[1]:
        raise ValueError(
            f"load_E must have one entry per expert ({gates_TE.shape[1]}), got shape {tuple(load_E.shape)}"
        )
    return cv_squared(gates_TE.sum(0)) + cv_squared(load_E)


def routing_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the routing entropy ``-sum_e p log p`` (natural log). Zero probabilities
    contribute 0 and have a finite (zero) gradient. 0 for an empty batch."""
    _check_float(probs_TE, "probs_TE", 2, "[T, E] router probabilities")
    p = probs_TE.to(_float_dtype(probs_TE))
    positive = p > 0
    safe_p = torch.where(positive, p, torch.ones_like(p))
    plogp = torch.where(positive, p * torch.log(safe_p), torch.zeros_like(p))
    return -plogp.sum() / max(probs_TE.shape[0], 1)
