"""Fidelity metrics on inputs with known answers, and the bundled digit classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncdiff_partition.evaluation.metrics import MetricError, frechet_distance, psnr, ssim


@pytest.fixture
def image():
    """A smooth 16 x 16 image in [0, 1] with some texture (SSIM needs structure to compare)."""
    y, x = np.mgrid[0:16, 0:16] / 15.0
    noise = np.random.default_rng(0).random((16, 16))
    return 0.5 * np.sin(3 * x) * np.cos(2 * y) * 0.5 + 0.5 * noise * 0.5 + 0.25


def test_psnr_identical_is_inf(image):
    assert psnr(image, image) == math.inf


def test_psnr_known_mse():
    a = np.zeros((8, 8))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01, range 1
    assert psnr(a, a + 0.1, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    b = a.copy()
    b[0, 0] = 1.0  # MSE 1/64
    assert psnr(a, b) == pytest.approx(10 * math.log10(64))


def test_psnr_channels_and_shapes(image):
    rgb = np.stack([image] * 3, axis=-1)
    assert psnr(rgb, rgb * 0.9) == pytest.approx(psnr(image, image * 0.9))
    with pytest.raises(MetricError, match="same shape"):
        psnr(image, image[:8])


def test_ssim_identical_is_one(image):
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image[:8, :8], image[:8, :8]) == pytest.approx(1.0)  # window shrinks to fit


def test_ssim_orders_distortions(image):
    slight = ssim(image, np.clip(image + np.random.default_rng(1).normal(0, 0.01, image.shape), 0, 1))
    shifted = ssim(image, np.roll(image, 2, axis=1))
    negated = ssim(image, 1.0 - image)
    assert 0.95 < slight < 1.0
    assert shifted < slight
    assert negated < 0 < shifted


def test_ssim_matches_formula_on_constant_images():
    # Constant images: variances and covariance vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.6)) == pytest.approx(expected)


def test_ssim_mean_over_channels(image):
    other = np.roll(image, 1, axis=0)
    pair = ssim(np.stack([image, image], -1), np.stack([image, other], -1))
    assert pair == pytest.approx((1.0 + ssim(image, other)) / 2)


def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_closed_form_for_gaussians():
    # Sample sets whose empirical means and covariances are exactly the chosen ones:
    # whiten a sample, then colour it. FD = |m1 - m2|^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2).
    rng = np.random.default_rng(0)

    def with_moments(mean, cov, n=500):
        z = rng.normal(size=(n, len(mean)))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        return z @ np.linalg.cholesky(cov).T + mean

    # Diagonal covariances: the square roots are elementwise, FD = |dm|^2 + sum (s1 - s2)^2.
    a = with_moments(np.array([0.0, 1.0]), np.diag([1.0, 4.0]))
    b = with_moments(np.array([3.0, -1.0]), np.diag([4.0, 9.0]))
    assert frechet_distance(a, b) == pytest.approx(9 + 4 + (1 - 2) ** 2 + (2 - 3) ** 2, rel=1e-9)
    # Non-commuting covariances against the identity: Tr(C2 + I - 2 C2^1/2).
    c2 = np.array([[2.0, 0.8], [0.8, 1.0]])
    root = np.linalg.eigh(c2)
    trace_root = float(np.sum(np.sqrt(root[0])))
    a = with_moments(np.zeros(2), np.eye(2))
    b = with_moments(np.array([1.0, 0.0]), c2)
    assert frechet_distance(a, b) == pytest.approx(1 + np.trace(c2) + 2 - 2 * trace_root, rel=1e-9)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(MetricError, match="same number of features"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(MetricError, match=">= 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_bundled_classifier_recognises_real_digits():
    pytest.importorskip("sklearn")
    from asyncdiff_partition.evaluation.classifier import FEATURES, classify, features
    from asyncdiff_partition.pipelines.digits import load_digits_data

    images, labels = load_digits_data()
    images, labels = images[:300].numpy(), labels[:300].numpy()
    assert (classify(images) == labels).mean() > 0.95
    feats = features(images[:, 0])  # (N, 16, 16) works as well as (N, 1, 16, 16)
    assert feats.shape == (300, FEATURES)
    # Features separate real digits from noise far more than two halves of real digits.
    noise = np.random.default_rng(0).uniform(-1, 1, images.shape)
    assert frechet_distance(feats[:150], feats[150:]) * 5 < frechet_distance(feats, features(noise))
