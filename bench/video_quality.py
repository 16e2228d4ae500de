"""Does the bundled text-to-video model draw what its caption says? Direction, colour and shape of moving shapes.

    python bench/video_quality.py                       # 96 clips, 30 steps, guidance 4, prints a markdown table
    python bench/video_quality.py --clips 48 --model local-dir:/tmp/export
    python bench/video_quality.py --quick               # ~1 minute smoke run: 12 clips, 5 steps, a small judge

What is measured
----------------
Captions: those of the first ``--clips`` clips of the held-out (validation) split of the moving-shapes data the
model was trained on (``MovingShapesDataModule`` with the training config's seed, directions only:
"a red square moving left"). Each caption is generated once, clip ``j`` with ``torch.Generator().manual_seed(j)``.

Tracking (simple image analysis, no model): in every frame, a pixel belongs to the object when its brightest
channel exceeds 0.4 (the background is black). Per frame: the centroid of those pixels (weighted by the
brightest channel), the mean colour of the pixels above 0.7 matched to the nearest of the four pure colours,
and the fill ratio = object area (summed brightness) / (width x height), the extents summing each column's
(row's) largest brightness so partly covered edges count partly, which
separates square (~1), circle (~pi/4) and triangle (~1/2). A clip's colour and shape are the majority over its
frames; its direction is the sign of the dominant axis of a least-squares line through the centroids, and
counts as moving only if the fitted path is at least 15% of the side long (the data's paths are 36-44%).
A frame without object pixels fails every check of its clip.

The tracker is checked first on real dataset clips of the same split (the "dataset" row): it must read the
ground truth there before its reading of generated clips means anything.

Shape and colour are also read by a judge, as ``bench/dit_quality.py`` reads generated pictures: a small CNN
trained here on single frames of real clips from another seed (``--judge-seed``; the generator never saw
them), checked first on held-out real frames. A clip's judged shape / colour is the class with the highest
log-probability summed over its frames. The fill ratio needs crisp edges: generated shapes come out with
softened corners (even the image model's squares fill only ~0.86 of their box, against the real squares'
1.00), so it reads many squares as circles; the judge, trained with small shifts, is the reading quoted.

Variety and fidelity, as ``bench/dit_quality.py`` measures them (``moezoo.training.generation_metrics``), on
single frames in the judge's feature space (the 512 penultimate features of its CNN): every frame of the
generated clips against every frame of as many other held-out real clips (the next ``--clips`` of the
validation split: neither the generator nor the judge trained on them). FD = Fréchet distance between the
Gaussians fitted to the two frame-feature sets; precision / recall = Kynkäänniemi et al. 2019, k = 3; diversity =
mean pairwise Euclidean feature distance between frames of one caption class (shape + colour), generated over
real, averaged over the classes. Per-frame features see appearance, not motion (the tracker's direction column
measures that). The "dataset clips" row, the real clips of the same captions, is the reference at equal counts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm.auto import tqdm

# bench/ is the script's directory: its sibling benchmark
from dit_quality import METRICS_HEADER, judge_features, metric_cells, train_judge
from moezoo.training.generation_metrics import generation_metrics
from moezoo.training.datasets.images import COLOUR_RGB, COLOURS, SHAPES
from moezoo.training.datasets.video import DIRECTIONS, MovingShapesDataset, parse_video_caption

OBJECT_THRESHOLD = 0.4
COLOUR_THRESHOLD = 0.7
MIN_TRAVEL = 0.15
# Fill ratio boundaries, halfway between the shapes' ranges on dataset frames (triangle 0.55-0.60, circle
# 0.78-0.79, square 1.00; the ideal values are 1/2, pi/4 and 1).
TRIANGLE_BELOW, SQUARE_ABOVE = 0.69, 0.89
TRAIN_CLIPS = 20000  # training/configs/dit_moe_shapes_video.yaml: the held-out split starts after these
# --quick: small sizes for a smoke run of about a minute; explicit arguments still win.
QUICK = {"clips": 12, "steps": 5, "batch_size": 12, "judge_clips": 400, "judge_epochs": 8}


def track_frame(frame_HWC: np.ndarray) -> dict | None:
    """Centroid (x, y as fractions of the side), colour name and fill ratio of the object in one frame in
    [0, 1], or None when no pixel is bright enough."""
    size = frame_HWC.shape[0]
    brightness = frame_HWC.max(axis=-1)
    mask = brightness > OBJECT_THRESHOLD
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    weights = brightness[mask]
    cx = float((cols + 0.5) @ weights / weights.sum()) / size
    cy = float((rows + 0.5) @ weights / weights.sum()) / size
    core = brightness > COLOUR_THRESHOLD
    mean_rgb = frame_HWC[core if core.any() else mask].mean(axis=0) * 255
    colour = min(COLOUR_RGB, key=lambda name: float(np.square(mean_rgb - np.array(COLOUR_RGB[name])).sum()))
    # Soft extents: a column's (row's) largest coverage counts partially covered edge columns fractionally.
    coverage = np.where(brightness > 0.05, brightness, 0.0)
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    fill = float(coverage.sum() / (width * height))
    return {"cx": cx, "cy": cy, "colour": colour, "fill": fill}


def shape_from_fill(fill: float) -> str:
    if fill < TRIANGLE_BELOW:
        return "triangle"
    return "square" if fill > SQUARE_ABOVE else "circle"


def track_clip(frames_FHWC: np.ndarray) -> dict:
    """What one clip shows: ``direction`` (or "static" / None), ``colour``, ``shape`` (None where a frame has
    no object) and the fitted ``travel`` (fraction of the side)."""
    tracks = [track_frame(frame) for frame in frames_FHWC]
    if any(t is None for t in tracks):
        return {"direction": None, "colour": None, "shape": None, "travel": 0.0}
    time_F = np.arange(len(tracks), dtype=np.float64)
    slope_x = np.polyfit(time_F, [t["cx"] for t in tracks], 1)[0]
    slope_y = np.polyfit(time_F, [t["cy"] for t in tracks], 1)[0]
    travel = float(np.hypot(slope_x, slope_y)) * (len(tracks) - 1)
    if travel < MIN_TRAVEL:
        direction = "static"
    elif abs(slope_x) >= abs(slope_y):
        direction = "right" if slope_x > 0 else "left"
    else:
        direction = "down" if slope_y > 0 else "up"
    colours = [t["colour"] for t in tracks]
    shapes = [shape_from_fill(t["fill"]) for t in tracks]
    return {"direction": direction, "colour": max(set(colours), key=colours.count),
            "shape": max(set(shapes), key=shapes.count), "travel": travel}


def score(readings: list[dict], captions: list[str]) -> dict[str, float]:
    """Shares of clips whose tracked direction / colour / shape / colour-and-shape match their caption."""
    truths = [parse_video_caption(c) for c in captions]
    direction = np.mean([r["direction"] == t["motion"] for r, t in zip(readings, truths)])
    colour = np.mean([r["colour"] == t["colour"] for r, t in zip(readings, truths)])
    shape = np.mean([r["shape"] == t["shape"] for r, t in zip(readings, truths)])
    both = np.mean([r["colour"] == t["colour"] and r["shape"] == t["shape"] for r, t in zip(readings, truths)])
    return {"direction": direction, "colour": colour, "shape": shape, "colour+shape": both}


def frames_and_targets(dataset: MovingShapesDataset) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every frame of every clip as [N, 3, H, W] in [-1, 1], with each frame's shape and colour index."""
    frames = torch.cat([dataset[i]["video"] for i in range(len(dataset))])
    attributes = [dataset.attributes(i) for i in range(len(dataset)) for _ in range(dataset.num_frames)]
    return frames, {"shape": torch.tensor([SHAPES.index(a["shape"]) for a in attributes]),
                    "colour": torch.tensor([COLOURS.index(a["colour"]) for a in attributes])}


