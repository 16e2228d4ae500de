"""Scenes for visual question answering, in the spirit of Sort-of-CLEVR (Santoro et al. 2017): 2-6 objects of
distinct colours (6 colours x circle/square/triangle) on black, a templated caption, and questions by type.

Question types and their answers (one word each):

- ``shape``: "what shape is the red object?" -> circle | square | triangle
- ``colour``: "what colour is the leftmost object?" (leftmost, rightmost, topmost, bottommost) -> a colour
- ``count``: "how many circles are there?" / "how many objects are there?" -> zero ... six
- ``relation``: "what shape is the object closest to the red object?" (closest to, furthest from) -> a shape;
  "is the red object left of the blue object?" -> yes | no
- ``exists``: "is there a green square?" -> yes | no (asked as often about a pair in the scene as not)

Colours are distinct within a scene, so "the red object" names one object. Distances are between centres;
objects never overlap and no two centres tie for closest, furthest or an extreme (rejection sampling keeps a
margin), so every answer is unambiguous.

Held-out combinations: :data:`HELD_OUT_PAIRS` (3 of the 18 colour-shape pairs, each colour and each shape still
seen in training in other pairs) never appear in the ``"train"`` split; every scene of the ``"held_out"`` split
contains at least one of them. ``"val"`` and ``"test"`` are drawn like ``"train"`` from other seeds.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import BACKGROUND_RGB, COLOUR_RGB, SHAPES, QASample
from .video import shape_coverage

SCENE_COLOURS: dict[str, tuple[int, int, int]] = {
    **{name: COLOUR_RGB[name] for name in ("red", "green", "blue", "yellow")},
    "orange": (255, 128, 0),
    "gray": (128, 128, 128),
}
QUESTION_TYPES: tuple[str, ...] = ("shape", "colour", "count", "relation", "exists")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
EXTREMES: dict[str, tuple[int, int]] = {  # word -> (axis: 0 x / 1 y, sign: the object maximising sign * coordinate)
    "leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "held_out": 3}  # the seed stream of each split
MAX_OBJECTS = 6
MIN_OBJECTS = 2

_RADIUS = (0.08, 0.11)  # fractions of the side (render_shape's radius: a circle's; squares and triangles match its area)
_GAP = 0.02  # between two objects' bounding circles (a triangle's circumradius is 1.25 r)
# Six objects pass the ambiguity check about once in 75 draws: 1000 tries failed once in a few thousand scenes.
_TRIES = 20_000
_MARGIN = 0.02  # between an object's bounding circle and the border
_TIE = 0.03  # two candidates for closest/furthest/extreme must differ by this much (fractions of the side)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cx: float  # centre, fractions of the side; y points down
    cy: float
    radius: float


class QA(NamedTuple):
    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _extent(radius: float) -> float:
    return 1.25 * radius  # the triangle's circumradius bounds all three shapes


def _ties(values: list[float]) -> bool:
    """Do the best and second best of these values lie within _TIE of each other?"""
    if len(values) < 2:
        return False
    best, second = sorted(values, reverse=True)[:2]
    return best - second < _TIE


def _ambiguous(objects: list[SceneObject]) -> bool:
    """Would any closest / furthest / extreme question on this scene have two near-equal answers?"""
    for axis, sign in EXTREMES.values():
        if _ties([sign * (o.cx, o.cy)[axis] for o in objects]):
            return True
    for anchor in objects:
        distances = [math.dist((anchor.cx, anchor.cy), (o.cx, o.cy)) for o in objects if o is not anchor]
        if _ties(distances) or _ties([-d for d in distances]):
            return True
    return False


def allowed_pairs(split: str) -> list[tuple[str, str]]:
    """The colour-shape pairs a split's objects may take."""
    _check_split(split)
    pairs = list(itertools.product(SCENE_COLOURS, SHAPES))
    return pairs if split == "held_out" else [p for p in pairs if p not in HELD_OUT_PAIRS]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown scene split {split!r}; accepted: {', '.join(SPLITS)}")


