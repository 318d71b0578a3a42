"""The estimation pass — the one way from a trained model to the mean and variance images.

    tiles ─▶ ranks ─▶ per patch: fresh truncated set, ``estimation.epochs`` E-steps with Θ frozen, estimate
          ─▶ pixels merged per tile core ─▶ result store (HDF5 via rank 0, or OME-Zarr by every rank)

Every image — held in memory for training or a mosaic trained on a sample — is estimated tile by tile
(``estimation.tile``; :mod:`hpc_zsem.streaming`). A patch's estimate depends only on Θ and its global index
(every random number is keyed by it), so the pixels are the same for any tiling, any rank count, and whether
training used every patch or a sample. A pass stopped on request leaves its finished tiles in the store's
partial file; the same run continues with the others.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hpc_zsem.config import Config
from hpc_zsem.dataset import InputData, output_pixel_size
from hpc_zsem.errors import OutputError
from hpc_zsem.io.stores import open_result_store
from hpc_zsem.models import PatchModel
from hpc_zsem.parallel import STAGE_ESTIMATE, STAGE_INIT
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.streaming import stream_tiles
from hpc_zsem.tiles import plan_tiles
from hpc_zsem.variational.kernel import map_in_order

log = logging.getLogger("hpc_zsem")


def estimation_state(config: Config, model: PatchModel, params: dict[str, np.ndarray], Y: np.ndarray,
                     ids: np.ndarray) -> np.ndarray:
    """The state from which the patches ``Y`` with global indices ``ids`` are estimated under the frozen Θ
    ``params``: a fresh truncated set per patch (``model.init_block_state``) improved by ``estimation.epochs``
    evolutionary E-steps, every random number keyed by the patch's global index."""
    seed = config.training.seed
    return model.init_block_state(Y, params, PatchRandom(seed, STAGE_INIT, 0, ids),
                                  [PatchRandom(seed, STAGE_ESTIMATE, epoch, ids)
                                   for epoch in range(1, config.estimation.epochs + 1)])


def estimate_patches(config: Config, model: PatchModel, params: dict[str, np.ndarray], Y: np.ndarray,
                     ids: np.ndarray) -> np.ndarray:
    """Clean-patch estimates of the patches ``Y`` with global indices ``ids`` under the frozen Θ ``params``:
    from ``estimation_state``, the posterior-predictive mean E[y | y_n] = W⟨s⊙z⟩_n, in blocks of
    ``training.block_size`` (whole blocks on the kernel threads)."""
    size = config.training.block_size
    out = np.empty_like(Y)

    def estimate(part: slice) -> np.ndarray:
        return model.estimate(Y[part], params, estimation_state(config, model, params, Y[part], ids[part]))

    parts = [slice(start, start + size) for start in range(0, len(Y), size)]
    for part, estimates in zip(parts, map_in_order(estimate, parts)):
        out[part] = estimates
    return out


def estimation_pass(config: Config, comm, data: InputData, model: PatchModel, params: dict[str, np.ndarray],
                    history: dict[str, list[float]], metadata: dict[str, Any], *, overwrite: bool,
                    resume_key: str | None, stop: Any = None) -> bool:
    """Estimate every tile of the input and write the result store of ``output.path`` with Θ, the training
    history and ``metadata`` (collective; ``resume_key`` on rank 0 names the run whose partial store may be
    continued). Returns False if stopped on request (the finished tiles stay for the resumed run)."""
    patch = data.patch
    tiles = plan_tiles(data.source.shape, config.estimation.tile, patch, config.patches.stride)
    store = open_result_store(comm, config.output.path, data.source.shape, element_size_um=output_pixel_size(config),
                              overwrite=overwrite, resume_key=resume_key, tile=config.estimation.tile,
                              extra=() if data.sampled else ("input",))   # mosaics: no copy of the input
    written = {t.index for t in tiles if (t.z, t.y0, t.y1, t.x0, t.x1) in store.written}
    if comm.rank == 0:
        log.info("estimation: %d tiles of up to %d×%d pixels over %s%s", len(tiles), *config.estimation.tile,
                 "×".join(map(str, data.source.shape)),
                 f"; {len(written)} were written before the stop, {len(tiles) - len(written)} to go"
                 if written else "")
    per_section = data.grid.per_section
    stopped = False
    try:
        done = stream_tiles(
            comm, data.source, [t for t in tiles if t.index not in written],
            lambda Y, ids, z: estimate_patches(config, model, params, Y,
                                               ids + (z or 0) * per_section + data.key_offset),
            patch, config.patches.stride, None,
            transform=data.intensity.to_model_units if data.intensity.counts else None,
            finish=data.intensity.to_intensity, stop=stop, store=store)
        stopped = not done
        if done:
            store.set_params(params)
            store.set_history(history)
            store.set_metadata(metadata)
            store.close()
    except OSError as exc:   # e.g. a full disk: nothing is renamed into place, checkpoints stay
        raise OutputError(f"{config.output.path}: cannot write the result ({exc}); nothing was replaced") from None
    finally:
        if stopped:
            store.suspend()         # stopped on request: keep the written tiles for the resumed run
        else:
            store.abort()           # removes the temporary store unless close() renamed it into place
    return done
