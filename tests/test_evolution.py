"""The evolutionary E-step's parts: parent selection, crossover, mutations, scoring each distinct pair once, and
the guarantee that a truncated set never gets worse."""
import numpy as np
import pytest

from hpc_zsem.variational.evolution import (EvolutionSettings, best_distinct, evolve, flip_one_bit, mutate_sparse,
                                            score_new, select_parents, uniform_crossover)
from hpc_zsem.variational.states import pack, unpack


@pytest.mark.parametrize("rule", ["fitness", "uniform", "best"])
def test_select_parents_gives_distinct_indices(rule):
    lpj = np.random.default_rng(0).normal(size=(200, 12))
    idx = select_parents(lpj, 5, rule, np.random.default_rng(1))
    assert idx.shape == (200, 5) and idx.min() >= 0 and idx.max() < 12
    assert all(len(set(row)) == 5 for row in idx)
    if rule == "best":
        np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(np.argsort(-lpj, axis=1)[:, :5], axis=1))


def test_fitness_selection_prefers_fitter_states():
    """One parent out of three with weights lpj − min + 1 = 1, 2, 5: picked with probability 1/8, 2/8, 5/8."""
    lpj = np.tile([0.0, 1.0, 4.0], (40000, 1))
    idx = select_parents(lpj, 1, "fitness", np.random.default_rng(2))[:, 0]
    np.testing.assert_allclose(np.bincount(idx, minlength=3) / idx.size, [1 / 8, 2 / 8, 5 / 8], atol=0.01)


def test_crossover_takes_every_bit_from_one_of_two_parents():
    rng = np.random.default_rng(3)
    parents = rng.random((50, 4, 30)) < 0.5
    kids = uniform_crossover(parents, rng)
    from_some_parent = (kids[:, :, None, :] == parents[:, None, :, :])       # (N, child, parent, H)
    own = from_some_parent[:, np.arange(4), np.arange(4)]                    # the child's own parent
    assert np.all(own | from_some_parent.any(axis=2))
    assert 0.3 < own.mean() < 0.95                                           # mixes, not copies


@pytest.mark.parametrize("H", [5, 64, 100])
def test_flip_one_bit_flips_exactly_one_uniform_bit(H):
    rng = np.random.default_rng(4)
    parents = rng.random((300, 3, H)) < 0.3
    kids = unpack(flip_one_bit(pack(parents), 2, H, rng), H)
    assert kids.shape == (300, 6, H)
    diff = kids ^ np.repeat(parents, 2, axis=1)
    assert np.all(diff.sum(axis=2) == 1)
    counts = diff.sum(axis=(0, 1))
    assert counts.min() > 0.5 * counts.mean()                                # every bit position is used


def test_sparse_mutation_moves_the_active_count_toward_the_prior_mean():
    rng = np.random.default_rng(5)
    H, rho = 40, 4.0
    dense = np.zeros((2000, 1, H), dtype=bool)
    dense[:, :, :12] = True                                                   # k = 12 > ρ
    kids = mutate_sparse(dense, 1, rho, rng)
    assert np.all((kids != dense).any(axis=2))                                # every child differs
    # k·p(1→0) = (1 − ρ + k)/2 = 4.5 ones switch off on average, none switch on (p(0→1) clips to 0)
    assert kids.sum(axis=2).mean() == pytest.approx(12 - (1 - rho + 12) / 2, abs=0.3)
    empty = np.zeros((2000, 1, H), dtype=bool)                                # k = 0 < ρ: bits switch on
    assert mutate_sparse(empty, 1, rho, rng).sum(axis=2).mean() > 1.0


def test_score_new_scores_each_distinct_pair_once():
    states = pack(np.array([[[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]], dtype=bool))
    known = np.array([[5.0, 6.0, np.nan, np.nan, np.nan, np.nan]])
    calls = []

    def score(rows, words):
        calls.append(len(rows))
        return np.full(len(rows), 7.0)

    lpj = score_new(states, known, 2, score)
    assert calls == [1]                                                       # only [0, 0, 1] is new
    np.testing.assert_array_equal(lpj, [[5.0, 6.0, 5.0, 6.0, 7.0, 7.0]])


def test_best_distinct_keeps_the_best_distinct_and_counts_new_ones():
    states = pack(np.array([[[1, 0], [0, 1], [1, 1], [1, 1], [0, 0]]], dtype=bool))
    lpj = np.array([[1.0, 2.0, 9.0, 9.0, 0.0]])
    keep, accepted = best_distinct(states, lpj, 2)
    np.testing.assert_array_equal(keep, [[2, 1]])                             # [1, 1] once, then the old [0, 1]
    assert accepted == 1


@pytest.mark.parametrize("settings,found", [
    (EvolutionSettings(S=6, parents=3, children=2, generations=2), 0.9),
    (EvolutionSettings(S=6, parents=4, children=1, generations=1, selection="uniform", mutation="sparse",
                       crossover=True), 0.5)])
def test_evolve_never_makes_a_truncated_set_worse(settings, found):
    rng = np.random.default_rng(6)
    H, N = 10, 400
    target = rng.random((N, H)) < 0.3

    def score(rows, words):                                                  # log-joint: −Hamming distance
        return -(unpack(words, H) != target[rows]).sum(axis=1).astype(float)

    K = pack(np.broadcast_to(np.eye(H, dtype=bool)[:settings.S], (N, settings.S, H)))
    lpj = score(np.repeat(np.arange(N), settings.S), K.reshape(N * settings.S, -1)).reshape(N, settings.S)
    for step in range(15):
        new_K, new_lpj, accepted = evolve(K, lpj, H, settings, 3.0, score, rng)
        assert np.all(np.sort(new_lpj, axis=1) >= np.sort(lpj, axis=1))      # the i-th best never falls
        assert all(len({bytes(s) for s in row}) == settings.S for row in new_K)
        np.testing.assert_array_equal(new_lpj, score(np.repeat(np.arange(N), settings.S),
                                                     new_K.reshape(N * settings.S, -1)).reshape(N, settings.S))
        K, lpj = new_K, new_lpj
    assert np.mean(lpj.max(axis=1) == 0) > found                              # the target state is found