def fit_judge(clips: int, seed: int, epochs: int):
    """A judge of shape and colour trained on the frames of ``clips`` real clips of ``seed``, and its accuracy
    on the frames of 200 held-out real clips (another seed)."""
    train = MovingShapesDataset(clips, image_size=32, num_frames=8, motions=DIRECTIONS, seed=seed)
    test = MovingShapesDataset(200, image_size=32, num_frames=8, motions=DIRECTIONS, seed=seed + 1)
    judge = train_judge(*frames_and_targets(train), epochs=epochs)
    test_frames, test_targets = frames_and_targets(test)
    with torch.no_grad():
        logits = judge(test_frames)
    held_out = {name: float((logits[name].argmax(1) == t).float().mean()) for name, t in test_targets.items()}
    return judge, held_out


@torch.no_grad()
def judge_clips(judge, clips_BFHWC: np.ndarray) -> list[dict]:
    """Per clip, the judge's shape and colour: the classes of highest log-probability summed over frames."""
    readings = []
    for clip in clips_BFHWC:
        frames = torch.from_numpy(np.ascontiguousarray(clip)).float().permute(0, 3, 1, 2) * 2 - 1
        logits = judge(frames)
        shape = SHAPES[int(logits["shape"].log_softmax(-1).sum(0).argmax())]
        colour = COLOURS[int(logits["colour"].log_softmax(-1).sum(0).argmax())]
        readings.append({"shape": shape, "colour": colour})
    return readings


