"""Overlapping patches of an image and the per-pixel accumulators that merge patch estimates.

Patches of size (h, w) sit on a grid of top-left corners with the given stride; the last row/column of
corners is always included so that every pixel is covered. Patch n (global, row-major over the corner grid)
has corner (ys[n // nx], xs[n % nx]) and is flattened row-major into a vector of D = h·w pixels. A stack of
Z sections of the same plane shape has Z such grids: global patch n lies in section n // (ny·nx), and images
are (Z, Y, X) arrays.

Merging (DESIGN.md §1.3): every pixel keeps count, Σ(ŷ − y) and Σ(ŷ − y)², shifted by the noisy pixel value y
for numerical safety; mean = y + Σ(ŷ−y)/count, variance = Σ(ŷ−y)²/count − (Σ(ŷ−y)/count)² (the population
variance of the estimates that cover the pixel). Sums over any split of the patches add up exactly, so the
merge does not depend on how patches are sharded or tiled.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def as_pair(values: Sequence[int]) -> tuple[int, int]:
    """``(a, b)`` as Python ints from any two-element sequence (a tuple, a YAML list, a numpy shape)."""
    a, b = values
    return int(a), int(b)


def _corners(length: int, size: int, stride: int) -> np.ndarray:
    last = length - size
    corners = np.arange(0, last + 1, stride)
    if corners[-1] != last:
        corners = np.append(corners, last)
    return corners


@dataclass(frozen=True)
class PatchGrid:
    """The geometry of all patches of a 2-D image (or of each section of a stack of ``sections`` planes)."""

    image_shape: tuple[int, int]
    size: tuple[int, int]
    stride: int = 1
    sections: int = 1

    def __post_init__(self):
        if any(p > n for p, n in zip(self.size, self.image_shape)):
            raise ValueError(f"patch size {self.size} is larger than the image {self.image_shape}")
        if self.stride > min(self.size):
            raise ValueError(f"stride {self.stride} is larger than the patch size {self.size}: pixels between "
                             "patches would not be covered")

    @cached_property
    def ys(self) -> np.ndarray:
        return _corners(self.image_shape[0], self.size[0], self.stride)

    @cached_property
    def xs(self) -> np.ndarray:
        return _corners(self.image_shape[1], self.size[1], self.stride)

    @property
    def per_section(self) -> int:
        return self.ys.size * self.xs.size

    @property
    def n_patches(self) -> int:
        return self.sections * self.per_section

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """Shape of the images this grid cuts: (Y, X), or (Z, Y, X) for a stack."""
        return tuple(self.image_shape) if self.sections == 1 else (self.sections, *self.image_shape)

    @property
    def dim(self) -> int:
        return self.size[0] * self.size[1]

    def corners(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Section and top-left (y, x) of the patches with the given global indices."""
        z, local = np.divmod(np.asarray(patches), self.per_section)
        iy, ix = np.divmod(local, self.xs.size)
        return z, self.ys[iy], self.xs[ix]

    def pixel_index(self, patches: np.ndarray) -> np.ndarray:
        """Flat index into the (Z,) Y, X image of every pixel of the given patches, shape (n, D)."""
        z, y, x = self.corners(patches)
        h, w = self.size
        Y, X = self.image_shape
        offsets = (np.arange(h)[:, None] * X + np.arange(w)[None, :]).ravel()
        return (z * (Y * X) + y * X + x)[:, None] + offsets[None, :]

    def extract(self, image: np.ndarray, patches: np.ndarray) -> np.ndarray:
        """The given patches of ``image`` as an (n, D) float64 array."""
        return np.asarray(image, dtype=np.float64).ravel()[self.pixel_index(patches)]


class PixelAccumulator:
    """count, Σ(ŷ − y), Σ(ŷ − y)² per pixel in float64, stacked as one (3, [Z,] Y, X) array for a single
    reduction."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.sums = np.zeros((3,) + tuple(image_shape))

    def add(self, grid: PatchGrid, patches: np.ndarray, noisy: np.ndarray, estimates: np.ndarray) -> None:
        """Add the estimates (n, D) of the given patches whose noisy values are ``noisy`` (n, D)."""
        index = grid.pixel_index(patches).ravel()
        npix = self.sums[0].size
        diff = (estimates - noisy).ravel()
        self.sums[0].ravel()[:] += np.bincount(index, minlength=npix)
        self.sums[1].ravel()[:] += np.bincount(index, weights=diff, minlength=npix)
        self.sums[2].ravel()[:] += np.bincount(index, weights=diff * diff, minlength=npix)

    @staticmethod
    def finish(sums: np.ndarray, noisy_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population variance per pixel from merged sums."""
        count, s1, s2 = sums
        if np.any(count == 0):
            raise ValueError("some pixels are covered by no patch")
        shift = s1 / count
        return noisy_image + shift, np.maximum(s2 / count - shift**2, 0.0)
