"""Quality of the bundled DiT-MoE image models, judged by classifiers trained on real data only.

    python bench/dit_quality.py digits     # dit_moe_digits vs dit_dense_digits: label accuracy, ms/image
    python bench/dit_quality.py shapes     # dit_moe_shapes: prompted shape+colour (and position) accuracy
    python bench/dit_quality.py all
    python bench/dit_quality.py all --quick   # a ~1 minute smoke run (5 per digit, 60 prompts, 5 steps)
    python bench/dit_quality.py sweep      # the digits and shapes models over samplers x steps x guidance:
                                           # choosing defaults (--digits-models / --shapes-models with no
                                           # names skip a family; --guidances / --shapes-guidances per family)

How: a small CNN ("the judge") is trained here on real pictures — scikit-learn's digits (the generator's
training split) or freshly rendered shapes from a different seed than the generator saw — and its accuracy
on held-out real pictures is printed first, so you can see how far to trust it. Then each model generates
images for given labels / prompts and the judge says whether they show what was asked for, by default at each
model's pipeline defaults (the sampling its metadata recommends; --steps, --guidance, --shapes-guidance override
them). Sampling time is the wall-clock of the pipeline call divided by the number of images, in one run for
every model.

Variety and fidelity (``moezoo.training.generation_metrics``), in the judge's feature space: the 512 features
its CNN trunk feeds to the heads (the penultimate layer), of generated images and of held-out real images the
judge never trained on — for digits the validation split (the generator did not train on it either), for shapes
as many fresh renders (seed 4) as there are prompts. Columns: FD = Fréchet distance between
Gaussians fitted to the two feature sets; precision / recall = Kynkäänniemi et al. 2019 with k = 3 (share of
generated images inside the real manifold / of real images inside the generated one); diversity = mean pairwise
Euclidean feature distance within each class (digit; shape + colour), generated over real, averaged over the
classes. FD and recall depend on the sample counts, so a real reference row is measured at the same counts,
real pictures for the same labels / prompts (what a perfect generator would draw): as many training digits per
class (the judge did train on these) or the prompts' own renders (seed 3). Compare rows of one table only.

Evaluate your own run's export with ``--model dit_moe_digits=local-dir:PATH``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from moezoo.pipelines import DiTMoEPipeline
from moezoo.training.datamodules.images import DigitsDataModule
from moezoo.training.datasets.images import COLOURS, POSITIONS, SHAPES, ShapesDataset, label_for, parse_caption
from moezoo.training.generation_metrics import generation_metrics

# --quick: every size argument small, for a smoke run of about a minute; explicit arguments still win.
QUICK = {"samples_per_class": 5, "prompts": 60, "steps": 5, "judge_epochs": 8, "judge_train": 3000}
# The variety and fidelity columns, after the accuracy columns of each table.
METRICS_HEADER = "FD | precision | recall | diversity gen / real"


class Judge(nn.Module):
    """A small CNN with one linear head per attribute."""

    def __init__(self, in_channels: int, head_sizes: dict[str, int]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(512, size) for name, size in head_sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


def train_judge(images: torch.Tensor, targets: dict[str, torch.Tensor], epochs: int, seed: int = 0) -> Judge:
    """Fit a Judge on real images [N, C, H, W] in [-1, 1] with integer targets per head."""
    torch.manual_seed(seed)
    judge = Judge(images.shape[1], {name: int(t.max()) + 1 for name, t in targets.items()})
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    n = len(images)
    for _ in tqdm(range(epochs), desc="training the judge", leave=False):
        order = torch.randperm(n)
        for start in range(0, n, 128):
            idx = order[start : start + 128]
            # Small random shifts so the judge does not depend on pixel-exact placement.
            batch = torch.roll(images[idx], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            logits = judge(batch)
            loss = sum(F.cross_entropy(logits[name], t[idx]) for name, t in targets.items())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


@torch.no_grad()
def judge_features(judge: Judge, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The judge's penultimate features [N, 512] of images [N, C, H, W] in [-1, 1] (the input of its heads)."""
    return torch.cat([judge.features(images[start:start + batch]) for start in range(0, len(images), batch)])


def metric_cells(metrics: dict[str, float]) -> str:
    """The table cells of :data:`METRICS_HEADER`."""
    return (f"{metrics['fd']:.2f} | {metrics['precision']:.1%} | {metrics['recall']:.1%} | "
            f"{metrics['diversity_ratio']:.2f}")


def measure(judge: Judge, real_features: torch.Tensor, real_labels, images: torch.Tensor, labels) -> dict[str, float]:
    """FD, precision, recall and diversity ratio of ``images`` (classes ``labels``) against the real features."""
    return generation_metrics(real_features, real_labels, judge_features(judge, images), labels)


