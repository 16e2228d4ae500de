"""Upcycling: a model's dense FFNs become the experts of routed blocks.

Two ways to turn a dense FFN ``FFN(x) = W_out act(W_in x)`` (hidden width F) into experts:

- ``"copy"`` (sparse upcycling, Komatsuzaki et al. 2023; MoE-LLaVA; DiT-MoE-style recipes): every expert is a copy
  of the FFN. A block's routed sum is then ``(sum of the token's routed weights) * FFN(x)``: the FFN itself where
  the weights sum to 1 (renormalised top-k or top-p, no null/copy/constant expert chosen, nothing dropped, no
  shared experts), until training moves the copies apart.
- ``"split"`` (UniMoE-Audio stage 2): the hidden width is cut into n slices of F/n units; slice i is an expert
  (``W_in`` rows and ``W_out`` columns of those units; an output bias shared equally, 1/n each). The sum of all
  n experts is the FFN exactly (up to float rounding), since the FFN's output is a sum over its hidden units.

Several FFNs (proto-models) can feed one block: their experts are concatenated in the order given (e.g. two
protos split in 4 -> 8 experts, the first proto's slices first).

The pieces:

- :func:`expert_weights`: the stacked expert weights for ``num_experts`` from one or more dense FFNs;
- :func:`moe_from_dense`: a :class:`~moezoo.zoo.layers.moe.MoE` or
  :class:`~moezoo.zoo.layers.dcmoe.DynamicCapacityMoE` holding those experts (routers and shared experts new);
- :func:`upcycle`: replace the selected dense FFNs of a model in place by what ``make`` returns;
- :func:`average_state_dicts`: the mean of several models' weights (UniMoE-Audio averages attention and norms);
- :func:`widen`: a dense gated FFN ``factor`` times wider with the same output (new hidden units whose output
  weights start at zero): the dense baseline at a routed model's active width, from the same start.

UniMoE-Audio's stage 2 from dense protos of one architecture (their FFNs at ``blocks.<i>.mlp``)::

    merged = copy.deepcopy(protos[0])
    merged.load_state_dict(average_state_dicts([p.state_dict() for p in protos]))  # attention, norms averaged
    upcycle(merged, lambda name, _: moe_from_dense([p.get_submodule(name) for p in protos], 8, "split",
                                                   block=DynamicCapacityMoE), select="blocks.*.mlp")

(the averaged FFNs are replaced; each block's experts are the protos' own slices). Dense FFNs understood:
:class:`~moezoo.zoo.layers.blocks.GatedMLP` and timm's ``Mlp`` (Linear layers, no norm, no dropout).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import timm.layers.activations as timm_act
import torch
import torch.nn as nn
from timm.layers import Mlp

from .layers.blocks import GatedMLP
from .layers.dcmoe import DynamicCapacityMoE
from .layers.moe import MoE
from .layers.routed import RoutedBlock

MODES = ("copy", "split")
DENSE_FFNS = (GatedMLP, Mlp)


@dataclass
class ExpertWeights:
    """Experts in ``kernels.expert_mlp``'s layout: ``w_in [E, N_in, D]`` (gated: the gate rows, then the up rows),
    ``w_out [E, D, F]``, optional biases ``b_in [E, N_in]`` / ``b_out [E, D]``, and their nonlinearity."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    activation: str
    gated: bool

    @property
    def hidden_dim(self) -> int:
        return self.w_out.shape[2]


