"""The VQA scenes: every answer checked against the rendered picture itself (objects found by colour in the
pixels, their shape from how much of the bounding box they fill, their position from the pixel centroid), not
against the scene description the questions were made from."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from moezoo.training.datasets.scenes import (COUNT_WORDS, EXTREMES, HELD_OUT_PAIRS, QUESTION_TYPES, SCENE_COLOURS,
                                             allowed_pairs, ask, render_scene, sample_scene, scene_caption, scene_rng)

IMAGE_SIZE = 64


def read_picture(image: np.ndarray) -> dict[str, dict]:
    """colour -> {shape, x, y} read from the pixels: the pixels near a colour (antialiased edges excluded), one
    connected blob; shape by fill ratio of its bounding box (square 1, circle pi/4, triangle 1/2)."""
    found = {}
    for colour, rgb in SCENE_COLOURS.items():
        mask = np.abs(image.astype(int) - np.asarray(rgb)).max(-1) < 40
        if mask.sum() == 0:
            continue
        labels, count = ndimage.label(mask)
        assert count == 1, f"{colour}: {count} blobs"
        rows, cols = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        found[colour] = dict(shape=shape, x=cols.mean() / IMAGE_SIZE, y=rows.mean() / IMAGE_SIZE)
    return found


def item_pixels(item: dict) -> np.ndarray:
    """A dataset item's image back as the uint8 [H, W, 3] picture it was made from."""
    return np.round((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def answer_from_picture(question: str, seen: dict[str, dict]) -> str:
    words = question.rstrip("?").split()
    if question.startswith("what shape is the object"):
        anchor = seen[words[-2]]
        others = [(math.dist((anchor["x"], anchor["y"]), (o["x"], o["y"])), o["shape"]) for c, o in seen.items()
                  if o is not anchor]
        return (min if "closest" in question else max)(others)[1]
    if question.startswith("what shape is the"):
        return seen[words[4]]["shape"]
    if question.startswith("what colour is the"):
        axis, sign = EXTREMES[words[4]]
        return max(seen, key=lambda c: sign * (seen[c]["x"], seen[c]["y"])[axis])
    if question.startswith("how many"):
        kind = words[2][:-1]
        return COUNT_WORDS[sum(kind in ("object", o["shape"]) for o in seen.values())]
    if question.startswith("is there"):
        colour, shape = words[-2], words[-1]
        return "yes" if colour in seen and seen[colour]["shape"] == shape else "no"
    if question.startswith("is the "):
        return "yes" if seen[words[2]]["x"] < seen[words[7]]["x"] else "no"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_every_answer_is_what_the_picture_shows(split):
    asked = {kind: 0 for kind in QUESTION_TYPES}
    for index in range(60):
        rng = scene_rng(split, 0, index)
        objects = sample_scene(rng, split)
        seen = read_picture(render_scene(objects, IMAGE_SIZE))
        assert sorted(seen) == sorted(o.colour for o in objects)  # distinct colours, none hidden
        for kind in QUESTION_TYPES:
            for _ in range(3):
                qa = ask(objects, kind, rng, split)
                assert qa.answer == answer_from_picture(qa.question, seen), (index, qa, seen)
                asked[kind] += 1
    assert min(asked.values()) == 180


def test_held_out_pairs_never_appear_in_training_and_always_in_their_split():
    for index in range(300):
        train = sample_scene(scene_rng("train", 0, index), "train")
        held = sample_scene(scene_rng("held_out", 0, index), "held_out")
        assert not {(o.colour, o.shape) for o in train} & set(HELD_OUT_PAIRS)
        assert {(o.colour, o.shape) for o in held} & set(HELD_OUT_PAIRS)
    train_pairs = set(allowed_pairs("train"))
    assert {c for c, _ in train_pairs} == set(SCENE_COLOURS) and len(train_pairs) == 18 - len(HELD_OUT_PAIRS)
    rng = np.random.default_rng(0)
    questions = [ask(sample_scene(rng), "exists", rng).question for _ in range(300)]
    assert not any(f"{c} {s}?" in q for q in questions for c, s in HELD_OUT_PAIRS)


def test_object_counts_cover_two_to_six_and_scenes_are_reproducible():
    counts = {len(sample_scene(scene_rng("train", 0, i))) for i in range(200)}
    assert counts == {2, 3, 4, 5, 6}
    first = sample_scene(scene_rng("val", 5, 17), "val")
    assert sample_scene(scene_rng("val", 5, 17), "val") == first
    assert sample_scene(scene_rng("test", 5, 17), "test") != first


def test_caption_lists_objects_left_to_right_with_articles():
    rng = np.random.default_rng(3)
    objects = sample_scene(rng, num_objects=3)
    caption = scene_caption(objects)
    ordered = sorted(objects, key=lambda o: o.cx)
    for o in ordered:
        assert f"{o.colour} {o.shape}" in caption
    positions = [caption.index(f"{o.colour} {o.shape}") for o in ordered]
    assert positions == sorted(positions) and " and " in caption
    with_orange = [replace(objects[0], colour="orange"), *objects[1:]]
    assert "an orange" in scene_caption(with_orange) and "a orange" not in scene_caption(with_orange)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="tain"), "unknown scene split"), (dict(num_objects=7), "num_objects must be in"),
])
def test_bad_arguments_say_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_scene(np.random.default_rng(0), **kwargs)


