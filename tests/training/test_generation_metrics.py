"""Generation metrics against closed forms, an eigen-decomposition, per-sample loops and hand-worked toy cases."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from moezoo.training.generation_metrics import (
    FRECHET_EPS,
    as_features,
    diversity_ratio,
    frechet_distance,
    frechet_distance_gaussians,
    gaussian_statistics,
    generation_metrics,
    knn_radii,
    precision_recall,
    within_class_diversity,
)
from tests.tolerance import fp_tolerance


def approx(expected: float, reduction_length: int, *, layers: int = 1, scale: float = 1.0):
    tol = fp_tolerance(torch.float64, reduction_length, layers=layers, scale=scale)
    return pytest.approx(expected, rel=tol["rtol"], abs=tol["atol"])


def diagonal_closed_form(mu_a, var_a, mu_b, var_b) -> float:
    """FD of two Gaussians with diagonal covariances: ||mu_a - mu_b||^2 + sum(s_a + s_b - 2 sqrt(s_a s_b))."""
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b)))


def random_covariance(rng, dim: int) -> np.ndarray:
    """A well-conditioned symmetric positive definite matrix (eigenvalues 0.5-2.5)."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q @ np.diag(rng.uniform(0.5, 2.5, dim)) @ q.T


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


# ----------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    dim = 6
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    var_a, var_b = rng.uniform(0.2, 3.0, dim), rng.uniform(0.2, 3.0, dim)
    expected = diagonal_closed_form(mu_a, var_a, mu_b, var_b)
    got = frechet_distance_gaussians(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == approx(expected, dim, layers=2, scale=float(var_a.sum() + var_b.sum()))


def test_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance_gaussians([1.0], [[4.0]], [-2.0], [[9.0]]) == approx(9.0 + 1.0, 1, scale=10.0)


def test_commuting_covariances_rotated_off_the_axes():
    # S_a = Q D_a Q^T and S_b = Q D_b Q^T commute, so tr((S_a S_b)^(1/2)) = sum(sqrt(d_a d_b)), as for diagonals.
    rng = np.random.default_rng(1)
    dim = 5
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    var_a, var_b = rng.uniform(0.2, 3.0, dim), rng.uniform(0.2, 3.0, dim)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    got = frechet_distance_gaussians(mu_a, q @ np.diag(var_a) @ q.T, mu_b, q @ np.diag(var_b) @ q.T)
    expected = diagonal_closed_form(mu_a, var_a, mu_b, var_b)
    assert got == approx(expected, dim, layers=3, scale=float(var_a.sum() + var_b.sum()))


def test_general_covariances_match_the_symmetric_eigen_decomposition():
    # Independent route: tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)) (similar matrices).
    rng = np.random.default_rng(2)
    dim = 8
    sigma_a, sigma_b = random_covariance(rng, dim), random_covariance(rng, dim)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    root_a = symmetric_sqrt(sigma_a)
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum()
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root
    scale = float(np.trace(sigma_a) + np.trace(sigma_b))
    assert frechet_distance_gaussians(mu_a, sigma_a, mu_b, sigma_b) == approx(expected, dim, layers=3, scale=scale)


def plus_minus_design(mu: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """2D samples mu +- c_i e_i: their mean is exactly mu and their covariance exactly diag(2 c_i^2 / (2D - 1))."""
    offsets = np.diag(half_widths)
    return np.concatenate([mu + offsets, mu - offsets])


def test_frechet_distance_of_feature_sets_fits_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    dim = 4
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    c_a, c_b = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    a, b = plus_minus_design(mu_a, c_a), plus_minus_design(mu_b, c_b)
    var_a, var_b = 2 * c_a**2 / (2 * dim - 1), 2 * c_b**2 / (2 * dim - 1)
    expected = diagonal_closed_form(mu_a, var_a, mu_b, var_b)
    scale = float(var_a.sum() + var_b.sum() + np.sum((mu_a - mu_b) ** 2))
    assert frechet_distance(a, b) == approx(expected, 2 * dim, layers=3, scale=scale)
    # torch and float32 inputs are taken as float64 too
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == approx(expected, 2 * dim, layers=3,
                                                                                  scale=scale)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_a_shift_adds_its_squared_length():
    rng = np.random.default_rng(4)
    dim, count = 16, 200
    x = rng.normal(size=(count, dim)) @ rng.normal(size=(dim, dim))  # correlated features
    scale = float(np.trace(gaussian_statistics(x)[1]))
    assert frechet_distance(x, x) == approx(0.0, count, layers=3, scale=scale)
    shift = rng.normal(size=dim)
    assert frechet_distance(x, x + shift) == approx(float(shift @ shift), count, layers=3, scale=scale)
    assert frechet_distance(x, 2 * x) == approx(frechet_distance(2 * x, x), count, layers=3, scale=4 * scale)


def test_frechet_distance_with_fewer_samples_than_dimensions_stays_near_zero_for_identical_sets():
    # The covariances are singular (rank 19 < 64); if the square root needs the eps ridge, it moves the distance
    # by at most 2 eps per dimension.
    rng = np.random.default_rng(5)
    dim, count = 64, 20
    x = rng.normal(size=(count, dim))
    scale = float(np.trace(gaussian_statistics(x)[1]))
    tol = fp_tolerance(torch.float64, count, layers=3, scale=scale)
    assert abs(frechet_distance(x, x)) <= 2 * FRECHET_EPS * dim + tol["atol"]


def test_a_non_finite_square_root_is_retried_with_a_ridge(monkeypatch):
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    sigma = np.diag([1.0, 4.0])
    got = frechet_distance_gaussians([0.0, 0.0], sigma, [0.0, 0.0], sigma)
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[1], (sigma + FRECHET_EPS * np.eye(2)) @ (sigma + FRECHET_EPS * np.eye(2)))
    # the ridge adds eps to each of the root's diagonal entries: FD = -2 eps D
    assert got == approx(-2 * FRECHET_EPS * 2, 2, layers=2, scale=5.0)


def test_a_small_imaginary_part_is_dropped_and_a_large_one_raises(monkeypatch):
    sigma = np.diag([1.0, 4.0])
    root = np.diag([1.0, 4.0]).astype(complex)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda matrix: root + 1e-9j)
    assert frechet_distance_gaussians([0.0, 0.0], sigma, [0.0, 0.0], sigma) == approx(0.0, 2, scale=5.0)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda matrix: root + 0.1j)
    with pytest.raises(ValueError, match="no real square root"):
        frechet_distance_gaussians([0.0, 0.0], sigma, [0.0, 0.0], sigma)


