"""Ternary expert weights (MoTE): values in {-1, 0, +1} times one scale per expert.

- :func:`ternary_quantize` / :func:`ternary_dequantize`: BitNet b1.58's absmean quantiser, with the scale
  taken per expert (dim 0 of an ``[E, ...]`` weight).
- :func:`pack_ternary` / :func:`unpack_ternary`: 2 bits per value, 4 values per byte, for storage.
- :func:`ternary_ste`: quantise-dequantise in the forward, identity in the backward (straight-through
  estimator), for quantisation-aware training of full-precision latent weights.

Packing code: ``0 -> 0b00``, ``+1 -> 0b01``, ``-1 -> 0b10`` (``0b11`` is invalid); value ``i`` of the flat
tensor sits in byte ``i // 4`` at bits ``2 * (i % 4)`` (least significant first). Padding values are 0, so
a zero byte decodes to four zeros.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ternary_quantize", "ternary_dequantize", "pack_ternary", "unpack_ternary", "ternary_ste"]


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor [E, ...], got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor [E, ...], got dtype {w.dtype}")
    if w.dim() < 2:
        raise ValueError(
            f"{name} must have at least 2 dims [E, ...] (one scale per expert along dim 0), got shape {tuple(w.shape)}"
        )
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite values; ternary quantisation needs finite weights")


def _check_ternary_values(q: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor with values in {{-1, 0, 1}}, got dtype {q.dtype}")
    if q.numel() and bool(((q < -1) | (q > 1)).any()):
        raise ValueError(f"{name} must only hold the values -1, 0 and 1")


def _absmean_scale(w: torch.Tensor, eps: float) -> torch.Tensor:
    return w.detach().abs().mean(dim=tuple(range(1, w.dim()))).clamp(min=eps)


def ternary_quantize(w: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w [E, ...]`` to ternary values with one absmean scale per expert (BitNet b1.58).

    ``scale[e] = max(mean |w[e]|, eps)``; ``q = clamp(round(w / scale), -1, 1)`` (round half to even).

    Returns:
        (q, scale): q int8 with w's shape and values in {-1, 0, 1}; scale [E] in w's dtype.
    """
    _check_weight(w)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    scale_E = _absmean_scale(w, eps)
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w.detach() / scale_E.view(view)).clamp_(-1, 1).to(torch.int8)
    return q, scale_E


def ternary_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale[e]`` for every expert e along dim 0, in scale's dtype."""
    _check_ternary_values(q, "q")
    if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
        raise TypeError(f"scale must be a floating tensor [E], got {getattr(scale, 'dtype', type(scale).__name__)}")
    if q.dim() < 1 or scale.dim() != 1 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"scale must be 1-D with one entry per expert (q.shape[0]); got q {tuple(q.shape)}, scale {tuple(scale.shape)}"
        )
    view = (-1,) + (1,) * (q.dim() - 1)
    return q.to(scale.dtype) * scale.view(view)


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Pack a ternary tensor (any shape) into uint8 [ceil(numel / 4)], 2 bits per value."""
    _check_ternary_values(q, "q")
    flat = q.reshape(-1).to(torch.int16)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    codes = torch.where(flat < 0, 2, flat).to(torch.uint8).view(-1, 4)  # 0 -> 0, 1 -> 1, -1 -> 2
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, shape) -> torch.Tensor:
    """The int8 tensor of ``shape`` that :func:`pack_ternary` packed into ``packed``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor from pack_ternary, got {getattr(packed, 'dtype', type(packed).__name__)}")
    shape = torch.Size(shape)
    numel = math.prod(shape)
    expected = -(-numel // 4)
    if packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed must be 1-D with ceil({numel} / 4) = {expected} bytes for shape {tuple(shape)}, "
            f"got shape {tuple(packed.shape)}"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(-1) >> shifts) & 3).reshape(-1)[:numel]
    if numel and bool((codes == 3).any()):
        raise ValueError("packed holds the invalid 2-bit code 0b11; it was not produced by pack_ternary")
    values = codes.to(torch.int8)
    values = (values & 1) - (values >> 1)  # 0 -> 0, 1 -> 1, 2 -> -1
    return values.reshape(shape)


class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float) -> torch.Tensor:
        q, scale = ternary_quantize(w, eps)
        return ternary_dequantize(q, scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None


def ternary_ste(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Forward ``dequantize(quantize(w))``; backward identity (straight-through), so the gradient of the
    ternary weight reaches the full-precision ``w`` unchanged."""
    _check_weight(w)
    return _TernarySTE.apply(w, eps)
