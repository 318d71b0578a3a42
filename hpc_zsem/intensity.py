"""Mapping between EM intensities and photon/electron counts (for the Poisson model GPMM).

Detector model: intensity = gain · counts + offset with counts ~ Poisson(λ), hence per flat region
    mean = gain·λ + offset,   variance = gain²·λ = gain · (mean − offset).
A Gaussian read noise of variance σ_r² shifts the fitted offset by −σ_r²/gain (it is absorbed there).
"""
from __future__ import annotations

import numpy as np

from hpc_zsem.errors import InputError

_MAX_BINS = 20
_TILES_PER_BIN = 8
_OUTLIER = 1.5        # a tile whose noise variance exceeds 1.5 × the fitted line is not flat
_MAX_REFITS = 10


def _tile_moments(image: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per non-overlapping block×block tile (of every 2-D plane): the mean and the difference-based noise
    variance v = (Σ (x_{i,j+1} − x_{i,j})² + Σ (x_{i+1,j} − x_{i,j})²) / (2·#differences).

    For independent noise of variance σ², E[(x' − x)²]/2 = σ² plus half the squared local gradient, so smooth
    structure inside a tile barely inflates v (unlike the plain tile variance).
    """
    planes = image.reshape(-1, *image.shape[-2:]).astype(np.float64)
    ny, nx = planes.shape[1] // block, planes.shape[2] // block
    tiles = planes[:, : ny * block, : nx * block].reshape(-1, ny, block, nx, block).transpose(0, 1, 3, 2, 4)
    tiles = tiles.reshape(-1, block, block)
    dx = np.diff(tiles, axis=2) ** 2
    dy = np.diff(tiles, axis=1) ** 2
    noise_var = (dx.sum(axis=(1, 2)) + dy.sum(axis=(1, 2))) / (2.0 * (dx[0].size + dy[0].size))
    return tiles.mean(axis=(1, 2)), noise_var


def _binned_line_fit(means: np.ndarray, variances: np.ndarray, reduce=np.mean) -> tuple[float, float]:
    """Line var = a·mean + b through per-bin (mean of means, ``reduce`` of variances), tiles binned by mean
    into ≤ 20 equal-count bins (np.polyfit, degree 1). Returns (a, b)."""
    n_bins = int(min(_MAX_BINS, means.size // _TILES_PER_BIN))
    groups = np.array_split(np.argsort(means, kind="stable"), n_bins)
    bin_means = np.array([np.mean(means[g]) for g in groups])
    bin_vars = np.array([reduce(variances[g]) for g in groups])
    slope, intercept = np.polyfit(bin_means, bin_vars, 1)
    return float(slope), float(intercept)


def _flat_tile_fit(means: np.ndarray, variances: np.ndarray) -> tuple[float, float]:
    """Fit var = a·mean + b on the flat tiles. A first fit on per-bin medians (robust to the tiles on edges,
    whose differences see the jump, not the noise) selects the tiles with variance ≤ _OUTLIER × line; the
    line is then refitted on per-bin means of the selected tiles (unbiased, unlike the median of a skewed
    variance estimate) until the selection no longer changes. Returns (a, b)."""
    slope, intercept = _binned_line_fit(means, variances, np.median)
    keep = np.ones(means.size, dtype=bool)
    for _ in range(_MAX_REFITS):
        new_keep = variances <= _OUTLIER * (slope * means + intercept)
        if new_keep.sum() < 2 * _TILES_PER_BIN or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        slope, intercept = _binned_line_fit(means[keep], variances[keep])
    return slope, intercept


def estimate_gain_offset(image: np.ndarray, block: int = 8) -> tuple[float, float]:
    """Fit variance = gain · (mean − offset) over the flat parts of an image (mean–variance / photon transfer).

    The image (2-D, or a stack whose last two axes are spatial) is cut into non-overlapping block×block tiles;
    each gives its mean and difference-based noise variance; tiles on edges are rejected iteratively
    (_flat_tile_fit) and the line var = a·mean + b is fitted to per-bin medians: gain = a, offset = −b/a.
    Raises InputError when the image has too few tiles or the variance does not grow with the mean.
    """
    image = np.asarray(image)
    if image.ndim < 2 or block < 2:
        raise InputError(f"gain/offset estimation needs a 2-D image and block ≥ 2 (got shape {image.shape}, "
                         f"block {block})")
    means, variances = _tile_moments(image, block)
    keep = variances > 0.0                      # constant tiles: saturated or padded
    if keep.sum() < 2 * _TILES_PER_BIN:
        raise InputError(f"gain/offset estimation: too few non-constant {block}×{block} tiles in an image "
                         f"of shape {image.shape}; set gain and offset explicitly")
    slope, intercept = _flat_tile_fit(means[keep], variances[keep])
    if not slope > 0.0:
        raise InputError("gain/offset estimation: the noise variance does not grow with the intensity "
                         "(not Poisson-like); set gain and offset explicitly")
    return slope, -intercept / slope


def to_counts(image: np.ndarray, gain: float, offset: float) -> tuple[np.ndarray, int]:
    """counts = (intensity − offset) / gain as float64, negatives clipped to 0; returns (counts, #clipped)."""
    if not gain > 0.0:
        raise ValueError(f"gain must be positive, got {gain}")
    counts = (np.asarray(image, dtype=np.float64) - offset) / gain
    negative = counts < 0.0
    counts[negative] = 0.0
    return counts, int(np.count_nonzero(negative))


def from_counts_mean_variance(mean: np.ndarray, variance: np.ndarray, gain: float,
                              offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Back to intensity units: mean·gain + offset and variance·gain² (inverse of the affine map of to_counts)."""
    return np.asarray(mean) * gain + offset, np.asarray(variance) * gain**2
