"""The streamed estimation pass over mosaics and stacks: tiles → ranks → rank 0 → chunked HDF5 volumes.

Tiles (``hpc_zsem.tiles.plan_tiles``) are split into contiguous runs per rank. In each round every rank
computes one tile (reading only its halo region) and the finished cores are gathered to rank 0, which writes
them into the output volumes and drops them. So a rank holds one tile at a time and rank 0 at most one tile
per rank: memory depends on the tile size and the rank count, never on the mosaic size. Tiles give exactly
the whole-image pixels (see ``hpc_zsem.tiles``) because every patch estimate depends only on the frozen
parameters and the patch's global index (``hpc_zsem.randomness.PatchRandom``).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from hpc_zsem.io.results import as_float32
from hpc_zsem.parallel import shard
from hpc_zsem.tiles import Tile, merge_tile

log = logging.getLogger("hpc_zsem")

PROGRESS_EVERY_S = 5.0


def stream_tiles(comm, source, tiles: list[Tile], estimate: Callable[[np.ndarray, np.ndarray, int | None], np.ndarray],
                 patch: tuple[int, int], stride: int, write: Callable[[Tile, np.ndarray, np.ndarray], None] | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 finish: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 stop=None) -> bool:
    """Run the estimation over ``tiles`` on all ranks; ``write`` (rank 0 only) receives every tile's core
    mean and variance. ``estimate(Y, ids, z)`` gives the estimates of patches with indices ``ids`` within
    section ``z`` (None for a 2-D image), ``transform`` maps a read region to
    model units and ``finish`` maps (mean, variance) back. Returns False when ``stop`` became truthy on any
    rank (checked between rounds), True when every tile was written."""
    mine = list(shard(len(tiles), comm.rank, comm.size))
    rounds = -(-len(tiles) // comm.size)
    t0 = last = time.perf_counter()
    pixels_done = tiles_done = 0
    for r in range(rounds):
        result = None
        if r < len(mine):
            tile = tiles[mine[r]]
            mean, variance = merge_tile(lambda Y, ids: estimate(Y, ids, tile.z), source, tile, patch, stride,
                                        transform=transform, with_index=True)
            if finish is not None:
                mean, variance = finish(mean, variance)
            result = (tile, as_float32(mean), as_float32(variance))
        gathered = comm.gather((result, bool(stop)))
        halt = False
        if comm.rank == 0:
            for item, stop_here in gathered:
                halt |= stop_here
                if item is not None:
                    write(*item)
                    tiles_done += 1
                    pixels_done += item[0].n_pixels
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S or tiles_done == len(tiles):
                rate = pixels_done / (now - t0)
                left = (sum(t.n_pixels for t in tiles) - pixels_done) / max(rate, 1e-9)
                log.info("estimation: tiles %d/%d, %.3g pixels/s, left ~%.0fs", tiles_done, len(tiles), rate, left)
                last = now
        if comm.bcast(halt):
            return False
    return True
