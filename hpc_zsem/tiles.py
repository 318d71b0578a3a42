"""Tile geometry for streaming estimation over mosaics and stacks, and sampling patches for training.

A :class:`Tile` is a *core* rectangle of one section, written to the output, and the *halo* rectangle read to
compute it: the union of all patches of the **global** corner grid (``PatchGrid`` of the whole section) that
cover at least one core pixel. A tile processes exactly those patches and keeps the core of the merged result.
Every patch covering a core pixel lies inside the halo, so the per-pixel accumulators (count, Σ(ŷ−y),
Σ(ŷ−y)²) of a core pixel hold exactly the terms of the whole-image run: tiled mean/variance equal the
whole-image ones to float round-off, for any tile size and any stride (corners follow the global grid, not
the halo's own). The halo extends the core by at most patch − 1 pixels per side (clipped to the image).

Patches straddling a core boundary are processed by every tile whose core they touch (≈ 2·(h−1)/ty of the
patches for tiles of ty rows), so a patch estimate must be a deterministic function of the frozen model and
the patch's *global* index (e.g. randomness keyed by (seed, stage, global patch index or block)):
:func:`tile_grid` and :func:`merge_tile` give the global indices for that.

Global patch index of a stack: ``z * PatchGrid(plane).n_patches + index within the section``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hpc_zsem.patches import PatchGrid, PixelAccumulator, as_pair

DEFAULT_TILE = (512, 512)     # multiples of the 256×256 output chunks keep HDF5 writes chunk-aligned
DEFAULT_BATCH = 32768         # patches per estimate_fn call (bounds memory: batch · D · 8 bytes per array)


@dataclass(frozen=True)
class Tile:
    """Core [y0:y1, x0:x1] of section ``z`` (None for a 2-D image) and the halo [hy0:hy1, hx0:hx1] read to
    compute it (view coordinates of the section)."""

    index: int
    z: int | None
    y0: int
    y1: int
    x0: int
    x1: int
    hy0: int
    hy1: int
    hx0: int
    hx1: int

    @property
    def core_shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def halo_shape(self) -> tuple[int, int]:
        return (self.hy1 - self.hy0, self.hx1 - self.hx0)

    @property
    def core_in_halo(self) -> tuple[slice, slice]:
        """Slices of the core inside an array of the halo region."""
        return (slice(self.y0 - self.hy0, self.y1 - self.hy0), slice(self.x0 - self.hx0, self.x1 - self.hx0))

    @property
    def out_index(self) -> tuple:
        """Index of the core in the output array ((Y, X) or (Z, Y, X))."""
        core = (slice(self.y0, self.y1), slice(self.x0, self.x1))
        return core if self.z is None else (self.z,) + core

    @property
    def n_pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


@dataclass(frozen=True)
class CornerGrid(PatchGrid):
    """A PatchGrid over a (halo) region whose patch corners are given explicitly (region coordinates), so
    that they can follow the corner grid of the whole image. Works with ``PixelAccumulator.add``."""

    corner_ys: tuple[int, ...] = ()
    corner_xs: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        h, w = self.size
        Y, X = self.image_shape
        if not self.corner_ys or not self.corner_xs:
            raise ValueError("CornerGrid needs at least one corner per axis")
        if min(self.corner_ys) < 0 or max(self.corner_ys) + h > Y or min(self.corner_xs) < 0 \
                or max(self.corner_xs) + w > X:
            raise ValueError(f"corners outside the region {self.image_shape} for patches {self.size}")

    @cached_property
    def ys(self) -> np.ndarray:
        return np.asarray(self.corner_ys, dtype=np.int64)

    @cached_property
    def xs(self) -> np.ndarray:
        return np.asarray(self.corner_xs, dtype=np.int64)


def _plane_and_sections(shape: tuple[int, ...]) -> tuple[tuple[int, int], list[int | None]]:
    if len(shape) == 2:
        return (int(shape[0]), int(shape[1])), [None]
    if len(shape) == 3:
        return (int(shape[1]), int(shape[2])), list(range(int(shape[0])))
    raise ValueError(f"expected a (Y, X) or (Z, Y, X) shape, got {shape}")


def _covering(corners: np.ndarray, size: int, a: int, b: int) -> tuple[int, int]:
    """Index range [i0, i1) of the corners whose patch [c, c + size) intersects [a, b)."""
    i0 = int(np.searchsorted(corners, a - size + 1, side="left"))
    i1 = int(np.searchsorted(corners, b - 1, side="right"))
    return i0, i1


def plan_tiles(shape: tuple[int, ...], tile: tuple[int, int] = DEFAULT_TILE, patch: tuple[int, int] = (12, 12),
               stride: int = 1) -> list[Tile]:
    """All tiles of a (Y, X) image or (Z, Y, X) stack, section-major then row-major. Cores partition each
    section into ``tile``-sized rectangles (smaller at the right and bottom edges); halos are the union of
    the global-grid patches that cover the core."""
    plane, sections = _plane_and_sections(tuple(shape))
    grid = PatchGrid(plane, as_pair(patch), int(stride))   # raises if the patch is larger than the image
    ty, tx = (int(t) for t in tile)
    if ty < 1 or tx < 1:
        raise ValueError(f"tile size {tile} must be positive")
    h, w = grid.size
    rows = []
    for y0 in range(0, plane[0], ty):
        y1 = min(y0 + ty, plane[0])
        i0, i1 = _covering(grid.ys, h, y0, y1)
        rows.append((y0, y1, int(grid.ys[i0]), int(grid.ys[i1 - 1]) + h))
    cols = []
    for x0 in range(0, plane[1], tx):
        x1 = min(x0 + tx, plane[1])
        j0, j1 = _covering(grid.xs, w, x0, x1)
        cols.append((x0, x1, int(grid.xs[j0]), int(grid.xs[j1 - 1]) + w))
    tiles: list[Tile] = []
    for z in sections:
        for y0, y1, hy0, hy1 in rows:
            for x0, x1, hx0, hx1 in cols:
                tiles.append(Tile(len(tiles), z, y0, y1, x0, x1, hy0, hy1, hx0, hx1))
    return tiles


def tile_grid(tile: Tile, plane_shape: tuple[int, int], patch: tuple[int, int],
              stride: int = 1) -> tuple[CornerGrid, np.ndarray]:
    """The patches a tile processes: a CornerGrid over its halo region (local corners) and the global patch
    index (within the section's PatchGrid) of each of its patches, row-major like the grid."""
    grid = PatchGrid(as_pair(plane_shape), as_pair(patch), int(stride))
    h, w = grid.size
    i0, i1 = _covering(grid.ys, h, tile.y0, tile.y1)
    j0, j1 = _covering(grid.xs, w, tile.x0, tile.x1)
    local = CornerGrid(tile.halo_shape, grid.size, grid.stride,
                       corner_ys=tuple(int(c) - tile.hy0 for c in grid.ys[i0:i1]),
                       corner_xs=tuple(int(c) - tile.hx0 for c in grid.xs[j0:j1]))
    ids = (np.arange(i0, i1)[:, None] * grid.xs.size + np.arange(j0, j1)[None, :]).ravel()
    return local, ids


def merge_tile(estimate_fn: Callable[..., np.ndarray], source, tile: Tile, patch: tuple[int, int],
               stride: int = 1, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
               with_index: bool = False, batch: int = DEFAULT_BATCH,
               region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the tile's core pixels, exactly as in a whole-image run.

    Reads the halo region from ``source`` (an ImageSource, or anything with ``read(z, y0, y1, x0, x1)`` and
    ``plane_shape``) unless ``region`` (the halo pixels) is given, applies ``transform`` (e.g. intensity →
    counts), and calls ``estimate_fn(Y)`` — or ``estimate_fn(Y, global_ids)`` with ``with_index`` — on
    batches of at most ``batch`` patches (Y: (n, D) float64 → Ŷ: (n, D)). Results are in the units of the
    transformed image."""
    if region is None:
        region = source.read(tile.z, tile.hy0, tile.hy1, tile.hx0, tile.hx1)
    image = np.asarray(transform(region) if transform is not None else region, dtype=np.float64)
    if image.shape != tile.halo_shape:
        raise ValueError(f"halo region has shape {image.shape}, expected {tile.halo_shape}")
    grid, ids = tile_grid(tile, source.plane_shape, patch, stride)
    acc = PixelAccumulator(grid.image_shape)
    n = grid.n_patches
    for start in range(0, n, max(1, int(batch))):
        p = np.arange(start, min(start + batch, n))
        Y = grid.extract(image, p)
        est = estimate_fn(Y, ids[p]) if with_index else estimate_fn(Y)
        acc.add(grid, p, Y, np.asarray(est, dtype=np.float64))
    core = tile.core_in_halo
    sums = acc.sums[:, core[0], core[1]]
    return PixelAccumulator.finish(sums, image[core])


def sample_index(source, n_patches: int, rng: np.random.Generator, patch: tuple[int, int],
                 stride: int = 1) -> np.ndarray:
    """The sorted global indices (section · patches-per-section + index in section) of ``n_patches`` patches
    drawn uniformly without replacement from all patches of all sections (all of them if there are fewer).
    Needs only the source's shape; the same ``rng`` state gives the same sample on every rank."""
    total = PatchGrid(as_pair(source.plane_shape), as_pair(patch), int(stride), source.n_sections).n_patches
    n = min(int(n_patches), total)
    return np.arange(total) if n == total else np.sort(rng.choice(total, size=n, replace=False))


def read_patches(source, ids: np.ndarray, patch: tuple[int, int], stride: int = 1, *,
                 group: tuple[int, int] = (256, 256)) -> np.ndarray:
    """The patches with global indices ``ids`` as an (n, D) float64 array in the order of ``ids``.

    Patches are grouped by section and by ``group``-sized blocks of patch corners; each group reads only the
    bounding box of its patches (or, when the patches are sparse in it, each patch alone), so a sparse sample
    of a huge mosaic reads a small fraction of it."""
    ids = np.asarray(ids, dtype=np.int64)
    grid = PatchGrid(as_pair(source.plane_shape), as_pair(patch), int(stride), source.n_sections)
    z, cy, cx = grid.corners(ids)
    h, w = grid.size
    gy, gx = (int(g) for g in group)
    keys = np.stack([z, cy // gy, cx // gx])
    order = np.lexsort(keys[::-1])
    k = keys[:, order]
    breaks = np.flatnonzero(np.any(k[:, 1:] != k[:, :-1], axis=0)) + 1
    out = np.empty((ids.size, grid.dim))
    offsets = (np.arange(h)[:, None], np.arange(w)[None, :])
    for members in np.split(order, breaks):
        if members.size == 0:
            continue
        ys, xs = cy[members], cx[members]
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + h, int(xs.min()), int(xs.max()) + w
        sec = int(z[members[0]])
        if members.size * h * w * 4 < (y1 - y0) * (x1 - x0):
            # sparse group: read each patch alone (the source's segment cache absorbs shared tiles)
            for m, py, px in zip(members, ys, xs):
                out[m] = source.read(sec, int(py), int(py) + h, int(px), int(px) + w).ravel()
            continue
        region = source.read(sec, y0, y1, x0, x1)
        rows = (ys - y0)[:, None, None] + offsets[0][None]
        cols = (xs - x0)[:, None, None] + offsets[1][None]
        out[members] = region[rows, cols].reshape(members.size, -1)
    return out
