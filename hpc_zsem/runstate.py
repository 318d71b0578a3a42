"""A run's state beyond Θ: checkpoints (when to write them, writing, restoring) and provenance.

Checkpoints (:mod:`hpc_zsem.io.checkpoint`) are written at epoch boundaries only: every
``checkpoint.every_epochs`` epochs, when ``checkpoint.every_seconds`` have passed on any rank, and when any rank
got SIGUSR1/SIGTERM (then the run stops with ``StopRequested``) — decided from the flags the training
allreduces with its statistics, so every rank decides alike. At the end of training a checkpoint of stage
``estimate`` (Θ and the history, no truncated sets: the estimation pass starts every patch afresh) lets a
preempted estimation pass resume without training again. A checkpoint written on any number of ranks
restores on any other.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from hpc_zsem import __version__
from hpc_zsem.config import Config
from hpc_zsem.dataset import InputData
from hpc_zsem.errors import InputError
from hpc_zsem.io import checkpoint as ckpt_io
from hpc_zsem.io.checkpoint import Checkpoint
from hpc_zsem.io.images import file_checksum, resolve_input_path
from hpc_zsem.parallel import block_ranges, shard
from hpc_zsem.signals import StopRequested
from hpc_zsem.training import STOP, TIME_DUE, History, Training

log = logging.getLogger("hpc_zsem")


class RunState:
    """Checkpoint path and timing, the input's checksum, where the run resumed from, and the collective
    checkpoint operations on a :class:`~hpc_zsem.training.Training`."""

    def __init__(self, config: Config, comm, input_checksum: str | None = None):
        self.config, self.comm = config, comm
        self.checkpoint_path = ckpt_io.checkpoint_path(config)
        self.elapsed_before = 0.0             # seconds spent by the runs this one continues
        self.resumed_from: str | None = None
        self.started = time.perf_counter()
        self._input_checksum = input_checksum
        self._last_checkpoint = time.monotonic()

    def input_checksum(self) -> str:
        if self._input_checksum is None:
            self._input_checksum = file_checksum(self.config.input.path)
        return self._input_checksum

    def elapsed(self) -> float:
        """Seconds spent on this run so far, the runs it continues included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def checkpoint_due(self) -> bool:
        """This rank's time rule: ``checkpoint.every_seconds`` have passed since the last checkpoint."""
        every = self.config.checkpoint.every_seconds
        return every > 0 and time.monotonic() - self._last_checkpoint >= every

    def geometry(self, training: Training) -> dict[str, Any]:
        return {"image_shape": list(training.data.grid.volume_shape), "patch_size": list(self.config.patches.size),
                "stride": self.config.patches.stride, "n_patches": training.n_patches,
                "block_size": self.config.training.block_size}

    def epoch_boundary(self, training: Training, epoch: int) -> None:
        """Write a checkpoint if one is due (on every rank alike: the flags were allreduced); stop if asked."""
        every = self.config.checkpoint.every_epochs
        stop = training.flags.get(STOP, False)
        if stop or training.flags.get(TIME_DUE, False) or (every > 0 and epoch % every == 0):
            self.save(training, "train", epoch)
        if stop:
            raise StopRequested(f"stopped on request after train epoch {epoch}; checkpoint "
                                f"{self.checkpoint_path}; run the same command again to resume")

    def save(self, training: Training, stage: str, epoch: int) -> None:
        """Gather every block's state to rank 0 and write the checkpoint there (collective). A failed write is
        logged and the run goes on (the previous checkpoint stays valid). The checkpoint at the end of training
        (stage ``estimate``) holds no states: the estimation pass starts every patch from a fresh set."""
        t0 = time.perf_counter()
        gathered = self.comm.gather([(b.index, None if stage == "estimate" else b.state) for b in training.blocks])
        ok = True
        if self.comm.rank == 0:
            try:
                rows = training.history.rows
                ckpt = Checkpoint(
                    stage=stage, epoch=epoch, params=training.params, history=rows,
                    states=_assemble_states(gathered, training.n_blocks),
                    config_yaml=self.config.to_yaml(), config_hash=self.config.hash(),
                    input_path=str(resolve_input_path(self.config.input.path)), input_checksum=self.input_checksum(),
                    geometry=self.geometry(training), model=training.model.name, ranks=self.comm.size,
                    elapsed_seconds=self.elapsed(), version=__version__,
                    free_energy=rows["free_energy"][-1] if rows.get("free_energy") else float("nan"))
                size = ckpt_io.write_checkpoint(self.checkpoint_path, ckpt)
                log.info("checkpoint %s (%s): %.1f MB in %.2fs", self.checkpoint_path,
                         f"training epoch {epoch}" if stage == "train" else f"end of training, epoch {epoch}",
                         size / 2**20, time.perf_counter() - t0)
            except OSError as exc:
                ok = False
                log.error("writing the checkpoint %s failed (%s); the previous one is kept",
                          self.checkpoint_path, exc)
        self.comm.bcast(ok)        # no rank goes on (or exits) before rank 0 has finished writing
        self._last_checkpoint = time.monotonic()

    def restore(self, training: Training, ckpt: Checkpoint | None) -> None:
        """Continue from ``ckpt`` (held by rank 0; None elsewhere), written on any number of ranks: Θ, the
        history and the position go to every rank, each block's state to the rank that owns it now."""
        head: tuple[str, Any] = ("ok", None)
        if self.comm.rank == 0:
            if ckpt is None:
                raise ValueError("restore: rank 0 needs the checkpoint")
            mismatch = [f"{k}: {ckpt.geometry.get(k)!r} in the checkpoint, {v!r} now"
                        for k, v in self.geometry(training).items() if ckpt.geometry.get(k) != v]
            if mismatch:
                head = ("error", f"{ckpt.path}: the checkpoint's geometry differs: " + "; ".join(mismatch))
            else:
                head = ("ok", {"params": ckpt.params, "history": ckpt.history, "elapsed": ckpt.elapsed_seconds,
                               "from": f"{ckpt.path} at {ckpt.position} (written by {ckpt.ranks} rank(s), "
                                       f"{ckpt.created})"})
        status, info = self.comm.bcast(head)
        if status == "error":
            raise InputError(info)
        parts = None
        if ckpt is not None:
            all_blocks = block_ranges(training.n_patches, self.config.training.block_size)
            parts = [[None if ckpt.states is None else ckpt.states[slice(*all_blocks[b])]
                      for b in shard(training.n_blocks, r, self.comm.size)] for r in range(self.comm.size)]
            self._input_checksum = ckpt.input_checksum       # verified equal to the input's before resuming
        for block, state in zip(training.blocks, self.comm.scatter(parts)):
            block.state = state
        training.params = {k: np.array(v, dtype=np.float64) for k, v in info["params"].items()}
        training.history = History(rows={k: [float(x) for x in v] for k, v in info["history"].items()})
        self.elapsed_before = info["elapsed"]
        self.resumed_from = info["from"]
        log.info("resuming from %s", self.resumed_from)

    def metadata(self, training: Training, data: InputData, started: str) -> dict[str, Any]:
        """The result's provenance attributes."""
        c = self.config
        return {"version": __version__, "model": c.model.name, "config": c.to_yaml(), "config_hash": c.hash(),
                "created": started, "runtime_seconds": self.elapsed(), "ranks": self.comm.size,
                "seed": c.training.seed, "input_path": str(resolve_input_path(c.input.path)),
                "input_checksum": self.input_checksum(), "patch_size": list(c.patches.size),
                "n_patches": data.grid.n_patches, "n_training_patches": training.n_patches,
                "axes": "YX" if data.grid.sections == 1 else "ZYX", "intensity_gain": data.intensity.gain,
                "intensity_offset": data.intensity.offset, "resumed_from": self.resumed_from}


def _assemble_states(gathered: list[list[tuple[int, Any]]], n_blocks: int) -> np.ndarray | None:
    """The per-block states of all ranks as one array in global patch order (None if the model has none)."""
    by_block = dict(item for part in gathered for item in part)
    if sorted(by_block) != list(range(n_blocks)):
        raise RuntimeError(f"checkpoint: got the states of blocks {sorted(by_block)}, expected 0..{n_blocks - 1}")
    states = [by_block[b] for b in range(n_blocks)]
    if all(s is None for s in states):
        return None
    if not all(isinstance(s, np.ndarray) for s in states):
        raise TypeError("checkpoint: per-block states must all be numpy arrays (one row per patch) or all None")
    return np.concatenate(states, axis=0)
