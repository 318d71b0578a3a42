"""Chunked, compressed HDF5 mean/variance volumes written tile by tile, atomically.

:class:`VolumeWriter` creates ``<name>.tmp-<pid>`` beside the final path with float32 datasets ``mean`` and
``variance`` (and any ``extra`` ones, e.g. ``input``) of the image's shape — (Y, X) or (Z, Y, X) — chunked
(256, 256) / (1, 256, 256), gzip 4 + shuffle, with attributes ``axes`` ("YX"/"ZYX") and, when known,
``element_size_um`` (one value per axis, µm; the attribute Fiji's HDF5 plugin reads). Tiles are written in
any order with :meth:`VolumeWriter.write`; :meth:`VolumeWriter.close` checks that every pixel was written
exactly once, writes params/history/metadata (the result-file layout of :mod:`hpc_zsem.io.results`, so
``read_result`` / export work on small outputs), flushes, fsyncs and renames the file into place. Any failure
(or :meth:`abort`, or leaving a ``with`` block by an exception) removes the temporary file and leaves an
existing output untouched.

Resumable passes: with ``resume_key`` the temporary file is ``<name>.partial`` (a fixed name) instead. On
:meth:`suspend` (a stop request) it is flushed and closed with the list of written tiles and the mark
``clean = 1``; a later writer with the same ``resume_key`` reopens it and :attr:`written` tells which tiles
to skip. A partial file that was not suspended cleanly (e.g. the job was SIGKILLed while it was open, so the
HDF5 file may be inconsistent) or that has another key is discarded, and the pass starts afresh.

Parallel runs (the pip h5py has no MPI-IO): **rank 0 owns the writer; other ranks send each finished tile
(its :class:`~hpc_zsem.tiles.Tile` and the two float32 core arrays) to rank 0**, which writes it as it
arrives. Memory per rank is bounded by a few tiles plus the HDF5 chunk cache, never by the volume; the
writer keeps only a per-tile bookkeeping set. Cores aligned to multiples of 256 (the default tile size 512)
hit whole chunks, so each chunk is compressed once.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_zsem.errors import OutputError
from hpc_zsem.io.paths import is_hdf5_file, refuse_foreign, root_attribute
from hpc_zsem.io.results import (ResultContent, as_float32, check_output_path, fsync_path, history_arrays,
                                 write_metadata)

CHUNK = 256
_CHUNK_CACHE = 64 << 20   # bytes of HDF5 chunk cache per dataset
_METADATA_SLACK = 4 << 20  # bytes HDF5 may add for metadata, params and history when a file is closed


def _chunks(shape: tuple[int, ...], chunks: tuple[int, int]) -> tuple[int, ...]:
    plane = tuple(max(1, min(c, n)) for c, n in zip(chunks, shape[-2:]))
    return plane if len(shape) == 2 else (1,) + plane


class VolumeWriter(ResultContent):
    """Write mean/variance volumes tile by tile into an HDF5 file that appears atomically on close."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], chunks: tuple[int, int] = (CHUNK, CHUNK),
                 attrs: Mapping[str, Any] | None = None, *, element_size_um: tuple[float, ...] | None = None,
                 extra: tuple[str, ...] = (), overwrite: bool = False, compression_level: int = 4,
                 resume_key: str | None = None):
        shape = tuple(int(n) for n in shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"expected a (Y, X) or (Z, Y, X) shape, got {shape}")
        check_output_path(path, overwrite)
        self.path = Path(path)
        self.shape = shape
        self.axes = "YX" if len(shape) == 2 else "ZYX"
        self.names = ("mean", "variance") + tuple(extra)
        self._attrs = dict(attrs or {})
        self._params: dict[str, np.ndarray] = {}
        self._history: dict[str, np.ndarray] = {}
        self._written: set[tuple] = set()
        self._pixels = 0
        self._resume_key = resume_key
        if resume_key is None:
            self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        else:
            self.tmp = self.path.with_name(f"{self.path.name}.partial")
            self._file = self._reopen(resume_key)
            if self._file is not None:
                return
        self._ensure_space(0)
        self._file = h5py.File(self.tmp, "w", rdcc_nbytes=_CHUNK_CACHE)
        try:
            for name in self.names:
                ds = self._file.create_dataset(name, shape=shape, dtype=np.float32, chunks=_chunks(shape, chunks),
                                               compression="gzip", compression_opts=int(compression_level),
                                               shuffle=True, fillvalue=np.float32(np.nan))
                ds.attrs["axes"] = self.axes
                if element_size_um is not None:
                    size = tuple(float(v) for v in element_size_um)
                    if len(size) == 2 and len(shape) == 3:
                        size = (1.0,) + size
                    if len(size) != len(shape):
                        raise ValueError(f"element_size_um {size} does not match the axes {self.axes}")
                    ds.attrs["element_size_um"] = np.asarray(size, dtype=np.float32)
            if resume_key is not None:
                self._mark_open(self._file, resume_key)
        except BaseException:
            self.abort()
            raise

    # ---------------------------------------------------------------- resumable passes
    def _reopen(self, key: str) -> h5py.File | None:
        """The partial file of an earlier, cleanly suspended pass with the same key and shape, or None (any
        other partial file of this tool is removed; a foreign file of that name is refused)."""
        if not self.tmp.exists():
            return None
        # ours: an HDF5 file with a resume key, or one that does not open (a writer killed mid-write)
        refuse_foreign(self.tmp, is_hdf5_file(self.tmp) and root_attribute(self.tmp, "resume_key") != "",
                       "output.path", "a partial hpc_zsem result")
        try:
            f = h5py.File(self.tmp, "r+", rdcc_nbytes=_CHUNK_CACHE)
        except OSError:
            self.tmp.unlink()
            return None
        try:
            usable = (f.attrs.get("clean") == 1 and f.attrs.get("resume_key") == np.bytes_(key.encode())
                      and all(name in f and f[name].shape == self.shape for name in self.names)
                      and "written_tiles" in f)
            if usable:
                self._written = {tuple(None if v < 0 else int(v) for v in row) for row in f["written_tiles"][()]}
                self._pixels = sum((y1 - y0) * (x1 - x0) for _, y0, y1, x0, x1 in self._written)
                del f["written_tiles"]
                self._file = f
                self._mark_open(f, key)
                return f
        except (OSError, KeyError, ValueError, TypeError):
            pass
        f.close()
        self.tmp.unlink()
        self._written, self._pixels = set(), 0
        return None

    def _mark_open(self, f: h5py.File, key: str) -> None:
        """Mark the partial file ``f`` (resume key ``key``) as being written (``clean = 0``) before any tile goes in."""
        f.attrs["resume_key"] = np.bytes_(key.encode())
        f.attrs["clean"] = 0
        f.flush()

    def _ensure_space(self, pending_bytes: int) -> None:
        """Refuse (OutputError) to go on when the file system may not hold what HDF5 writes next.

        libhdf5 cannot recover from a failed write (measured: h5py segfaults on close after ENOSPC), so the
        writer stops *before* that can happen: it needs room for ``pending_bytes`` of new data, everything the
        chunk caches may still hold (at most the uncompressed volume) and the metadata written on close.
        """
        cached = min(len(self.names) * _CHUNK_CACHE, len(self.names) * 4 * int(np.prod(self.shape)))
        needed = pending_bytes + cached + _METADATA_SLACK
        free = shutil.disk_usage(self.tmp.parent).free
        if free < needed:
            raise OutputError(f"{self.path}: not enough disk space to go on writing the result ({free / 2**20:.1f} "
                              f"MiB free, up to {needed / 2**20:.1f} MiB needed); nothing was replaced")

    @property
    def written(self) -> set[tuple]:
        """Keys (z, y0, y1, x0, x1) of the tiles already in the file (z is None for 2-D volumes)."""
        return set(self._written)

    def suspend(self) -> None:
        """Keep the partial file for a later writer with the same ``resume_key``: store the written tiles,
        mark it clean, flush and close. Without a resume key this is :meth:`abort`."""
        if self._file is None or self._resume_key is None:
            self.abort()
            return
        try:
            self._ensure_space(0)
            rows = np.array([[-1 if v is None else v for v in key] for key in sorted(self._written, key=str)],
                            dtype=np.int64).reshape(-1, 5)
            self._file.create_dataset("written_tiles", data=rows)
            self._file.attrs["clean"] = 1
            self._file.flush()
            self._file.close()
            self._file = None
            fsync_path(self.tmp)
        except BaseException:
            self.abort()
            raise

    # ---------------------------------------------------------------- writing
    def write(self, tile, mean_core: np.ndarray, var_core: np.ndarray, **extra: np.ndarray) -> None:
        """Write one tile's core (any order). ``tile`` is a :class:`~hpc_zsem.tiles.Tile` or anything with
        ``z, y0, y1, x0, x1``; arrays have the core's shape."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        z = getattr(tile, "z", None)
        if (z is None) != (len(self.shape) == 2):
            raise ValueError(f"tile z={z} does not match a volume of shape {self.shape}")
        y0, y1, x0, x1 = int(tile.y0), int(tile.y1), int(tile.x0), int(tile.x1)
        Y, X = self.shape[-2:]
        if not (0 <= y0 < y1 <= Y and 0 <= x0 < x1 <= X) or (z is not None and not 0 <= z < self.shape[0]):
            raise ValueError(f"tile z={z} [{y0}:{y1}, {x0}:{x1}] lies outside the volume {self.shape}")
        key = (z, y0, y1, x0, x1)
        if key in self._written:
            raise ValueError(f"tile {key} was already written")
        arrays = {"mean": mean_core, "variance": var_core, **extra}
        if set(arrays) != set(self.names):
            raise ValueError(f"expected arrays {self.names}, got {tuple(arrays)}")
        index = (slice(y0, y1), slice(x0, x1)) if z is None else (int(z), slice(y0, y1), slice(x0, x1))
        try:
            self._ensure_space(len(arrays) * 4 * (y1 - y0) * (x1 - x0))
            for name, value in arrays.items():
                value = as_float32(value)
                if value.shape != (y1 - y0, x1 - x0):
                    raise ValueError(f"{name}: core of shape {value.shape}, expected {(y1 - y0, x1 - x0)}")
                self._file[name][index] = value
        except BaseException:
            self.abort()
            raise
        self._written.add(key)
        self._pixels += (y1 - y0) * (x1 - x0)

    @property
    def pixels_written(self) -> int:
        return self._pixels

    @property
    def complete(self) -> bool:
        return self._pixels == int(np.prod(self.shape))

    # ---------------------------------------------------------------- finishing
    def close(self) -> None:
        """Check every pixel was written, add params/history/metadata, flush, fsync and rename into place."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        try:
            total = int(np.prod(self.shape))
            if self._pixels != total:
                raise ValueError(f"{self.path}: only {self._pixels} of {total} pixels were written")
            self._ensure_space(0)
            f = self._file
            for key in ("clean", "resume_key"):
                if key in f.attrs:
                    del f.attrs[key]
            for name, value in self._params.items():
                f.create_dataset(f"params/{name}", data=value)
            for name, column in self._history.items():
                f.create_dataset(f"history/{name}", data=column)
            f.require_group("params")
            f.require_group("history")
            write_metadata(f, {"axes": self.axes, **self._attrs})
            f.flush()
            f.close()
            self._file = None
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_path(self.path.parent)

    def abort(self) -> None:
        """Discard the temporary file (idempotent)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:   # noqa: BLE001 - already failing
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VolumeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file is not None:
            self.close()


@dataclass(frozen=True)
class _Whole:
    """The whole (Y, X) plane, or section z of a volume: a region for :meth:`VolumeWriter.write`."""

    z: int | None
    y0: int
    y1: int
    x0: int
    x1: int


def write_result(path: str | os.PathLike, *, mean: np.ndarray, variance: np.ndarray, noisy: np.ndarray,
                 params: Mapping[str, np.ndarray], history: Mapping[str, Any], metadata: Mapping[str, Any],
                 overwrite: bool = False, element_size_um: tuple[float, ...] | None = None) -> None:
    """Write a result held in memory — (Y, X) or (Z, Y, X) mean, variance and input — with the one result
    writer, :class:`VolumeWriter` (same layout, same atomic replacement, same full-disk guard)."""
    shape = np.shape(mean)
    if len(shape) not in (2, 3) or np.shape(variance) != shape or np.shape(noisy) != shape:
        raise ValueError(f"mean, variance and input must share one (Y, X) or (Z, Y, X) shape, got {np.shape(mean)}, "
                         f"{np.shape(variance)} and {np.shape(noisy)}")
    columns = history_arrays(history)
    try:
        with VolumeWriter(path, shape, extra=("input",), overwrite=overwrite,
                          element_size_um=element_size_um) as writer:
            for z in (None,) if len(shape) == 2 else range(shape[0]):
                part = slice(None) if z is None else z
                writer.write(_Whole(z, 0, shape[-2], 0, shape[-1]), np.asarray(mean)[part],
                             np.asarray(variance)[part], input=np.asarray(noisy)[part])
            writer.set_params(params)
            writer.set_history(columns)
            writer.set_metadata(metadata)
    except OSError as exc:   # e.g. a full disk or a lost mount: the earlier result (if any) is untouched
        raise OutputError(f"{path}: cannot write the result ({exc}); nothing was replaced") from None
