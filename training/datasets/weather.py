"""Weather data for deweathering (MoFME), as plain numpy/torch code (no Lightning): synthetic rain streaks,
raindrops, snow and haze on the photographs that installed packages ship (:mod:`.photos`), and paired folders of
real benchmarks.
The DataModules that wrap them are in :mod:`moezoo.training.datamodules.weather`.

Every item is a dict (:class:`RestorationSample`); :func:`collate_restoration_batch` stacks items into the
batch format of every restoration loader::

    {"input": float32 [B, 3, H, W] in [0, 1] (degraded), "target": float32 [B, 3, H, W] in [0, 1] (clean),
     "weather": int64 [B] (index into the module's ``weather_types``; -1: unknown)}

Images are in [0, 1] here (not [-1, 1] as in :mod:`moezoo.training.datasets.images`): PSNR and SSIM are
defined on that range.

- :func:`add_weather` (and one function per kind) degrades an RGB float image with a seeded numpy Generator.
  All sizes (streak length, drop radius, flake size, haze correlation length) are in pixels, not fractions
  of the image, so 64x64 training crops and whole test photos see weather at the same scale.
- :class:`SyntheticWeatherDataset`: crops of :mod:`moezoo.training.datasets.photos` with one weather kind
  each; train and validation use different photographs (split by photo, never by crop). Item ``i`` of seed
  ``s`` is always the same pair, and the weather kinds take turns (``i mod K``). Every kind draws its look
  (angles, lengths, widths, opacities, sizes, densities, depth maps) per image from wide ranges, so a model
  meets many weathers of one kind, not one.
- :func:`weather_test_set`: whole held-out photographs with each weather, for the benchmark and the app.
- :class:`PairedFolderDataset`: ``root/input/*`` + ``root/gt/*`` matched by file name — the layout of
  Allweather, Outdoor-Rain and Snow100K (folder names are arguments).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, visible_files
from .photos import photos

__all__ = [
    "WEATHER_TYPES",
    "RestorationSample",
    "RestorationBatch",
    "collate_restoration_batch",
    "add_rain_streaks",
    "add_raindrops",
    "add_snow",
    "add_haze",
    "add_weather",
    "check_image",
    "ellipse_window",
    "check_weather_types",
    "weather_test_set",
    "SyntheticWeatherDataset",
    "PairedFolderDataset",
]

WEATHER_TYPES = ("rain_streaks", "raindrops", "snow", "haze")


class RestorationSample(TypedDict):
    input: torch.Tensor  # float32 [3, H, W] in [0, 1], degraded
    target: torch.Tensor  # float32 [3, H, W] in [0, 1], clean
    weather: int  # index into weather_types, -1 unknown


class RestorationBatch(TypedDict):
    input: torch.Tensor  # float32 [B, 3, H, W]
    target: torch.Tensor  # float32 [B, 3, H, W]
    weather: torch.Tensor  # int64 [B]


def collate_restoration_batch(samples: Sequence[RestorationSample]) -> RestorationBatch:
    return {
        "input": torch.stack([s["input"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "weather": torch.tensor([s["weather"] for s in samples], dtype=torch.long),
    }


def _to_tensor(image_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_HWC, dtype=np.float32)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Weather synthesis (numpy, float32 RGB [H, W, 3] in [0, 1] -> same)
# ----------------------------------------------------------------------------------------------------------


def check_image(image: np.ndarray) -> None:
    """Refuse anything but an RGB array [H, W, 3] (what every renderer of weather draws on), saying what came."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"weather is added to float RGB arrays [H, W, 3] in [0, 1], got {got}")


