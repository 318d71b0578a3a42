"""Tiled estimation equals the whole-image merge; tile geometry; training samples read only their regions."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from hpc_zsem.io.regions import open_source
from hpc_zsem.patches import PatchGrid, PixelAccumulator
from hpc_zsem.tiles import CornerGrid, merge_tile, plan_tiles, read_patches, sample_index, tile_grid


def estimate(Y):
    """Deterministic, patch-dependent, non-trivial estimate."""
    return 0.5 * Y + Y.mean(axis=1, keepdims=True) + 0.01 * np.arange(Y.shape[1])


def whole_image(image, patch, stride):
    grid = PatchGrid(image.shape, patch, stride)
    acc = PixelAccumulator(image.shape)
    p = np.arange(grid.n_patches)
    Y = grid.extract(image, p)
    acc.add(grid, p, Y, estimate(Y))
    return PixelAccumulator.finish(acc.sums, image)


class ArraySource:
    """In-memory stand-in with the ImageSource read API."""

    def __init__(self, array):
        self.array = np.asarray(array, dtype=np.float64)
        self.shape = self.array.shape
        self.ndim = self.array.ndim
        self.plane_shape = self.shape[-2:]
        self.n_sections = 1 if self.ndim == 2 else self.shape[0]
        self.reads = []

    def read(self, z, y0, y1, x0, x1):
        self.reads.append((z, y0, y1, x0, x1))
        plane = self.array if self.ndim == 2 else self.array[z or 0]
        return plane[y0:y1, x0:x1].copy()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(100.0, 20.0, size=(61, 47))


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("tile", [(8, 8), (16, 10), (25, 47), (61, 47), (7, 100)])
def test_tiled_merge_equals_whole_image(image, tile, stride):
    patch = (5, 4)
    mean_ref, var_ref = whole_image(image, patch, stride)
    src = ArraySource(image)
    mean = np.full(image.shape, np.nan)
    var = np.full(image.shape, np.nan)
    tiles = plan_tiles(image.shape, tile, patch, stride)
    for t in tiles:
        m, v = merge_tile(estimate, src, t, patch, stride, batch=37)
        assert np.all(np.isnan(mean[t.out_index]))   # cores partition the image
        mean[t.out_index], var[t.out_index] = m, v
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-12 * np.abs(mean_ref).max())
    np.testing.assert_allclose(var, var_ref, rtol=0, atol=1e-12 * max(var_ref.max(), 1.0) * 10)
    assert np.var(var_ref) > 0   # the test is not vacuous
    for t in tiles:   # halos: inside the image, at most patch - 1 beyond the core
        assert 0 <= t.hy0 <= t.y0 < t.y1 <= t.hy1 <= image.shape[0]
        assert t.y0 - t.hy0 <= patch[0] - 1 and t.hy1 - t.y1 <= patch[0] - 1
        assert t.x0 - t.hx0 <= patch[1] - 1 and t.hx1 - t.x1 <= patch[1] - 1


def test_stride_uses_global_corner_grid(image):
    patch, stride = (5, 4), 3
    grid = PatchGrid(image.shape, patch, stride)
    t = plan_tiles(image.shape, (10, 10), patch, stride)[5]
    local, ids = tile_grid(t, image.shape, patch, stride)
    assert isinstance(local, CornerGrid) and isinstance(local, PatchGrid)
    _, gy, gx = grid.corners(ids)
    _, ly, lx = local.corners(np.arange(local.n_patches))
    np.testing.assert_array_equal(gy, ly + t.hy0)
    np.testing.assert_array_equal(gx, lx + t.hx0)
    # the tile's patches are exactly the global patches that cover a core pixel
    covers = ((gy + patch[0] > t.y0) & (gy < t.y1) & (gx + patch[1] > t.x0) & (gx < t.x1))
    assert covers.all()
    _, all_y, all_x = grid.corners(np.arange(grid.n_patches))
    all_covers = ((all_y + patch[0] > t.y0) & (all_y < t.y1) & (all_x + patch[1] > t.x0) & (all_x < t.x1))
    np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(all_covers))
    # with_index passes the global ids: the estimate may depend on the global patch index
    seen = []
    merge_tile(lambda Y, i: (seen.append(i), Y)[1], ArraySource(image), t, patch, stride, with_index=True)
    np.testing.assert_array_equal(np.concatenate(seen), ids)


def test_index_dependent_estimate_is_seam_free(image):
    """An estimate that depends on the global patch index (e.g. RNG keyed by patch) still merges exactly."""
    patch, stride = (4, 4), 2
    grid = PatchGrid(image.shape, patch, stride)
    noise = np.random.default_rng(1).normal(size=(grid.n_patches, grid.dim))
    fn = lambda Y, ids: Y + noise[ids]   # noqa: E731
    acc = PixelAccumulator(image.shape)
    p = np.arange(grid.n_patches)
    Y = grid.extract(image, p)
    acc.add(grid, p, Y, fn(Y, p))
    mean_ref, var_ref = PixelAccumulator.finish(acc.sums, image)
    mean = np.zeros_like(image)
    var = np.zeros_like(image)
    for t in plan_tiles(image.shape, (9, 13), patch, stride):
        mean[t.out_index], var[t.out_index] = merge_tile(fn, ArraySource(image), t, patch, stride, with_index=True)
    np.testing.assert_allclose(mean, mean_ref, atol=1e-12)
    np.testing.assert_allclose(var, var_ref, atol=1e-12)


def test_stack_tiles_and_tiff_source(tmp_path):
    stack = np.random.default_rng(2).integers(0, 255, size=(3, 40, 50)).astype(np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", tile=(16, 16))
    patch = (6, 6)
    with open_source(path) as src:
        tiles = plan_tiles(src.shape, (16, 32), patch, 1)
        assert [t.z for t in tiles] == [0] * 6 + [1] * 6 + [2] * 6
        out = np.zeros((2,) + stack.shape)
        for t in tiles:
            out[(0,) + t.out_index], out[(1,) + t.out_index] = merge_tile(estimate, src, t, patch)
    for z in range(3):
        m, v = whole_image(stack[z].astype(np.float64), patch, 1)
        np.testing.assert_allclose(out[0, z], m, atol=1e-10)
        np.testing.assert_allclose(out[1, z], v, atol=1e-10)


def test_plan_tiles_rejects_bad_input():
    with pytest.raises(ValueError, match="larger than the image"):
        plan_tiles((10, 10), (4, 4), (12, 12))
    with pytest.raises(ValueError):
        plan_tiles((10,), (4, 4), (2, 2))
    with pytest.raises(ValueError):
        plan_tiles((10, 10), (0, 4), (2, 2))


def training_sample(src, n, rng, patch, stride):
    ids = sample_index(src, n, rng, patch, stride)
    return read_patches(src, ids, patch, stride), ids


def test_training_sample_matches_extract_and_reads_little(tmp_path):
    size, patch, stride = 2048, (8, 8), 2
    image = np.random.default_rng(3).integers(0, 255, size=(size, size)).astype(np.uint8)
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, image, tile=(128, 128), bigtiff=True)
    grid = PatchGrid(image.shape, patch, stride)
    with open_source(path) as src:
        Y, ids = training_sample(src, 20, np.random.default_rng(7), patch, stride)
        assert Y.shape == (20, 64) and np.all(np.diff(ids) > 0)
        np.testing.assert_array_equal(Y, grid.extract(image, ids))
        assert src.stats["segments_decoded"] <= 4 * 20
        assert src.stats["pixels_decoded"] < image.size // 4
        # a dense sample reads by groups and still matches
        Yd, idd = training_sample(src, 5000, np.random.default_rng(8), patch, stride)
        np.testing.assert_array_equal(Yd, grid.extract(image, idd))
    # same rng → same sample (every rank draws identically)
    with open_source(path) as src:
        Y2, _ = training_sample(src, 20, np.random.default_rng(7), patch, stride)
    np.testing.assert_array_equal(Y, Y2)
    # more draws than patches: every patch once
    small = ArraySource(image[:20, :20].astype(float))
    Yall, ids = training_sample(small, 10**9, np.random.default_rng(0), patch, 1)
    g = PatchGrid((20, 20), patch, 1)
    np.testing.assert_array_equal(ids, np.arange(g.n_patches))
    np.testing.assert_array_equal(Yall, g.extract(small.array, ids))
    # any order of indices: the rows come back in that order
    shuffled = np.random.default_rng(1).permutation(ids)[:50]
    np.testing.assert_array_equal(read_patches(small, shuffled, patch, 1), g.extract(small.array, shuffled))


def test_training_sample_over_a_stack(tmp_path):
    vol = np.random.default_rng(4).normal(size=(3, 30, 40))
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["v"] = vol
    patch = (5, 5)
    with open_source(f"{path}:/v") as src:
        Y, ids = training_sample(src, 200, np.random.default_rng(1), patch, 1)
    g = PatchGrid((30, 40), patch, 1)
    z, local = np.divmod(ids, g.n_patches)
    assert set(z.tolist()) == {0, 1, 2}
    for s in range(3):
        np.testing.assert_array_equal(Y[z == s], g.extract(vol[s], local[z == s]))
