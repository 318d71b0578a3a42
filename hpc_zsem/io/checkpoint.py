"""Checkpoints: everything an exact resume needs, in one HDF5 file written atomically (format_version 1).

Layout::

    /params/<name>     float64 model parameters Θ (exactly as in memory)
    /history/<name>    1-D float64 per-epoch rows (epoch, free_energy, sigma2, accepted, seconds, ...)
    /states            the per-patch variational state of every patch in global patch order, e.g. SSSC's
                       packed truncated sets K, uint64 (n_patches, S, ceil(H/64)); absent for models with exact
                       posteriors (GPMM). gzip-1 + shuffle, chunked by patches.
    root attrs         format="hpc_zsem-checkpoint", format_version, stage ("train" | "estimate" = training
                       has ended), epoch (the last training epoch), config (YAML), config_hash,
                       input_path, input_checksum,
                       geometry (image_shape, patch_size, stride, n_patches, block_size), model, ranks,
                       created, version, elapsed_seconds, free_energy (last training epoch)
    trailer            after the HDF5 data, the line "\nhpc_zsem-checkpoint sha256:<64 hex>\n": the sha256 of
                       every byte before it

The trailer is checked on the raw bytes *before* HDF5 opens the file, so a corrupted or truncated checkpoint
is refused without ever being parsed: HDF5 reads flipped data bytes silently, and some damaged metadata makes
it loop forever (measured: one corrupted variable-length string attribute did). HDF5 ignores bytes past the
end of its data.

The log-joints of the truncated sets are not stored: the next E-step recomputes them from (Θ, K) before
anything uses them, so they carry no information for a resume.

Writing (rank 0): the new checkpoint is built in memory (:func:`hpc_zsem.io.results.hdf5_image`, so a full
disk is a plain OSError, never an HDF5 crash) and written completely as ``X.new`` (temporary file, fsync,
rename: :func:`hpc_zsem.io.results.write_atomically`); then the current ``X`` is hard-linked (where links are
unsupported: copied) to ``previous_path(X)`` and ``X.new`` is renamed over ``X``. A crash or ``kill -9`` at
any moment leaves ``X`` complete (old or new) and, except between the last two renames, the one before it as
``.prev``. Loading tries ``X`` and falls back to ``.prev`` when ``X`` is missing, unreadable or fails its
checksum. Leftover temporary files of killed writers are removed before the next write.

Resume rules (:func:`incompatibilities`): the config must equal the checkpoint's except for ``output.*``,
``checkpoint.*``, ``logging.*``, ``resources.*``, ``estimation.*`` (the estimation pass starts every patch
afresh; its ``<output>.partial`` is reused only under the same config), the training length and the stopping rule of
``training.epochs: auto``, which may change as long as the checkpoint's position is still ahead: a checkpoint
taken during training resumes under any ``training.epochs`` (or ``max_epochs``) >= its epoch (raise it to
train longer); one taken after training (stage ``estimate``: training has ended, the estimation pass is next
or under way, its finished tiles in ``<output>.partial``) needs the same ``training.epochs`` (with ``auto``,
the same stopping rule: :data:`TRAINING_LENGTH`). The input file's checksum must match. The number of ranks
may change.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from hpc_zsem.config import schema_default
from hpc_zsem.errors import ConfigError, InputError
from hpc_zsem.io.paths import is_hdf5_file, refuse_foreign, root_attribute
from hpc_zsem.io.results import fsync_path, hdf5_image, plain_value, write_atomically

log = logging.getLogger("hpc_zsem")

FORMAT = "hpc_zsem-checkpoint"
FORMAT_VERSION = 1
STAGES = ("train", "estimate")
#: the keys that say how long training runs (``training.epochs``, and the stopping rule of ``epochs: auto``)
TRAINING_LENGTH = ("training.epochs", "training.max_epochs", "training.stop_window", "training.stop_tolerance")
MAY_DIFFER = ("output.", "checkpoint.", "logging.", "resources.", "estimation.", *TRAINING_LENGTH)
_GEOMETRY = ("image_shape", "patch_size", "stride", "n_patches", "block_size")
_STATE_CHUNK_BYTES = 1 << 20
_TRAILER_HEAD = b"\nhpc_zsem-checkpoint sha256:"
_TRAILER_SIZE = len(_TRAILER_HEAD) + 64 + 1
_READ = 1 << 20
TEST_SLEEP_ENV = "HPC_ZSEM_TEST_CHECKPOINT_SLEEP"   # "EPOCH:SECONDS": sleep inside the writer (kill tests)


class CheckpointError(InputError):
    """A checkpoint file that cannot be used (unreadable, truncated, corrupted, not a checkpoint)."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file. ``states`` covers all patches in global order (None for models
    without per-patch state)."""

    stage: str
    epoch: int
    params: dict[str, np.ndarray]
    history: Mapping[str, Sequence[float] | np.ndarray]   # per-epoch columns; read back as 1-D float64 arrays
    states: np.ndarray | None
    config_yaml: str
    config_hash: str
    input_path: str
    input_checksum: str
    geometry: dict[str, Any]
    model: str
    ranks: int
    elapsed_seconds: float = 0.0
    created: str = ""
    version: str = ""
    free_energy: float = float("nan")
    path: Path | None = field(default=None, compare=False)

    @property
    def position(self) -> str:
        return f"training epoch {self.epoch}" if self.stage == "train" else f"the end of training (epoch {self.epoch})"


# ----------------------------------------------------------------------------------------------- paths

def checkpoint_path(config) -> Path:
    """``checkpoint.path``, or ``output.path`` with the suffix ``.ckpt.h5`` (results/x.h5 → results/x.ckpt.h5)."""
    if config.checkpoint.path:
        return Path(config.checkpoint.path)
    out = Path(config.output.path)
    return out.with_name(out.stem + ".ckpt.h5") if out.suffix else out.with_name(out.name + ".ckpt.h5")


def check_checkpoint_path(config) -> None:
    """Refuse (OutputError), before any work, a checkpoint path whose directory is missing or not writable, or
    where the checkpoint or its previous one would replace a file that is not this tool's checkpoint (neither
    resuming nor --restart may read over or replace it)."""
    from hpc_zsem.errors import OutputError

    path = checkpoint_path(config)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: checkpoint directory '{path.parent}' does not exist; create it first "
                          "(checkpoint.path)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: checkpoint directory '{path.parent}' is not writable (checkpoint.path)")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; expected a file name (checkpoint.path)")
    key = "checkpoint.path" if config.checkpoint.path else "output.path, whose checkpoint it would be"
    for p in (path, previous_path(path)):
        refuse_foreign(p, is_own_checkpoint(p), key, "an hpc_zsem checkpoint")


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before the current one is kept: x.ckpt.h5 → x.ckpt.prev.h5."""
    path = Path(path)
    if path.suffix == ".h5":
        return path.with_name(path.stem + ".prev.h5")
    return path.with_name(path.name + ".prev")