def _screen(image: np.ndarray, layer_HW: np.ndarray) -> np.ndarray:
    """Light added as a screen blend: 1 - (1 - image)(1 - layer); bright things stay bright, nothing clips."""
    return 1.0 - (1.0 - image) * (1.0 - np.clip(layer_HW, 0.0, 1.0)[..., None])


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised anti-aliased line of ``length`` pixels at ``angle_deg`` from vertical (motion blur)."""
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size, size), np.float32)
    theta = math.radians(angle_deg)
    c = (size - 1) / 2
    for t in np.linspace(-length / 2, length / 2, 4 * size):
        y, x = c + t * math.cos(theta), c + t * math.sin(theta)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < size and 0 <= xx < size:
                    kernel[yy, xx] += wy * wx
    return kernel / kernel.sum()


def _log_uniform(rng: np.random.Generator, low: float, high: float, size=None):
    """Log-uniform draws in [low, high]: as many small values as large ones per octave."""
    return np.exp(rng.uniform(math.log(low), math.log(high), size))


def add_rain_streaks(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: 1-3 layers of sparse seeds motion-blurred along slanted directions, screen-blended.

    Random per image: a wind angle -30..30 degrees from vertical. Random per layer, each drawn on its own:
    the angle within a few degrees of the wind's, length 4-32 px
    (log-uniform), width (a blur of 0.3-1.2 px across), seed density 0.4-2% of pixels (fewer for longer
    streaks), opacity 0.3-0.9; per streak, brightness 0.5-1.
    """
    check_image(image)
    H, W, _ = image.shape
    wind = rng.uniform(-30, 30)
    layers = np.zeros((H, W), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        length = float(_log_uniform(rng, 4, 32))
        density = float(_log_uniform(rng, 0.004, 0.02)) * min(1.0, 12.0 / length)
        seeds = (rng.random((H, W)) < density) * rng.uniform(0.5, 1.0, (H, W))
        kernel = _line_kernel(length, wind + rng.normal(0, 4))
        streaks = ndimage.convolve(seeds.astype(np.float32), kernel, mode="wrap")
        width = rng.uniform(0.3, 1.2)
        layers += ndimage.gaussian_filter(streaks, width) * length * width / 0.5 * rng.uniform(0.3, 0.9)
    return _screen(image, layers)


def ellipse_window(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, margin: int):
    """The pixels around an ellipse centred at (cy, cx) with radii (ry, rx), ``margin`` px beyond it, cut to the
    image: ``((y0, y1, x0, x1), yy, xx, dist)`` with the pixel coordinates and each pixel's elliptic distance
    from the centre (1 on the outline); None when none of it is inside the image."""
    H, W = shape
    y0, y1 = max(0, int(cy - ry - margin)), min(H, int(cy + ry + margin + 1))
    x0, x1 = max(0, int(cx - rx - margin)), min(W, int(cx + rx + margin + 1))
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (y0, y1, x0, x1), yy, xx, np.hypot((yy - cy) / ry, (xx - cx) / rx)


def add_raindrops(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Raindrops on the lens: ellipses that show a blurred, inverted (refracted) view of what is behind them.

    Radii 1.5-14 px, log-uniform (many small drops, a few large ones), aspect 0.7-1.3, covering 5-25% of the
    image (at least one drop). Each drop takes the image blurred by 0.5-2.5 px, mirrored through its centre and shrunk 2-4x (a
    water lens flips and minifies), slightly brightened, blended in with a soft edge.
    """
    check_image(image)
    H, W, _ = image.shape
    blurred = ndimage.gaussian_filter(image, sigma=(rng.uniform(0.5, 2.5),) * 2 + (0,))
    out = image.copy()
    low, high = 1.5, 14.0
    mean_r2 = (high**2 - low**2) / (2 * math.log(high / low))  # E[r^2] of the log-uniform radius
    # at least one drop: a 64 px training crop would otherwise often get none, an undegraded "degraded" input
    count = max(1, rng.poisson(rng.uniform(0.05, 0.25) * H * W / (math.pi * mean_r2)))
    for _ in range(count):
        r, aspect = float(_log_uniform(rng, low, high)), rng.uniform(0.7, 1.3)
        ry, rx = r * math.sqrt(aspect), r / math.sqrt(aspect)
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        window = ellipse_window((H, W), cy, cx, ry, rx, margin=1)
        if window is None:
            continue
        (y0, y1, x0, x1), yy, xx, dist = window
        alpha = np.clip((1.0 - dist) * r / 1.5, 0.0, 1.0) * rng.uniform(0.75, 0.95)  # ~1.5 px soft edge
        shrink = rng.uniform(0.25, 0.5)
        src_y = np.clip(cy - (yy - cy) * shrink, 0, H - 1)
        src_x = np.clip(cx - (xx - cx) * shrink, 0, W - 1)
        lens = np.stack([ndimage.map_coordinates(blurred[..., c], [src_y, src_x], order=1) for c in range(3)], -1)
        lens = np.clip(lens * 1.08 + 0.04, 0.0, 1.0)
        patch = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = patch * (1 - alpha[..., None]) + lens * alpha[..., None]
    return out


def _flakes(shape: tuple[int, int], rng: np.random.Generator, density: float, sigma: float) -> np.ndarray:
    """Gaussian blobs of std ``sigma`` px at Bernoulli(density) pixels, peak brightness 0.6-1."""
    seeds = (rng.random(shape) < density) * rng.uniform(0.6, 1.0, shape)
    return ndimage.gaussian_filter(seeds.astype(np.float32), sigma) * (2 * math.pi * sigma**2)


def add_snow(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Snow: a light veil and three depths of flakes (many small far ones, fewer medium, a few large near
    ones, each depth's size and density drawn), motion-blurred by wind half the time."""
    check_image(image)
    H, W, _ = image.shape
    veil = rng.uniform(0.0, 0.2)
    out = image * (1 - veil) + veil * rng.uniform(0.8, 0.95)
    layer = _flakes((H, W), rng, rng.uniform(0.004, 0.02), rng.uniform(0.4, 0.8))
    layer = layer + _flakes((H, W), rng, rng.uniform(0.001, 0.005), rng.uniform(0.9, 1.6))
    layer = layer + _flakes((H, W), rng, rng.uniform(0.0001, 0.001), rng.uniform(1.8, 3.0))
    if rng.random() < 0.5:
        layer = ndimage.convolve(layer, _line_kernel(rng.uniform(2, 8), rng.uniform(-60, 60)), mode="wrap")
    return _screen(out, layer)


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of std ``scale`` px, rescaled to unit standard deviation (the
    2-D filtered-noise std is 1 / (2 sqrt(pi) scale) in theory, so a small crop is not re-normalised)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale, mode="wrap")
    return field * (2 * math.sqrt(math.pi) * scale)


def add_haze(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Haze by the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)``.

    The depth map ``d`` is a random level, plus a ramp up the image (outdoors the far scene is higher in the
    frame), plus smooth variation of a random correlation length (8-80 px, log-uniform) and strength;
    ``beta`` 0.4-1.8; airlight ``A`` a light grey 0.6-0.98 with a random tint.
    """
    check_image(image)
    H, W, _ = image.shape
    ramp = np.linspace(1.0, 0.0, H, dtype=np.float32)[:, None] * rng.uniform(0.0, 0.6)
    variation = rng.uniform(0.0, 0.3) * _smooth_noise((H, W), rng, float(_log_uniform(rng, 8, 80)))
    depth = np.clip(rng.uniform(0.2, 1.0) + ramp + variation, 0.05, 2.0)
    transmission = np.exp(-rng.uniform(0.4, 1.8) * depth)[..., None]
    airlight = np.clip(rng.uniform(0.6, 0.98) + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0).astype(np.float32)
    return image * transmission + airlight * (1 - transmission)


_SYNTHESISERS = {
    "rain_streaks": add_rain_streaks,
    "raindrops": add_raindrops,
    "snow": add_snow,
    "haze": add_haze,
}


def add_weather(image: np.ndarray, weather: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (float RGB [H, W, 3] in [0, 1]) with ``weather`` (one of :data:`WEATHER_TYPES`), float32,
    clipped to [0, 1]."""
    if weather not in _SYNTHESISERS:
        raise ValueError(f"unknown weather {weather!r}; accepted: {', '.join(WEATHER_TYPES)}")
    out = _SYNTHESISERS[weather](np.asarray(image, dtype=np.float32), rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def check_weather_types(weather_types: Sequence[str]) -> tuple[str, ...]:
    """``weather_types`` as a tuple, if it is a non-empty subset of :data:`WEATHER_TYPES`; else a ValueError."""
    weather_types = tuple(weather_types)
    unknown = [w for w in weather_types if w not in _SYNTHESISERS]
    if not weather_types or unknown:
        raise ValueError(f"weather_types must be a non-empty subset of {', '.join(WEATHER_TYPES)}; got {weather_types}")
    return weather_types


def weather_test_set(weather: str, seed: int = 0, split: str = "test") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(photo name, degraded, clean) for every whole photograph of ``split`` with ``weather``; the same for
    the same seed. The benchmark's test images."""
    index = WEATHER_TYPES.index(weather) if weather in WEATHER_TYPES else -1
    if index < 0:
        raise ValueError(f"unknown weather {weather!r}; accepted: {', '.join(WEATHER_TYPES)}")
    return [
        (name, add_weather(clean, weather, np.random.default_rng([seed, index, i])), clean)
        for i, (name, clean) in enumerate(photos(split))
    ]


# ----------------------------------------------------------------------------------------------------------
# Synthetic weather on the bundled photographs
# ----------------------------------------------------------------------------------------------------------


class SyntheticWeatherDataset(Dataset):
    """``length`` (degraded, clean) crops of the photos of ``split``, one weather kind each.

    Item ``i``: generator ``default_rng([seed, i])`` picks a photo (uniformly), a ``crop_size`` crop, with
    ``augment`` a random flip / 90-degree rotation, and adds weather ``weather_types[i % K]``.

    Args:
        split: "train", "val", "test" or "all" (see :mod:`moezoo.training.datasets.photos`).
        crop_size: side of the square crops in pixels (at most the split's smallest photo side: 256 for
            "train" and "val", 300 for "test").
        length: number of items.
        weather_types: which kinds, in turn.
        seed: makes the items reproducible; use different seeds for different sets.
        augment: random flips and rotations.
    """

    def __init__(self, split: str = "train", crop_size: int = 64, length: int = 1000,
                 weather_types: Sequence[str] = WEATHER_TYPES, seed: int = 0, augment: bool = True):
        self.photo_names = [name for name, _ in photos(split)]
        self.photos = [image for _, image in photos(split)]
        smallest = min(min(p.shape[:2]) for p in self.photos)
        if not 1 <= crop_size <= smallest:
            raise ValueError(f"crop_size must be in [1, {smallest}] (the smallest {split} photo side), got {crop_size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.crop_size, self.length = split, crop_size, length
        self.weather_types = check_weather_types(weather_types)
        self.seed, self.augment = seed, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> RestorationSample:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, i])
        photo = self.photos[rng.integers(len(self.photos))]
        s = self.crop_size
        y, x = rng.integers(photo.shape[0] - s + 1), rng.integers(photo.shape[1] - s + 1)
        clean = photo[y : y + s, x : x + s]
        if self.augment:
            clean = np.rot90(clean, k=rng.integers(4))
            clean = clean[:, ::-1] if rng.random() < 0.5 else clean
        clean = np.ascontiguousarray(clean)
        kind = i % len(self.weather_types)
        degraded = add_weather(clean, self.weather_types[kind], rng)
        return {"input": _to_tensor(degraded), "target": _to_tensor(clean), "weather": kind}



# ----------------------------------------------------------------------------------------------------------
# Paired folders (Allweather, Outdoor-Rain, Snow100K...)
# ----------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    return {p.stem: p for p in visible_files(folder, IMAGE_EXTENSIONS, recursive=False)}


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


class PairedFolderDataset(Dataset):
    """Pairs ``root/<input_dir>/NAME.*`` (degraded) and ``root/<target_dir>/NAME.*`` (clean), matched by file
    name without extension.

    Args:
        root: the folder holding the two sub-folders.
        input_dir, target_dir: their names ("input"/"gt" in Allweather; Snow100K calls its inputs "synthetic").
        crop_size: crop each pair to this square (None: whole images; then use batch size 1 unless all images
            have one size).
        random_crop: a random crop and flip (training) instead of the centre crop.
        names: use only these pair names (for splits), in this order.
    """

    def __init__(self, root: str | Path, input_dir: str = "input", target_dir: str = "gt",
                 crop_size: int | None = 64, random_crop: bool = True, names: Sequence[str] | None = None):
        root = Path(root).expanduser()
        inputs, targets = _image_files(root / input_dir), _image_files(root / target_dir)
        paired = sorted(set(inputs) & set(targets))
        if not paired:
            raise ValueError(f"no image pairs in {root}: {len(inputs)} images in {input_dir}/, {len(targets)} in "
                             f"{target_dir}/, none with the same name (pairs are matched by file name)")
        self.names = list(paired if names is None else names)
        missing = [n for n in self.names if n not in inputs or n not in targets]
        if missing:
            raise ValueError(f"{len(missing)} requested pairs are not in {root}, e.g. {missing[:3]}")
        self.inputs, self.targets = inputs, targets
        self.crop_size, self.random_crop = crop_size, random_crop

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> RestorationSample:
        name = self.names[i]
        degraded, clean = _load_rgb(self.inputs[name]), _load_rgb(self.targets[name])
        if degraded.shape != clean.shape:
            raise ValueError(f"pair {name!r}: input {degraded.shape} and target {clean.shape} differ in size")
        if self.crop_size is not None:
            degraded, clean = self._crop(name, degraded, clean)
        return {"input": _to_tensor(degraded), "target": _to_tensor(clean), "weather": -1}

    def _crop(self, name: str, degraded: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, W, _ = degraded.shape
        s = self.crop_size
        if H < s or W < s:
            raise ValueError(f"pair {name!r} is {H}x{W}, smaller than crop_size {s}")
        if self.random_crop:
            y, x = np.random.randint(H - s + 1), np.random.randint(W - s + 1)
            flip = np.random.rand() < 0.5
        else:
            y, x, flip = (H - s) // 2, (W - s) // 2, False
        degraded, clean = degraded[y : y + s, x : x + s], clean[y : y + s, x : x + s]
        return (degraded[:, ::-1], clean[:, ::-1]) if flip else (degraded, clean)