def test_qa_dataset_items_are_reproducible_balanced_and_read_right():
    from moezoo.training.datasets.scenes import ANSWER_KINDS, CAPTION_PROMPT, SceneQADataset

    data = SceneQADataset("held_out", num_scenes=12, seed=4, image_size=IMAGE_SIZE)
    kinds = [data[i]["kind"] for i in range(len(data))]
    assert kinds == [ANSWER_KINDS[i % len(ANSWER_KINDS)] for i in range(12)]
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and -1 <= item["image"].min() < item["image"].max() <= 1
        picture = item_pixels(item)
        seen = read_picture(picture)
        if item["kind"] == "caption":
            assert item["prompt"] == CAPTION_PROMPT
            assert sorted(item["answer"].replace(" and ", ", ").split(", ")) == sorted(
                f"{'an' if c == 'orange' else 'a'} {c} {o['shape']}" for c, o in seen.items())
        else:
            assert item["answer"] == answer_from_picture(item["prompt"], seen)
        again = data[i]
        assert again["prompt"] == item["prompt"] and torch.equal(again["image"], item["image"])
    with pytest.raises(ValueError, match="unknown or no question kinds"):
        SceneQADataset(kinds=["colour", "size"])
    with pytest.raises(IndexError):
        data[12]


def test_caption_f1_by_hand():
    from moezoo.training.datasets.scenes import caption_f1, caption_pairs

    assert caption_pairs("a red circle, an orange square and a gray triangle") == [
        ("red", "circle"), ("orange", "square"), ("gray", "triangle")]
    assert caption_f1("a red circle and a blue square", "a red circle and a blue square") == 1.0
    # 1 of 2 predicted pairs right, 1 of 3 true pairs found: P 1/2, R 1/3, F1 = 2PR/(P+R) = 0.4
    assert caption_f1("a red circle and a blue circle", "a red circle, a blue square and a gray triangle") == \
        pytest.approx(0.4)
    assert caption_f1("nothing here", "a red circle") == 0.0
    assert caption_f1("", "") == 1.0


def test_items_carry_their_scene_caption():
    from moezoo.training.datasets.scenes import SceneQADataset, scene_caption

    data = SceneQADataset("val", 6)
    for i in range(6):
        objects, _ = data.scene(i)
        assert data[i]["caption"] == scene_caption(objects)


