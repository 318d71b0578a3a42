"""The train and estimate loops: config → image → patches (this rank's shard) → EM → per-pixel mean/variance.

Identical on every rank except for the blocks of patches each rank owns::

    train:    repeat { E-step on local blocks ─▶ allreduce statistics ─▶ M-step (same on every rank) ─▶ checkpoint? }
    estimate: E-steps with Θ frozen (─▶ checkpoint?) ─▶ patch estimates ─▶ pixel accumulators ─▶ reduce to rank 0 ─▶ HDF5

Checkpoints (``hpc_zsem.io.checkpoint``) are written at epoch boundaries only: every ``checkpoint.every_epochs``
epochs, when ``checkpoint.every_seconds`` have passed on any rank, and when any rank got SIGUSR1/SIGTERM (then
the run stops with ``StopRequested``). The per-rank decisions travel in the statistics every epoch allreduces
anyway, so all ranks agree without an extra message. A resumed run continues at the epoch after the
checkpoint's and, since all randomness is keyed by (seed, stage, epoch, global patch index), computes exactly what the
uninterrupted run would have.
"""
from __future__ import annotations

import datetime
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpc_zsem import __version__
from hpc_zsem.config import AUTO, Config
from hpc_zsem.intensity import estimate_gain_offset, from_counts_mean_variance, to_counts
from hpc_zsem.io import checkpoint as ckpt_io
from hpc_zsem.io.checkpoint import Checkpoint
from hpc_zsem.io.images import file_checksum, resolve_input_path
from hpc_zsem.io.regions import open_source, pixel_size_um
from hpc_zsem.io.results import check_output_path, write_result
from hpc_zsem.io.volumes import VolumeWriter
from hpc_zsem.models import PatchModel, PatchSummary, build_model
from hpc_zsem.parallel import (STAGE_ESTIMATE, STAGE_INIT, STAGE_PARAMS, STAGE_SAMPLE, STAGE_TRAIN,
                               block_ranges, block_rng, shard)
from hpc_zsem.patches import PatchGrid, PixelAccumulator
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.resources import check_memory, estimate_memory_per_rank
from hpc_zsem.streaming import stream_tiles
from hpc_zsem.tiles import plan_tiles, read_patches, sample_index
from hpc_zsem.errors import InputError, OutputError
from hpc_zsem.signals import StopRequested

log = logging.getLogger("hpc_zsem")

INIT_SAMPLE = 4096   # patches drawn (identically on every rank) for model initialisations that need a sample
GAIN_REGION = 1024   # streaming runs estimate the GPMM intensity mapping on a central region of this size
_STOP, _TIME_DUE = "_stop_requested", "_checkpoint_due"   # control flags summed with the statistics


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


@dataclass(frozen=True)
class IntensityMap:
    """counts = (intensity − offset)/gain, negatives clipped, for count models (GPMM: ``counts`` is True, even
    for gain 1 and offset 0); SSSC works on the intensities as they are (``counts`` False)."""

    gain: float = 1.0
    offset: float = 0.0
    counts: bool = False


def _open(config: Config):
    i = config.input
    return open_source(i.path, i.section, crop=i.crop, downsample=i.downsample)


def input_geometry(config: Config) -> tuple[tuple[int, int], int]:
    """(plane shape, number of sections) of the input after crop/downsample, from its headers only."""
    with _open(config) as source:
        return source.plane_shape, source.n_sections


def memory_per_rank(config: Config, plane: tuple[int, int], n_sections: int, ranks: int) -> tuple[dict[str, int], int]:
    """The memory estimate of the busiest rank (``hpc_zsem.resources.estimate_memory_per_rank``) for this
    config on an input of ``n_sections`` planes of shape ``plane``, and the number of training patches:
    a sample of ``training.max_patches`` with tile-sized images when streaming, one section at a time with
    ``training.per_section``."""
    h, w = config.patches.size
    sections = 1 if config.training.per_section else n_sections
    grid = PatchGrid(plane, (h, w), config.patches.stride, sections)
    streaming = _streaming(config, grid.n_patches)
    n_train = min(grid.n_patches, config.training.max_patches or grid.n_patches)
    t = config.truncation
    estimate = estimate_memory_per_rank(
        n_patches_total=n_train, ranks=ranks, D=h * w, model=config.model.name, H=config.model.H, S=t.S,
        candidates_per_patch=t.parents * t.children * t.generations, C=config.model.C,
        block_size=config.training.block_size,
        image_pixels=int(np.prod(config.estimation.tile)) if streaming else sections * plane[0] * plane[1],
        parents=t.parents, mutation=t.mutation, crossover=t.crossover, full_psi=config.model.psi == "full")
    return estimate, n_train


