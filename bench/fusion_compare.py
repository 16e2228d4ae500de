"""Infrared/visible fusion on held-out pairs: MoE-Fusion against average and max fusion, every metric.

    .venv/bin/python bench/fusion_compare.py                         # synthetic pairs from the test photos
    .venv/bin/python bench/fusion_compare.py --folder data/TNO       # real pairs: data/TNO/ir + data/TNO/vis

The synthetic pairs come from the photos training never sees (``moezoo.training.datasets.photos.TEST_PHOTOS``), with a
seed of their own. Prints markdown tables: the mean of each metric over the pairs, overall and per
visible-image condition, then the model's size and its mean time per pair. One CPU thread.

Reading the table: EN, SD, SF and AG look at the fused image alone (information, contrast, detail); larger is
the literature's "better", but noise raises them too. MI and Qabf measure how much of the sources' grey
levels and edges the fused image keeps; SSIM_ir / SSIM_vis its structural similarity to each source.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from moezoo.pipelines.fusion import FusionPipeline
from moezoo.training.datasets.fusion_pairs import PairedFolderDataset, SyntheticFusionDataset, find_pairs
from moezoo.training.fusion_metrics import METRIC_NAMES, fusion_metrics

BASELINES = {
    "average fusion": lambda ir, vis: (ir + vis) / 2,
    "max fusion": np.maximum,
}


def held_out_pairs(args):
    """(group, infrared, visible) float [H, W] in [0, 1] for every evaluation pair."""
    if args.folder:
        dataset = PairedFolderDataset(find_pairs(args.folder, args.ir_dir, args.vis_dir))
        for i in range(len(dataset)):
            item = dataset[i]
            yield "folder", item["ir"][0].numpy(), item["vis"][0].numpy()
        return
    dataset = SyntheticFusionDataset("test", args.num_pairs, args.image_size, seed=args.seed)
    for i in range(len(dataset)):
        pair = dataset.pair(i)
        yield pair["degradation"], pair["ir"], pair["vis"]


def markdown_table(title: str, scores: dict[str, list[dict[str, float]]]) -> str:
    lines = [f"**{title}** ({len(next(iter(scores.values())))} pairs, mean)", "",
             "| method | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for method, rows in scores.items():
        means = [np.mean([row[m] for row in rows]) for m in METRIC_NAMES]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe_fusion_irvis", help="zoo name, name.tag or local-dir:PATH")
    parser.add_argument("--num-pairs", type=int, default=24, help="synthetic held-out pairs")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic pairs")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the synthetic pairs")
    parser.add_argument("--folder", help="evaluate real registered pairs in FOLDER/ir + FOLDER/vis instead")
    parser.add_argument("--ir-dir", default="ir")
    parser.add_argument("--vis-dir", default="vis")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    pipe = FusionPipeline.from_pretrained(args.model)
    model_label = f"MoE-Fusion ({args.model})"
    by_group: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    seconds = []
    for group, infrared, visible in tqdm(list(held_out_pairs(args)), desc="pairs"):
        start = time.perf_counter()
        outputs = {model_label: pipe(infrared, visible, output_type="np").images[0, ..., 0]}
        seconds.append(time.perf_counter() - start)
        outputs.update({name: fuse(infrared, visible) for name, fuse in BASELINES.items()})
        for method, fused in outputs.items():
            by_group[group][method].append(fusion_metrics(np.clip(fused, 0, 1), infrared, visible))

    overall: dict[str, list] = defaultdict(list)
    for group in by_group.values():
        for method, rows in group.items():
            overall[method] += rows
    size = f"{args.image_size}x{args.image_size}"
    source = f"pairs of {args.folder}" if args.folder else f"synthetic held-out pairs, {size}"
    print(markdown_table(f"All {source}", overall))
    if len(by_group) > 1:
        for group, scores in sorted(by_group.items()):
            print()
            print(markdown_table(f"Visible image: {group}", scores))
    params = sum(p.numel() for p in pipe.model.parameters())
    print(f"\n{model_label}: {params / 1e3:.1f} K parameters, {1e3 * np.mean(seconds):.1f} ms per pair "
          f"(mean of {len(seconds)}, 1 CPU thread, including input checks and clamping)")


if __name__ == "__main__":
    main()
