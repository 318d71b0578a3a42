"""The result HDF5 file (format_version 1): layout, checks and readers. Results are written by
:class:`hpc_zsem.io.volumes.VolumeWriter` (atomically; :func:`hpc_zsem.io.volumes.write_result` for an image in
memory); checkpoints use :func:`hdf5_image` and :func:`write_atomically` from here.

Layout::

    /mean, /variance, /input   float32 (Y, X), chunks <= (256, 256), gzip 4 + shuffle, attrs axes="YX"
    /params/<name>             float64 arrays (model parameters)
    /history/<name>            1-D float64 arrays of equal length (epoch, free_energy, sigma2, ...)
    root attrs                 format="hpc_zsem-result", format_version=1, plus every metadata key
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_zsem.errors import InputError, OutputError
from hpc_zsem.io.paths import is_hpc_zsem_file, refuse_foreign

FORMAT = "hpc_zsem-result"
FORMAT_VERSION = 1
IMAGES = ("mean", "variance", "input")
REQUIRED_IMAGES = ("mean", "variance")
_RESERVED = ("format", "format_version")


def check_output_directory(path: Path) -> None:
    """Refuse (OutputError) an output whose directory is missing or not writable (any store)."""
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory '{parent}' is not writable")


class ResultContent:
    """What a result store writes beside its images, collected by these setters and written on close: Θ
    (``_params``, float64), the per-epoch ``_history`` columns and the metadata attributes (``_attrs``)."""

    _params: dict[str, np.ndarray]
    _history: dict[str, np.ndarray]
    _attrs: dict[str, Any]

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        self._params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}

    def set_history(self, history: Mapping[str, Any]) -> None:
        self._history = history_arrays(history)

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        self._attrs.update(metadata)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (OutputError) an output whose directory is missing or not writable, that exists without
    ``overwrite``, or that exists and is not an hpc_zsem result (never replaced, even with ``overwrite``)."""
    path = Path(path)
    check_output_directory(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; expected a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    refuse_foreign(path, is_hpc_zsem_file(path, FORMAT), "output.path", "an hpc_zsem result")


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hdf5_image(writer: Callable[[h5py.File], None]) -> memoryview:
    """The bytes of an HDF5 file filled by ``writer``, built in memory.

    HDF5 itself never writes to disk: libhdf5 handles a write error (ENOSPC, EIO) badly — measured: h5py
    segfaults while closing a file after "No space left on device" — while a failing ``os.write`` of the
    finished image is a plain OSError.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        writer(f)
    return buffer.getbuffer()


def write_atomically(path: str | os.PathLike, *parts: bytes | memoryview) -> None:
    """Create ``path`` with the concatenated ``parts``, atomically.

    The bytes go to ``<name>.tmp-<pid>`` in the same directory, are fsynced, then renamed over ``path``; if
    anything fails (a full disk, an I/O error, a signal) the temporary file is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fh = open(tmp, "xb")           # exclusive: an existing file of that name is never truncated nor removed
    try:
        with fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def as_float32(values: np.ndarray) -> np.ndarray:
    """Result pixels as float32, clipped to its finite range: the variance of intensities beyond ~1.8e19
    would otherwise overflow to inf (the pipeline warns when the input can reach that)."""
    limit = np.finfo(np.float32).max
    return np.clip(np.asarray(values, dtype=np.float64), -limit, limit).astype(np.float32)


def history_arrays(history: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """History columns as 1-D float64 arrays, checked to have equal lengths."""
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in history.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"history columns have different lengths: { {k: len(a) for k, a in arrays.items()} }")
    return arrays


def _attr_value(key: str, value: Any) -> Any:
    """A metadata value as an HDF5 attribute. Text is stored as fixed-length UTF-8 bytes, never as
    variable-length strings: libhdf5 can loop forever reading a corrupted variable-length heap (found by
    fuzzing), while fixed-length attributes fail cleanly."""
    if isinstance(value, str):
        return np.bytes_(value.encode())
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array([v.encode() for v in value], dtype=np.bytes_)
    if isinstance(value, (int, float, bool, np.generic, list, tuple, np.ndarray)):
        return value
    raise TypeError(f"metadata {key!r}: expected str, int, float or list, got {type(value).__name__}")


def write_metadata(f: h5py.File, metadata: Mapping[str, Any]) -> None:
    """Root attributes: the format markers and every metadata key (None values are omitted)."""
    clash = [k for k in metadata if k in _RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    f.attrs["format"] = _attr_value("format", FORMAT)
    f.attrs["format_version"] = FORMAT_VERSION
    for key, value in metadata.items():
        if value is not None:
            f.attrs[key] = _attr_value(key, value)


def plain_value(value: Any) -> Any:
    """An HDF5 attribute value as builtins (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_result(path: str | os.PathLike) -> h5py.File:
    """Open a result file for reading, refusing anything that is not one (InputError): it must carry
    format="hpc_zsem-result" and the /mean and /variance datasets (/input is optional, e.g. for mosaics)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file") from None
    try:
        version = f.attrs.get("format_version")
        if plain_value(f.attrs.get("format")) != FORMAT or not all(n in f for n in REQUIRED_IMAGES):
            raise InputError(f"{path}: not an hpc_zsem result file")
        if version is None or int(version) > FORMAT_VERSION:
            raise InputError(f"{path}: result format_version {version} is not supported "
                             f"(expected <= {FORMAT_VERSION})")
    except Exception as exc:
        f.close()
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: corrupt result file ({type(exc).__name__}: {exc})") from None
    return f


def _group_arrays(f: h5py.File, name: str) -> dict[str, np.ndarray]:
    group = f.get(name)
    return {} if group is None else {k: group[k][()] for k in group.keys()}


def _read(path: str | os.PathLike, images: bool) -> dict[str, Any]:
    """The parts of a result file: ``shape`` (of ``mean``), params, history and metadata, plus the image
    arrays if ``images``. A damaged file gives InputError."""
    with open_result(path) as f:
        try:
            out: dict[str, Any] = {"shape": f["mean"].shape}
            if images:
                out.update({name: f[name][()] if name in f else None for name in IMAGES})
            out["params"] = _group_arrays(f, "params")
            out["history"] = _group_arrays(f, "history")
            out["metadata"] = {k: plain_value(v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{path}: corrupt result file ({type(exc).__name__}: {exc})") from None
    return out


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Load a result file: keys mean, variance, input (arrays), shape, params, history (dicts of arrays) and
    metadata (dict of all root attributes, as builtins). A damaged file gives InputError."""
    return _read(path, images=True)


def read_result_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`read_result` gives without the images (memory bounded by the parameters, not the volume)."""
    return _read(path, images=False)