def preflight(config: Config, overwrite: bool, ranks: int = 1) -> int:
    """Cheap checks before any heavy work (run on rank 0): output writable, input readable (headers only)
    and large enough, and the memory estimate within ``resources.max_memory_per_rank``. Returns the number
    of sections of the (cropped) input: 1 for a 2-D image."""
    check_output_path(config.output.path, overwrite)
    plane, n_sections = input_geometry(config)
    h, w = config.patches.size
    if h > plane[0] or w > plane[1]:
        raise InputError(f"{config.input.path}: the image ({plane[0]}×{plane[1]} after crop/downsample) is "
                         f"smaller than patches.size {[h, w]}")
    check_memory(memory_per_rank(config, plane, n_sections, ranks)[0], config.resources.max_memory_per_rank)
    return n_sections


def _streaming(config: Config, n_patches: int) -> bool:
    """Train on a sample and stream the estimation tile by tile (mosaics), or keep everything in memory."""
    return config.training.max_patches is not None and config.training.max_patches < n_patches


def _intensity_map(config: Config, image: np.ndarray) -> IntensityMap:
    if config.model.name != "gpmm":
        return IntensityMap()
    gain, offset = config.input.gain, config.input.offset
    if gain is None or offset is None:
        est_gain, est_offset = estimate_gain_offset(image)
        gain = est_gain if gain is None else gain
        offset = est_offset if offset is None else offset
        log.info("estimated intensity → counts mapping from flat regions: gain %.4g, offset %.4g", gain, offset)
    return IntensityMap(float(gain), float(offset), counts=True)


