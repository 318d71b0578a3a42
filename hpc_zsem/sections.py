"""One model per section of a stack (``training.per_section``).

Section z is an ordinary 2-D run (``hpc_zsem.pipeline.run``) of the same config with ``input.section = z``:
its own training, estimation, checkpoints and resume. Its result goes to ``<output>.sections/z0003.h5``; when
every section is finished, rank 0 copies them band by band into the (Z, Y, X) output volume (never more than
one band of one section in memory), stacks the per-section parameters along a new first axis (``params/W`` is
(Z, D, H)), concatenates the histories with a ``section`` column, and removes the parts.

A preempted job resumes where it stopped: finished sections (a part file whose config hash and input checksum
match) are skipped, the interrupted one continues from its checkpoint. Random numbers are keyed by the
patch's index in the whole stack (``input.section`` keeps that index), so section z of a per-section run is
identical to a separate run with ``input.section = z``, on any number of ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpc_zsem.config import Config
from hpc_zsem.dataset import output_pixel_size
from hpc_zsem.errors import ConfigError, HpcZsemError, OutputError
from hpc_zsem.io.checkpoint import Checkpoint, checkpoint_path, find_resumable
from hpc_zsem.io.images import file_checksum
from hpc_zsem.io.regions import open_source
from hpc_zsem.io.results import open_result, plain_value
from hpc_zsem.io.stores import open_result_store
from hpc_zsem.io.volumes import CHUNK
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import run

log = logging.getLogger("hpc_zsem")

COPY_BYTES = 64 << 20   # about this many bytes per image and band when the parts are copied into the output


def parts_dir(config: Config) -> Path:
    """Where the finished sections wait for assembly: ``<output>.sections/`` beside the output."""
    out = Path(config.output.path)
    return out.with_name(out.name + ".sections")


def section_config(config: Config, z: int) -> Config:
    """The config of section z's own run: ``input.section = z``, output in the parts directory, and its own
    checkpoint (next to the part, or ``<checkpoint.path stem>.z0003<suffix>`` when checkpoint.path is set)."""
    name = f"z{z:04d}"
    ckpt = None
    if config.checkpoint.path:
        path = checkpoint_path(config)
        ckpt = str(path.with_name(f"{path.stem}.{name}{path.suffix}"))
    return dataclasses.replace(
        config,
        input=dataclasses.replace(config.input, section=z),
        training=dataclasses.replace(config.training, per_section=False),
        output=dataclasses.replace(config.output, path=str(parts_dir(config) / f"{name}.h5")),
        checkpoint=dataclasses.replace(config.checkpoint, path=ckpt))


def _on_root(comm, decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0; every rank gets its value, or raises the same expected error."""
    outcome = None
    if comm.rank == 0:
        try:
            outcome = ("ok", decide())
        except HpcZsemError as exc:
            outcome = ("error", exc)
    status, value = comm.bcast(outcome)
    if status == "error":
        raise value
    return value


def _finished(part: Path, config: Config, checksum: str) -> bool:
    """True if ``part`` is the finished result of ``config`` on this input; ConfigError if it belongs to
    another run (a finished result is never silently replaced)."""
    if not part.exists():
        return False
    with open_result(part) as f:
        meta = {k: plain_value(f.attrs.get(k)) for k in ("config_hash", "input_checksum")}
    if meta == {"config_hash": config.hash(), "input_checksum": checksum}:
        return True
    raise ConfigError(f"{part}: a finished section of a different run (its config or input differs); pass "
                      f"--restart to recompute every section, or remove {part.parent}")


