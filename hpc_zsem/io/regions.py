"""Lazy region reading of large images: whole-slide mosaics, stacks and volumes.

:func:`open_source` returns an :class:`ImageSource` whose :meth:`~ImageSource.read` returns one rectangular
region of one section as float64, decoding only the TIFF tiles or strips (read through tifffile's public
``aszarr`` zarr interface) or zarr chunks that intersect it, or slicing an HDF5 dataset, which h5py reads
chunk by chunk. No call ever loads the whole image unless the file stores it in a form that cannot be read in
parts (a compressed plane stored as one strip), and the counters in :attr:`ImageSource.stats` say what was
decoded (``segments_decoded``: chunks, i.e. TIFF strips or tiles, fetched from zarr; ``pixels_decoded`` and
``bytes_read``: their decoded size; for memory-mapped or HDF5 data the pixels sliced), so tests can assert it.

Supported inputs
    * 2-D TIFF and BigTIFF, tiled or striped, any tifffile codec;
    * multi-page stacks and 3-D TIFFs (Z, Y, X; any leading axes are flattened into sections in file order),
      including volumetric (tiledepth > 1) pages;
    * pyramidal OME-TIFF: the full-resolution level of the first series;
    * an HDF5 dataset: ``file.h5:/path/to/dataset`` (``file.h5`` alone when the file holds exactly one
      dataset of two or more dimensions);
    * a zarr array (zarr v2 or v3): ``store.zarr`` — an OME-Zarr (NGFF 0.4/0.5) image: level 0 of its first
      multiscale image (bioformats2raw layouts: series 0), pixel size from the axes' units and the level's
      ``coordinateTransformations`` — or a store holding exactly one array of two or more dimensions; or
      ``store.zarr:/path/to/array``. zarr reads only the chunks a region touches.

The source class is chosen by the path's form (:data:`SOURCE_FORMS`: splitter → class; TIFF otherwise).

Shapes: ``shape`` is (Y, X) for a single plane and (Z, Y, X) for a stack; ``read(z, ...)`` takes the section
index (0 for a single plane). ``section=`` selects one plane of a stack (the source is then 2-D); ``crop``
([y0, y1, x0, x1] in file pixels) and ``downsample`` (every k-th pixel per axis) define the view, which equals
slicing the plane as ``plane[y0:y1, x0:x1][::k, ::k]``. :meth:`ImageSource.read_section` reads a whole
section of the view (small images, tests).

This is the package's only reader of input images; :mod:`hpc_zsem.io.images` resolves input paths
(``builtin:``, the path forms above) and computes input checksums.

Every problem is an :class:`~hpc_zsem.errors.InputError` whose one-line message names the file.
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from hpc_zsem.errors import InputError
from hpc_zsem.io.images import resolve_input_path, split_h5_path, split_zarr_path

_CACHE_BYTES = 32 << 20   # decoded chunks (TIFF strips/tiles, zarr chunks) kept per source (LRU), see ChunkCache
# What tifffile and the codecs raise on unreadable, corrupt or truncated files.
READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, struct.error, zlib.error, EOFError,
               KeyError, IndexError, RuntimeError, TypeError, ZeroDivisionError, OverflowError, MemoryError)


def check_dtype(dtype: np.dtype, name: str) -> None:
    """Refuse pixel types other than (u)int8..64 and float16..64."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise InputError(f"{name}: pixel type {dtype} is not supported; "
                         "expected (unsigned) integers or floating point")


def check_finite(image: np.ndarray, name: str) -> None:
    """Refuse NaN or Inf pixels, with their count."""
    if image.dtype.kind != "f":
        return
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise InputError(f"{name}: {bad} pixels are NaN or Inf; expected finite values")


