"""OME-Zarr (NGFF 0.5, zarr v3) results written by every rank directly, tile by tile, atomically.

Layout of ``out.zarr`` (a directory; ``output.path`` ending in ``.zarr`` selects it)::

    out.zarr/zarr.json              root group; attributes: format="hpc_zsem-result", format_version, axes,
                                    element_size_um and every metadata key (config, version, ranks, input …)
    out.zarr/mean/                  an NGFF 0.5 image: attributes {"ome": {"version": "0.5", "multiscales": …}}
    out.zarr/mean/0, 1, 2 …         float32 arrays: level 0 = the full image ((Y, X) or (Z, Y, X)), level k =
                                    the mean of 2×2 pixels of level k-1 in YX, until a plane fits one chunk
    out.zarr/variance/, input/      the same for the variance (and any extra array, e.g. the input)
    out.zarr/params/<name>          float64 arrays: the learned parameters
    out.zarr/history/<name>         1-D float64 arrays: per-epoch columns

Each image's axes are ``y, x`` or ``z, y, x`` (type "space", unit "micrometer" when the pixel size is known),
each level's ``coordinateTransformations`` a ``scale`` (µm per pixel of that level) and, for k ≥ 1, the
``translation`` of its pixel centres; ``ome_zarr`` / napari (``napari out.zarr/mean``) and neuroglancer
(``zarr3://…/out.zarr/mean``) open the images with their physical size. Chunks: (cy, cx) or (1, cy, cx),
codec zstd (zarr's default), fill value NaN.

Parallel writes: **every rank writes its own tiles' chunks directly**; nothing is gathered but the tile keys.
The chunk shape divides the tile size (:func:`chunks_for_tile`) and tile cores start on multiples of the tile
size (``hpc_zsem.tiles.plan_tiles``), so a chunk belongs to exactly one tile and two ranks never write one
chunk; :meth:`ZarrResultStore.write` refuses a core that is not chunk-aligned. Rank 0 creates the store (its
metadata) before any rank writes and is the only one that finishes it.

Same contract as :class:`hpc_zsem.io.volumes.VolumeWriter`: the store is built in ``<name>.tmp-<pid>`` (or,
with a ``resume_key``, the fixed ``<name>.partial``) beside the final path; :meth:`~ZarrResultStore.close`
(collective) checks that every pixel was written, builds the multiscale levels (split over the ranks by chunk),
fsyncs every file (each rank its own chunks), writes params/history/metadata and renames the directory into
place — an existing result of ours is renamed aside first and removed only after the new one is in place.
:meth:`~ZarrResultStore.suspend` (collective; a stop request) gathers the written tiles to rank 0, which
records them with ``clean = 1``; a later store with the same key continues, any other partial store of ours is
removed. Directories are removed only when every file in them is one this module writes (``zarr.json``, chunk
files under ``c/``, zarr's own ``*.<uuid>.partial`` temporaries); anything else is refused with a one-line
:class:`~hpc_zsem.errors.OutputError`, as is an existing path that is not an hpc_zsem result.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpc_zsem.errors import HpcZsemError, InputError, OutputError
from hpc_zsem.io.paths import is_hpc_zsem_file, refuse_foreign
from hpc_zsem.io.results import (FORMAT, FORMAT_VERSION, ResultContent, as_float32, check_output_directory,
                                 fsync_path)
from hpc_zsem.parallel import shard

if TYPE_CHECKING:
    import zarr

NGFF_VERSION = "0.5"
MAX_CHUNK = 256
MIN_CHUNK = 64
_METADATA_SLACK = 4 << 20       # bytes for zarr.json files, params and history written on close
_OWN_TEMP = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")   # zarr's LocalStore writes <name>.<uuid4 hex>.partial
_RESERVED = ("format", "format_version")
_STATE_KEYS = ("resume_key", "clean", "written_tiles", "hpc_zsem_partial")


# ---------------------------------------------------------------------------------------------------- helpers
def chunks_for_tile(tile: tuple[int, int] | None, plane: tuple[int, int]) -> tuple[int, int]:
    """Chunk (cy, cx) for tiles of ``tile`` pixels: per axis the tile size itself when it is at most 256,
    else the largest divisor of it in [64, 256], else the tile size; never more than the plane. Every tile
    core then covers whole chunks (the edge tiles the edge chunks)."""
    out = []
    for t, n in zip(tile or (512, 512), plane):
        t = int(t)
        c = t if t <= MAX_CHUNK else next((d for d in range(MAX_CHUNK, MIN_CHUNK - 1, -1) if t % d == 0), t)
        out.append(max(1, min(c, int(n))))
    return out[0], out[1]


def _read_root_attributes(path: Path) -> dict[str, Any] | None:
    """The attributes of the zarr v3 group at ``path`` (its ``zarr.json``), or None if there is none/unparsable."""
    try:
        with open(path / "zarr.json", "rb") as fh:
            meta = json.loads(fh.read(1 << 24))
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            return None
        attrs = meta.get("attributes", {})
        return attrs if isinstance(attrs, dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def is_zarr_result(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a finished hpc_zsem zarr result (root attribute format)."""
    path = Path(path)
    attrs = _read_root_attributes(path) if path.is_dir() else None
    return attrs is not None and attrs.get("format") == FORMAT


