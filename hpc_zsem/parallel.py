"""Everything MPI: the only module that imports mpi4py.

``get_comm()`` returns an ``MPIComm`` when the program runs on several ranks and a ``SerialComm`` otherwise
(a run without ``mpiexec`` is simply one rank; models and tests need no MPI). Both offer the few collectives
the pipeline needs, on float64 arrays and picklable objects:

- ``allreduce_stats`` sums a dict of arrays over ranks in ONE message (the sufficient statistics per epoch);
- ``reduce_sum`` sums arrays onto rank 0 (pixel accumulators);
- ``bcast`` / ``allgather`` for small objects; ``gather`` / ``scatter`` (rank 0) for per-block states of
  checkpoints;
- ``abort`` ends every rank with a message and an exit code.

Work is split in fixed global blocks of patches (``block_ranges``); each rank owns a contiguous run of whole
blocks (``shard``), the remainder going to the low ranks. The E-step's random numbers are keyed by global
patch index (``hpc_zsem.randomness``); ``block_rng`` keys the few global draws (initial Θ, samples) by
(seed, stage, epoch, block), so the result does not depend on the number of ranks.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import traceback
from types import ModuleType
from typing import Any

import numpy as np

STAGE_INIT, STAGE_TRAIN, STAGE_ESTIMATE, STAGE_PARAMS, STAGE_SAMPLE = range(5)


def block_ranges(n_items: int, block_size: int) -> list[tuple[int, int]]:
    """Fixed global blocks [start, stop) of ``block_size`` items (the last one shorter)."""
    return [(start, min(start + block_size, n_items)) for start in range(0, n_items, block_size)]


def shard(n_items: int, rank: int, size: int) -> range:
    """The contiguous indices of ``n_items`` that ``rank`` of ``size`` owns; the remainder goes to low ranks."""
    base, extra = divmod(n_items, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def block_rng(seed: int, stage: int, epoch: int, block: int) -> np.random.Generator:
    """Generator for one global draw at one (stage, epoch, block): identical on every rank."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, stage, epoch, block])))


def _flatten(stats: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(stats)
    return names, np.concatenate([np.asarray(stats[k], dtype=np.float64).ravel() for k in names])


def _unflatten(names: list[str], like: dict[str, np.ndarray], flat: np.ndarray) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for k in names:
        shape = np.shape(like[k])
        n = int(np.prod(shape))
        out[k] = flat[pos:pos + n].reshape(shape)
        pos += n
    return out


class SerialComm:
    """One rank, no MPI."""

    rank = 0
    size = 1

    def ranks_on_this_node(self) -> int:
        return 1

    def allreduce_stats(self, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}

    def reduce_sum(self, array: np.ndarray) -> np.ndarray | None:
        return array

    def bcast(self, obj: Any) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        if objs is None:
            raise ValueError("scatter: the root (rank 0) must give the list of objects")
        return objs[0]

    def barrier(self) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)


class MPIComm:
    """Several ranks over ``MPI.COMM_WORLD``."""

    def __init__(self, mpi_module):
        self._MPI = mpi_module
        self._comm = mpi_module.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def ranks_on_this_node(self) -> int:
        """How many ranks share this rank's node (collective: every rank calls it)."""
        node = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def allreduce_stats(self, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Σ over ranks of each array of ``stats``. Ranks may hold different keys (a rank without patches
        has no statistics): the union of keys is agreed first (a small allgather of names and shapes) and a
        missing key counts as zeros."""
        shapes = {}
        for part in self._comm.allgather({k: np.shape(v) for k, v in stats.items()}):
            shapes.update(part)
        full = {k: stats[k] if k in stats else np.zeros(shape) for k, shape in shapes.items()}
        names, flat = _flatten(full)
        total = np.empty_like(flat)
        self._comm.Allreduce(flat, total, op=self._MPI.SUM)
        return _unflatten(names, full, total)

    def reduce_sum(self, array: np.ndarray) -> np.ndarray | None:
        array = np.ascontiguousarray(array, dtype=np.float64)
        out = np.empty_like(array) if self.rank == 0 else None
        self._comm.Reduce(array, out, op=self._MPI.SUM, root=0)
        return out

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def scatter(self, objs: list[Any] | None) -> Any:
        return self._comm.scatter(objs, root=0)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, message: str, code: int = 1) -> None:
        print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)
        self._comm.Abort(code)


def default_threads(ranks_on_node: int) -> int:
    """Kernel threads per rank when none are asked for: SLURM's ``--cpus-per-task`` where it is set, else the
    CPUs this process may run on (its affinity: all of the node's, or what a scheduler or ``taskset`` allows)
    shared among the ranks on its node; at least 1."""
    cpus_per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus_per_task.isdigit() and int(cpus_per_task) > 0:
        return int(cpus_per_task)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, ranks_on_node))


def _mpi() -> ModuleType | None:
    """mpi4py's ``MPI`` module; None without mpi4py, or with mpi4py ≥ 4 but no MPI library ("cannot load MPI
    library")."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):
        return None
    return MPI


def get_comm() -> SerialComm | MPIComm:
    """The communicator of this run. Refuses N copies of a serial program: under SLURM with
    SLURM_NTASKS > 1 a world of size 1 means the launcher did not wire up MPI (no PMI)."""
    MPI = _mpi()
    size = MPI.COMM_WORLD.Get_size() if MPI is not None else 1
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if size == 1 and tasks > 1 and os.environ.get("SLURM_STEP_ID") is not None:
        raise SystemExit(f"hpc-zsem: SLURM started {tasks} tasks but MPI sees only 1 rank: the launcher has no "
                         "PMI support for this MPI (try `srun --mpi=pmi2` or `mpiexec`); refusing to compute "
                         f"the same job {tasks} times")
    return MPIComm(MPI) if size > 1 else SerialComm()


def install_abort_on_exception(comm: SerialComm | MPIComm) -> None:
    """An uncaught exception on any rank prints its traceback and aborts every rank (MPI would otherwise hang
    the job in the next collective). ``kill -USR2`` (or ``scancel --signal=USR2``) dumps every rank's stack."""
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    if comm.size == 1:
        return

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        comm.abort(f"uncaught exception, aborting all {comm.size} ranks:\n{text}", 1)

    sys.excepthook = hook


def limit_blas_threads(n: int = 1):
    """Pin BLAS to ``n`` threads per rank (several ranks with default BLAS threads run ~10× slower)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n)
