"""Fixed inputs for every bundled model, and the recorder of their outputs.

``python tests/zoo/bundled_outputs.py`` wrote ``tests/zoo/data/bundled_outputs.safetensors`` from the code as it
was before the house move of 2026-12-02 (commit c34a48b, AVX-512 machine); tests/zoo/test_bundled_outputs.py
checks that today's code still computes those numbers. Re-record only when a model is meant to change, and then
only that model: ``python tests/zoo/bundled_outputs.py NAME`` replaces NAME's records and keeps the others'
(``mofme_weather``'s were re-recorded so on 2026-12-04, when its weights were retrained).
"""

from __future__ import annotations

from pathlib import Path

import torch

RECORD = Path(__file__).parent / "data" / "bundled_outputs.safetensors"
BUNDLED = ("dit_moe_digits", "dit_dense_digits", "dit_moe_shapes", "dit_moe_shapes_video", "mofme_weather",
           "moe_fusion_irvis")
PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
VIDEO_PROMPTS = ["a red square moving left", "a green circle moving up"]


def _timesteps(model) -> torch.Tensor:
    fractions = torch.tensor([0.25, 0.75])
    return fractions if model.config.objective == "rf" else (fractions * 999).round().long()


def run(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's output on its fixed input, and its top-1 routing map per routed layer (eval, no grad)."""
    g = torch.Generator().manual_seed(1234)
    model.eval()
    with torch.no_grad():
        if name.startswith("dit"):
            cfg = model.config
            size, C = cfg.input_size, cfg.in_channels
            shape = (2, 8, C, size, size) if name.endswith("video") else (2, C, size, size)
            x = torch.randn(shape, generator=g)
            y = torch.tensor([3, 7]) if cfg.num_classes else None
            text = None
            if cfg.text_encoder is not None:
                text = model.encode_text(VIDEO_PROMPTS if name.endswith("video") else PROMPTS)
            out = model(x, _timesteps(model), y, text)
        elif name.startswith("mofme"):
            out = model(torch.rand(1, 3, 64, 64, generator=g))
        else:
            infrared, visible = torch.rand(2, 1, 1, 64, 48, generator=g)
            out = model(infrared, visible)
        maps = model.routing_maps()
    record = {f"{name}/output": out.float().contiguous()}
    record.update({f"{name}/map{i}": m.contiguous() for i, m in enumerate(maps)})
    return record


def main(names: list[str]) -> None:
    from safetensors.torch import load_file, save_file

    from moezoo.zoo import create_model

    unknown = [name for name in names if name not in BUNDLED]
    if unknown:
        raise SystemExit(f"not bundled: {', '.join(unknown)}; bundled: {', '.join(BUNDLED)}")
    records = {}
    if names and RECORD.is_file():  # keep every other model's records as they were
        records = {k: v for k, v in load_file(str(RECORD)).items() if k.split("/")[0] not in names}
    for name in names or BUNDLED:
        torch.manual_seed(0)
        records.update(run(name, create_model(name, pretrained=True)))
    RECORD.parent.mkdir(exist_ok=True)
    save_file(records, str(RECORD))
    print(f"wrote {len(records)} tensors to {RECORD}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
