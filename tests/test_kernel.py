"""The compiled E-step kernel against the previous pure-numpy E-step (tests/reference_es3c.py): the same
truncated sets — states and their order — for every option combination, log-joints and statistics equal to
rounding, and results that depend neither on the thread count nor on the block size."""
import itertools
from pathlib import Path

import numpy as np
import pytest

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
    """Three epochs (init, E-step, M-step) from the same start: identical truncated sets and statistics."""
    options = dict(options)
    psi, H = options.pop("psi"), options.pop("H")
    settings = EvolutionSettings(S=7, parents=4, **options)
    Y = data()
    new, old = SSSC(H, settings, psi), ReferenceSSSC(H, settings, psi)
    params = start(new, Y)
    ids = np.arange(Y.shape[0])
    K_new = new.init_block_state(Y, params, PatchRandom(0, 0, 0, ids))
    K_old = old.init_block_state(Y, params, PatchRandom(0, 0, 0, ids))
    np.testing.assert_array_equal(K_new, K_old)
    for epoch in range(3):
        step_new = new.e_step(Y, params, K_new, PatchRandom(0, 1, epoch, ids))
        step_old = old.e_step(Y, params, K_old, PatchRandom(0, 1, epoch, ids))
        assert_same_e_step(step_new, step_old)
        (K_new, _), (K_old, stats) = step_new, step_old
        params = well_conditioned(old.m_step(params, stats))


@pytest.mark.parametrize("psi", ["diag", "full"])
def test_refine_init_and_estimate_equal_the_numpy_e_step(psi):
    H = 12
    settings = EvolutionSettings(S=10, parents=5, children=2, generations=2)
    Y = data(N=150, D=16, seed=3)
    new, old = SSSC(H, settings, psi), ReferenceSSSC(H, settings, psi)
    params = start(new, Y, pi=0.2)
    ids = np.arange(Y.shape[0])
    rngs = lambda: [PatchRandom(0, 2, e, ids) for e in range(3)]            # noqa: E731
    K_new = new.init_block_state(Y, params, PatchRandom(0, 0, 0, ids), rngs())
    K_old = old.init_block_state(Y, params, PatchRandom(0, 0, 0, ids), rngs())
    np.testing.assert_array_equal(K_new, K_old)
    np.testing.assert_array_equal(new.refine(Y, params, K_new, rngs()), old.refine(Y, params, K_old, rngs()))
    estimate_new, estimate_old = new.estimate(Y, params, K_new), old.estimate(Y, params, K_old)
    assert np.abs(estimate_new - estimate_old).max() <= 1e-12 * np.abs(estimate_old).max()


def test_numpy_generators_give_the_same_sets_as_before():
    """An e_step driven by a numpy Generator (tests, tools) draws the same numbers as the numpy E-step did."""
    H, settings = 10, EvolutionSettings(S=8, parents=3, children=2, crossover=True, mutation="sparse")
    Y = data(seed=5)
    new, old = SSSC(H, settings), ReferenceSSSC(H, settings)
    params = start(new, Y)
    K = new.init_block_state(Y, params, np.random.default_rng(1))
    np.testing.assert_array_equal(K, old.init_block_state(Y, params, np.random.default_rng(1)))
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
