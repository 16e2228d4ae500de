"""Variety and fidelity of generated samples, measured on features (numpy/scipy/torch, no Lightning).

The benches (``bench/dit_quality.py``, ``bench/video_quality.py``) pass the penultimate features of their judge
network, for generated samples and for held-out real ones the judge did not train on. Everything is computed in
float64 whatever the input dtype.

Fréchet distance (:func:`frechet_distance`; Heusel et al. 2017, "FID" when the features are Inception's): fit
a Gaussian to each feature set (mean, covariance with the unbiased ``N - 1`` normalisation) and take the
2-Wasserstein distance between the two Gaussians, ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.
The square root of the (non-symmetric) product is scipy's :func:`scipy.linalg.sqrtm`, with the two safeguards of
the reference implementations: when it comes out non-finite (a singular product, e.g. fewer samples than
feature dimensions), ``eps`` is added to both covariances' diagonals and it is recomputed; a complex result
whose diagonal's imaginary part is below ``1e-3`` is rounding and only its real part is kept (a larger one
raises). The distance is biased upwards by the sample size: compare values at equal sample counts only.

Precision and recall (:func:`precision_recall`; Kynkäänniemi et al. 2019, "Improved precision and recall
metric for assessing generative models"): each set's manifold is the union of balls around its samples whose
radius is the Euclidean distance to the sample's k-th nearest neighbour in its own set (the sample itself not
counted). Precision = share of generated samples inside the real manifold (fidelity: no sample far from all
real ones); recall = share of real samples inside the generated manifold (variety: the real distribution is
covered). A generator that draws one prototype per class keeps precision high and loses recall.

Within-class diversity (:func:`within_class_diversity`, :func:`diversity_ratio`): per class, the mean
Euclidean distance over all unordered pairs of distinct samples of that class; the ratio is the generated
diversity over the real one, averaged over the classes present in both sets (1 = as varied as real data,
below 1 = less varied).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "FRECHET_EPS",
    "FRECHET_IMAGINARY_ATOL",
    "PrecisionRecall",
    "as_features",
    "gaussian_statistics",
    "frechet_distance_gaussians",
    "frechet_distance",
    "pairwise_distances",
    "knn_radii",
    "share_inside_manifold",
    "precision_recall",
    "within_class_diversity",
    "diversity_ratio",
    "generation_metrics",
]

# The reference implementations' safeguards for the matrix square root (see the module docstring).
FRECHET_EPS = 1e-6
FRECHET_IMAGINARY_ATOL = 1e-3
# Rows of the first set per block of pairwise distances: bounds memory to ~block x N x 8 bytes, whatever N.
_DISTANCE_BLOCK = 1024


def as_features(features, name: str = "features") -> np.ndarray:
    """``features`` (numpy array, torch tensor or nested sequence) as a float64 array [N, D]."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [samples, features], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (normalised by N - 1) of features [N, D], N >= 2."""
    x = as_features(features)
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _quiet_sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # With fewer samples than feature dimensions the product is singular, as expected; scipy's warning says
        # only that, and the finiteness and imaginary-part checks of the caller decide what to do.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float) -> float:
    """tr((S_a S_b)^(1/2)), with the reference implementations' handling of singular and complex results."""
    root = _quiet_sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():
        # A singular product (rank-deficient covariances) can make the Schur method fail; a tiny ridge on both
        # covariances makes it invertible and changes the distance by O(eps * D).
        ridge = eps * np.eye(len(sigma_a))
        root = _quiet_sqrtm((sigma_a + ridge) @ (sigma_b + ridge))
    if np.iscomplexobj(root):
        # S_a S_b is similar to a symmetric PSD matrix, so its root's eigenvalues are real: an imaginary part is
        # rounding unless it is large.
        imaginary = np.abs(np.diagonal(root).imag).max()
        if imaginary > FRECHET_IMAGINARY_ATOL:
            raise ValueError(f"the covariances' product has no real square root (imaginary part {imaginary:.3g})")
        root = root.real
    return float(np.trace(root))


def frechet_distance_gaussians(mu_a, sigma_a, mu_b, sigma_b, eps: float = FRECHET_EPS) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (squared, as FID)."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(f"shapes do not match: means {mu_a.shape}, {mu_b.shape}; covariances {sigma_a.shape}, "
                         f"{sigma_b.shape}")
    difference = mu_a - mu_b
    return float(difference @ difference + np.trace(sigma_a) + np.trace(sigma_b)
                 - 2.0 * _trace_sqrt_product(sigma_a, sigma_b, eps))