def read_zarr_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The parts of a zarr result that :func:`hpc_zsem.io.results.read_result_summary` gives for HDF5: ``shape``
    (of ``mean`` level 0), params, history and metadata (root attributes) — no image data is read."""
    import zarr

    path = Path(path)
    if not is_zarr_result(path):
        raise InputError(f"{path}: not an hpc_zsem zarr result (no root attribute format = {FORMAT})")
    try:
        root = zarr.open_group(str(path), mode="r")
        groups = {name: root[name] for name in ("params", "history") if name in root}
        arrays = {name: {key: np.asarray(value[()]) for key, value in group.arrays()}
                  for name, group in groups.items() if isinstance(group, zarr.Group)}
        return {"shape": tuple(_level_array(root, "mean", 0).shape), "params": arrays.get("params", {}),
                "history": arrays.get("history", {}), "metadata": dict(root.attrs)}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: corrupt zarr result ({type(exc).__name__}: {exc})") from None


class _LevelZero:
    """Level 0 of one image of a zarr result, read like an h5py dataset: ``shape``, ``ndim``, ``chunks``,
    ``name``, slicing, and ``attrs["element_size_um"]`` (the result's pixel size, held by the root)."""

    def __init__(self, array: zarr.Array, element_size_um: Any):
        self._array = array
        self.shape, self.ndim, self.chunks, self.name = array.shape, array.ndim, array.chunks, array.name
        self.attrs = {} if element_size_um is None else {"element_size_um": np.asarray(element_size_um)}

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.asarray(self._array[index])


class ZarrResultImages:
    """The images of a finished zarr result opened read-only for export: ``images[name]`` is level 0 of image
    ``name`` (mean, variance, input) as :class:`_LevelZero`; ``name in images``; a context manager."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not is_zarr_result(self.path):
            raise InputError(f"{self.path}: not an hpc_zsem zarr result (no root attribute format = {FORMAT})")
        try:
            root = zarr.open_group(str(self.path), mode="r")
            size = root.attrs.get("element_size_um")
            names = root.attrs.get("images", ["mean", "variance"])
            if not isinstance(names, list):
                raise ValueError(f"root attribute images = {names!r}, expected a list of names")
            self._images = {str(name): _LevelZero(_level_array(root, str(name), 0), size)
                            for name in names if str(name) in root}
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{self.path}: corrupt zarr result ({type(exc).__name__}: {exc})") from None
        if "mean" not in self._images:
            raise InputError(f"{self.path}: the zarr result has no mean image")

    def __contains__(self, name: object) -> bool:
        return name in self._images

    def __getitem__(self, name: str) -> _LevelZero:
        return self._images[name]

    def __enter__(self) -> ZarrResultImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self._images = {}


def _is_own_partial(path: Path) -> bool:
    """An unfinished store of ours: a directory whose root group carries a resume key, or an empty one (a
    writer killed between creating the directory and its first ``zarr.json``)."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    attrs = _read_root_attributes(path)
    return attrs is not None and "resume_key" in attrs


def _own_files(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(files, directories deepest first, foreign entries) of a store tree: files this module writes are
    ``zarr.json``, chunk files (all-digit names below a ``c`` directory) and zarr's write temporaries."""
    files, dirs, foreign = [], [], []
    for here, subdirs, names in os.walk(root, topdown=False, followlinks=False):
        base = Path(here)
        rel = base.relative_to(root).parts
        for name in names:
            p = base / name
            if p.is_symlink():
                foreign.append(p)
            elif name == "zarr.json" or _OWN_TEMP.match(name) or ("c" in rel and name.isdigit()):
                files.append(p)
            else:
                foreign.append(p)
        for name in subdirs:
            if (base / name).is_symlink():
                foreign.append(base / name)
        dirs.append(base)
    return files, dirs, foreign


def remove_store(path: str | os.PathLike, what: str = "an hpc_zsem zarr store") -> None:
    """Remove a store directory this tool created, file by file; OutputError (nothing removed) if it holds
    anything this module does not write."""
    root = Path(path)
    if root.is_symlink() or not root.is_dir():
        raise OutputError(f"{root}: is not {what} (not a directory); hpc-zsem removes only its own files")
    files, dirs, foreign = _own_files(root)
    if foreign:
        raise OutputError(f"{root}: holds files hpc-zsem did not write (e.g. {foreign[0]}); it is not {what} "
                          "and is left untouched: move it away or choose another path")
    for f in files:
        f.unlink(missing_ok=True)
    for d in dirs:                      # deepest first (os.walk bottom-up)
        d.rmdir()


def check_zarr_output_path(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (OutputError) a zarr output whose directory is missing or not writable, that exists without
    ``overwrite``, or that exists and is not an hpc_zsem result (never replaced, even with ``overwrite``)."""
    path = Path(path)
    check_output_directory(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    ours = (not path.is_symlink()) and (is_zarr_result(path) or (path.is_file() and is_hpc_zsem_file(path, FORMAT)))
    refuse_foreign(path, ours, "output.path", "an hpc_zsem result")
    if ours and path.is_dir():
        foreign = _own_files(path)[2]
        if foreign:
            raise OutputError(f"{path}: holds files hpc-zsem did not write (e.g. {foreign[0]}); it is not replaced, "
                              "even with --overwrite: move it away or choose another path")


def _json_value(key: str, value: Any) -> Any:
    """A metadata value as JSON (numpy → builtins; non-finite floats as the strings zarr uses)."""
    if isinstance(value, np.ndarray):
        return [_json_value(key, v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (list, tuple)):
        return [_json_value(key, v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"metadata {key!r}: expected str, int, float or list, got {type(value).__name__}")


def _halve(block: np.ndarray) -> np.ndarray:
    """Mean of 2×2 pixels over the last two axes (an odd edge: the mean of the pixels there), float32."""
    a = np.asarray(block, dtype=np.float64)
    if a.shape[-2] % 2:
        a = np.concatenate([a, a[..., -1:, :]], axis=-2)
    if a.shape[-1] % 2:
        a = np.concatenate([a, a[..., :, -1:]], axis=-1)
    lead = a.shape[:-2]
    y, x = a.shape[-2] // 2, a.shape[-1] // 2
    return a.reshape(*lead, y, 2, x, 2).mean(axis=(-3, -1)).astype(np.float32)


def level_shapes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the multiscale levels: level 0 = ``shape``, then YX halved (rounded up) until a plane fits
    into one chunk."""
    shapes = [tuple(shape)]
    while shapes[-1][-2] > chunks[-2] or shapes[-1][-1] > chunks[-1]:
        last = shapes[-1]
        shapes.append(tuple(last[:-2]) + (-(-last[-2] // 2), -(-last[-1] // 2)))
    return shapes


def chunk_indices(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All chunk grid indices of an array, in C order."""
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    return [tuple(int(v) for v in idx) for idx in np.ndindex(*[len(g) for g in grid])]


def downsample_chunks(src, dst, indices: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Compute the chunks ``indices`` of level ``dst`` from level ``src`` (zarr arrays, or anything sliceable
    with ``shape`` and ``chunks``): each is the 2×2 mean in YX of the source region it covers. Ranks compute
    disjoint sets of chunks of one level, after every rank has finished the level before. Returns the
    indices written."""
    done = []
    chunks = dst.chunks
    for idx in indices:
        out = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, dst.shape))
        lead, (ys, xs) = out[:-2], out[-2:]
        region = src[lead + (slice(2 * ys.start, min(2 * ys.stop, src.shape[-2])),
                             slice(2 * xs.start, min(2 * xs.stop, src.shape[-1])))]
        dst[out] = _halve(region)
        done.append(tuple(idx))
    return done


def _tile_key(tile) -> tuple:
    z = getattr(tile, "z", None)
    return (None if z is None else int(z), int(tile.y0), int(tile.y1), int(tile.x0), int(tile.x1))


def _level_array(root: zarr.Group, name: str, level: int) -> zarr.Array:
    """Level ``level`` (the array ``<name>/<level>``) of image ``name`` of an open store; ValueError if the
    store has no such array."""
    import zarr

    node = root.get(f"{name}/{level}")
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{root.store}: {name}/{level} is not a zarr array")
    return node


class _Failed(Exception):
    """A failure that every rank learned of (carries the one-line message)."""


# ---------------------------------------------------------------------------------------------------- store
class ZarrResultStore(ResultContent):
    """Mean/variance (and ``extra``) images written tile by tile by every rank of ``comm`` into an OME-Zarr
    directory that appears atomically on :meth:`close`. The constructor, :meth:`suspend` and :meth:`close` are
    collective; :meth:`write` and :meth:`abort` are local. ``resume_key`` is read on rank 0 only."""

    per_rank_writes = True

    def __init__(self, comm, path: str | os.PathLike, shape: tuple[int, ...], *, tile: tuple[int, int] | None = None,
                 chunks: tuple[int, int] | None = None, element_size_um: tuple[float, ...] | None = None,
                 extra: tuple[str, ...] = (), overwrite: bool = False, resume_key: str | None = None,
                 attrs: Mapping[str, Any] | None = None):
        shape = tuple(int(n) for n in shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"expected a (Y, X) or (Z, Y, X) shape, got {shape}")
        self.comm = comm
        self.path = Path(path)
        self.shape = shape
        self.axes = "YX" if len(shape) == 2 else "ZYX"
        self.names = ("mean", "variance") + tuple(extra)
        plane: tuple[int, ...] = chunks if chunks is not None else chunks_for_tile(tile, (shape[-2], shape[-1]))
        plane = tuple(max(1, min(int(c), n)) for c, n in zip(plane, shape[-2:]))
        self.chunks = plane if len(shape) == 2 else (1,) + plane
        self.element_size_um = self._size(element_size_um)
        self._attrs = dict(attrs or {})
        self._params: dict[str, np.ndarray] = {}
        self._history: dict[str, np.ndarray] = {}
        self._written: set[tuple] = set()          # this rank's tiles (rank 0: also those of a resumed store)
        self._restored: set[tuple] = set()
        self._own_chunks: list[Path] = []          # chunk files this rank wrote (fsynced on close/suspend)
        self._arrays: dict[str, Any] | None = None
        self.tmp: Path | None = None
        self._creator = comm.rank == 0
        status: tuple[str, Any] = ("ok", None)
        if comm.rank == 0:
            try:
                status = ("ok", self._prepare(overwrite, resume_key))
            except HpcZsemError as exc:
                status = ("error", str(exc))
            except OSError as exc:
                status = ("error", f"{self.path}: cannot create the result ({exc}); nothing was replaced")
            if status[0] == "error":
                self._remove_tmp()
        status = comm.bcast(status)
        if status[0] == "error":
            raise OutputError(status[1])
        info = status[1]
        self.tmp = Path(info["tmp"])
        self._resumable = info["resumable"]
        self._restored = {tuple(k) for k in info["written"]}
        self._open_arrays()

    # ---------------------------------------------------------------- set-up (rank 0)
    def _tmp_path(self) -> Path:
        """The temporary store directory (known on every rank once the constructor has run)."""
        if self.tmp is None:
            raise RuntimeError(f"{self.path}: the temporary store is not set up")
        return self.tmp

    def _size(self, element_size_um) -> tuple[float, ...] | None:
        if element_size_um is None:
            return None
        size = tuple(float(v) for v in element_size_um)
        if len(size) == 2 and len(self.shape) == 3:
            size = (1.0,) + size
        if len(size) != len(self.shape):
            raise ValueError(f"element_size_um {size} does not match the axes {self.axes}")
        return size

    def _prepare(self, overwrite: bool, resume_key: str | None) -> dict[str, Any]:
        """Check the output, reopen a usable partial store or create a fresh one; what the other ranks need."""
        check_zarr_output_path(self.path, overwrite)
        self._resume_key = resume_key
        if resume_key is None:
            self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        else:
            self.tmp = self.path.with_name(f"{self.path.name}.partial")
            written = self._reopen(resume_key)
            if written is not None:
                return {"tmp": str(self.tmp), "resumable": True, "written": sorted(written, key=str)}
        self._ensure_space(0)
        refuse_foreign(self.tmp, False, "output.path", "a temporary file of this run")   # exclusive below
        self._made_tmp = True
        os.mkdir(self.tmp)
        self._create(resume_key)
        return {"tmp": str(self.tmp), "resumable": resume_key is not None, "written": []}

    def _reopen(self, key: str) -> set[tuple] | None:
        """The written tiles of a cleanly suspended partial store with the same key, shape, chunks and arrays
        (marked open again), or None after removing any other partial store of ours (a foreign directory of
        that name is refused)."""
        tmp = self._tmp_path()
        if not os.path.lexists(tmp):
            return None
        refuse_foreign(tmp, _is_own_partial(tmp), "output.path", "a partial hpc_zsem result")
        attrs = _read_root_attributes(tmp) or {}
        try:
            import zarr

            usable = attrs.get("clean") == 1 and attrs.get("resume_key") == key
            if usable:
                group = zarr.open_group(self._store(), mode="r+")
                levels = [_level_array(group, n, 0) for n in self.names]
                usable = all(tuple(a.shape) == self.shape and tuple(a.chunks) == self.chunks for a in levels)
            if usable:
                written = {tuple(None if v is None else int(v) for v in row) for row in attrs["written_tiles"]}
                group.attrs.update({"clean": 0})
                self._made_tmp = True
                return written
        except (OSError, KeyError, ValueError, TypeError):
            pass
        remove_store(tmp, "a partial hpc_zsem result")
        return None

    def _store(self, read_only: bool = False):
        from zarr.storage import LocalStore

        return LocalStore(self._tmp_path(), read_only=read_only)

    def _create(self, resume_key: str | None) -> None:
        import zarr

        root = zarr.open_group(self._store(), mode="w", zarr_format=3)
        root.attrs.update({"hpc_zsem_partial": True, "clean": 0, "axes": self.axes,
                           **({"resume_key": resume_key} if resume_key is not None else {})})
        dims = ["y", "x"] if len(self.shape) == 2 else ["z", "y", "x"]
        for name in self.names:
            group = root.create_group(name)
            group.create_array("0", shape=self.shape, chunks=self.chunks, dtype="float32", fill_value=float("nan"),
                               dimension_names=dims)
            group.attrs.update({"ome": self._ngff(name, [self.shape])})

    def _ngff(self, name: str, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
        """The NGFF 0.5 ``ome`` attribute of one image with ``len(shapes)`` levels."""
        unit = {"unit": "micrometer"} if self.element_size_um is not None else {}
        axes = [{"name": a.lower(), "type": "space", **unit} for a in self.axes]
        base = self.element_size_um or (1.0,) * len(self.shape)
        datasets = []
        for k in range(len(shapes)):
            f = 2 ** k
            scale = [float(base[0])] * (len(self.shape) - 2) + [float(base[-2]) * f, float(base[-1]) * f]
            transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
            if k:
                shift = [0.0] * (len(self.shape) - 2) + [float(base[-2]) * (f - 1) / 2, float(base[-1]) * (f - 1) / 2]
                transforms.append({"type": "translation", "translation": shift})
            datasets.append({"path": str(k), "coordinateTransformations": transforms})
        return {"version": NGFF_VERSION,
                "multiscales": [{"name": name, "axes": axes, "datasets": datasets, "type": "mean",
                                 "metadata": {"description": "level k+1 = mean of 2x2 pixels of level k in YX",
                                              "written_by": "hpc_zsem"}}]}

    def _open_arrays(self) -> None:
        import zarr

        root = zarr.open_group(self._store(), mode="r+")
        self._root = root
        self._arrays = {name: _level_array(root, name, 0) for name in self.names}

    def _ensure_space(self, pending_bytes: int) -> None:
        """Refuse (OutputError) to go on when the file system may not hold what is written next."""
        where = self.tmp if self.tmp is not None and self.tmp.exists() else self.path.parent
        needed = pending_bytes + _METADATA_SLACK
        free = shutil.disk_usage(where).free
        if free < needed:
            raise OutputError(f"{self.path}: not enough disk space to go on writing the result ({free / 2**20:.1f} "
                              f"MiB free, up to {needed / 2**20:.1f} MiB needed); nothing was replaced")

    # ---------------------------------------------------------------- writing (any rank, local)
    @property
    def written(self) -> set[tuple]:
        """Keys (z, y0, y1, x0, x1) of the tiles written before (resumed store) and by this rank."""
        return self._restored | self._written

    def _chunk_file(self, name: str, level: int, index: tuple[int, ...]) -> Path:
        return self._tmp_path().joinpath(name, str(level), "c", *map(str, index))

    def write(self, tile, mean_core: np.ndarray, var_core: np.ndarray, **extra: np.ndarray) -> None:
        """Write one tile's core (any order, any rank). Its core must cover whole chunks (cores from
        ``plan_tiles`` with the store's tile size do). A failure raises (OutputError / OSError) and leaves the
        clean-up to the caller (every rank must learn of it: see ``hpc_zsem.streaming``)."""
        if self._arrays is None:
            raise RuntimeError(f"{self.path}: store is closed")
        z, y0, y1, x0, x1 = _tile_key(tile)
        if (z is None) != (len(self.shape) == 2):
            raise ValueError(f"tile z={z} does not match a volume of shape {self.shape}")
        Y, X = self.shape[-2:]
        if not (0 <= y0 < y1 <= Y and 0 <= x0 < x1 <= X) or (z is not None and not 0 <= z < self.shape[0]):
            raise ValueError(f"tile z={z} [{y0}:{y1}, {x0}:{x1}] lies outside the volume {self.shape}")
        cy, cx = self.chunks[-2:]
        if y0 % cy or x0 % cx or (y1 % cy and y1 != Y) or (x1 % cx and x1 != X):
            raise ValueError(f"tile [{y0}:{y1}, {x0}:{x1}] is not aligned to the chunks {self.chunks}: two ranks "
                             "could write one chunk")
        key = (z, y0, y1, x0, x1)
        if key in self._written or key in self._restored:
            raise ValueError(f"tile {key} was already written")
        arrays = {"mean": mean_core, "variance": var_core, **extra}
        if set(arrays) != set(self.names):
            raise ValueError(f"expected arrays {self.names}, got {tuple(arrays)}")
        values = {}
        for name, value in arrays.items():
            value = as_float32(value)
            if value.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"{name}: core of shape {value.shape}, expected {(y1 - y0, x1 - x0)}")
            values[name] = value
        self._ensure_space(len(arrays) * 4 * (y1 - y0) * (x1 - x0))
        index = (slice(y0, y1), slice(x0, x1)) if z is None else (z, slice(y0, y1), slice(x0, x1))
        lead = () if z is None else (z,)
        for name, value in values.items():
            self._arrays[name][index] = value
            for iy in range(y0 // cy, -(-y1 // cy)):
                for ix in range(x0 // cx, -(-x1 // cx)):
                    self._own_chunks.append(self._chunk_file(name, 0, lead + (iy, ix)))
        self._written.add(key)

    # ---------------------------------------------------------------- collective steps
    def _agree(self, error: str | None) -> None:
        """Every rank learns whether any rank failed (the first message); on failure rank 0 removes the
        temporary store *before* any rank goes on, and every rank raises the same one-line OutputError."""
        errors = [e for e in self.comm.allgather(error) if e]
        if errors:
            self.abort()
            self.comm.barrier()
            raise _Failed(errors[0])

    def _step(self, action, failure: str, *, rank0: bool = False, also: tuple = ()) -> None:
        """Run ``action()`` on every rank (on rank 0 only with ``rank0``), then ``_agree`` on whether any rank
        failed: an OSError (or one of ``also``) becomes "<path>: <failure>" with ``{exc}`` in ``failure``
        replaced by the error, an HpcZsemError keeps its own one-line message."""
        error = None
        if not rank0 or self.comm.rank == 0:
            try:
                action()
            except HpcZsemError as exc:
                error = str(exc)
            except (OSError, *also) as exc:
                error = f"{self.path}: " + failure.format(exc=exc)
        self._agree(error)

    def _fsync_own(self) -> None:
        for f in dict.fromkeys(self._own_chunks):
            if f.exists():
                fsync_path(f)
        self._own_chunks.clear()

    def suspend(self) -> None:
        """Keep the partial store for a later run with the same resume key (collective): every rank fsyncs its
        chunks, rank 0 records all written tiles and marks the store clean. Without a key this is abort."""
        if self._arrays is None:
            return
        if not self._resumable:
            self.abort()
            return
        failure = "cannot keep the partial result ({exc})"
        try:
            self._step(self._fsync_own, failure)
            gathered = self.comm.gather(sorted(self._written, key=str))

            def mark_clean():
                keys = set(self._restored).union(*(map(tuple, part) for part in gathered))
                rows = [[None if v is None else int(v) for v in k] for k in sorted(keys, key=str)]
                self._root.attrs.update({"written_tiles": rows, "clean": 1})
                fsync_path(self._tmp_path() / "zarr.json")
                fsync_path(self._tmp_path())

            self._step(mark_clean, failure, rank0=True)
        except _Failed as exc:
            raise OutputError(str(exc)) from None
        self._arrays = None

    def close(self) -> None:
        """Finish the store (collective): check every pixel was written, build the multiscale levels, fsync,
        add params/history/metadata and rename it into place (rank 0)."""
        if self._arrays is None:
            raise RuntimeError(f"{self.path}: store is already closed")
        try:
            self._finish()
        except _Failed as exc:
            raise OutputError(str(exc)) from None

    def _finish(self) -> None:
        import zarr

        comm = self.comm
        gathered = comm.gather(sorted(self._written, key=str))
        error = None
        if comm.rank == 0:
            keys = set(self._restored).union(*(map(tuple, part) for part in gathered))
            pixels = sum((y1 - y0) * (x1 - x0) for _, y0, y1, x0, x1 in keys)
            total = int(np.prod(self.shape))
            if pixels != total:
                error = f"{self.path}: only {pixels} of {total} pixels were written"
        self._agree(error)
        shapes = level_shapes(self.shape, self.chunks)
        failure = "cannot write the result ({exc}); nothing was replaced"

        def create_levels():
            self._ensure_space(sum(4 * int(np.prod(s)) for s in shapes[1:]) * len(self.names))
            dims = ["y", "x"] if len(self.shape) == 2 else ["z", "y", "x"]
            for name in self.names:
                group = self._root[name]
                if not isinstance(group, zarr.Group):
                    raise OutputError(f"{self.path}: {name} in the temporary store is not a zarr group")
                for k, s in enumerate(shapes[1:], start=1):
                    group.create_array(str(k), shape=s, chunks=self.chunks, dtype="float32",
                                       fill_value=float("nan"), dimension_names=dims)
                group.attrs.update({"ome": self._ngff(name, shapes)})

        self._step(create_levels, "cannot write the result ({exc})", rank0=True)
        root = zarr.open_group(self._store(), mode="r+")

        def fill_level(k):                      # this rank's share of level k's chunks, from level k − 1
            every = chunk_indices(shapes[k], self.chunks)
            mine = shard(len(every), comm.rank, comm.size)
            for name in self.names:
                done = downsample_chunks(_level_array(root, name, k - 1), _level_array(root, name, k),
                                         every[mine.start:mine.stop])
                self._own_chunks.extend(self._chunk_file(name, k, idx) for idx in done)

        for k in range(1, len(shapes)):         # level k is complete on every rank before level k+1 reads it
            self._step(lambda: fill_level(k), failure)
        self._step(self._fsync_own, failure)
        self._step(lambda: self._commit(root), failure, rank0=True, also=(TypeError, ValueError))
        self._arrays = None

    def _commit(self, root) -> None:
        """Rank 0: params, history and metadata, fsync of the tree, then the directory renamed into place."""
        self._ensure_space(0)
        params = root.create_group("params")
        for name, value in self._params.items():
            params.create_array(name, data=value)
        history = root.create_group("history")
        for name, column in self._history.items():
            history.create_array(name, data=column)
        clash = [k for k in self._attrs if k in _RESERVED]
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved")
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "axes": self.axes,
                 "ngff_version": NGFF_VERSION, "images": list(self.names)}
        if self.element_size_um is not None:
            attrs["element_size_um"] = list(self.element_size_um)
        attrs.update({k: _json_value(k, v) for k, v in self._attrs.items() if v is not None and k not in attrs})
        attrs = {k: v for k, v in ({**dict(root.attrs), **attrs}).items() if k not in _STATE_KEYS}
        root.attrs.put(attrs)
        tmp = self._tmp_path()
        for here, _, names in os.walk(tmp, topdown=False):    # chunks of the images: fsynced by their writers
            rel = Path(here).relative_to(tmp).parts
            for name in names:
                if name == "zarr.json" or rel[:1] in (("params",), ("history",)):
                    fsync_path(Path(here) / name)
            fsync_path(Path(here))
        self._replace()

    def _replace(self) -> None:
        """Rename the finished store into place; an existing result (verified ours again) is renamed aside
        first and removed only once the new one is in place."""
        check_zarr_output_path(self.path, overwrite=True)
        old = None
        if os.path.lexists(self.path):
            old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
            refuse_foreign(old, False, "output.path", "a temporary file of this run")
            os.rename(self.path, old)
        try:
            os.rename(self._tmp_path(), self.path)
        except BaseException:
            if old is not None:
                os.rename(old, self.path)
            raise
        self._made_tmp = False
        fsync_path(self.path.parent)
        if old is not None:
            if old.is_dir():
                remove_store(old, "the earlier hpc_zsem result")
            else:
                old.unlink()
            fsync_path(self.path.parent)

    # ---------------------------------------------------------------- dropping
    def _remove_tmp(self) -> None:
        if getattr(self, "_made_tmp", False) and self.tmp is not None and os.path.lexists(self.tmp):
            try:
                remove_store(self.tmp, "a temporary hpc_zsem result")
            except (OSError, HpcZsemError):
                pass
        self._made_tmp = False

    def abort(self) -> None:
        """Drop the store (local, idempotent): rank 0 removes the temporary directory it created."""
        self._arrays = None
        if self._creator:
            self._remove_tmp()

    def __enter__(self) -> "ZarrResultStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._arrays is not None:
            self.close()
