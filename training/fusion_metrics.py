"""The image-fusion quality metrics of the infrared/visible fusion literature, for one greyscale image each.

Images are 2-D arrays: uint8 (0..255) or float in [0, 1]; every metric works on the 0..255 scale in float64
(histogram metrics on the image rounded to 256 grey levels), as the usual MATLAB toolboxes do.

No-reference (the fused image alone):

- :func:`entropy` EN — Shannon entropy of the 256-bin grey-level histogram, in bits.
- :func:`standard_deviation` SD — ``sqrt(mean((F - mean F)^2))``.
- :func:`spatial_frequency` SF — ``sqrt(RF^2 + CF^2)``, RF / CF the root-mean-square of horizontal / vertical
  neighbour differences (each mean over the differences that exist).
- :func:`average_gradient` AG — mean over the ``(M-1) x (N-1)`` grid of ``sqrt((dx^2 + dy^2) / 2)`` with forward
  differences ``dx = F[i, j+1] - F[i, j]``, ``dy = F[i+1, j] - F[i, j]``.

With the sources (``A`` = infrared, ``B`` = visible):

- :func:`mutual_information` MI — ``MI(A, F) + MI(B, F)``, each from the 256x256 joint histogram, in bits.
- :func:`qabf` Qabf — Xydeas & Petrović's edge-preservation index: Sobel strength ``g`` and orientation
  ``alpha = atan(s_y / s_x)`` (``pi/2`` where ``s_x = 0``) with zero padding; per pixel
  ``G = min(g_A, g_F) / max(g_A, g_F)`` (0 if either is 0), ``Al = 1 - |alpha_A - alpha_F| / (pi/2)``,
  ``Q = Gg / (1 + exp(kg (G - Dg))) * Ga / (1 + exp(ka (Al - Da)))`` with (Gg, kg, Dg) = (0.9994, -15, 0.5) and
  (Ga, ka, Da) = (0.9879, -22, 0.8); ``Qabf = sum(Q_AF g_A + Q_BF g_B) / sum(g_A + g_B)``.
- :func:`ssim` — Wang et al.'s SSIM with an 11x11 Gaussian window (sigma 1.5), ``C1 = (0.01 * 255)^2``,
  ``C2 = (0.03 * 255)^2``, population (co)variances, mean over the pixels whose window fits in the image.
  Reported to each source: ``SSIM_ir = ssim(F, A)``, ``SSIM_vis = ssim(F, B)``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import convolve, gaussian_filter

__all__ = [
    "METRIC_NAMES",
    "to_255",
    "entropy",
    "standard_deviation",
    "spatial_frequency",
    "average_gradient",
    "mutual_information",
    "qabf",
    "ssim",
    "fusion_metrics",
]

METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "Qabf", "SSIM_ir", "SSIM_vis")

_QABF_G = (0.9994, -15.0, 0.5)  # (Gamma, kappa, sigma) of the edge-strength sigmoid
_QABF_A = (0.9879, -22.0, 0.8)  # ... of the orientation sigmoid
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def to_255(image, name: str = "image") -> np.ndarray:
    """A 2-D uint8 image or float image in [0, 1] -> float64 on the 0..255 scale."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D greyscale image [H, W], got shape {array.shape}")
    if min(array.shape) < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be uint8 (0..255) or float in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all() or array.min() < -1e-6 or array.max() > 1 + 1e-6:
        raise ValueError(f"a float {name} must hold finite values in [0, 1], got range [{array.min()}, {array.max()}]")
    return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0


def _grey_levels(image_255: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image_255), 0, 255).astype(np.int64)


def _check_pair(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def entropy(fused) -> float:
    """EN: ``-sum p log2 p`` over the 256 grey levels of the fused image."""
    counts = np.bincount(_grey_levels(to_255(fused, "fused")).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def standard_deviation(fused) -> float:
    """SD on the 0..255 scale (population standard deviation)."""
    return float(to_255(fused, "fused").std())


def spatial_frequency(fused) -> float:
    """SF = sqrt(RF^2 + CF^2), the RMS of horizontal (RF) and vertical (CF) neighbour differences."""
    f = to_255(fused, "fused")
    row_frequency_sq = np.mean(np.diff(f, axis=1) ** 2)
    column_frequency_sq = np.mean(np.diff(f, axis=0) ** 2)
    return float(np.sqrt(row_frequency_sq + column_frequency_sq))


def average_gradient(fused) -> float:
    """AG: mean of ``sqrt((dx^2 + dy^2) / 2)`` over the (M-1) x (N-1) forward-difference grid."""
    f = to_255(fused, "fused")
    dx = f[:-1, 1:] - f[:-1, :-1]
    dy = f[1:, :-1] - f[:-1, :-1]
    return float(np.mean(np.sqrt((dx**2 + dy**2) / 2)))


def _mutual_information_pair(a_255: np.ndarray, f_255: np.ndarray) -> float:
    joint = np.zeros((256, 256))
    np.add.at(joint, (_grey_levels(a_255).ravel(), _grey_levels(f_255).ravel()), 1.0)
    joint /= joint.sum()
    pa, pf = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pa @ pf)[nz])).sum())


