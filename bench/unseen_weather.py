"""A second weather renderer, for the benchmark only: nothing under ``moezoo.training`` imports it, so a model
trained on :mod:`moezoo.training.datasets.weather` has never seen weather drawn this way.

Every kind is drawn by a different method from the training renderer's, the way another data set's authors
would have drawn it:

- rain: anti-aliased line segments (PIL, drawn at twice the size and box-filtered down) of gamma-distributed
  lengths and 0.5-1.5 px widths, alpha-composited in a blue-grey over a rain veil (a loss of contrast), where
  training screen-blends motion-blurred dots;
- raindrops: out-of-focus drops, where training refracts: each ellipse shows the scene strongly defocused
  (blur 3-6 px), with a darker rim and a specular highlight;
- snow: discs of log-normal size composited over, the larger (nearer) ones defocused more, where training
  screen-blends Gaussian blobs;
- haze: fog with colour: the depth grows along a random direction with a fog bank at a random height, the
  airlight is tinted warm or cool, and blue scatters more than red (a transmission per channel), where
  training uses one grey-ish airlight and one transmission for all channels.

``unseen_weather_test_set`` gives the held-out test photographs of :mod:`moezoo.training.datasets.photos` with
this weather, as ``weather_test_set`` does with the training renderer's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from moezoo.training.datasets.photos import photos
# the input check and the geometry only: the look of this renderer's weather is this file's own
from moezoo.training.datasets.weather import check_image, ellipse_window

UNSEEN_WEATHER = ("rain_streaks", "raindrops", "snow", "haze")


def _supersampled_layer(H: int, W: int, draw_shapes, scale: int = 2) -> np.ndarray:
    """A float [H, W] coverage layer in [0, 1]: ``draw_shapes(ImageDraw, scale)`` draws grey levels on a canvas
    ``scale`` times larger, which is box-filtered down (anti-aliasing)."""
    canvas = Image.new("L", (W * scale, H * scale), 0)
    draw_shapes(ImageDraw.Draw(canvas), scale)
    return np.asarray(canvas.resize((W, H), Image.Resampling.BOX), dtype=np.float32) / 255.0


def rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    H, W, _ = image.shape
    wind = math.radians(rng.normal(0.0, 15.0))
    mean_length = rng.uniform(8, 24)
    count = int(rng.uniform(0.0015, 0.006) * H * W)

    def draw_streaks(draw: ImageDraw.ImageDraw, s: int) -> None:
        for _ in range(count):
            length = rng.gamma(4.0, mean_length / 4.0) * s
            angle = wind + math.radians(rng.normal(0.0, 3.0))
            x0, y0 = rng.uniform(0, W * s), rng.uniform(-length, H * s)
            x1, y1 = x0 + length * math.sin(angle), y0 + length * math.cos(angle)
            draw.line([(x0, y0), (x1, y1)], fill=int(rng.uniform(120, 255)), width=int(rng.integers(1, 4)))

    alpha = _supersampled_layer(H, W, draw_streaks)[..., None] * rng.uniform(0.6, 1.0)
    colour = np.array([0.78, 0.82, 0.88], np.float32) + rng.uniform(-0.05, 0.05)
    veil = rng.uniform(0.0, 0.12)
    out = image * (1 - veil) + veil * colour
    return out * (1 - alpha) + colour * alpha


def raindrops(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    H, W, _ = image.shape
    sigma = rng.uniform(3.0, 6.0)
    defocused = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    out = image.copy()
    mean_radius = rng.uniform(4.0, 8.0)
    count = rng.poisson(rng.uniform(0.05, 0.2) * H * W / (math.pi * mean_radius**2 * 1.25))
    for _ in range(count):
        r = rng.gamma(4.0, mean_radius / 4.0) + 1.0
        ry, rx = r * rng.uniform(0.9, 1.3), r  # drops run down: a little taller than wide
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        window = ellipse_window((H, W), cy, cx, ry, rx, margin=2)
        if window is None:
            continue
        (y0, y1, x0, x1), yy, xx, dist = window
        inside = np.clip((1.0 - dist) * r, 0.0, 1.0)[..., None]  # a 1 px soft edge
        rim = 0.3 * np.exp(-(((dist - 0.9) / 0.12) ** 2))[..., None]
        glint = 0.35 * np.exp(-((yy - cy + 0.45 * ry) ** 2 + (xx - cx + 0.35 * rx) ** 2) / (2 * (0.15 * r + 0.5) ** 2))
        drop = np.clip(defocused[y0:y1, x0:x1] * (1 - rim) + glint[..., None], 0.0, 1.0)
        out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - inside) + drop * inside
    return out


def snow(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    H, W, _ = image.shape
    cover = np.zeros((H, W), np.float32)
    for depth in range(3):  # far (small, sharp) to near (large, defocused)
        count = int(rng.uniform(0.0005, 0.004) * H * W / (1 + 2 * depth))
        radius = rng.lognormal(math.log(0.6 + 0.9 * depth), 0.3, count)

        def draw_flakes(draw: ImageDraw.ImageDraw, s: int) -> None:
            for r in radius:
                y, x = rng.uniform(0, H * s), rng.uniform(0, W * s)
                draw.ellipse([x - r * s, y - r * s, x + r * s, y + r * s], fill=int(rng.uniform(170, 255)))

        layer = _supersampled_layer(H, W, draw_flakes)
        cover = np.maximum(cover, ndimage.gaussian_filter(layer, 0.3 + 0.6 * depth) * (1.0 + 0.5 * depth))
    alpha = np.clip(cover, 0.0, 1.0)[..., None]
    out = image * (1 - rng.uniform(0.0, 0.1)) + rng.uniform(0.0, 0.08)
    return out * (1 - alpha) + rng.uniform(0.88, 1.0) * alpha


def haze(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    H, W, _ = image.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    along = (np.cos(direction) * (yy / H - 0.5) + np.sin(direction) * (xx / W - 0.5)) + 0.5  # 0..1-ish
    bank = np.exp(-(((yy / H) - rng.uniform(0.2, 0.8)) / rng.uniform(0.1, 0.3)) ** 2)
    depth = rng.uniform(0.3, 0.9) + rng.uniform(0.0, 0.7) * along + rng.uniform(0.0, 0.6) * bank
    beta = rng.uniform(0.5, 1.5) * np.array([1.0, 1.06, 1.15], np.float32)  # red, green, blue
    transmission = np.exp(-depth[..., None] * beta)
    tint = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.1) * np.array([1.0, 0.3, -1.0], np.float32)
    airlight = np.clip(rng.uniform(0.65, 0.9) + tint, 0.0, 1.0)
    return image * transmission + airlight * (1 - transmission)


_RENDERERS = {"rain_streaks": rain, "raindrops": raindrops, "snow": snow, "haze": haze}


def add_unseen_weather(image: np.ndarray, weather: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (float RGB [H, W, 3] in [0, 1]) with ``weather`` drawn by this renderer, float32 in [0, 1]."""
    if weather not in _RENDERERS:
        raise ValueError(f"unknown weather {weather!r}; accepted: {', '.join(UNSEEN_WEATHER)}")
    image = np.asarray(image, dtype=np.float32)
    check_image(image)
    return np.clip(_RENDERERS[weather](image, rng), 0.0, 1.0).astype(np.float32)


def unseen_weather_test_set(weather: str, seed: int = 0, split: str = "test") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(photo name, degraded, clean) for every whole photograph of ``split`` with ``weather`` drawn here."""
    if weather not in _RENDERERS:
        raise ValueError(f"unknown weather {weather!r}; accepted: {', '.join(UNSEEN_WEATHER)}")
    index = UNSEEN_WEATHER.index(weather)
    return [(name, add_unseen_weather(clean, weather, np.random.default_rng([seed, 100 + index, i])), clean)
            for i, (name, clean) in enumerate(photos(split))]
