"""The shape of moezoo.training: the datasets import without Lightning, and no file imports another module's
private names."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import moezoo.training.datasets

TRAINING = Path(__file__).resolve().parents[2] / "training"

# Plain numpy/torch code the app and the benchmarks use without Lightning.
LIGHTNING_FREE = sorted(
    [f"moezoo.training.datasets.{info.name}" for info in pkgutil.iter_modules(moezoo.training.datasets.__path__)]
    + ["moezoo.training.fusion_metrics", "moezoo.training.audio_metrics", "moezoo.training.generation_metrics"]
)


def test_the_datasets_import_without_lightning():
    assert len(LIGHTNING_FREE) >= 6  # images, video, photos, weather, fusion_pairs, fusion_metrics
    script = "\n".join([
        "import sys",
        *(f"import {name}" for name in LIGHTNING_FREE),
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'lightning_fabric')))",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing the datasets imported Lightning: {result.stdout}"


def private_imports(source: str) -> list[str]:
    """Every ``from M import _name`` and ``import M._private`` / ``from M._private import ...`` in ``source``
    (dunders and ``from __future__`` are public)."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if any(private(part) for part in (node.module or "").split(".")):
                found.append(f"from {module} import ...")
            found += [f"from {module} import {alias.name}" for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names
                      if any(private(part) for part in alias.name.split("."))]
    return found


def test_the_private_import_check_finds_private_imports():
    source = "\n".join(["from .data import _split_indices, collate", "import torch._dynamo", "from a._b import c",
                        "from __future__ import annotations", "from .x import __version__"])
    assert private_imports(source) == ["from .data import _split_indices", "import torch._dynamo",
                                       "from a._b import ..."]


def test_no_file_imports_private_names():
    offenders = {
        str(path.relative_to(TRAINING)): found
        for path in sorted(TRAINING.rglob("*.py"))
        if (found := private_imports(path.read_text()))
    }
    assert not offenders, f"imports of another module's private names: {offenders}"
