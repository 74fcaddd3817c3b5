"""Fidelity metrics: how far an asynchronous sample is from its sequential one.

Example::

    psnr(sequential_image, async_image)              # dB, inf when identical
    ssim(sequential_image, async_image)              # 1.0 when identical
    frechet_distance(features(generated), features(real))   # features: evaluation/classifier.py

Images are float numpy arrays, H x W or H x W x C (a metric over channels is their mean).
:func:`psnr` and :func:`ssim` compare two images of one run (AsyncDiff's LPIPS/PSNR "against
the original"); :func:`frechet_distance` compares two *sets* of feature vectors (FID's formula,
Heusel et al., 2017, on whatever features are given). Class accuracy and the features
of the ``digits`` model's images come from the bundled digit classifier
(:mod:`asyncdiff_partition.evaluation.classifier`).

Only numpy is needed: the matrix square root of FID is taken by symmetric eigendecompositions,
which is stable for the positive semi-definite covariances it sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["MetricError", "frechet_distance", "psnr", "ssim"]

Array = np.ndarray


class MetricError(AsyncDiffError, ValueError):
    """Arguments a metric cannot compare (shapes, ranges, too few samples)."""


def _pair(a: Any, b: Any) -> tuple[Array, Array]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise MetricError(f"images must have the same shape; got {x.shape} and {y.shape}")
    if x.ndim not in (2, 3):
        raise MetricError(f"images must be H x W or H x W x C arrays; got shape {x.shape}")
    return x, y


def psnr(a: Any, b: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    Example:
        >>> psnr(np.zeros((4, 4)), np.full((4, 4), 0.1))   # MSE 0.01
        20.0

    Args:
        a, b: images of one shape (H x W or H x W x C).
        data_range: max - min of the value range (1.0 for [0, 1], 2.0 for [-1, 1]).

    Returns:
        The PSNR over all pixels and channels; ``inf`` for identical images.
    """
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(round(10.0 * np.log10(data_range**2 / mse), 10))


def _gaussian(size: int, sigma: float) -> Array:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(image: Array, kernel: Array) -> Array:
    """Separable 2-D filter, 'valid' region only (as in Wang et al.'s reference code)."""
    k = len(kernel)
    rows = np.lib.stride_tricks.sliding_window_view(image, k, axis=0) @ kernel
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ kernel


def ssim(a: Any, b: Any, data_range: float = 1.0, *, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli, 2004), mean over the image.

    The standard setting: an 11 x 11 Gaussian window of sigma 1.5 (shrunk to the largest odd
    size that fits for smaller images, so 8 x 8 or 16 x 16 digits work), K1 = 0.01, K2 = 0.03,
    local statistics weighted by the window, the SSIM map kept where the window fits wholly.

    Example:
        >>> img = np.random.default_rng(0).random((16, 16))
        >>> ssim(img, img)
        1.0

    Args:
        a, b: images of one shape (H x W, or H x W x C: mean over channels).
        data_range: max - min of the value range (1.0 for [0, 1], 2.0 for [-1, 1]).
        sigma, k1, k2: the window's standard deviation and the stabilising constants.

    Returns:
        The mean SSIM, 1.0 for identical images, lower (down to -1) the less alike.
    """
    x, y = _pair(a, b)
    if x.ndim == 3:
        return float(np.mean([ssim(x[..., c], y[..., c], data_range, sigma=sigma, k1=k1, k2=k2)
                              for c in range(x.shape[2])]))
    size = min(11, *x.shape)
    size -= 1 - size % 2
    window = _gaussian(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = _filter_valid(x, window), _filter_valid(y, window)
    vx = _filter_valid(x * x, window) - mx**2
    vy = _filter_valid(y * y, window) - my**2
    cov = _filter_valid(x * y, window) - mx * my
    score = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(round(float(np.mean(score)), 12))


def _sqrt_psd(m: Array) -> Array:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula).

    ``|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``: the trace term is
    computed from the eigenvalues of the symmetric product, which equals
    ``Tr((C_a C_b)^1/2)`` without the complex square root of a non-symmetric matrix.

    Example:
        >>> f = np.random.default_rng(0).normal(size=(50, 4))
        >>> round(frechet_distance(f, f), 9)
        0.0

    Args:
        feats_a, feats_b: arrays of shape (samples, features), one row per image; at least
            two rows each.

    Returns:
        The distance (>= 0; 0 for identical sets).

    Raises:
        MetricError: not 2-D, different feature sizes, or fewer than two samples.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise MetricError(
            f"need two (samples, features) arrays with the same number of features and >= 2 samples each; "
            f"got shapes {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    cross = root_a @ cov_b @ root_a
    trace_root = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None))))
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)
    return max(distance, 0.0)
