"""The estimation path (hpc_zsem.estimation): fresh truncated sets under a trained Θ start at the posterior mass
of a patch seen for the first time. (That every tiling, rank count and training sample give the same pixels is
tested end to end in tests/test_mosaic.py.)"""
import numpy as np

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.variational.evolution import EvolutionSettings
from hpc_zsem.variational.kernel import posterior
from hpc_zsem.variational.states import unpack


def _sparse_data(H=24, D=64, N=400, seed=0):
    """Patches y = W_A z_A + noise with 1 or 2 active units A per patch (the generating states), and Θ."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0.0, 1.0, (D, H))
    states = np.zeros((N, H), dtype=bool)
    for n in range(N):
        states[n, rng.choice(H, size=1 + n % 2, replace=False)] = True
    z = rng.normal(3.0, 0.5, (N, H))
    Y = (states * z) @ W.T + rng.normal(0.0, 0.3, (N, D))
    params = {"W": W, "pi": np.full(H, 1.5 / H), "mu": np.full(H, 3.0), "psi": np.full(H, 0.25),
              "sigma2": np.array(0.09)}
    return Y, params, states


def _best_states(model, Y, params, K):
    lpj = posterior(*model._scorer(Y, params), K, 0)[0]
    return unpack(K[np.arange(len(K)), lpj.argmax(axis=1)], model.H)


def test_a_fresh_set_holds_the_generating_single_and_pair_states():
    Y, params, states = _sparse_data()
    model = SSSC(states.shape[1], EvolutionSettings(S=20, parents=5, children=2))
    K = model.init_block_state(Y, params, PatchRandom(0, 1, 0, np.arange(len(Y))))   # no frozen E-steps
    assert K.shape == (len(Y), 20, 1)
    best = _best_states(model, Y, params, K)
    assert (best == states).all(axis=1).mean() > 0.97          # the generating state is the most probable one
    distinct = [len({row.tobytes() for row in K[n]}) for n in range(len(K))]
    assert min(distinct) == 20                                   # S distinct states for every patch


def test_frozen_e_steps_only_improve_a_fresh_set():
    Y, params, states = _sparse_data(seed=1)
    model = SSSC(states.shape[1], EvolutionSettings(S=12, parents=4, children=2))
    ids = np.arange(len(Y))
    start = model.init_block_state(Y, params, PatchRandom(0, 1, 0, ids))
    refined = model.init_block_state(Y, params, PatchRandom(0, 1, 0, ids),
                                     [PatchRandom(0, 3, e, ids) for e in range(1, 4)])
    scorer = model._scorer(Y, params)
    before, after = posterior(*scorer, start, 0)[1], posterior(*scorer, refined, 0)[1]
    assert np.all(after >= before - 1e-9) and np.any(after > before)   # log Σ_{s∈K} p(s, y) never decreases


def _one_by_one(estimate, Y, ids):
    return np.concatenate([estimate(Y[i:i + 1], ids[i:i + 1]) for i in range(len(Y))])


def test_a_patch_estimate_does_not_depend_on_its_batch():
    """12×12 patches (D = 144, where BLAS rounds a row differently for batches of up to ~65 rows) and GPMM:
    estimating patches one by one gives the same bits as one batch (the tiling of the estimation pass decides
    the batches)."""
    from hpc_zsem.config import config_from_dict
    from hpc_zsem.estimation import estimate_patches
    from hpc_zsem.models.gpmm import GPMM

    Y, params, _ = _sparse_data(D=144, N=90, seed=2)
    ids = np.arange(1000, 1000 + len(Y))
    config = config_from_dict({"input": {"path": "x.tif"}, "output": {"path": "x.h5"}, "estimation": {"epochs": 2},
                          "truncation": {"S": 10, "parents": 4}})
    sssc = SSSC(params["W"].shape[1], EvolutionSettings(S=10, parents=4))

    def by_sssc(Y_part, ids_part):
        return estimate_patches(config, sssc, params, Y_part, ids_part)

    np.testing.assert_array_equal(_one_by_one(by_sssc, Y, ids), by_sssc(Y, ids))
    counts = np.random.default_rng(3).poisson(4.0, (90, 144)).astype(np.float64)
    gpmm = GPMM(C=7)
    theta = gpmm.init_params(PatchSummary.from_patches(counts), counts[:20], np.random.default_rng(4))
    np.testing.assert_array_equal(_one_by_one(lambda y, i: gpmm.estimate(y, theta, None), counts, ids),
                                  gpmm.estimate(counts, theta, None))
