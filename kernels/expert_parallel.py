"""Expert parallelism on torch.distributed: each of R ranks of an expert-parallel group owns E/R experts.

The dispatch is torchtitan's and Megatron's, on the shared plan (:func:`moezoo.kernels.plan.build_plan`: slots
sorted by expert). Experts are owned in contiguous blocks (rank r: experts ``r*E/R .. (r+1)*E/R - 1``), so the
plan's sorted rows for one rank are contiguous too, and sending them is one ``all_to_all_single``:

1. every rank sends its per-expert counts to the experts' owners (``all_to_all_single`` of E integers);
2. the rows go with variable split sizes (:func:`all_to_all`; its backward is the reverse exchange);
3. the owner runs its local experts on what it received with the existing backends (``expert_mlp``: each
   received row is a "token" with one slot of weight 1, so the routing weight is applied once, at the end);
4. the results come back by the reverse exchange, in the plan's sorted order, and ``combine`` sums them into
   token order in a fixed order (no atomics): deterministic.

Option ``pad_to``: capacity-padded equal splits (DeepSpeed, Tutel): every (rank, expert) pair sends exactly
``pad_to`` rows, zeros beyond its count, so no counts are exchanged and every split has the same size. The
owners compute the padding rows too (as DeepSpeed does); their results are never read, so they add nothing to
any gradient.

Routing over a group (:func:`gather_router_output`, :func:`all_gather_rows`): the router's output of every rank
of a routing group, gathered with autograd, so capacity, expert-choice picks, the routing record and every aux
loss are those of the group's whole batch, as one process would compute them (the layer: ``MoE.shard_experts``).
Ranks may hold different numbers of tokens, none included (:func:`gather_token_shapes` exchanges them first).

Gradients (:func:`reduce_gradients`): expert parameters are marked (:func:`mark_expert_parameter`) and
all-reduced only over the expert-data-parallel group (the ranks that hold the same experts); all other
parameters over the whole data-parallel group. Both are first divided by the data-parallel world size, as
Megatron does: an expert's gradient already sums the contributions of every rank's tokens of its
expert-parallel group (they came to it through the exchange), so averaging it over the expert-data-parallel
group only would make it R times too large.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .experts import combine, expert_mlp
from .plan import DispatchPlan, build_plan
from .routing import RouterOutput

__all__ = [
    "EXPERT_PARAMETER_FLAG",
    "Exchange",
    "ExpertShard",
    "all_gather_rows",
    "all_to_all",
    "clip_grad_norm_",
    "concatenated_shape",
    "dispatch",
    "expert_parallel_groups",
    "expert_parallel_mlp",
    "expert_shard",
    "gather_router_output",
    "gather_token_shapes",
    "is_expert_parameter",
    "largest_count",
    "local_experts",
    "mark_expert_parameter",
    "pad_slots",
    "reduce_gradients",
    "return_results",
    "router_output_rows",
    "run_ranks",
]


# ---------------------------------------------------------------------------------------------- ownership


def local_experts(num_experts: int, rank: int, world_size: int) -> range:
    """The experts rank ``rank`` of ``world_size`` owns: a contiguous block of ``num_experts / world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) of an expert-parallel group of {world_size}, got {rank}")
    if num_experts < 1 or num_experts % world_size:
        divisors = [r for r in range(1, num_experts + 1) if num_experts % r == 0]
        raise ValueError(
            f"expert parallelism splits the experts evenly over the group: {num_experts} experts cannot be split "
            f"over {world_size} ranks; accepted group sizes for {num_experts} experts: {divisors} (or change "
            f"num_experts to a multiple of {world_size})")
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place in an expert-parallel group: ``experts`` are the ones it owns."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    num_experts: int
    experts: range

    @property
    def num_local(self) -> int:
        return len(self.experts)


