"""Evolutionary improvement of truncated posterior sets (the "ES3C" E-step; Drefs et al. 2022).

Per patch n the truncated set K_n holds S distinct states. One evolutionary E-step, vectorised over all
patches of a block:

    population ← K_n (with log-joints under the current Θ)
    repeat `generations` times:
        parents  ← select `parents` states of the population          (fitness / uniform / best)
        children ← optional uniform crossover of parent pairs, then bit-flip mutation (`children` per parent;
                   the default "random" flip works on the packed words directly)
        score the children that are new (de-duplicated against K_n and each other before scoring)
        population ← children
    K_n ← the S best distinct states of K_n ∪ all children             (by log-joint)

K_n only ever improves, so the truncated free energy F = Σ_n log Σ_{s∈K_n} p(s, y_n) cannot decrease in
the E-step. The scoring function is the model's: ``score(patch_index (P,), states (P, W) packed) -> log-joints (P,)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from hpc_zsem.variational.states import first_occurrence, pack, unpack

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


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


def select_parents(lpj: np.ndarray, n_parents: int, rule: str, rng: np.random.Generator) -> np.ndarray:
    """Indices (N, n_parents) of distinct parents per row of ``lpj`` (N, C).

    fitness: sampled without replacement with probability ∝ lpj − min(lpj) + 1 (Efraimidis–Spirakis keys
             u^(1/w), i.e. log(u)/w, largest first); uniform: uniformly without replacement; best: the top lpj.
    """
    N, C = lpj.shape
    if n_parents >= C:
        return np.broadcast_to(np.arange(C), (N, C)).copy()
    if rule == "best":
        keys = lpj
    elif rule == "uniform":
        keys = rng.random((N, C))
    elif rule == "fitness":
        weights = lpj - lpj.min(axis=1, keepdims=True) + 1.0
        keys = np.log(rng.random((N, C)) + 1e-300) / weights
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return np.argpartition(-keys, n_parents - 1, axis=1)[:, :n_parents]


def uniform_crossover(parents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each parent (N, P, H) mates with a random other parent of the same patch; every bit of the child is
    taken from either of the two with probability ½."""
    N, P, H = parents.shape
    if P < 2:
        return parents.copy()
    partner = (np.arange(P) + rng.integers(1, P, size=(N, P))) % P
    mates = np.take_along_axis(parents, partner[:, :, None], axis=1)
    return np.where(rng.random((N, P, H)) < 0.5, parents, mates)


def flip_one_bit(parents: np.ndarray, n_children: int, H: int, rng: np.random.Generator) -> np.ndarray:
    """The "random" mutation on packed states: children (N, P·n_children, W) of parents (N, P, W), each with
    exactly one uniformly chosen bit h ∈ [0, H) flipped (bit h mod 64 of word h // 64). No unpacking."""
    kids = np.repeat(parents, n_children, axis=1)
    bit = rng.integers(0, H, size=kids.shape[:2])
    flips = np.zeros_like(kids)
    np.put_along_axis(flips, (bit // 64)[:, :, None], np.left_shift(np.uint64(1), (bit % 64).astype(np.uint64))[:, :, None],
                      axis=2)
    return kids ^ flips


def mutate_sparse(parents: np.ndarray, n_children: int, expected_active: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The "sparse" mutation: children (N, P·n_children, H) of parents (N, P, H) (bool).

    Every bit flips independently, with probabilities chosen so that one bit flips on average and the
    expected number of active units after the flip moves to the prior mean ρ = Σ_h π_h: for a parent with
    k ones, k·p(1→0) = (1 − ρ + k)/2 and (H−k)·p(0→1) = (1 + ρ − k)/2 (clipped to [0, 1]). A child that
    equals its parent gets one uniformly chosen flip instead.
    """
    N, P, H = parents.shape
    kids = np.repeat(parents, n_children, axis=1)
    one_flip = np.zeros(kids.shape, dtype=bool)
    np.put_along_axis(one_flip, rng.integers(0, H, size=kids.shape[:2])[:, :, None], True, axis=2)
    k = kids.sum(axis=2, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_off = np.clip((1.0 - expected_active + k) / (2.0 * k), 0.0, 1.0)
        p_on = np.clip((1.0 + expected_active - k) / (2.0 * (H - k)), 0.0, 1.0)
    p_flip = np.where(kids, np.nan_to_num(p_off), np.nan_to_num(p_on))
    flips = rng.random(kids.shape) < p_flip
    unchanged = ~flips.any(axis=2, keepdims=True)
    return kids ^ np.where(unchanged, one_flip, flips)


def score_new(candidates: np.ndarray, lpj: np.ndarray, n_known: int, score: ScoreFn) -> np.ndarray:
    """Fill in log-joints of candidates[:, n_known:] (packed, (N, C, W)); lpj[:, :n_known] are known.

    Each distinct (patch, state) pair is scored once: duplicates of a known state or of another new candidate
    copy its value.
    """
    N, C, _ = candidates.shape
    rep = first_occurrence(candidates)
    own = rep == np.arange(C)
    todo = own & (np.arange(C) >= n_known)
    rows, cols = np.nonzero(todo)
    lpj = lpj.copy()
    if rows.size:
        lpj[rows, cols] = score(rows, candidates[rows, cols])
    return np.take_along_axis(lpj, rep, axis=1)


def best_distinct(candidates: np.ndarray, lpj: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, S) of the S best distinct candidates per row and how many of them come from beyond the
    first S candidates (the old set) — the number of newly accepted states."""
    N, C, _ = candidates.shape
    rep = first_occurrence(candidates)
    keyed = np.where(rep == np.arange(C), lpj, -np.inf)
    order = np.argsort(-keyed, axis=1, kind="stable")[:, :S]
    return order, int(np.count_nonzero(order >= S))


def evolve(K: np.ndarray, lpj_K: np.ndarray, H: int, settings: EvolutionSettings, expected_active: float,
           score: ScoreFn, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One evolutionary E-step for a block: (K (N, S, W) packed, lpj_K (N, S)) → (new K, its lpj, accepted)."""
    candidates, cand_lpj = K, lpj_K
    population, pop_lpj = K, lpj_K
    for _ in range(settings.generations):
        parent_idx = select_parents(pop_lpj, settings.parents, settings.selection, rng)
        parents = np.take_along_axis(population, parent_idx[:, :, None], axis=1)
        if settings.crossover:
            parents = pack(uniform_crossover(unpack(parents, H), rng))
        if settings.mutation == "random":
            children = flip_one_bit(parents, settings.children, H, rng)
        elif settings.mutation == "sparse":
            children = pack(mutate_sparse(unpack(parents, H), settings.children, expected_active, rng))
        else:
            raise ValueError(f"unknown mutation rule {settings.mutation!r}")
        n_known = candidates.shape[1]
        candidates = np.concatenate([candidates, children], axis=1)
        padded = np.concatenate([cand_lpj, np.full(children.shape[:2], np.nan)], axis=1)
        cand_lpj = score_new(candidates, padded, n_known, score)
        population, pop_lpj = children, cand_lpj[:, n_known:]
    keep, accepted = best_distinct(candidates, cand_lpj, settings.S)
    new_K = np.take_along_axis(candidates, keep[:, :, None], axis=1)
    return new_K, np.take_along_axis(cand_lpj, keep, axis=1), accepted
