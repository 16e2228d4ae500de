"""The experts' elementwise nonlinearities by name, and their derivatives, shared by every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation_fn(name: str):
    """The elementwise nonlinearity by name (SwiGLU uses silu, GeGLU gelu)."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")


def activation_grad(name: str, grad: torch.Tensor, pre: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * act'(pre)`` for the activation ``name``, with aten's fused elementwise backward kernels (one pass,
    no autograd graph), written into ``out`` when given (the torch backend reuses its buffers) or a new tensor."""
    if out is None:
        out = torch.empty_like(grad)
    if name == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=out)
    if name in ("gelu", "gelu_tanh"):
        approximate = "tanh" if name == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward.grad_input(grad, pre, approximate=approximate, grad_input=out)
    if name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, pre, 0, grad_input=out)
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