def expert_shard(num_experts: int, group: dist.ProcessGroup | None = None) -> ExpertShard:
    """This rank's shard of ``num_experts`` experts over ``group`` (None: the default group). ValueError when
    the group's size does not divide ``num_experts``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    return ExpertShard(group, rank, world_size, num_experts, local_experts(num_experts, rank, world_size))


def expert_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """``(expert-parallel group, expert-data-parallel group)`` of this rank when the default group's W ranks are
    cut into W / ep_size expert-parallel groups of consecutive ranks (Megatron's layout); the expert-data-
    parallel group holds the ranks with the same experts (same place in their expert-parallel group). Every
    rank must call this (``new_group`` is collective)."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"the expert-parallel size must divide the {world_size} ranks, got {ep_size}")
    mine = {}
    for first in range(0, world_size, ep_size):  # every rank creates every group, in the same order
        ranks = list(range(first, first + ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["ep"] = group
    for place in range(ep_size):
        ranks = list(range(place, world_size, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["edp"] = group
    return mine["ep"], mine["edp"]


# ---------------------------------------------------------------------------------------------- exchanges


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with split sizes; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad_out.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rows ``x[sum(input_splits[:r]) : ...]`` go to rank r; returns the rows received, rank by rank
    (``output_splits[r]`` from rank r). Differentiable: the backward is the reverse exchange."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class _AllGatherRows(torch.autograd.Function):
    """Every rank's equal-sized ``x`` concatenated in rank order. The backward sums, for this rank's rows, the
    gradients every rank computed (one ``all_to_all_single`` of equal splits and a sum in rank order:
    deterministic, and gloo has it, unlike reduce_scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world_size = dist.get_world_size(group)
        pieces = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad_out):
        world_size = dist.get_world_size(ctx.group)
        received = torch.empty_like(grad_out)
        dist.all_to_all_single(received, grad_out.contiguous(), group=ctx.group)
        return received.view(world_size, -1, *grad_out.shape[1:]).sum(0), None


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                    sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``[sum(sizes), ...]``: every rank's ``x [n_r, ...]`` in rank order. ``sizes``: every rank's n_r (from
    :func:`gather_token_shapes`); None: all ranks give the same n. Differentiable: a loss computed from the
    gathered rows on every rank sends each rank's share of the gradient back to the rank the rows came from.
    Unequal sizes go by one ``all_to_all_single`` of R copies of ``x`` (an all-gather needs equal pieces);
    its backward is the reverse exchange and the copies' gradients summed in a fixed order."""
    if sizes is None or len(set(sizes)) == 1:
        return _AllGatherRows.apply(x, group)
    world_size = len(sizes)
    if x.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"this rank gives {x.shape[0]} rows, sizes says {sizes[dist.get_rank(group)]}")
    return all_to_all(x.repeat(world_size, *[1] * (x.dim() - 1)), list(sizes), [x.shape[0]] * world_size, group)


# ---------------------------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Exchange:
    """How :func:`dispatch` sent a plan's rows, so :func:`return_results` sends the results back the same way.

    Attributes:
        shard: the expert-parallel group and what this rank owns.
        send_splits: rows sent to each rank (list of R).
        recv_splits: rows received from each rank (list of R).
        local_plan: the received rows' plan over this rank's experts (one slot each, by local expert id).
        padded_S: with ``pad_to``, the padded row of each of the plan's sorted rows; None otherwise.
        pad_to: the rows per (rank, expert) pair of capacity-padded splits, or None for exact splits.
    """

    shard: ExpertShard
    send_splits: list[int]
    recv_splits: list[int]
    local_plan: DispatchPlan
    padded_S: torch.Tensor | None = None
    pad_to: int | None = None


def _exchange_counts(counts_E: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """int64 [R, E/R]: how many rows each rank sends to each of this rank's experts."""
    received = torch.empty_like(counts_E)
    dist.all_to_all_single(received, counts_E.contiguous(), group=shard.group)
    return received.view(shard.world_size, shard.num_local)


def _received_plan(local_ids_N: torch.Tensor, shard: ExpertShard) -> DispatchPlan:
    """The plan of the received rows: row n is one "token" with one slot, its local expert. build_plan's stable
    sort groups them by expert, source rank then source order: a fixed order, whatever the timing."""
    return build_plan(local_ids_N[:, None], shard.num_local)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan, shard: ExpertShard, *,
             pad_to: int | None = None) -> tuple[torch.Tensor, Exchange]:
    """Send every dispatched slot's row to the rank that owns its expert.

    Args:
        x_TD: this rank's tokens.
        plan: their plan over all ``shard.num_experts`` experts (global ids).
        shard: the expert-parallel group.
        pad_to: capacity-padded equal splits of this many rows per (rank, expert); must be at least the
            largest count of any (rank, expert) pair (the caller picks it: the layer's capacity, or the
            all-reduced largest count). None: exact variable splits after a counts exchange.

    Returns:
        ``(rows [N, D], exchange)``: the rows this rank's experts must compute, and how they came.
    """
    if plan.num_experts != shard.num_experts:
        raise ValueError(f"the plan is for {plan.num_experts} experts, the expert-parallel group shards "
                         f"{shard.num_experts}")
    world_size, num_local = shard.world_size, shard.num_local
    x_SD = x_TD.index_select(0, plan.sorted_tokens_S)
    if pad_to is None:
        recv_counts_RL = _exchange_counts(plan.counts_E, shard)
        send_splits = plan.counts_E.view(world_size, num_local).sum(1).tolist()
        recv_splits = recv_counts_RL.sum(1).tolist()
        rows_ND = all_to_all(x_SD, recv_splits, send_splits, shard.group)
        local_ids_N = torch.arange(num_local, device=x_TD.device).repeat(world_size).repeat_interleave(
            recv_counts_RL.reshape(-1))
        return rows_ND, Exchange(shard, send_splits, recv_splits, _received_plan(local_ids_N, shard))
    if int(plan.counts_E.max()) > pad_to:
        raise ValueError(f"pad_to={pad_to} rows per expert is less than the {int(plan.counts_E.max())} this rank "
                         f"sends to one expert")
    # Each sorted row's place in the padded layout: its expert's block of pad_to rows, then its rank in it.
    expert_S = torch.repeat_interleave(torch.arange(shard.num_experts, device=x_TD.device), plan.counts_E)
    padded_S = expert_S * pad_to + torch.arange(expert_S.numel(), device=x_TD.device) - plan.offsets_E1[expert_S]
    x_PD = x_SD.new_zeros(shard.num_experts * pad_to, x_SD.shape[1]).index_copy(0, padded_S, x_SD)
    splits = [num_local * pad_to] * world_size
    rows_ND = all_to_all(x_PD, splits, splits, shard.group)
    local_ids_N = torch.arange(num_local, device=x_TD.device).repeat_interleave(pad_to).repeat(world_size)
    return rows_ND, Exchange(shard, splits, splits, _received_plan(local_ids_N, shard), padded_S, pad_to)


def return_results(y_ND: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """The experts' results for the received rows, sent back: ``[S, D_out]`` in the sending rank's plan's
    sorted order (what ``combine`` takes)."""
    y_back = all_to_all(y_ND, exchange.send_splits, exchange.recv_splits, exchange.shard.group)
    return y_back if exchange.padded_S is None else y_back.index_select(0, exchange.padded_S)


def expert_parallel_mlp(x_TD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan, w_in_LNK: torch.Tensor,
                        w_out_LDF: torch.Tensor, shard: ExpertShard, *, b_in_LN: torch.Tensor | None = None,
                        b_out_LD: torch.Tensor | None = None, activation: str = "silu", gated: bool = True,
                        backend: str = "auto", pad_to: int | None = None) -> torch.Tensor:
    """``expert_mlp`` with the experts spread over ``shard``'s group: this rank's tokens ``x_TD``, their
    ``weights_TK`` and ``plan`` (global expert ids), and only this rank's experts' weights (``[E/R, ...]``, the
    experts ``shard.experts``). Returns the routed experts' weighted sum for this rank's tokens. Differentiable
    with respect to the tokens, the routing weights and the local experts' weights (their gradients sum over
    the tokens of every rank of the group). Every rank of the group must call it (collective)."""
    if w_in_LNK.shape[0] != shard.num_local:
        raise ValueError(f"this rank owns {shard.num_local} experts ({shard.experts}) but got weights for "
                         f"{w_in_LNK.shape[0]}")
    rows_ND, exchange = dispatch(x_TD, plan, shard, pad_to=pad_to)
    # Weight 1 per received row: the routing weight is applied once, by combine on the token's own rank.
    ones_N1 = rows_ND.new_ones(rows_ND.shape[0], 1)
    y_ND = expert_mlp(rows_ND, ones_N1, exchange.local_plan, w_in_LNK, w_out_LDF, b_in_EN=b_in_LN,
                      b_out_ED=b_out_LD, activation=activation, gated=gated, backend=backend)
    return combine(return_results(y_ND, exchange), weights_TK, plan)


# ---------------------------------------------------------------------------------------------- gradients

# The attribute that marks a parameter as one rank's shard of experts (Megatron marks them ``allreduce=False``,
# DeepSpeed ``allreduce=False`` plus a group name): the gradient reduction and optimisers tell them apart by it.
EXPERT_PARAMETER_FLAG = "moezoo_expert_parallel"


def mark_expert_parameter(param: torch.Tensor) -> torch.Tensor:
    setattr(param, EXPERT_PARAMETER_FLAG, True)
    return param


def is_expert_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` holds expert-parallel experts (reduced over the expert-data-parallel group only)."""
    return bool(getattr(param, EXPERT_PARAMETER_FLAG, False))


def reduce_gradients(parameters: Iterable[torch.Tensor], *, data_group: dist.ProcessGroup | None = None,
                     expert_data_group: dist.ProcessGroup | None = None, average: bool = True) -> None:
    """Data-parallel gradient reduction for a model with expert-parallel experts, in place.

    Expert parameters (:func:`is_expert_parameter`) are summed over ``expert_data_group`` only (None: no other
    rank holds the same experts: nothing to reduce), every other parameter over ``data_group`` (None: the
    default group). With ``average`` every gradient is first divided by the data-parallel world size (the DDP
    convention: each rank's loss is the mean over its own tokens), the experts' too: see the module docstring.
    Parameters without a gradient are left alone; the dense gradients travel as one flat tensor."""
    params = [p for p in parameters if p.grad is not None]
    scale = 1.0 / dist.get_world_size(data_group) if average else 1.0
    for is_expert, group in ((False, data_group), (True, expert_data_group)):
        grads = [p.grad for p in params if is_expert_parameter(p) == is_expert]
        if not grads:
            continue
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if is_expert and (group is None or dist.get_world_size(group) == 1):
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(piece.view_as(g))


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, *,
                    expert_group: dist.ProcessGroup | None = None, error_if_nonfinite: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose experts are sharded over ``expert_group``: the
    norm is that of the whole model's gradient, the same on every rank, as one process would compute it.

    After :func:`reduce_gradients` every rank holds the same dense gradients (DDP) or its shard of them (FSDP2
    DTensors, whose norm torch reduces over their mesh), and the gradients of its own experts, which the other
    ranks of its expert-parallel group do not hold. So the experts' partial norms are summed over
    ``expert_group``, the group they are sharded over (None: the default group, as for ``MoE.shard_experts``;
    without torch.distributed nothing is sharded), and the dense part is counted once, as Megatron does; each rank
    clipping by the norm of its own experts alone would scale the same model's gradient differently on each
    rank. Returns the total norm (a 0-dim tensor); ``norm_type`` may be ``inf``."""
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    parts = []  # (is expert, norm) per part; the experts' is global once reduced over their group
    for is_expert in (False, True):
        grads = [p.grad for p in params if is_expert_parameter(p) == is_expert]
        for chosen in _plain_and_dtensors(grads):  # torch takes one kind per call
            norm = torch.nn.utils.get_total_norm(chosen, norm_type)
            parts.append((is_expert, norm.full_tensor() if isinstance(norm, DTensor) else norm))
    total = _combine_norms(parts, norm_type, expert_group)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {total.item()}: "
                           "not finite, so they were not clipped (error_if_nonfinite=True)")
    # a Python float: it scales plain and DTensor gradients alike
    scale = min(1.0, float(max_norm) / (total.item() + 1e-6))
    if scale < 1.0:
        for chosen in _plain_and_dtensors([p.grad for p in params]):
            torch._foreach_mul_(chosen, scale)
    return total


def _plain_and_dtensors(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The plain tensors and the DTensors among ``tensors``, each a list, the empty ones left out."""
    dtensors = [t for t in tensors if isinstance(t, DTensor)]
    plain = [t for t in tensors if not isinstance(t, DTensor)]
    return [kind for kind in (plain, dtensors) if kind]


def _combine_norms(parts: list[tuple[bool, torch.Tensor]], norm_type: float, expert_group) -> torch.Tensor:
    """The norm of the concatenation from the norms of its parts: the max for inf, else the p-th root of the
    sum of p-th powers; the experts' parts summed (inf: maxed) over ``expert_group`` first. On the gradients'
    device: the group's backend takes tensors there (NCCL: CUDA)."""
    infinite = math.isinf(norm_type)
    device = parts[0][1].device if parts else torch.device("cpu")
    sums = {False: torch.zeros((), device=device), True: torch.zeros((), device=device)}
    for is_expert, norm in parts:
        term = norm.detach().float() if infinite else norm.detach().float().pow(norm_type)
        sums[is_expert] = torch.maximum(sums[is_expert], term) if infinite else sums[is_expert] + term
    dense, experts = sums[False], sums[True]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(expert_group) > 1:
        dist.all_reduce(experts, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM, group=expert_group)
    return torch.maximum(dense, experts) if infinite else (dense + experts).pow(1.0 / norm_type)


# ---------------------------------------------------------------------------------------------- routing


# Leading dims of the token shapes exchanged by gather_token_shapes (a deeper shape is sent as its size only).
MAX_TOKEN_DIMS = 8


def gather_token_shapes(tokens_shape: Sequence[int], group: dist.ProcessGroup | None = None,
                        device: torch.device | str = "cpu") -> list[tuple[int, tuple[int, ...] | None]]:
    """Every rank's ``(tokens, leading shape)`` of its input, in rank order (one all-gather of a few integers):
    ranks may route different numbers of tokens, none included. A shape of more than ``MAX_TOKEN_DIMS`` dims
    comes as None. ``device``: where the group's backend takes tensors (the tokens' device: NCCL needs CUDA)."""
    shape = tuple(int(d) for d in tokens_shape)
    row = [math.prod(shape), len(shape), *(shape if len(shape) <= MAX_TOKEN_DIMS else ())]
    mine = torch.tensor(row + [0] * (2 + MAX_TOKEN_DIMS - len(row)), dtype=torch.long, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    out = []
    for row in (r.tolist() for r in rows):
        tokens, ndim = row[0], row[1]
        out.append((tokens, tuple(row[2:2 + ndim]) if ndim <= MAX_TOKEN_DIMS else None))
    return out


def concatenated_shape(shapes: Sequence[tuple[int, tuple[int, ...] | None]]) -> tuple[int, ...]:
    """The leading shape one process would see for the ranks' inputs concatenated along their first dim (e.g.
    ``[B_r, N]`` -> ``[sum B_r, N]``), from :func:`gather_token_shapes`; ranks without tokens do not count. When
    the ranks' other dims differ (no such concatenation exists), the flat ``[sum tokens]``."""
    total = sum(tokens for tokens, _ in shapes)
    kept = [shape for tokens, shape in shapes if tokens] or [shape for _, shape in shapes]
    if all(shape is not None and len(shape) >= 1 and shape[1:] == kept[0][1:] for shape in kept):
        return (sum(shape[0] for shape in kept), *kept[0][1:])
    return (total,)


def gather_router_output(routed: RouterOutput, group: dist.ProcessGroup | None = None,
                         sizes: Sequence[int] | None = None) -> RouterOutput:
    """The router's output for every rank's tokens, in rank order, so the routing record, capacity and every
    aux loss see the whole batch as one process would (``sizes``: every rank's tokens; None: equal). Scores,
    weights and logits keep their graph (each rank's share of an aux loss's gradient goes back to it); the
    smooth load of noisy top-k is summed over ranks. A router whose slots per token depend on its tokens (top-p:
    as many as the most any token used) gets its unused slots (id -1, weight 0) padded to the group's widest, as
    one process's would be (one all-reduce of one number)."""
    load_E = None if routed.load_E is None else all_gather_rows(routed.load_E[None], group).sum(0)
    width = torch.tensor([routed.ids_TK.shape[1]], device=routed.ids_TK.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    routed = pad_slots(routed, int(width))
    return RouterOutput(ids_TK=all_gather_rows(routed.ids_TK, group, sizes),
                        weights_TK=all_gather_rows(routed.weights_TK, group, sizes),
                        probs_TE=all_gather_rows(routed.probs_TE, group, sizes),
                        logits_TE=all_gather_rows(routed.logits_TE, group, sizes), load_E=load_E)


def pad_slots(routed: RouterOutput, width: int) -> RouterOutput:
    """``routed`` with unused slots (id -1, weight 0) appended up to ``width`` slots per token."""
    pad = width - routed.ids_TK.shape[1]
    if pad == 0:
        return routed
    return dataclasses.replace(routed, ids_TK=torch.nn.functional.pad(routed.ids_TK, (0, pad), value=-1),
                               weights_TK=torch.nn.functional.pad(routed.weights_TK, (0, pad)))


def router_output_rows(routed: RouterOutput, rows: slice) -> RouterOutput:
    """The router's output for the tokens ``rows`` (this rank's tokens of a gathered batch)."""
    return RouterOutput(ids_TK=routed.ids_TK[rows], weights_TK=routed.weights_TK[rows], probs_TE=routed.probs_TE[rows],
                        logits_TE=routed.logits_TE[rows], load_E=routed.load_E)


def largest_count(plan: DispatchPlan, group: dist.ProcessGroup | None = None) -> int:
    """The most rows any rank of ``group`` sends to one expert: the padding of capacity-padded splits when no
    capacity bounds it (Tutel's dynamic capacity; one all-reduce of one number)."""
    most = plan.counts_E.max().reshape(1).clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return int(most)


def run_ranks(processes: Sequence) -> list[int]:
    """Start the rank ``processes`` (``multiprocessing.Process``), wait for them, and end those still running as
    soon as one fails: a failed rank leaves the others waiting in a collective forever. Their exit codes."""
    for process in processes:
        process.start()
    while any(p.exitcode is None for p in processes) and all(p.exitcode in (None, 0) for p in processes):
        for p in processes:
            p.join(timeout=0.1)
    for p in processes:
        if p.exitcode is None:
            p.terminate()
        p.join()
    return [p.exitcode for p in processes]
