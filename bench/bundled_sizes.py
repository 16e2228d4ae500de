"""The size of every bundled model: parameters (active per token where the family counts them), the weights
file and its dtype, and the config that trained it. No timing.

    python bench/bundled_sizes.py            # a markdown table, a few seconds

"all" counts every parameter of the loaded model (``sum(p.numel())``: a text tower, tokenizer or vocoder
included); "model" is the family's own ``num_parameters()`` where it has one (UniMoE-Audio leaves out its codec
and vocoder); "active" its ``num_parameters(active=True)`` at the family's defaults, the parameters one token
passes through (DiT-MoE, the MoE-VLM; UniMoE-Audio: the most a token can use, 7 of its 9 routed and null
experts). File sizes are in MB of 10^6 bytes, as the README quotes them.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch
from safetensors import safe_open

from moezoo.zoo import create_model, get_pretrained_cfg, list_pretrained
from moezoo.zoo.hub import WEIGHTS_DIR

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def bundled_models() -> list[str]:
    """Registered names whose default pretrained cfg is a file shipped in zoo/weights/."""
    names = []
    for name_tag in list_pretrained():
        name = name_tag.split(".")[0]
        if name not in names and get_pretrained_cfg(name).file is not None:
            names.append(name)
    return names


def size_row(name: str) -> str:
    path = Path(WEIGHTS_DIR) / get_pretrained_cfg(name).file
    with safe_open(path, "pt") as weights:
        dtypes = sorted({str(weights.get_slice(key).get_dtype()) for key in weights.keys()})
    model = create_model(name, pretrained=True)
    total = sum(p.numel() for p in model.parameters())
    counts = getattr(model, "num_parameters", None)
    own = f"{counts() / 1e6:.2f}M" if counts is not None else "—"
    active = (f"{counts(active=True) / 1e6:.2f}M" if counts is not None
              and "active" in inspect.signature(counts).parameters else "—")
    config = CONFIGS / f"{name}.yaml"
    return (f"| `{name}` | {total / 1e6:.2f}M | {own} | {active} | {path.stat().st_size / 1e6:.2f} MB | {', '.join(dtypes)} "
            f"| {f'training/configs/{config.name}' if config.is_file() else '— (several stages)'} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | all parameters | model | active | weights file | dtypes | config |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name in bundled_models():
        print(size_row(name), flush=True)


if __name__ == "__main__":
    main()
