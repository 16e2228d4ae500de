"""Test-session setup shared by every test module."""

import os
import shutil
import sys

# Shared test helpers (tests/tolerance.py) import by bare name under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))
# `python -m pytest` puts the working directory, the repository root, on sys.path; the root's folders install as
# moezoo.<folder> but are named like PyPI packages, so from there `import kernels` (transformers does it when
# Hugging Face's `kernels` package is installed) would find our kernels/ folder. moezoo imports through its
# installed (editable) finder and needs no root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

# Triton kernels run on CPU through the interpreter when no GPU is present. Triton reads the variable when a
# kernel is defined, so it is set here, before any test module imports moezoo.kernels.triton_moe.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CI machine has 2 cores; one intra-op thread per test process avoids spin-wait contention between torch's
# thread pool and anything else running, and makes timings in tests irrelevant to correctness.
import torch  # noqa: E402

torch.set_num_threads(1)
