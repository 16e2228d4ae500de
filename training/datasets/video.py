"""Video data for diffusion training, as plain torch datasets (no Lightning): generated moving shapes, and
folders of your own clips. The DataModules that wrap them are in :mod:`moezoo.training.datamodules.video`.

Every item is a dict (:class:`VideoSample`), and :func:`collate_video_batch` stacks items into the one batch
format every video loader yields::

    {"video": float32 [B, F, C, H, W] in [-1, 1], "caption": list[str] ("": none)}

- :class:`MovingShapesDataset`: clips of one coloured shape on black that moves left / right / up / down,
  grows, shrinks, or turns into another colour, with a caption that says so (``"a red square moving left"``,
  ``"a blue circle growing"``, ``"a green triangle turning yellow"``). The shapes, colours and drawing are the
  image shapes data's (:mod:`moezoo.training.datasets.images`: :data:`SHAPES`, :data:`COLOURS`,
  :func:`render_shape`). Clip ``i`` of seed ``s`` is always the same clip; :func:`video_caption_for` and
  :func:`parse_video_caption` turn attributes into text and back, so pipelines and the quality benchmark can
  check what a model drew.
- :class:`VideoFolderDataset` over :func:`scan_video_folder`: your own clips, ``root/**/*.mp4`` (or .gif,
  .webm, .avi, .mov, .mkv), read with PyAV; ``clip.txt`` next to ``clip.mp4`` is its caption.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    fit_square,
    render_shape,
    sidecar_caption,
    visible_files,
)

__all__ = [
    "VideoSample",
    "VideoBatch",
    "collate_video_batch",
    "MOTIONS",
    "DIRECTIONS",
    "video_caption_for",
    "parse_video_caption",
    "shape_coverage",
    "MovingShapesDataset",
    "VIDEO_EXTENSIONS",
    "read_video_frames",
    "scan_video_folder",
    "VideoFolderDataset",
]


# ----------------------------------------------------------------------------------------------------------
# The one sample / batch format
# ----------------------------------------------------------------------------------------------------------


class VideoSample(TypedDict):
    video: torch.Tensor  # float32 [F, C, H, W] in [-1, 1]
    caption: str  # "" when the clip has no caption


class VideoBatch(TypedDict):
    video: torch.Tensor  # float32 [B, F, C, H, W] in [-1, 1]
    caption: list[str]


def collate_video_batch(samples: Sequence[VideoSample]) -> VideoBatch:
    """Stack :class:`VideoSample` dicts into one :class:`VideoBatch` (the collate of every loader here)."""
    return {"video": torch.stack([s["video"] for s in samples]), "caption": [s["caption"] for s in samples]}



def _frames_to_tensor(frames_FHWC: np.ndarray) -> torch.Tensor:
    """uint8 or [0, 1]-float frames [F, H, W, C] -> float32 [F, C, H, W] in [-1, 1]."""
    array = frames_FHWC.astype(np.float32)
    if frames_FHWC.dtype == np.uint8:
        array = array / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------------
# Moving shapes
# ----------------------------------------------------------------------------------------------------------

#: What can happen in a clip. The four directions translate the shape; "grow"/"shrink" scale it in place;
#: "recolour" blends its colour into another one.
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = (*DIRECTIONS, "grow", "shrink", "recolour")

_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y points down
_MOTION_PHRASES = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                   "grow": "growing", "shrink": "shrinking"}
# Geometry as fractions of the side. Moving and recolouring shapes have a radius in _RADIUS (about 5 px at
# 32 px: big enough that circle, square and triangle differ); they travel _TRAVEL over the clip, starting so
# the whole path stays in the picture. Growing shapes go from _SMALL to _LARGE radius (shrinking: back).
_RADIUS = (0.14, 0.17)
_TRAVEL = (0.36, 0.44)
_SMALL, _LARGE = (0.07, 0.09), (0.19, 0.22)
_MARGIN = 0.03
_CAPTION_WORD = re.compile(r"[a-z]+")
_FILLER = frozenset({"a", "an", "the", "is", "that", "which", "into", "to", "from", "of", "colour", "color"})
_SYNONYMS = {"moves": "moving", "goes": "moving", "going": "moving", "grows": "growing", "shrinks": "shrinking",
             "turns": "turning", "changing": "turning", "becoming": "turning"}


def video_caption_for(attrs: Mapping[str, str]) -> str:
    """The caption of a moving-shapes clip: ``"a red square moving left"``, ``"a blue circle growing"``,
    ``"a green triangle turning yellow"``.

    ``attrs`` has ``shape`` (:data:`SHAPES`), ``colour`` (:data:`COLOURS`), ``motion`` (:data:`MOTIONS`) and,
    for ``"recolour"``, ``end_colour`` (another colour). :func:`parse_video_caption` inverts it.
    """
    if attrs.get("shape") not in SHAPES:
        raise ValueError(f"attrs['shape'] must be one of {list(SHAPES)}, got {attrs.get('shape')!r}")
    if attrs.get("colour") not in COLOURS:
        raise ValueError(f"attrs['colour'] must be one of {list(COLOURS)}, got {attrs.get('colour')!r}")
    motion = attrs.get("motion")
    if motion not in MOTIONS:
        raise ValueError(f"attrs['motion'] must be one of {list(MOTIONS)}, got {motion!r}")
    subject = f"a {attrs['colour']} {attrs['shape']}"
    if motion != "recolour":
        return f"{subject} {_MOTION_PHRASES[motion]}"
    end = attrs.get("end_colour")
    if end not in COLOURS or end == attrs["colour"]:
        raise ValueError(f"a recolour clip needs end_colour, one of {list(COLOURS)} other than "
                         f"{attrs['colour']!r}, got {end!r}")
    return f"{subject} turning {end}"


def parse_video_caption(text: str) -> dict[str, str]:
    """The attributes a moving-shapes caption names: ``"a red square moving left"`` -> ``{"colour": "red",
    "shape": "square", "motion": "left"}``; ``"a red square turning blue"`` -> ``{..., "motion": "recolour",
    "end_colour": "blue"}``.

    Case, punctuation and filler words do not matter; "moves", "grows", "turns", "changing" etc. are read as
    their caption forms. Attributes the text does not mention are absent.

    Raises:
        ValueError: on a word outside the vocabulary (the message lists the accepted words), two shapes or
            two motions, or a colour change without its target colour.
    """
    attrs: dict[str, str] = {}
    colours: list[str] = []
    words = [_SYNONYMS.get(w, w) for w in _CAPTION_WORD.findall(text.lower())]

    def set_once(key: str, value: str) -> None:
        if key in attrs and attrs[key] != value:
            raise ValueError(f"caption {text!r} names two {key}s: {attrs[key]!r} and {value!r}")
        attrs[key] = value

    i = 0
    while i < len(words):
        word = words[i]
        if word in _FILLER:
            pass
        elif word in SHAPES:
            set_once("shape", word)
        elif word in COLOURS:
            colours.append(word)
        elif word == "moving" and i + 1 < len(words) and words[i + 1] in DIRECTIONS:
            set_once("motion", words[i + 1])
            i += 1
        elif word in DIRECTIONS:
            set_once("motion", word)
        elif word in ("growing", "shrinking"):
            set_once("motion", "grow" if word == "growing" else "shrink")
        elif word == "turning":
            set_once("motion", "recolour")
        else:
            accepted = (f"shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; motions "
                        f"'moving {'/'.join(DIRECTIONS)}', 'growing', 'shrinking', 'turning <colour>'")
            raise ValueError(f"unknown word {word!r} in caption {text!r}. Accepted: {accepted}")
        i += 1
    if attrs.get("motion") == "recolour":
        if len(colours) != 2:
            raise ValueError(f"caption {text!r}: a colour change names a colour and the colour it turns into, "
                             f"got {colours}")
        attrs["colour"], attrs["end_colour"] = colours
    elif len(set(colours)) > 1:
        raise ValueError(f"caption {text!r} names two colours {colours} but no colour change ('turning')")
    elif colours:
        attrs["colour"] = colours[0]
    return attrs


def shape_coverage(shape: str, cx: float, cy: float, radius: float, image_size: int) -> np.ndarray:
    """How much of each pixel a shape covers, float32 [H, W] in [0, 1] (centre and radius as fractions of the
    side). Drawn in pure red on black, so the red channel is the coverage."""
    red = np.asarray(render_shape(shape, COLOUR_RGB["red"], cx, cy, radius, image_size), dtype=np.float32)[..., 0]
    return red / 255.0


class MovingShapesDataset(Dataset):
    """Generated clips of one coloured shape on black, each with its caption.

    Clip ``i`` draws shape, colour and motion uniformly from the allowed ones (and for "recolour" a different
    end colour), then its geometry, all from ``RandomState(seed * 1_000_003 + first_index + i)``: the same
    ``(seed, first_index + i)`` always gives the same clip. Motion is linear in time: moving shapes travel
    36-44% of the side between the first and last frame (the whole path inside the picture), growing ones
    go from radius ~8% to ~20% of the side, recolouring ones blend linearly from one pure colour to the other.

    Items: video float32 [num_frames, 3, image_size, image_size] in [-1, 1]; caption = :func:`video_caption_for`.

    Args:
        num_samples: number of clips.
        image_size: side of the square frames in pixels (16 or more).
        num_frames: frames per clip (2 or more, so that something happens).
        motions: which of :data:`MOTIONS` occur.
        shapes: which of :data:`SHAPES` occur.
        colours: which of :data:`COLOURS` occur (at least two with "recolour").
        seed: which family of clips.
        first_index: global index of clip 0, so disjoint datasets (train, val) can share one seed.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        num_frames: int = 8,
        motions: Sequence[str] = MOTIONS,
        shapes: Sequence[str] = SHAPES,
        colours: Sequence[str] = COLOURS,
        seed: int = 0,
        first_index: int = 0,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 (smaller shapes are not recognisable), got {image_size}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {num_frames}")
        self.motions = _checked_subset("motions", motions, MOTIONS)
        self.shapes = _checked_subset("shapes", shapes, SHAPES)
        self.colours = _checked_subset("colours", colours, COLOURS)
        if "recolour" in self.motions and len(self.colours) < 2:
            raise ValueError("the 'recolour' motion needs at least two colours")
        self.num_samples, self.image_size, self.num_frames = num_samples, image_size, num_frames
        self.seed, self.first_index = seed, first_index

    def __len__(self) -> int:
        return self.num_samples

    def attributes(self, i: int) -> dict[str, str]:
        """The attributes of clip ``i``: ``dict(shape=, colour=, motion=[, end_colour=])``."""
        return self._plan(i)[0]

    def trajectory(self, i: int) -> list[dict]:
        """Per frame of clip ``i``: ``{"cx", "cy", "radius"}`` as fractions of the side and ``"rgb"`` (0..255
        floats): the ground truth the quality benchmark's tracker is checked against."""
        return self._plan(i)[1]

    def _plan(self, i: int) -> tuple[dict[str, str], list[dict]]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} clips")
        rng = np.random.RandomState((self.seed * 1_000_003 + self.first_index + i) % 2**32)
        attrs = {
            "shape": self.shapes[rng.randint(len(self.shapes))],
            "colour": self.colours[rng.randint(len(self.colours))],
            "motion": self.motions[rng.randint(len(self.motions))],
        }
        motion = attrs["motion"]
        start_rgb = np.array(COLOUR_RGB[attrs["colour"]], dtype=np.float64)
        end_rgb = start_rgb
        if motion == "recolour":
            others = [c for c in self.colours if c != attrs["colour"]]
            attrs["end_colour"] = others[rng.randint(len(others))]
            end_rgb = np.array(COLOUR_RGB[attrs["end_colour"]], dtype=np.float64)
        if motion in ("grow", "shrink"):
            r0, r1 = rng.uniform(*_SMALL), rng.uniform(*_LARGE)
            if motion == "shrink":
                r0, r1 = r1, r0
            lo, hi = 0.5 - 0.08, 0.5 + 0.08
            x0 = x1 = rng.uniform(lo, hi)
            y0 = y1 = rng.uniform(lo, hi)
        else:
            r0 = r1 = rng.uniform(*_RADIUS)
            lo, hi = r0 + _MARGIN, 1 - r0 - _MARGIN  # where a centre may be
            if motion in DIRECTIONS:
                dx, dy = _DIRECTION_VECTORS[motion]
                travel = rng.uniform(*_TRAVEL)
                along0 = rng.uniform(lo, hi - travel)  # start of the path along its axis, for a positive step
                across = rng.uniform(lo + 0.05, hi - 0.05)
                start, end = (along0, along0 + travel) if dx + dy > 0 else (along0 + travel, along0)
                (x0, x1), (y0, y1) = ((start, end), (across, across)) if dx else ((across, across), (start, end))
            else:
                x0 = x1 = rng.uniform(lo, hi)
                y0 = y1 = rng.uniform(lo, hi)
        frames = []
        for f in range(self.num_frames):
            a = f / (self.num_frames - 1)
            frames.append({"cx": x0 + a * (x1 - x0), "cy": y0 + a * (y1 - y0), "radius": r0 + a * (r1 - r0),
                           "rgb": tuple((1 - a) * start_rgb + a * end_rgb)})
        return attrs, frames

    def render(self, i: int) -> np.ndarray:
        """Clip ``i`` as uint8 frames [num_frames, H, W, 3]."""
        attrs, frames = self._plan(i)
        background = np.array(BACKGROUND_RGB, dtype=np.float32)
        out = np.empty((self.num_frames, self.image_size, self.image_size, 3), dtype=np.uint8)
        for f, frame in enumerate(frames):
            coverage = shape_coverage(attrs["shape"], frame["cx"], frame["cy"], frame["radius"], self.image_size)
            cover_HW1 = coverage[..., None]
            rgb = np.array(frame["rgb"], dtype=np.float32)
            out[f] = np.round(cover_HW1 * rgb + (1 - cover_HW1) * background).astype(np.uint8)
        return out

    def __getitem__(self, i: int) -> VideoSample:
        return {"video": _frames_to_tensor(self.render(i)), "caption": video_caption_for(self.attributes(i))}