def test_frechet_distance_refuses_mismatched_or_bad_inputs():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        as_features([[0.0, np.nan]])


# ----------------------------------------------------------------------------------- precision and recall


def loop_radii(points: list, k: int) -> list[float]:
    return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]


def loop_share_inside(points: list, manifold: list, radii: list[float]) -> float:
    return sum(any(math.dist(p, m) <= r for m, r in zip(manifold, radii)) for p in points) / len(points)


def loop_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition, one sample at a time."""
    real, fake = real.tolist(), fake.tolist()
    return (loop_share_inside(fake, real, loop_radii(real, k)), loop_share_inside(real, fake, loop_radii(fake, k)))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_a_per_sample_loop(k):
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(30, 3))
    fake = rng.normal(size=(24, 3)) * 1.5 + 1.0  # wider and shifted: some samples fall outside each manifold
    precision, recall = precision_recall(real, fake, k=k)
    expected_precision, expected_recall = loop_precision_recall(real, fake, k)
    assert (precision, recall) == (expected_precision, expected_recall)
    assert 0 < precision < 1 or 0 < recall < 1  # the case is not trivial
    np.testing.assert_allclose(knn_radii(real, k).numpy(), loop_radii(real.tolist(), k),
                               **fp_tolerance(torch.float64, 3))


def test_precision_recall_of_hand_worked_points_on_a_line():
    real = np.array([[0.0], [1.0], [2.0], [10.0]])  # k = 1 radii: 1, 1, 1, 8
    # 0.5 is within 1 of 0, 5 within 8 of 10, 20 outside; fake radii 4.5, 4.5, 15: the outlier's large ball
    # covers real 10, so recall is 1 (the metric's known sensitivity to outliers in the other set)
    assert precision_recall(real, np.array([[0.5], [5.0], [20.0]]), k=1) == (2 / 3, 1.0)
    # fake radii 1, 1, 1: real 10 is 7.5 from the nearest fake sample
    assert precision_recall(real, np.array([[0.5], [1.5], [2.5]]), k=1) == (1.0, 3 / 4)


def test_a_perfect_generator_has_precision_and_recall_one():
    real = np.random.default_rng(20).normal(size=(30, 5))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)


def test_a_collapsed_generator_has_high_precision_and_low_recall():
    real = np.random.default_rng(21).normal(size=(40, 5))
    # every sample the same real point: inside the real manifold, but its own radius is 0, so it covers only
    # the real sample it copies
    collapsed = np.repeat(real[:1], 25, axis=0)
    assert precision_recall(real, collapsed, k=3) == (1.0, 1 / 40)
    # collapsed far from the data: neither
    assert precision_recall(real, np.full((25, 5), 100.0), k=3) == (0.0, 0.0)


def test_duplicates_count_as_neighbours_at_distance_zero():
    points = np.array([[0.0], [0.0], [0.0], [3.0]])
    assert knn_radii(points, 1).tolist() == [0.0, 0.0, 0.0, 3.0]
    assert knn_radii(points, 2).tolist() == [0.0, 0.0, 0.0, 3.0]
    assert knn_radii(points, 3).tolist() == [3.0, 3.0, 3.0, 3.0]


def test_k_must_leave_a_neighbour():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)), k=3)
    with pytest.raises(ValueError, match="different dimensions"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


# --------------------------------------------------------------------------------- within-class diversity


def loop_diversity(points: np.ndarray, labels: list) -> dict:
    result = {}
    for label in set(labels):
        members = [p for p, other in zip(points.tolist(), labels) if other == label]
        pairs = [math.dist(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))]
        if pairs:
            result[label] = sum(pairs) / len(pairs)
    return result


def test_within_class_diversity_of_a_hand_worked_triangle():
    # pairwise distances 5, 4, 3 (a 3-4-5 triangle): mean 4; the lone "b" sample has no pair
    points = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [9.0, 9.0]])
    assert within_class_diversity(points, ["a", "a", "a", "b"]) == {"a": approx(4.0, 3, scale=5.0)}


def test_within_class_diversity_matches_a_double_loop():
    rng = np.random.default_rng(30)
    points = rng.normal(size=(23, 6))
    labels = rng.integers(0, 4, size=23).tolist()
    expected = loop_diversity(points, labels)
    got = within_class_diversity(points, np.array(labels))  # numpy labels are read as plain ints
    assert got.keys() == expected.keys()
    for label, value in expected.items():
        assert got[label] == approx(value, 6 * 23, layers=2, scale=value)
    assert within_class_diversity(torch.from_numpy(points), torch.tensor(labels)).keys() == expected.keys()


def test_diversity_ratio_of_a_scaled_copy_is_the_scale():
    rng = np.random.default_rng(31)
    real = rng.normal(size=(30, 4))
    labels = [i % 3 for i in range(30)]
    assert diversity_ratio(0.5 * real + 7.0, labels, real, labels) == approx(0.5, 4 * 10, layers=2)
    # per-class ratios are averaged: class 0 halved, the others unchanged
    scaled = real.copy()
    scaled[[i for i in range(30) if labels[i] == 0]] *= 0.5
    assert diversity_ratio(scaled, labels, real, labels) == approx((0.5 + 1 + 1) / 3, 4 * 10, layers=2)
    # a collapsed class (one point repeated) has diversity 0
    collapsed = np.repeat(real[:1], 30, axis=0)
    assert diversity_ratio(collapsed, labels, real, labels) == 0.0


def test_diversity_ratio_needs_a_shared_class():
    with pytest.raises(ValueError, match="no class"):
        diversity_ratio(np.zeros((4, 2)), [0, 0, 1, 1], np.ones((4, 2)) * np.arange(4)[:, None], [2, 2, 3, 3])
    with pytest.raises(ValueError, match="labels for"):
        within_class_diversity(np.zeros((4, 2)), [0, 1])


def test_generation_metrics_collects_the_bench_columns():
    rng = np.random.default_rng(40)
    real, fake = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    real_labels, fake_labels = [i % 2 for i in range(40)], [i % 2 for i in range(30)]
    metrics = generation_metrics(real, real_labels, fake, fake_labels)
    assert metrics == {"fd": frechet_distance(real, fake), "precision": precision_recall(real, fake).precision,
                       "recall": precision_recall(real, fake).recall,
                       "diversity_ratio": diversity_ratio(fake, fake_labels, real, real_labels)}
    assert list(itertools.islice(metrics, 4)) == ["fd", "precision", "recall", "diversity_ratio"]
