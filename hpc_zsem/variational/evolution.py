"""Evolutionary improvement of truncated posterior sets (the "ES3C" E-step; Drefs et al. 2022).

Per patch n the truncated set K_n holds S distinct states. One evolutionary E-step of a block:

    population ← K_n (with log-joints under the current Θ)
    repeat `generations` times:
        parents  ← select `parents` states of the population          (fitness / uniform / best)
        children ← optional uniform crossover of parent pairs, then bit-flip mutation (`children` per parent)
        score the children that are new (each distinct state of a patch is scored once)
        population ← children
    K_n ← the S best distinct states of K_n ∪ all children             (by log-joint)

K_n only ever improves, so the truncated free energy F = Σ_n log Σ_{s∈K_n} p(s, y_n) cannot decrease in
the E-step. The search and the scoring run in the compiled kernel (``hpc_zsem.variational.kernel``); this
module draws its random numbers — all of them before the kernel runs, in a fixed order of calls and shapes —
and so the truncated sets are a pure function of the random streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hpc_zsem.variational.kernel import MUTATIONS, SELECTIONS, search


@dataclass(frozen=True)
class EvolutionSettings:
    """How children are made; mirrors the ``truncation`` config section."""

    S: int
    parents: int = 20
    children: int = 1
    generations: int = 1
    selection: str = "fitness"   # fitness | uniform | best
    mutation: str = "random"     # random | sparse
    crossover: bool = False

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection rule {self.selection!r}")
        if self.mutation not in MUTATIONS:
            raise ValueError(f"unknown mutation rule {self.mutation!r}")


class Scorer(NamedTuple):
    """What the kernel needs to score (patch, state) pairs of a block: the Θ terms
    (``kernel.theta_terms``), B = Y W (N, H) and the per-patch tails −½‖y_n‖²/σ² − D/2·log 2πσ² (N,)."""

    theta: tuple
    B: np.ndarray
    tails: np.ndarray


class Draws(NamedTuple):
    """The random numbers of one evolutionary E-step, one leading axis entry per generation (padded):
    selection uniforms (G, N, C), crossover partner steps (G, N, P) and bit choices (G, N, P, H), the mutation's
    uniform bit (G, N, P·children) and the sparse mutation's flip uniforms (G, N, P·children, H)."""

    selection: np.ndarray
    partner: np.ndarray
    crossover: np.ndarray
    bit: np.ndarray
    flips: np.ndarray


def draw(rng, settings: EvolutionSettings, N: int, C0: int, H: int, generations: int) -> Draws:
    """Draw every random number the search uses, generation by generation in this order (the order and shapes
    of the numpy E-step, so the streams are unchanged): the selection keys' uniforms (N, C) (fitness/uniform
    with fewer parents than the population C), the crossover's partner steps in [1, P) (N, P) and uniforms
    (N, P, H) (with P ≥ 2 parents), the uniformly chosen bit in [0, H) of each child (N, P·children), and for
    the sparse mutation the flip uniforms (N, P·children, H)."""
    per_generation = []
    C = C0
    for _ in range(generations):
        P = min(settings.parents, C)
        kids = P * settings.children
        selection = (rng.random((N, C)) if P < C and settings.selection != "best" else np.empty((N, 0)))
        if settings.crossover and P >= 2:
            partner, crossover = rng.integers(1, P, size=(N, P)), rng.random((N, P, H))
        else:
            partner, crossover = np.empty((N, 0), dtype=np.int64), np.empty((N, 0, 0))
        bit = rng.integers(0, H, size=(N, kids))
        flips = rng.random((N, kids, H)) if settings.mutation == "sparse" else np.empty((N, 0, 0))
        per_generation.append((selection, partner, crossover, bit, flips))
        C = kids
    return Draws(*(_stack([g[i] for g in per_generation], N, dtype, ndim)
                   for i, (dtype, ndim) in enumerate([(np.float64, 2), (np.int64, 2), (np.float64, 3),
                                                      (np.int64, 2), (np.float64, 3)])))


def _stack(arrays: list[np.ndarray], N: int, dtype, ndim: int) -> np.ndarray:
    """(G, N, …) C-contiguous, zero-padded along the trailing axes (a view when G = 1)."""
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0], dtype=dtype)[None]
    shape = (len(arrays), N) + tuple(max([a.shape[d] for a in arrays], default=0) for d in range(1, ndim))
    out = np.zeros(shape, dtype=dtype)
    for g, a in enumerate(arrays):
        out[(g,) + tuple(slice(0, s) for s in a.shape)] = a
    return out


def evolve(K: np.ndarray, lpj: np.ndarray | None, H: int, settings: EvolutionSettings, expected_active: float,
           scorer: Scorer, rng, generations: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One evolutionary E-step for a block: (K (N, C₀, W) packed, its log-joints (N, C₀) or None to score them
    here) → (the S best distinct states (N, S, W), their log-joints, how many come from beyond the first S).
    ``generations = 0`` only scores and keeps the S best distinct of K (no random numbers are drawn)."""
    N, C0, _ = K.shape
    G = settings.generations if generations is None else generations
    draws = draw(rng, settings, N, C0, H, G)
    new_K, new_lpj, accepted = search(K, lpj, int(settings.parents), int(settings.children), int(G),
                                      SELECTIONS.index(settings.selection), MUTATIONS.index(settings.mutation),
                                      bool(settings.crossover), float(expected_active), int(H), draws, *scorer,
                                      int(settings.S))
    return new_K, new_lpj, int(accepted.sum())
