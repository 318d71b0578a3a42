"""Memory per rank, estimated before any heavy work starts, and the ``resources.max_memory_per_rank`` check.

The check compares the estimate with ``resources.max_memory_per_rank`` or, where that is null, with
:func:`default_memory_limit`: the memory of this machine, of its SLURM allocation or of its cgroup (the
smallest that is known), shared by the MPI ranks on this node.

:func:`estimate_memory_per_rank` returns bytes by component for the *busiest* rank (rank 0: blocks of
``training.block_size`` patches are dealt out contiguously with the remainder to the low ranks, and rank 0
also receives the reduced pixel sums):

``patches``             the rank's patch data, float64: n_rank · D · 8
``truncated_sets``      SSSC: the rank's K_n, bit-packed: n_rank · S · ⌈H/64⌉ · 8
``estep_temporaries``   SSSC: the peak of one E-step on one block (see below), times the blocks in flight
                        (one per kernel thread)
``gpmm_temporaries``    GPMM: (N_block × C) float64 arrays of one E-step: N_block · C · 64
``accumulators``        count, Σ(ŷ−y), Σ(ŷ−y)² per pixel in float64, plus the reduced copy on rank 0: 48 · pixels
``image``               the input image as float64 (GPMM also keeps the count image): 8 (16) · pixels
``total``               the sum of the above (a slight over-estimate: training temporaries and the merge
                        accumulators never coexist)

SSSC E-step temporaries — how the constants were measured
    One ``SSSC.e_step`` on one block (the compiled kernel of :mod:`hpc_zsem.variational.kernel`), under
    ``tracemalloc``, peak minus the memory held before the call (:func:`measure_peak`). The kernel works patch
    by patch in fixed per-thread buffers, so the peak no longer depends on the number of active units; per
    patch of a block (c = parents · children · generations children per patch):
        16·H + 24·S + 8·S·⌈H/64⌉ + 16·c   (B = Y·W, the log-joints, the new sets, the children's scores)
        + 8·c·H with ``mutation: sparse`` (flip probabilities), + 8·parents·H with crossover (the parents' bits)
    and per block 8·H²·(3 + 4·m) (the Gram matrix and the state-term caches; m = 1 for diagonal Ψ, 3 for full).
    Within about 10 % of the measured peak on N_block ∈ {512, 1024}, H ∈ {48, 64, 256}, S ∈ {16, 60}.

GPMM E-step temporaries: ``_posterior`` and the statistics allocate ≈ 7 float64 arrays of N_block × C
(measured 57.4 B per patch and class for N ∈ {1024, 2048}, C ∈ {100, 1000}); 64 B is used.
"""
from __future__ import annotations

import os
import re
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

from hpc_zsem.config import Config
from hpc_zsem.errors import ConfigError
from hpc_zsem.io.regions import ImageSource, open_source
from hpc_zsem.patches import PatchGrid
from hpc_zsem.units import format_bytes

KEY = "resources.max_memory_per_rank"

#: GPMM bytes per (patch of a block, class)
GPMM_BYTES_PER_PATCH_CLASS = 64
#: per pixel: own sums (3 float64) + the reduced sums on rank 0 (3 float64)
ACCUMULATOR_BYTES_PER_PIXEL = 48

COMPONENTS = ("patches", "truncated_sets", "estep_temporaries", "gpmm_temporaries", "accumulators", "image")
_LABELS = {"patches": "patches", "truncated_sets": "truncated sets", "estep_temporaries": "E-step temporaries",
           "gpmm_temporaries": "GPMM temporaries", "accumulators": "pixel accumulators", "image": "image"}


class MemoryEstimate(dict):
    """A ``dict[str, int]`` of bytes by component (and ``"total"``) that remembers the arguments it was
    computed from (``inputs``), so that :func:`check_memory` can work out how many ranks would fit."""

    inputs: dict[str, Any]


