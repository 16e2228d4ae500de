"""Test-session setup shared by every test module."""

import os
import shutil

# Triton kernels run on CPU through the interpreter when no GPU is present. Triton reads the variable when a
# kernel is defined, so it is set here, before any test module imports moezoo.kernels.triton_moe.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