@torch.no_grad()
def judge_accuracy(judge: Judge, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per head, the share of images judged as their target; "all" = every head right at once."""
    logits = judge(images)
    right = {name: logits[name].argmax(1) == t for name, t in targets.items()}
    scores = {name: float(r.float().mean()) for name, r in right.items()}
    scores["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    return scores


def generate(pipe: DiTMoEPipeline, steps: int, guidance: float, batch: int, seed: int, **conditions):
    """Images [N, C, H, W] in [-1, 1] for every label / prompt, in batches; and the seconds per image."""
    (key, values), = conditions.items()
    chunks, seconds = [], 0.0
    for start in tqdm(range(0, len(values), batch), desc="sampling", leave=False):
        part = values[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        began = time.perf_counter()
        out = pipe(**{key: part}, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="pt")
        seconds += time.perf_counter() - began
        chunks.append(out.images * 2 - 1)
    return torch.cat(chunks), seconds / len(values)


def load_pipeline(name: str, sources: dict[str, str], scheduler: str | None = None) -> DiTMoEPipeline:
    pipe = DiTMoEPipeline.from_pretrained(sources.get(name, name), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULER_NAMES = {"FlowMatchEulerDiscreteScheduler": "Euler", "FlowMatchHeunDiscreteScheduler": "Heun",
                   "DDIMScheduler": "DDIM", "DDPMScheduler": "DDPM"}


def sampling_of(pipe: DiTMoEPipeline, steps: int | None, guidance: float | None) -> tuple[int, float, str]:
    """The steps and guidance a run uses (None: the pipeline's default for the model), and a table cell."""
    steps = pipe.default_num_inference_steps if steps is None else steps
    guidance = pipe.default_guidance_scale if guidance is None else guidance
    scheduler = type(pipe.scheduler).__name__
    return steps, guidance, f"{SCHEDULER_NAMES.get(scheduler, scheduler)}, {steps} steps, guidance {guidance:g}"


def digits_judge(args):
    """The digits judge, trained on the generator's training split, and the real data it is measured on."""
    data = DigitsDataModule(image_size=16, val_fraction=0.1, seed=0)
    data.setup()
    real = {split: (ds.images_N1HW, torch.tensor(ds.labels)) for split, ds in
            (("train", data.train_set), ("val", data.val_set))}
    judge = train_judge(real["train"][0], {"digit": real["train"][1]}, epochs=args.judge_epochs)
    print(f"judge: trained on {len(real['train'][1])} real digits; accuracy on {len(real['val'][1])} held-out real "
          f"digits: {judge_accuracy(judge, real['val'][0], {'digit': real['val'][1]})['digit']:.1%}\n")
    return judge, real, judge_features(judge, real["val"][0])


def bench_digits(args, sources: dict[str, str]) -> None:
    judge, real, real_features = digits_judge(args)

    labels = [d for d in range(10) for _ in range(args.samples_per_class)]
    # The reference row: as many training digits per class as generated ones (a generator that copied its
    # training set would score about this).
    train_images, train_labels = real["train"]
    copied = torch.cat([torch.nonzero(train_labels == d).flatten()[:args.samples_per_class] for d in range(10)])
    rows = [("real training digits (the judge trained on these)", None, None, "—",
             judge_accuracy(judge, train_images[copied], {"digit": train_labels[copied]})["digit"],
             measure(judge, real_features, real["val"][1], train_images[copied], train_labels[copied]), None)]
    for name in args.digits_models:
        pipe = load_pipeline(name, sources)
        steps, guidance, sampling = sampling_of(pipe, args.steps, args.guidance)
        images, seconds = generate(pipe, steps, guidance, args.batch, args.seed, class_labels=labels)
        accuracy = judge_accuracy(judge, images, {"digit": torch.tensor(labels)})["digit"]
        model = pipe.transformer
        rows.append((name, model.num_parameters() / 1e6, model.num_parameters(active=True) / 1e6, sampling,
                     accuracy, measure(judge, real_features, real["val"][1], images, labels), seconds * 1e3))
    print(f"{len(labels)} samples ({args.samples_per_class} per digit), fp32, 1 thread; FD, precision, recall "
          f"(k = 3) and diversity in the judge's features against the {len(real['val'][1])} held-out real digits\n")
    print(f"| model | params (M) | active (M) | sampling | generated digits judged as their label | {METRICS_HEADER} "
          "| ms / image |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, total, active, sampling, accuracy, metrics, ms in rows:
        sizes = "— | —" if total is None else f"{total:.2f} | {active:.2f}"
        print(f"| {name} | {sizes} | {sampling} | {accuracy:.1%} | {metric_cells(metrics)} | "
              f"{'—' if ms is None else f'{ms:.1f}'} |")
    print()


def sweep_digits(args, sources: dict[str, str]) -> None:
    """Every digits model at every sampler x steps x guidance: accuracy, variety and fidelity, time."""
    judge, real, real_features = digits_judge(args)
    labels = [d for d in range(10) for _ in range(args.samples_per_class)]
    print(f"{len(labels)} samples ({args.samples_per_class} per digit) per setting, fp32, 1 thread; FD, precision, "
          f"recall (k = 3) and diversity against the {len(real['val'][1])} held-out real digits\n")
    print(f"| model | sampler | steps | guidance | judged as their label | {METRICS_HEADER} | ms / image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.digits_models:
        for sampler in args.samplers:
            pipe = load_pipeline(name, sources, sampler)
            for steps in args.step_counts:
                for guidance in args.guidances:
                    images, seconds = generate(pipe, steps, guidance, args.batch, args.seed, class_labels=labels)
                    accuracy = judge_accuracy(judge, images, {"digit": torch.tensor(labels)})["digit"]
                    metrics = measure(judge, real_features, real["val"][1], images, labels)
                    print(f"| {name} | {sampler} | {steps} | {guidance:g} | {accuracy:.1%} | {metric_cells(metrics)} "
                          f"| {seconds * 1e3:.1f} |", flush=True)
    print()


def shape_targets(attributes: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([SHAPES.index(a["shape"]) for a in attributes]),
        "colour": torch.tensor([COLOURS.index(a["colour"]) for a in attributes]),
        "position": torch.tensor([POSITIONS.index(a["position"]) for a in attributes]),
    }


def shapes_judge(args):
    """The shapes judge (trained on renders of seed 1, tested on seed 2), the prompts (captions of seed 3), and a
    ``score(images)`` that returns per attribute the share judged right, "shape + colour", and the metrics."""
    # The judge sees renders from seeds the generator never trained on (it trained on seed 0).
    train = ShapesDataset(args.judge_train, image_size=32, seed=1)
    test = ShapesDataset(1000, image_size=32, seed=2)

    def real(dataset):
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        return images, shape_targets([dataset.attributes(i) for i in range(len(dataset))])

    (train_x, train_t), (test_x, test_t) = real(train), real(test)
    judge = train_judge(train_x, train_t, epochs=args.judge_epochs)
    held_out = judge_accuracy(judge, test_x, test_t)
    print(f"judge: trained on {len(train)} real renders; on {len(test)} held-out renders: shape "
          f"{held_out['shape']:.1%}, colour {held_out['colour']:.1%}, position {held_out['position']:.1%}\n")

    # Held-out real set: as many fresh renders of seed 4 (the judge trained on seed 1 and was tested on seed 2).
    # Reference row: the prompts' own real renders (seed 3), what a perfect generator would draw for them.
    prompts_from = ShapesDataset(args.prompts, image_size=32, seed=3)
    prompts = [prompts_from[i]["caption"] for i in range(args.prompts)]
    targets = shape_targets([parse_caption(p) for p in prompts])
    classes = [label_for(parse_caption(p)) for p in prompts]  # shape + colour, 12 classes
    (prompt_x, _), (fresh_x, fresh_t) = real(prompts_from), real(ShapesDataset(args.prompts, image_size=32, seed=4))
    real_features = judge_features(judge, fresh_x)
    real_classes = (fresh_t["shape"] * len(COLOURS) + fresh_t["colour"]).tolist()  # label_for's numbering

    def score(images: torch.Tensor) -> dict:
        with torch.no_grad():
            logits = judge(images)
        right = {k: logits[k].argmax(1) == t for k, t in targets.items()}
        scores = {k: float(r.float().mean()) for k, r in right.items()}
        scores["shape + colour"] = float((right["shape"] & right["colour"]).float().mean())
        scores["metrics"] = measure(judge, real_features, real_classes, images, classes)
        return scores

    return prompts, prompt_x, score


def bench_shapes(args, sources: dict[str, str]) -> None:
    prompts, prompt_x, score = shapes_judge(args)
    print(f"{len(prompts)} prompts, e.g. {prompts[0]!r}; fp32, 1 thread; FD, precision, recall (k = 3) and "
          f"diversity in the judge's features against {len(prompts)} fresh real renders (seed 4)\n")
    print(f"| model | sampling | shape | colour | shape + colour | position | {METRICS_HEADER} | ms / image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(name: str, sampling: str, images: torch.Tensor, ms: str) -> None:
        s = score(images)
        print(f"| {name} | {sampling} | {s['shape']:.1%} | {s['colour']:.1%} | {s['shape + colour']:.1%} | "
              f"{s['position']:.1%} | {metric_cells(s['metrics'])} | {ms} |")

    row("real renders of the prompts (reference)", "—", prompt_x, "—")
    for name in args.shapes_models:
        pipe = load_pipeline(name, sources)
        steps, guidance, sampling = sampling_of(pipe, args.steps, args.shapes_guidance)
        images, seconds = generate(pipe, steps, guidance, args.batch, args.seed, prompt=prompts)
        row(name, sampling, images, f"{seconds * 1e3:.1f}")
    print()


def sweep_shapes(args, sources: dict[str, str]) -> None:
    """Every shapes model at every sampler x steps x guidance (``--shapes-guidances``): accuracy, variety and
    fidelity, time."""
    prompts, prompt_x, score = shapes_judge(args)
    print(f"{len(prompts)} prompts per setting, fp32, 1 thread; FD, precision, recall (k = 3) and diversity against "
          f"{len(prompts)} fresh real renders (seed 4)\n")
    print(f"| model | sampler | steps | guidance | shape + colour | shape | colour | position | {METRICS_HEADER} "
          "| ms / image |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    s = score(prompt_x)  # what a perfect generator scores at these counts
    print(f"| real renders of the prompts (reference) | — | — | — | {s['shape + colour']:.1%} | {s['shape']:.1%} | "
          f"{s['colour']:.1%} | {s['position']:.1%} | {metric_cells(s['metrics'])} | — |", flush=True)
    for name in args.shapes_models:
        for sampler in args.samplers:
            pipe = load_pipeline(name, sources, sampler)
            for steps in args.step_counts:
                for guidance in args.shapes_guidances:
                    images, seconds = generate(pipe, steps, guidance, args.batch, args.seed, prompt=prompts)
                    s = score(images)
                    print(f"| {name} | {sampler} | {steps} | {guidance:g} | {s['shape + colour']:.1%} | "
                          f"{s['shape']:.1%} | {s['colour']:.1%} | {s['position']:.1%} | {metric_cells(s['metrics'])} "
                          f"| {seconds * 1e3:.1f} |", flush=True)
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("digits", "shapes", "all", "sweep"))
    parser.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                        help="load NAME from SOURCE (e.g. local-dir:runs/export) instead of its bundled weights")
    parser.add_argument("--digits-models", nargs="*", default=["dit_moe_digits", "dit_dense_digits"])
    parser.add_argument("--shapes-models", nargs="*", default=["dit_moe_shapes"])
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--steps", type=int, default=None,
                        help="digits, shapes, all: denoising steps (default: each model's pipeline default)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="digits, all: the digits models' guidance (default: each model's pipeline default)")
    parser.add_argument("--shapes-guidance", type=float, default=None,
                        help="shapes, all: the shapes models' guidance (default: each model's pipeline default)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--judge-epochs", type=int, default=15)
    parser.add_argument("--judge-train", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=["flow_match_euler", "flow_match_heun"], help="sweep")
    parser.add_argument("--step-counts", nargs="+", type=int, default=[10, 25, 50], help="sweep")
    parser.add_argument("--guidances", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0, 4.0],
                        help="sweep: the digits models' guidance scales")
    parser.add_argument("--shapes-guidances", nargs="+", type=float, default=[2.0, 3.0, 4.0, 5.0, 6.0],
                        help="sweep: the shapes models' guidance scales")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    if parser.parse_known_args(argv)[0].quick:  # a first pass, so the quick sizes become mere defaults
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    sources = {}
    for item in args.model:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            parser.error(f"--model takes NAME=SOURCE, got {item!r}")
        sources[name] = source
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    if args.task in ("digits", "all", "sweep") and not args.digits_models:
        print("no --digits-models: the digits models are skipped\n")
    if args.task in ("shapes", "all", "sweep") and not args.shapes_models:
        print("no --shapes-models: the shapes models are skipped\n")
    if args.task in ("digits", "all") and args.digits_models:
        bench_digits(args, sources)
    if args.task in ("shapes", "all") and args.shapes_models:
        bench_shapes(args, sources)
    if args.task == "sweep" and args.digits_models:
        sweep_digits(args, sources)
    if args.task == "sweep" and args.shapes_models:
        sweep_shapes(args, sources)


if __name__ == "__main__":
    main()
