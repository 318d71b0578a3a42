"""SSSC maths: information-form log-joints, exact posteriors with S = 2^H, EM monotonicity, recovery."""
import itertools

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.sssc import SSSC, kmeans_centroids
from hpc_zsem.variational.evolution import EvolutionSettings
from hpc_zsem.variational.kernel import posterior
from hpc_zsem.variational.states import pack


def random_params(rng, D, H, full_psi):
    A = rng.standard_normal((H, H))
    psi = A @ A.T / H + 0.5 * np.eye(H) if full_psi else rng.uniform(0.3, 2.0, H)
    return {"W": rng.standard_normal((D, H)), "pi": rng.uniform(0.1, 0.6, H), "mu": rng.standard_normal(H),
            "psi": psi, "sigma2": np.array(0.7)}


def direct_log_joint(y, s, p):
    """log p(s) + log N(y; W_A μ_A, σ² I + W_A Ψ_AA W_Aᵀ), built as the full D×D Gaussian."""
    A = np.flatnonzero(s)
    W, pi = p["W"], p["pi"]
    psi = p["psi"] if p["psi"].ndim == 2 else np.diag(p["psi"])
    log_prior = np.sum(np.where(s, np.log(pi), np.log1p(-pi)))
    cov = p["sigma2"] * np.eye(W.shape[0]) + W[:, A] @ psi[np.ix_(A, A)] @ W[:, A].T
    return log_prior + multivariate_normal(W[:, A] @ p["mu"][A], cov).logpdf(y)


def all_states(H):
    return np.array(list(itertools.product([0, 1], repeat=H)), dtype=bool)


