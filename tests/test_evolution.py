"""The evolutionary E-step's parts — parent selection, crossover, mutations (the kernel's primitives, driven here
patch by patch) — and the guarantees of a whole search: distinct states, log-joints that match a fresh
scoring, a truncated set that never gets worse."""
import numpy as np
import pytest
from numba import njit

from hpc_zsem.models.sssc import SSSC
from hpc_zsem.variational import kernel
from hpc_zsem.variational.evolution import EvolutionSettings, draw, evolve
from hpc_zsem.variational.states import pack, unpack


def select_rows(lpj, n_parents, rule, u):
    """kernel._select for every row of lpj (N, C) with uniforms u (N, C) (as ``draw`` gives them: log(u + 10⁻³⁰⁰)
    for fitness selection)."""
    return _select_rows(lpj, n_parents, rule, u, kernel.ranking_buffers(lpj.shape[1]))


@njit
def _select_rows(lpj, n_parents, rule, u, ranking):
    N, C = lpj.shape
    out = np.empty((N, min(n_parents, C)), dtype=np.int64)
    chosen = np.empty(max(n_parents, C), dtype=np.int64)
    flat = lpj.ravel()
    drawn = np.log(u + 1e-300) if rule == 0 else u
    for n in range(N):
        count = kernel._select(flat, n * C, C, n_parents, rule, drawn.reshape(1, N, C), 0, n, ranking, chosen)
        out[n] = chosen[:count]
    return out


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_select_parents_gives_distinct_indices_in_key_order(rule):
    """fitness (0), uniform (1) and best (2) pick distinct parents; best gives the top lpj, largest first."""
    rng = np.random.default_rng(0)
    lpj, u = rng.normal(size=(200, 12)), rng.random((200, 12))
    idx = select_rows(lpj, 5, rule, u)
    assert idx.shape == (200, 5) and idx.min() >= 0 and idx.max() < 12
    assert all(len(set(row)) == 5 for row in idx)
    keys = {0: np.log(u + 1e-300) / (lpj - lpj.min(axis=1, keepdims=True) + 1.0), 1: u, 2: lpj}[rule]
    np.testing.assert_array_equal(idx, np.argsort(-keys, axis=1, kind="stable")[:, :5])
    everyone = select_rows(lpj[:, :4].copy(), 5, rule, u[:, :4].copy())     # fewer members than parents
    np.testing.assert_array_equal(everyone, np.tile(np.arange(4), (200, 1)))


def test_fitness_selection_prefers_fitter_states():
    """One parent out of three with weights lpj − min + 1 = 1, 2, 5: picked with probability 1/8, 2/8, 5/8."""
    lpj = np.tile([0.0, 1.0, 4.0], (40000, 1))
    idx = select_rows(lpj, 1, 0, np.random.default_rng(2).random(lpj.shape))[:, 0]
    np.testing.assert_allclose(np.bincount(idx, minlength=3) / idx.size, [1 / 8, 2 / 8, 5 / 8], atol=0.01)


def test_crossover_takes_every_bit_from_one_of_two_parents():
    rng = np.random.default_rng(3)
    N, P, H = 50, 4, 30
    parents = rng.random((N, P, H)) < 0.5
    steps, u = rng.integers(1, P, size=(1, N, P)), rng.random((1, N, P, H))
    kids = np.empty((N, P, 1), dtype=np.uint64)
    for n in range(N):
        kernel._crossover(pack(parents[n]), P, H, steps, u, 0, n, kids[n])
    kids = unpack(kids, H)
    mate = np.take_along_axis(parents, ((np.arange(P) + steps[0]) % P)[:, :, None], axis=1)
    np.testing.assert_array_equal(kids, np.where(u[0] < 0.5, parents, mate))
    assert 0.3 < (kids == parents).mean() < 0.95                            # mixes, not copies


def children(K, H, settings, seed):
    """The children of one generation (for the mutation tests): evolve with S = all candidates keeps them."""
    N, C, _ = K.shape
    model = SSSC(H, EvolutionSettings(S=C + settings.parents * settings.children, parents=settings.parents,
                                      children=settings.children, selection="best", mutation=settings.mutation))
    params = {"W": np.zeros((4, H)), "pi": np.full(H, 0.5), "mu": np.zeros(H), "psi": np.ones(H),
              "sigma2": np.array(1.0)}
    lpj = -np.arange(C, dtype=float)[None].repeat(N, axis=0)               # K in order: every state a parent
    rng = np.random.default_rng(seed)
    new_K, _, _ = evolve(K, lpj, H, model.evolution, 4.0, model._scorer(np.zeros((N, 4)), params), rng)
    return new_K


