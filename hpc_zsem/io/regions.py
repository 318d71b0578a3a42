"""Lazy region reading of large images: whole-slide mosaics, stacks and volumes.

:func:`open_source` returns an :class:`ImageSource` whose :meth:`~ImageSource.read` returns one rectangular
region of one section as float64, decoding only the TIFF tiles or strips that intersect it (or slicing an
HDF5 dataset, which h5py reads chunk by chunk). No call ever loads the whole image unless the file stores it
in a form that cannot be read in parts (see :class:`TiffSource`), and the counters in
:attr:`ImageSource.stats` say exactly what was decoded, so tests can assert it.

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

_CACHE_BYTES = 32 << 20   # decoded TIFF segments kept per source (LRU) for reads that touch the same tiles
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


class TiffSource(ImageSource):
    """First series of a TIFF (full-resolution level), read tile by tile or strip by strip.

    Planes map to pages (one plane per page, or ``imagedepth`` planes per volumetric page). A series stored
    as one contiguous uncompressed block with fewer pages than planes (e.g. ImageJ stacks over 4 GB) is
    memory-mapped. Anything else (rare) falls back to reading the series once, counted in ``stats``.
    """

    def __init__(self, path: Path, name: str, cache_bytes: int = _CACHE_BYTES):
        self.name = name
        self._tif = open_tiff(path, name)
        try:
            try:
                series = self._tif.series[0]
                series = series.levels[0] if getattr(series, "levels", None) else series
                layout = tiff_layout(series, name)
                self._pages = list(series.pages)
            except InputError:
                raise
            except READ_ERRORS as exc:
                raise InputError(f"{name}: cannot read as TIFF ({exc})") from None
            self.dtype = np.dtype(layout.dtype)
            self.file_shape = (layout.sections, *layout.plane)
            self._series = series
            self._memmap: np.memmap | None = None
            self._whole: np.ndarray | None = None
            first = self._pages[0] if self._pages else None
            depth = _keyframe(first, name).imagedepth if first is not None else 1
            if layout.pages == layout.sections and all(p is not None for p in self._pages):
                self._mode, self._depth = "pages", 1
            elif depth > 1 and layout.pages * depth == layout.sections:
                self._mode, self._depth = "pages", depth
            elif series.dataoffset is not None:
                self._mode, self._depth = "memmap", 1
            else:
                self._mode, self._depth = "whole", 1
        except BaseException:
            self._tif.close()
            raise
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray | None, tuple[int, ...]]] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        super().__init__()

    def close(self) -> None:
        self._tif.close()
        self._memmap = None
        self._whole = None
        self._cache.clear()

    # ---------------------------------------------------------------- reading
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
        if self._mode == "whole":
            if self._whole is None:
                self._whole = np.asarray(self._tif.asarray(series=0)).reshape(self.file_shape)
                self.stats["pixels_decoded"] += self._whole.size
                self.stats["segments_decoded"] += len(self._pages)
            return np.array(self._whole[section, y0:y1, x0:x1])
        page_index, d = divmod(section, self._depth)
        page = self._pages[page_index]
        if page is None:
            raise InputError(f"{self.name}: corrupt TIFF: page {page_index} of the image series is missing")
        kf = _keyframe(page, self.name)
        if kf.is_tiled:
            th, tw = kf.tilelength, kf.tilewidth
            td = kf.tiledepth if kf.imagedepth > 1 else 1
            ny, nx = -(-kf.imagelength // th), -(-kf.imagewidth // tw)
            dchunk = d // td
            wanted = [((dchunk * ny) + iy) * nx + ix
                      for iy in range(y0 // th, (y1 - 1) // th + 1)
                      for ix in range(x0 // tw, (x1 - 1) // tw + 1)]
        else:
            rps = min(kf.rowsperstrip, kf.imagelength)
            if rps <= 0:
                raise InputError(f"{self.name}: corrupt TIFF: RowsPerStrip is {kf.rowsperstrip}")
            per_plane = -(-kf.imagelength // rps)
            wanted = [d * per_plane + i for i in range(y0 // rps, (y1 - 1) // rps + 1)]
        out = np.zeros((y1 - y0, x1 - x0), dtype=self.dtype)
        for index in wanted:
            seg, (_, sd, sy, sx, _) = self._segment(page_index, page, index)
            if seg is None:
                continue   # empty segment: fill value 0
            seg = seg[d - sd] if seg.shape[0] > 1 else seg[0]
            seg = seg[..., 0]
            ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
            xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
            if ya < yb and xa < xb:
                out[ya - y0:yb - y0, xa - x0:xb - x0] = seg[ya - sy:yb - sy, xa - sx:xb - sx]
        return out

    def _segment(self, page_index: int, page, index: int) -> tuple[np.ndarray | None, tuple[int, ...]]:
        """Decoded segment ``index`` of a page, with its position (sample, depth, y, x, sample); LRU-cached."""
        key = (page_index, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if offset and count:
                fh = self._tif.filehandle
                fh.seek(offset)
                data = fh.read(count)
                if len(data) != count:
                    raise InputError(f"{self.name}: cannot read pixel data; the file is truncated")
                self.stats["bytes_read"] += count
            kf = page.keyframe
            kwargs: dict[str, Any] = {"_fullsize": kf.is_tiled}
            if kf.compression in {6, 7, 34892, 33007}:   # JPEG variants need the tables
                kwargs["jpegtables"] = page.jpegtables
                kwargs["jpegheader"] = kf.jpegheader
            seg, position, _ = kf.decode(data, index, **kwargs)
            self.stats["segments_decoded"] += 1
            if seg is not None:
                seg = np.asarray(seg).reshape(seg.shape[-4:])   # (depth, length, width, samples)
                self.stats["pixels_decoded"] += seg.size
            result = (seg, tuple(int(v) for v in position))
            nbytes = 0 if seg is None else seg.nbytes
            if nbytes <= self._cache_bytes:
                self._cache[key] = result
                self._cached += nbytes
                while self._cached > self._cache_bytes:
                    _, (old, _) = self._cache.popitem(last=False)
                    self._cached -= 0 if old is None else old.nbytes
            return result


def _keyframe(page: tifffile.TiffPage | tifffile.TiffFrame, name: str) -> tifffile.TiffPage:
    """The keyframe (the page holding the layout tags) of a page of the series; InputError if it is missing."""
    kf = page.keyframe
    if kf is None:
        raise InputError(f"{name}: corrupt TIFF: a page of the image series has no keyframe")
    return kf


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


class ZarrSource(ImageSource):
    """A zarr array of 2 or more dimensions (leading dimensions are sections): an OME-Zarr image's level 0
    or a named array; zarr reads only the chunks a slice touches."""

    def __init__(self, path: Path, array: str | None, name: str):
        self.name = name
        _, self.array_path, arr, size = _resolve_zarr(name)
        if arr.ndim < 2:
            raise InputError(f"{name}: expected a 2-D image or a stack, got shape {arr.shape}")
        try:
            dtype = np.dtype(arr.dtype)
        except TypeError:
            raise InputError(f"{name}: pixel type {arr.dtype} is not supported") from None
        check_dtype(dtype, name)
        self._arr = arr
        self.dtype = dtype
        self.file_shape = (int(np.prod(arr.shape[:-2], dtype=np.int64)), int(arr.shape[-2]), int(arr.shape[-1]))
        self.element_size_um = size if size is None or len(size) <= 3 else None
        super().__init__()

    def _read_full_res(self, section: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lead = np.unravel_index(section, self._arr.shape[:-2]) if self._arr.ndim > 2 else ()
        try:
            out = np.asarray(self._arr[tuple(int(i) for i in lead) + (slice(y0, y1), slice(x0, x1))])
        except READ_ERRORS:
            raise
        except Exception as exc:   # noqa: BLE001 - codec and store errors of zarr
            raise InputError(f"{self.name}: cannot read pixel data ({type(exc).__name__}: {exc})") from None
        self.stats["bytes_read"] += out.nbytes
        self.stats["pixels_decoded"] += out.size
        self.stats["segments_decoded"] += 1
        return out


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
                tags = tif.pages[0].tags
                if per_unit and "XResolution" in tags and "YResolution" in tags:
                    ry, rx = tags["YResolution"].value, tags["XResolution"].value
                    sy, sx = per_unit * ry[1] / ry[0], per_unit * rx[1] / rx[0]
                    spacing = meta.get("spacing")
                    return (float(spacing) * per_unit, sy, sx) if spacing else (sy, sx)
    except Exception:   # noqa: BLE001 - metadata is optional
        return None
    return None
