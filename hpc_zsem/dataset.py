"""The input as the model sees it, on one rank: the image source, its patch grid, the intensity mapping and
the training set.

Training uses every patch of the image held in memory, or — with ``training.max_patches`` smaller than the
number of patches (mosaics) — a sample drawn uniformly across the mosaic/stack, of which each rank reads only
its own rows from the file. Either way the estimation pass (:mod:`hpc_zsem.estimation`) reads the image tile
by tile from the source, so a pixel does not depend on which of the two trained the model.

Random numbers are keyed by a patch's index in the whole file (``key_offset``): a section picked with
``input.section`` gets the same numbers as in a run over the whole stack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hpc_zsem.config import Config
from hpc_zsem.intensity import estimate_gain_offset, from_counts_mean_variance, to_counts
from hpc_zsem.io.regions import pixel_size_um
from hpc_zsem.parallel import STAGE_SAMPLE, block_rng
from hpc_zsem.patches import PatchGrid
from hpc_zsem.resources import open_input, trains_on_sample
from hpc_zsem.tiles import read_patches, sample_index

log = logging.getLogger("hpc_zsem")

GAIN_REGION = 1024   # the GPMM intensity mapping is estimated on a central region of at most this size


@dataclass(frozen=True)
class IntensityMap:
    """counts = (intensity − offset)/gain, negatives clipped, for count models (GPMM: ``counts`` is True, even
    for gain 1 and offset 0); SSSC works on the intensities as they are (``counts`` False)."""

    gain: float = 1.0
    offset: float = 0.0
    counts: bool = False

    def to_model_units(self, values: np.ndarray) -> np.ndarray:
        """Intensities → the model's units (counts for GPMM; unchanged for SSSC)."""
        if not self.counts:
            return values
        counts, clipped = to_counts(values, self.gain, self.offset)
        if clipped:
            log.warning("%d pixel values were negative after subtracting the offset %.4g and were clipped to 0",
                        clipped, self.offset)
        return counts

    def to_intensity(self, mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel mean and variance in model units → in input intensities (mean·gain + offset, variance·gain²)."""
        if not self.counts:
            return mean, variance
        return from_counts_mean_variance(mean, variance, self.gain, self.offset)


def intensity_map(config: Config, region: np.ndarray) -> IntensityMap:
    """The config's mapping: identity for SSSC; for GPMM ``input.gain``/``input.offset``, each estimated from
    the flat parts of ``region`` where the config leaves it null."""
    if config.model.name != "gpmm":
        return IntensityMap()
    gain, offset = config.input.gain, config.input.offset
    if gain is None or offset is None:
        est_gain, est_offset = estimate_gain_offset(region)
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


class InputData:
    """The config's input on this rank: ``source`` (read lazily), ``grid`` (its patches), ``intensity``, and the
    training set: ``train_ids`` (global patch indices) and :meth:`training_patches`."""

    def __init__(self, config: Config):
        self.config = config
        self.source = open_input(config)
        self.patch = (int(config.patches.size[0]), int(config.patches.size[1]))
        self.grid = PatchGrid(self.source.plane_shape, self.patch, config.patches.stride, self.source.n_sections)
        self.sampled = trains_on_sample(config, self.grid.n_patches)
        self.key_offset = (config.input.section or 0) * self.grid.per_section
        self.intensity = intensity_map(config, self._central_region())
        self.image: np.ndarray | None = None
        if self.sampled:
            self.train_ids = sample_index(self.source, int(config.training.max_patches or 0),
                                          block_rng(config.training.seed, STAGE_SAMPLE, 1, 0), self.patch,
                                          config.patches.stride)
        else:
            self.image = self.intensity.to_model_units(self._read_all())
            self.train_ids = np.arange(self.grid.n_patches)

    @property
    def where(self) -> str:
        """The input as named in messages: its path, and the section if one was picked."""
        section = self.config.input.section
        return self.config.input.path + ("" if section is None else f" section {section}")

    def training_patches(self, rows: np.ndarray) -> np.ndarray:
        """The training-set patches of the given rows, in model units (read from the file for a sample)."""
        if self.image is None:
            return self.intensity.to_model_units(read_patches(self.source, self.train_ids[rows], self.patch,
                                                              self.config.patches.stride))
        return self.grid.extract(self.image, self.train_ids[rows])

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