@pytest.mark.parametrize("H", [5, 64, 100])
def test_flip_one_bit_flips_exactly_one_uniform_bit(H):
    """Children of the "random" mutation: parent i's children are parent i with one uniform bit flipped (the
    uniform bits drawn in order, a child per draw)."""
    rng = np.random.default_rng(4)
    N, P, n_children = 1000, 3, 2
    parents = rng.random((N, P, H)) < 0.3
    settings = EvolutionSettings(S=P, parents=P, children=n_children, selection="best")
    bit = draw(np.random.default_rng(7), settings, N, P, H, 1).bit[0]
    kids = np.repeat(parents, n_children, axis=1)
    kids[np.arange(N)[:, None], np.arange(P * n_children)[None], bit] ^= True
    np.testing.assert_array_equal((kids ^ np.repeat(parents, n_children, axis=1)).sum(axis=2), 1)
    counts = (kids ^ np.repeat(parents, n_children, axis=1)).sum(axis=(0, 1))
    assert counts.min() > 0.5 * counts.mean()                                # every bit position is used
    got = unpack(children(pack(parents), H, settings, 7), H)
    for n in range(0, N, 37):                                                # the kernel made exactly these
        assert {r.tobytes() for r in got[n]} == {r.tobytes() for r in np.concatenate([parents[n], kids[n]])}


def test_sparse_mutation_moves_the_active_count_toward_the_prior_mean():
    H, rho, N = 40, 4.0, 2000
    rng = np.random.default_rng(5)
    for k, check in ((12, lambda got: got.mean() == pytest.approx(12 - (1 - rho + 12) / 2, abs=0.3)),
                     (0, lambda got: got.mean() > 1.0)):
        child = np.zeros((1, 1), dtype=np.uint64)
        counts = []
        u, one = rng.random((1, N, 1, H)), rng.integers(0, H, size=N)
        for n in range(N):
            child[0, 0] = (1 << k) - 1                                       # k = 12 > ρ: ones switch off
            kernel._mutate_sparse(child, 0, H, rho, u, 0, n, 0, one[n])
            counts.append(bin(int(child[0, 0])).count("1"))
            assert child[0, 0] != (1 << k) - 1                                # every child differs
        assert check(np.array(counts))


def hamming_world(N, H, seed):
    """A toy SSSC whose log-joints rank states by closeness to a per-patch target state."""
    rng = np.random.default_rng(seed)
    target = rng.random((N, H)) < 0.3
    W = np.eye(H) * 3.0
    params = {"W": W, "pi": np.full(H, 0.3), "mu": np.ones(H), "psi": np.full(H, 0.01), "sigma2": np.array(0.5)}
    return target @ W.T, params


@pytest.mark.parametrize("settings,found", [
    (EvolutionSettings(S=6, parents=3, children=2, generations=2), 0.9),
    (EvolutionSettings(S=6, parents=4, children=1, generations=1, selection="uniform", mutation="sparse",
                       crossover=True), 0.5)])
def test_evolve_never_makes_a_truncated_set_worse(settings, found):
    H, N = 10, 400
    Y, params = hamming_world(N, H, 6)
    model = SSSC(H, settings)
    scorer = model._scorer(Y, params)
    rng = np.random.default_rng(6)
    K = pack(np.broadcast_to(np.eye(H, dtype=bool)[:settings.S], (N, settings.S, H)))
    lpj = kernel.posterior(*scorer, K, 0)[0]
    for _ in range(15):
        new_K, new_lpj, accepted = evolve(K, lpj, H, settings, 3.0, scorer, rng)
        assert np.all(np.sort(new_lpj, axis=1) >= np.sort(lpj, axis=1))      # the i-th best never falls
        assert np.all(np.diff(new_lpj, axis=1) <= 0)                         # kept sorted, best first
        assert all(len({bytes(s) for s in row}) == settings.S for row in new_K)
        np.testing.assert_allclose(new_lpj, kernel.posterior(*scorer, new_K, 0)[0], rtol=1e-13)
        assert accepted == np.count_nonzero(~(new_K[:, :, None, 0] == K[:, None, :, 0]).any(axis=2))
        K, lpj = new_K, new_lpj
    target = unpack(pack(Y > 1.5), H)
    best = unpack(K[:, 0], H)
    assert np.mean((best == target).all(axis=1)) > found                    # the target state is found


def test_evolve_without_log_joints_keeps_the_same_sets():
    """A training E-step discards the new sets' log-joints (want_lpj=False): the search must then keep exactly
    the sets (and count the same accepted states) that it keeps when it writes them."""
    H, N = 70, 300                                        # two-word states
    settings = EvolutionSettings(S=6, parents=3, children=2, generations=2)
    Y, params = hamming_world(N, H, 8)
    model = SSSC(H, settings)
    scorer = model._scorer(Y, params)
    K = pack(np.broadcast_to(np.eye(H, dtype=bool)[:settings.S], (N, settings.S, H)))
    lpj = kernel.posterior(*scorer, K, 0)[0]
    with_lpj = evolve(K, lpj, H, settings, 3.0, scorer, np.random.default_rng(9))
    without = evolve(K, lpj, H, settings, 3.0, scorer, np.random.default_rng(9), want_lpj=False)
    np.testing.assert_array_equal(without[0], with_lpj[0])
    assert without[1].shape == (N, 0) and with_lpj[1].shape == (N, settings.S)
    assert without[2] == with_lpj[2] > 0