def _patches_on_busiest_rank(n_patches_total: int, ranks: int, block_size: int) -> int:
    n_blocks = -(-n_patches_total // block_size)
    blocks = -(-n_blocks // max(1, ranks))
    return min(n_patches_total, blocks * block_size)


def estimate_memory_per_rank(n_patches_total: int, ranks: int, D: int, model: str, H: int, S: int,
                             candidates_per_patch: int, C: int, block_size: int, image_pixels: int,
                             *, tile_pixels: int | None = None, parents: int = 0, mutation: str = "random",
                             crossover: bool = False, full_psi: bool = False, threads: int = 1) -> MemoryEstimate:
    """Bytes by component on the busiest rank (see the module docstring) and ``"total"``; with ``threads`` kernel
    threads per rank as many blocks are in flight at once, each with its E-step temporaries.

    ``candidates_per_patch`` = parents · children · generations (the children scored per patch and E-step);
    ``parents``, ``mutation``, ``crossover`` and ``full_psi`` as in the config; ``image_pixels`` the image held in
    memory for training (0 when training reads a sample from the file), ``tile_pixels`` one tile of the
    estimation pass (default: ``image_pixels``, the image as one tile). Arguments that do not apply to ``model``
    ("sssc" or "gpmm") are ignored."""
    if model not in ("sssc", "gpmm"):
        raise ValueError(f"model must be 'sssc' or 'gpmm', got {model!r}")
    block_size = max(1, int(block_size))
    n_rank = _patches_on_busiest_rank(int(n_patches_total), int(ranks), block_size)
    block = min(block_size, n_rank)
    in_flight = max(1, min(int(threads), -(-n_rank // block))) if n_rank else 1
    out = dict.fromkeys(COMPONENTS, 0)
    out["patches"] = n_rank * D * 8
    if model == "sssc":
        words = -(-H // 64)
        c = candidates_per_patch
        out["truncated_sets"] = n_rank * S * words * 8
        per_patch = 16 * H + 24 * S + 8 * S * words + 16 * c
        per_patch += (8 * c * H if mutation == "sparse" else 0) + (8 * parents * H if crossover else 0)
        out["estep_temporaries"] = in_flight * (block * per_patch + 8 * H * H * (3 + 4 * (3 if full_psi else 1)))
    else:
        out["gpmm_temporaries"] = in_flight * block * C * GPMM_BYTES_PER_PATCH_CLASS
    out["accumulators"] = (image_pixels if tile_pixels is None else tile_pixels) * ACCUMULATOR_BYTES_PER_PIXEL
    out["image"] = image_pixels * (16 if model == "gpmm" else 8)
    out["total"] = sum(out[c] for c in COMPONENTS)
    result = MemoryEstimate((key, int(value)) for key, value in out.items())
    result.inputs = dict(n_patches_total=n_patches_total, ranks=ranks, D=D, model=model, H=H, S=S,
                         candidates_per_patch=candidates_per_patch, C=C, block_size=block_size,
                         image_pixels=image_pixels, tile_pixels=tile_pixels, parents=parents, mutation=mutation,
                         crossover=crossover, full_psi=full_psi, threads=threads)
    return result


def ranks_needed(estimate: MemoryEstimate, limit_bytes: int) -> int | None:
    """The smallest rank count whose busiest rank fits ``limit_bytes``; None if no rank count does (the parts
    that do not shrink with more ranks — image, accumulators, one block's temporaries — already exceed it)."""
    inputs = dict(estimate.inputs)
    n_blocks = max(1, -(-int(inputs["n_patches_total"]) // int(inputs["block_size"])))

    def fits(ranks: int) -> bool:
        return estimate_memory_per_rank(**{**inputs, "ranks": ranks})["total"] <= limit_bytes

    if not fits(n_blocks):
        return None
    lo, hi = 1, n_blocks          # total is non-increasing in ranks: binary search the first that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


#: cgroup limits at or above this mean "no limit" (cgroup v1 writes 2**63 rounded down to a page)
_UNLIMITED = 2**60
#: environment variables in which MPI launchers give the number of ranks on this node
_LOCAL_RANKS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


class MemoryLimit(NamedTuple):
    """The per-rank limit of :func:`default_memory_limit` and where it comes from."""

    per_rank: int
    node: int
    source: str
    ranks_on_node: int


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine; None where the OS does not say."""
    try:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return page * pages if page > 0 and pages > 0 else None      # -1: the OS does not know


def _positive_int(text: str | None) -> int | None:
    """The value of an environment variable that should hold a positive integer; None if it does not."""
    return int(text) if text and text.strip().isdigit() and int(text) > 0 else None


def slurm_memory(env: Mapping[str, str]) -> tuple[int, str] | None:
    """Bytes of this node's SLURM allocation and the variable(s) it was read from: ``SLURM_MEM_PER_NODE``, or
    ``SLURM_MEM_PER_CPU`` × ``SLURM_CPUS_ON_NODE`` (SLURM gives MiB); None outside SLURM, or for 0 (the whole
    node)."""
    per_node = _positive_int(env.get("SLURM_MEM_PER_NODE"))
    if per_node:
        return per_node * 2**20, "SLURM_MEM_PER_NODE"
    per_cpu, cpus = _positive_int(env.get("SLURM_MEM_PER_CPU")), _positive_int(env.get("SLURM_CPUS_ON_NODE"))
    if per_cpu and cpus:
        return per_cpu * cpus * 2**20, "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE"
    return None


def _cgroup_files(root: Path, membership: Path) -> list[Path]:
    """The memory limit files that may apply to this process: the root ones and those of its cgroup and its
    ancestors (v2 ``memory.max``, v1 ``memory/…/memory.limit_in_bytes``)."""
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        parts = [p for p in path.split("/") if p]
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        files += [base.joinpath(*parts[:depth]) / name for depth in range(1, len(parts) + 1)]
    return files


def cgroup_memory(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes of the tightest cgroup memory limit on this process (v1 or v2); None if none is set or readable."""
    limits = []
    for file in _cgroup_files(root, membership):
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits, default=None)


def ranks_on_this_node(env: Mapping[str, str]) -> int:
    """MPI ranks sharing this node as the launcher says (MPICH/Hydra, Open MPI, or srun's
    ``SLURM_STEP_TASKS_PER_NODE`` for the first node, where rank 0 runs); 1 where none says."""
    for name in _LOCAL_RANKS:
        ranks = _positive_int(env.get(name))
        if ranks:
            return ranks
    match = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return max(1, int(match.group())) if match else 1


def default_memory_limit(env: Mapping[str, str] | None = None) -> MemoryLimit | None:
    """The limit per rank used when ``resources.max_memory_per_rank`` is null: the smallest of this machine's
    physical memory, its SLURM allocation and its cgroup limit, divided by the ranks on this node; None when
    none of them is known."""
    env = os.environ if env is None else env
    sizes = [(physical_memory(), "physical memory of this machine"), (cgroup_memory(), "cgroup memory limit")]
    slurm = slurm_memory(env)
    if slurm is not None:
        sizes.append((slurm[0], f"SLURM allocation, {slurm[1]}"))
    known = [(size, source) for size, source in sizes if size]
    if not known:
        return None
    node, source = min(known)
    ranks = ranks_on_this_node(env)
    return MemoryLimit(node // ranks, node, source, ranks)


def check_memory(estimate: dict[str, int], limit_bytes: int | None) -> None:
    """Raise a one-line ConfigError when ``estimate["total"]`` exceeds ``limit_bytes``; None = the
    :func:`default_memory_limit` (no check where that is unknown)."""
    default = default_memory_limit() if limit_bytes is None else None
    if default is not None:
        limit_bytes = default.per_rank
    if limit_bytes is None or estimate["total"] <= limit_bytes:
        return
    parts = ", ".join(f"{_LABELS.get(c, c)} {format_bytes(estimate[c])}"
                      for c in COMPONENTS if estimate.get(c))
    model = getattr(estimate, "inputs", {}).get("model", "sssc")
    smaller = "a smaller S/H" if model == "sssc" else "a smaller C"
    head = (f"{KEY}: the run needs about {format_bytes(estimate['total'])} per rank ({parts}) "
            f"but the limit is {format_bytes(limit_bytes)}")
    spread = override = ""
    if default is not None:
        head += (f" per rank ({format_bytes(default.node)} {default.source} / {default.ranks_on_node} rank(s) "
                 f"on this node, as {KEY} is null)")
        spread = f" with at most {default.ranks_on_node} per node"
        override = f"; or set {KEY} if the estimate is too high"
    if not isinstance(estimate, MemoryEstimate):
        fix = f"use more ranks{spread} or {smaller}"
    elif (needed := ranks_needed(estimate, limit_bytes)) is not None:
        fix = f"use at least {needed} ranks{spread} or {smaller}"
    else:
        fix = (f"more ranks cannot make it fit: use {smaller}, a smaller training.block_size, "
               "or a smaller image (input.crop / input.downsample)")
    raise ConfigError(f"{head}; {fix}{override}")


def open_input(config: Config) -> ImageSource:
    """The config's input as an image source (crop, downsample and section applied; headers read only)."""
    i = config.input
    return open_source(i.path, i.section, crop=i.crop, downsample=i.downsample)


def input_geometry(config: Config) -> tuple[tuple[int, int], int]:
    """(plane shape, number of sections) of the input after crop/downsample, from its headers only."""
    with open_input(config) as source:
        return source.plane_shape, source.n_sections


def trains_on_sample(config: Config, n_patches: int) -> bool:
    """Train on a sample of ``training.max_patches`` read from the file (mosaics), or on every patch of the
    image held in memory."""
    return config.training.max_patches is not None and config.training.max_patches < n_patches


def memory_per_rank(config: Config, plane: tuple[int, int], n_sections: int, ranks: int,
                    threads: int = 1) -> tuple[MemoryEstimate, int]:
    """The memory estimate of the busiest rank (:func:`estimate_memory_per_rank`, ``threads`` per rank) for this
    config on an input of
    ``n_sections`` planes of shape ``plane``, and the number of training patches: the image is held in memory
    only when every patch trains (one section at a time with ``training.per_section``); the estimation pass
    holds one tile (``estimation.tile``, at most the plane)."""
    h, w = config.patches.size
    sections = 1 if config.training.per_section else n_sections
    grid = PatchGrid(plane, (h, w), config.patches.stride, sections)
    n_train = min(grid.n_patches, config.training.max_patches or grid.n_patches)
    t = config.truncation
    tile = [min(a, b) for a, b in zip(config.estimation.tile, plane)]
    estimate = estimate_memory_per_rank(
        n_patches_total=n_train, ranks=ranks, D=h * w, model=config.model.name, H=config.model.H, S=t.S,
        candidates_per_patch=t.parents * t.children * t.generations, C=config.model.C,
        block_size=config.training.block_size,
        image_pixels=0 if trains_on_sample(config, grid.n_patches) else sections * plane[0] * plane[1],
        tile_pixels=(tile[0] + h) * (tile[1] + w), parents=t.parents, mutation=t.mutation, crossover=t.crossover,
        full_psi=config.model.psi == "full", threads=threads)
    return estimate, n_train


def measure_peak(call: Callable[[], Any]) -> int:
    """Peak bytes allocated (tracemalloc, numpy buffers included) by ``call()`` above what was held before it;
    how the E-step constants of this module were calibrated."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
