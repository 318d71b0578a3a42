"""The compiled E-step kernel against the previous pure-numpy E-step (tests/reference_es3c.py): the same
truncated sets — states and their order — for every option combination, log-joints and statistics equal to
rounding, and results that depend neither on the thread count nor on the block size."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.variational import kernel
from hpc_zsem.variational.evolution import EvolutionSettings
from reference_es3c import ReferenceSSSC

STATS = ("S_s", "S_sz", "S_szsz", "S_ss", "T", "S_ysz", "yy", "free_energy", "N", "accepted")


def data(N=80, D=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)) * 3 + rng.normal(size=(1, D))


def start(model, Y, pi=0.15):
    """Initial parameters with π large enough that states with k > 2 are common."""
    params = model.init_params(PatchSummary.from_patches(Y), Y[:10], np.random.default_rng(1))
    params["pi"] = np.full(model.H, pi)
    return params


def assert_same_e_step(new, old, rel=1e-12):
    (K_new, stats_new), (K_old, stats_old) = new, old
    np.testing.assert_array_equal(K_new, K_old)
    assert stats_new.keys() == stats_old.keys()
    for key in stats_new:
        scale = max(float(np.abs(stats_old[key]).max()), 1e-300)
        assert np.abs(stats_new[key] - stats_old[key]).max() <= rel * scale, key


def assert_same_epochs(new, old, Y, params, next_params):
    """Three epochs from the package's initial sets, each E-step of both models followed by the numpy model's
    M-step (then ``next_params(new Θ, old Θ)``): identical truncated sets and statistics; returns the last sets."""
    ids = np.arange(Y.shape[0])
    K_new = K_old = new.init_block_state(Y, params, PatchRandom(0, 0, 0, ids))
    for epoch in range(3):
        step_new = new.e_step(Y, params, K_new, PatchRandom(0, 1, epoch, ids))
        step_old = old.e_step(Y, params, K_old, PatchRandom(0, 1, epoch, ids))
        assert_same_e_step(step_new, step_old)
        (K_new, _), (K_old, stats) = step_new, step_old
        params = next_params(old.m_step(params, stats), params)
    return K_new


def well_conditioned(params):
    """A full Ψ whose eigenvalues are ≥ 0.1: the information form needs Ψ_AA⁻¹, and with the M-step's
    eigenvalue floor (1e-8 of the largest) both the kernel and the numpy path are only accurate to about
    cond(Ψ_AA)·ε (measured against a 50-digit direct evaluation: both off by ~1e-2 at cond ~1e8)."""
    if params["psi"].ndim == 2:
        values, vectors = np.linalg.eigh(params["psi"])
        params = dict(params, psi=(vectors * np.maximum(values, 0.1)) @ vectors.T)
    return params


OPTIONS = ("psi", "selection", "mutation", "crossover", "generations", "children")
COMBINATIONS = [dict(zip(OPTIONS, values), H=(9, 9, 70)[i % 3])         # H = 70: two words per state
                for i, values in enumerate(itertools.product(("diag", "full"), ("fitness", "uniform", "best"),
                                                             ("random", "sparse"), (False, True), (1, 2), (1, 3)))]


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_e_steps_equal_the_numpy_e_step(options):
    """Three epochs (E-step, M-step) from the same start (the package's initial sets: the initialisation is the
    model's own, not part of the numpy E-step): identical truncated sets and statistics."""
    options = dict(options)
    psi, H = options.pop("psi"), options.pop("H")
    settings = EvolutionSettings(S=7, parents=4, **options)
    Y = data()
    new, old = SSSC(H, settings, psi), ReferenceSSSC(H, settings, psi)
    assert_same_epochs(new, old, Y, start(new, Y), lambda params, _: well_conditioned(params))


@pytest.mark.parametrize("psi", ["diag", "full"])
def test_refine_and_estimate_equal_the_numpy_e_step(psi):
    H = 12
    settings = EvolutionSettings(S=10, parents=5, children=2, generations=2)
    Y = data(N=150, D=16, seed=3)
    new, old = SSSC(H, settings, psi), ReferenceSSSC(H, settings, psi)
    params = start(new, Y, pi=0.2)
    ids = np.arange(Y.shape[0])
    rngs = lambda: [PatchRandom(0, 2, e, ids) for e in range(3)]            # noqa: E731
    K = new.init_block_state(Y, params, PatchRandom(0, 0, 0, ids))
    K_new, K_old = new.refine(Y, params, K, rngs()), old.refine(Y, params, K, rngs())
    np.testing.assert_array_equal(K_new, K_old)
    estimate_new, estimate_old = new.estimate(Y, params, K_new), old.estimate(Y, params, K_old)
    assert np.abs(estimate_new - estimate_old).max() <= 1e-12 * np.abs(estimate_old).max()


def test_numpy_generators_give_the_same_sets_as_before():
    """An e_step driven by a numpy Generator (tests, tools) draws the same numbers as the numpy E-step did."""
    H, settings = 10, EvolutionSettings(S=8, parents=3, children=2, crossover=True, mutation="sparse")
    Y = data(seed=5)
    new, old = SSSC(H, settings), ReferenceSSSC(H, settings)
    params = start(new, Y)
    K = new.init_block_state(Y, params, np.random.default_rng(1))
    assert_same_e_step(new.e_step(Y, params, K, np.random.default_rng(2)),
                       old.e_step(Y, params, K, np.random.default_rng(2)))


def test_results_do_not_depend_on_threads_or_blocks():
    """1 vs 2 threads: bitwise the same sets and statistics; blocks of any size: the same sets."""
    H, settings = 40, EvolutionSettings(S=12, parents=6, children=2, generations=2)
    Y = data(N=600, D=16, seed=7)
    model = SSSC(H, settings, "full")
    params = start(model, Y, pi=0.05)
    ids = np.arange(Y.shape[0])
    K = model.init_block_state(Y, params, PatchRandom(0, 0, 0, ids))
    runs = []
    try:
        for threads in (1, 2):
            assert kernel.set_threads(threads) == threads
            runs.append(model.e_step(Y, params, K, PatchRandom(0, 1, 0, ids)))
            runs.append(model.refine(Y, params, K, [PatchRandom(0, 2, 0, ids)]))
            runs.append(model.estimate(Y, params, K))
    finally:
        kernel.set_threads(1)
    (K1, stats1), refined1, estimate1, (K2, stats2), refined2, estimate2 = runs
    np.testing.assert_array_equal(K1, K2)
    np.testing.assert_array_equal(refined1, refined2)
    np.testing.assert_array_equal(estimate1, estimate2)
    for key in stats1:
        np.testing.assert_array_equal(stats1[key], stats2[key])
    blocks = [slice(0, 1), slice(1, 250), slice(250, 600)]
    K_blocks = np.concatenate([model.e_step(Y[b], params, K[b], PatchRandom(0, 1, 0, ids[b]))[0] for b in blocks])
    np.testing.assert_array_equal(K_blocks, K1)


def test_duplicates_among_candidates_keep_the_first_and_fill_up():
    """With fewer distinct states than S (H = 2: 4 states, S = 5, K holding duplicates) the kept set lists the
    distinct ones best first and fills up with duplicates in candidate order, as the numpy E-step did."""
    H, settings = 2, EvolutionSettings(S=5, parents=2, children=2)
    Y = data(N=30, D=3, seed=9)
    new, old = SSSC(H, settings), ReferenceSSSC(H, settings)
    params = start(new, Y, pi=0.4)
    rng = np.random.default_rng(0)
    K = np.stack([rng.permutation([0, 1, 2, 3, rng.integers(4)]) for _ in range(30)]).astype(np.uint64)[:, :, None]
    step_new = new.e_step(Y, params, K, np.random.default_rng(1))
    step_old = old.e_step(Y, params, K, np.random.default_rng(1))
    assert_same_e_step(step_new, step_old)
    assert all(len({int(w) for w in row[:, 0]}) == 4 for row in step_new[0])


def test_map_in_order_runs_whole_items_on_the_threads_and_keeps_their_order():
    """With 2 threads and ≥ ITEMS_PER_THREAD·2 items, items run concurrently on the calling thread and a pool
    thread, each one's kernels unsplit; with fewer items, one after another with the kernels split; results
    always in order."""
    import threading
    import time

    def item(i):
        ranges = []
        kernel.run_split(lambda first, last: ranges.append((first, last)), 10)
        time.sleep(0.01 * (i % 3))       # (releases the GIL: the other thread takes the next items meanwhile)
        return i, threading.current_thread().name, sorted(ranges)

    many = list(range(kernel.ITEMS_PER_THREAD * 2 + 3))
    try:
        kernel.set_threads(2)
        concurrent = list(kernel.map_in_order(item, many))
        one_by_one = list(kernel.map_in_order(item, many[:3]))
    finally:
        kernel.set_threads(1)
    assert [i for i, _, _ in concurrent] == many
    assert {name for _, name, _ in concurrent} == {threading.main_thread().name, "hpc_zsem-kernel_0"}
    assert all(ranges == [(0, 10)] for _, _, ranges in concurrent)
    assert [i for i, _, _ in one_by_one] == [0, 1, 2]
    assert all(ranges == [(0, 5), (5, 10)] for _, _, ranges in one_by_one)


def test_map_in_order_raises_an_items_error_in_order_and_stops_taking_items():
    """An item that raises: the results before it are yielded, its error is raised where its result would be,
    and no item is started after the failure (both threads stop; one item per thread may be running)."""
    import time

    started = []

    def item(i):
        started.append(i)
        if i == 5:
            raise ValueError("item 5")
        time.sleep(0.02)
        return i

    many = list(range(kernel.ITEMS_PER_THREAD * 2 + 20))
    yielded = []
    try:
        kernel.set_threads(2)
        with pytest.raises(ValueError, match="item 5"):
            for result in kernel.map_in_order(item, many):
                yielded.append(result)
    finally:
        kernel.set_threads(1)
    assert yielded == [0, 1, 2, 3, 4]
    assert max(started) <= 5 + 2


def test_map_in_order_stops_its_threads_when_the_caller_stops_iterating():
    """A caller that stops early (closes the iterator): the threads finish the items they run and take no more
    (the caller may have run one item ahead of the result it waited for, and a pool thread one more)."""
    import time

    started = []

    def item(i):
        started.append(i)
        time.sleep(0.01)
        return i

    try:
        kernel.set_threads(2)
        results = kernel.map_in_order(item, list(range(kernel.ITEMS_PER_THREAD * 2 + 20)))
        assert [next(results), next(results)] == [0, 1]
        results.close()
        count = len(started)
        time.sleep(0.05)
    finally:
        kernel.set_threads(1)
    assert len(started) == count <= 2 + 2 * 2       # the two yielded, and at most two more per thread


def test_hpc_zsem_run_gives_the_same_image_on_one_and_two_threads(tmp_path):
    from conftest import run_cli
    from hpc_zsem.io.results import read_result

    results = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.h5"
        proc = run_cli(["run", "configs/demo.yaml", "--threads", threads, "--set", f"output.path={out}",
                        "--set", "training.epochs=4", "--set", "estimation.epochs=1", "--set", "model.H=16"],
                       cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr
        assert f"1 rank(s) × {threads} thread(s) per rank" in proc.stdout
        results.append(read_result(out))
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(results[0][name], results[1][name])
    np.testing.assert_array_equal(results[0]["params"]["W"], results[1]["params"]["W"])


def test_default_threads_follow_slurm_then_the_affinity_shared_by_the_node_ranks(monkeypatch):
    from hpc_zsem.parallel import default_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert [default_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert default_threads(4) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert default_threads(4) == 2


def test_counter_numbers_are_those_of_patch_random():
    """The kernel's SplitMix64 (used by evolution.draw for a PatchRandom) gives PatchRandom's numbers bit for
    bit, call after call, on one thread and split among two."""
    from hpc_zsem.variational import evolution

    ids = np.arange(1000, 1777)
    try:
        for threads in (1, 2):
            kernel.set_threads(threads)
            numpy_side, kernel_side = PatchRandom(3, 1, 5, ids), PatchRandom(3, 1, 5, ids)
            for size in [(777, 60), (777, 4, 70)]:
                np.testing.assert_array_equal(evolution._uniforms(kernel_side, size), numpy_side.random(size))
            for low, high, size in [(0, 64, (777, 20)), (1, 7, (777, 7)), (0, 256, (777, 3))]:
                got = evolution._integers(kernel_side, low, high, size)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, numpy_side.integers(low, high, size))
    finally:
        kernel.set_threads(1)


@njit
def _ranked(keys, first, buffers):
    slots = np.full(keys.size, -1)
    for i in range(keys.size):
        buffers[0][i] = kernel._order_code(keys[i])
    kernel._top_ranked(buffers, keys.size, first, slots)
    return slots[:first]


def test_rank_counting_gives_the_stable_order_with_ties_and_nan():
    """_top_ranked = the first entries of a stable argsort by decreasing key (ties by index; −0.0 = +0.0;
    NaN counts as −∞), whether the codes' upper halves order them, or only the whole codes (keys a few ulp apart),
    or ties force its last pass."""
    rng = np.random.default_rng(11)
    for trial in range(450):
        C = int(rng.integers(1, 90))
        keys = rng.normal(size=C)
        if trial % 3 == 1:                                      # ties, signed zeros, infinities, NaN
            keys = rng.choice([-np.inf, -1.5, -0.0, 0.0, 2.0, np.inf, np.nan], size=C)
        if trial % 3 == 2:                                      # distinct, but equal in their upper 32 bits
            keys = rng.choice([-3.0, 1.0, 250.0], size=C) * (1.0 + rng.permutation(C) * 2.0**-52)
        first = int(rng.integers(1, C + 1))
        expected = np.argsort(-np.where(np.isnan(keys), -np.inf, keys) + 0.0, kind="stable")[:first]
        np.testing.assert_array_equal(_ranked(keys, first, kernel.ranking_buffers(C)), expected)


def test_keep_best_with_tied_log_joints_equals_the_numpy_order():
    """Distinct states with equal log-joints (the tie-breaking pass) and duplicates, parents in order or not,
    any number of them: the S best distinct in the order of reference_es3c.best_distinct, and the same count of
    accepted states."""
    from reference_es3c import best_distinct, first_occurrence

    rng = np.random.default_rng(12)
    for trial in range(400):
        C, S = int(rng.integers(6, 40)), 5
        C0 = int(rng.integers(1, C + 1))                        # the first C0 candidates are the parents
        cand = rng.integers(0, C, size=C).astype(np.uint64)[:, None]
        rep = first_occurrence(cand[None])[0]
        lpj = rng.choice([-3.0, -1.0, -2.0, -1.0 - 2**-50], size=C)[rep]
        if trial % 3 == 0:                                      # parents already best first (a frozen-Θ step)
            order = np.argsort(-lpj[:C0], kind="stable")
            cand[:C0], lpj[:C0] = cand[:C0][order], lpj[:C0][order]
            rep = first_occurrence(cand[None])[0]
        new_K, new_lpj = np.empty((1, S, 1), dtype=np.uint64), np.empty((1, S))
        index = lambda: np.empty(C, dtype=np.int64)                             # noqa: E731
        accepted = kernel._keep_best(cand, lpj, rep, C, C0, 0, kernel.ranking_buffers(C), index(), index(), new_K,
                                     new_lpj)
        order, expected_accepted = best_distinct(cand[None], lpj[None], S)
        np.testing.assert_array_equal(new_K[0, :, 0], cand[order[0], 0])
        np.testing.assert_array_equal(new_lpj[0], lpj[order[0]])
        assert accepted == expected_accepted



@njit
def _exps(x, out):
    for i in range(x.shape[0]):
        out[i] = kernel._exp(x[i])


def test_vectorised_exp_is_within_one_ulp_of_numpy():
    """The posterior weights' eˣ (kernel._exp, a polynomial the compiler vectorises) over the whole range the
    weights take (x = log p(s, y) − max ≤ 0, down to total underflow) and beyond: within 1 ulp of numpy's exp
    where that is normal, equal to the smallest subnormals within 1 of them, and exact at 0, ±∞, NaN and the
    over/underflow limits."""
    rng = np.random.default_rng(5)
    x = np.concatenate([-rng.exponential(30.0, 200_000), rng.uniform(-760.0, 715.0, 100_000),
                        -rng.uniform(0.0, 1e-3, 10_000), rng.uniform(-1e-12, 1e-12, 1_000)])
    got = np.empty_like(x)
    _exps(x, got)
    with np.errstate(over="ignore"):
        expected = np.exp(x)
    normal = np.isfinite(expected) & (expected >= np.finfo(float).tiny)
    assert np.all(np.abs(got[normal] - expected[normal]) <= np.spacing(expected[normal]))
    assert np.all(np.abs(got[~normal & (x < 0)] - expected[~normal & (x < 0)]) <= 5e-324)
    assert np.all(np.isinf(got[~normal & (x > 0)]))
    specials = np.array([0.0, -0.0, -np.inf, np.inf, np.nan, -746.0, -1e300, 1e300])
    got = np.empty_like(specials)
    _exps(specials, got)
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, np.inf, np.nan, 0.0, 0.0, np.inf])


