"""The training loop on one rank: variational EM over this rank's blocks of the training set.

Identical on every rank except for the blocks each rank owns::

    repeat { E-step on local blocks ─▶ allreduce statistics ─▶ M-step (same on every rank) ─▶ epoch boundary }

The per-rank stop request and checkpoint-due flags travel in the statistics every epoch allreduces anyway
(:attr:`Training.flags`), so all ranks agree on them without an extra message; what happens at an epoch
boundary (checkpoint, stop) is the caller's (:class:`hpc_zsem.runstate.RunState`). All randomness is keyed by
(seed, stage, epoch, global patch index), so a resumed run computes exactly what the uninterrupted run would
have, on any number of ranks.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpc_zsem.config import AUTO, Config
from hpc_zsem.dataset import InputData
from hpc_zsem.errors import InputError
from hpc_zsem.models import PatchModel, PatchSummary
from hpc_zsem.parallel import STAGE_INIT, STAGE_PARAMS, STAGE_SAMPLE, STAGE_TRAIN, block_ranges, block_rng, shard
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.units import format_seconds
from hpc_zsem.variational.kernel import map_in_order

log = logging.getLogger("hpc_zsem")

INIT_SAMPLE = 4096   # patches drawn (identically on every rank) for model initialisations that need a sample
STOP, TIME_DUE = "_stop_requested", "_checkpoint_due"   # control flags summed with the statistics
FROZEN_E_STEP_COST = 0.25   # seconds of a frozen-Θ E-step per patch relative to a training epoch (progress lines)


@dataclass
class Block:
    """A fixed block of training-set rows owned by this rank: the global indices of its patches, their
    data and their variational state."""

    index: int
    ids: np.ndarray
    Y: np.ndarray
    state: Any = None


@dataclass
class History:
    """Per-epoch progress, stored in the result file."""

    rows: dict[str, list[float]] = field(default_factory=lambda: {
        "epoch": [], "free_energy": [], "sigma2": [], "accepted": [], "seconds": []})

    def append(self, **values: float) -> None:
        for key, value in values.items():
            self.rows[key].append(float(value))


class Training:
    """EM on this rank's contiguous run of blocks of the training set; ``params`` is Θ (the same on every
    rank), ``history`` the per-epoch rows, ``flags`` the stop/checkpoint-due flags of the last allreduce."""

    def __init__(self, config: Config, comm, model: PatchModel, data: InputData):
        self.config, self.comm, self.model, self.data = config, comm, model, data
        all_blocks = block_ranges(len(data.train_ids), config.training.block_size)
        mine = shard(len(all_blocks), comm.rank, comm.size)        # a contiguous run of blocks
        first = all_blocks[mine[0]][0] if len(mine) else 0
        local_Y = data.training_patches(np.arange(first, all_blocks[mine[-1]][1] if len(mine) else 0))
        self.blocks = [Block(b, data.train_ids[slice(*all_blocks[b])],
                             local_Y[all_blocks[b][0] - first:all_blocks[b][1] - first]) for b in mine]
        self.n_patches = len(data.train_ids)          # the training set
        self.n_blocks = len(all_blocks)
        self.history = History()
        self.params: dict[str, np.ndarray] = {}
        self.stop: Any = None                 # a StopFlag (set by `hpc-zsem run`); truthy = stop requested
        self.checkpoint_due: Callable[[], bool] = lambda: False   # this rank's time-based checkpoint rule
        self.flags: dict[str, bool] = {}
        self._reported_allreduce = False

    def _patch_random(self, stage: int, epoch: int, block: Block) -> PatchRandom:
        return PatchRandom(self.config.training.seed, stage, epoch, block.ids + self.data.key_offset)

    def initialise(self) -> None:
        """Θ from global patch moments and a global patch sample (identical on every rank), then the
        per-block variational states."""
        local = [PatchSummary.from_patches(b.Y) for b in self.blocks]
        stats = self.comm.allreduce_stats({
            "n": np.array(float(sum(s.n for s in local))),
            "sum": sum((s.sum for s in local), np.zeros(self.data.grid.dim)),
            "sum_sq": sum((s.sum_sq for s in local), np.zeros(self.data.grid.dim)),
            "outer": sum((s.outer for s in local), np.zeros((self.data.grid.dim,) * 2))})
        summary = PatchSummary(int(stats["n"]), stats["sum"], stats["sum_sq"], stats["outer"])
        self._check_dynamic_range(summary, max((float(np.abs(b.Y).max()) for b in self.blocks if b.Y.size),
                                               default=0.0))
        seed = self.config.training.seed
        pick = block_rng(seed, STAGE_SAMPLE, 0, 0).choice(self.n_patches, min(INIT_SAMPLE, self.n_patches),
                                                          replace=False)
        sample = self.data.training_patches(np.sort(pick))
        self.params = self.model.init_params(summary, sample, block_rng(seed, STAGE_PARAMS, 0, 0))
        for b in self.blocks:
            b.state = self.model.init_block_state(b.Y, self.params, self._patch_random(STAGE_INIT, 0, b))

    def _check_dynamic_range(self, summary: PatchSummary, local_peak: float) -> None:
        """Degenerate inputs give a finite result, with a warning: constant (e.g. blank) training patches, or
        intensities whose variance overflows float32 results (clipped there). InputError for intensities
        whose squares overflow float64, where no finite result exists."""
        peak = max(self.comm.allgather(local_peak))
        if not np.isfinite(summary.sum_sq).all():
            raise InputError(f"{self.config.input.path}: intensities up to {peak:.3g} are too large to square in "
                             "float64; rescale the image (e.g. to 0..65535)")
        if not summary.variance.any():
            log.warning("%s: the training patches are constant (every pixel %.6g): nothing to denoise, the mean "
                        "image will equal the input and the variance image will be 0", self.data.where,
                        summary.mean[0])
        elif peak**2 > float(np.finfo(np.float32).max):
            log.warning("%s: intensities reach %.3g; variances above 3.4e38 do not fit the float32 result and are "
                        "clipped there (rescale the image for exact variances)", self.data.where, peak)

    def e_step(self, stage: int, epoch: int) -> dict[str, np.ndarray]:
        """One E-step over the local blocks; returns the globally summed statistics."""
        total: dict[str, np.ndarray] = {}
        steps = map_in_order(lambda b: self.model.e_step(b.Y, self.params, b.state,
                                                         self._patch_random(stage, epoch, b)), self.blocks)
        for b, (state, stats) in zip(self.blocks, steps):        # statistics added in block order
            b.state = state
            for key, value in stats.items():
                total[key] = total[key] + value if key in total else np.asarray(value, dtype=np.float64)
        return self._allreduce_with_flags(total)

    def _allreduce_with_flags(self, total: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Allreduce ``total`` together with this rank's stop / checkpoint-due flags (so every rank agrees on
        them without an extra message); the flags go to ``self.flags``, the sums are returned."""
        total[STOP] = np.array(1.0 if self.stop else 0.0)
        total[TIME_DUE] = np.array(1.0 if self.checkpoint_due() else 0.0)
        stats = self.comm.allreduce_stats(total)
        if len(stats) > 2 and not self._reported_allreduce:
            log.info("allreduce of %s bytes per epoch (%d statistics)", f"{8 * sum(v.size for v in stats.values()):,}",
                     len(stats))
            self._reported_allreduce = True
        self.flags = {key: bool(stats.pop(key) > 0) for key in (STOP, TIME_DUE)}
        return stats

    @property
    def last_epoch(self) -> int:
        """The last training epoch done (0 before the first)."""
        epochs = self.history.rows["epoch"]
        return int(epochs[-1]) if epochs else 0

    def converged(self) -> bool:
        """``training.epochs: auto``: True once the free energy per patch pixel has changed by less than
        ``stop_tolerance`` per epoch over the last ``stop_window`` epochs,
            |F_t − F_{t−w}| / (w · D) < tol,
        a function of the history only, so every rank, and a resumed run, decides alike."""
        t = self.config.training
        F = self.history.rows["free_energy"]
        if t.epochs != AUTO or len(F) <= t.stop_window:
            return False
        return abs(F[-1] - F[-1 - t.stop_window]) / (t.stop_window * self.data.grid.dim) < t.stop_tolerance

    def train(self, epoch_boundary: Callable[[int], None]) -> None:
        """EM epochs from the one after :attr:`last_epoch` until ``training.epochs`` (or, with ``auto``, until
        :meth:`converged` or ``max_epochs``); ``epoch_boundary(epoch)`` after each (checkpoints, stops)."""
        t = self.config.training
        epochs = t.epoch_limit
        for epoch in range(self.last_epoch + 1, epochs + 1):
            if self.converged():
                break
            t0 = time.perf_counter()
            stats = self.e_step(STAGE_TRAIN, epoch)
            sigma2 = self.model.noise_variance(self.params)
            self.params = self.model.m_step(self.params, stats)
            seconds = time.perf_counter() - t0
            free_energy = float(stats["free_energy"]) / float(stats["N"])
            accepted = float(stats.get("accepted", 0.0))
            self.history.append(epoch=epoch, free_energy=free_energy, sigma2=sigma2, accepted=accepted,
                                seconds=seconds)
            converged = self.converged()
            if epoch % self.config.logging.every_epochs == 0 or epoch == epochs or converged:
                self._progress(epoch, epochs, free_energy, sigma2, accepted, seconds)
            if converged:
                log.info("training.epochs auto: the free energy per patch pixel changed by less than %.3g per epoch "
                         "over the last %d epochs: training stops after epoch %d", t.stop_tolerance,
                         t.stop_window, epoch)
            epoch_boundary(epoch)
        if t.epochs == AUTO and self.last_epoch == epochs and not self.converged():
            log.warning("training.epochs auto: not converged after training.max_epochs = %d epochs (the free energy "
                        "still changes by more than training.stop_tolerance); raise max_epochs to train longer",
                        epochs)

    def _progress(self, epoch: int, epochs: int, free_energy: float, sigma2: float, accepted: float,
                  seconds: float) -> None:
        per_epoch = float(np.mean(self.history.rows["seconds"]))
        # the estimation pass: estimation.epochs frozen E-steps over every patch of the image, each about a
        # quarter of a training epoch (no statistics, no M-step; measured on the demo: 40 in 3 s vs 0.3 s/epoch)
        estimation = FROZEN_E_STEP_COST * self.config.estimation.epochs * self.data.grid.n_patches / self.n_patches
        left = per_epoch * (epochs - epoch + estimation)
        states = self.n_patches * (self.config.truncation.S if self.model.name == "sssc" else 1)
        sigma = f"sigma={np.sqrt(sigma2):.4g}" if np.isfinite(sigma2) else "sigma=n/a"
        log.info("epoch %d/%s  F/N=%.6g  %s  accepted=%d (%.2f%%)  %.2fs  %.0f patches/s  left ~%s",
                 epoch, f"{epochs} (auto)" if self.config.training.epochs == AUTO else epochs, free_energy, sigma,
                 accepted, 100.0 * accepted / states, seconds, self.n_patches / seconds, format_seconds(left))