def run_per_section(config: Config, comm, overwrite: bool = False, restart: bool = False, stop=None) -> None:
    """Train and estimate every section of the stack on its own, then write the (Z, Y, X) output."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def prepare() -> tuple[int, str]:
        with open_source(config.input.path, crop=config.input.crop, downsample=config.input.downsample) as source:
            n = source.n_sections
        try:
            parts_dir(config).mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parts_dir(config)}: cannot create the directory for finished sections "
                              f"({exc.strerror})") from None
        return n, file_checksum(config.input.path)

    n_sections, checksum = _on_root(comm, prepare)
    log.info("training.per_section: %d sections, one model each; finished sections are kept in %s",
             n_sections, parts_dir(config))
    for z in range(n_sections):
        cfg = section_config(config, z)
        resume: Checkpoint | None = None

        def plan() -> bool:
            nonlocal resume
            if not restart and _finished(Path(cfg.output.path), cfg, checksum):
                return True
            resume = find_resumable(cfg, restart=restart, input_checksum=checksum)
            return False

        if _on_root(comm, plan):
            log.info("section %d/%d: finished earlier (%s), skipped", z + 1, n_sections, cfg.output.path)
            continue
        log.info("section %d/%d: its own model", z + 1, n_sections)
        run(cfg, comm, overwrite=True, resume=resume, stop=stop, input_checksum=checksum)
    if comm.rank == 0:
        parts = [Path(section_config(config, z).output.path) for z in range(n_sections)]
        _assemble(config, parts, overwrite, started, time.perf_counter() - t0)
        for part in parts:
            part.unlink()
        try:
            parts_dir(config).rmdir()
        except OSError:
            log.warning("%s: not removed, it holds files this run did not write", parts_dir(config))
        log.info("wrote %s (%d sections, one model each) in %.0fs", config.output.path, n_sections,
                 time.perf_counter() - t0)
    comm.bcast(None)        # no rank exits before the output is in place


@dataclasses.dataclass(frozen=True)
class _Band:
    """Rows [y0:y1] (all columns x0:x1) of section z: a region for a result store's ``write``."""

    z: int
    y0: int
    y1: int
    x0: int
    x1: int


def _assemble(config: Config, parts: list[Path], overwrite: bool, started: str, seconds: float) -> None:
    """Copy the finished sections into one (Z, Y, X) result volume (rank 0, alone), band by band, into the
    store ``output.path`` selects (HDF5, or OME-Zarr for ``.zarr``)."""
    with open_result(parts[0]) as f:
        plane = f["mean"].shape
        images = [name for name in ("mean", "variance", "input") if name in f]
    rows = max(CHUNK, COPY_BYTES // (4 * plane[1]) // CHUNK * CHUNK)      # whole 256-row chunks per band
    store = open_result_store(SerialComm(), config.output.path, (len(parts),) + plane,
                              element_size_um=output_pixel_size(config), extra=tuple(images[2:]),
                              overwrite=overwrite, tile=(CHUNK, CHUNK))
    params: dict[str, list[np.ndarray]] = {}
    history: dict[str, list[np.ndarray]] = {}
    metadata: list[dict[str, Any]] = []
    try:
        for z, part in enumerate(parts):
            with open_result(part) as f:
                for y0 in range(0, plane[0], rows):
                    y1 = min(y0 + rows, plane[0])
                    mean, variance, *extra = (f[name][y0:y1] for name in images)
                    store.write(_Band(z, y0, y1, 0, plane[1]), mean, variance, **dict(zip(images[2:], extra)))
                for key, value in f["params"].items():
                    params.setdefault(key, []).append(value[()])
                columns = {key: value[()] for key, value in f["history"].items()}
                columns["section"] = np.full(len(next(iter(columns.values()), [])), float(z))
                for key, value in columns.items():
                    history.setdefault(key, []).append(value)
                metadata.append({k: plain_value(v) for k, v in f.attrs.items()})
        store.set_params({key: np.stack(values) for key, values in params.items()})
        store.set_history({key: np.concatenate(values) for key, values in history.items()})
        store.set_metadata(_merged_metadata(config, metadata, started, seconds))
        store.close()
    except BaseException:
        store.abort()           # nothing half-written stays; the finished sections stay for a rerun
        raise


def _merged_metadata(config: Config, sections: list[dict[str, Any]], started: str, seconds: float) -> dict[str, Any]:
    """The output's metadata: the first section's, with this config, totals over the sections, and the
    per-section intensity mappings as lists."""
    first = sections[0]
    resumed = [m["resumed_from"] for m in sections if m.get("resumed_from")]
    kept: dict[str, Any] = {key: first[key] for key in ("version", "model", "ranks", "seed", "input_path",
                                                        "input_checksum", "patch_size") if key in first}
    return kept | {
        "config": config.to_yaml(), "config_hash": config.hash(), "created": started,
        "runtime_seconds": float(sum(m.get("runtime_seconds", 0.0) for m in sections)),
        "wall_seconds_this_job": seconds, "per_section": True,
        "n_patches": int(sum(m["n_patches"] for m in sections)),
        "n_training_patches": int(sum(m["n_training_patches"] for m in sections)),
        "intensity_gain": [float(m["intensity_gain"]) for m in sections],
        "intensity_offset": [float(m["intensity_offset"]) for m in sections],
        "resumed_from": "; ".join(resumed) if resumed else None}
