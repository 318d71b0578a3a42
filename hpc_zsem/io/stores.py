"""Result stores chosen by the form of ``output.path``: a registry of suffix → format (:data:`FORMATS`).

* ``*.zarr`` → :class:`~hpc_zsem.io.zarr_store.ZarrResultStore` (OME-Zarr, NGFF 0.5): every rank holds a
  handle and writes its own tiles (``per_rank_writes = True``);
* anything else → :class:`RankZeroStore`, a thin proxy around the HDF5
  :class:`~hpc_zsem.io.volumes.VolumeWriter` that exists on rank 0 only: the other ranks send their tiles to
  rank 0 (``per_rank_writes = False``), as the streamed pass always did.

Both offer ``names`` (the images held: ``mean``, ``variance`` and the ``extra`` ones, e.g. ``input``) and
``written`` (tile keys already in a resumed store) on every rank, and ``write``, ``set_params``,
``set_history``, ``set_metadata``, ``close``, ``suspend`` and ``abort``. :func:`check_output_path` dispatches
the same way (the check of ``output.path`` before any work).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpc_zsem.io import results
from hpc_zsem.io.volumes import VolumeWriter
from hpc_zsem.io.zarr_store import ZarrResultImages, ZarrResultStore, check_zarr_output_path, read_zarr_summary


class RankZeroStore:
    """The HDF5 :class:`VolumeWriter` on rank 0; nothing elsewhere (every method but ``written`` is a no-op
    there). Behaves exactly as the streamed pass did before result stores: rank 0 gathers and writes."""

    per_rank_writes = False

    def __init__(self, comm, path: str | os.PathLike, shape: tuple[int, ...], *,
                 element_size_um: tuple[float, ...] | None = None, overwrite: bool = False,
                 resume_key: str | None = None, extra: tuple[str, ...] = (), tile: tuple[int, int] | None = None):
        self.comm = comm
        self.path = Path(path)
        self.names = ("mean", "variance") + tuple(extra)
        self.writer = VolumeWriter(path, shape, element_size_um=element_size_um, extra=tuple(extra),
                                   overwrite=overwrite, resume_key=resume_key) if comm.rank == 0 else None
        self._written = comm.bcast(self.writer.written if self.writer is not None else None)

    @property
    def written(self) -> set[tuple]:
        return set(self._written)

    def write(self, tile, mean_core: np.ndarray, var_core: np.ndarray, **extra: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write(tile, mean_core, var_core, **extra)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        if self.writer is not None:
            self.writer.set_params(params)

    def set_history(self, history: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.set_history(history)

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.set_metadata(metadata)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def suspend(self) -> None:
        if self.writer is not None:
            self.writer.suspend()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


@dataclass(frozen=True)
class ResultFormat:
    """Everything that depends on a result's format: the store class that writes it (collective), the check of
    an output path before any work (existence, --overwrite, ownership), the reader of its shape, params,
    history and metadata (no image data), and how its images are opened read-only (export)."""

    store: type
    check_output: Callable[[str | os.PathLike, bool], None]
    read_summary: Callable[[str | os.PathLike], dict[str, Any]]
    open_images: Callable[[str | os.PathLike], Any]


HDF5 = ResultFormat(RankZeroStore, results.check_output_path, results.read_result_summary, results.open_result)
#: suffix of the path (lower case) → its format; any other suffix is HDF5
FORMATS = {".zarr": ResultFormat(ZarrResultStore, check_zarr_output_path, read_zarr_summary, ZarrResultImages)}


def result_format(path: str | os.PathLike) -> ResultFormat:
    """The format a result path selects, by its suffix."""
    return FORMATS.get(Path(path).suffix.lower(), HDF5)


def open_result_store(comm, path: str | os.PathLike, shape: tuple[int, ...], *,
                      element_size_um: tuple[float, ...] | None = None, overwrite: bool = False,
                      resume_key: str | None = None, extra: tuple[str, ...] = (),
                      tile: tuple[int, int] | None = None):
    """Open the result store for ``path`` on every rank of ``comm`` (collective). ``resume_key`` is read on
    rank 0 (a resumable ``<path>.partial``); ``tile`` is the tile size of the streamed pass (chunks of a zarr
    store divide it)."""
    return result_format(path).store(comm, path, shape, element_size_um=element_size_um, overwrite=overwrite,
                                     resume_key=resume_key, extra=tuple(extra), tile=tile)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> None:
    """The output check of the format ``path`` selects (see ``hpc_zsem.io.results.check_output_path``)."""
    result_format(path).check_output(path, overwrite)


def read_result_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Shape, params, history and metadata of the result at ``path``, whichever store wrote it (see
    ``hpc_zsem.io.results.read_result_summary``)."""
    return result_format(path).read_summary(path)


def open_result_images(path: str | os.PathLike) -> Any:
    """The result at ``path`` opened read-only as a context manager whose ``[name]`` is image ``name`` (mean,
    variance, input) with ``shape``, ``chunks``, slicing and ``attrs`` — an h5py file for HDF5, a
    :class:`~hpc_zsem.io.zarr_store.ZarrResultImages` for OME-Zarr."""
    return result_format(path).open_images(path)