def mutual_information(fused, infrared, visible) -> float:
    """MI = MI(infrared, fused) + MI(visible, fused), in bits."""
    f, a, b = to_255(fused, "fused"), to_255(infrared, "infrared"), to_255(visible, "visible")
    _check_pair(f, a, "fused and infrared")
    _check_pair(f, b, "fused and visible")
    return _mutual_information_pair(a, f) + _mutual_information_pair(b, f)


def _sobel_strength_orientation(image_255: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sx = convolve(image_255, _SOBEL_X, mode="constant")
    sy = convolve(image_255, _SOBEL_X.T, mode="constant")
    strength = np.sqrt(sx**2 + sy**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        orientation = np.where(sx == 0, np.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return strength, orientation


def _edge_preservation(g_a, alpha_a, g_f, alpha_f) -> np.ndarray:
    """Q^{AF} per pixel: how much of source A's edge strength and orientation survives in F."""
    both = (g_a > 0) & (g_f > 0)
    safe_a, safe_f = np.where(both, g_a, 1.0), np.where(both, g_f, 1.0)
    relative_strength = np.where(both, np.minimum(safe_a, safe_f) / np.maximum(safe_a, safe_f), 0.0)
    relative_orientation = 1 - np.abs(alpha_a - alpha_f) / (np.pi / 2)
    (gamma_g, kappa_g, sigma_g), (gamma_a, kappa_a, sigma_a) = _QABF_G, _QABF_A
    q_strength = gamma_g / (1 + np.exp(kappa_g * (relative_strength - sigma_g)))
    q_orientation = gamma_a / (1 + np.exp(kappa_a * (relative_orientation - sigma_a)))
    return q_strength * q_orientation


def qabf(fused, infrared, visible) -> float:
    """Qabf in [0, 1]: the gradient-weighted share of the sources' edges preserved in the fused image
    (0 when neither source has an edge)."""
    f, a, b = to_255(fused, "fused"), to_255(infrared, "infrared"), to_255(visible, "visible")
    _check_pair(f, a, "fused and infrared")
    _check_pair(f, b, "fused and visible")
    g_f, alpha_f = _sobel_strength_orientation(f)
    g_a, alpha_a = _sobel_strength_orientation(a)
    g_b, alpha_b = _sobel_strength_orientation(b)
    total = (g_a + g_b).sum()
    if total == 0:
        return 0.0
    preserved = (
        _edge_preservation(g_a, alpha_a, g_f, alpha_f) * g_a + _edge_preservation(g_b, alpha_b, g_f, alpha_f) * g_b
    )
    return float(preserved.sum() / total)


def ssim(image, reference, sigma: float = 1.5) -> float:
    """SSIM between two images (Gaussian window sigma 1.5 truncated to 11x11, K1 0.01, K2 0.03, range 255)."""
    x, y = to_255(image, "image"), to_255(reference, "reference")
    _check_pair(x, y, "image and reference")
    radius = int(3.5 * sigma + 0.5)
    if min(x.shape) < 2 * radius + 1:
        raise ValueError(f"ssim needs images of at least {2 * radius + 1}x{2 * radius + 1} pixels, got {x.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return gaussian_filter(z, sigma, truncate=3.5, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    inner = ssim_map[radius:-radius, radius:-radius]  # only windows that fit in the image
    return float(inner.mean())


def fusion_metrics(fused, infrared, visible) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for one fused image and its two sources."""
    return {
        "EN": entropy(fused),
        "SD": standard_deviation(fused),
        "SF": spatial_frequency(fused),
        "AG": average_gradient(fused),
        "MI": mutual_information(fused, infrared, visible),
        "Qabf": qabf(fused, infrared, visible),
        "SSIM_ir": ssim(fused, infrared),
        "SSIM_vis": ssim(fused, visible),
    }