def sample_scene(rng: np.random.Generator, split: str = "train", num_objects: int | None = None) -> list[SceneObject]:
    """2-6 objects of distinct colours, not overlapping, with unambiguous relations (see the module docstring).
    ``held_out`` scenes contain at least one held-out pair; the others none."""
    _check_split(split)
    if num_objects is None:
        num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    if not MIN_OBJECTS <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [{MIN_OBJECTS}, {MAX_OBJECTS}], got {num_objects}")
    pairs = allowed_pairs(split)
    for _ in range(_TRIES):
        colours = rng.choice(list(SCENE_COLOURS), size=num_objects, replace=False)
        shapes = [_shape_for(c, pairs, rng) for c in colours]
        if split == "held_out" and not any((c, s) in HELD_OUT_PAIRS for c, s in zip(colours, shapes)):
            continue
        objects = _placed(list(zip(colours, shapes)), rng)
        if objects is not None and not _ambiguous(objects):
            return objects
    raise RuntimeError(f"could not place the scene's objects in {_TRIES} tries")


def _shape_for(colour: str, pairs: list[tuple[str, str]], rng: np.random.Generator) -> str:
    options = [s for c, s in pairs if c == colour]
    return str(options[int(rng.integers(len(options)))])


def _placed(kinds: list[tuple[str, str]], rng: np.random.Generator) -> list[SceneObject] | None:
    objects: list[SceneObject] = []
    for colour, shape in kinds:
        for _ in range(200):
            radius = float(rng.uniform(*_RADIUS))
            low, high = _extent(radius) + _MARGIN, 1 - _extent(radius) - _MARGIN
            cx, cy = (float(v) for v in rng.uniform(low, high, size=2))
            if all(math.dist((cx, cy), (o.cx, o.cy)) > _extent(radius) + _extent(o.radius) + _GAP for o in objects):
                objects.append(SceneObject(str(colour), shape, cx, cy, radius))
                break
        else:
            return None
    return objects


def render_scene(objects: list[SceneObject], image_size: int = 64) -> np.ndarray:
    """The scene as uint8 RGB ``[H, W, 3]``: each object's antialiased coverage blended over the black
    background (objects never overlap, so the order does not matter)."""
    image = np.zeros((image_size, image_size, 3), np.float32) + np.asarray(BACKGROUND_RGB, np.float32)
    for o in objects:
        coverage = shape_coverage(o.shape, o.cx, o.cy, o.radius, image_size)[..., None]
        image = image * (1 - coverage) + np.asarray(SCENE_COLOURS[o.colour], np.float32) * coverage
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def colour_centres(objects: list[SceneObject]) -> torch.Tensor:
    """``[len(SCENE_COLOURS), 2]``: the centre (x, y, fractions of the side, y down) of each colour's object, in
    SCENE_COLOURS' order; NaN for colours the scene lacks (colours are distinct, so one object each)."""
    centres = torch.full((len(SCENE_COLOURS), 2), float("nan"))
    for o in objects:
        centres[list(SCENE_COLOURS).index(o.colour)] = torch.tensor([o.cx, o.cy])
    return centres