def _leftovers(path: Path) -> list[Path]:
    """Temporary files that writers killed mid-write may leave next to ``path`` (``.new`` and ``.tmp-<pid>``)."""
    new = staging_path(path)
    temporary = [p for name in (new.name, path.name, previous_path(path).name)
                 for p in path.parent.glob(name + ".tmp-*") if p.name.rpartition(".tmp-")[2].isdigit()]
    return [new, *temporary]


def staging_path(path: Path) -> Path:
    """Where a new checkpoint is written completely before it replaces the current one: x.ckpt.h5.new."""
    return path.with_name(path.name + ".new")


def remove(path: str | os.PathLike) -> list[Path]:
    """Delete a checkpoint, its previous one and stale temporary files, each only if it is this tool's own
    (:func:`is_own_checkpoint`; temporary files by their names); returns what was removed."""
    path = Path(path)
    own = [p for p in (path, previous_path(path)) if is_own_checkpoint(p)]
    gone = []
    for p in own + _leftovers(path):
        if p.exists():
            p.unlink()
            gone.append(p)
    return gone


def is_own_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a checkpoint of this tool: it ends in a checkpoint trailer, or it is an HDF5 file
    that says so in its ``format`` attribute or that HDF5 cannot open (a checkpoint cut short by a crash).
    A readable HDF5 file of anything else, or a non-HDF5 file, is not."""
    if is_checkpoint(path):
        return True
    return is_hdf5_file(path) and root_attribute(path, "format") in (None, FORMAT)


# ----------------------------------------------------------------------------------------------- checksum

def _sha256(fh, length: int) -> str:
    digest = hashlib.sha256()
    left = length
    while left > 0:
        chunk = fh.read(min(_READ, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _trailer_bytes(data: bytes | memoryview) -> bytes:
    """The checksum trailer of a complete HDF5 image: the sha256 of every byte before it."""
    return _TRAILER_HEAD + hashlib.sha256(data).hexdigest().encode() + b"\n"


def _trailer(path: Path) -> tuple[int, str] | None:
    """(length of the HDF5 part, stored hex digest), or None if the file does not end in a trailer."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size < _TRAILER_SIZE:
            return None
        fh.seek(size - _TRAILER_SIZE)
        tail = fh.read(_TRAILER_SIZE)
    if not (tail.startswith(_TRAILER_HEAD) and tail.endswith(b"\n")):
        return None
    hexdigest = tail[len(_TRAILER_HEAD):-1].decode("ascii", "replace")
    return size - _TRAILER_SIZE, hexdigest


