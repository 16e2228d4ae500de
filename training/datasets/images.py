"""Image data for diffusion training, as plain torch datasets (no Lightning): digits, generated shapes and
your own image folders. The DataModules that wrap them are in :mod:`moezoo.training.datamodules.images`.

Every item is a dict (:class:`ImageSample`), and :func:`collate_image_batch` stacks items into the one batch
format every image loader yields::

    {"image": float32 [B, C, H, W] in [-1, 1], "label": int64 [B] (-1: no label), "caption": list[str] ("": none)}

- :class:`DigitsDataset`: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download),
  upsampled; label = the digit, caption = ``"the digit 7"``. The smallest real dataset there is.
- :class:`ShapesDataset`: generated pictures of one coloured shape on black, described by four attributes
  (:data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`), drawn by :func:`render_shape`. Sample
  ``i`` of seed ``s`` is always the same picture. :func:`caption_for` and :func:`parse_caption` turn attributes
  into text and back, so pipelines and the quality benchmark can check what a model drew.
- :class:`ImageFolderDataset` over :func:`scan_image_folder`: your own pictures, ``root/<class>/*.png``
  (labels from the sorted class names) or a flat ``root/*.png`` (label -1); ``photo.txt`` next to
  ``photo.png`` is its caption.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "ImageSample",
    "ImageBatch",
    "collate_image_batch",
    "sklearn_digits",
    "DigitsDataset",
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "POSITIONS",
    "BACKGROUND_RGB",
    "caption_for",
    "parse_caption",
    "label_for",
    "shape_label_names",
    "render_shape",
    "ShapesDataset",
    "IMAGE_EXTENSIONS",
    "visible_files",
    "sidecar_caption",
    "scan_image_folder",
    "fit_square",
    "ImageFolderDataset",
]


# ----------------------------------------------------------------------------------------------------------
# The one sample / batch format
# ----------------------------------------------------------------------------------------------------------


class ImageSample(TypedDict):
    """One item of every dataset here."""

    image: torch.Tensor  # float32 [C, H, W] in [-1, 1]
    label: int  # class index, -1 when the data has no classes
    caption: str  # "" when the data has no caption


class ImageBatch(TypedDict):
    """What every DataLoader here yields."""

    image: torch.Tensor  # float32 [B, C, H, W] in [-1, 1]
    label: torch.Tensor  # int64 [B], -1 where there is no label
    caption: list[str]  # B strings, "" where there is no caption


def collate_image_batch(samples: Sequence[ImageSample]) -> ImageBatch:
    """Stack :class:`ImageSample` dicts into one :class:`ImageBatch` (the collate of every loader here)."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
    }


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit "L" or "RGB" PIL image -> float32 [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------
# Digits: scikit-learn's bundled 8x8 handwritten digits
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (images float64 [1797, 8, 8] of 0..16 ink values, targets int [1797])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


class DigitsDataset(Dataset):
    """Some of scikit-learn's ``load_digits()`` images as 1-channel ``image_size`` pictures in [-1, 1].

    Item ``j`` is sklearn's image ``indices[j]``: its 0..16 ink values are scaled to [0, 1], resized with
    antialiased bilinear interpolation, and mapped to [-1, 1] (no ink = -1). Label = the digit, caption =
    ``"the digit <d>"``.

    Args:
        image_size: side of the square output image in pixels.
        indices: which of the 1797 sklearn images, in order; None for all.
        augment: shift each image by a random whole number of pixels, up to one source (8x8) pixel each way,
            filling with background; uses torch's global RNG (Lightning seeds it per worker).
    """

    def __init__(self, image_size: int = 16, indices: Sequence[int] | None = None, augment: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        images, targets = sklearn_digits()
        self.indices = list(range(len(targets))) if indices is None else [int(i) for i in indices]
        ink_N1HW = torch.from_numpy(images[self.indices]).float().unsqueeze(1) / 16.0
        resized = F.interpolate(ink_N1HW, size=(image_size, image_size), mode="bilinear", antialias=True)
        self.images_N1HW = resized.clamp(0.0, 1.0) * 2.0 - 1.0
        self.labels = targets[self.indices].tolist()
        self.augment = augment
        self.max_shift = max(1, round(image_size / 8))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> ImageSample:
        image = self.images_N1HW[j]
        if self.augment:
            image = self._random_shift(image)
        digit = self.labels[j]
        return {"image": image, "label": digit, "caption": f"the digit {digit}"}

    def _random_shift(self, image_CHW: torch.Tensor) -> torch.Tensor:
        m = self.max_shift
        _, h, w = image_CHW.shape
        padded = F.pad(image_CHW, (m, m, m, m), value=-1.0)
        dy, dx = torch.randint(0, 2 * m + 1, (2,)).tolist()
        return padded[:, dy : dy + h, dx : dx + w].clone()


# ----------------------------------------------------------------------------------------------------------
# Shapes: generated pictures of one coloured shape, with captions that say exactly what is drawn
# ----------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

#: Pure, far-apart colours: every off channel is exactly 0, so a shape's colour is readable from its pixels.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
#: A plain black background, the same in every picture.
BACKGROUND_RGB: tuple[int, int, int] = (0, 0, 0)

# Geometry, as fractions of the image side. A shape's centre is its position's anchor plus a jitter of up to
# _JITTER each way; its "radius" r is drawn from its size's range (how r becomes a circle, square or triangle:
# render_shape). With these numbers every shape stays inside the image, and every large shape has more area
# than every small one.
_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
_JITTER = 0.02
_RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.085, 0.105), "large": (0.16, 0.19)}
_SUPERSAMPLE = 4  # draw at 4x, then box-filter down: exact-coverage antialiasing

