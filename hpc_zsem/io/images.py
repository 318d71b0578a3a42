"""Input paths and their identity: which file (or zarr store) an input path names, and its checksum.

An input path is ``builtin:demo`` / ``builtin:demo_poisson`` (the packaged demo images), ``file.h5:/dataset``,
``store.zarr`` or ``store.zarr:/path/to/array``, or a TIFF path. The pixels are read by
:func:`hpc_zsem.io.regions.open_source` (TIFF, HDF5 and zarr); this module only splits and resolves the paths
and hashes what they name (:func:`file_checksum`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEMO_NOISY = "builtin:demo"
BUILTIN_IMAGES = {"builtin:demo": "demo_noisy.tif", "builtin:demo_poisson": "demo_poisson.tif"}
_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs")
ZARR_SUFFIX = ".zarr"
_CHUNK = 1 << 20


def resolve_input_path(path: str | os.PathLike) -> Path:
    """``builtin:demo`` (Gaussian noise) and ``builtin:demo_poisson`` (shot noise) → the packaged demo images;
    any other path is returned as a Path, unresolved."""
    if os.fspath(path) in BUILTIN_IMAGES:
        return _DATA_DIR / BUILTIN_IMAGES[os.fspath(path)]
    return Path(path)


def split_h5_path(path: str) -> tuple[Path, str | None] | None:
    """``file.h5:/dataset`` → (Path('file.h5'), '/dataset'); ``file.h5`` → (Path, None); None if not HDF5."""
    text = os.fspath(path)
    lower = text.lower()
    for suffix in H5_SUFFIXES:
        at = lower.rfind(suffix + ":")
        if at > 0:
            end = at + len(suffix)
            return Path(text[:end]), text[end + 1:] or None
        if lower.endswith(suffix):
            return Path(text), None
    return None


def split_zarr_path(path: str) -> tuple[Path, str | None] | None:
    """``store.zarr:/group/array`` → (Path('store.zarr'), 'group/array'); ``store.zarr`` (or ``store.zarr/``)
    → (Path, None); None if the path does not name a zarr store."""
    text = os.fspath(path)
    lower = text.lower()
    at = lower.rfind(ZARR_SUFFIX + ":")
    if at > 0:
        end = at + len(ZARR_SUFFIX)
        return Path(text[:end]), text[end + 1:].strip("/") or None
    if lower.rstrip("/").endswith(ZARR_SUFFIX):
        return Path(text.rstrip("/")), None
    return None


def input_file(path: str | os.PathLike) -> Path:
    """The file (or, for zarr, the directory) on disk behind an input path: the packaged image for
    ``builtin:…``, ``file.h5`` for ``file.h5:/dataset``, ``store.zarr`` for ``store.zarr:/array``, the path
    itself otherwise (unresolved)."""
    text = os.fspath(path)
    container = split_h5_path(text) or split_zarr_path(text)
    return container[0] if container is not None else resolve_input_path(path)


def file_checksum(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of the bytes of the file behind an input path (:func:`input_file`), read in 1 MiB
    chunks. For a zarr input (a directory) it is :func:`zarr_checksum` of the array that is read."""
    if split_zarr_path(os.fspath(path)) is not None:
        return zarr_checksum(path)
    digest = hashlib.sha256()
    with open(input_file(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def zarr_checksum(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` identifying the zarr array an input path reads (level 0 of the first OME-Zarr image,
    or the named array): a hash over the array's path in the store and, in sorted order, every file of the
    array's directory (its metadata and chunks) as (relative path, size, bytes). It does not depend on the
    store's other arrays, file times or the order of the directory listing."""
    from hpc_zsem.io.regions import zarr_array_path

    store, array = zarr_array_path(path)
    root = store / array if array else store
    digest = hashlib.sha256()
    digest.update(b"zarr-array\0" + array.encode() + b"\0")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        digest.update(rel + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
