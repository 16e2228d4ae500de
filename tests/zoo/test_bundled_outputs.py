"""Every bundled model computes what it computed before the house move (issue 14): its output on a fixed input
and its top-1 routing maps, against tests/zoo/data/bundled_outputs.safetensors (recorded by
tests/zoo/bundled_outputs.py on the code of commit c34a48b)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moezoo.zoo import create_model

_spec = importlib.util.spec_from_file_location("bundled_outputs", Path(__file__).with_name("bundled_outputs.py"))
bundled_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundled_outputs)

RECORDED = load_file(str(bundled_outputs.RECORD))


def network_tolerance(output: torch.Tensor, longest_reduction: int) -> float:
    """fp32 rounding of a whole network between CPU kinds (AVX-512 vs AVX2 kernels sum in other orders): a
    dot product of length K is off by about sqrt(K) eps relative (random-walk rounding); layers compound a few
    of those, hence the factor 8; relative to the output's scale."""
    return 8 * torch.finfo(torch.float32).eps * math.sqrt(longest_reduction) * float(output.abs().max())


def _longest_reduction(model: torch.nn.Module) -> int:
    return max(p.shape[-1] for p in model.parameters() if p.dim() >= 2)


@pytest.mark.parametrize("name", bundled_outputs.BUNDLED)
def test_bundled_model_output_unchanged(name):
    model = create_model(name, pretrained=True)
    got = bundled_outputs.run(name, model)
    assert sorted(got) == sorted(k for k in RECORDED if k.startswith(f"{name}/")), "routed layers changed"
    expected = RECORDED[f"{name}/output"]
    tol = network_tolerance(expected, _longest_reduction(model))
    torch.testing.assert_close(got[f"{name}/output"], expected, rtol=0, atol=tol)
    for key, value in got.items():
        if key.endswith("/output"):
            continue
        # A routing map may flip where two experts' scores tie to within rounding: allow 1 token in 200.
        assert value.shape == RECORDED[key].shape, key
        assert (value != RECORDED[key]).float().mean() <= 0.005, key