# How each position reads in a caption ("a large red circle on the left").
_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_FILLER_WORDS = frozenset({"a", "an", "the", "at", "on", "in", "of", "to", "image", "picture", "photo"})
_SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "little": "small"}
_ATTRIBUTE_VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
}


def caption_for(attrs: Mapping[str, str]) -> str:
    """The caption of a shapes picture: ``"a large red circle on the left"``.

    ``attrs`` has the keys ``shape``, ``colour``, ``size`` and ``position`` (values from :data:`SHAPES`,
    :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`). :func:`parse_caption` inverts it.
    """
    for key, vocab in _ATTRIBUTE_VOCAB.items():
        if attrs.get(key) not in vocab:
            raise ValueError(f"attrs[{key!r}] must be one of {list(vocab)}, got {attrs.get(key)!r}")
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {_POSITION_PHRASES[attrs['position']]}"


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a shapes caption names, e.g. ``"a large red circle on the left"`` ->
    ``{"size": "large", "colour": "red", "shape": "circle", "position": "left"}``.

    Case, punctuation, word order and filler words ("a", "the", "on", "in", ...) do not matter; "centre" and
    "middle" mean "center", "big" "large", "little" "small". Attributes the text does not mention are absent
    from the result (``parse_caption("a red circle")`` has no size or position).

    Raises:
        ValueError: on a word outside the vocabulary (the message lists the accepted words) or on two
            different values for one attribute ("a red blue circle").
    """
    attrs: dict[str, str] = {}
    for raw in re.findall(r"[a-z]+", text.lower()):
        word = _SYNONYMS.get(raw, raw)
        if word in _FILLER_WORDS:
            continue
        key = next((k for k, vocab in _ATTRIBUTE_VOCAB.items() if word in vocab), None)
        if key is None:
            accepted = "; ".join(f"{k}: {', '.join(v)}" for k, v in _ATTRIBUTE_VOCAB.items())
            raise ValueError(
                f"unknown word {raw!r} in caption {text!r}. Accepted words are {accepted} "
                f"(also {', '.join(sorted(_SYNONYMS))} and the filler words {', '.join(sorted(_FILLER_WORDS))})"
            )
        if key in attrs and attrs[key] != word:
            raise ValueError(f"caption {text!r} names two {key}s: {attrs[key]!r} and {word!r}")
        attrs[key] = word
    return attrs


def label_for(attrs: Mapping[str, str]) -> int:
    """The class label of a shapes picture: ``SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)``,
    one of 12 (shape, colour) classes, so class-conditional models can train on the shapes data too."""
    return SHAPES.index(attrs["shape"]) * len(COLOURS) + COLOURS.index(attrs["colour"])


def shape_label_names() -> list[str]:
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def render_shape(shape: str, rgb: tuple[int, int, int], cx: float, cy: float, radius: float,
                 image_size: int) -> Image.Image:
    """One shape of colour ``rgb`` on the black background as an RGB PIL image of side ``image_size``; centre
    and radius as fractions of the side. Antialiased: drawn at 4x and box-filtered down, so each pixel holds
    the colour in proportion to how much of it the shape covers.

    Circle: radius ``radius``; square: half-side 0.89 ``radius`` (the circle's area); triangle: equilateral,
    pointing up, circumradius 1.25 ``radius``, centroid on the centre."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * side, cy * side, radius * side
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        h = 0.89 * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=rgb)
    else:
        R = 1.25 * r
        corners = [(x + R * math.cos(a), y - R * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, -math.pi / 6)]
        draw.polygon(corners, fill=rgb)
    return canvas.resize((image_size, image_size), Image.BOX)


