"""Test tolerances from the dtype and the reduction length, never a bare constant.

Two computations of the same float result differ because they sum in a different order (another CPU kind's
kernels, a blocked GEMM vs a loop, fused vs unfused ops). For a dot product of length K with terms of similar
size, rounding errors add like a random walk: about ``sqrt(K) * eps`` relative to the magnitude of the terms
(Higham, "Accuracy and Stability of Numerical Algorithms", sec. 3.1 and the probabilistic bound of Higham &
Mary 2019). ``layers`` chained reductions add their errors. ``margin`` covers the constant.
"""

from __future__ import annotations

import math

import torch


def fp_tolerance(dtype: torch.dtype, reduction_length: int, *, layers: int = 1, scale: float = 1.0,
                 margin: float = 8.0) -> dict[str, float]:
    """``assert_close`` keyword arguments for results of ``layers`` chained reductions of length
    ``reduction_length`` in ``dtype``, whose values are of size about ``scale``."""
    eps = torch.finfo(dtype).eps
    tol = margin * eps * math.sqrt(max(reduction_length, 1)) * layers
    return {"rtol": tol, "atol": tol * scale}
