"""The photographs that ship with scikit-image, as the clean images of our synthetic low-level-vision data.

Deweathering (MoFME) and infrared/visible fusion (MoE-Fusion) both build their training pairs from these
photos. Train and test are split by photograph, never by crop, so a test score is on scenes the model has
not seen.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Natural photographs only (no logos, colour wheels or text pages: they teach nothing about weather or heat).
# Greyscale ones are used as grey RGB. `cat` is `chelsea` again, so it is left out.
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "camera", "moon", "coins", "brick", "grass", "gravel", "cell", "motorcycle",
)
TEST_PHOTOS = ("chelsea", "coffee", "camera")
TRAIN_PHOTOS = tuple(name for name in PHOTO_NAMES if name not in TEST_PHOTOS)
SPLITS = {"train": TRAIN_PHOTOS, "test": TEST_PHOTOS, "all": PHOTO_NAMES}


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One photograph as float32 RGB [H, W, 3] in [0, 1]."""
    import skimage.data

    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; accepted: {', '.join(PHOTO_NAMES)}")
    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]  # the left view; the right one is the same scene
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image, dtype=np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def photos(split: str = "train") -> list[tuple[str, np.ndarray]]:
    """(name, image) for every photo of a split: "train", "test" or "all"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return [(name, load_photo(name)) for name in SPLITS[split]]
