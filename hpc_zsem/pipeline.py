"""One run, end to end: config → input (:mod:`hpc_zsem.dataset`) → training (:mod:`hpc_zsem.training`) →
estimation pass (:mod:`hpc_zsem.estimation`) → result store, with checkpoints and provenance
(:mod:`hpc_zsem.runstate`). Identical on every rank except for the blocks and tiles each rank owns.
"""
from __future__ import annotations

import datetime
import logging
import resource
import time
from typing import Any

from hpc_zsem import __version__
from hpc_zsem.config import Config
from hpc_zsem.dataset import InputData
from hpc_zsem.errors import InputError
from hpc_zsem.estimation import estimation_pass
from hpc_zsem.io import checkpoint as ckpt_io
from hpc_zsem.io.checkpoint import Checkpoint
from hpc_zsem.io.stores import check_output_path
from hpc_zsem.models import build_model
from hpc_zsem.resources import check_memory, input_geometry, memory_per_rank
from hpc_zsem.runstate import RunState
from hpc_zsem.signals import StopRequested
from hpc_zsem.training import Training
from hpc_zsem.units import format_seconds

log = logging.getLogger("hpc_zsem")


def preflight(config: Config, overwrite: bool, ranks: int = 1, threads: int = 1) -> int:
    """Cheap checks before any heavy work (run on rank 0): output writable, input readable (headers only)
    and large enough, and the memory estimate (``ranks`` × ``threads``) within ``resources.max_memory_per_rank``.
    Returns the number
    of sections of the (cropped) input: 1 for a 2-D image."""
    check_output_path(config.output.path, overwrite)
    plane, n_sections = input_geometry(config)
    h, w = config.patches.size
    if h > plane[0] or w > plane[1]:
        raise InputError(f"{config.input.path}: the image ({plane[0]}×{plane[1]} after crop/downsample) is "
                         f"smaller than patches.size {[h, w]}")
    check_memory(memory_per_rank(config, plane, n_sections, ranks, threads)[0], config.resources.max_memory_per_rank)
    return n_sections


class Run:
    """One run of the pipeline on one rank of ``comm``: its input, training and run state."""

    def __init__(self, config: Config, comm, input_checksum: str | None = None):
        self.config, self.comm = config, comm
        self.data = InputData(config)
        self.training = Training(config, comm, build_model(config), self.data)
        self.state = RunState(config, comm, input_checksum)
        self.training.checkpoint_due = self.state.checkpoint_due

    def estimate(self, metadata: dict[str, Any], overwrite: bool, stop: Any = None) -> bool:
        """The estimation pass with the current Θ into ``output.path``; False if stopped on request."""
        key = f"{__version__} {self.config.hash()} {self.state.input_checksum()}" if self.comm.rank == 0 else None
        return estimation_pass(self.config, self.comm, self.data, self.training.model, self.training.params,
                               self.training.history.rows, metadata, overwrite=overwrite, resume_key=key, stop=stop)


def run(config: Config, comm, overwrite: bool = False, resume: Checkpoint | None = None, stop=None,
        input_checksum: str | None = None) -> None:
    """Train, estimate and write the result (collective). Expected errors raise ``HpcZsemError``.

    ``resume`` (on rank 0; see ``hpc_zsem.io.checkpoint.find_resumable``) continues a checkpointed run;
    ``stop`` is a flag (``hpc_zsem.signals.StopFlag``) that, once truthy on any rank, makes every rank write a
    checkpoint at the next epoch boundary (or stop after the current round of tiles) and raise
    ``StopRequested``. After the result is written the checkpoints are deleted. ``input_checksum`` spares
    re-reading the input for its checksum when the caller has it."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    job = Run(config, comm, input_checksum)
    job.state.started = t0
    data, training = job.data, job.training
    training.stop = stop
    log.info("hpc-zsem %s: %s on %s (%s pixels), %d patches of %d×%d%s, %d rank(s), %d local block(s)",
             __version__, config.model.name, data.where, "×".join(map(str, data.grid.volume_shape)),
             data.grid.n_patches, *config.patches.size,
             f", training on a sample of {training.n_patches}" if data.sampled else "", comm.size,
             len(training.blocks))
    if comm.bcast(resume is not None):
        job.state.restore(training, resume)
    else:
        training.initialise()
    before = training.last_epoch
    training.train(lambda epoch: job.state.epoch_boundary(training, epoch))
    if training.last_epoch > before:
        job.state.save(training, "estimate", training.last_epoch)   # a preempted estimation pass resumes here
    if not job.estimate(job.state.metadata(training, data, started), overwrite, stop):
        raise StopRequested(f"stopped on request during the estimation pass; checkpoint {job.state.checkpoint_path}; "
                            "run the same command again to resume (the pass continues with the tiles not yet "
                            "written)")
    peak = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    if comm.rank != 0:
        return
    log.info("wrote %s (mean, variance %s) in %s; peak resident memory per rank %s MB", config.output.path,
             "×".join(map(str, data.grid.volume_shape)), format_seconds(time.perf_counter() - t0),
             "/".join(f"{p:.0f}" for p in peak))
    removed = ckpt_io.remove(job.state.checkpoint_path)
    if removed:
        log.info("removed the checkpoint(s) of this run: %s", ", ".join(str(p) for p in removed))