def held_out_clips(count: int, seed: int, skip: int = 0) -> MovingShapesDataset:
    """``count`` clips of the validation split, after its first ``skip``."""
    return MovingShapesDataset(count, image_size=32, num_frames=8, motions=DIRECTIONS, seed=seed,
                               first_index=TRAIN_CLIPS + skip)


def clip_frames(clips_BFHWC: np.ndarray) -> torch.Tensor:
    """Every frame of clips [B, F, H, W, C] in [0, 1] as the judge's input [B * F, C, H, W] in [-1, 1]."""
    frames = torch.from_numpy(np.ascontiguousarray(clips_BFHWC)).float().flatten(0, 1)
    return frames.permute(0, 3, 1, 2) * 2 - 1


def frame_classes(captions: list[str], frames_per_clip: int) -> list[str]:
    """Each frame's class for the within-class diversity: its clip's caption's colour and shape."""
    classes = [f"{t['colour']} {t['shape']}" for t in map(parse_video_caption, captions)]
    return [c for c in classes for _ in range(frames_per_clip)]


def generate(model_name: str, captions: list[str], steps: int, guidance: float, batch_size: int) -> np.ndarray:
    from moezoo.pipelines.dit_moe_video import DiTMoEVideoPipeline

    pipe = DiTMoEVideoPipeline.from_pretrained(model_name)
    pipe.set_progress_bar_config(disable=True)
    clips = []
    for start in tqdm(range(0, len(captions), batch_size), desc="generating", unit="batch"):
        prompts = captions[start:start + batch_size]
        generators = [torch.Generator().manual_seed(start + j) for j in range(len(prompts))]
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="np")
        clips.append(out.frames)
    return np.concatenate(clips)