def scene_caption(objects: list[SceneObject]) -> str:
    """The objects from left to right: "a red circle, an orange square and a gray triangle"."""
    names = [_a(f"{o.colour} {o.shape}") for o in sorted(objects, key=lambda o: o.cx)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _extreme(objects: list[SceneObject], word: str) -> SceneObject:
    axis, sign = EXTREMES[word]
    return max(objects, key=lambda o: sign * (o.cx, o.cy)[axis])


def _by_distance(anchor: SceneObject, objects: list[SceneObject]) -> list[SceneObject]:
    return sorted((o for o in objects if o is not anchor), key=lambda o: math.dist((anchor.cx, anchor.cy), (o.cx, o.cy)))


def majority_other_shape(anchor: SceneObject, objects: list[SceneObject]) -> str:
    """The shape most objects other than ``anchor`` have (on a tie, the leftmost's): a guess at "what shape is the
    object closest to / furthest from ..." that needs no distances. On natural scenes it is right about 70% of
    the time, and a small LM learns it instead of comparing distances."""
    others = [o.shape for o in sorted(objects, key=lambda o: o.cx) if o is not anchor]
    return Counter(others).most_common(1)[0][0]


def _distance_target(anchor: SceneObject, objects: list[SceneObject], relation: str) -> SceneObject:
    ranked = _by_distance(anchor, objects)
    return ranked[0] if relation == "closest to" else ranked[-1]


def ask(objects: list[SceneObject], kind: str, rng: np.random.Generator, split: str = "train",
        against_shortcut: float = 0.0) -> QA:
    """One question of type ``kind`` about the scene, with its answer. An ``exists`` question about an absent
    pair names only pairs the split allows (training never hears of a held-out pair).

    ``against_shortcut``: the probability that a "closest to" / "furthest from" question names an object whose
    answer is not :func:`majority_other_shape` (when the scene has one), so that training rewards comparing
    distances over the shortcut. 0 (the default) asks about any object and draws nothing more from ``rng``."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if kind == "shape":
        o = pick(objects)
        return QA(kind, f"what shape is the {o.colour} object?", o.shape)
    if kind == "colour":
        word = pick(list(EXTREMES))
        return QA(kind, f"what colour is the {word} object?", _extreme(objects, word).colour)
    if kind == "count":
        shape = pick([*SHAPES, "object"])
        count = len(objects) if shape == "object" else sum(o.shape == shape for o in objects)
        return QA(kind, f"how many {shape}s are there?", COUNT_WORDS[count])
    if kind == "relation":
        anchor = pick(objects)
        relation = pick(["closest to", "furthest from", "left of"])
        if relation == "left of":
            other = pick([o for o in objects if o is not anchor])
            return QA(kind, f"is the {anchor.colour} object left of the {other.colour} object?",
                      "yes" if anchor.cx < other.cx else "no")
        if against_shortcut > 0 and rng.random() < against_shortcut:
            beaten = [o for o in objects
                      if _distance_target(o, objects, relation).shape != majority_other_shape(o, objects)]
            if beaten:
                anchor = pick(beaten)
        target = _distance_target(anchor, objects, relation)
        return QA(kind, f"what shape is the object {relation} the {anchor.colour} object?", target.shape)
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape = pick(sorted(present))
        else:
            colour, shape = pick([p for p in allowed_pairs(split) if p not in present])
        return QA(kind, f"is there {_a(colour)} {shape}?", "yes" if (colour, shape) in present else "no")
    raise ValueError(f"unknown question type {kind!r}; accepted: {', '.join(QUESTION_TYPES)}")


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a split: each scene is reproducible on its own, whatever was drawn before."""
    _check_split(split)
    return np.random.default_rng([SPLITS[split], seed, index])


def question_rng(split: str, seed: int, index: int, question: int) -> np.random.Generator:
    """The generator of scene ``index``'s question number ``question`` >= 1 (the first is drawn from
    :func:`scene_rng` after the scene)."""
    _check_split(split)
    return np.random.default_rng([SPLITS[split], seed, index, question])


CAPTION_PROMPT = "describe the picture."
ANSWER_KINDS: tuple[str, ...] = (*QUESTION_TYPES, "caption")


class SceneQADataset(Dataset):
    """Scenes with questions: item ``i`` is scene ``i // questions_per_scene`` of the split (:func:`scene_rng`),
    asked a question of kind ``kinds[i % len(kinds)]``; the first question of a scene is drawn from the scene's
    own generator, the others from :func:`question_rng`, so every item is reproducible on its own and the kinds
    are balanced. ``"caption"`` asks :data:`CAPTION_PROMPT` and answers :func:`scene_caption`.

    Several questions per scene multiply what training reads without making more pictures: with one, a model
    trained for several epochs hears the same 1/6 of each scene's questions again and again and learns them by
    heart; with ``questions_per_scene = len(kinds)`` every scene is asked every kind.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"held_out"`` (held-out colour-shape pairs).
        num_scenes: items.
        seed: which family of scenes (with the split, the scene generator's seed).
        image_size: side in pixels.
        kinds: the question kinds to ask (default: all of :data:`ANSWER_KINDS`).
        questions_per_scene: items per scene (the dataset's length is ``num_scenes * questions_per_scene``).
        cache_scenes: keep every scene made (objects and uint8 pixels, 12 KB at 64 px) for the next reads, so
            its other questions and the next epochs skip the rejection sampling and the drawing.
        against_shortcut: see :func:`ask` (in [0, 1]; 0 keeps the scenes' natural questions).
    """

    def __init__(self, split: str = "train", num_scenes: int = 1000, seed: int = 0, image_size: int = 64,
                 kinds: Sequence[str] = ANSWER_KINDS, questions_per_scene: int = 1, cache_scenes: bool = False,
                 against_shortcut: float = 0.0) -> None:
        _check_split(split)
        if num_scenes < 0:
            raise ValueError(f"num_scenes must be >= 0, got {num_scenes}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 (smaller objects lose their shape), got {image_size}")
        unknown = [k for k in kinds if k not in ANSWER_KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown or no question kinds {unknown or list(kinds)}; accepted: {', '.join(ANSWER_KINDS)}")
        if questions_per_scene < 1:
            raise ValueError(f"questions_per_scene must be >= 1, got {questions_per_scene}")
        if not 0.0 <= against_shortcut <= 1.0:
            raise ValueError(f"against_shortcut is a probability in [0, 1], got {against_shortcut}")
        self.against_shortcut = against_shortcut
        self.split, self.num_scenes, self.seed = split, num_scenes, seed
        self.image_size, self.kinds, self.questions_per_scene = image_size, tuple(kinds), questions_per_scene
        self._scenes: dict[int, tuple[list[SceneObject], np.ndarray, dict]] | None = {} if cache_scenes else None

    def __len__(self) -> int:
        return self.num_scenes * self.questions_per_scene

    def scene(self, i: int) -> tuple[list[SceneObject], np.random.Generator]:
        """Scene ``i`` (not item ``i``) and its generator, positioned after the scene's drawing."""
        if not 0 <= i < self.num_scenes:
            raise IndexError(f"index {i} out of range for {self.num_scenes} scenes")
        rng = scene_rng(self.split, self.seed, i)
        return sample_scene(rng, self.split), rng

    def _made(self, i: int) -> tuple[list[SceneObject], np.ndarray, np.random.Generator]:
        """Scene ``i``'s objects, its pixels and its generator positioned after the scene's drawing (a kept
        scene keeps that position too: its first question is drawn from there)."""
        if self._scenes is not None and i in self._scenes:
            objects, pixels, state = self._scenes[i]
            rng = np.random.default_rng()
            rng.bit_generator.state = state
            return objects, pixels, rng
        objects, rng = self.scene(i)
        pixels = render_scene(objects, self.image_size)
        if self._scenes is not None:
            self._scenes[i] = objects, pixels, rng.bit_generator.state
        return objects, pixels, rng

    def __getitem__(self, i: int) -> QASample:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        scene, question = divmod(i, self.questions_per_scene)
        objects, pixels, rng = self._made(scene)
        if question:
            rng = question_rng(self.split, self.seed, scene, question)
        kind = self.kinds[i % len(self.kinds)]
        if kind == "caption":
            prompt, answer = CAPTION_PROMPT, scene_caption(objects)
        else:
            _, prompt, answer = ask(objects, kind, rng, self.split, self.against_shortcut)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        return QASample(image=image, prompt=prompt, answer=answer, kind=kind, caption=scene_caption(objects),
                        centres=colour_centres(objects))


def caption_pairs(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order ("a red circle and an orange square" -> [("red",
    "circle"), ("orange", "square")]); words that are not a colour followed by a shape are skipped."""
    words = re.findall(r"[a-z]+", text.lower())
    return [(c, s) for c, s in zip(words, words[1:]) if c in SCENE_COLOURS and s in SHAPES]


def caption_f1(predicted: str, truth: str) -> float:
    """Attribute F1 of a caption: precision and recall of its colour-shape pairs against the true caption's
    (as multisets; two empty captions score 1)."""
    pred, true = Counter(caption_pairs(predicted)), Counter(caption_pairs(truth))
    if not pred and not true:
        return 1.0
    hits = sum((pred & true).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(pred.values()), hits / sum(true.values())
    return 2 * precision * recall / (precision + recall)
