"""Infrared/visible image pairs for fusion training, as plain numpy/torch code (no Lightning): synthetic pairs
from the bundled photographs, and registered pairs from folders laid out as M3FD / LLVIP / TNO (``ir/`` +
``vis/``). The DataModules that wrap them are in :mod:`moezoo.training.datamodules.fusion_pairs`.

Every batch of these datasets (default collate) is a dict::

    {"ir": float32 [B, 1, H, W] in [0, 1], "vis": float32 [B, 1, H, W] in [0, 1] (luminance),
     "mask": float32 [B, 1, H, W] in {0, 1} (warm objects; synthetic data only), "name": list[str]}

Synthetic pairs (:func:`synthesize_pair`) start from a crop of one of the packaged photographs
(:mod:`moezoo.training.datasets.photos`, split by photo, so test pairs are scenes never trained on):

- warm objects: one to three segments of the photo (Felzenszwalb's graph segmentation of the whole photo) of a
  plausible object size, and sometimes an elliptical object the visible image does not show at all (a person
  in the dark); their union is the ``mask``.
- infrared: a thermal-like rendering. The background is the photo's luminance blurred hard and squashed into a
  cool, low-contrast band (heat diffuses: shapes survive, texture does not), plus a slow vertical temperature
  drift; each warm object gets its own high temperature with only a trace of the photo's detail; edges are
  soft and there is sensor noise.
- visible: the photo's luminance under low light (dimmed, gamma-darkened, noisy) or in fog (the atmospheric
  scattering model ``V = J t + A (1 - t)`` with ``t = exp(-beta d)`` over a smooth random depth ``d``).

Sample ``i`` of seed ``s`` is always the same pair, whatever the order of access.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, visible_files
from .photos import SPLITS, load_photo

__all__ = [
    "DEGRADATIONS",
    "luminance",
    "photo_segments",
    "warm_object_mask",
    "render_infrared",
    "low_light",
    "fog",
    "synthesize_pair",
    "SyntheticFusionDataset",
    "find_pairs",
    "PairedFolderDataset",
    "load_grey",
]

DEGRADATIONS = ("low_light", "fog")


def luminance(rgb_HW3: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of float RGB [H, W, 3] -> [H, W]."""
    return rgb_HW3[..., 0] * 0.299 + rgb_HW3[..., 1] * 0.587 + rgb_HW3[..., 2] * 0.114