def test_several_questions_per_scene_ask_every_kind_of_one_picture_and_read_right():
    """questions_per_scene = len(kinds): each scene is asked every kind, its questions differ, every answer is read
    right from the pixels, the first question is the one-question dataset's, and the kept scenes give the very
    same items as scenes made afresh."""
    from moezoo.training.datasets.scenes import ANSWER_KINDS, SceneQADataset

    q = len(ANSWER_KINDS)
    fresh = SceneQADataset("train", num_scenes=4, seed=2, questions_per_scene=q)
    kept = SceneQADataset("train", num_scenes=4, seed=2, questions_per_scene=q, cache_scenes=True)
    single = SceneQADataset("train", num_scenes=4, seed=2)
    assert len(fresh) == 4 * q
    for scene in range(4):
        items = [kept[scene * q + j] for j in range(q)]
        assert sorted(item["kind"] for item in items) == sorted(ANSWER_KINDS)
        assert all(torch.equal(item["image"], items[0]["image"]) for item in items)
        seen = read_picture(item_pixels(items[0]))
        for item in items:
            if item["kind"] != "caption":
                assert item["answer"] == answer_from_picture(item["prompt"], seen)
        for j in range(q):
            again, made = kept[scene * q + j], fresh[scene * q + j]
            assert (again["prompt"], again["answer"]) == (made["prompt"], made["answer"])
            assert torch.equal(again["image"], made["image"])
    # the first question of scene s is drawn as the one-question dataset draws item s when the kinds agree
    assert (kept[0]["prompt"], kept[0]["answer"]) == (single[0]["prompt"], single[0]["answer"])
    with pytest.raises(ValueError, match="questions_per_scene must be >= 1"):
        SceneQADataset(questions_per_scene=0)
    with pytest.raises(IndexError):
        kept[4 * q]


def majority_of_others_from_picture(question: str, seen: dict[str, dict]) -> str:
    """The shortcut read off the picture: the commonest shape among the objects the question does not name,
    ties to the leftmost."""
    anchor = question.rstrip("?").split()[-2]
    counts: dict[str, int] = {}
    for colour in sorted(seen, key=lambda c: seen[c]["x"]):
        if colour != anchor:
            counts[seen[colour]["shape"]] = counts.get(seen[colour]["shape"], 0) + 1
    return max(counts, key=counts.get)  # max keeps the first of equal counts: the leftmost's


def test_against_shortcut_asks_where_the_majority_shape_is_wrong_and_stays_right():
    from moezoo.training.datasets.scenes import SceneQADataset

    def distance_questions(against):
        data = SceneQADataset("train", num_scenes=240, seed=2, kinds=["relation"], against_shortcut=against)
        asked = []
        for i in range(len(data)):
            item = data[i]
            if "left of" not in item["prompt"]:
                asked.append((item["prompt"], item["answer"], read_picture(item_pixels(item))))
        return asked

    natural, against = distance_questions(0.0), distance_questions(1.0)
    for prompt, answer, seen in natural + against:
        assert answer == answer_from_picture(prompt, seen), (prompt, answer, seen)

    def shortcut_right(asked):
        return sum(majority_of_others_from_picture(p, seen) == a for p, a, seen in asked) / len(asked)

    # natural scenes: the shortcut is right ~2/3 of the time; asked against it, only where every object's
    # answer is the majority's (two-object scenes always are)
    assert shortcut_right(natural) > 0.6 and shortcut_right(against) < 0.45
    # only the distance questions change: every other item, and every picture, is the natural one
    both = [SceneQADataset("train", num_scenes=60, seed=2, kinds=["relation", "colour"], against_shortcut=a)
            for a in (0.0, 1.0)]
    for plain, shifted in zip(*([d[i] for i in range(len(d))] for d in both)):
        assert torch.equal(plain["image"], shifted["image"])
        if "closest" not in plain["prompt"] and "furthest" not in plain["prompt"]:
            assert (plain["prompt"], plain["answer"]) == (shifted["prompt"], shifted["answer"])
    with pytest.raises(ValueError, match="against_shortcut is a probability"):
        SceneQADataset("train", num_scenes=1, against_shortcut=1.5)