def expert_weights(ffns: nn.Module | Sequence[nn.Module], num_experts: int, mode: str = "copy") -> ExpertWeights:
    """``num_experts`` experts from one dense FFN or several of the same shape (``num_experts`` a multiple of
    their number; each gives ``num_experts / len(ffns)`` experts, in order), by ``mode`` "copy" or "split" (module
    docstring). Detached copies: the FFNs are not changed and share no storage with the result."""
    ffns = [ffns] if isinstance(ffns, nn.Module) else list(ffns)
    if not ffns:
        raise ValueError("expert_weights needs at least one dense FFN")
    if mode not in MODES:
        raise ValueError(f"unknown upcycling mode {mode!r}; accepted: {', '.join(MODES)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 or num_experts % len(ffns):
        raise ValueError(f"num_experts must be a positive multiple of the {len(ffns)} dense FFN(s), "
                         f"got {num_experts!r}")
    dense = [_read_dense(ffn) for ffn in ffns]
    _check_alike(dense)
    per_ffn = num_experts // len(ffns)
    parts = [_copies(d, per_ffn) if mode == "copy" else _slices(d, per_ffn) for d in dense]
    return ExpertWeights(
        w_in=torch.cat([p.w_in for p in parts]),
        w_out=torch.cat([p.w_out for p in parts]),
        b_in=None if parts[0].b_in is None else torch.cat([p.b_in for p in parts]),
        b_out=None if parts[0].b_out is None else torch.cat([p.b_out for p in parts]),
        activation=parts[0].activation,
        gated=parts[0].gated,
    )


def moe_from_dense(
    ffns: nn.Module | Sequence[nn.Module],
    num_experts: int,
    mode: str = "copy",
    *,
    block: type[MoE] | type[DynamicCapacityMoE] = MoE,
    **block_kwargs,
) -> MoE | DynamicCapacityMoE:
    """A routed block whose experts come from dense FFN(s) (:func:`expert_weights`); its router, gate and shared
    experts are newly initialised. The experts' width, kind, activation and biases follow the FFN; ``block_kwargs``
    configure the rest (``top_k``, ``router``, ``num_null_experts``, ...). On the FFN's device and dtype.

    ``block=DynamicCapacityMoE`` takes bias-free gated FFNs only (its experts are SwiGLU-type)."""
    experts = expert_weights(ffns, num_experts, mode)
    fixed = {"activation", "expert", "bias"} & set(block_kwargs)
    if fixed:
        raise TypeError(f"{', '.join(sorted(fixed))} come(s) from the dense FFN; do not pass them to moe_from_dense")
    dim = experts.w_in.shape[2]
    if block is MoE:
        moe = MoE(dim, experts.hidden_dim, num_experts, expert="swiglu" if experts.gated else "mlp",
                  activation=experts.activation, bias=experts.b_in is not None, **block_kwargs)
    elif block is DynamicCapacityMoE:
        if not experts.gated or experts.b_in is not None:
            kind = ("gated" if experts.gated else "not gated") + (" with biases" if experts.b_in is not None else "")
            raise ValueError(f"DynamicCapacityMoE's experts are bias-free gated MLPs; this FFN is {kind}")
        moe = DynamicCapacityMoE(dim, experts.hidden_dim, num_experts, activation=experts.activation, **block_kwargs)
    else:
        raise TypeError(f"block must be MoE or DynamicCapacityMoE, got {getattr(block, '__name__', block)!r}")
    moe = moe.to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    with torch.no_grad():
        moe.w_in.copy_(experts.w_in)
        moe.w_out.copy_(experts.w_out)
        if experts.b_in is not None:
            moe.b_in.copy_(experts.b_in)
            moe.b_out.copy_(experts.b_out)
    return moe


def upcycle(
    model: nn.Module,
    make: Callable[[str, nn.Module], nn.Module],
    select: str | Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Replace dense FFNs of ``model`` in place by ``make(name, module)`` (e.g. a :func:`moe_from_dense` call) and
    return the replaced modules' names in definition order.

    ``select``: which modules — a glob on the module name (``"blocks.*.mlp"``), a predicate ``(name, module)``, or
    None for every GatedMLP / timm Mlp that is not part of a routed block (a MoE's shared experts are GatedMLPs
    too). A module inside one already selected is left to it. Nothing selected is an error."""
    if isinstance(select, str):
        select = _name_matches(select)
    elif select is None:
        select = _is_standalone_dense_ffn(model)
    elif not callable(select):
        raise TypeError(f"select must be a glob string, a predicate (name, module) -> bool or None, got {select!r}")
    chosen: list[str] = []
    for name, module in model.named_modules():
        if name and select(name, module) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"upcycle: no module of {type(model).__name__} matched select")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        replacement = make(name, model.get_submodule(name))
        if not isinstance(replacement, nn.Module):
            raise TypeError(f"make({name!r}, ...) must return an nn.Module, got {type(replacement).__name__}")
        setattr(model.get_submodule(parent_name), child, replacement)
    return chosen


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The elementwise mean of several state dicts of one architecture (same keys, shapes and dtypes), key order of
    the first. Floating tensors are averaged (summed in float64, cast back); other tensors (step counters, index
    buffers) must be equal in all and are kept."""
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            missing, extra = sorted(set(keys) - set(sd)), sorted(set(sd) - set(keys))
            raise ValueError(f"state dict {i} has other keys than state dict 0: missing {missing[:5]}, "
                             f"extra {extra[:5]}")
    averaged = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        first = tensors[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
            raise ValueError(f"{key!r} differs in shape or dtype across the state dicts: "
                             f"{[(tuple(t.shape), str(t.dtype)) for t in tensors]}")
        if first.dtype.is_floating_point:
            total = sum(t.detach().to(device=first.device, dtype=torch.float64) for t in tensors)
            averaged[key] = (total / len(tensors)).to(first.dtype)
        elif all(torch.equal(t.cpu(), first.cpu()) for t in tensors):
            averaged[key] = first.detach().clone()
        else:
            raise ValueError(f"{key!r} is a {first.dtype} tensor that differs across the state dicts; "
                             "only floating tensors can be averaged")
    return averaged


def widen(ffn: GatedMLP, factor: int) -> GatedMLP:
    """A copy of ``ffn`` with ``factor`` times its hidden width computing the same function: its hidden units
    first, then new ones initialised like an nn.Linear whose output columns start at zero. (Repeating the old
    units instead would also keep the output, but each copy would get the same gradient forever and the wider
    model would stay the narrow one.) The new units' output columns learn from the first step, their input rows
    from the second."""
    if not isinstance(ffn, GatedMLP):
        raise TypeError(f"widen takes a GatedMLP, got {type(ffn).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    if any(layer is not None and layer.bias is not None for layer in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)):
        raise ValueError("widen takes a bias-free GatedMLP")
    hidden = ffn.up_proj.out_features
    wide = GatedMLP(ffn.up_proj.in_features, factor * hidden, ffn.activation, ffn.gated)
    wide = wide.to(device=ffn.up_proj.weight.device, dtype=ffn.up_proj.weight.dtype)
    with torch.no_grad():
        for narrow_layer, wide_layer in ((ffn.gate_proj, wide.gate_proj), (ffn.up_proj, wide.up_proj)):
            if narrow_layer is not None:
                wide_layer.weight[:hidden].copy_(narrow_layer.weight)
        wide.down_proj.weight.zero_()
        wide.down_proj.weight[:, :hidden].copy_(ffn.down_proj.weight)
    return wide


# ----------------------------------------------------------------------------------------------------------
# Reading dense FFNs
# ----------------------------------------------------------------------------------------------------------


def _read_dense(ffn: nn.Module) -> ExpertWeights:
    """One dense FFN as a single expert (leading dim 1), detached."""
    if isinstance(ffn, GatedMLP):
        layers = [ffn.gate_proj, ffn.up_proj] if ffn.gated else [ffn.up_proj]
        return _as_expert(layers, ffn.down_proj, ffn.activation, ffn.gated)
    if isinstance(ffn, Mlp):
        if not isinstance(ffn.fc1, nn.Linear) or not isinstance(ffn.fc2, nn.Linear):
            raise ValueError("a timm Mlp with 1x1 convolutions (use_conv=True) cannot become experts: "
                             "Linear layers only")
        if not isinstance(ffn.norm, nn.Identity):
            raise ValueError(f"a timm Mlp with a hidden norm ({type(ffn.norm).__name__}) cannot become experts")
        if ffn.drop1.p or ffn.drop2.p:
            raise ValueError(f"a timm Mlp with dropout ({ffn.drop1.p}, {ffn.drop2.p}) cannot become experts, which "
                             "have none; build it with drop=0")
        if ffn.fc2.out_features != ffn.fc1.in_features:
            raise ValueError(f"experts map D -> D; this Mlp maps {ffn.fc1.in_features} -> {ffn.fc2.out_features}")
        return _as_expert([ffn.fc1], ffn.fc2, _activation_name(ffn.act), gated=False)
    raise TypeError(f"cannot upcycle a {type(ffn).__name__}: dense FFNs understood are "
                    f"{', '.join(t.__name__ for t in DENSE_FFNS)} (timm's Mlp)")


def _as_expert(in_layers: list[nn.Linear], out_layer: nn.Linear, activation: str, gated: bool) -> ExpertWeights:
    has_bias = any(layer.bias is not None for layer in [*in_layers, out_layer])

    def bias_of(layer: nn.Linear) -> torch.Tensor:  # a missing bias is a zero one
        return layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias.detach()

    return ExpertWeights(
        w_in=torch.cat([layer.weight.detach() for layer in in_layers])[None].clone(),
        w_out=out_layer.weight.detach()[None].clone(),
        b_in=torch.cat([bias_of(layer) for layer in in_layers])[None].clone() if has_bias else None,
        b_out=bias_of(out_layer)[None].clone() if has_bias else None,
        activation=activation,
        gated=gated,
    )


def _activation_name(act: nn.Module) -> str:
    """The kernels' name of a timm Mlp's activation module."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    for kinds, name in (((timm_act.GELUTanh,), "gelu_tanh"), ((timm_act.GELU,), "gelu"),
                        ((nn.SiLU, timm_act.Swish), "silu"), ((nn.ReLU,), "relu")):
        if isinstance(act, kinds):
            return name
    raise ValueError(f"the Mlp's activation {type(act).__name__} has no expert kernel; accepted: GELU (exact or tanh), "
                     "SiLU/Swish, ReLU")


def _check_alike(dense: list[ExpertWeights]) -> None:
    first = dense[0]
    for i, d in enumerate(dense[1:], start=1):
        if (d.w_in.shape, d.w_out.shape, d.activation, d.gated, d.b_in is None) != (
            first.w_in.shape, first.w_out.shape, first.activation, first.gated, first.b_in is None
        ):
            raise ValueError(f"dense FFN {i} differs from FFN 0 in shape, activation, gating or biases; experts of "
                             "one block must be alike")


def _copies(dense: ExpertWeights, n: int) -> ExpertWeights:
    def repeat(t):
        return None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))

    return ExpertWeights(repeat(dense.w_in), repeat(dense.w_out), repeat(dense.b_in), repeat(dense.b_out),
                         dense.activation, dense.gated)


def _slices(dense: ExpertWeights, n: int) -> ExpertWeights:
    """Expert i: hidden units ``[i F/n, (i + 1) F/n)`` (of the gate and the up rows alike when gated)."""
    hidden, dim = dense.hidden_dim, dense.w_in.shape[2]
    if hidden % n:
        raise ValueError(f"split mode cuts the hidden width {hidden} into {n} equal slices: {n} must divide it")
    width = hidden // n
    halves = 2 if dense.gated else 1

    def rows(t):  # [1, halves * F, ...] -> [n, halves * F/n, ...]: each half cut into n slices, regrouped by slice
        return None if t is None else t.reshape(halves, n, width, *t.shape[2:]).transpose(0, 1).reshape(
            n, halves * width, *t.shape[2:])

    w_out = dense.w_out.reshape(dim, n, width).transpose(0, 1).contiguous()
    b_out = None if dense.b_out is None else (dense.b_out / n).repeat(n, 1)
    return ExpertWeights(rows(dense.w_in), w_out, rows(dense.b_in), b_out, dense.activation, dense.gated)


def _name_matches(pattern: str) -> Callable[[str, nn.Module], bool]:
    return lambda name, _module: fnmatch.fnmatchcase(name, pattern)


def _is_standalone_dense_ffn(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The default selection: dense FFNs that are not inside a routed block."""
    inside_routed = {
        f"{name}.{sub}" if name else sub
        for name, module in model.named_modules() if isinstance(module, RoutedBlock)
        for sub, _ in module.named_modules() if sub
    }
    return lambda name, module: isinstance(module, DENSE_FFNS) and name not in inside_routed
