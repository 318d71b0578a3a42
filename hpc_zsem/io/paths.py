"""The one rule for paths: a run writes, replaces or deletes only files it created for this run, or
results/checkpoints it has verified as hpc_zsem's own; the input is never touched.

:func:`run_paths` lists every file a run may create next to its output and checkpoint (temporary, partial,
previous-checkpoint, lock files and the per-section parts directory). :func:`check_run_paths` refuses,
before any work, a config in which

- the input is one of them (or, for a zarr input, which is a directory, one of them lies inside it), or two
  of them are the same file — after resolving symlinks and ``..``, and through hard links (same device and
  inode) for files that exist;
- a name is longer than the file system allows once the longest suffix this tool adds is appended.

:func:`is_hpc_zsem_file` recognises results and checkpoints by their own attributes, for ``--overwrite`` and
``--restart`` (which never replace anything else).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from hpc_zsem.errors import ConfigError, OutputError

#: the longest suffix a writer appends to a name it was given: ``.tmp-<pid>`` (pids have at most 10 digits)
LONGEST_SUFFIX = len(".tmp-") + 10
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class RunPath:
    """A file (or directory) a run may write, with the config key it comes from, for error messages."""

    label: str
    path: Path


def lock_path(path: str | os.PathLike) -> Path:
    """The advisory lock file of an output or checkpoint: ``x.h5`` → ``x.h5.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def run_paths(config) -> list[RunPath]:
    """Every file and directory a run of ``config`` may create, replace or delete."""
    from hpc_zsem.io.checkpoint import checkpoint_path, previous_path, staging_path

    out = Path(config.output.path)
    ckpt = checkpoint_path(config)
    ckpt_key = "checkpoint.path" if config.checkpoint.path else "output.path (its checkpoint)"
    paths = [RunPath("output.path", out),
             RunPath("output.path (its .partial file)", out.with_name(out.name + ".partial")),
             RunPath("output.path (its .sections directory)", out.with_name(out.name + ".sections")),
             RunPath(ckpt_key, ckpt),
             RunPath(f"{ckpt_key} (previous checkpoint)", previous_path(ckpt)),
             RunPath(f"{ckpt_key} (staging file)", staging_path(ckpt))]
    return paths + [RunPath(f"{key} (its lock file)", lock_path(p)) for key, p in locked_paths(config)]


def locked_paths(config) -> list[tuple[str, Path]]:
    """(config key, path) of the files a run locks (:mod:`hpc_zsem.io.runlock`): the output, and the
    checkpoint when ``checkpoint.path`` puts it elsewhere."""
    from hpc_zsem.io.checkpoint import checkpoint_path

    out = [("output.path", Path(config.output.path))]
    return out + [("checkpoint.path", checkpoint_path(config))] if config.checkpoint.path else out


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (device, inode) if the file exists): two paths name the same file if either agrees."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def _same(a: tuple[str, tuple[int, int] | None], b: tuple[str, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory`` allows (255 where it cannot tell)."""
    try:
        return os.pathconf(directory if directory.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_run_paths(config) -> None:
    """Refuse (ConfigError) a config whose input is a file the run would write, whose written files
    coincide, or whose names are too long for the file system (see the module docstring)."""
    from hpc_zsem.io.images import input_file

    written = run_paths(config)
    for item in written:
        size = len(os.fsencode(item.path.name)) + LONGEST_SUFFIX
        limit = _name_max(item.path.parent)
        if size > limit:
            raise ConfigError(f"{item.label}: the file name '{item.path.name[:60]}…' is too long: with the suffixes "
                              f"this tool adds it needs {size} bytes, the file system allows {limit}; choose a "
                              "shorter name")
    source = input_file(config.input.path)
    source_id = _identity(source)
    ids = [(item, _identity(item.path)) for item in written]
    for item, ident in ids:
        if _same(ident, source_id):
            raise ConfigError(f"{item.label}: {item.path} is the input file ({config.input.path}); hpc-zsem never "
                              "writes over its input, choose another path")
        if source.is_dir() and ident[0].startswith(source_id[0].rstrip(os.sep) + os.sep):   # a zarr store
            raise ConfigError(f"{item.label}: {item.path} lies inside the input store ({config.input.path}); "
                              "hpc-zsem never writes into its input, choose another path")
    for i, (a, id_a) in enumerate(ids):
        for b, id_b in ids[i + 1:]:
            if _same(id_a, id_b):
                raise ConfigError(f"{a.label} and {b.label} are the same file ({a.path}); choose distinct paths")


def is_hdf5_file(path: str | os.PathLike) -> bool:
    """True if ``path`` starts with the HDF5 signature (at offset 0: how every file this tool writes starts)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def root_attribute(path: str | os.PathLike, name: str) -> str | None:
    """The text of root attribute ``name`` of an HDF5 file ('' if it has none), or None if HDF5 cannot open
    the file (not HDF5, or damaged, e.g. truncated by a crash)."""
    if not is_hdf5_file(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(name, "")
    except Exception:   # noqa: BLE001 - a damaged or foreign file is simply not recognised
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def is_hpc_zsem_file(path: str | os.PathLike, fmt: str) -> bool:
    """True if ``path`` is an HDF5 file whose root attribute ``format`` is ``fmt`` (``hpc_zsem-result`` or
    ``hpc_zsem-checkpoint``)."""
    return root_attribute(path, "format") == fmt


def refuse_foreign(path: str | os.PathLike, owned: bool, key: str, what: str) -> None:
    """OutputError if ``path`` exists but is not ``owned`` (not verified as this tool's ``what``): such a file
    is never replaced or deleted."""
    if os.path.lexists(path) and not owned:
        raise OutputError(f"{path}: exists and is not {what} ({key}); hpc-zsem replaces only its own files, even "
                          "with --overwrite/--restart: move it away or choose another path")