def breakdown(readings: list[dict], captions: list[str], key: str, values: tuple[str, ...],
              caption_key: str | None = None) -> str:
    """Accuracy of ``key`` per true value, e.g. "circle 9% of 11, square 0% of 18" (``caption_key``: the
    caption attribute the reading is compared with, if named differently)."""
    truths = [parse_video_caption(c)[caption_key or key] for c in captions]
    parts = []
    for value in values:
        hits = [r[key] == value for r, t in zip(readings, truths) if t == value]
        if hits:
            parts.append(f"{value} {np.mean(hits):.0%} of {len(hits)}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dit_moe_shapes_video", help="zoo name, name.tag or local-dir:PATH")
    parser.add_argument("--clips", type=int, default=96, help="held-out captions to generate")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the data seed of the training config")
    parser.add_argument("--judge-seed", type=int, default=1, help="data seed of the judge's real clips")
    parser.add_argument("--judge-clips", type=int, default=1500, help="real clips the judge trains on (8 frames each)")
    parser.add_argument("--judge-epochs", type=int, default=15)
    parser.add_argument("--save", default=None, help="write the generated clips to this .npz")
    parser.add_argument("--load", default=None, help="score the clips of this .npz (from --save) instead of generating")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    if parser.parse_known_args(argv)[0].quick:  # a first pass, so the quick sizes become mere defaults
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import moezoo.zoo.models  # noqa: F401  registers the video models

    dataset = held_out_clips(args.clips, args.seed)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    real_clips = np.stack([dataset.render(i).astype(np.float32) / 255 for i in range(len(dataset))])
    judge, judge_held_out = fit_judge(args.judge_clips, args.judge_seed, args.judge_epochs)
    print(f"judge: trained on the frames of {args.judge_clips} real clips (seed {args.judge_seed}); on held-out real "
          f"frames: shape {judge_held_out['shape']:.1%}, colour {judge_held_out['colour']:.1%}")
    # The real frames the variety and fidelity columns compare with: the next --clips clips of the split.
    reference = held_out_clips(args.clips, args.seed, skip=args.clips)
    reference_clips = np.stack([reference.render(i).astype(np.float32) / 255 for i in range(len(reference))])
    reference_captions = [reference[i]["caption"] for i in range(len(reference))]
    reference_features = judge_features(judge, clip_frames(reference_clips))
    reference_classes = frame_classes(reference_captions, reference_clips.shape[1])

    started = time.perf_counter()
    if args.load:
        saved = np.load(args.load)
        if list(saved["captions"]) != captions:
            raise ValueError(f"{args.load} holds clips for other captions than --clips {args.clips} --seed {args.seed}")
        frames, how = saved["frames"], f"clips loaded from {args.load}"
    else:
        frames = generate(args.model, captions, args.steps, args.guidance, args.batch_size)
        how = f"generation {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} thread(s)"
    if args.save:
        np.savez_compressed(args.save, frames=frames, captions=np.array(captions))

    print(f"\n{args.clips} held-out captions, {args.steps} flow-match Euler steps, guidance {args.guidance}, "
          f"8 frames of 32x32; {how}; FD, precision, recall (k = 3) and diversity on frames in the judge's "
          f"features against the {len(reference_clips) * reference_clips.shape[1]} frames of {len(reference_clips)} "
          f"other held-out real clips\n")
    print("| clips | direction (tracker) | colour (judge) | shape (judge) | colour + shape (judge) "
          f"| colour (fill tracker) | shape (fill tracker) | {METRICS_HEADER} |")
    print("|---|---|---|---|---|---|---|---:|---:|---:|---:|")
    rows = (("dataset clips (reader check)", real_clips), (f"generated by {args.model}", frames))
    for name, clips in rows:  # after the loop, tracked / judged are the generated clips' readings
        tracked, judged = [track_clip(c) for c in clips], judge_clips(judge, clips)
        by_tracker = score(tracked, captions)
        by_judge = score([{**r, "direction": None} for r in judged], captions)
        metrics = generation_metrics(reference_features, reference_classes, judge_features(judge, clip_frames(clips)),
                                     frame_classes(captions, clips.shape[1]))
        print(f"| {name} | {by_tracker['direction']:.1%} | {by_judge['colour']:.1%} | {by_judge['shape']:.1%} | "
              f"{by_judge['colour+shape']:.1%} | {by_tracker['colour']:.1%} | {by_tracker['shape']:.1%} | "
              f"{metric_cells(metrics)} |")
    static = sum(r["direction"] in ("static", None) for r in tracked)
    print(f"\ngenerated: {static} clip(s) without a detected motion of >= {MIN_TRAVEL:.0%} of the side; "
          f"by shape, judge: {breakdown(judged, captions, 'shape', SHAPES)}; "
          f"fill tracker: {breakdown(tracked, captions, 'shape', SHAPES)}; "
          f"by direction: {breakdown(tracked, captions, 'direction', DIRECTIONS, 'motion')}")


if __name__ == "__main__":
    main()
