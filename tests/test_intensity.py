"""Tests of the intensity ↔ count mapping (hpc_zsem.intensity)."""
import numpy as np
import pytest

from hpc_zsem.errors import InputError
from hpc_zsem.intensity import estimate_gain_offset, from_counts_mean_variance, to_counts


def piecewise_smooth_rate(shape=(512, 512)):
    """Photon rate: smooth gradients plus bright discs and a dark band (edges between pieces)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] / np.array(shape).reshape(2, 1, 1)
    rate = 5.0 + 40.0 * xx + 15.0 * np.sin(3.0 * yy) ** 2
    for cy, cx, r in [(0.3, 0.3, 0.12), (0.7, 0.6, 0.15), (0.2, 0.8, 0.08)]:
        rate[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] += 60.0
    rate[(yy > 0.85) & (yy < 0.9)] = 2.0
    return rate


@pytest.mark.parametrize("gain, offset", [(3.0, 100.0), (0.5, -20.0), (12.0, 1000.0)])
def test_gain_offset_recovered_on_scaled_poisson(gain, offset):
    rng = np.random.default_rng(0)
    image = gain * rng.poisson(piecewise_smooth_rate()) + offset
    g, o = estimate_gain_offset(image)
    assert abs(g - gain) < 0.05 * gain                           # measured: ≤ 2 % on this 512² image
    assert abs(o - offset) < 0.1 * max(abs(offset), 5.0 * gain)   # offset error ≲ a few counts in intensity units


def test_gain_offset_on_stack():
    rng = np.random.default_rng(1)
    stack = 2.0 * rng.poisson(np.stack([piecewise_smooth_rate((128, 128))] * 4)) + 50.0
    g, o = estimate_gain_offset(stack)
    assert abs(g - 2.0) < 0.2 and abs(o - 50.0) < 10.0


def test_gain_offset_refuses_unusable_images():
    with pytest.raises(InputError):
        estimate_gain_offset(np.full((64, 64), 7.0))
    with pytest.raises(InputError):
        estimate_gain_offset(np.random.default_rng(2).normal(size=(8, 8)))


def test_to_counts_clips_and_counts_negatives():
    image = np.array([[90.0, 100.0, 130.0], [70.0, 103.0, 100.5]])
    counts, clipped = to_counts(image, gain=3.0, offset=100.0)
    np.testing.assert_allclose(counts, [[0.0, 0.0, 10.0], [0.0, 1.0, 0.5 / 3.0]])
    assert clipped == 2 and counts.dtype == np.float64
    with pytest.raises(ValueError):
        to_counts(image, gain=0.0, offset=0.0)


def test_from_counts_round_trip():
    rng = np.random.default_rng(3)
    image = rng.uniform(200.0, 400.0, size=(16, 16))
    counts, clipped = to_counts(image, gain=2.5, offset=150.0)
    assert clipped == 0
    mean, var = from_counts_mean_variance(counts, np.full_like(counts, 4.0), 2.5, 150.0)
    np.testing.assert_allclose(mean, image, rtol=1e-12)
    np.testing.assert_allclose(var, 4.0 * 2.5**2)
