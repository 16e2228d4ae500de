"""Real photographs that ship inside installed packages, as the clean images of our synthetic low-level-vision
data: scikit-image's test photos, scikit-learn's two sample photos and gradio's example photos. Nothing is
downloaded.

Deweathering (MoFME) and infrared/visible fusion (MoE-Fusion) both build their training pairs from these
photos. The splits are by photograph, never by crop: "train" for training, "val" for choosing when to stop,
"test" for the benchmarks, so a test score is on scenes the model has not seen and was not selected on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

# Natural photographs only (no logos, colour wheels or text pages: they teach nothing about weather or heat).
# Greyscale ones are used as grey RGB. Left out: skimage's `cat` (it is `chelsea` again), its blurred
# `clock_motion`, gradio's `cheetah2.jpg` (a cut-out on a painted checkerboard) and its copies.
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "camera", "moon", "coins", "brick", "grass", "gravel", "cell", "motorcycle",
)
SKLEARN_PHOTOS = {"china": "china.jpg", "flower": "flower.jpg"}  # sklearn.datasets.load_sample_image
GRADIO_PHOTOS = {  # gradio.media.get_image: the example photos gradio ships for its demos
    "cheetah_running": "cheetah.jpg", "cheetah_face": "cheetah1.jpg", "lion": "lion.jpg", "tower": "tower.jpg",
    "groot": "groot.jpeg",
}
PHOTO_NAMES = (*SKIMAGE_PHOTOS, *SKLEARN_PHOTOS, *GRADIO_PHOTOS)
TEST_PHOTOS = ("chelsea", "coffee", "camera")
VAL_PHOTOS = ("lion", "flower")
TRAIN_PHOTOS = tuple(name for name in PHOTO_NAMES if name not in TEST_PHOTOS + VAL_PHOTOS)
SPLITS = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS, "test": TEST_PHOTOS, "all": PHOTO_NAMES}


def _read(name: str) -> np.ndarray:
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        return load_sample_image(SKLEARN_PHOTOS[name])
    if name in GRADIO_PHOTOS:
        from gradio.media import get_image

        with Image.open(get_image(GRADIO_PHOTOS[name])) as image:
            return np.asarray(image.convert("RGB"))
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view; the right one is the same scene
    return getattr(skimage.data, name)()


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One photograph as float32 RGB [H, W, 3] in [0, 1]."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; accepted: {', '.join(PHOTO_NAMES)}")
    image = np.asarray(_read(name), dtype=np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def photos(split: str = "train") -> list[tuple[str, np.ndarray]]:
    """(name, image) for every photo of a split: "train", "val", "test" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return [(name, load_photo(name)) for name in SPLITS[split]]
