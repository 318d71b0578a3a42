"""The ``export`` subcommand: a result HDF5 file (``/mean``, ``/variance``, optional ``/input``) to TIFF and PNG.

Files, in ``--out`` (default ``<result dir>/<stem>_export/``), ``<stem>`` being the result file's stem:

* ``<stem>_mean.tif``, ``<stem>_variance.tif`` — float32: exactly the HDF5 values; uint16: the linear
  percentile stretch (``--low``/``--high``; the gamma is for display and not applied);
* ``<stem>_mean.png``, ``<stem>_variance.png`` — 8-bit stretch with gamma, coloured with ``--cmap``;
* ``<stem>_variance_twotone.png`` — with ``--mask`` or ``--threshold``: the paper's Fig. 1 colouring;
* ``<stem>_panel.png`` — with ``--panel``: noisy input | mean | variance (no noisy tile if ``/input`` is absent).

Volumes (Z, Y, X) give one file of each kind per selected section, with the suffix ``_z<index>`` before the
extension (zero-padded to at least 3 digits, e.g. ``<stem>_mean_z003.tif``); TIFFs too are one page per file.
The stretch limits of each image (input, mean, variance) are the percentiles over all selected sections
together, so the sections of one export share one grey scale. A ``--mask`` is an image (TIFF, or anything
Pillow reads; nonzero = inside) of the section shape, applied to every section, or of the volume shape;
``--threshold`` puts the pixels whose *mean* exceeds the value inside. Nothing is written if any output
exists, unless ``--overwrite``.

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
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import h5py
import numpy as np
import tifffile
from PIL import Image

from hpc_zsem import enhance
from hpc_zsem.errors import ConfigError, InputError, OutputError
from hpc_zsem.io.results import open_result

TITLES = {"input": "noisy input", "mean": "mean (denoised)", "variance": "variance"}


@dataclass
class Section:
    """What the renderers need for one section: raw images, shared stretch limits, options, the mask."""

    raw: dict[str, np.ndarray]
    limits: dict[str, tuple[float, float]]
    args: argparse.Namespace
    mask: np.ndarray | None

    def display(self, kind: str) -> np.ndarray:
        """The image ``kind`` stretched to [0, 1] with the display gamma."""
        return enhance.stretch(self.raw[kind], *self.limits[kind], gamma=self.args.gamma)

    def coloured(self, kind: str) -> np.ndarray:
        """The image ``kind`` stretched and coloured with ``--cmap``: (Y, X, 3) uint8."""
        return enhance.apply_colormap(self.display(kind), self.args.cmap)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on ``subparsers``; its ``func`` default is :func:`main`."""
    p = subparsers.add_parser("export", help="write TIFF/PNG images of a result file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="result HDF5 file written by `hpc-zsem run`")
    p.add_argument("--out", help="output directory (default: <result dir>/<stem>_export/)")
    p.add_argument("--format", choices=("tiff", "png", "both"), default="both",
                   help="which mean/variance files to write (default: both)")
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
    return indices


def _read_stack(dataset: h5py.Dataset, sections: list[int | None], path: Path) -> np.ndarray:
    """The selected sections of ``dataset`` as a float32 (S, Y, X) stack; InputError naming the file and the
    dataset if HDF5 cannot read them (e.g. a corrupt chunk that does not decompress)."""
    try:
        if sections == [None]:
            return np.asarray(dataset[()], dtype=np.float32)[None]
        return np.stack([np.asarray(dataset[z], dtype=np.float32) for z in sections])
    except (OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"{path}: dataset {dataset.name} cannot be read ({reason}); the file is corrupt") from None


def _check_result(f: h5py.File, path: Path) -> tuple[int, ...]:
    """Check the image shapes of an open result file; return the image shape (Y, X) or (Z, Y, X)."""
    shape = f["mean"].shape
    for name in ("variance", "input"):
        if name in f and f[name].shape != shape:
            raise InputError(f"{path}: /{name} has shape {f[name].shape}, /mean has {shape}")
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: /mean must be 2-D (Y, X) or 3-D (Z, Y, X), got shape {shape}")
    return shape


def read_result(path: Path, spec: str) -> tuple[dict[str, np.ndarray], list[int | None], tuple[int, ...]]:
    """Read the selected sections of a result file.

    Returns the stacks (S, Y, X) by name ("mean", "variance" and, if stored, "input"), the section indices
    (``[None]`` for a 2-D result) and the full image shape.
    """
    with open_result(path) as f:
        shape = _check_result(f, path)
        sections = _parse_sections(spec, shape[0] if len(shape) == 3 else None, path)
        stacks = {name: _read_stack(f[name], sections, path) for name in ("input", "mean", "variance") if name in f}
    return stacks, sections, shape


def _read_mask_image(path: Path) -> np.ndarray:
    """A mask image as a boolean array (nonzero = inside): TIFF via tifffile, other formats via Pillow."""
    if not path.is_file():
        raise InputError(f"{path}: no such mask file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path) != 0
        with Image.open(path) as img:
            return np.asarray(img.convert("L")) != 0
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the mask image ({exc})") from None


def _masks(args: argparse.Namespace, stacks: dict[str, np.ndarray], sections: list[int | None],
           shape: tuple[int, ...]) -> list[np.ndarray] | None:
    """Per-section masks from ``--mask`` or ``--threshold``, or None if neither is given."""
    if args.threshold is not None:
        return list(enhance.threshold_mask(stacks["mean"], args.threshold))
    if args.mask is None:
        return None
    path = Path(args.mask)
    mask = _read_mask_image(path)
    if mask.shape == shape[-2:]:
        return [mask] * len(sections)
    if mask.shape == shape:
        return [mask[z] for z in sections]
    raise InputError(f"{path}: mask shape {mask.shape} does not match the result's image shape {shape}")


def _write_tiff(fh: BinaryIO, data: np.ndarray) -> None:
    """Write one TIFF page to the open binary file ``fh``."""
    tifffile.imwrite(fh, data)


def _write_png(fh: BinaryIO, data: np.ndarray) -> None:
    """Write an 8-bit grey or RGB PNG to the open binary file ``fh``."""
    Image.fromarray(data).save(fh, format="PNG")


def _tiff(kind: str) -> Callable[[Section], np.ndarray]:
    """Renderer of the TIFF of ``kind``: exact float32 values or the linear uint16 stretch."""
    def render(s: Section) -> np.ndarray:
        if s.args.tiff_dtype == "float32":
            return s.raw[kind]
        return enhance.to_uint16(enhance.stretch(s.raw[kind], *s.limits[kind]))
    return render


def _png(kind: str) -> Callable[[Section], np.ndarray]:
    """Renderer of the colour-mapped 8-bit PNG of ``kind``."""
    return lambda s: s.coloured(kind)


def _twotone(s: Section) -> np.ndarray:
    """Renderer of the two-tone variance PNG."""
    return enhance.two_tone(s.display("variance"), s.mask)


def _panel(s: Section) -> np.ndarray:
    """Renderer of the panel: noisy input (if stored) | mean | variance."""
    return enhance.panel([(TITLES[kind], s.coloured(kind)) for kind in ("input", "mean", "variance")
                          if kind in s.raw])


def _products(args: argparse.Namespace) -> dict[str, tuple[Callable[[Section], np.ndarray], Callable]]:
    """The files to write per section: name suffix (``mean.tif``) → (renderer, writer)."""
    products = {}
    if args.format in ("tiff", "both"):
        products.update({f"{kind}.tif": (_tiff(kind), _write_tiff) for kind in ("mean", "variance")})
    if args.format in ("png", "both"):
        products.update({f"{kind}.png": (_png(kind), _write_png) for kind in ("mean", "variance")})
    if args.mask is not None or args.threshold is not None:
        products["variance_twotone.png"] = (_twotone, _write_png)
    if args.panel:
        products["panel.png"] = (_panel, _write_png)
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


def _os_error(exc: BaseException) -> OSError | None:
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

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for tmp in self._temps.values():
                tmp.unlink(missing_ok=True)
            if self._created_dir is not None:
                try:
                    self._created_dir.rmdir()
                except OSError:
                    pass
        return False

    def write(self, path: Path, writer: Callable[[BinaryIO, np.ndarray], None], data: np.ndarray) -> None:
        """Write ``data`` with ``writer`` to the temporary file of ``path``; OutputError if the write fails with
        an OSError (a full disk, an I/O error, a missing permission), any other exception passes through."""
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "xb") as fh:
                self._temps[path] = tmp
                writer(fh, data)
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
        done, total = [], len(self._temps)
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


def main(args: argparse.Namespace) -> int:
    """Run ``hpc-zsem export``: write the requested files (all or none), print their paths, return 0."""
    _check_numbers(args)
    result = Path(args.result)
    stacks, sections, shape = read_result(result, args.sections)
    masks = _masks(args, stacks, sections, shape)
    limits = {kind: enhance.stretch_limits(stack, args.low, args.high) for kind, stack in stacks.items()}
    out_dir = Path(args.out) if args.out else result.with_name(f"{result.stem}_export")
    products = _products(args)
    depth = shape[0] if len(shape) == 3 else 1
    paths = [[output_path(out_dir, result.stem, product, z, depth) for product in products] for z in sections]
    created = _prepare_out_dir(out_dir, [path for row in paths for path in row], args.overwrite)
    with _Staging(out_dir if created else None) as staging:
        for i, row in enumerate(paths):
            section = Section({kind: stack[i] for kind, stack in stacks.items()}, limits, args,
                              None if masks is None else masks[i])
            for (render, write), path in zip(products.values(), row):
                staging.write(path, write, render(section))
        written = staging.commit()
    for path in written:
        print(path)
    return 0