class ShapesDataset(Dataset):
    """Generated pictures of one shape on black, each with its caption and (shape, colour) label.

    Sample ``i`` draws its attributes uniformly and independently (shape, colour, size, position, see
    :data:`SHAPES` etc.) plus a small jitter of position and size, all from ``RandomState(seed * 1_000_003 +
    first_index + i)``: the same ``(seed, first_index + i)`` always gives the same picture, and pictures are
    rendered lazily, one per ``__getitem__`` (antialiased: drawn at 4x and box-filtered down).

    Items: image float32 [3, image_size, image_size] in [-1, 1]; label = :func:`label_for` (12 classes,
    names in :attr:`label_names`); caption = :func:`caption_for` (``"a small green square at the top"``).

    Args:
        num_samples: number of pictures.
        image_size: side of the square pictures in pixels (16 or more keeps small shapes recognisable).
        seed: which family of pictures.
        first_index: global index of item 0, so disjoint datasets (train, val) can share one seed.
    """

    def __init__(self, num_samples: int, image_size: int = 32, seed: int = 0, first_index: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.first_index = first_index

    def __len__(self) -> int:
        return self.num_samples

    @property
    def label_names(self) -> list[str]:
        """Class names by label: ``"red circle", "green circle", ..., "yellow triangle"``."""
        return shape_label_names()

    def _layout(self, i: int) -> tuple[dict[str, str], float, float, float]:
        """(attributes, centre x, centre y, radius) of item ``i``; lengths as fractions of the side."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        rng = np.random.RandomState((self.seed * 1_000_003 + self.first_index + i) % 2**32)
        attrs = {
            "shape": SHAPES[rng.randint(len(SHAPES))],
            "colour": COLOURS[rng.randint(len(COLOURS))],
            "size": SIZES[rng.randint(len(SIZES))],
            "position": POSITIONS[rng.randint(len(POSITIONS))],
        }
        anchor_x, anchor_y = _ANCHORS[attrs["position"]]
        cx, cy = anchor_x + rng.uniform(-_JITTER, _JITTER), anchor_y + rng.uniform(-_JITTER, _JITTER)
        radius = rng.uniform(*_RADIUS_RANGE[attrs["size"]])
        return attrs, cx, cy, radius

    def attributes(self, i: int) -> dict[str, str]:
        """The attributes of item ``i``: ``dict(shape=, colour=, size=, position=)``."""
        return self._layout(i)[0]

    def render(self, i: int) -> Image.Image:
        """Item ``i`` as an RGB PIL image."""
        attrs, cx, cy, radius = self._layout(i)
        return render_shape(attrs["shape"], COLOUR_RGB[attrs["colour"]], cx, cy, radius, self.image_size)

    def __getitem__(self, i: int) -> ImageSample:
        attrs = self.attributes(i)
        return {"image": _pil_to_tensor(self.render(i)), "label": label_for(attrs), "caption": caption_for(attrs)}


# ----------------------------------------------------------------------------------------------------------
# Image folders: your own pictures
# ----------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def visible_files(folder: Path, extensions: Sequence[str], recursive: bool = True) -> list[Path]:
    """The files in ``folder`` (and its subfolders if ``recursive``) whose extension, in any case, is one of
    ``extensions``, sorted; hidden ones (a name, or a folder on the way, starting with ".") are left out."""
    paths = folder.rglob("*") if recursive else folder.iterdir()
    visible = (p for p in paths if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sorted(p for p in visible if p.is_file() and p.suffix.lower() in extensions)


def sidecar_caption(path: Path) -> str:
    """The caption of a data file: the stripped text of the ``.txt`` file of the same stem beside it, else ``""``."""
    text_file = path.with_suffix(".txt")
    return text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""


def scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of ``root``: class subfolders if any holds images (searched
    recursively), else the images directly in ``root`` with label -1."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: visible_files(d, IMAGE_EXTENSIONS) for d in class_dirs}
    if any(per_class.values()):
        names = []
        for name, files in per_class.items():
            if files:
                names.append(name)
            else:
                warnings.warn(
                    f"class folder {str(root / name)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); skipping it",
                    stacklevel=3,
                )
        loose = visible_files(root, IMAGE_EXTENSIONS, recursive=False)
        if loose:
            warnings.warn(
                f"{len(loose)} image(s) directly in {str(root)!r} are ignored: with class subfolders, every "
                f"image must be in one",
                stacklevel=3,
            )
        files, labels = [], []
        for label, name in enumerate(names):
            files += per_class[name]
            labels += [label] * len(per_class[name])
        return files, labels, names
    files = visible_files(root, IMAGE_EXTENSIONS, recursive=False)
    if not files:
        raise FileNotFoundError(
            f"no images found in {str(root)!r} or its subfolders; accepted extensions are "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case)"
        )
    return files, [-1] * len(files), []


def _load_image(path: Path, image_size: int, mode: str) -> Image.Image:
    """Read an image, flatten any transparency onto black, convert to ``mode``, resize its shorter side to
    ``image_size`` (bicubic, antialiased) and centre-crop it square."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA") if opened.mode in ("RGBA", "LA", "PA", "P") else opened.convert("RGB")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (0, 0, 0))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    return fit_square(image.convert(mode), image_size)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop square: how image folders and
    video folders bring their pictures to the model's size."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    """Image files with their labels; a caption is the stripped text of ``<image stem>.txt`` beside the image,
    or ``""``. Images are loaded per item (see :class:`ImageFolderDataModule` for the transform).

    Args:
        files: image paths.
        labels: one label per file (-1 for none).
        image_size: side of the square output images in pixels.
        channels: 1 (greyscale, PIL "L") or 3 ("RGB").
        random_flip: flip each image left-right with probability 1/2 (torch's global RNG).
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        image_size: int = 32,
        channels: int = 3,
        random_flip: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [Path(f) for f in files]
        self.labels = [int(label) for label in labels]
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j: int) -> ImageSample:
        image = _pil_to_tensor(_load_image(self.files[j], self.image_size, self.mode))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": self.labels[j], "caption": sidecar_caption(self.files[j])}



