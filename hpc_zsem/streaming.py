"""The streamed estimation pass over mosaics and stacks: tiles → ranks → result store.

Tiles (``hpc_zsem.tiles.plan_tiles``) are split into contiguous runs per rank. In each round every rank
computes one tile (reading only its halo region). Where the finished core goes depends on the result store
(``hpc_zsem.io.stores``):

* **rank-0 stores** (HDF5, ``per_rank_writes = False``): the cores are gathered to rank 0, which writes them
  into the output volumes and drops them, so rank 0 holds at most one tile per rank;
* **per-rank stores** (OME-Zarr, ``per_rank_writes = True``): every rank writes its own core into the store's
  chunks, and only (tile index, pixels, stop flag, error) goes to rank 0 for progress and bookkeeping. A write
  that fails on any rank is agreed on in the same round: rank 0 drops the store, then every rank raises the
  same one-line OutputError (no rank is left waiting in a collective).

Either way a rank holds one tile at a time: memory depends on the tile size and the rank count, never on the
mosaic size. Tiles give exactly the whole-image pixels (see ``hpc_zsem.tiles``) because every patch estimate
depends only on the frozen parameters and the patch's global index (``hpc_zsem.randomness.PatchRandom``).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from hpc_zsem.errors import HpcZsemError, OutputError
from hpc_zsem.io.results import as_float32
from hpc_zsem.parallel import shard
from hpc_zsem.tiles import Tile, merge_tile

log = logging.getLogger("hpc_zsem")

PROGRESS_EVERY_S = 5.0


def stream_tiles(comm, source, tiles: list[Tile], estimate: Callable[[np.ndarray, np.ndarray, int | None], np.ndarray],
                 patch: tuple[int, int], stride: int, write: Callable[[Tile, np.ndarray, np.ndarray], None] | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 finish: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 stop=None, *, store=None) -> bool:
    """Run the estimation over ``tiles`` on all ranks. With a ``store`` whose ``per_rank_writes`` is true
    every rank writes its own tiles with ``store.write``; otherwise ``write`` (rank 0 only; ``store.write``
    when ``write`` is None) receives every tile's core mean and variance — and ``input=`` the core's input
    pixels when the store holds an ``input`` image (``store.names``). ``estimate(Y, ids, z)`` gives the
    estimates of patches with indices ``ids`` within section ``z`` (None for a 2-D image), ``transform`` maps
    a read region to model units and ``finish`` maps (mean, variance) back. Returns False when ``stop``
    became truthy on any rank (checked between rounds), True when every tile was written."""
    per_rank = store is not None and getattr(store, "per_rank_writes", False)
    with_input = store is not None and "input" in getattr(store, "names", ())   # the input pixels of the core
    if write is None and store is not None:
        write = store.write
    mine = list(shard(len(tiles), comm.rank, comm.size))
    rounds = -(-len(tiles) // comm.size)
    t0 = last = time.perf_counter()
    pixels_done = tiles_done = 0
    total_pixels = sum(t.n_pixels for t in tiles)
    for r in range(rounds):
        result = None
        if r < len(mine):
            tile = tiles[mine[r]]
            mean, variance = merge_tile(lambda Y, ids: estimate(Y, ids, tile.z), source, tile, patch, stride,
                                        transform=transform, with_index=True)
            if finish is not None:
                mean, variance = finish(mean, variance)
            extra = {"input": as_float32(source.read(tile.z, tile.y0, tile.y1, tile.x0, tile.x1))} if with_input else {}
            result = (tile, as_float32(mean), as_float32(variance), extra)
        if per_rank:
            error = None
            if result is not None:
                try:
                    store.write(*result[:3], **result[3])
                except HpcZsemError as exc:
                    error = str(exc)
                except OSError as exc:
                    error = f"{store.path}: cannot write the result ({exc}); nothing was replaced"
            done = None if result is None or error else (result[0].index, result[0].n_pixels)
            gathered = comm.gather((done, bool(stop), error))
        else:
            gathered = comm.gather((result, bool(stop)))
        halt, failure = False, None
        if comm.rank == 0:
            for entry in gathered:
                item, stop_here = entry[0], entry[1]
                halt |= stop_here
                if per_rank:
                    failure = failure or entry[2]
                    if item is not None:
                        tiles_done += 1
                        pixels_done += item[1]
                elif item is not None:
                    if write is None:
                        raise ValueError("stream_tiles: rank 0 needs write= or store= to write the tiles")
                    write(*item[:3], **item[3])
                    tiles_done += 1
                    pixels_done += item[0].n_pixels
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S or tiles_done == len(tiles):
                rate = pixels_done / (now - t0)
                left = (total_pixels - pixels_done) / max(rate, 1e-9)
                log.info("estimation: tiles %d/%d, %.3g pixels/s, left ~%.0fs", tiles_done, len(tiles), rate, left)
                last = now
        if per_rank:
            halt, failure = comm.bcast((halt, failure))
            if failure:
                store.abort()           # rank 0 removes the store before any rank reports and exits
                comm.barrier()
                raise OutputError(failure)
            if halt:
                return False
        elif comm.bcast(halt):
            return False
    return True