class ImageSource:
    """A lazily read grayscale image or stack. Subclasses implement :meth:`_read_full_res`."""

    name: str
    dtype: np.dtype
    #: (Z, Y, X) of the file's full-resolution data (Z = 1 for a single plane)
    file_shape: tuple[int, int, int]

    def __init__(self) -> None:
        self.stats = {"reads": 0, "segments_decoded": 0, "bytes_read": 0, "pixels_decoded": 0}
        self._sections: np.ndarray = np.arange(self.file_shape[0])
        self._crop = (0, self.file_shape[1], 0, self.file_shape[2])
        self._step = 1
        self._squeeze = self.file_shape[0] == 1

    # ---------------------------------------------------------------- view set-up (used by open_source)
    def _set_view(self, section: int | None, crop, downsample: int) -> None:
        Z, Y, X = self.file_shape
        if section is not None:
            if not 0 <= section < Z:
                what = f"a stack of {Z} sections (0..{Z - 1})" if Z > 1 else "a single 2-D image (section 0)"
                raise InputError(f"{self.name}: section {section} out of range; the file is {what}")
            self._sections = np.array([section])
            self._squeeze = True
        if crop is not None:
            y0, y1, x0, x1 = (int(v) for v in crop)
            if not (0 <= y0 < y1 <= Y and 0 <= x0 < x1 <= X):
                raise InputError(f"{self.name}: crop {list(crop)} lies outside the image of shape "
                                 f"(Y, X) = ({Y}, {X})")
            self._crop = (y0, y1, x0, x1)
        if int(downsample) < 1:
            raise InputError(f"{self.name}: downsample {downsample} must be >= 1")
        self._step = int(downsample)

    # ---------------------------------------------------------------- public API
    @property
    def plane_shape(self) -> tuple[int, int]:
        """(Y, X) of one section after crop and downsample."""
        y0, y1, x0, x1 = self._crop
        k = self._step
        return (-(-(y1 - y0) // k), -(-(x1 - x0) // k))

    @property
    def n_sections(self) -> int:
        return int(self._sections.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """(Y, X) for a single plane, (Z, Y, X) for a stack."""
        return self.plane_shape if self._squeeze else (self.n_sections, *self.plane_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, z: int | None, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of section ``z`` (0 or None for a single plane) as a float64 array.

        Coordinates are those of the view (after crop and downsample). Raises InputError on unreadable data
        or NaN/Inf pixels in the region."""
        z = 0 if z is None else int(z)
        Y, X = self.plane_shape
        if not (0 <= z < self.n_sections and 0 <= y0 < y1 <= Y and 0 <= x0 < x1 <= X):
            raise ValueError(f"{self.name}: region z={z} [{y0}:{y1}, {x0}:{x1}] lies outside the view "
                             f"of shape {self.shape}")
        k = self._step
        cy, cx = self._crop[0], self._crop[2]
        fy0, fy1 = cy + y0 * k, cy + (y1 - 1) * k + 1
        fx0, fx1 = cx + x0 * k, cx + (x1 - 1) * k + 1
        self.stats["reads"] += 1
        try:
            region = self._read_full_res(int(self._sections[z]), fy0, fy1, fx0, fx1)
        except InputError:
            raise
        except READ_ERRORS as exc:
            raise InputError(f"{self.name}: cannot read pixel data; the file may be truncated or corrupt "
                             f"({exc})") from None
        if k > 1:
            region = region[::k, ::k]
        check_finite(region, self.name)
        return np.asarray(region, dtype=np.float64)

    def read_section(self, z: int | None = None) -> np.ndarray:
        """A whole section (for small images and tests only)."""
        return self.read(z, 0, self.plane_shape[0], 0, self.plane_shape[1])

    def reset_stats(self) -> None:
        for key in self.stats:
            self.stats[key] = 0

    def close(self) -> None:
        pass

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    # ---------------------------------------------------------------- subclass hook
    def _read_full_res(self, section: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels [y0:y1, x0:x1] of file section ``section`` (file coordinates)."""
        raise NotImplementedError


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


def open_tiff(path: Path, name: str) -> tifffile.TiffFile:
    """Open a TIFF, turning a missing or unparsable file into an InputError."""
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    try:
        return tifffile.TiffFile(path)
    except READ_ERRORS as exc:
        raise InputError(f"{name}: cannot read as TIFF ({exc})") from None


class ChunkCache:
    """Region reads of a zarr array through an LRU cache of its decoded chunks (shared by the TIFF and zarr
    sources).

    A region fetches from zarr only the chunks it touches that are not cached, chunk-aligned (so zarr decodes
    exactly those chunks), in one zarr call when they form a rectangle; a region whose chunks are all cached
    costs no zarr call. This keeps the many small reads of training patches (``tiles.read_patches``) fast:
    zarr caches no decoded chunks and each zarr call has a fixed overhead of about 0.4 ms. Chunks larger than
    the cache are not cached; such a region is sliced from zarr directly. ``stats`` counts what zarr decoded:
    ``segments_decoded`` chunks (for a TIFF: strips or tiles), ``pixels_decoded`` their elements and
    ``bytes_read`` their decoded bytes."""

    def __init__(self, arr: Any, stats: dict[str, int], cache_bytes: int = _CACHE_BYTES):
        self.arr = arr
        self.stats = stats
        self.shape = tuple(int(n) for n in arr.shape)
        self.chunks = tuple(max(1, int(c)) for c in arr.chunks)
        self.dtype = np.dtype(arr.dtype)
        self._itemsize = self.dtype.itemsize
        self._uncached = int(np.prod(self.chunks, dtype=np.int64)) * self._itemsize > cache_bytes
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.RLock()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0

    def _box(self, key: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(key, self.chunks, self.shape))

    def _count(self, n_chunks: int, n_pixels: int) -> None:
        self.stats["segments_decoded"] += n_chunks
        self.stats["pixels_decoded"] += n_pixels
        self.stats["bytes_read"] += n_pixels * self._itemsize

    def read(self, lead: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Elements ``arr[lead + (y0:y1, x0:x1)]`` (``lead`` indexes the leading dimensions) as a new array."""
        cy, cx = self.chunks[-2], self.chunks[-1]
        iy0, iy1, ix0, ix1 = y0 // cy, (y1 - 1) // cy, x0 // cx, (x1 - 1) // cx
        clead = tuple(i // c for i, c in zip(lead, self.chunks[:-2]))
        within = tuple(i - c * j for i, c, j in zip(lead, self.chunks[:-2], clead))
        if self._uncached:
            out = np.asarray(self.arr[tuple(lead) + (slice(y0, y1), slice(x0, x1))])
            for iy in range(iy0, iy1 + 1):
                for ix in range(ix0, ix1 + 1):
                    self._count(1, int(np.prod([b.stop - b.start for b in self._box(clead + (iy, ix))])))
            return out
        with self._lock:
            if iy0 == iy1 and ix0 == ix1:   # the common case of small reads: one cached chunk
                block = self._cache.get(clead + (iy0, ix0))
                if block is not None:
                    self._cache.move_to_end(clead + (iy0, ix0))
                    by, bx = iy0 * cy, ix0 * cx
                    return block[within + (slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx))].copy()
            # allocated first: a region too large for memory (a corrupt header's size) fails here at once
            out = np.empty((y1 - y0, x1 - x0), dtype=self.dtype)
            keys = [clead + (iy, ix) for iy in range(iy0, iy1 + 1) for ix in range(ix0, ix1 + 1)]
            blocks = {}
            for k in keys:
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                    blocks[k] = hit
            missing = [k for k in keys if k not in blocks]
            if missing:
                blocks.update(self._fetch(clead, missing))
            for (*_, iy, ix), block in blocks.items():
                by, bx = iy * cy, ix * cx
                ya, yb, xa, xb = max(y0, by), min(y1, by + cy), max(x0, bx), min(x1, bx + cx)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = block[within + (slice(ya - by, yb - by),
                                                                        slice(xa - bx, xb - bx))]
            return out

    def _fetch(self, clead: tuple[int, ...], missing: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        """Decode the ``missing`` chunks (keys of one leading chunk): one zarr call for their bounding box when
        they fill it, else one call per chunk; cache them."""
        iys = [k[-2] for k in missing]
        ixs = [k[-1] for k in missing]
        ry, rx = range(min(iys), max(iys) + 1), range(min(ixs), max(ixs) + 1)
        found: dict[tuple[int, ...], np.ndarray] = {}
        if len(ry) * len(rx) == len(missing):
            first, last = self._box(clead + (ry[0], rx[0])), self._box(clead + (ry[-1], rx[-1]))
            box = tuple(slice(a.start, b.stop) for a, b in zip(first, last))
            whole = np.asarray(self.arr[box])
            for k in missing:
                inner = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(self._box(k), box))
                found[k] = whole[inner]
        else:
            for k in missing:
                found[k] = np.asarray(self.arr[self._box(k)])
        # cache copies (a view would pin the whole fetched box) of as many of the last chunks as the cache holds,
        # so a large region costs at most the cache's size in copies
        budget = self._cache_bytes
        keep = []
        for k in reversed(missing):
            budget -= found[k].nbytes
            if budget < 0:
                break
            keep.append(k)
        for k in missing:
            self._count(1, found[k].size)
        for k in reversed(keep):
            found[k] = block = np.ascontiguousarray(found[k])
            self._cache[k] = block
            self._cached += block.nbytes
        while self._cached > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return found


class ChunkedSource(ImageSource):
    """A source whose pixels are a zarr array of 2 or more dimensions (leading dimensions are sections, in C
    order), read through a :class:`ChunkCache`. Subclasses open the array and call :meth:`_init_chunks`."""

    _arr: Any
    _chunks: ChunkCache

    def _init_chunks(self, arr: Any, cache_bytes: int = _CACHE_BYTES) -> None:
        super().__init__()
        self._arr = arr
        self._lead_shape = tuple(int(n) for n in arr.shape[:-2])
        self._chunks = ChunkCache(arr, self.stats, cache_bytes)

    def close(self) -> None:
        self._chunks.clear()

    def _read_full_res(self, section: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lead = tuple(int(i) for i in np.unravel_index(section, self._lead_shape)) if self._lead_shape else ()
        try:
            return self._chunks.read(lead, y0, y1, x0, x1)
        except InputError:
            raise
        except Exception as exc:   # noqa: BLE001 - codec, store, tifffile and zarr errors on corrupt data
            raise InputError(f"{self.name}: cannot read pixel data; the file may be truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from None


class TiffSource(ChunkedSource):
    """First series of a TIFF (full-resolution level), read through tifffile's public zarr interface
    (``series.aszarr()``, whose chunks are the file's strips or tiles, ``tiledepth`` planes deep for
    volumetric pages) and a :class:`ChunkCache`, so a region decodes only the strips or tiles it touches.

    A series stored as one contiguous uncompressed block (tifffile's ``series.dataoffset``: e.g. ImageJ stacks,
    also those over 4 GB with fewer pages than planes, and tifffile's default single-strip uncompressed pages,
    whose chunks would be whole planes) is memory-mapped instead: a region then reads only its own rows.
    """

    def __init__(self, path: Path, name: str, cache_bytes: int = _CACHE_BYTES):
        self.name = name
        self._tif = open_tiff(path, name)
        self._memmap: np.memmap | None = None
        try:
            try:
                series = self._tif.series[0]
                series = series.levels[0] if getattr(series, "levels", None) else series
                layout = tiff_layout(series, name)
            except InputError:
                raise
            except READ_ERRORS as exc:
                raise InputError(f"{name}: cannot read as TIFF ({exc})") from None
            self.dtype = np.dtype(layout.dtype)
            self.file_shape = (layout.sections, *layout.plane)
            self._series = series
            # contiguous uncompressed data (tifffile's series.dataoffset) is memory-mapped: its zarr chunks are whole
            # strips, often whole planes, that a small read would have to read completely
            self._mode = "memmap" if series.dataoffset is not None and self._tif.filehandle.is_file else "zarr"
            try:
                import zarr
            except ImportError as exc:   # an installation problem, not the file's
                raise ImportError(f"reading TIFF files needs zarr>=3 (tifffile's aszarr): {exc}") from exc
            try:
                arr = zarr.open_array(series.aszarr(level=0), mode="r")
                if int(np.prod(arr.shape, dtype=np.int64)) != int(np.prod(self.file_shape, dtype=np.int64)) \
                        or tuple(arr.shape[-2:]) != layout.plane:
                    raise InputError(f"{name}: corrupt TIFF: the image series has shape {tuple(arr.shape)}, its "
                                     f"pages {series.shape}")
            except InputError:
                raise
            except Exception as exc:   # noqa: BLE001 - tifffile and zarr raise many kinds on corrupt files
                raise InputError(f"{name}: cannot read as TIFF ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self._tif.close()
            raise
        self._init_chunks(arr, cache_bytes)

    def close(self) -> None:
        self._tif.close()
        self._memmap = None
        self._chunks.clear()

    def _read_full_res(self, section: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._mode == "memmap":
            if self._memmap is None:
                offset = self._series.dataoffset
                if offset is None:
                    raise InputError(f"{self.name}: the image series is not stored contiguously; cannot map it")
                self._memmap = np.memmap(self._tif.filehandle.path, dtype=self._series.dtype, mode="r",
                                         offset=offset, shape=self.file_shape)
            out = np.array(self._memmap[section, y0:y1, x0:x1])
            self.stats["bytes_read"] += out.nbytes
            self.stats["pixels_decoded"] += out.size
            return out
        return super()._read_full_res(section, y0, y1, x0, x1)


class H5Source(ImageSource):
    """An HDF5 dataset of 2 or more dimensions (leading dimensions are sections); h5py reads only the chunks
    a slice touches."""

    def __init__(self, path: Path, dataset: str | None, name: str):
        import h5py

        self.name = name
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path}: cannot read as HDF5 ({exc})") from None
        try:
            if dataset is None:
                found: list[str] = []
                self._file.visititems(lambda key, obj: found.append(key)
                                      if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 else None)
                if len(found) != 1:
                    listing = ", ".join("/" + f for f in found[:10]) or "none"
                    raise InputError(f"{name}: name the dataset as {path}:/path/to/dataset "
                                     f"(datasets of 2 or more dimensions: {listing})")
                dataset = found[0]
            obj = self._file.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                raise InputError(f"{name}: no dataset '{dataset}' in the file")
            if obj.ndim < 2:
                raise InputError(f"{name}: expected a 2-D image or a stack, got shape {obj.shape}")
            check_dtype(obj.dtype, name)
            self._ds = obj
            self.dtype = np.dtype(obj.dtype)
            self.file_shape = (int(np.prod(obj.shape[:-2], dtype=np.int64)), *obj.shape[-2:])
            self.element_size_um = _h5_element_size(obj)
        except BaseException:
            self._file.close()
            raise
        super().__init__()

    def close(self) -> None:
        self._file.close()

    def _read_full_res(self, section: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lead = np.unravel_index(section, self._ds.shape[:-2]) if self._ds.ndim > 2 else ()
        out = self._ds[tuple(int(i) for i in lead) + (slice(y0, y1), slice(x0, x1))]
        self.stats["bytes_read"] += out.nbytes
        self.stats["pixels_decoded"] += out.size
        self.stats["segments_decoded"] += 1
        return out


def _h5_element_size(ds) -> tuple[float, ...] | None:
    value = ds.attrs.get("element_size_um")
    if value is None:
        return None
    try:
        return tuple(float(v) for v in np.ravel(value))
    except (TypeError, ValueError):
        return None


_UM_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
                "angstrom": 1e-4, "picometer": 1e-6, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4,
                "meter": 1e6, "m": 1e6}


def _ngff(attrs: Any) -> dict:
    """The OME-NGFF metadata of a zarr group: under ``ome`` (0.5) or at the top level (0.4 and older)."""
    attrs = dict(attrs)
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else attrs


def _ngff_pixel_size(multiscale: dict, dataset: dict) -> tuple[float, ...] | None:
    """(Y, X) or (Z, Y, X) in µm of one multiscale dataset: its ``scale`` (times the multiscale's own, if
    any) per spatial axis in the axis' unit; None when the axes carry no length unit."""
    axes = multiscale.get("axes") or []
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    scale = [1.0] * len(names)
    for transforms in (dataset.get("coordinateTransformations") or [],
                       multiscale.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale":
                scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    out = {}
    for axis, name, value in zip(axes, names, scale):
        unit = axis.get("unit") if isinstance(axis, dict) else None
        if name in ("z", "y", "x") and unit in _UM_PER_UNIT:
            out[name] = value * _UM_PER_UNIT[unit]
    if "y" not in out or "x" not in out:
        return None
    return tuple(out[a] for a in "zyx" if a in out)


def _resolve_zarr(path: str | os.PathLike):
    """(store directory, array path in the store, opened read-only array, pixel size in µm or None) of a
    zarr input path (see the module docstring for the forms)."""
    import zarr
    from zarr.storage import LocalStore

    text = os.fspath(path)
    parts = split_zarr_path(text)
    if parts is None:
        raise InputError(f"{text}: not a zarr store path (expected store.zarr or store.zarr:/path/to/array)")
    store_path, inner = parts
    if not store_path.is_dir():
        raise InputError(f"{text}: no such zarr store (a directory)")
    store = LocalStore(store_path, read_only=True)
    inner = inner or ""
    try:
        node = zarr.open(store=store, mode="r", path=inner)
        size = None
        if isinstance(node, zarr.Group):
            meta = _ngff(node.attrs)
            if "multiscales" not in meta and "bioformats2raw.layout" in meta and "0" in node:
                inner = f"{inner}/0".strip("/")
                node = node["0"]
                meta = _ngff(node.attrs)
            if meta.get("multiscales"):
                multiscale = meta["multiscales"][0]
                dataset = multiscale["datasets"][0]
                inner = f"{inner}/{dataset['path']}".strip("/")
                size = _ngff_pixel_size(multiscale, dataset)
                node = zarr.open_array(store=store, mode="r", path=inner)
            else:
                found = [name for name, a in node.arrays() if a.ndim >= 2] if hasattr(node, "arrays") else []
                if len(found) != 1:
                    raise InputError(f"{text}: not an OME-Zarr image; name the array as {store_path}:/path/to/array "
                                     f"(arrays of 2 or more dimensions here: {', '.join(found[:10]) or 'none'})")
                inner = f"{inner}/{found[0]}".strip("/")
                node = zarr.open_array(store=store, mode="r", path=inner)
        elif "/" in inner:   # an array of an NGFF image named directly: its dataset's pixel size
            parent, _, leaf = inner.rpartition("/")
            meta = _ngff(zarr.open_group(store=store, mode="r", path=parent).attrs)
            for multiscale in meta.get("multiscales") or []:
                for dataset in multiscale.get("datasets", []):
                    if dataset.get("path") == leaf:
                        size = _ngff_pixel_size(multiscale, dataset)
    except InputError:
        raise
    except Exception as exc:   # noqa: BLE001 - zarr raises many kinds on missing or malformed stores
        raise InputError(f"{text}: cannot read as zarr ({type(exc).__name__}: {exc})") from None
    return store_path, inner, node, size


def zarr_array_path(path: str | os.PathLike) -> tuple[Path, str]:
    """(store directory, path of the array in it) that a zarr input path reads."""
    store_path, inner, _, _ = _resolve_zarr(path)
    return store_path, inner


class ZarrSource(ChunkedSource):
    """A zarr array of 2 or more dimensions (leading dimensions are sections): an OME-Zarr image's level 0
    or a named array; only the chunks a region touches are read (through a :class:`ChunkCache`)."""

    def __init__(self, path: Path, array: str | None, name: str, cache_bytes: int = _CACHE_BYTES):
        self.name = name
        _, self.array_path, arr, size = _resolve_zarr(name)
        if arr.ndim < 2:
            raise InputError(f"{name}: expected a 2-D image or a stack, got shape {arr.shape}")
        try:
            dtype = np.dtype(arr.dtype)
        except TypeError:
            raise InputError(f"{name}: pixel type {arr.dtype} is not supported") from None
        check_dtype(dtype, name)
        self.dtype = dtype
        self.file_shape = (int(np.prod(arr.shape[:-2], dtype=np.int64)), int(arr.shape[-2]), int(arr.shape[-1]))
        self.element_size_um = size if size is None or len(size) <= 3 else None
        self._init_chunks(arr, cache_bytes)


#: path form → source class: each splitter returns (container path, inner path) or None; TIFF otherwise. A
#: class is called as ``cls(container path, inner path, input path as given)``.
SOURCE_FORMS: list[tuple[Callable[[str], tuple[Path, str | None] | None],
                         Callable[[Path, str | None, str], ImageSource]]] = [
    (split_h5_path, H5Source),
    (split_zarr_path, ZarrSource),
]


def open_source(path: str | os.PathLike, section: int | None = None, *,
                crop: tuple[int, int, int, int] | None = None, downsample: int = 1) -> ImageSource:
    """Open an image lazily (TIFF family or ``file.h5:/dataset``); see the module docstring.

    ``section`` selects one plane of a stack (the result is then 2-D); ``crop`` = [y0, y1, x0, x1] in file
    pixels and ``downsample`` (keep every k-th pixel) define the view (``plane[y0:y1, x0:x1][::k, ::k]``).
    Close the source (or use it as a context manager) when done."""
    text = os.fspath(path)
    source: ImageSource | None = None
    for split, cls in SOURCE_FORMS:
        parts = split(text)
        if parts is not None:
            source = cls(parts[0], parts[1], text)
            break
    if source is None:
        resolved = resolve_input_path(text)
        source = TiffSource(resolved, os.fspath(resolved))
    try:
        source._set_view(section, crop, downsample)
        if any(n < 1 for n in source.plane_shape):
            raise InputError(f"{source.name}: empty image of shape {source.shape}")
    except BaseException:
        source.close()
        raise
    return source


#: OME length units → µm (the OME default unit is µm)
_OME_UNITS_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_pixel_size_um(ome_xml: str) -> tuple[float, ...] | None:
    """(Z, Y, X) or (Y, X) pixel size in µm from the ``PhysicalSize{Z,Y,X}`` (and ``…Unit``) attributes of the
    first ``Pixels`` element of an OME-XML document (parsed as XML, any namespace version); None if it has no
    Y and X size or an unknown unit."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = {}
    for axis in "ZYX":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is not None and unit in _OME_UNITS_UM:
            try:
                sizes[axis] = float(value) * _OME_UNITS_UM[unit]
            except ValueError:
                return None
    if "Y" not in sizes or "X" not in sizes:
        return None
    return tuple(sizes[a] for a in "ZYX" if a in sizes)


def pixel_size_um(path: str | os.PathLike) -> tuple[float, ...] | None:
    """Physical pixel size (Y, X) or (Z, Y, X) in µm from OME, ImageJ or resolution tags / HDF5
    ``element_size_um``, if the file says so; None otherwise. Best effort, never raises."""
    try:
        if any(split(os.fspath(path)) is not None for split, _ in SOURCE_FORMS):
            with open_source(path) as src:
                return getattr(src, "element_size_um", None)
        with tifffile.TiffFile(resolve_input_path(path)) as tif:
            if tif.is_ome and tif.ome_metadata:
                size = ome_pixel_size_um(tif.ome_metadata)
                if size is not None:
                    return size
            if tif.is_imagej:
                meta = tif.imagej_metadata or {}
                per_unit = {"micron": 1.0, "um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "nanometer": 1e-3,
                            "mm": 1e3}.get(str(meta.get("unit", "")))
                tags = tif.pages.first.tags
                if per_unit and "XResolution" in tags and "YResolution" in tags:
                    ry, rx = tags["YResolution"].value, tags["XResolution"].value
                    sy, sx = per_unit * ry[1] / ry[0], per_unit * rx[1] / rx[0]
                    spacing = meta.get("spacing")
                    return (float(spacing) * per_unit, sy, sx) if spacing else (sy, sx)
    except Exception:   # noqa: BLE001 - metadata is optional
        return None
    return None
