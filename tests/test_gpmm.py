"""Tests of the Gamma-Poisson mixture (hpc_zsem.models.gpmm): exact posteriors, EM, estimator, M-step repairs."""
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma

from hpc_zsem.errors import InputError
from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.gpmm import GPMM, _posterior, _solve_gamma_shape


def small_params(rng, C=3, D=4):
    W = rng.uniform(0.2, 1.5, size=(C, D))
    return {"W": W, "pi": np.array([0.5, 0.3, 0.2])[:C], "alpha": np.array([2.0, 4.0, 1.5])[:C],
            "beta": np.array([0.5, 0.4, 0.1])[:C]}


def brute_force_joint(y, params):
    """p(y, c) for every c by numerical integration of Gamma(z; α, β) · Π_d Poisson(y_d; z W_cd) over z."""
    out = []
    for W_c, pi_c, a, b in zip(params["W"], params["pi"], params["alpha"], params["beta"]):
        def integrand(z):
            return stats.gamma.pdf(z, a, scale=1.0 / b) * np.prod(stats.poisson.pmf(y, z * W_c))
        val, _ = integrate.quad(integrand, 0.0, np.inf, limit=200, epsabs=0.0, epsrel=1e-10)
        out.append(pi_c * val)
    return np.array(out)


def test_posterior_matches_numerical_integration():
    rng = np.random.default_rng(0)
    params = small_params(rng)
    Y = np.array([[0, 1, 3, 2], [5, 0, 0, 1], [2, 2, 2, 2], [0, 0, 0, 0], [7, 3, 9, 1]], dtype=float)
    post = _posterior(Y, params)
    for n, y in enumerate(Y):
        joint = brute_force_joint(y, params)
        np.testing.assert_allclose(post.resp[n], joint / joint.sum(), rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(post.log_py[n], np.log(joint.sum()), rtol=1e-8)


def test_free_energy_is_exact_log_likelihood():
    rng = np.random.default_rng(1)
    params = small_params(rng)
    Y = np.array([[0, 1, 3, 2], [5, 0, 0, 1]], dtype=float)
    _, st = GPMM(3, "per_class").e_step(Y, params, None, rng)
    expected = sum(np.log(brute_force_joint(y, params).sum()) for y in Y)
    np.testing.assert_allclose(st["free_energy"], expected, rtol=1e-8)
    assert st["N"] == 2.0 and st["free_energy"].shape == ()


def test_scale_symmetry_leaves_likelihood_unchanged():
    rng = np.random.default_rng(2)
    params = small_params(rng)
    k = np.array([2.0, 0.3, 7.0])
    scaled = dict(params, W=params["W"] / k[:, None], beta=params["beta"] / k)
    Y = rng.poisson(5.0, size=(50, 4)).astype(float)
    np.testing.assert_allclose(_posterior(Y, params).log_py, _posterior(Y, scaled).log_py, rtol=1e-12)


def test_gamma_shape_solver():
    alpha = np.array([1e-3, 0.05, 0.7, 1.0, 3.0, 40.0, 1e4, 1e6])
    s = np.log(alpha) - digamma(alpha)
    np.testing.assert_allclose(_solve_gamma_shape(s), alpha, rtol=1e-8)


def generating_params():
    D = 16
    grid = np.arange(D).reshape(4, 4)
    row, col = np.divmod(grid, 4)
    W = np.stack([(col + 0.5).ravel(), (row + 0.5).ravel(),
                  np.exp(-((row - 1.5) ** 2 + (col - 1.5) ** 2) / 1.5).ravel() + 0.05])
    W /= W.sum(axis=1, keepdims=True)
    return {"W": W, "pi": np.array([0.5, 0.3, 0.2]), "alpha": np.array([8.0, 3.0, 20.0]),
            "beta": np.array([8.0 / 60.0, 3.0 / 40.0, 20.0 / 100.0])}


def sample_gpmm(params, N, rng):
    c = rng.choice(len(params["pi"]), size=N, p=params["pi"])
    z = rng.gamma(params["alpha"][c], 1.0 / params["beta"][c])
    return rng.poisson(z[:, None] * params["W"][c]).astype(float)


@pytest.mark.parametrize("gamma", ["per_class", "shared"])
def test_em_increases_likelihood_and_recovers_parameters(gamma):
    rng = np.random.default_rng(3)
    truth = generating_params()
    Y = sample_gpmm(truth, 20000, rng)
    model = GPMM(3, gamma)
    params = model.init_params(PatchSummary.from_patches(Y), Y[:2000], np.random.default_rng(4))
    history = []
    for _ in range(30):
        _, st = model.e_step(Y, params, None, rng)
        history.append(float(st["free_energy"]))
        params = model.m_step(params, st)
    history = np.array(history)
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    W_est = params["W"] / params["W"].sum(axis=1, keepdims=True)   # compare shapes (the "shared" scale is global)
    cost = np.abs(truth["W"][:, None, :] - W_est[None, :, :]).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    # Tolerances: W entries are ~1/16 ≈ 0.06; 0.01 absolute is ≈ 15 % of an entry; π within 0.02.
    np.testing.assert_allclose(W_est[cols], truth["W"][rows], atol=0.01)
    np.testing.assert_allclose(params["pi"][cols], truth["pi"][rows], atol=0.02)
    if gamma == "per_class":   # S_c = 1 as in the truth, so α and the mean intensity α/β are identifiable
        np.testing.assert_allclose(params["alpha"][cols], truth["alpha"][rows], rtol=0.25)
        np.testing.assert_allclose((params["alpha"] / params["beta"])[cols],
                                   (truth["alpha"] / truth["beta"])[rows], rtol=0.05)


def test_estimator_matches_monte_carlo():
    rng = np.random.default_rng(5)
    params = small_params(rng)
    Y = np.array([[1, 4, 0, 2], [6, 6, 1, 9]], dtype=float)
    est = GPMM(3).estimate(Y, params, None)
    post = _posterior(Y, params)
    n_mc = 200_000
    for n in range(len(Y)):
        c = rng.choice(3, size=n_mc, p=post.resp[n])
        z = rng.gamma(post.shape[n, c], 1.0 / post.rate[c])
        draws = z[:, None] * params["W"][c]
        se = draws.std(axis=0) / np.sqrt(n_mc)
        assert np.all(np.abs(draws.mean(axis=0) - est[n]) < 5.0 * se)


@pytest.mark.parametrize("gamma", ["per_class", "shared"])
def test_m_step_repairs_unused_class_deterministically(gamma):
    rng = np.random.default_rng(6)
    truth = generating_params()
    Y = sample_gpmm(truth, 500, rng)
    model = GPMM(3, gamma)
    params = model.init_params(PatchSummary.from_patches(Y), Y, np.random.default_rng(7))
    _, st = model.e_step(Y, params, None, rng)
    for key in ("R", "RZ", "RLZ"):
        st[key][1] = 0.0
    st["RY"][1] = 0.0
    first, second = model.m_step(params, st), model.m_step(params, st)
    for key in first:
        assert np.all(np.isfinite(first[key])), key
        np.testing.assert_array_equal(first[key], second[key])
    assert np.all(first["W"] > 0) and np.all(first["beta"] > 0) and np.all(first["alpha"] > 0)
    assert 0.0 < first["pi"][1] < 1e-6 and np.isclose(first["pi"].sum(), 1.0)
    if gamma == "per_class":
        np.testing.assert_allclose(first["W"][1], params["W"][1])
        assert first["alpha"][1] == params["alpha"][1]
    _, st2 = model.e_step(Y, first, None, rng)           # the repaired params still give finite statistics
    assert all(np.all(np.isfinite(v)) for v in st2.values())


def test_init_is_deterministic_and_handles_small_samples():
    rng = np.random.default_rng(8)
    Y = sample_gpmm(generating_params(), 5, rng)
    model = GPMM(12, "per_class")
    summary = PatchSummary.from_patches(Y)
    a = model.init_params(summary, Y, np.random.default_rng(9))
    b = model.init_params(summary, Y, np.random.default_rng(9))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == np.float64
    assert a["W"].shape == (12, 16) and np.allclose(a["W"].sum(axis=1), 1.0)
    assert np.all(a["W"] > 0) and np.all(a["alpha"] > 0) and np.all(a["beta"] > 0)
    assert len({row.tobytes() for row in a["W"]}) == 12          # no two classes coincide
    assert model.init_block_state(Y, a, rng) is None
    assert np.isnan(model.noise_variance(a))


def test_negative_patches_are_refused():
    Y = np.array([[1.0, -2.0], [0.0, 3.0]])
    with pytest.raises(InputError):
        GPMM(2).init_params(PatchSummary.from_patches(Y), Y, np.random.default_rng(0))


def test_non_integer_counts_are_accepted():
    rng = np.random.default_rng(10)
    params = small_params(rng)
    Y = rng.gamma(2.0, 1.5, size=(20, 4))
    _, st = GPMM(3).e_step(Y, params, None, rng)
    assert np.isfinite(st["free_energy"]) and np.isclose(st["R"].sum(), 20.0)