def frechet_distance(features_a, features_b, eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    a, b = as_features(features_a, "features_a"), as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the feature sets have different dimensions: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_gaussians(*gaussian_statistics(a), *gaussian_statistics(b), eps=eps)


def pairwise_distances(a, b) -> torch.Tensor:
    """Euclidean distances [N_a, N_b] in float64, from the coordinate differences (not the ``|a|^2 + |b|^2 -
    2ab`` expansion, whose cancellation leaves ~1e-8 between identical points and would blur ties at 0)."""
    a = torch.from_numpy(as_features(a, "a"))
    b = torch.from_numpy(as_features(b, "b"))
    blocks = [torch.cdist(a[start:start + _DISTANCE_BLOCK], b, compute_mode="donot_use_mm_for_euclid_dist")
              for start in range(0, len(a), _DISTANCE_BLOCK)]
    return torch.cat(blocks) if blocks else torch.zeros(0, len(b), dtype=torch.float64)


def knn_radii(features, k: int = 3) -> torch.Tensor:
    """Per sample, the distance to its k-th nearest neighbour among the other samples of its set [N]."""
    x = as_features(features)
    if not 1 <= k < len(x):
        raise ValueError(f"k must be between 1 and the number of samples - 1 ({len(x) - 1}), got {k}")
    # The sample's own distance 0 is the smallest of its row, so the (k+1)-th smallest is the k-th among the
    # others, also when other samples coincide with it.
    return pairwise_distances(x, x).kthvalue(k + 1, dim=1).values


def share_inside_manifold(points, manifold, radii: torch.Tensor) -> float:
    """Share of ``points`` within ``radii[j]`` (inclusive) of some ``manifold[j]``."""
    inside = (pairwise_distances(points, manifold) <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def precision_recall(real, fake, k: int = 3) -> PrecisionRecall:
    """Kynkäänniemi et al.'s improved precision and recall of ``fake`` [N_f, D] against ``real`` [N_r, D]."""
    real, fake = as_features(real, "real"), as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features have different dimensions: {real.shape[1]} and {fake.shape[1]}")
    precision = share_inside_manifold(fake, real, knn_radii(real, k))
    recall = share_inside_manifold(real, fake, knn_radii(fake, k))
    return PrecisionRecall(precision, recall)


def _labels(labels, count: int) -> list[Hashable]:
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    labels = [label.item() if isinstance(label, np.generic) else label for label in labels]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} samples")
    return labels


def within_class_diversity(features, labels: Sequence[Hashable]) -> dict[Hashable, float]:
    """Per class with at least two samples, the mean Euclidean distance over unordered pairs of its samples."""
    x = as_features(features)
    labels = _labels(labels, len(x))
    diversity = {}
    for label in sorted(set(labels), key=repr):
        members = x[[i for i, other in enumerate(labels) if other == label]]
        if len(members) < 2:
            continue  # one sample has no pair: its class has no measurable spread
        distances = pairwise_distances(members, members)
        # The diagonal is 0: the sum over the full matrix counts every unordered pair twice.
        diversity[label] = float(distances.sum()) / (len(members) * (len(members) - 1))
    return diversity


def diversity_ratio(generated, generated_labels, real, real_labels) -> float:
    """Generated over real within-class diversity, per class, averaged over the classes measured in both."""
    generated_diversity = within_class_diversity(generated, generated_labels)
    real_diversity = within_class_diversity(real, real_labels)
    shared = [label for label in generated_diversity if real_diversity.get(label, 0.0) > 0.0]
    if not shared:
        raise ValueError("no class has two or more samples (and a nonzero spread) in both sets")
    return float(np.mean([generated_diversity[label] / real_diversity[label] for label in shared]))


def generation_metrics(real, real_labels, fake, fake_labels, k: int = 3) -> dict[str, float]:
    """The benches' columns: ``fd``, ``precision``, ``recall`` and ``diversity_ratio`` of ``fake`` vs ``real``."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall,
            "diversity_ratio": diversity_ratio(fake, fake_labels, real, real_labels)}
