"""The ``export`` subcommand: a result HDF5 file (``/mean``, ``/variance``, optional ``/input``) to TIFF,
OME-TIFF and PNG.

Files, in ``--out`` (default ``<result dir>/<stem>_export/``), ``<stem>`` being the result file's stem; which
ones is chosen by ``--format``, a comma-separated list of ``tiff``, ``png``, ``ome-tiff`` (``both``, the
default, is ``tiff,png``):

* ``tiff``: ``<stem>_mean.tif``, ``<stem>_variance.tif`` — float32: exactly the HDF5 values; uint16: the
  linear percentile stretch (``--low``/``--high``; the gamma is for display and not applied). When the result
  knows its pixel size (the ``element_size_um`` attribute of ``/mean``) the TIFF is calibrated for Fiji, see
  :func:`tiff_calibration`;
* ``png``: ``<stem>_mean.png``, ``<stem>_variance.png`` — 8-bit stretch with gamma, coloured with ``--cmap``;
* ``ome-tiff``: ``<stem>_mean.ome.tif``, ``<stem>_variance.ome.tif`` and ``<stem>_input.ome.tif`` (if
  ``/input`` is stored) — one OME-TIFF per image holding *all* selected sections as pages (axes ZYX, or YX for
  a 2-D result), values as for ``tiff``, with the physical pixel size in µm, see :func:`ome_metadata`;
* ``<stem>_variance_twotone.png`` — with ``--mask`` or ``--threshold``: the paper's Fig. 1 colouring;
* ``<stem>_panel.png`` — with ``--panel``: noisy input | mean | variance (no noisy tile if ``/input`` is absent).

Volumes (Z, Y, X) give one file of each kind, except the OME-TIFFs, per selected section, with the suffix
``_z<index>`` before the extension (zero-padded to at least 3 digits, e.g. ``<stem>_mean_z003.tif``); those
TIFFs too are one page per file. A ``--mask`` is an image (TIFF, or anything Pillow reads; nonzero = inside)
of the section shape, applied to every section, or of the volume shape (a TIFF stack, read one page per
section where it is stored so); ``--threshold`` puts the pixels whose *mean* exceeds the value inside. Nothing
is written if any output exists, unless ``--overwrite``.

Memory is bounded by about one section, not the volume: the images are read band by band (one row of HDF5
chunks, or about :data:`BAND_PIXELS` pixels of whole rows for an unchunked dataset) and TIFFs are written
band by band as TIFF strips, so a TIFF of a huge 2-D section needs about one band. A PNG or a panel is built
whole in memory (Pillow encodes whole images) but painted band by band. The stretch limits of each image
(input, mean, variance) are shared by the sections of one export — one grey scale — and computed in a first
pass from a sample, see :func:`sample_pixels`: exact percentiles when the selected sections have at most
:data:`SAMPLE_PIXELS` pixels, an estimate from a bounded, deterministic sample otherwise. The second pass
writes the files; each file re-reads the bands it needs (more decompression, bounded memory).

Writing is all or nothing: every file is first written (and fsynced) as ``<name>.tmp-<pid>`` beside its final
name, and only when all of them are complete are they renamed into place. A failure before that — an
unreadable (corrupt) dataset, a full disk (ENOSPC), an I/O error (EIO), any exception — removes the temporary
files this export created (and the output directory if this export created it), so no final name holds a
partial file and files of an earlier export stay as they were. Unreadable results and failed writes are
one-line errors with exit code 2 (:class:`~hpc_zsem.errors.InputError`, :class:`~hpc_zsem.errors.OutputError`);
other exceptions are crashes (traceback, exit code 1).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import tifffile
from PIL import Image

from hpc_zsem import enhance
from hpc_zsem.errors import ConfigError, InputError, OutputError
from hpc_zsem.io.stores import open_result_images

KINDS = ("input", "mean", "variance")
TITLES = {"input": "noisy input", "mean": "mean (denoised)", "variance": "variance"}
FORMATS = ("tiff", "png", "ome-tiff")

SAMPLE_PIXELS = 1 << 18
"""At most this many pixels per image estimate the stretch limits (1 MiB of float32): with n = 2**18 the
standard error of the rank of the 0.5 % percentile is sqrt(p (1 - p) / n) ≈ 0.014 percentage points for
independent pixels (more for pixels correlated within a block)."""
SAMPLE_BLOCKS = 256
"""At most this many chunk-aligned blocks are read per image to draw the sample (spread over all sections)."""
SAMPLE_SEED = 0
"""Seed of the sampling: the same file and options give the same limits."""
BAND_PIXELS = 1 << 16
"""Pixels per band (whole rows) of an unchunked dataset; a chunked one is read one row of chunks at a time."""
BIGTIFF_BYTES = 2**32 - 2**25
"""Image data above this size need BigTIFF (tifffile's own threshold for ``imwrite``)."""
UM = "µm"


def _formats(text: str) -> frozenset[str]:
    """The ``--format`` value: a set of :data:`FORMATS` from a comma-separated list ("both" = tiff, png)."""
    chosen: set[str] = set()
    for item in text.split(","):
        item = item.strip()
        if item not in FORMATS + ("both",):
            raise argparse.ArgumentTypeError(f"{item!r}: expected a comma-separated list of "
                                             f"{', '.join(FORMATS)} or both")
        chosen.update(("tiff", "png") if item == "both" else (item,))
    return frozenset(chosen)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on ``subparsers``; its ``func`` default is :func:`main`."""
    p = subparsers.add_parser("export", help="write TIFF/PNG/OME-TIFF images of a result file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="result HDF5 file written by `hpc-zsem run`")
    p.add_argument("--out", help="output directory (default: <result dir>/<stem>_export/)")
    p.add_argument("--format", type=_formats, default="both",
                   help="comma-separated: tiff (per section), png (per section), ome-tiff (one multi-page file "
                        "per image, with the pixel size); both = tiff,png (default: both)")
    p.add_argument("--tiff-dtype", choices=("float32", "uint16"), default="float32",
                   help="float32: exact values; uint16: linear percentile stretch (default: float32)")
    p.add_argument("--low", type=float, default=0.5, help="percentile mapped to black (default: 0.5)")
    p.add_argument("--high", type=float, default=99.5, help="percentile mapped to white (default: 99.5)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="display gamma, x**(1/gamma): >1 brightens mid-tones (default: 1.0)")
    p.add_argument("--cmap", choices=enhance.COLORMAPS, default="gray", help="colour map of the PNGs")
    p.add_argument("--sections", default="all", help="volumes: comma-separated section indices or 'all'")
    region = p.add_mutually_exclusive_group()
    region.add_argument("--mask", help="mask image for the two-tone variance PNG (nonzero = inside, blue)")
    region.add_argument("--threshold", type=float,
                        help="two-tone variance PNG with the pixels whose mean exceeds VALUE inside (blue)")
    p.add_argument("--panel", action="store_true", help="also write the panel noisy | mean | variance")
    p.add_argument("--overwrite", action="store_true", help="replace existing export files")
    p.set_defaults(func=main)
    return p


def _parse_sections(spec: str, depth: int | None, path: Path) -> list[int | None]:
    """Sorted unique section indices from ``spec`` ('all' or '0,2,5'); ``[None]`` for a 2-D result."""
    if depth is None:
        if spec != "all":
            raise InputError(f"{path}: --sections {spec} given, but the result is a 2-D image")
        return [None]
    if spec == "all":
        return list(range(depth))
    try:
        indices = sorted({int(item) for item in spec.split(",")})
    except ValueError:
        raise InputError(f"{path}: --sections must be 'all' or comma-separated integers, got {spec!r}") from None
    bad = [z for z in indices if not 0 <= z < depth]
    if bad:
        raise InputError(f"{path}: section {bad[0]} out of range (the volume has sections 0..{depth - 1})")
    return list(indices)


#: an open result whose ``[name]`` is an image: an h5py.File, or io.zarr_store.ZarrResultImages for OME-Zarr
ResultImages = Any
#: one image of it: ``shape``, ``ndim``, ``chunks``, ``name``, ``attrs`` and slicing (h5py.Dataset or zarr level 0)
ImageArray = Any


def _check_result(f: ResultImages, path: Path) -> tuple[int, ...]:
    """Check the image shapes of an open result file; return the image shape (Y, X) or (Z, Y, X)."""
    shape = f["mean"].shape
    for name in ("variance", "input"):
        if name in f and f[name].shape != shape:
            raise InputError(f"{path}: /{name} has shape {f[name].shape}, /mean has {shape}")
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: /mean must be 2-D (Y, X) or 3-D (Z, Y, X), got shape {shape}")
    return shape


def _um(value: float) -> float:
    """A length in µm at float32 precision (that of ``element_size_um`` as :mod:`hpc_zsem.io.volumes` stores
    it), as the float of its shortest decimal form: 0.03, not 0.029999999329447746."""
    return float(np.format_float_positional(np.float32(value), trim="-"))


def _element_size(dataset: ImageArray) -> tuple[float, ...] | None:
    """The ``element_size_um`` attribute of ``dataset`` (µm per axis, Z first) if it holds one finite positive
    number per axis; None if it is absent or malformed (the export is then uncalibrated)."""
    try:
        values = np.ravel(dataset.attrs.get("element_size_um", []))
    except (OSError, TypeError, ValueError):
        return None
    if values.dtype.kind not in "fiu" or len(values) != dataset.ndim:
        return None
    if not np.all(np.isfinite(values) & (values > 0)):
        return None
    return tuple(_um(v) for v in values)


def _block_shape(dataset: ImageArray) -> tuple[int, int]:
    """(rows, columns) of one read block: a chunk's (Y, X) for a chunked dataset, so every read decompresses
    whole chunks once; whole rows of about :data:`BAND_PIXELS` pixels for an unchunked one."""
    if dataset.chunks is not None:
        return tuple(dataset.chunks[-2:])
    width = dataset.shape[-1]
    return max(1, BAND_PIXELS // max(width, 1)), width


class Result:
    """An open result file: its shape, selected sections and pixel size, and its images read as float32
    blocks (a band of rows of one section) on demand."""

    def __init__(self, f: ResultImages, path: Path, spec: str):
        self.path = path
        self.shape = _check_result(f, path)
        self.volume = len(self.shape) == 3
        self.sections = _parse_sections(spec, self.shape[0] if self.volume else None, path)
        self.datasets = {kind: f[kind] for kind in KINDS if kind in f}
        self.height, self.width = self.shape[-2:]
        self.band_rows = _block_shape(self.datasets["mean"])[0]
        self.bands = [slice(y, min(y + self.band_rows, self.height)) for y in range(0, self.height, self.band_rows)]
        self.pixel_size = _element_size(self.datasets["mean"])

    def read(self, kind: str, z: int | None, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Rows ``rows`` and columns ``cols`` of section ``z`` (None: the 2-D image) of image ``kind`` as
        float32; InputError naming the file and the dataset if HDF5 cannot read them (e.g. a corrupt chunk)."""
        dataset = self.datasets[kind]
        try:
            return np.asarray(dataset[(rows, cols) if z is None else (z, rows, cols)], dtype=np.float32)
        except (OSError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())
            raise InputError(f"{self.path}: dataset {dataset.name} cannot be read ({reason}); "
                             "the file is corrupt") from None


def sample_pixels(result: Result, kind: str) -> np.ndarray:
    """The finite pixels of image ``kind`` over the selected sections, or a bounded sample of them (float32).

    If the selected sections hold at most :data:`SAMPLE_PIXELS` pixels, all of them (the percentiles are then
    exact). Otherwise up to :data:`SAMPLE_BLOCKS` chunk-aligned blocks (see :func:`_block_shape`) are drawn at
    random without replacement from all blocks of all selected sections and read in file order, and from each
    block ``SAMPLE_PIXELS / blocks`` pixels (fewer from a partial edge block, in proportion to its size; the
    whole block if it is not larger) are drawn at random with replacement. The generator is seeded with
    :data:`SAMPLE_SEED`, so the sample — and the grey scale — is deterministic. Memory: the sample plus one
    block.
    """
    block_rows, block_cols = _block_shape(result.datasets[kind])
    grid = (len(result.sections), -(-result.height // block_rows), -(-result.width // block_cols))
    total = len(result.sections) * result.height * result.width
    rng = np.random.default_rng(SAMPLE_SEED)
    picks: range | np.ndarray
    if total <= SAMPLE_PIXELS:
        picks, per_block = range(math.prod(grid)), None
    else:
        count = min(math.prod(grid), SAMPLE_BLOCKS)
        picks, per_block = np.sort(rng.choice(math.prod(grid), size=count, replace=False)), SAMPLE_PIXELS // count
    sample = np.empty(min(total, SAMPLE_PIXELS), dtype=np.float32)
    filled = 0
    for index in picks:
        s, by, bx = (int(i) for i in np.unravel_index(index, grid))
        block = result.read(kind, result.sections[s], slice(by * block_rows, (by + 1) * block_rows),
                            slice(bx * block_cols, (bx + 1) * block_cols)).ravel()
        quota = block.size if per_block is None else -(-per_block * block.size // (block_rows * block_cols))
        if quota < block.size:
            block = block[rng.integers(0, block.size, quota)]
        block = block[np.isfinite(block)]
        sample[filled:filled + block.size] = block
        filled += block.size
    return sample[:filled]


@contextmanager
def _reading_mask(path: Path) -> Iterator[None]:
    """Turn a failure to read the mask image ``path`` into a one-line InputError."""
    if not path.is_file():
        raise InputError(f"{path}: no such mask file")
    try:
        yield
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the mask image ({exc})") from None


def _is_tiff(path: Path) -> bool:
    """Whether the mask ``path`` is read with tifffile (by its extension) rather than Pillow."""
    return path.suffix.lower() in (".tif", ".tiff")


def _mask_layout(path: Path) -> tuple[tuple[int, ...], bool]:
    """The shape of the mask image ``path``, read without its pixels — (Y, X), or (Z, Y, X) for a TIFF stack —
    and whether it is a TIFF stack stored one page per section (then read page by page)."""
    with _reading_mask(path):
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return tuple(series.shape), len(series.shape) == 3 and len(series.pages) == series.shape[0]
        with Image.open(path) as img:
            return (img.height, img.width), False


def _read_mask_image(path: Path, page: int | None = None) -> np.ndarray:
    """A mask image (or page ``page`` of a TIFF stack) as a boolean array (nonzero = inside): TIFF via
    tifffile, other formats via Pillow."""
    with _reading_mask(path):
        if _is_tiff(path):
            return tifffile.imread(path, series=0, key=page) != 0
        with Image.open(path) as img:
            return np.asarray(img.convert("L")) != 0


def _mask_reader(args: argparse.Namespace, result: Result) -> Callable[[int | None], np.ndarray] | None:
    """The per-section mask of the two-tone PNG — a function of the section giving a (Y, X) bool array — from
    ``--mask`` or ``--threshold``, or None if neither is given. A mask of the section shape is read once; one
    of the volume shape page by page (at once if it is not stored one page per section); a threshold is
    applied to the mean band by band."""
    if args.threshold is not None:
        def above(z: int | None) -> np.ndarray:
            mask = np.empty((result.height, result.width), dtype=bool)
            for rows in result.bands:
                mask[rows] = enhance.threshold_mask(result.read("mean", z, rows), args.threshold)
            return mask
        return above
    if args.mask is None:
        return None
    path = Path(args.mask)
    shape, paged = _mask_layout(path)
    if shape == result.shape[-2:]:
        mask = _read_mask_image(path)
        return lambda z: mask
    if shape == result.shape:
        return functools.partial(_read_mask_image, path) if paged else _read_mask_image(path).__getitem__
    raise InputError(f"{path}: mask shape {shape} does not match the result's image shape {result.shape}")


def tiff_calibration(pixel_size: tuple[float, ...] | None, bigtiff: bool) -> dict:
    """``tifffile.imwrite`` options that record the pixel size (µm; (…, Y, X)) in a plain TIFF; {} if unknown.

    Fiji's own TIFF reader (File › Open, drag and drop) takes the pixel width and height from the XResolution
    and YResolution tags (pixels per unit) and the unit from an ImageJ description (``unit=um``); with the
    TIFF ResolutionUnit CENTIMETER alone it shows "cm" (e.g. 5e-07 cm for 5 nm). So the TIFF is written in
    ImageJ format (``imagej=True``, resolution in pixels per µm, ``metadata={'unit': 'um'}``; tifffile's
    documented way to write a calibrated ImageJ image) and opens calibrated in µm. ImageJ files cannot be
    BigTIFF, so a TIFF above 4 GB (:data:`BIGTIFF_BYTES`) gets the standard TIFF tags instead — resolution in
    pixels per cm, ResolutionUnit CENTIMETER — which Bio-Formats (Fiji's reader for BigTIFF) converts to µm.
    """
    if pixel_size is None:
        return {}
    dy, dx = pixel_size[-2:]
    if bigtiff:
        return {"resolution": (1e4 / dx, 1e4 / dy), "resolutionunit": "CENTIMETER"}
    return {"imagej": True, "resolution": (1.0 / dx, 1.0 / dy), "metadata": {"unit": "um"}}


def ome_metadata(result: Result, sections: list[int | None], name: str) -> dict:
    """The OME metadata of the OME-TIFF ``name`` of ``sections`` (tifffile's ``metadata`` for ``ome=True``).

    The image name ``name``, axes "ZYX" (a volume; one page per selected section) or "YX"; with a known pixel
    size, PhysicalSizeX/Y in µm and, for a volume, every plane's PositionZ (section index × Z size, µm) and
    PhysicalSizeZ, the distance between consecutive planes — only if the selected sections are evenly spaced
    (e.g. all of them, or every other one), as OME has one PhysicalSizeZ per image.
    """
    metadata: dict = {"Name": name, "axes": "ZYX" if result.volume else "YX"}
    if result.pixel_size is None:
        return metadata
    for axis, size in zip("YX", result.pixel_size[-2:]):
        metadata.update({f"PhysicalSize{axis}": size, f"PhysicalSize{axis}Unit": UM})
    if result.volume:
        planes = [z for z in sections if z is not None]   # all of them: a volume's sections are indices
        dz = result.pixel_size[0]
        steps = set(np.diff(planes).tolist()) or {1}
        if len(steps) == 1:
            metadata.update({"PhysicalSizeZ": _um(dz * steps.pop()), "PhysicalSizeZUnit": UM})
        metadata["Plane"] = {"PositionZ": [_um(z * dz) for z in planes],
                             "PositionZUnit": [UM] * len(planes)}
    return metadata


@dataclass
class Export:
    """What the file writers share: the open result, the options, the shared stretch limits, the mask."""

    result: Result
    args: argparse.Namespace
    limits: dict[str, tuple[float, float]]
    mask: Callable[[int | None], np.ndarray] | None

    def display(self, kind: str, z: int | None, rows: slice) -> np.ndarray:
        """Rows ``rows`` of section ``z`` of image ``kind`` stretched to [0, 1] with the display gamma."""
        band = self.result.read(kind, z, rows)
        return enhance.stretch(band, *self.limits[kind], gamma=self.args.gamma, out=band)

    def paint(self, kind: str, z: int | None, out: np.ndarray | None = None) -> np.ndarray:
        """Section ``z`` of image ``kind`` stretched and coloured with ``--cmap`` into ``out`` (a new (Y, X, 3)
        uint8 array if None), band by band; returns ``out``."""
        if out is None:
            out = np.empty((self.result.height, self.result.width, 3), dtype=np.uint8)
        for rows in self.result.bands:
            enhance.apply_colormap(self.display(kind, z, rows), self.args.cmap, out=out[rows])
        return out

    def strips(self, kind: str, sections: list[int | None], dtype: np.dtype) -> Iterator[bytes]:
        """The TIFF strips of image ``kind``: every band of every section in ``sections`` as the bytes of
        ``dtype`` — float32: the stored values; uint16: the linear stretch (no gamma)."""
        for z in sections:
            for rows in self.result.bands:
                band = self.result.read(kind, z, rows)
                if dtype == np.uint16:
                    band = enhance.to_uint16(enhance.stretch(band, *self.limits[kind], out=band))
                yield band.tobytes()


Writer = Callable[[Export, list[int | None], BinaryIO], None]


def _save_png(fh: BinaryIO, image: np.ndarray) -> None:
    """Write an 8-bit grey or RGB PNG to the open binary file ``fh``."""
    Image.fromarray(image).save(fh, format="PNG")


def _tiff_writer(kind: str, ome: bool) -> Writer:
    """Writer of the TIFF of image ``kind`` — a plain one-page TIFF of one section, or (``ome``) an OME-TIFF of
    all given sections — streamed strip by strip (one strip per band) through ``tifffile.imwrite``."""
    def write(export: Export, sections: list[int | None], fh: BinaryIO) -> None:
        result = export.result
        dtype = np.dtype(export.args.tiff_dtype)
        shape = ((len(sections),) if ome and result.volume else ()) + (result.height, result.width)
        bigtiff = math.prod(shape) * dtype.itemsize > BIGTIFF_BYTES
        options: dict[str, Any]
        if ome:
            options = {"ome": True, "metadata": ome_metadata(result, sections, f"{result.path.stem}_{kind}")}
        else:
            options = {"ome": False, **tiff_calibration(result.pixel_size, bigtiff)}
        tifffile.imwrite(fh, export.strips(kind, sections, dtype), shape=shape, dtype=dtype, bigtiff=bigtiff,
                         photometric="minisblack", rowsperstrip=result.band_rows, **options)
    return write


def _png_writer(kind: str) -> Writer:
    """Writer of the colour-mapped 8-bit PNG of image ``kind`` of one section."""
    def write(export: Export, sections: list[int | None], fh: BinaryIO) -> None:
        (z,) = sections
        _save_png(fh, export.paint(kind, z))
    return write


def _write_twotone(export: Export, sections: list[int | None], fh: BinaryIO) -> None:
    """Write the two-tone variance PNG of one section."""
    (z,) = sections
    if export.mask is None:
        raise ValueError("a two-tone variance PNG needs --mask or --threshold")
    mask = export.mask(z)
    image = np.empty(mask.shape + (3,), dtype=np.uint8)
    for rows in export.result.bands:
        enhance.two_tone(export.display("variance", z, rows), mask[rows], out=image[rows])
    _save_png(fh, image)


def _write_panel(export: Export, sections: list[int | None], fh: BinaryIO) -> None:
    """Write the panel of one section: noisy input (if stored) | mean | variance, painted in place."""
    (z,) = sections
    height, width = export.result.height, export.result.width
    kinds = list(export.result.datasets)
    canvas, origins = enhance.panel_canvas([(TITLES[kind], (height, width)) for kind in kinds])
    for kind, (y, x) in zip(kinds, origins):
        export.paint(kind, z, canvas[y:y + height, x:x + width])
    _save_png(fh, canvas)


@dataclass(frozen=True)
class Product:
    """One kind of export file: its name suffix (``mean.tif``), its writer, the images whose stretch limits
    the writer needs, and whether there is one file per section (else one holding all selected sections)."""

    suffix: str
    write: Writer
    stretched: tuple[str, ...]
    per_section: bool = True


def _products(args: argparse.Namespace, kinds: tuple[str, ...]) -> list[Product]:
    """The files to write, in order, for the options ``args`` and the images ``kinds`` the result holds."""
    def tiffs(names: tuple[str, ...], ome: bool) -> list[Product]:
        extension = "ome.tif" if ome else "tif"
        return [Product(f"{kind}.{extension}", _tiff_writer(kind, ome),
                        (kind,) if args.tiff_dtype == "uint16" else (), per_section=not ome) for kind in names]

    products = tiffs(("mean", "variance"), ome=False) if "tiff" in args.format else []
    if "png" in args.format:
        products += [Product(f"{kind}.png", _png_writer(kind), (kind,)) for kind in ("mean", "variance")]
    if args.mask is not None or args.threshold is not None:
        products.append(Product("variance_twotone.png", _write_twotone, ("variance",)))
    if args.panel:
        products.append(Product("panel.png", _write_panel, kinds))
    if "ome-tiff" in args.format:
        products += tiffs(kinds, ome=True)
    return products


def output_path(out_dir: Path, stem: str, product: str, section: int | None, depth: int) -> Path:
    """``<out_dir>/<stem>_<product>`` with ``_z<section>`` (≥ 3 digits) before the extension for volumes."""
    name, ext = product.rsplit(".", 1)
    suffix = "" if section is None else f"_z{section:0{max(3, len(str(depth - 1)))}d}"
    return out_dir / f"{stem}_{name}{suffix}.{ext}"


def _prepare_out_dir(out_dir: Path, paths: list[Path], overwrite: bool) -> bool:
    """Refuse existing outputs (unless ``overwrite``), then create ``out_dir``; True if it was created."""
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: already exists ({len(existing)} export file(s) would be replaced); "
                              "use --overwrite")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    return created


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind a failed write: ``exc`` itself or the first one in the chain a traceback would show
    (``__cause__``, else an unsuppressed ``__context__``; writers may wrap the OSError of a full disk in
    another exception); None if there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _reason(error: OSError) -> str:
    """An OSError as text for a one-line message: "No space left on device", with the file it names if any."""
    text = error.strerror or " ".join(str(error).split())
    return f"{text}: {error.filename}" if error.filename else text


def _free_space(directory: Path) -> str:
    """The free space on ``directory``'s file system, e.g. "0.0 MB free", or "" if it cannot be determined."""
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:.1f} MB free"
    except OSError:
        return ""


class _Staging:
    """The files of one export, written under temporary names and renamed into place together.

    :meth:`write` writes one file as ``<name>.tmp-<pid>`` beside its final name (created exclusively, fsynced);
    :meth:`commit` renames all of them over their final names. Leaving the ``with`` block by an exception
    removes the temporary files this staging created and, if ``created_dir`` is given, that directory if it is
    then empty.
    """

    def __init__(self, created_dir: Path | None):
        self._created_dir = created_dir
        self._temps: dict[Path, Path] = {}

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for tmp in self._temps.values():
                tmp.unlink(missing_ok=True)
            if self._created_dir is not None:
                try:
                    self._created_dir.rmdir()
                except OSError:
                    pass

    def write(self, path: Path, writer: Callable[[BinaryIO], None]) -> None:
        """Write the temporary file of ``path`` with ``writer(fh)``; OutputError if the write fails with an
        OSError (a full disk, an I/O error, a missing permission), any other exception (e.g. the InputError of
        an unreadable chunk) passes through."""
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "xb") as fh:
                self._temps[path] = tmp
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as exc:
            error = _os_error(exc)
            if error is None:
                raise
            reason = "; ".join(filter(None, [_reason(error), _free_space(path.parent)]))
            raise OutputError(f"{path}: cannot write ({reason}); no export file was written or replaced") from None

    def commit(self) -> list[Path]:
        """Rename every temporary file over its final name, in the order written; return the final paths."""
        done: list[Path] = []
        total = len(self._temps)
        for path, tmp in list(self._temps.items()):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise OutputError(f"{path}: cannot move the written file into place ({_reason(exc)}); "
                                  f"{len(done)} of {total} export files were replaced") from None
            del self._temps[path]
            done.append(path)
        return done


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse (ConfigError) a non-finite ``--low``/``--high``/``--gamma``/``--threshold``, percentiles outside
    [0, 100] or not ``--low`` < ``--high``, and a gamma that is not positive."""
    for option, value in (("--low", args.low), ("--high", args.high), ("--gamma", args.gamma),
                          ("--threshold", args.threshold)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{option} {value}: expected a finite number")
    for option, value in (("--low", args.low), ("--high", args.high)):
        if not 0.0 <= value <= 100.0:
            raise ConfigError(f"{option} {value}: expected a percentile in [0, 100]")
    if args.low >= args.high:
        raise ConfigError(f"--low {args.low} must be below --high {args.high}")
    if not args.gamma > 0.0:
        raise ConfigError(f"--gamma {args.gamma}: expected a positive number")


def _files(products: list[Product], result: Result, out_dir: Path) -> list[tuple[Path, Product, list[int | None]]]:
    """Every file to write, in order — (path, product, the sections it holds) — the per-section files section
    by section, then the files holding all selected sections."""
    stem, depth = result.path.stem, result.shape[0] if result.volume else 1
    files = [(output_path(out_dir, stem, p.suffix, z, depth), p, [z])
             for z in result.sections for p in products if p.per_section]
    return files + [(output_path(out_dir, stem, p.suffix, None, depth), p, result.sections)
                    for p in products if not p.per_section]


def main(args: argparse.Namespace) -> int:
    """Run ``hpc-zsem export``: write the requested files (all or none), print their paths, return 0.

    First pass: the shared stretch limits of the images that need them, from :func:`sample_pixels`; second
    pass: every file, band by band, under a temporary name; then all are renamed into place.
    """
    _check_numbers(args)
    path = Path(args.result)
    with open_result_images(path) as f:
        result = Result(f, path, args.sections)
        mask = _mask_reader(args, result)
        products = _products(args, tuple(result.datasets))
        stretched = [kind for kind in result.datasets if any(kind in p.stretched for p in products)]
        limits = {kind: enhance.stretch_limits(sample_pixels(result, kind), args.low, args.high)
                  for kind in stretched}
        export = Export(result, args, limits, mask)
        out_dir = Path(args.out) if args.out else path.with_name(f"{path.stem}_export")
        files = _files(products, result, out_dir)
        created = _prepare_out_dir(out_dir, [file for file, _, _ in files], args.overwrite)
        with _Staging(out_dir if created else None) as staging:
            for file, product, sections in files:
                staging.write(file, functools.partial(product.write, export, sections))
            written = staging.commit()
    for file in written:
        print(file)
    return 0