@pytest.mark.parametrize("full_psi", [False, True])
def test_information_form_equals_direct_gaussian(full_psi):
    rng = np.random.default_rng(1)
    D, H, N = 7, 5, 4
    p = random_params(rng, D, H, full_psi)
    Y = rng.standard_normal((N, D)) * 2
    states = all_states(H)
    model = SSSC(H, EvolutionSettings(S=len(states)), psi="full" if full_psi else "diag")
    K = np.broadcast_to(pack(states), (N, len(states), 1))
    lpj = posterior(*model._scorer(Y, p), K, 0)[0]
    expected = [[direct_log_joint(y, s, p) for s in states] for y in Y]
    np.testing.assert_allclose(lpj, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("full_psi", [False, True])
def test_information_form_with_several_words_and_many_active_units(full_psi):
    """States spread over two words (H = 70) with k up to 9 active units (the k×k factorisation path)."""
    rng = np.random.default_rng(11)
    D, H, N = 24, 70, 3
    p = random_params(rng, D, H, full_psi)
    Y = rng.standard_normal((N, D)) * 2
    states = np.zeros((8, H), dtype=bool)
    for row, k in enumerate([0, 1, 2, 3, 4, 5, 7, 9]):
        states[row, rng.choice(H, size=k, replace=False)] = True
    states[3] = False
    states[3, [10, 66, 69]] = True                                  # a state with units in both words
    model = SSSC(H, EvolutionSettings(S=len(states)), psi="full" if full_psi else "diag")
    lpj = posterior(*model._scorer(Y, p), np.broadcast_to(pack(states), (N, len(states), 2)), 0)[0]
    expected = [[direct_log_joint(y, s, p) for s in states] for y in Y]
    np.testing.assert_allclose(lpj, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("full_psi", [False, True])
def test_posterior_mean_of_one_state_is_the_gaussian_conditional_mean(full_psi):
    """With one state per set (q = 1), ⟨s⊙z⟩_n is E[z_A | y_n, s] = M_A⁻¹ (Ψ_AA⁻¹ μ_A + W_Aᵀ y_n/σ²) scattered to
    A, for every k (k = 3, 4 take the bordered pair form with a diagonal Ψ, larger k the factorisation)."""
    rng = np.random.default_rng(5)
    D, H, N = 12, 9, 4
    p = random_params(rng, D, H, full_psi)
    Y = rng.standard_normal((N, D)) * 2
    model = SSSC(H, EvolutionSettings(S=1), psi="full" if full_psi else "diag")
    psi = p["psi"] if full_psi else np.diag(p["psi"])
    for k in range(H + 1):
        state = np.zeros(H, dtype=bool)
        state[rng.choice(H, size=k, replace=False)] = True
        A = np.flatnonzero(state)
        K = np.broadcast_to(pack(state[None]), (N, 1, 1))
        mean_sz = posterior(*model._scorer(Y, p), K, 1)[2]
        W_A, psi_inv = p["W"][:, A], np.linalg.inv(psi[np.ix_(A, A)])
        M = psi_inv + W_A.T @ W_A / p["sigma2"]
        expected = np.zeros((N, H))
        expected[:, A] = np.linalg.solve(M, (psi_inv @ p["mu"][A])[:, None] + W_A.T @ Y.T / p["sigma2"]).T
        np.testing.assert_allclose(mean_sz, expected, rtol=1e-10, atol=1e-10)


def exact_model(H, S, psi="diag"):
    return SSSC(H, EvolutionSettings(S=S, parents=min(2, S), children=1), psi=psi)


def sample_sssc(rng, p, N):
    H = p["pi"].size
    s = rng.random((N, H)) < p["pi"]
    z = rng.normal(p["mu"], np.sqrt(p["psi"]), (N, H))
    return (s * z) @ p["W"].T + rng.normal(0, np.sqrt(p["sigma2"]), (N, p["W"].shape[0]))


def _patches_of(image, size=8):
    from hpc_zsem.patches import PatchGrid

    grid = PatchGrid(image.shape, (size, size))
    return grid.extract(image, np.arange(grid.n_patches))


@pytest.mark.parametrize("sigma", [5.0, 25.0])
def test_noise_level_from_the_patch_covariance(sigma):
    """σ̂ from the smallest eigenvalue of the 8×8 patch covariance (Marchenko–Pastur corrected): within 3 % of σ
    for white noise alone and for noise on a structured image (edges, ramps, blobs: structure in many but not
    all 64 directions)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:160, :160]
    scene = 80 * (x > 70) + 0.6 * y + 60 * np.exp(-((x - 40) ** 2 + (y - 110) ** 2) / 200.0) + 30 * np.sin(x / 9.0)
    for clean in (np.zeros((160, 160)), scene):
        noisy = clean + rng.normal(0, sigma, clean.shape)
        estimate = np.sqrt(PatchSummary.from_patches(_patches_of(noisy)).noise_variance())
        assert estimate == pytest.approx(sigma, rel=0.03)


def test_sigma_pca_is_estimated_once_and_held_by_every_m_step():
    rng = np.random.default_rng(4)
    truth = random_params(rng, 16, 6, full_psi=False)
    Y = sample_sssc(rng, truth, 3000)
    summary = PatchSummary.from_patches(Y)
    model = SSSC(6, EvolutionSettings(S=8, parents=4, children=2), sigma="pca")
    params = model.init_params(summary, Y[:50], np.random.default_rng(0))
    assert float(params["sigma2"]) == summary.noise_variance()
    K = model.init_block_state(Y, params, np.random.default_rng(1))
    free_energies = []
    for epoch in range(6):
        K, stats = model.e_step(Y, params, K, np.random.default_rng(epoch))
        free_energies.append(float(stats["free_energy"]))
        params = model.m_step(params, stats)
        assert float(params["sigma2"]) == summary.noise_variance()
    assert free_energies[-1] > free_energies[0]
    with pytest.raises(ValueError, match="sigma must be one of"):
        SSSC(6, EvolutionSettings(S=8), sigma="told")


@pytest.mark.parametrize("psi", ["diag", "full"])
def test_full_truncation_is_exact_and_em_is_monotone(psi):
    rng = np.random.default_rng(2)
    D, H, N = 6, 3, 300
    truth = random_params(rng, D, H, full_psi=False)
    Y = sample_sssc(rng, truth, N)
    model = exact_model(H, 2**H, psi)
    params = model.init_params(PatchSummary.from_patches(Y), Y[:10], np.random.default_rng(0))
    K = model.init_block_state(Y, params, np.random.default_rng(1))
    assert sorted(map(int, K[0, :, 0])) == list(range(2**H))   # every state present
    free_energies = []
    for epoch in range(25):
        K, stats = model.e_step(Y, params, K, np.random.default_rng(epoch))
        p_dense = dict(params)
        if psi == "diag":
            exact = sum(logsumexp([direct_log_joint(y, s, p_dense) for s in all_states(H)]) for y in Y[:20])
            n20 = posterior(*model._scorer(Y[:20], params), K[:20], 0)[1].sum()
            assert n20 == pytest.approx(exact, rel=1e-9)   # truncated free energy = log-likelihood
        free_energies.append(float(stats["free_energy"]))
        params = model.m_step(params, stats)
    assert np.all(np.diff(free_energies) >= -1e-8 * np.abs(free_energies[1:])), free_energies


def bars_params(side=4, noise=0.1):
    H = 2 * side
    W = np.zeros((side * side, H))
    for i in range(side):
        W[:, i] = np.eye(side)[i].repeat(side) * 1.0          # horizontal bar i (rows of the image)
        W[:, side + i] = np.tile(np.eye(side)[i], side)       # vertical bar i
    return {"W": W * 5.0, "pi": np.full(H, 2.0 / H), "mu": np.full(H, 1.0), "psi": np.full(H, 0.05),
            "sigma2": np.array(noise)}


def test_recovers_bars():
    rng = np.random.default_rng(3)
    truth = bars_params()
    Y = sample_sssc(rng, truth, 3000)
    H = truth["pi"].size
    model = SSSC(H, EvolutionSettings(S=12, parents=6, children=2, generations=2))
    params = model.init_params(PatchSummary.from_patches(Y), Y[:10], np.random.default_rng(0))
    K = model.init_block_state(Y, params, np.random.default_rng(1))
    for epoch in range(60):
        K, stats = model.e_step(Y, params, K, np.random.default_rng(100 + epoch))
        params = model.m_step(params, stats)
    assert float(params["sigma2"]) == pytest.approx(0.1, rel=0.3)
    # every generating bar is matched by a learned column (up to scale with μ): cosine similarity > 0.95
    learned = params["W"] * params["mu"]
    cos = (truth["W"].T @ learned) / np.outer(np.linalg.norm(truth["W"], axis=0), np.linalg.norm(learned, axis=0))
    assert np.all(cos.max(axis=1) > 0.95), cos.max(axis=1)
    assert np.allclose(np.sort(params["pi"]), 2.0 / H, atol=0.08)


def test_refine_leaves_the_states_of_repeated_e_steps():
    """Frozen-Θ refinement (streamed estimation) must give the truncated sets that e_step calls with the same
    random streams give — it only skips the statistics — and sets that are at least as good as the start."""
    rng = np.random.default_rng(4)
    truth = bars_params()
    Y = sample_sssc(rng, truth, 400)
    model = SSSC(truth["pi"].size, EvolutionSettings(S=6, parents=3, children=2, generations=2))
    K0 = model.init_block_state(Y, truth, np.random.default_rng(1))
    K = K0
    for epoch in range(3):
        K, _ = model.e_step(Y, truth, K, np.random.default_rng(10 + epoch))
    refined = model.refine(Y, truth, K0, [np.random.default_rng(10 + epoch) for epoch in range(3)])
    np.testing.assert_array_equal(refined, K)
    fresh = model.init_block_state(Y, truth, np.random.default_rng(1),
                                   [np.random.default_rng(10 + e) for e in range(3)])
    np.testing.assert_array_equal(fresh, K)                  # init and refinement in one call: the same sets
    free_energy = [model.e_step(Y, truth, k, np.random.default_rng(0))[1]["free_energy"] for k in (K0, refined)]
    assert free_energy[1] > free_energy[0]


def test_degenerate_m_step_is_repaired_deterministically(caplog):
    """A never-used latent, a singular S_szsz and σ² → 0 give finite parameters, identical on every call
    (every MPI rank computes the same), and the repairs are logged once."""
    rng = np.random.default_rng(5)
    H, D, N = 4, 6, 50.0
    model = SSSC(H, EvolutionSettings(S=4, parents=2))
    old = random_params(rng, D, H, full_psi=False)
    Z = rng.standard_normal((200, H))
    Z[:, 2] = 0.0                                       # latent 2 never used
    Z[:, 3] = Z[:, 1]                                   # latents 1 and 3 identical: S_szsz singular
    Y = Z @ old["W"].T                                  # noiseless: σ² → 0
    stats = {"N": np.array(N), "S_s": np.array([30.0, 20.0, 0.0, 20.0]), "S_sz": Z.sum(0) / 4,
             "S_szsz": Z.T @ Z, "S_ysz": Y.T @ Z, "yy": np.array(np.sum(Y * Y))}
    with caplog.at_level("INFO", logger="hpc_zsem"):
        first = model.m_step(old, stats)
        second = model.m_step(old, stats)
    for key in first:
        assert np.all(np.isfinite(first[key])), key
        np.testing.assert_array_equal(first[key], second[key])
    np.testing.assert_array_equal(first["W"][:, 2], old["W"][:, 2])
    assert first["mu"][2] == old["mu"][2] and first["psi"][2] == old["psi"][2]
    assert float(first["sigma2"]) > 0
    repairs = [r.message for r in caplog.records if "M-step repair" in r.message]
    assert len(repairs) == 2 and any("used by no patch" in m for m in repairs) and any("σ²" in m for m in repairs)


# ----------------------------------------------------------------- initialisation of W (model.init)
def _init(init, H, Y, seed=0):
    model = SSSC(H, EvolutionSettings(S=4, parents=2), init=init)
    return model.init_params(PatchSummary.from_patches(Y), Y, np.random.default_rng(seed))


def test_pca_init_reproduces_the_leading_components_of_the_sample():
    """W's columns are the sample's principal directions (second moments, largest first), scaled by √λ."""
    rng = np.random.default_rng(20)
    D, N = 12, 4000
    Q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    scales = np.array([9.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2])
    Y = (rng.standard_normal((N, D)) * scales) @ Q.T          # zero mean: second moments = covariance
    values, vectors = np.linalg.eigh(Y.T @ Y / N)
    values, vectors = values[::-1], vectors[:, ::-1]
    H = 5
    W = _init("pca", H, Y)["W"]
    assert W.shape == (D, H)
    cos = np.abs(np.sum(W * vectors[:, :H], axis=0)) / np.linalg.norm(W, axis=0)
    assert np.all(cos > 0.995), cos               # (the init adds 0.01·√σ²₀ noise per entry)
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), np.sqrt(values[:H]), rtol=0.02)
    # the sample's truth, too: the leading directions of the generating covariance
    assert np.all(np.abs(np.sum(W / np.linalg.norm(W, axis=0) * Q[:, :H], axis=0)) > 0.99)


def test_pca_init_fills_the_leading_half_and_leaves_the_rest_random():
    """Only the leading ⌈D/2⌉ directions come from the PCA (the trailing ones of a noisy sample are noise); the
    other columns are the random init's (mean patch + noise), drawn from the same random stream."""
    rng = np.random.default_rng(21)
    D, N, H = 6, 500, 10
    Y = rng.standard_normal((N, D)) * 3 + 50.0
    W = _init("pca", H, Y)["W"]
    mean = Y.mean(0)
    assert abs(np.dot(W[:, 0], mean)) / (np.linalg.norm(W[:, 0]) * np.linalg.norm(mean)) > 0.99  # DC first
    values, vectors = np.linalg.eigh(Y.T @ Y / N)
    cos = np.abs(np.sum(W[:, :3] * vectors[:, ::-1][:, :3], axis=0)) / np.linalg.norm(W[:, :3], axis=0)
    assert np.all(cos > 0.99), cos
    np.testing.assert_array_equal(W[:, 3:], _init("random", H, Y)["W"][:, 3:])


def test_kmeans_init_finds_well_separated_cluster_centres():
    rng = np.random.default_rng(22)
    D, H = 8, 6
    centres = rng.uniform(-100, 100, (H, D))
    Y = centres[rng.integers(H, size=3000)] + rng.standard_normal((3000, D))
    found = kmeans_centroids(Y, H, np.random.default_rng(0))
    dist = np.linalg.norm(found[:, None, :] - centres[None, :, :], axis=2)
    assert sorted(dist.argmin(axis=1)) == list(range(H))          # one centroid per cluster
    assert dist.min(axis=1).max() < 0.3                            # at its centre (± noise/√(N/H))
    W = _init("kmeans", H, Y)["W"]                                 # the model's W: these centroids + small noise
    tie_noise = 0.01 * np.sqrt(Y.var(0).mean()) * np.sqrt(D)
    dist = np.linalg.norm(W.T[:, None, :] - centres[None, :, :], axis=2)
    assert sorted(dist.argmin(axis=1)) == list(range(H)) and dist.min(axis=1).max() < 0.3 + 3 * tie_noise


@pytest.mark.parametrize("init", ["random", "pca", "kmeans"])
def test_init_is_deterministic_and_the_rest_of_theta_is_shared(init):
    rng = np.random.default_rng(23)
    Y = rng.standard_normal((300, 9)) * 4 + 10
    a, b = _init(init, 16, Y, seed=3), _init(init, 16, Y, seed=3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert np.all(np.isfinite(a["W"])) and a["W"].shape == (9, 16)
    np.testing.assert_array_equal(a["pi"], np.full(16, 2.0 / 16))
    assert float(a["sigma2"]) == pytest.approx(Y.var(0).mean())


def test_kmeans_init_with_fewer_distinct_patches_than_latents():
    Y = np.repeat(np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]), 20, axis=0)
    W = _init("kmeans", 8, Y)["W"]
    assert np.all(np.isfinite(W)) and W.shape == (3, 8)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        SSSC(4, EvolutionSettings(S=4, parents=2), init="svd")
