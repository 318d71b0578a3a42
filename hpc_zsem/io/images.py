"""Reading input images (TIFF, via tifffile) into 2-D float64 arrays, with user-facing checks.

A file's first image series is used. Its planes are *sections*: a 2-D image has none to choose from; a
stack (Z×Y×X, multi-page, or any leading axes, flattened in file order) needs ``section``. Every problem
is an :class:`InputError` whose one-line message names the file.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from hpc_zsem.errors import InputError

DEMO_NOISY = "builtin:demo"
BUILTIN_IMAGES = {"builtin:demo": "demo_noisy.tif", "builtin:demo_poisson": "demo_poisson.tif"}
_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs")
ZARR_SUFFIX = ".zarr"
_CHUNK = 1 << 20
# What tifffile and the codecs raise on unreadable, corrupt or truncated files.
READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, struct.error, zlib.error, EOFError,
                KeyError, IndexError, RuntimeError, TypeError, ZeroDivisionError, OverflowError, MemoryError)


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


@dataclass(frozen=True)
class TiffLayout:
    """Shape facts of a file's first series: planes of (Y, X) pixels of ``dtype``."""

    sections: int          # number of planes (1 for a 2-D image)
    plane: tuple[int, int]  # (Y, X)
    dtype: np.dtype
    pages: int             # pages of the series (== sections when each plane is one page)


def tiff_layout(series: "tifffile.TiffPageSeries", name: str) -> TiffLayout:
    """Check a series is a grayscale image or stack of a supported dtype and describe it."""
    shape, axes = tuple(series.shape), series.axes
    if "S" in axes:
        samples = shape[axes.index("S")]
        kind = {3: "RGB", 4: "RGBA"}.get(samples, f"{samples} samples per pixel")
        raise InputError(f"{name}: colour image ({kind}); convert to grayscale first, "
                         "e.g. in Fiji: Image > Type > 8-bit")
    check_dtype(series.dtype, name)
    if len(shape) < 2:
        raise InputError(f"{name}: expected a 2-D image, got shape {shape}")
    return TiffLayout(sections=int(np.prod(shape[:-2], dtype=np.int64)), plane=(shape[-2], shape[-1]),
                   dtype=series.dtype, pages=len(series.pages))


def check_dtype(dtype: np.dtype, name: str) -> None:
    """Refuse pixel types other than (u)int8..64 and float16..64."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise InputError(f"{name}: pixel type {dtype} is not supported; "
                         "expected (unsigned) integers or floating point")


def _check_section(layout: TiffLayout, section: int | None, name: str) -> None:
    """A stack needs a section in range; a single image accepts only section 0 or none."""
    n = layout.sections
    if section is None:
        if n > 1:
            raise InputError(f"{name}: is a stack of {n} sections; set input.section (0..{n - 1})")
        return
    if not 0 <= section < n:
        what = f"a stack of {n} sections (0..{n - 1})" if n > 1 else "a single 2-D image (section 0)"
        raise InputError(f"{name}: section {section} out of range; the file is {what}")


def open_tiff(path: Path, name: str) -> tifffile.TiffFile:
    """Open a TIFF, turning a missing or unparsable file into an InputError."""
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    try:
        return tifffile.TiffFile(path)
    except READ_ERRORS as exc:
        raise InputError(f"{name}: cannot read as TIFF ({exc})") from None


def image_shape(path: str | os.PathLike, section: int | None = None) -> tuple[int, int]:
    """(Y, X) of the selected plane, from the TIFF headers only (no pixel data is read)."""
    path = resolve_input_path(path)
    name = os.fspath(path)
    with open_tiff(path, name) as tif:
        layout = _series_layout(tif, name)
        _check_section(layout, section, name)
        return layout.plane


def _series_layout(tif: tifffile.TiffFile, name: str) -> TiffLayout:
    try:
        series = tif.series[0]
    except READ_ERRORS as exc:
        raise InputError(f"{name}: cannot read as TIFF ({exc})") from None
    return tiff_layout(series, name)


def _read_plane(tif: tifffile.TiffFile, layout: TiffLayout, section: int | None, name: str) -> np.ndarray:
    """Pixel data of one plane; reads only that page when each plane is a page."""
    index = section or 0
    try:
        if layout.sections == 1:
            data = tif.asarray(series=0)
        elif layout.pages == layout.sections:
            data = tif.asarray(series=0, key=index)
        else:  # several planes in one page (e.g. a volumetric tile): read all, pick one
            data = tif.asarray(series=0).reshape(-1, *layout.plane)[index]
        return np.asarray(data).reshape(layout.plane)
    except READ_ERRORS as exc:
        raise InputError(f"{name}: cannot read pixel data; the file may be truncated or corrupt ({exc})") from None


def _crop(image: np.ndarray, crop: tuple[int, int, int, int] | None, name: str) -> np.ndarray:
    """Apply [y0, y1, x0, x1], refusing a box that does not lie inside the image."""
    if crop is None:
        return image
    y0, y1, x0, x1 = crop
    Y, X = image.shape
    if not (0 <= y0 < y1 <= Y and 0 <= x0 < x1 <= X):
        raise InputError(f"{name}: crop {list(crop)} lies outside the image of shape (Y, X) = ({Y}, {X})")
    return image[y0:y1, x0:x1]


def check_finite(image: np.ndarray, name: str) -> None:
    """Refuse NaN or Inf pixels, with their count."""
    if image.dtype.kind != "f":
        return
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise InputError(f"{name}: {bad} pixels are NaN or Inf; expected finite values")


def read_image(path: str | os.PathLike, *, section: int | None = None,
               crop: tuple[int, int, int, int] | None = None, downsample: int = 1) -> np.ndarray:
    """Read one plane of a TIFF, crop it ([y0, y1, x0, x1]), keep every ``downsample``-th pixel per axis,
    and return it as a 2-D float64 array. Raises :class:`InputError` naming the file on any problem."""
    path = resolve_input_path(path)
    name = os.fspath(path)
    with open_tiff(path, name) as tif:
        layout = _series_layout(tif, name)
        _check_section(layout, section, name)
        plane = _read_plane(tif, layout, section, name)
    image = _crop(plane, crop, name)[::downsample, ::downsample]
    check_finite(image, name)
    return image.astype(np.float64)


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


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a grayscale image or stack as a zlib-compressed TIFF."""
    tifffile.imwrite(path, np.asarray(array), compression="zlib")
