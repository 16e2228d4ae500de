"""The one base of every layer that sends tokens to experts, and the tools that walk a model for them.

Every routed layer — the FFN :class:`~moezoo.zoo.layers.moe.MoE`, MoH attention (heads as experts), MoFME's
FiLM experts, MoE-Fusion's conv experts, and whatever routes next — subclasses :class:`RoutedBlock` and runs
its constructor. The base owns what all of them share:

- the routing record: after every forward, ``block.routing`` is a :class:`RoutingRecord` (ids, weights,
  scores, per-expert load, dropped slots, the weighted aux loss and its unweighted terms, the input's token
  layout), made by :meth:`RoutedBlock.record_routing` from the router's :class:`RouterOutput` (without autograd its
  counts and losses are computed when first read: a decoding step nobody asks about costs none of them);
- the auxiliary losses: ``aux_loss_coefs`` maps names of :data:`AUX_LOSSES` (one table from loss name to the
  kernels' loss function) to coefficients;
- the per-token expert map in the input's layout (:meth:`RoutedBlock.expert_map`), which a family only
  parametrises with its token grid;
- the expert-compute backend switch (``block.backend``; validated; blocks whose experts are not
  ``kernels.expert_mlp`` keep it for uniformity and ignore it);
- the experts' display names (``expert_names``: e.g. which modality a MoE-Fusion expert reads), for pictures.

Walkers — :func:`routed_blocks`, :func:`collect_routing`, :func:`total_aux_loss`, :func:`set_backend`,
:func:`routing_maps`, :func:`freeze`, :func:`unfreeze` — look for this base only, so a new routed layer is
seen by training's expert-load logging, the app's layer menu and the pipelines' routing maps with no change
there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from moezoo.kernels import losses
from moezoo.kernels.experts import BACKENDS
from moezoo.kernels.routing import RouterOutput


class RoutingRecord:
    """What one routed block routed in its last forward.

    Attributes:
        ids_TK: int64 [T, k], the expert each slot chose (-1: unused slot). Ids ``>= num_experts`` name the
            block's special experts in order (MoE: null, copy, constant).
        weights_TK: the routing weights of those slots (detached).
        probs_TE: the router's scores over all routable experts (detached).
        load_E: float [num_routable], how many slots each routable expert received (after capacity).
        dropped: how many chosen slots capacity dropped.
        aux_loss: the weighted sum of the configured auxiliary losses (keeps its graph: add it to the loss).
        aux_terms: each configured auxiliary loss by name, unweighted and detached, for logging.
        tokens_shape: the leading shape of the input, so ids can be reshaped to e.g. [B, H/p, W/p, k].

    ``load_E``, ``dropped``, ``aux_loss`` and ``aux_terms`` come from ``summarize``, a function of what the
    forward routed (never of state the block changes later), called once: at once when the forward had
    autograd (``aux_loss`` keeps its graph), else when one of them is first read. A decoding step without grad
    that nobody asks about therefore costs no counts, no losses and no device sync; a caller that reads them
    (validation logging, the app's load charts) gets the same values as an eager record.
    """

    def __init__(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, probs_TE: torch.Tensor,
                 tokens_shape: tuple[int, ...], summarize: Callable[[], tuple], *, now: bool):
        self.ids_TK, self.weights_TK, self.probs_TE = ids_TK, weights_TK, probs_TE
        self.tokens_shape = tokens_shape
        self._summarize, self._summary = summarize, None
        if now:
            self._summarized()

    def _summarized(self) -> tuple:
        if self._summary is None:
            self._summary, self._summarize = self._summarize(), None
        return self._summary

    @property
    def load_E(self) -> torch.Tensor:
        return self._summarized()[0]

    @property
    def dropped(self) -> int:
        return self._summarized()[1]

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._summarized()[2]

    @property
    def aux_terms(self) -> dict[str, torch.Tensor]:
        return self._summarized()[3]

    def __repr__(self) -> str:
        return (f"RoutingRecord(tokens_shape={self.tokens_shape}, ids_TK={tuple(self.ids_TK.shape)}, "
                f"summarized={self._summary is not None})")


# ----------------------------------------------------------------------------------------------------------
# Auxiliary losses: name -> the kernels' function, applied to a router's output over E routable experts
# ----------------------------------------------------------------------------------------------------------


def _hard_load(routed: RouterOutput, num_experts: int) -> torch.Tensor:
    return losses.expert_counts(routed.ids_TK, num_experts).to(routed.probs_TE.dtype)


def _importance_load(routed: RouterOutput, num_experts: int) -> torch.Tensor:
    """Shazeer's CV² loss: the sparse gates' importance, and the smooth load of noisy top-k (else the hard
    counts)."""
    load_E = routed.load_E if routed.load_E is not None else _hard_load(routed, num_experts)
    used_TK = routed.ids_TK >= 0
    gates_TE = torch.zeros_like(routed.probs_TE).scatter_add(1, routed.ids_TK.clamp(min=0), routed.weights_TK * used_TK)
    return losses.importance_load_loss(gates_TE, load_E)


def _head_balance(routed: RouterOutput, num_experts: int) -> torch.Tensor:
    """MoH's head balance ``E^2 mean_i(P_i f_i)`` with f_i the fraction of tokens that chose head i; that is
    k times DiT-MoE's expert balance (whose f_i counts slots: k per token)."""
    return routed.ids_TK.shape[1] * losses.expert_balance_loss(routed.probs_TE, routed.ids_TK, num_experts)


# Each takes the router's output, the number of routable experts and the tokens' leading shape (``[B, N]``:
# B samples of N tokens; a loss "per sample" reads B from it).
AUX_LOSSES: dict[str, Callable[[RouterOutput, int, tuple[int, ...]], torch.Tensor]] = {
    "load_balance": lambda r, e, _: losses.switch_load_balance_loss(r.probs_TE, r.ids_TK, e),
    "global_load_balance": lambda r, e, _: losses.switch_load_balance_loss(r.probs_TE, r.ids_TK, e, global_batch=True),
    "z_loss": lambda r, e, _: losses.router_z_loss(r.logits_TE),
    "expert_balance": lambda r, e, _: losses.expert_balance_loss(r.probs_TE, r.ids_TK, e),
    "chosen_balance": lambda r, e, _: losses.chosen_set_balance_loss(r.logits_TE, r.ids_TK, e),
    "top1_balance": lambda r, e, _: losses.top1_balance_loss(r.probs_TE, r.ids_TK, e),
    "sample_top1_balance": lambda r, e, shape: losses.top1_balance_loss(
        r.probs_TE, r.ids_TK, e, num_samples=shape[0] if len(shape) > 1 else 1),
    "cv2": lambda r, e, _: _importance_load(r, e),
    "entropy": lambda r, e, _: losses.routing_entropy(r.probs_TE),
    "head_balance": lambda r, e, _: _head_balance(r, e),
}


# Losses that communicate across processes (an all-reduce): a record computes them at once, so that every rank
# calls the collective in forward order whether or not it reads the record.
COLLECTIVE_AUX_LOSSES = ("global_load_balance",)


def check_aux_loss_coefs(aux_loss_coefs: dict[str, float] | None, own: Sequence[str] = ()) -> dict[str, float]:
    """The coefficients by name, checked: names of :data:`AUX_LOSSES` or of the block's ``own`` losses."""
    coefs = dict(aux_loss_coefs or {})
    accepted = [*AUX_LOSSES, *own]
    unknown = sorted(set(coefs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown aux losses {unknown}; accepted: {', '.join(accepted)}")
    for name, coef in coefs.items():
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"aux loss coefficient {name!r} must be a finite number, got {coef!r}")
    return coefs


# ----------------------------------------------------------------------------------------------------------
# The base
# ----------------------------------------------------------------------------------------------------------


class _AsRecorded:
    """A block as one forward left it, for its own auxiliary losses computed later: the ``AUX_STATE``
    attributes from that forward, everything else (configuration, weights, methods) from the block."""

    def __init__(self, block: "RoutedBlock", state: dict):
        self._block, self._state = block, state

    def __getattr__(self, name: str):
        state = self.__dict__["_state"]
        return state[name] if name in state else getattr(self.__dict__["_block"], name)


class RoutedBlock(nn.Module):
    """Base of every layer that routes tokens to experts.

    Args:
        num_experts: the computed experts E (ids ``0 .. E-1``); 0 for a layer that is configured to route
            nothing (e.g. MoH attention with only shared heads), which the walkers then skip.
        top_k: slots per token (for dynamic routers: the most, or the average).
        num_special: routable experts beyond the computed ones (MoE's null, copy and constant experts: ids
            ``E .. E + num_special - 1``), which the record and load count too.
        aux_loss_coefs: auxiliary losses by name (keys of :data:`AUX_LOSSES`) -> coefficient.
        backend: the expert-compute backend ("auto", "reference", "torch" or "triton").
        expert_names: optional display names, one per computed expert (e.g. the modality it reads).

    A subclass computes its experts, then calls :meth:`record_routing` with its router's output. A loss that
    needs what only the subclass knows (e.g. each token's modality) goes in its ``OWN_AUX_LOSSES``: name ->
    ``fn(block, routed, tokens_shape)``, accepted in ``aux_loss_coefs`` beside :data:`AUX_LOSSES`; the
    attributes such a loss reads that each forward replaces go in ``AUX_STATE``, so that a no-grad record can
    compute the loss later, when read, on the state of its own forward.
    """

    OWN_AUX_LOSSES: dict[str, Callable[["RoutedBlock", RouterOutput, tuple[int, ...]], torch.Tensor]] = {}
    AUX_STATE: tuple[str, ...] = ()

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        num_special: int = 0,
        aux_loss_coefs: dict[str, float] | None = None,
        backend: str = "auto",
        expert_names: Sequence[str] | None = None,
    ):
        super().__init__()
        for name, value, least in (("num_experts", num_experts, 0), ("top_k", top_k, 0), ("num_special", num_special, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if expert_names is not None and len(expert_names) != num_experts:
            raise ValueError(f"expert_names must name each of the {num_experts} experts, got {len(expert_names)}")
        self.num_experts, self.top_k, self.num_special = num_experts, top_k, num_special
        self.aux_loss_coefs = check_aux_loss_coefs(aux_loss_coefs, tuple(self.OWN_AUX_LOSSES))
        self.backend = backend
        self.expert_names = tuple(expert_names) if expert_names is not None else None
        self.routing: RoutingRecord | None = None
        # the decode kernel (moezoo.kernels.cpu_decode): its prepared calls, made on first use, and whether it may
        # copy the weights into its panels (frozen blocks; copied again when a weight's version moves)
        self._decode_prepared: dict = {}
        self._decode_frozen = False

    @property
    def num_routable(self) -> int:
        """Every id a router may choose: the computed experts and the special ones."""
        return self.num_experts + self.num_special

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; accepted: {', '.join(BACKENDS)}")
        self._backend = value

    # ------------------------------------------------------------------------------------------ record

    def aux_terms(self, routed: RouterOutput, tokens_shape: Sequence[int] = (),
                  names: Sequence[str] | None = None, *, state: dict | None = None) -> dict[str, torch.Tensor]:
        """Each configured auxiliary loss of ``routed`` (tokens of leading shape ``tokens_shape``) by name (or
        those of ``names``), unweighted, with its graph; ``state``: the ``AUX_STATE`` attributes as the forward
        of ``routed`` left them (default: as they are now)."""
        shape = tuple(tokens_shape)
        block = self if not state else _AsRecorded(self, state)
        return {name: self.OWN_AUX_LOSSES[name](block, routed, shape) if name in self.OWN_AUX_LOSSES
                else AUX_LOSSES[name](routed, self.num_routable, shape)
                for name in (self.aux_loss_coefs if names is None else names)}

    def record_routing(
        self,
        routed: RouterOutput,
        tokens_shape: Sequence[int],
        *,
        load_E: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        dropped: int | Callable[[], int] = 0,
    ) -> RoutingRecord:
        """Make and keep ``self.routing`` from the router's output for tokens of leading shape
        ``tokens_shape``. ``load_E`` (default: the chosen slots per routable expert) and ``dropped`` come from
        blocks that drop slots by capacity, as values or as functions that compute them (called when the record
        is summarized: see :class:`RoutingRecord`).

        Without autograd the counts and the configured losses are computed when first read (the block's own
        on its ``AUX_STATE`` as this forward left it), the :data:`COLLECTIVE_AUX_LOSSES` at once (every rank
        must take part)."""
        shape, coefs = tuple(tokens_shape), dict(self.aux_loss_coefs)
        routed_tensors = (routed.weights_TK, routed.probs_TE, routed.logits_TE, routed.load_E)
        now = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in routed_tensors)
        collective = [] if now else [n for n in coefs if n in COLLECTIVE_AUX_LOSSES]
        early = self.aux_terms(routed, shape, collective) if collective else {}
        state = {name: getattr(self, name) for name in self.AUX_STATE}

        def summarize() -> tuple:
            counts_E = load_E() if callable(load_E) else load_E
            if counts_E is None:
                counts_E = losses.expert_counts(routed.ids_TK, self.num_routable).float()
            computed = self.aux_terms(routed, shape, [n for n in coefs if n not in early], state=state)
            terms = {n: early[n] if n in early else computed[n] for n in coefs}
            aux_loss = sum((coefs[n] * v for n, v in terms.items()), routed.probs_TE.new_zeros(()))
            return (counts_E, dropped() if callable(dropped) else dropped, aux_loss,
                    {n: v.detach() for n, v in terms.items()})

        # straight into __dict__: nn.Module.__setattr__ checks its parameter, buffer and module tables first, ~8 µs
        # of a one-token decoding step here; ``routing`` is a plain attribute (set in __init__), never one of those
        record = RoutingRecord(*(t.detach() if t.requires_grad else t for t in (routed.ids_TK, routed.weights_TK,
                                                                               routed.probs_TE)),
                               shape, summarize, now=now)
        self.__dict__["routing"] = record
        return record

    # ------------------------------------------------------------------------------------------ pictures

    def expert_map(self, grid: Sequence[int] | None = None) -> torch.Tensor:
        """The top-1 expert of every token of the last forward, int64, in the input's layout: shaped like the
        input's leading dims (``tokens_shape``), or ``[-1, *grid]`` when the family says how its tokens tile
        (e.g. ``(H/p, W/p)`` patches, ``(frames, H/p, W/p)``)."""
        if self.routing is None:
            raise RuntimeError("no routing recorded yet: run a forward first")
        top1 = self.routing.ids_TK[:, 0]
        if grid is None:
            return top1.reshape(self.routing.tokens_shape)
        cells = math.prod(grid)
        if top1.numel() % cells:
            raise RuntimeError(f"{top1.numel()} tokens were routed, not a whole number of {tuple(grid)} grids")
        return top1.reshape(-1, *grid)

    def expert_labels(self) -> list[str]:
        """One label per routable expert: ``e0 .. e{E-1}`` (with the expert's name when it has one), then the
        special experts'."""
        names = self.expert_names or ("",) * self.num_experts
        return [f"e{e} {n}" if n else f"e{e}" for e, n in enumerate(names)] + self.special_labels()

    def special_labels(self) -> list[str]:
        return [f"special {s}" for s in range(self.num_special)]

    # ------------------------------------------------------------------------------------------ inference

    def freeze(self) -> None:
        """Prepare for inference on fixed weights: the decode kernel multiplies panel copies of the experts (made
        from the weights as they are now; again when a weight's version moves). Blocks with packable experts
        extend it (see MoE.freeze)."""
        self._decode_frozen = True
        self._decode_prepared.clear()

    def unfreeze(self) -> None:
        """Undo :meth:`freeze`: compute on the live weights again."""
        self._decode_frozen = False
        self._decode_prepared.clear()


# ----------------------------------------------------------------------------------------------------------
# Walkers
# ----------------------------------------------------------------------------------------------------------


def routed_blocks(model: nn.Module) -> list[tuple[str, RoutedBlock]]:
    """Every routed block of ``model`` by module name, in forward-definition order (blocks configured to
    route nothing left out)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedBlock) and m.num_routable]


def collect_routing(model: nn.Module) -> list[tuple[str, RoutingRecord]]:
    """Every routed block's last routing record, by module name, in forward-definition order."""
    return [(name, m.routing) for name, m in routed_blocks(model) if m.routing is not None]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of all routed blocks' weighted auxiliary losses from their last forward (0 if none)."""
    records = collect_routing(model)
    if not records:
        return torch.zeros(())
    return sum(record.aux_loss for _, record in records)


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every routed block in ``model`` to ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    for _, block in routed_blocks(model):
        block.backend = backend


def routing_maps(model: nn.Module, grid: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per routed block, the top-1 expert of every token of the last forward (:meth:`RoutedBlock.expert_map`
    with the family's ``grid``); an empty list for a model without routed blocks."""
    return [block.expert_map(grid) for _, block in routed_blocks(model)]


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every routed block for inference on fixed weights (expert weights packed once into the CPU
    backend's blocked layout). A frozen block drops its packed copies when its weights change in place, are
    replaced or reloaded; an edit through ``.data`` bypasses the version counter that detects this, so after
    such an edit call :func:`unfreeze` (or ``freeze`` again). Pipelines freeze the models they own."""
    for _, block in routed_blocks(model):
        block.freeze()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: every routed block computes on its live weights."""
    for _, block in routed_blocks(model):
        block.unfreeze()
    return model
