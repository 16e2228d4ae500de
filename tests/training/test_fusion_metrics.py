"""Fusion metrics against values worked out by hand, per-pixel loops, and scikit-image's SSIM."""

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from moezoo.training.fusion_metrics import (
    METRIC_NAMES,
    average_gradient,
    entropy,
    fusion_metrics,
    mutual_information,
    qabf,
    spatial_frequency,
    ssim,
    standard_deviation,
    to_255,
)


def test_scales_uint8_and_unit_float_alike():
    grey = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    np.testing.assert_allclose(to_255(grey), to_255(grey / 255.0))


def test_entropy_of_two_and_four_equal_levels():
    halves = np.zeros((4, 4), np.uint8)
    halves[:, 2:] = 255
    assert entropy(halves) == pytest.approx(1.0)
    quarters = np.array([[0, 50], [100, 200]], np.uint8).repeat(2, 0).repeat(2, 1)
    assert entropy(quarters) == pytest.approx(2.0)
    assert entropy(np.full((3, 3), 7, np.uint8)) == 0.0


def test_standard_deviation_of_a_checkerboard():
    board = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)  # half 0, half 255
    assert standard_deviation(board) == pytest.approx(127.5)


def test_spatial_frequency_by_hand():
    f = np.array([[0, 10, 30], [20, 20, 20]], np.uint8)
    # row differences: 10, 20, 0, 0 -> mean square 125; column differences: 20, 10, -10 -> mean square 200
    assert spatial_frequency(f) == pytest.approx(math.sqrt(125 + 200))


def test_average_gradient_by_hand():
    ramp = np.tile(np.arange(5, dtype=np.uint8) * 8, (4, 1))  # dx = 8 everywhere, dy = 0
    assert average_gradient(ramp) == pytest.approx(8 / math.sqrt(2))
    f = np.array([[0, 3], [4, 9]], np.uint8)  # one grid cell: dx = 3, dy = 4
    assert average_gradient(f) == pytest.approx(math.sqrt((9 + 16) / 2))


def test_mutual_information_copy_and_constant_sources():
    fused = np.zeros((4, 4), np.uint8)
    fused[:2] = 200
    # infrared = the fused image (2 equally likely levels: 1 bit); visible constant: no information.
    assert mutual_information(fused, fused, np.full_like(fused, 90)) == pytest.approx(1.0)
    # an independent source: the fused halves are rows, the source halves are columns -> 0 bits
    columns = np.zeros((4, 4), np.uint8)
    columns[:, :2] = 50
    assert mutual_information(fused, columns, columns) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_a_partly_dependent_pair_by_hand():
    source = np.array([[0, 0], [255, 255]], np.uint8)  # levels a0 a0 a1 a1
    fused = np.array([[0, 0], [0, 255]], np.uint8)  # levels f0 f0 f0 f1
    # joint p(a0,f0) = 1/2, p(a1,f0) = 1/4, p(a1,f1) = 1/4; p(a) = (1/2, 1/2), p(f) = (3/4, 1/4)
    by_hand = 0.5 * math.log2(0.5 / (0.5 * 0.75)) + 0.25 * math.log2(0.25 / (0.5 * 0.75)) + 0.25 * math.log2(
        0.25 / (0.5 * 0.25)
    )
    flat = np.full((2, 2), 9, np.uint8)  # a constant source shares no information
    assert mutual_information(fused, source, flat) == pytest.approx(by_hand)
    assert mutual_information(fused, source, source) == pytest.approx(2 * by_hand)


def _qabf_by_loops(f, a, b):
    """Qabf written out pixel by pixel from Xydeas & Petrović's definition (zero-padded Sobel)."""
    f, a, b = (to_255(x) for x in (f, a, b))
    h, w = f.shape
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]

    def sobel(img, i, j):
        sx = sy = 0.0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ii, jj = i + di, j + dj
                v = img[ii, jj] if 0 <= ii < h and 0 <= jj < w else 0.0
                # convolution flips the kernel; the sign cancels in strength and in sy/sx
                sx += kx[1 - di][1 - dj] * v
                sy += kx[1 - dj][1 - di] * v
        return math.hypot(sx, sy), (math.pi / 2 if sx == 0 else math.atan(sy / sx))

    def q(gs, als, gf, alf):
        g = 0.0 if gs == 0 or gf == 0 else min(gs, gf) / max(gs, gf)
        al = 1 - abs(als - alf) / (math.pi / 2)
        return 0.9994 / (1 + math.exp(-15 * (g - 0.5))) * 0.9879 / (1 + math.exp(-22 * (al - 0.8)))

    num = den = 0.0
    for i in range(h):
        for j in range(w):
            gf, alf = sobel(f, i, j)
            ga, ala = sobel(a, i, j)
            gb, alb = sobel(b, i, j)
            num += q(ga, ala, gf, alf) * ga + q(gb, alb, gf, alf) * gb
            den += ga + gb
    return num / den


def test_qabf_matches_a_pixel_loop():
    rng = np.random.default_rng(0)
    a, b, f = (rng.integers(0, 256, (7, 6)).astype(np.uint8) for _ in range(3))
    assert qabf(f, a, b) == pytest.approx(_qabf_by_loops(f, a, b), rel=1e-12)
    f[2:4, 1:5] = 0  # flat patches (zero gradients) exercise the 0/0 rules
    assert qabf(f, a, b) == pytest.approx(_qabf_by_loops(f, a, b), rel=1e-12)


def test_qabf_of_a_perfect_copy_is_the_sigmoid_ceiling():
    image = np.random.default_rng(1).random((8, 8))
    ceiling = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert qabf(image, image, image) == pytest.approx(ceiling)
    assert qabf(image, np.zeros((8, 8)), np.zeros((8, 8))) == 0.0  # no source edges at all


def test_qabf_of_half_strength_edges_by_hand():
    # F = A / 2: every Sobel response halves, so G = 1/2 wherever A has an edge and the orientation is kept
    # (Al = 1); B is flat, so only A's edges count. Q = sigmoid_g(0.5) * sigmoid_a(1) at every edge pixel.
    a = np.random.default_rng(4).random((9, 9))
    expected = 0.9994 / (1 + math.exp(-15 * 0.0)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert qabf(a / 2, a, np.zeros((9, 9))) == pytest.approx(expected)


def test_ssim_of_constant_images_by_hand():
    # No variance: SSIM = luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) (the contrast term is C2/C2).
    x, y = np.full((16, 16), 100, np.uint8), np.full((16, 16), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 16)), np.zeros((8, 16)))


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(2)
    x = rng.random((24, 20))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    expected = structural_similarity(
        x * 255, y * 255, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x, y) == pytest.approx(expected, rel=1e-9)
    assert ssim(x, x) == pytest.approx(1.0)


def test_fusion_metrics_names_and_errors():
    rng = np.random.default_rng(3)
    a, b = rng.random((16, 16)), rng.random((16, 16))
    values = fusion_metrics((a + b) / 2, a, b)
    assert tuple(values) == METRIC_NAMES
    with pytest.raises(ValueError, match="same shape"):
        qabf(a, b[:8], b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        entropy(a * 2)
    with pytest.raises(ValueError, match="2-D"):
        entropy(np.zeros((4, 4, 3)))
