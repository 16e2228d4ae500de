"""MoFME vs a conventional MoE vs a dense FFN on synthetic weather: quality, parameters and inference time.

The three models (``mofme_weather``, ``mofme_conventional_weather``, ``mofme_dense_weather``; see
``zoo/models/mofme.py``) differ only in the FFN of their transformer layers and share everything else:
the network around it, the uncertainty router (both MoE kinds), the data, the steps, the seed. Each is
trained by its config ``training/configs/<name>.yaml`` (up to 4000 steps of 16 crops 64x64 from the 17
training photos of ``moezoo.training.datasets.photos``, one weather kind per crop, stopped early on the 2
"val" photos, the best validation's weights exported) and exported to ``runs/<name>/export``.

What is measured
----------------
Quality, twice: every held-out test photograph (chelsea, coffee, camera — whole photos, never trained on and
never used to choose anything) with each weather kind, ``--seeds`` different weather draws per photo,

- drawn by the training renderer (``moezoo.training.datasets.weather``, new draws on new photos), and
- drawn by a second renderer that training never imports (``bench/unseen_weather.py``: other methods for
  every kind, see its docstring): does the model generalise past its own renderer?

restored by ``DeweatherPipeline`` (tiles of 256 with 32 px overlap, the pipeline's default for mofme_weather;
``--tile-size 64 --tile-overlap 16`` tiles at the training crop size); PSNR and SSIM (torchmetrics, data
range 1) per image against the clean photo, averaged per weather kind. The "input" row scores the degraded
photos themselves; "gain" is a model's mean PSNR minus the input's.

Parameters: all parameters of the model.

Time: one model call on a batch of 16 tiles of ``--timing-tile`` px (64: the training crops; eval, ``torch.inference_mode``, fp32, 1 thread), reported
as ms per tile. The machine is shared, so the models are timed round-robin (``--rounds`` rounds, each model
``--calls`` calls per round) and the table shows each model's fastest call: the least disturbed measure of
what the model costs. The timing-only rows time untrained models of other (E, k) with the same code.

Usage::

    python bench/mofme_compare.py                  # evaluates runs/<name>/export, training what is missing
    python bench/mofme_compare.py --train          # (re)train all three first (25-65 min each on one core)
    python bench/mofme_compare.py --json out.json --timing-k 2 4 --tile-size 64 --tile-overlap 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from moezoo.pipelines.deweather import DeweatherPipeline
from moezoo.training.datasets.photos import TEST_PHOTOS
from moezoo.training.datasets.weather import WEATHER_TYPES, weather_test_set
from moezoo.zoo import create_model
from unseen_weather import unseen_weather_test_set  # bench/ is this script's folder

MODELS = ("mofme_weather", "mofme_conventional_weather", "mofme_dense_weather")
LABELS = {"mofme_weather": "MoFME", "mofme_conventional_weather": "conventional MoE", "mofme_dense_weather": "dense"}
ROOT = Path(__file__).resolve().parents[1]


def train(name: str) -> None:
    from moezoo.training.cli import main

    main(["fit", "--config", str(ROOT / "training" / "configs" / f"{name}.yaml")])


def load(name: str, runs: Path, retrain: bool):
    export = runs / name / "export"
    if retrain or not (export / "model.safetensors").is_file():
        print(f"training {name} ...", flush=True)
        train(name)
    return create_model(f"local-dir:{export}", pretrained=True).eval()


def to_tensor(image_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image_HWC).permute(2, 0, 1)[None]


def score(restored: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    psnr = peak_signal_noise_ratio(restored, clean, data_range=1.0)
    ssim = structural_similarity_index_measure(restored, clean, data_range=1.0)
    return float(psnr), float(ssim)


def evaluate(pipe: DeweatherPipeline | None, test_sets: dict, tile: int, overlap: int) -> dict[str, tuple[float, float]]:
    """Mean (PSNR, SSIM) per weather kind; ``pipe=None`` scores the degraded inputs."""
    results = {}
    for weather, items in test_sets.items():
        scores = []
        for _, degraded, clean in items:
            if pipe is None:
                restored = to_tensor(degraded)
            else:
                restored = pipe(degraded, tile_size=tile, tile_overlap=overlap, output_type="pt").images[0][None]
            scores.append(score(restored, to_tensor(clean)))
        results[weather] = tuple(np.mean(scores, axis=0).tolist())
    return results


@torch.inference_mode()
def time_models(models: dict, rounds: int, calls: int, tile: int) -> dict[str, float]:
    """Fastest ms per tile of each model, timed round-robin on the same batch of 16 tiles."""
    x = torch.rand(16, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    best = {name: float("inf") for name in models}
    for model in models.values():
        model(x)  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            for _ in range(calls):
                start = time.perf_counter()
                model(x)
                best[name] = min(best[name], (time.perf_counter() - start) * 1000 / len(x))
    return best


def cell(psnr_ssim: tuple[float, float]) -> str:
    return f"{psnr_ssim[0]:.2f} / {psnr_ssim[1]:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="folder with <name>/export of each model")
    parser.add_argument("--train", action="store_true", help="retrain all three models first")
    parser.add_argument("--seeds", type=int, default=4, help="weather draws per held-out photo")
    parser.add_argument("--tile-size", type=int, default=256, help="pipeline tile side for the quality scores")
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--timing-tile", type=int, default=64, help="side of the 16 tiles of the timed batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--timing-k", type=int, nargs="*", default=[2], help="extra top_k values, timing only")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    models = {name: load(name, Path(args.runs), args.train) for name in MODELS}
    renderers = {"training renderer": weather_test_set, "unseen renderer": unseen_weather_test_set}
    quality = {}
    for renderer, test_set in renderers.items():
        test_sets = {w: [item for seed in range(args.seeds) for item in test_set(w, seed)] for w in WEATHER_TYPES}
        quality[renderer] = {"input": evaluate(None, test_sets, args.tile_size, args.tile_overlap)}
        for name, model in models.items():
            pipe = DeweatherPipeline(model)
            pipe.set_progress_bar_config(disable=True)
            print(f"evaluating {name} on weather of the {renderer} ...", flush=True)
            quality[renderer][name] = evaluate(pipe, test_sets, args.tile_size, args.tile_overlap)

    timed = dict(models)
    for k in args.timing_k:
        if k != models["mofme_weather"].config.top_k:
            timed[f"mofme_weather@k{k}"] = create_model("mofme_weather", top_k=k).eval()
            timed[f"mofme_conventional_weather@k{k}"] = create_model("mofme_conventional_weather", top_k=k).eval()
    print("timing ...", flush=True)
    ms = time_models(timed, args.rounds, args.calls, args.timing_tile)
    params = {name: model.num_parameters() for name, model in timed.items()}

    E, k = models["mofme_weather"].config.num_experts, models["mofme_weather"].config.top_k
    n_photos = len(TEST_PHOTOS) * args.seeds
    conv = "mofme_conventional_weather"
    mean_psnr = {r: {name: float(np.mean([q[w][0] for w in WEATHER_TYPES])) for name, q in quality[r].items()}
                 for r in quality}
    for renderer, scores in quality.items():
        print(f"\nWeather of the {renderer}: held-out photos x {args.seeds} draws = {n_photos} images per kind; "
              f"PSNR (dB) / SSIM; E={E}, k={k}; tiles {args.tile_size}/{args.tile_overlap}; time = fastest of "
              f"{args.rounds}x{args.calls} calls, 16 tiles {args.timing_tile}x{args.timing_tile}, 1 thread.\n")
        header = "| model | " + " | ".join(WEATHER_TYPES) + " | mean PSNR | gain | params | ms / tile |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for name in ("input", *MODELS):
            q, mean = scores[name], mean_psnr[renderer][name]
            row = [LABELS.get(name, "degraded input"), *[cell(q[w]) for w in WEATHER_TYPES], f"{mean:.2f}"]
            if name == "input":
                row += ["", "", ""]
            else:
                row += [f"{mean - mean_psnr[renderer]['input']:+.2f}", f"{params[name] / 1e6:.3f} M", f"{ms[name]:.2f}"]
                if name != conv:  # relative to the conventional MoE, the paper's reference point
                    row[-2] += f" ({params[name] / params[conv] - 1:+.0%})"
                    row[-1] += f" ({ms[name] / ms[conv] - 1:+.0%})"
            print("| " + " | ".join(row) + " |")
    extra = [n for n in timed if "@" in n]
    if extra:
        print("\nTiming only (untrained, same code):\n\n| model | params | ms / tile |\n|---|---|---|")
        for name in extra:
            print(f"| {name} | {params[name] / 1e6:.3f} M | {ms[name]:.2f} |")
    print(f"\nMoFME vs conventional MoE: {1 - params['mofme_weather'] / params[conv]:.1%} fewer parameters, "
          f"{1 - ms['mofme_weather'] / ms[conv]:.1%} less time per tile.")
    for renderer, mean in mean_psnr.items():
        gains = ", ".join(f"{LABELS[n]} {mean[n] - mean['input']:+.2f} dB" for n in MODELS)
        print(f"{renderer}: mean PSNR gain over the input {gains}; MoFME - conventional "
              f"{mean['mofme_weather'] - mean[conv]:+.2f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": quality, "params": params, "ms_per_tile": ms}, indent=2))


if __name__ == "__main__":
    main()