def output_pixel_size(config: Config) -> tuple[float, ...] | None:
    """The input's pixel size in µm ((Y, X) or (Z, Y, X)) scaled by ``input.downsample``; None if unknown."""
    size = pixel_size_um(config.input.path)
    if size is None:
        return None
    return tuple(size[:-2]) + tuple(v * config.input.downsample for v in size[-2:])


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Run:
    """One run of the pipeline on one rank of ``comm``."""

    def __init__(self, config: Config, comm):
        self.config = config
        self.comm = comm
        self.model: PatchModel = build_model(config)
        self.source = _open(config)
        patch = tuple(config.patches.size)
        self.grid = PatchGrid(self.source.plane_shape, patch, config.patches.stride, self.source.n_sections)
        self.streaming = _streaming(config, self.grid.n_patches)
        # Random numbers are keyed by the patch's index in the whole file: a section picked with input.section
        # gets the same numbers as in a run over the whole stack.
        self.key_offset = (config.input.section or 0) * self.grid.per_section
        self.noisy: np.ndarray | None = None
        if self.streaming:
            # Train on a sample drawn uniformly across the mosaic/stack; each rank reads only its share of it.
            self.intensity = _intensity_map(config, self._central_region())
            self.train_ids = sample_index(self.source, config.training.max_patches,
                                          block_rng(config.training.seed, STAGE_SAMPLE, 1, 0), patch,
                                          config.patches.stride)
        else:
            self.noisy = self._read_all()
            self.intensity = _intensity_map(config, self.noisy)
            self.image = self._to_model_units(self.noisy)
            self.train_ids = np.arange(self.grid.n_patches)
        all_blocks = block_ranges(len(self.train_ids), config.training.block_size)
        mine = shard(len(all_blocks), comm.rank, comm.size)        # a contiguous run of blocks
        first = all_blocks[mine[0]][0] if len(mine) else 0
        local_Y = self._training_patches(np.arange(first, all_blocks[mine[-1]][1] if len(mine) else 0))
        self.blocks = [Block(b, self.train_ids[slice(*all_blocks[b])],
                             local_Y[all_blocks[b][0] - first:all_blocks[b][1] - first]) for b in mine]
        self.n_patches = len(self.train_ids)          # the training set
        self.n_blocks = len(all_blocks)
        self.history = History()
        self.params: dict[str, np.ndarray] = {}
        # checkpoints and resume
        self.stop = None                      # a StopFlag (set by `hpc-zsem run`); truthy = stop requested
        self.checkpoint_path = ckpt_io.checkpoint_path(config)
        self.estimate_from = 1                # training goes on after the last epoch of the history
        self.elapsed_before = 0.0             # seconds spent by the runs this one continues
        self.resumed_from: str | None = None
        self._input_checksum: str | None = None
        self._last_checkpoint = time.monotonic()
        self._started = time.perf_counter()
        self._flags: dict[str, bool] = {}
        self._reported_allreduce = False

    def _read_all(self) -> np.ndarray:
        """The whole (cropped, downsampled) image, (Y, X) or (Z, Y, X) for a stack."""
        if self.source.ndim == 2:
            return self.source.read_section()
        return np.stack([self.source.read_section(z) for z in range(self.source.n_sections)])

    def _central_region(self) -> np.ndarray:
        """A central region of the first section (at most GAIN_REGION² pixels) for the intensity mapping."""
        Y, X = self.source.plane_shape
        hy, hx = min(Y, GAIN_REGION), min(X, GAIN_REGION)
        y0, x0 = (Y - hy) // 2, (X - hx) // 2
        return self.source.read(0 if self.source.ndim == 3 else None, y0, y0 + hy, x0, x0 + hx)

    def _to_model_units(self, values: np.ndarray) -> np.ndarray:
        """Intensities → the model's units (counts for GPMM; unchanged for SSSC)."""
        if not self.intensity.counts:
            return values
        counts, clipped = to_counts(values, self.intensity.gain, self.intensity.offset)
        if clipped:
            log.warning("%d pixel values were negative after subtracting the offset %.4g and were clipped to 0",
                        clipped, self.intensity.offset)
        return counts

    def _to_intensity(self, mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.intensity.counts:
            return mean, variance
        return from_counts_mean_variance(mean, variance, self.intensity.gain, self.intensity.offset)

    def _training_patches(self, rows: np.ndarray) -> np.ndarray:
        """The training-set patches of the given rows, in model units (read from the file when streaming)."""
        if self.streaming:
            return self._to_model_units(read_patches(self.source, self.train_ids[rows], tuple(self.config.patches.size),
                                                     self.config.patches.stride))
        return self.grid.extract(self.image, self.train_ids[rows])

    # ---------------------------------------------------------------- training
    def initialise(self) -> None:
        """Θ from global patch moments and a global patch sample (identical on every rank), then the
        per-block variational states."""
        local = [PatchSummary.from_patches(b.Y) for b in self.blocks]
        stats = self.comm.allreduce_stats({
            "n": np.array(float(sum(s.n for s in local))),
            "sum": sum((s.sum for s in local), np.zeros(self.grid.dim)),
            "sum_sq": sum((s.sum_sq for s in local), np.zeros(self.grid.dim))})
        summary = PatchSummary(int(stats["n"]), stats["sum"], stats["sum_sq"])
        self._check_dynamic_range(summary, max((float(np.abs(b.Y).max()) for b in self.blocks if b.Y.size),
                                               default=0.0))
        seed = self.config.training.seed
        pick = block_rng(seed, STAGE_SAMPLE, 0, 0).choice(self.n_patches, min(INIT_SAMPLE, self.n_patches), replace=False)
        sample = self._training_patches(np.sort(pick))
        self.params = self.model.init_params(summary, sample, block_rng(seed, STAGE_PARAMS, 0, 0))
        for b in self.blocks:
            b.state = self.model.init_block_state(b.Y, self.params,
                                                  PatchRandom(seed, STAGE_INIT, 0, b.ids + self.key_offset))

    def _check_dynamic_range(self, summary: PatchSummary, local_peak: float) -> None:
        """Degenerate inputs give a finite result, with a warning: constant (e.g. blank) training patches, or
        intensities whose variance overflows float32 results (clipped there). InputError for intensities
        whose squares overflow float64, where no finite result exists."""
        peak = max(self.comm.allgather(local_peak))
        where = self.config.input.path + ("" if self.config.input.section is None else
                                          f" section {self.config.input.section}")
        if not np.isfinite(summary.sum_sq).all():
            raise InputError(f"{self.config.input.path}: intensities up to {peak:.3g} are too large to square in "
                             "float64; rescale the image (e.g. to 0..65535)")
        if not summary.variance.any():
            log.warning("%s: the training patches are constant (every pixel %.6g): nothing to denoise, the mean "
                        "image will equal the input and the variance image will be 0", where, summary.mean[0])
        elif peak**2 > float(np.finfo(np.float32).max):
            log.warning("%s: intensities reach %.3g; variances above 3.4e38 do not fit the float32 result and are "
                        "clipped there (rescale the image for exact variances)", where, peak)

    def e_step(self, stage: int, epoch: int) -> dict[str, np.ndarray]:
        """One E-step over the local blocks; returns the globally summed statistics."""
        total: dict[str, np.ndarray] = {}
        for b in self.blocks:
            b.state, stats = self.model.e_step(b.Y, self.params, b.state,
                                               PatchRandom(self.config.training.seed, stage, epoch,
                                                           b.ids + self.key_offset))
            for key, value in stats.items():
                total[key] = total[key] + value if key in total else np.asarray(value, dtype=np.float64)
        return self._allreduce_with_flags(total)

    def refine(self, epoch: int) -> None:
        """One E-step with Θ frozen on the local blocks: the truncated sets improve, no statistics are made;
        only the stop/checkpoint flags are allreduced."""
        for b in self.blocks:
            b.state = self.model.refine(b.Y, self.params, b.state,
                                        [PatchRandom(self.config.training.seed, STAGE_ESTIMATE, epoch,
                                                     b.ids + self.key_offset)])
        self._allreduce_with_flags({})

    def _allreduce_with_flags(self, total: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Allreduce ``total`` together with this rank's stop / checkpoint-due flags (so every rank agrees on
        them without an extra message); the flags go to ``self._flags``, the sums are returned."""
        every_seconds = self.config.checkpoint.every_seconds
        total[_STOP] = np.array(1.0 if self.stop else 0.0)
        total[_TIME_DUE] = np.array(1.0 if every_seconds > 0 and
                                    time.monotonic() - self._last_checkpoint >= every_seconds else 0.0)
        stats = self.comm.allreduce_stats(total)
        if len(stats) > 2 and not self._reported_allreduce:
            log.info("allreduce of %s bytes per epoch (%d statistics)", f"{8 * sum(v.size for v in stats.values()):,}",
                     len(stats))
            self._reported_allreduce = True
        self._flags = {key: bool(stats.pop(key) > 0) for key in (_STOP, _TIME_DUE)}
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
        return abs(F[-1] - F[-1 - t.stop_window]) / (t.stop_window * self.grid.dim) < t.stop_tolerance

    def train(self) -> None:
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
            self._epoch_boundary("train", epoch)
        if t.epochs == AUTO and self.last_epoch == epochs and not self.converged():
            log.warning("training.epochs auto: not converged after training.max_epochs = %d epochs (the free energy "
                        "still changes by more than training.stop_tolerance); raise max_epochs to train longer",
                        epochs)

    def _progress(self, epoch: int, epochs: int, free_energy: float, sigma2: float, accepted: float,
                  seconds: float) -> None:
        per_epoch = float(np.mean(self.history.rows["seconds"]))
        left = per_epoch * (epochs - epoch + self.config.estimation.epochs + 1)
        states = self.n_patches * (self.config.truncation.S if self.model.name == "sssc" else 1)
        sigma = f"sigma={np.sqrt(sigma2):.4g}" if np.isfinite(sigma2) else "sigma=n/a"
        log.info("epoch %d/%s  F/N=%.6g  %s  accepted=%d (%.2f%%)  %.2fs  %.0f patches/s  left ~%s",
                 epoch, f"{epochs} (auto)" if self.config.training.epochs == AUTO else epochs, free_energy, sigma,
                 accepted, 100.0 * accepted / states, seconds,
                 self.n_patches / seconds, _format_seconds(left))

    # ---------------------------------------------------------------- estimation
    def estimate(self) -> tuple[np.ndarray, np.ndarray] | None:
        """E-steps with Θ frozen, then every patch's estimate merged per pixel; (mean, variance) on rank 0
        (in input intensity units), None elsewhere."""
        t0 = time.perf_counter()
        for epoch in range(self.estimate_from, self.config.estimation.epochs + 1):
            self.refine(epoch)
            self._epoch_boundary("estimate", epoch)
        accumulator = PixelAccumulator(self.grid.volume_shape)
        for b in self.blocks:
            accumulator.add(self.grid, b.ids, b.Y, self.model.estimate(b.Y, self.params, b.state))
        sums = self.comm.reduce_sum(accumulator.sums)
        log.info("estimation: %d E-steps with frozen parameters and the merge took %.1fs",
                 self.config.estimation.epochs, time.perf_counter() - t0)
        if sums is None:
            return None
        return self._to_intensity(*PixelAccumulator.finish(sums, self.image))

    def estimate_patches(self, Y: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Clean-patch estimates with Θ frozen for patches seen for the first time (streaming): a fresh
        truncated set, ``estimation.epochs`` evolutionary E-steps, then the posterior-predictive mean. Every
        random number is keyed by the global patch index, so a patch gets the same estimate in any tile."""
        seed, size = self.config.training.seed, self.config.training.block_size
        ids = ids + self.key_offset
        out = np.empty_like(Y)
        for start in range(0, len(Y), size):
            part = slice(start, start + size)
            state = self.model.init_block_state(Y[part], self.params, PatchRandom(seed, STAGE_INIT, 0, ids[part]),
                                                [PatchRandom(seed, STAGE_ESTIMATE, epoch, ids[part])
                                                 for epoch in range(1, self.config.estimation.epochs + 1)])
            out[part] = self.model.estimate(Y[part], self.params, state)
        return out

    def estimate_streaming(self, metadata: dict[str, Any], overwrite: bool) -> bool:
        """The estimation pass tile by tile, written by rank 0 into chunked volumes; False if stopped."""
        cfg = self.config
        per = self.grid.per_section
        tiles = plan_tiles(self.source.shape, tuple(cfg.estimation.tile), tuple(cfg.patches.size), cfg.patches.stride)
        writer, written = None, set()
        if self.comm.rank == 0:
            # A pass stopped on request left its tiles in <output>.partial; the same run continues it.
            key = f"{__version__} {cfg.hash()} {self.input_checksum()}"
            writer = VolumeWriter(cfg.output.path, self.source.shape, element_size_um=output_pixel_size(cfg),
                                  overwrite=overwrite, resume_key=key)
            written = {t.index for t in tiles if (t.z, t.y0, t.y1, t.x0, t.x1) in writer.written}
            log.info("estimation: %d tiles of up to %d×%d pixels over %s%s", len(tiles), *cfg.estimation.tile,
                     "×".join(map(str, self.source.shape)),
                     f"; {len(written)} were written before the stop, {len(tiles) - len(written)} to go"
                     if written else "")
        written = self.comm.bcast(written)
        stopped = False
        try:
            done = stream_tiles(
                self.comm, self.source, [t for t in tiles if t.index not in written],
                lambda Y, ids, z: self.estimate_patches(Y, ids + (z or 0) * per),
                tuple(cfg.patches.size), cfg.patches.stride, writer.write if writer else None,
                transform=self._to_model_units if self.intensity.counts else None,
                finish=self._to_intensity, stop=self.stop)
            stopped = not done
            if writer is not None and done:
                writer.set_params(self.params)
                writer.set_history(self.history.rows)
                writer.set_metadata(metadata)
                writer.close()
        except OSError as exc:   # e.g. a full disk: nothing is renamed into place, checkpoints stay
            raise OutputError(f"{cfg.output.path}: cannot write the result ({exc}); nothing was replaced") from None
        finally:
            if writer is not None and stopped:
                writer.suspend()        # stopped on request: keep the written tiles for the resumed run
            elif writer is not None:
                writer.abort()          # removes the temporary file unless close() renamed it into place
        return done

    # ---------------------------------------------------------------- checkpoints
    def input_checksum(self) -> str:
        if self._input_checksum is None:
            self._input_checksum = file_checksum(self.config.input.path)
        return self._input_checksum

    def geometry(self) -> dict[str, Any]:
        return {"image_shape": list(self.grid.volume_shape), "patch_size": list(self.config.patches.size),
                "stride": self.config.patches.stride, "n_patches": self.n_patches,
                "block_size": self.config.training.block_size}

    def _epoch_boundary(self, stage: str, epoch: int) -> None:
        """Write a checkpoint if one is due (on every rank alike: the flags were allreduced); stop if asked."""
        every = self.config.checkpoint.every_epochs
        stop = self._flags.get(_STOP, False)
        if stop or self._flags.get(_TIME_DUE, False) or (every > 0 and epoch % every == 0):
            self.save_checkpoint(stage, epoch)
        if stop:
            raise StopRequested(f"stopped on request after {stage} epoch {epoch}; checkpoint "
                                f"{self.checkpoint_path}; run the same command again to resume")

    def save_checkpoint(self, stage: str, epoch: int) -> None:
        """Gather every block's state to rank 0 and write the checkpoint there (collective). A failed write is
        logged and the run goes on (the previous checkpoint stays valid)."""
        t0 = time.perf_counter()
        gathered = self.comm.gather([(b.index, b.state) for b in self.blocks])
        ok = True
        if self.comm.rank == 0:
            try:
                states = _assemble_states(gathered, self.n_blocks)
                rows = self.history.rows
                free_energy = rows["free_energy"][-1] if rows.get("free_energy") else float("nan")
                ckpt = Checkpoint(
                    stage=stage, epoch=epoch, params=self.params, history=rows, states=states,
                    config_yaml=self.config.to_yaml(), config_hash=self.config.hash(),
                    input_path=str(resolve_input_path(self.config.input.path)), input_checksum=self.input_checksum(),
                    geometry=self.geometry(), model=self.model.name, ranks=self.comm.size,
                    elapsed_seconds=self.elapsed_before + time.perf_counter() - self._started,
                    version=__version__, free_energy=free_energy)
                size = ckpt_io.write_checkpoint(self.checkpoint_path, ckpt)
                log.info("checkpoint %s (%s epoch %d): %.1f MB in %.2fs", self.checkpoint_path,
                         "training" if stage == "train" else "estimation", epoch, size / 2**20,
                         time.perf_counter() - t0)
            except OSError as exc:
                ok = False
                log.error("writing the checkpoint %s failed (%s); the previous one is kept",
                          self.checkpoint_path, exc)
        self.comm.bcast(ok)        # no rank goes on (or exits) before rank 0 has finished writing
        self._last_checkpoint = time.monotonic()

    def restore(self, ckpt: Checkpoint | None) -> None:
        """Continue from ``ckpt`` (held by rank 0; None elsewhere), written on any number of ranks: Θ, the
        history and the position go to every rank, each block's state to the rank that owns it now."""
        head: tuple[str, Any] = ("ok", None)
        if self.comm.rank == 0:
            mismatch = [f"{k}: {ckpt.geometry.get(k)!r} in the checkpoint, {v!r} now"
                        for k, v in self.geometry().items() if ckpt.geometry.get(k) != v]
            if mismatch:
                head = ("error", f"{ckpt.path}: the checkpoint's geometry differs: " + "; ".join(mismatch))
            else:
                head = ("ok", {"stage": ckpt.stage, "epoch": ckpt.epoch, "params": ckpt.params,
                               "history": ckpt.history, "elapsed": ckpt.elapsed_seconds,
                               "from": f"{ckpt.path} at {ckpt.position} (written by {ckpt.ranks} rank(s), "
                                       f"{ckpt.created})"})
        status, info = self.comm.bcast(head)
        if status == "error":
            raise InputError(info)
        parts = None
        if self.comm.rank == 0:
            all_blocks = block_ranges(self.n_patches, self.config.training.block_size)
            parts = [[None if ckpt.states is None else ckpt.states[slice(*all_blocks[b])]
                      for b in shard(self.n_blocks, r, self.comm.size)] for r in range(self.comm.size)]
        mine = self.comm.scatter(parts)
        for block, state in zip(self.blocks, mine):
            block.state = state
        self.params = {k: np.array(v, dtype=np.float64) for k, v in info["params"].items()}
        self.history = History(rows={k: [float(x) for x in v] for k, v in info["history"].items()})
        self.estimate_from = info["epoch"] + 1 if info["stage"] == "estimate" else 1
        self.elapsed_before = info["elapsed"]
        self.resumed_from = info["from"]
        if ckpt is not None:
            self._input_checksum = ckpt.input_checksum       # verified equal to the input's before resuming
        log.info("resuming from %s", self.resumed_from)

    def metadata(self, started: str, seconds: float) -> dict[str, Any]:
        c = self.config
        return {"version": __version__, "model": c.model.name, "config": c.to_yaml(), "config_hash": c.hash(),
                "created": started, "runtime_seconds": seconds, "ranks": self.comm.size, "seed": c.training.seed,
                "input_path": str(resolve_input_path(c.input.path)), "input_checksum": self.input_checksum(),
                "patch_size": list(c.patches.size), "n_patches": self.grid.n_patches,
                "n_training_patches": self.n_patches, "axes": "YX" if self.grid.sections == 1 else "ZYX",
                "intensity_gain": self.intensity.gain, "intensity_offset": self.intensity.offset,
                "resumed_from": self.resumed_from}


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


def run(config: Config, comm, overwrite: bool = False, resume: Checkpoint | None = None, stop=None,
        input_checksum: str | None = None) -> None:
    """Train, estimate and write the result file (rank 0). Expected errors raise ``HpcZsemError``.

    ``resume`` (on rank 0; see ``hpc_zsem.io.checkpoint.find_resumable``) continues a checkpointed run;
    ``stop`` is a flag (``hpc_zsem.signals.StopFlag``) that, once truthy on any rank, makes every rank write a
    checkpoint at the next epoch boundary and raise ``StopRequested``. After the result is written the
    checkpoints are deleted. ``input_checksum`` spares re-reading the input for its checksum when the caller
    has it."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    job = Run(config, comm)
    job.stop = stop
    job._started = t0
    job._input_checksum = input_checksum
    where = config.input.path + ("" if config.input.section is None else f" section {config.input.section}")
    log.info("hpc-zsem %s: %s on %s (%s pixels), %d patches of %d×%d%s, %d rank(s), %d local block(s)",
             __version__, config.model.name, where, "×".join(map(str, job.grid.volume_shape)),
             job.grid.n_patches, *config.patches.size,
             f", training on a sample of {job.n_patches}" if job.streaming else "", comm.size, len(job.blocks))
    if comm.bcast(resume is not None):
        job.restore(resume)
    else:
        job.initialise()
    before = job.last_epoch
    job.train()
    if job.streaming:
        if job.last_epoch > before:
            job.save_checkpoint("train", job.last_epoch)   # a preempted estimation pass resumes here
        metadata = job.metadata(started, job.elapsed_before + time.perf_counter() - t0)
        if not job.estimate_streaming(metadata, overwrite):
            raise StopRequested(f"stopped on request during the estimation pass; checkpoint {job.checkpoint_path}; "
                                "run the same command again to resume (the pass continues with the tiles not yet "
                                "written)")
    else:
        merged = job.estimate()                     # (mean, variance) on rank 0, None elsewhere
        if merged is not None:
            write_result(config.output.path, mean=merged[0], variance=merged[1], noisy=job.noisy,
                         params=job.params, history=job.history.rows,
                         metadata=job.metadata(started, job.elapsed_before + time.perf_counter() - t0),
                         overwrite=overwrite)
    peak = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    if comm.rank != 0:
        return
    log.info("wrote %s (mean, variance %s) in %s; peak resident memory per rank %s MB", config.output.path,
             "×".join(map(str, job.grid.volume_shape)), _format_seconds(time.perf_counter() - t0),
             "/".join(f"{p:.0f}" for p in peak))
    removed = ckpt_io.remove(job.checkpoint_path)
    if removed:
        log.info("removed the checkpoint(s) of this run: %s", ", ".join(str(p) for p in removed))
