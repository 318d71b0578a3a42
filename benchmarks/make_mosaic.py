"""Write a large tiled BigTIFF mosaic with EM-like content, tile by tile (never holding the whole mosaic).

Content: the mosaic is cut into 512×512 blocks; each block is one ISBI 2012 ssTEM slice (chosen, flipped and
rotated by a seeded generator per block), plus Gaussian noise of standard deviation ``--sigma`` (uint8 clipped
by default, or float32). Every 256×256 TIFF tile is generated from its (seed, tile row, tile column) alone,
so the file is reproducible and can be written in any size.

    python benchmarks/make_mosaic.py --size 16384 --path /tmp/mosaic16k.tif --seed 0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

ISBI = Path("/work/shared/data/isbi2012_sstem_30x512x512.tif")
BLOCK = 512


def mosaic_tiles(size: int, slices: np.ndarray, *, tile: int = 256, sigma: float = 25.0, seed: int = 0,
                 dtype: str = "uint8"):
    """Yield the (tile, tile) tiles of a size×size mosaic in row-major order (edge tiles are full-size
    arrays; tifffile crops them)."""
    n_slices = slices.shape[0]
    cache: dict[tuple[int, int], np.ndarray] = {}
    for ty in range(0, size, tile):
        for tx in range(0, size, tile):
            out = np.zeros((tile, tile), dtype=np.float32)
            # the 512-pixel content blocks overlapping this tile
            for by in range(ty // BLOCK, (ty + tile - 1) // BLOCK + 1):
                for bx in range(tx // BLOCK, (tx + tile - 1) // BLOCK + 1):
                    key = (by, bx)
                    if key not in cache:
                        if len(cache) > 64:
                            cache.clear()
                        r = np.random.default_rng([seed, 1, by, bx])
                        img = slices[r.integers(n_slices)]
                        img = np.rot90(img, int(r.integers(4)))
                        cache[key] = img[:, ::-1] if r.integers(2) else img
                    img = cache[key]
                    y0, x0 = by * BLOCK, bx * BLOCK
                    ya, yb = max(ty, y0), min(ty + tile, y0 + BLOCK)
                    xa, xb = max(tx, x0), min(tx + tile, x0 + BLOCK)
                    out[ya - ty:yb - ty, xa - tx:xb - tx] = img[ya - y0:yb - y0, xa - x0:xb - x0]
            noise = np.random.default_rng([seed, 2, ty // tile, tx // tile]).standard_normal(out.shape,
                                                                                             dtype=np.float32)
            out += np.float32(sigma) * noise
            if dtype == "uint8":
                yield np.clip(np.rint(out), 0, 255).astype(np.uint8)
            else:
                yield out


def make_mosaic(path: str | Path, size: int = 16384, *, seed: int = 0, sigma: float = 25.0, tile: int = 256,
                dtype: str = "uint8", compression: str | None = "zlib", source: Path = ISBI) -> Path:
    """Write the mosaic; returns its path."""
    slices = tifffile.imread(source)
    slices = np.asarray(slices, dtype=np.float32).reshape(-1, *slices.shape[-2:])
    tifffile.imwrite(path, data=mosaic_tiles(size, slices, tile=tile, sigma=sigma, seed=seed, dtype=dtype),
                     shape=(size, size), dtype=np.dtype(dtype), tile=(tile, tile), bigtiff=True,
                     photometric="minisblack", compression=compression)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16384, help="mosaic side in pixels (default 16384)")
    p.add_argument("--path", default="mosaic.tif", help="output BigTIFF path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=25.0, help="Gaussian noise standard deviation")
    p.add_argument("--dtype", choices=("uint8", "float32"), default="uint8")
    p.add_argument("--tile", type=int, default=256, help="TIFF tile side (multiple of 16)")
    p.add_argument("--compression", default="zlib", help="tifffile codec, or 'none'")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = make_mosaic(a.path, a.size, seed=a.seed, sigma=a.sigma, tile=a.tile, dtype=a.dtype,
                      compression=None if a.compression == "none" else a.compression)
    seconds = time.perf_counter() - t0
    print(f"wrote {out}: {a.size}x{a.size} {a.dtype}, tiles {a.tile}x{a.tile}, {out.stat().st_size / 1e6:.1f} MB "
          f"in {seconds:.1f}s ({a.size * a.size / seconds / 1e6:.1f} Mpixel/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