@functools.lru_cache(maxsize=None)
def photo_segments(name: str) -> np.ndarray:
    """Felzenszwalb segments of a whole photo, int [H, W]: candidate warm objects (computed once per photo)."""
    from skimage.segmentation import felzenszwalb

    photo = load_photo(name)
    # Segment big photos at <= 512 pixels a side (10x faster for the 1411-pixel retina) and scale labels back up.
    step = -(-max(photo.shape[:2]) // 512)
    small = photo[::step, ::step]
    min_size = max(50, small.shape[0] * small.shape[1] // 2000)  # object-sized pieces, whatever the photo size
    labels = felzenszwalb(small, scale=300, sigma=0.8, min_size=min_size)
    labels = labels.repeat(step, 0).repeat(step, 1)
    return labels[: photo.shape[0], : photo.shape[1]]


def _crop_and_resize(image: np.ndarray, top: int, left: int, side: int, size: int, nearest: bool) -> np.ndarray:
    crop = image[top : top + side, left : left + side]
    if side == size:
        return crop.copy()
    if nearest:  # labels: sample, never blend
        index = (np.arange(size) * side) // size
        return crop[index][:, index]
    mode = Image.BILINEAR if side < size else Image.BOX  # BOX = area average when shrinking
    return np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize((size, size), mode), np.float32)


def warm_object_mask(segments_HW: np.ndarray, rng: np.random.Generator, hidden_probability: float = 0.4):
    """(mask bool [H, W], object masks list, hidden-object mask bool [H, W]): one to three photo segments of
    2%–35% of the crop each, plus with ``hidden_probability`` an ellipse the visible image will not show."""
    size_h, size_w = segments_HW.shape
    ids, counts = np.unique(segments_HW, return_counts=True)
    share = counts / segments_HW.size
    candidates = ids[(share >= 0.02) & (share <= 0.35)]
    objects = []
    if len(candidates):
        chosen = rng.choice(candidates, size=min(len(candidates), int(rng.integers(1, 4))), replace=False)
        objects = [segments_HW == c for c in chosen]
    hidden = np.zeros((size_h, size_w), bool)
    if rng.random() < hidden_probability:
        cy, cx = rng.uniform(0.2, 0.8) * size_h, rng.uniform(0.2, 0.8) * size_w
        ry, rx = rng.uniform(0.12, 0.25) * size_h, rng.uniform(0.05, 0.12) * size_w  # upright, person-like
        yy, xx = np.mgrid[:size_h, :size_w]
        hidden = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        objects.append(hidden)
    mask = np.zeros((size_h, size_w), bool)
    for obj in objects:
        mask |= obj
    return mask, objects, hidden


def render_infrared(luma_HW: np.ndarray, objects: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A thermal-like image of a scene: cool low-texture background, warm (bright) objects, soft edges, noise."""
    size = min(luma_HW.shape)
    shapes = gaussian_filter(luma_HW, sigma=max(1.0, size / 24))  # heat blurs texture away, keeps layout
    ambient, contrast = rng.uniform(0.12, 0.35), rng.uniform(0.15, 0.4)
    drift = rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, luma_HW.shape[0])[:, None]  # e.g. sky colder than ground
    background = ambient + contrast * (shapes - shapes.mean()) + drift
    detail = gaussian_filter(luma_HW, 1.0) - gaussian_filter(luma_HW, 4.0)  # a trace of the object's structure
    infrared = background
    for obj in objects:
        weight = gaussian_filter(obj.astype(np.float32), 1.0)  # soft edges: heat spreads a little
        temperature = rng.uniform(0.65, 0.95) + 0.25 * detail
        infrared = infrared * (1 - weight) + temperature * weight
    infrared = infrared + rng.normal(0, rng.uniform(0.004, 0.02), luma_HW.shape)
    return np.clip(infrared, 0, 1).astype(np.float32)


def low_light(luma_HW: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Night: dimmed by 0.12–0.45, gamma 1.2–2.0 (shadows sink first), shot + read noise."""
    dark = rng.uniform(0.12, 0.45) * luma_HW ** rng.uniform(1.2, 2.0)
    noise = rng.normal(0, 1, luma_HW.shape) * np.sqrt(rng.uniform(0.0, 0.0004) + rng.uniform(0.0, 0.002) * dark)
    return np.clip(dark + noise, 0, 1).astype(np.float32)


def fog(luma_HW: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fog by the scattering model: ``J t + A (1 - t)``, ``t = exp(-beta d)``, ``d`` a smooth random depth that
    grows towards the top of the frame; beta 1–3, airlight 0.7–0.95."""
    h, w = luma_HW.shape
    field = gaussian_filter(rng.normal(size=(h, w)), sigma=max(h, w) / 5)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    depth = 0.3 + 0.4 * field + 0.3 * np.linspace(1, 0, h)[:, None]
    transmission = np.exp(-rng.uniform(1.0, 3.0) * depth)
    foggy = luma_HW * transmission + rng.uniform(0.7, 0.95) * (1 - transmission)
    return np.clip(foggy + rng.normal(0, 0.005, (h, w)), 0, 1).astype(np.float32)


def synthesize_pair(
    photo_name: str,
    rng: np.random.Generator,
    image_size: int = 64,
    degradation: str | None = None,
    max_zoom_out: float = 2.5,
) -> dict[str, np.ndarray | str]:
    """One registered pair from a random crop of a photo (side ``image_size`` to ``max_zoom_out`` times that,
    resized to ``image_size``): ``{"ir", "vis", "mask", "clean"}`` float32 [H, W] in [0, 1] and
    ``"degradation"`` (random among :data:`DEGRADATIONS` if None)."""
    if degradation is None:
        degradation = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; accepted: {', '.join(DEGRADATIONS)}")
    photo, segments = load_photo(photo_name), photo_segments(photo_name)
    short = min(photo.shape[:2])
    if short < image_size:
        raise ValueError(
            f"image_size {image_size} is larger than photo {photo_name!r} ({photo.shape[1]}x{photo.shape[0]})"
        )
    side = int(rng.integers(image_size, max(image_size, min(short, int(image_size * max_zoom_out))) + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    clean = _crop_and_resize(luminance(photo), top, left, side, image_size, nearest=False)
    crop_segments = _crop_and_resize(segments, top, left, side, image_size, nearest=True)
    if rng.random() < 0.5:  # mirror: twice the scenes
        clean, crop_segments = clean[:, ::-1].copy(), crop_segments[:, ::-1].copy()
    mask, objects, hidden = warm_object_mask(crop_segments, rng)
    infrared = render_infrared(clean, objects, rng)
    # The hidden object is dark in the visible image: it is there, but unlit.
    scene = np.where(hidden, clean * 0.2, clean)
    visible = low_light(scene, rng) if degradation == "low_light" else fog(scene, rng)
    return {"ir": infrared, "vis": visible, "mask": mask.astype(np.float32), "clean": clean.astype(np.float32),
            "degradation": degradation}


def _to_sample(pair: dict, name: str) -> dict:
    sample = {key: torch.from_numpy(np.ascontiguousarray(pair[key]))[None] for key in ("ir", "vis", "mask")}
    sample["name"] = name
    return sample


class SyntheticFusionDataset(Dataset):
    """``num_samples`` synthetic pairs from the photos of ``split``; item ``i`` is a pure function of
    ``(seed, i)``. Items are dicts ``{"ir", "vis", "mask"}`` of float32 [1, S, S] plus ``"name"``
    (``"<photo>/<degradation>/<i>"``)."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        degradations: Sequence[str] = DEGRADATIONS,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if num_samples < 1 or image_size < 8:
            raise ValueError(f"need num_samples >= 1 and image_size >= 8, got {num_samples} and {image_size}")
        unknown = set(degradations) - set(DEGRADATIONS)
        if unknown or not degradations:
            raise ValueError(f"degradations must be a non-empty subset of {DEGRADATIONS}, got {tuple(degradations)}")
        self.photo_names = SPLITS[split]
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.degradations = tuple(degradations)

    def __len__(self) -> int:
        return self.num_samples

    def recipe(self, i: int) -> tuple[str, str, np.random.Generator]:
        """(photo name, degradation, the generator that renders the rest) of item ``i``."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"item {i} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, i])
        photo = self.photo_names[int(rng.integers(len(self.photo_names)))]
        return photo, self.degradations[int(rng.integers(len(self.degradations)))], rng

    def pair(self, i: int) -> dict:
        """The raw pair of item ``i`` (numpy, with the clean luminance it was made from)."""
        photo, degradation, rng = self.recipe(i)
        pair = synthesize_pair(photo, rng, self.image_size, degradation)
        pair["photo"] = photo
        return pair

    def __getitem__(self, i: int) -> dict:
        pair = self.pair(i)
        return _to_sample(pair, f"{pair['photo']}/{pair['degradation']}/{i}")


# ----------------------------------------------------------------------------------------------------------
# Registered pairs in folders: root/ir/*.png + root/vis/*.png
# ----------------------------------------------------------------------------------------------------------


def load_grey(path: str | Path) -> np.ndarray:
    """An image file as float32 luminance [H, W] in [0, 1] (colour via BT.601 luma, as PIL's "L"). 16-bit
    frames (PIL modes "I;16*", or "I" holding 0..65535) keep their precision and are divided by 65535, as
    FusionPipeline does: no per-image stretching, so training and inference see the same scale."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(f"{path}: integer image with values outside 0..65535 (range "
                                 f"{array.min():g}..{array.max():g}); accepted: 8-bit or 16-bit images")
            return (array / 65535.0).astype(np.float32)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def find_pairs(root: str | Path, ir_dir: str = "ir", vis_dir: str = "vis") -> list[tuple[Path, Path]]:
    """(infrared, visible) paths of ``root/ir_dir`` and ``root/vis_dir`` matched by file stem (extensions may
    differ), sorted. Files present on one side only are an error: unregistered data should not pass silently."""
    root = Path(root)
    sides = {}
    for name in (ir_dir, vis_dir):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a directory; a paired folder holds {ir_dir}/ and {vis_dir}/ with images of "
                f"the same names (the M3FD / LLVIP / TNO layout; set ir_dir / vis_dir for other names)"
            )
        stems = {}
        for p in visible_files(folder, IMAGE_EXTENSIONS, recursive=False):
            if p.stem in stems:
                raise ValueError(f"two images named {p.stem!r} in {str(folder)!r}: {stems[p.stem].name} and {p.name}")
            stems[p.stem] = p
        sides[name] = stems
    ir_only = sorted(set(sides[ir_dir]) - set(sides[vis_dir]))
    vis_only = sorted(set(sides[vis_dir]) - set(sides[ir_dir]))
    if ir_only or vis_only:
        raise ValueError(
            f"unpaired images under {str(root)!r}: only in {ir_dir}/: {ir_only[:5]}, only in {vis_dir}/: {vis_only[:5]}"
        )
    if not sides[ir_dir]:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(root / ir_dir)!r}")
    return [(sides[ir_dir][s], sides[vis_dir][s]) for s in sorted(sides[ir_dir])]


class PairedFolderDataset(Dataset):
    """Registered pairs from files. ``crop=None`` returns whole images (batch size 1 unless they share a size);
    otherwise a ``crop`` x ``crop`` window at the same place in both images: random (and a random left-right
    flip) with ``random_crop``, else the centre. Items: ``{"ir", "vis"}`` float32 [1, H, W], ``"name"``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], crop: int | None = None, random_crop: bool = False):
        self.pairs, self.crop, self.random_crop = list(pairs), crop, random_crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict:
        ir_path, vis_path = self.pairs[j]
        infrared, visible = load_grey(ir_path), load_grey(vis_path)
        if infrared.shape != visible.shape:
            raise ValueError(
                f"pair {ir_path.stem!r} is not registered: infrared {infrared.shape[1]}x{infrared.shape[0]} vs "
                f"visible {visible.shape[1]}x{visible.shape[0]} pixels"
            )
        if self.crop is not None:
            infrared, visible = self._window(infrared, visible, ir_path.stem)
        return {"ir": torch.from_numpy(infrared)[None], "vis": torch.from_numpy(visible)[None], "name": ir_path.stem}

    def _window(self, infrared: np.ndarray, visible: np.ndarray, name: str):
        h, w = infrared.shape
        if min(h, w) < self.crop:
            raise ValueError(f"pair {name!r} ({w}x{h}) is smaller than the crop {self.crop}")
        if self.random_crop:
            top, left = int(torch.randint(h - self.crop + 1, ())), int(torch.randint(w - self.crop + 1, ()))
        else:
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        infrared, visible = infrared[window], visible[window]
        if self.random_crop and torch.rand(()) < 0.5:
            infrared, visible = infrared[:, ::-1], visible[:, ::-1]
        return np.ascontiguousarray(infrared), np.ascontiguousarray(visible)