def _checked_subset(name: str, values: Sequence[str], vocabulary: Sequence[str]) -> tuple[str, ...]:
    values = tuple(values)
    unknown = [v for v in values if v not in vocabulary]
    if not values or unknown:
        raise ValueError(f"{name} must be a non-empty subset of {list(vocabulary)}, got {list(values)}")
    return tuple(v for v in vocabulary if v in values)  # canonical order: the same seed, the same clips



# ----------------------------------------------------------------------------------------------------------
# Video folders: your own clips
# ----------------------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")


def read_video_frames(path: str | Path, num_frames: int, image_size: int, frame_stride: int = 1) -> np.ndarray:
    """The first ``num_frames`` frames (every ``frame_stride``-th) of a video file as uint8 RGB
    [num_frames, image_size, image_size, 3], each resized and centre-cropped square. A clip with fewer frames
    repeats its last one; a file PyAV cannot decode, or with no frames, raises ValueError naming it."""
    import av

    wanted = (num_frames - 1) * frame_stride + 1
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % frame_stride == 0:
                    frames.append(np.asarray(fit_square(frame.to_image().convert("RGB"), image_size)))
                if index + 1 >= wanted:
                    break
    except (av.error.FFmpegError, StopIteration, IndexError) as err:
        raise ValueError(f"cannot read video {str(path)!r}: {err}") from err
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    frames += [frames[-1]] * (num_frames - len(frames))
    return np.stack(frames)


def scan_video_folder(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {str(root)!r} does not exist or is not a directory")
    files = visible_files(root, VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no videos found in {str(root)!r} or its subfolders; accepted extensions are "
                                f"{', '.join(VIDEO_EXTENSIONS)} (any case)")
    return files


class VideoFolderDataset(Dataset):
    """Video files as clips; a caption is the stripped text of ``<video stem>.txt`` beside the file, or ``""``.

    Args:
        files: video paths.
        image_size: side of the square frames in pixels.
        num_frames: frames per clip (see :func:`read_video_frames`).
        frame_stride: keep every this-many-th frame.
    """

    def __init__(self, files: Sequence[Path], image_size: int = 32, num_frames: int = 8, frame_stride: int = 1):
        self.files = [Path(f) for f in files]
        self.image_size, self.num_frames, self.frame_stride = image_size, num_frames, frame_stride

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j: int) -> VideoSample:
        frames = read_video_frames(self.files[j], self.num_frames, self.image_size, self.frame_stride)
        return {"video": _frames_to_tensor(frames), "caption": sidecar_caption(self.files[j])}