@njit
def _decoded(words, firsts, others):
    for c in range(words.shape[0]):
        firsts[c] = kernel._first_two(words, c)
        if firsts[c, 0] >= 3:
            kernel._active_units(words, c, firsts[c, 0], others)


@pytest.mark.parametrize("H", [8, 64, 130, 256])
def test_first_units_of_packed_states_equal_their_bits(H):
    """``_first_two`` (k and the first two active units; one word written out, else the loop over the words) and
    ``_active_units`` (all units of a state with k ≥ 3; one word with k ≤ 4 by clearing bits, else the loop) against
    the unpacked bits, for states with 0 … 6 active units anywhere in the words, the highest bits and word
    boundaries included."""
    rng = np.random.default_rng(H)
    W = -(-H // 64)
    bits = np.zeros((3000, W * 64), dtype=bool)
    for c in range(bits.shape[0]):
        k = c % 7
        pool = [0, 63, H - 1, H - 2] + ([64, 127] if H > 128 else []) if c % 3 == 0 else range(H)
        bits[c, rng.choice(np.array(pool), min(k, len(pool)), replace=False)] = True
    words = np.packbits(bits.reshape(-1, W, 8, 8)[..., ::-1], axis=-1).reshape(-1, W, 8).view("<u8")[..., 0]
    firsts, others = np.zeros((bits.shape[0], 3), dtype=np.int64), np.full((6, bits.shape[0]), -1)
    _decoded(np.ascontiguousarray(words), firsts, others)
    for c in range(bits.shape[0]):
        units = np.flatnonzero(bits[c])
        k = units.size
        first, second = (units[0], units[min(1, k - 1)]) if k else (0, 0)
        assert tuple(firsts[c]) == (k, first, second)
        if k >= 3:
            assert list(others[:k, c]) == list(units)


@pytest.mark.parametrize("H, pi", [(20, 0.3), (70, 0.1)])
def test_dense_e_steps_with_extended_factors_equal_the_numpy_e_step(H, pi):
    """Dense sets (data of a model with k ≈ 6 active units, π held: mean k > 3) with several children per parent
    and two generations, where children are scored by extending their parent's factor (``_score_extended``,
    inherited in the second generation): the same sets and statistics as the numpy E-step (a Cholesky factor per
    state)."""
    settings = EvolutionSettings(S=8, parents=4, children=3, generations=2)
    rng = np.random.default_rng(11)
    W = rng.normal(size=(24, H))
    Y = ((rng.random((120, H)) < pi) * rng.normal(3.0, 1.0, (120, H))) @ W.T + rng.normal(0.0, 0.5, (120, 24))
    new, old = SSSC(H, settings), ReferenceSSSC(H, settings)
    params = dict(start(new, Y, pi=pi), W=W, sigma2=np.array(0.25), psi=np.ones(H), mu=np.full(H, 3.0))
    K = assert_same_epochs(new, old, Y, params, lambda params, previous: dict(params, pi=previous["pi"]))
    k = np.unpackbits(K.view(np.uint8), axis=-1).sum(-1)
    assert k.mean() > 3, k.mean()


def test_extended_factors_score_children_as_the_direct_forms():
    """Children that add one unit to a parent with a factor get the log-joint of the direct forms (to 1e-12),
    also when the parent's factor was itself inherited (second generation); children that remove a unit, and
    parents outside EXTEND_MIN … EXTEND_MAX − 1 units, are left to ``_score``."""
    H, rng = 24, np.random.default_rng(4)
    W = rng.normal(size=(30, H))
    theta = kernel.theta_terms(W.T @ W, 2.0, rng.uniform(0.5, 2.0, H), rng.normal(size=H), rng.normal(size=H), -3.0)
    B, tails = rng.normal(size=(1, H)) * 5, np.array([-40.0])

    def words(units):
        return np.array([np.uint64(sum(1 << int(h) for h in units))], dtype=np.uint64)

    def direct(states):
        return kernel.posterior(theta, B, tails, np.ascontiguousarray(states[None]), 0)[0][0]

    parent_units = [rng.choice(H, k, replace=False) for k in (3, 5, 9, kernel.EXTEND_MAX, 2)]
    P, children = len(parent_units), 2
    cand = np.zeros((P + 2 * P * children, 1), dtype=np.uint64)
    flip_bit = np.zeros((2, 1, P * children), dtype=np.int64)
    for i, units in enumerate(parent_units):
        cand[i] = words(units)
        flip_bit[0, 0, 2 * i] = rng.choice(np.setdiff1d(np.arange(H), units))      # adds a unit
        flip_bit[0, 0, 2 * i + 1] = units[0]                                      # removes one
        for j in range(children):
            cand[P + 2 * i + j] = cand[i] ^ np.uint64(1 << int(flip_bit[0, 0, 2 * i + j]))
    lpj = np.full(len(cand), np.nan)
    lpj[:P] = direct(cand[:P])
    chosen, rep = np.arange(P), np.arange(len(cand))
    factors = kernel._factors(P, len(cand))
    assert kernel._factor_parents(0, cand, 0, chosen, P, children, rep, False, theta[1], theta[5], B[0], factors) == 3
    todo = np.arange(P, P + P * children)
    rest = kernel._score_extended(0, cand, P, P + P * children, 0, chosen, children, flip_bit, 0, todo, len(todo),
                                  lpj, theta[1], theta[5], B[0], factors)
    extended = [P + 2 * i for i in range(3)]                    # the unit-adding children of k = 3, 5, 9
    assert sorted(todo[:rest]) == sorted(set(range(P, P + P * children)) - set(extended))
    np.testing.assert_allclose(lpj[extended], direct(cand[extended]), rtol=1e-12)
    # second generation: the extended children as parents, each adding one more unit to its inherited factor
    start = P + P * children
    chosen2 = np.array([e - P for e in extended])
    assert kernel._factor_parents(1, cand, P, chosen2, 3, children, rep, True, theta[1], theta[5], B[0], factors) == 3
    for i, e in enumerate(extended):
        units = np.flatnonzero(np.unpackbits(cand[e].view(np.uint8), bitorder="little"))
        flip_bit[1, 0, children * i] = rng.choice(np.setdiff1d(np.arange(H), units))
        flip_bit[1, 0, children * i + 1] = units[-1]
        for j in range(children):
            cand[start + children * i + j] = cand[e] ^ np.uint64(1 << int(flip_bit[1, 0, children * i + j]))
    todo = np.arange(start, start + 3 * children)
    rest = kernel._score_extended(1, cand, start, start + 3 * children, P, chosen2, children, flip_bit, 0, todo,
                                  len(todo), lpj, theta[1], theta[5], B[0], factors)
    assert rest == 3
    second = [start + children * i for i in range(3)]
    np.testing.assert_allclose(lpj[second], direct(cand[second]), rtol=1e-12)


FIRST_RUN = """
import logging, numpy as np
logging.basicConfig(level=logging.INFO, format="%(message)s")
from hpc_zsem.variational import kernel
kernel.set_threads({threads})
kernel.ensure_compiled()
print("search loaded from the cache:", sum(kernel.evolve_range.stats.cache_hits.values()) > 0)
theta = kernel.theta_terms(np.eye(4) * 2, 1.0, np.ones(4), np.zeros(4), np.zeros(4), -1.0)
K = np.array([[[1], [3], [7], [15]]], dtype=np.uint64)
print("log-joints", kernel.posterior(theta, np.ones((1, 4)), np.zeros(1), K, 0)[0].tolist())
"""


def first_run(tmp_path, threads):
    """A process that compiles the kernels into an empty numba cache; its output and log."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"cache{threads}"))
    done = subprocess.run([sys.executable, "-c", FIRST_RUN.format(threads=threads)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_first_run_with_two_threads_compiles_the_search_in_a_helper_process(tmp_path):
    """An empty cache and 2 kernel threads: the search kernel is compiled by a helper process meanwhile and
    loaded from the cache (logged); the kernels give the numbers of a 1-thread first run (no helper)."""
    out2, log2 = first_run(tmp_path, 2)
    out1, log1 = first_run(tmp_path, 1)
    assert "the search in a second process" in log2 and "search loaded from the cache: True" in out2
    assert "compiling kernels" in log1 and "second process" not in log1 and "cache: False" in out1
    assert out2.splitlines()[-1] == out1.splitlines()[-1]


def test_a_helper_that_cannot_start_leaves_the_compilation_to_this_process(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    assert kernel._search_compiler() is None