def verify_file(path: str | os.PathLike) -> str:
    """Check a checkpoint's bytes against its trailer (without HDF5); returns ``sha256:<hex>``.
    CheckpointError if the file is truncated, corrupted or has no trailer."""
    path = Path(path)
    try:
        found = _trailer(path)
        if found is None:
            raise CheckpointError(f"{path}: truncated or not a hpc_zsem checkpoint (no checksum trailer at the end)")
        length, stored = found
        with open(path, "rb") as fh:
            actual = _sha256(fh, length)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if actual != stored:
        raise CheckpointError(f"{path}: checksum mismatch (trailer sha256:{stored[:16]}…, content "
                              f"sha256:{actual[:16]}…): the file is corrupted")
    return "sha256:" + actual


# ----------------------------------------------------------------------------------------------- writing

def _test_sleep(epoch: int) -> None:
    spec = os.environ.get(TEST_SLEEP_ENV)
    if spec:
        at, _, seconds = spec.partition(":")
        if int(at) == epoch:
            import time
            log.info("test hook: sleeping %ss inside the checkpoint writer", seconds)
            time.sleep(float(seconds))


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` a copy of the current checkpoint (a hard link where possible)."""
    if not path.exists():
        return
    prev = previous_path(path)
    tmp = prev.with_name(f"{prev.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        fsync_path(tmp)
    os.replace(tmp, prev)


def write_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> int:
    """Write ``ckpt`` to ``path`` atomically, keeping the current one as ``previous_path(path)``; returns
    the file size in bytes."""
    path = Path(path)
    if ckpt.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {ckpt.stage!r}")

    def writer(f: h5py.File) -> None:
        for name, value in ckpt.params.items():
            f.create_dataset(f"params/{name}", data=np.asarray(value, dtype=np.float64))
        f.require_group("params")
        for name, column in ckpt.history.items():
            f.create_dataset(f"history/{name}", data=np.asarray(column, dtype=np.float64).reshape(-1))
        f.require_group("history")
        if ckpt.states is not None:
            states = np.ascontiguousarray(ckpt.states)
            row = max(1, states[:1].nbytes)
            chunks = (max(1, min(len(states), _STATE_CHUNK_BYTES // row)),) + states.shape[1:] if len(states) else None
            f.create_dataset("states", data=states, chunks=chunks, compression="gzip" if chunks else None,
                             compression_opts=1 if chunks else None, shuffle=bool(chunks))
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": ckpt.stage, "epoch": int(ckpt.epoch),
                 "config": ckpt.config_yaml, "config_hash": ckpt.config_hash, "input_path": ckpt.input_path,
                 "input_checksum": ckpt.input_checksum, "model": ckpt.model, "ranks": int(ckpt.ranks),
                 "elapsed_seconds": float(ckpt.elapsed_seconds), "free_energy": float(ckpt.free_energy),
                 "created": ckpt.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "version": ckpt.version}
        for key in _GEOMETRY:
            value = ckpt.geometry[key]
            attrs[key] = list(value) if isinstance(value, (list, tuple)) else int(value)
        for key, attr in attrs.items():
            f.attrs[key] = attr
        f.flush()
        _test_sleep(ckpt.epoch)

    image = hdf5_image(writer)
    for stale in _leftovers(path):              # left by writers killed mid-write
        stale.unlink(missing_ok=True)
    staging = staging_path(path)
    write_atomically(staging, image, _trailer_bytes(image))
    _keep_previous(path)
    os.replace(staging, path)
    fsync_path(path.parent)
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- reading

def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` ends in a checkpoint trailer (its content is not verified, HDF5 is not involved)."""
    try:
        return Path(path).is_file() and _trailer(Path(path)) is not None
    except OSError:
        return False


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint; CheckpointError if it is missing, not a checkpoint, unreadable or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if verify:
        verify_file(path)          # before HDF5 parses anything
    try:
        with h5py.File(path, "r") as f:
            if plain_value(f.attrs.get("format")) != FORMAT:
                raise CheckpointError(f"{path}: not a hpc_zsem checkpoint")
            version = f.attrs.get("format_version")
            if version is None or int(version) > FORMAT_VERSION:
                raise CheckpointError(f"{path}: checkpoint format_version {version} is not supported "
                                      f"(expected <= {FORMAT_VERSION})")
            a = {k: plain_value(v) for k, v in f.attrs.items()}
            ckpt = Checkpoint(
                stage=a["stage"], epoch=int(a["epoch"]),
                params={k: np.asarray(v[()], dtype=np.float64) for k, v in f["params"].items()},
                history={k: v[()] for k, v in f["history"].items()},
                states=f["states"][()] if "states" in f else None,
                config_yaml=a["config"], config_hash=a["config_hash"], input_path=a["input_path"],
                input_checksum=a["input_checksum"], geometry={k: a[k] for k in _GEOMETRY}, model=a["model"],
                ranks=int(a["ranks"]), elapsed_seconds=float(a["elapsed_seconds"]), created=a["created"],
                version=a["version"], free_energy=float(a["free_energy"]), path=path)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if ckpt.stage not in STAGES:
        raise CheckpointError(f"{path}: unknown stage {ckpt.stage!r}")
    return ckpt


def load_latest(path: str | os.PathLike) -> Checkpoint | None:
    """The newest usable checkpoint at ``path`` or, if that one is missing or damaged, its previous one.
    None if neither exists; CheckpointError if they exist but none is usable."""
    path = Path(path)
    problems = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = read_checkpoint(candidate)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable: %s", candidate, exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning("falling back to the previous checkpoint %s (%s)", candidate, ckpt.position)
        return ckpt
    if problems:
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems) +
                              "; pass --restart to start afresh")
    return None


# ----------------------------------------------------------------------------------------------- resume checks

def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def incompatibilities(ckpt: Checkpoint, config, input_checksum: str) -> list[str]:
    """Why ``ckpt`` cannot be resumed under ``config`` with an input of ``input_checksum`` (empty: it can)."""
    problems = []
    old = _flat(yaml.safe_load(ckpt.config_yaml) or {})
    new = _flat(config.to_dict())
    for key in sorted(set(old) | set(new)):
        if key.startswith(MAY_DIFFER):
            continue
        before = old.get(key, schema_default(key, "<absent>"))      # a key added since: its default then
        if before != new.get(key, "<absent>"):
            problems.append(f"{key}: {before!r} in the checkpoint, {new.get(key, '<absent>')!r} now")
    if ckpt.input_checksum != input_checksum:
        problems.append(f"input {config.input.path}: content differs (checksum {ckpt.input_checksum} in the "
                        f"checkpoint, {input_checksum} now)")
    if ckpt.stage == "train" and ckpt.epoch > config.training.epoch_limit:
        key = "training.max_epochs" if config.training.epochs == "auto" else "training.epochs"
        problems.append(f"{key}: the checkpoint is at training epoch {ckpt.epoch}, beyond "
                        f"{key} = {config.training.epoch_limit}")
    if ckpt.stage == "estimate":
        for key in TRAINING_LENGTH if config.training.epochs == "auto" else TRAINING_LENGTH[:1]:
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                problems.append(f"{key}: {old.get(key, '<absent>')!r} in the checkpoint, {new.get(key)!r} now (the "
                                "checkpoint was taken after training, in the estimation stage)")
    return problems


def find_resumable(config, restart: bool = False, input_checksum: str | None = None) -> Checkpoint | None:
    """The checkpoint to resume ``config`` from (rank 0), None for a fresh start (none exists, or ``restart``).
    ConfigError (naming every differing key) when the checkpoint belongs to another config or input;
    CheckpointError when checkpoint files exist but none is usable."""
    path = checkpoint_path(config)
    if restart:
        if path.exists() or previous_path(path).exists():
            log.info("--restart: starting afresh; the old checkpoint %s stays until this run writes its first", path)
        return None
    ckpt = load_latest(path)
    if ckpt is None:
        return None
    if input_checksum is None:
        from hpc_zsem.io.images import file_checksum
        input_checksum = file_checksum(config.input.path)
    problems = incompatibilities(ckpt, config, input_checksum)
    if problems:
        raise ConfigError(f"{ckpt.path}: the checkpoint ({ckpt.position}) belongs to a different run: "
                          + "; ".join(problems) + ". Pass --restart to start afresh (the old checkpoint is "
                          "replaced when the new run writes its first), or set checkpoint.path")
    return ckpt