# ----------------------------------------------------------------------------------------------------------
# Question answering on your own images: a folder and a JSON-lines file of questions
# ----------------------------------------------------------------------------------------------------------


class QASample(TypedDict):
    """One item of every question-answering dataset (:class:`ImageTextFolderDataset`, the generated scenes)."""

    image: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    prompt: str  # the question (or a request such as "describe the picture.")
    answer: str  # the expected answer
    kind: str  # the question's type when known ("colour", "count", ...), else ""
    caption: str  # a description of the whole picture when known (the scenes'), else ""
    # the generated scenes: each colour's object centre (x, y as fractions of the side), NaN for absent colours
    centres: NotRequired[torch.Tensor]


def read_qa_lines(path: Path, root: Path) -> list[tuple[Path, str, str, str]]:
    """(image path, question, answer, kind) of every line of a JSON-lines file: objects with ``"image"`` (a
    path relative to ``root``, which it may not leave), ``"question"`` (or ``"prompt"``), ``"answer"`` and an
    optional ``"kind"``. Errors name the line and what is accepted."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"question file {str(path)!r} does not exist")
    root = root.resolve()
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object ({err.msg})") from None
        question = record.get("question", record.get("prompt")) if isinstance(record, dict) else None
        fields = (record.get("image"), question, record.get("answer")) if isinstance(record, dict) else (None,) * 3
        if not all(isinstance(f, str) and f.strip() for f in fields):
            raise ValueError(f'{where}: each line needs non-empty strings "image", "question" (or "prompt") and '
                             f'"answer", got {line.strip()[:120]!r}')
        image = (root / fields[0]).resolve()
        if not image.is_relative_to(root):
            raise ValueError(f"{where}: image {fields[0]!r} is outside the folder {str(root)!r}")
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {fields[0]!r} not found in {str(root)!r}")
        items.append((image, question.strip(), fields[2].strip(), str(record.get("kind", ""))))
    if not items:
        raise ValueError(f"question file {str(path)!r} has no questions")
    return items


class ImageTextFolderDataset(Dataset):
    """Your own images with questions and answers: ``root/<questions>`` is a JSON-lines file (see
    :func:`read_qa_lines`), e.g. ``{"image": "kitchen.jpg", "question": "how many cups are there?", "answer":
    "two"}``; images are read per item as RGB, resized and centre-cropped to ``image_size``.

    Items: :class:`QASample`."""

    def __init__(self, root: str | Path, questions: str = "questions.jsonl", image_size: int = 64) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
        self.items = read_qa_lines(root / questions, root)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> QASample:
        path, question, answer, kind = self.items[j]
        image = _pil_to_tensor(_load_image(path, self.image_size, "RGB"))
        return QASample(image=image, prompt=question, answer=answer, kind=kind, caption="")
