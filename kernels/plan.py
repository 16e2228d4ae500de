"""Dispatch plan: which (token, slot) pairs go to which expert, in expert order.

A router gives every token ``k`` slots, ``ids_TK[t, j]`` naming an expert. The plan sorts the flat slots
``s = t * k + j`` by expert (stably, so ties keep token order and every backend sums in the same order),
counts them per expert and stores int64 offsets, so expert ``e`` owns ``sorted_slots_S[offsets_E1[e]:
offsets_E1[e + 1]]``.

Slots whose id is outside ``[0, num_experts)`` are *not dispatched*: that is how a top-p router marks an
unused slot (id ``-1``), how null experts are skipped (ids ``>= num_experts`` of the computed experts), and
how capacity drops a token. Such slots contribute nothing to the output.

For the Triton kernels the plan can also be padded so every block of ``block_size`` rows belongs to one
expert (vLLM's ``moe_align_block_size`` in index space: only indices are padded, never activations).

The kept slots and the sort are made when first read, not by ``build_plan``: the torch backend's few-token path
(decoding) reads only the ids (``DispatchPlan.kept_ids``), and at one token the sort would cost as much as the
experts' arithmetic.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """The sorted dispatch of ``num_tokens * top_k`` slots onto ``num_experts`` experts.

    Attributes:
        num_tokens: T, the number of tokens routed.
        top_k: k, the number of slots per token (columns of the router's ids).
        num_experts: E, the number of computed experts.
        ids_TK: int64 [T, k], the router's expert ids as given.
        capacity: at most this many slots per expert (None: no limit).
        block_size: the Triton row-block size the padded fields are built for, or None.

    Made on first read (and kept), from ``ids_TK`` and ``capacity``:
        kept_TK: bool [T, k], which slots are dispatched (ids in ``[0, E)``, within capacity).
        sorted_slots_S: int64 [S], flat slot index ``t * k + j`` of each dispatched slot, grouped by expert.
        sorted_tokens_S: int64 [S], the token of each dispatched slot (``sorted_slots_S // k``).
        counts_E: int64 [E], dispatched slots per expert (after capacity).
        offsets_E1: int64 [E + 1], ``offsets_E1[e]`` is where expert e's rows start in the sorted order.
        padded_rows_P: int64 [P], for each padded row the index into the sorted order, or -1 for padding
            (None without ``block_size``).
        block_experts_B: int64 [P // block_size], the expert that owns each block of padded rows (None
            without ``block_size``).
    """

    num_tokens: int
    top_k: int
    num_experts: int
    ids_TK: torch.Tensor
    capacity: int | None = None
    block_size: int | None = None

    @functools.cached_property
    def kept_TK(self) -> torch.Tensor:
        kept_TK = (self.ids_TK >= 0) & (self.ids_TK < self.num_experts)
        if self.capacity is not None:
            kept_TK = kept_TK & _within_capacity(self.ids_TK, kept_TK, self.num_experts, self.capacity)
        return kept_TK

    def kept_ids(self) -> list[list[int]]:
        """Every token's slots' experts on the host, -1 for a slot not dispatched: one copy of the ids (without
        a capacity, which slots are kept is read off the ids here), no sort."""
        if self.capacity is None:
            num_experts = self.num_experts
            return [[e if 0 <= e < num_experts else -1 for e in row] for row in self.ids_TK.tolist()]
        return torch.where(self.kept_TK, self.ids_TK, -1).tolist()

    @functools.cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted_slots_S, counts_E, offsets_E1): the stable sort of the kept slots by expert."""
        num_experts = self.num_experts
        flat_ids = torch.where(self.kept_TK, self.ids_TK, num_experts).reshape(-1)
        # A stable sort keeps slots of one expert in token order: deterministic, and the order every backend uses.
        order = torch.sort(flat_ids, stable=True).indices
        counts_E = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
        sorted_slots_S = order[:int(counts_E.sum())]
        offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_ids.device)
        torch.cumsum(counts_E, 0, out=offsets_E1[1:])
        return sorted_slots_S, counts_E, offsets_E1

    @property
    def sorted_slots_S(self) -> torch.Tensor:
        return self._sorted[0]

    @functools.cached_property
    def sorted_tokens_S(self) -> torch.Tensor:
        slots = self.sorted_slots_S
        return torch.div(slots, self.top_k, rounding_mode="floor") if self.top_k else slots

    @property
    def counts_E(self) -> torch.Tensor:
        return self._sorted[1]

    @property
    def offsets_E1(self) -> torch.Tensor:
        return self._sorted[2]

    @functools.cached_property
    def _padded(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.block_size is None:
            return None, None
        return pad_to_blocks(self.counts_E, self.offsets_E1, self.block_size)

    @property
    def padded_rows_P(self) -> torch.Tensor | None:
        return self._padded[0]

    @property
    def block_experts_B(self) -> torch.Tensor | None:
        return self._padded[1]

    @property
    def num_dispatched(self) -> int:
        return int(self.sorted_slots_S.numel())

    def counts_list(self) -> list[int]:
        """Per-expert counts on the host (one device sync); the torch backend loops over these."""
        return self.counts_E.tolist()


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots each expert may take: ``ceil(capacity_factor * T * k / E)`` (GShard / Switch convention)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, int(-(-capacity_factor * num_tokens * top_k // num_experts)))


def build_plan(
    ids_TK: torch.Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    block_size: int | None = None,
) -> DispatchPlan:
    """The router's slots to dispatch by expert, checked; which are kept (ids in range, within ``capacity``) and
    their sort by expert are made when first read (see ``DispatchPlan``).

    Args:
        ids_TK: integer [T, k] expert ids; ids outside ``[0, num_experts)`` are not dispatched.
        num_experts: E.
        capacity: at most this many slots per expert; the rest are dropped. Priority follows slot rank
            first, then token order (all first choices before any second choice, as in GShard), so a
            token's top choice is the last thing to be dropped.
        block_size: also build the Triton padded layout with blocks of this many rows.
    """
    if ids_TK.dim() != 2:
        raise ValueError(f"ids_TK must be [T, k], got shape {tuple(ids_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise TypeError(f"ids_TK must be an integer tensor, got {ids_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    return DispatchPlan(num_tokens=ids_TK.shape[0], top_k=ids_TK.shape[1], num_experts=num_experts, ids_TK=ids_TK.long(),
                        capacity=capacity, block_size=block_size)


def _within_capacity(ids_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """True for slots whose position among their expert's slots (rank-major, then token order) < capacity."""
    one_hot_KTE = torch.nn.functional.one_hot(
        torch.where(kept_TK, ids_TK, num_experts).t(), num_experts + 1
    )[..., :num_experts]
    position_KTE = one_hot_KTE.reshape(-1, num_experts).cumsum(0).reshape(one_hot_KTE.shape) - 1
    position_KT = (position_KTE * one_hot_KTE).sum(-1)
    return (position_KT < capacity).t()


def pad_to_blocks(counts_E: torch.Tensor, offsets_E1: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each expert's range of the sorted order up to a multiple of ``block_size`` rows, in index space only.

    Args:
        counts_E: int64 [E], rows per expert (``DispatchPlan.counts_E``).
        offsets_E1: int64 [E + 1], where each expert's rows start (``DispatchPlan.offsets_E1``).
        block_size: rows per block, >= 1.

    Returns:
        ``(padded_rows_P, block_experts_B)``: for every padded row its index into the sorted order or -1 for
        padding, and the expert owning each block of ``block_size`` padded rows. ``build_plan(block_size=...)``
        stores them in the plan; the Triton backend calls this again when it needs another block size.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = counts_E.device
    blocks_E = torch.div(counts_E + block_size - 1, block_size, rounding_mode="floor")
    block_experts_B = torch.repeat_interleave(torch.arange(counts_E.numel(), device=device), blocks_E)
    num_blocks = int(blocks_E.sum())
    padded_start_E = torch.cumsum(blocks_E, 0) * block_size - blocks_E * block_size
    # For every padded row: which expert's block it sits in and its position inside that expert's range.
    row_P = torch.arange(num_blocks * block_size, device=device)
    expert_P = block_experts_B.repeat_interleave(block_size)
    within_P = row_P - padded_start_E[expert_P]
    padded_rows_P = torch.where(within_P < counts_E[expert_P], offsets_E1[expert_P] + within_P, -1)
    return padded_rows_P, block_experts_B


def expert_slices(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """``(expert, its rows of the sorted order)`` for every expert that received rows, from the per-expert
    counts on the host (``plan.counts_list()``): the loop of every backend that walks experts one by one."""
    starts = itertools.accumulate(counts, initial=0)
    for expert, (start, count) in enumerate(zip(starts, counts)):
        if count:
            yield expert, slice(start, start + count)
