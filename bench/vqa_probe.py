"""Where a multimodal LM's scene answers fail: accuracy per question wording (which extreme, which relation) and
the yes/no confusion of the existence questions, on test scenes no training used.

    python bench/vqa_probe.py local-dir:runs/moe_vlm_dense/export [more sources] --per-kind 120
    python bench/vqa_probe.py local-dir:runs/moe_vlm_text/export --text --kinds exists   # stage 1's LM on captions

Each source is scored on the same ``--per-kind`` test scenes per kind (``SceneQADataset("test", ...)``, greedy
answers), one thread unless ``--threads``. ``--text`` asks as stage 1 trains: the scene's caption written before
the question, no picture. Existence questions are split by what the scene holds: the pair itself, its colour on
another shape (the case that needs colour and shape bound together), or not its colour at all.

For "closest to" / "furthest from" the probe also reports a shortcut that needs no distances: answer the shape most
of the other objects have (``majority_other_shape``). On test scenes it is right about 70% of the time; a model
that learnt it agrees with it even where it is wrong.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from moezoo.training.datasets.scenes import SceneQADataset, caption_pairs, majority_other_shape
from moezoo.zoo import create_model

KINDS = ("shape", "colour", "count", "relation", "exists")


def wording(item: dict) -> str:
    """The part of the question that picks what to compare: the extreme or the relation."""
    words = item["prompt"].rstrip("?").split()
    if item["kind"] == "colour":
        return words[4]  # what colour is the <leftmost> object
    if item["kind"] == "relation":
        return "left of" if "left" in words else " ".join(words[5:7])  # the object <closest to> the ...
    if item["kind"] == "exists":  # is there a <colour> <shape>
        pairs = caption_pairs(item["caption"])
        if (words[-2], words[-1]) in pairs:
            return "pair present"
        return "colour on another shape" if words[-2] in {c for c, _ in pairs} else "colour absent"
    return ""


def shortcut_answer(item: dict, objects: list) -> str:
    """:func:`majority_other_shape` for the object the question names (... the <colour> object?)."""
    colour = item["prompt"].rstrip("?").split()[-2]
    return majority_other_shape(next(o for o in objects if o.colour == colour), objects)


def distance_kind(item: dict) -> bool:
    return item["kind"] == "relation" and wording(item) in ("closest to", "furthest from")


def probe(source: str, items: list[dict], scenes: list[list], text: bool = False,
          batch: int = 60) -> tuple[Counter, Counter, Counter, Counter]:
    model = create_model(source, pretrained=True).eval()
    right, total, exists, shortcut = Counter(), Counter(), Counter(), Counter()
    with torch.no_grad():
        for start in range(0, len(items), batch):
            rows, objects = items[start:start + batch], scenes[start:start + batch]
            if text:
                out = model.generate(None, None, [f"{r['caption']}. {r['prompt']}" for r in rows])
            else:
                out = model.generate(torch.stack([r["image"] for r in rows]), None, [r["prompt"] for r in rows])
            for row, answer, row_objects in zip(rows, out.text, objects):
                key = (row["kind"], wording(row))
                total[key] += 1
                right[key] += answer == row["answer"]
                if row["kind"] == "exists":
                    exists[(row["answer"], answer)] += 1
                if distance_kind(row):
                    guess = shortcut_answer(row, row_objects)
                    case = "shortcut right" if guess == row["answer"] else "shortcut wrong"
                    shortcut[case, "questions"] += 1
                    shortcut[case, "model right"] += answer == row["answer"]
                    shortcut[case, "model = shortcut"] += answer == guess
    return right, total, exists, shortcut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="zoo name or local-dir:PATH of a MoE-VLM export")
    parser.add_argument("--per-kind", type=int, default=120)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, in the order items cycle through")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", action="store_true", help="the caption in the prompt instead of the picture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    data = SceneQADataset("test", args.per_kind * len(kinds), kinds=kinds)
    items = [data[i] for i in range(len(data))]
    scenes = [data.scene(i)[0] for i in range(len(data))]
    for source in args.sources:
        right, total, exists, shortcut = probe(source, items, scenes, args.text)
        print(f"\n{source}\n\n| kind | wording | questions | accuracy |\n|---|---|---:|---:|")
        for key in sorted(total):
            print(f"| {key[0]} | {key[1] or '-'} | {total[key]} | {right[key] / total[key]:.2f} |")
        print("existence (truth -> answer): " + ", ".join(f"{t} -> {a}: {n}" for (t, a), n in sorted(exists.items())))
        if shortcut:
            cases = [f"{case} ({shortcut[case, 'questions']}): model right {shortcut[case, 'model right']}, "
                     f"model = shortcut {shortcut[case, 'model = shortcut']}"
                     for case in ("shortcut right", "shortcut wrong")]
            print("closest / furthest against the majority-shape shortcut: " + "; ".join(cases))


if __name__ == "__main__":
    main()
