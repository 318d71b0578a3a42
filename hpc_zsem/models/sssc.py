"""Spike-and-slab sparse coding (SSSC) with truncated posteriors improved by evolutionary search (ES3C).

Generative model (DESIGN.md §1.1):
    s ∈ {0,1}^H,  p(s) = Π_h π_h^{s_h} (1−π_h)^{1−s_h};   z ~ N(μ, Ψ);   y | s, z ~ N(W (s⊙z), σ² I_D)

For a state with active set A (k = |A|) the slab integrates out. With the H×H Gram matrix G = WᵀW and
b = Wᵀy, in the k×k information form (never the D×D covariance):
    M_A = Ψ_AA⁻¹ + G_AA/σ²,   r = Ψ_AA⁻¹ μ_A + b_A/σ²,   m = M_A⁻¹ r = E[z_A | s, y]
    log p(y, s) = log p(s) − D/2·log(2πσ²) − ½ log det Ψ_AA − ½ log det M_A
                  − ½ (yᵀy/σ² + μ_Aᵀ Ψ_AA⁻¹ μ_A − rᵀ m)
The E-step runs in the compiled kernel (``hpc_zsem.variational.kernel``): the state-only terms (M_A⁻¹, the
log-determinants, Ψ_AA⁻¹ μ_A, μ_Aᵀ Ψ_AA⁻¹ μ_A) of every state with k ≤ 2 are tabulated once per Θ, so a
(patch, state) pair costs the O(k²) product M_A⁻¹ r; numpy/BLAS does the O(D·H) products B = Y W and
S_ysz = Yᵀ⟨s⊙z⟩.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.rowwise import row_product
from hpc_zsem.variational.evolution import EvolutionSettings, Scorer, evolve
from hpc_zsem.variational.kernel import posterior, run_parts, theta_terms
from hpc_zsem.variational.states import lowest_weight_states, pack

PI_FLOOR = 1e-6            # π stays in [PI_FLOOR, 1 − PI_FLOOR] so that log p(s) stays finite
VARIANCE_FLOOR = 1e-8      # relative floor of σ² and of the slab variances Ψ_hh
SIGMA2_ABSOLUTE_FLOOR = 1e-20  # σ² never below this, whatever the data (an all-zero image has E[y²] = 0)
UNUSED_MASS = 1e-10        # a latent with Σ_n⟨s_h⟩ below this (× N) is "never used" in the M-step

INITS = ("random", "pca", "kmeans")   # model.init: how W is initialised (see SSSC.init_params)
SIGMAS = ("learned", "pca")           # model.sigma: σ² by every M-step, or estimated once and held (init_params)
KMEANS_ITERATIONS = 25     # Lloyd iterations of the k-means initialisation (on the ≤ 4096-patch sample)

log = logging.getLogger("hpc_zsem")


class SSSC:
    """The SSSC model with evolutionary truncated posteriors, following the ``PatchModel`` contract."""

    name = "sssc"

    def __init__(self, H: int, evolution: EvolutionSettings, psi: str = "diag", init: str = "random",
                 sigma: str = "learned"):
        if psi not in ("diag", "full"):
            raise ValueError(f"psi must be 'diag' or 'full', got {psi!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if sigma not in SIGMAS:
            raise ValueError(f"sigma must be one of {SIGMAS}, got {sigma!r}")
        self.H = H
        self.init = init
        self.learn_sigma = sigma == "learned"
        self.evolution = evolution
        self.full_psi = psi == "full"
        self._reported: set[str] = set()
        self._theta_cache: tuple[dict[str, np.ndarray], tuple] | None = None
        self._theta_lock = threading.Lock()

    def _repaired(self, what: str) -> None:
        """Log a deterministic M-step repair once per kind (every rank repairs alike; rank 0 logs)."""
        if what not in self._reported:
            self._reported.add(what)
            log.info("M-step repair (logged once): %s", what)

    # ----------------------------------------------------------------- initialisation
    def init_params(self, summary: PatchSummary, sample: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Θ₀: π = 2/H, μ = 0, Ψ = I, σ²₀ = mean per-pixel variance of the patches, and W by ``self.init``:

        - ``random``: W = mean patch + 0.25·√σ²₀·N(0, 1) per entry (as in the reference denoising examples);
        - ``pca``: the first min(H, ⌈D/2⌉) columns are the leading principal directions u_h of the sample's
          second moments E[y yᵀ] (the model has no offset, so the first one is about the mean patch), scaled
          by √λ_h so that z_h ~ N(0, 1) spans the sample's spread along u_h; the other columns as ``random``;
        - ``kmeans``: H centroids of the sample (k-means++ seeding, Lloyd iterations), each a typical patch.
        The data-driven columns get 0.01·√σ²₀·N(0, 1) per entry (ties between equal columns break at once).
        With ``sigma="pca"`` the model's σ² is instead the noise level of the patches' covariance
        (``PatchSummary.noise_variance``), held fixed by the M-steps.
        The sample is identical on every rank and so is ``rng``: Θ₀ is too."""
        H = self.H
        sigma2 = max(float(summary.variance.mean()), VARIANCE_FLOOR)
        D = summary.mean.size
        sample = np.asarray(sample, dtype=np.float64).reshape(-1, D)
        W = summary.mean[:, None] + 0.25 * np.sqrt(sigma2) * rng.standard_normal((D, H))
        if self.init != "random" and sample.shape[0] > 0:
            data = pca_columns(sample, H) if self.init == "pca" else kmeans_centroids(sample, H, rng).T
            W[:, :data.shape[1]] = data + 0.01 * np.sqrt(sigma2) * rng.standard_normal(data.shape)
        if not self.learn_sigma:
            estimate = summary.noise_variance()
            log.info("noise level σ = %.4g from the smallest eigenvalue of the patch covariance, held fixed "
                     "(model.sigma: pca)", np.sqrt(estimate))
            sigma2 = max(estimate, _sigma2_floor(float(summary.sum_sq.sum()), summary.n, D))
        return {"W": W, "pi": np.full(H, min(2.0 / H, 0.5)), "mu": np.zeros(H),
                "psi": np.eye(H) if self.full_psi else np.ones(H), "sigma2": np.array(sigma2)}

    def init_block_state(self, Y: np.ndarray, params: dict[str, np.ndarray], rng,
                         refine_rngs: Sequence = ()) -> np.ndarray:
        """K_n = the S best distinct states (under Θ) among the max(S, H+1) lowest-weight states (the empty state,
        all H single-unit states, then pairs…: at least S distinct states), every pair of the m single units with
        the highest log-joints for y_n (m the smallest with m(m−1)/2 ≥ S) and S states drawn from the prior; then
        improved by ``len(refine_rngs)`` frozen-Θ E-steps (as ``refine``, reusing the log-joints the selection
        already has). Returns (N, S, ⌈H/64⌉) packed states. Under a trained Θ this starts a patch seen for the
        first time (estimation) near its posterior mass: the best single-unit states and the pairs of the best
        units are all candidates."""
        S, H, N = self.evolution.S, self.H, Y.shape[0]
        scorer = self._scorer(Y, params)
        fixed = pack(lowest_weight_states(H, max(S, H + 1)))              # ∅, {0}, …, {H−1}, {0, 1}, …
        fixed = np.broadcast_to(fixed, (N,) + fixed.shape)
        single_lpj = posterior(*scorer, np.ascontiguousarray(fixed[:, 1:H + 1]), 0)[0]
        m = min(H, int(np.ceil((1.0 + np.sqrt(1.0 + 8.0 * S)) / 2.0)))
        top = np.argsort(-single_lpj, axis=1, kind="stable")[:, :m]          # (N, m) best single units per patch
        first, second = np.triu_indices(m, k=1)
        pairs = np.zeros((N, first.size, H), dtype=bool)
        rows = np.arange(N)[:, None]
        pairs[rows, np.arange(first.size), top[:, first]] = True
        pairs[rows, np.arange(first.size), top[:, second]] = True
        drawn = rng.random((N, S, H)) < np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR)
        candidates = np.concatenate([fixed, pack(pairs), pack(drawn)], axis=1)
        K, lpj, _ = evolve(candidates, None, H, self.evolution, _expected_active(params), scorer, None, generations=0)
        return self._evolve_frozen(K, lpj, params, scorer, refine_rngs)

    # ----------------------------------------------------------------- E-step
    def _theta(self, params: dict[str, np.ndarray]) -> tuple:
        """The kernel's Θ terms (G = WᵀW, log-odds, the tabulated k ≤ 2 state terms, …), computed once per Θ:
        every block of an E-step reuses them (the parameters are compared by value; blocks running on several
        threads wait for the first to compute them)."""
        with self._theta_lock:
            cached = self._theta_cache
            if cached is not None and cached[0].keys() == params.keys() and all(
                    np.array_equal(cached[0][key], params[key]) for key in params):
                return cached[1]
            W = params["W"]
            pi = np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR)
            theta = theta_terms(W.T @ W, float(params["sigma2"]), params["psi"], params["mu"],
                                np.log(pi) - np.log1p(-pi), float(np.log1p(-pi).sum()))
            self._theta_cache = ({key: np.array(value, copy=True) for key, value in params.items()}, theta)
            return theta

    def _scorer(self, Y: np.ndarray, params: dict[str, np.ndarray], fixed_block: bool = False) -> Scorer:
        """Θ terms, B = Y W/σ² and the per-patch tails −½‖y_n‖²/σ² − D/2·log 2πσ² of a block, by row parts on
        the kernel threads. Y W by BLAS for a training block (``fixed_block``: its patches are the same on any
        rank count), else by ``row_product`` (a row of B depends only on y_n and W, bit for bit, so a patch's
        estimate does not depend on the tiling)."""
        sigma2, W = float(params["sigma2"]), params["W"]
        N, D = Y.shape
        B, tails = np.empty((N, W.shape[1])), np.empty(N)
        log_norm = 0.5 * D * np.log(2.0 * np.pi * sigma2)

        def rows(a, b):
            if fixed_block:
                np.matmul(Y[a:b], W, out=B[a:b])
            else:
                row_product(Y[a:b], W, out=B[a:b])
            np.divide(B[a:b], sigma2, out=B[a:b])
            tails[a:b] = -0.5 * np.einsum("nd,nd->n", Y[a:b], Y[a:b]) / sigma2 - log_norm

        run_parts(rows, N)
        return Scorer(self._theta(params), B, tails)

    def e_step(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray, rng):
        """Statistics of q(K, Θ) for the M-step and the free energy Σ_n log Σ_{s∈K_n} p(s, y_n), then one
        evolutionary improvement of K under the same Θ (used by the next epoch). The statistics are
        S_s = Σ⟨s⟩, S_sz = Σ⟨s⊙z⟩, S_szsz = Σ⟨(s⊙z)(s⊙z)ᵀ⟩ (with ⟨z_A z_Aᵀ⟩ = M_A⁻¹ + m mᵀ), S_ysz = Σ y⟨s⊙z⟩ᵀ,
        Σ‖y‖², and for a full Ψ also S_ss = Σ⟨s sᵀ⟩ and T_hh' = Σ q s_h s_h' E[z_h']."""
        scorer = self._scorer(Y, params, fixed_block=True)
        K = np.ascontiguousarray(K, dtype=np.uint64)
        lpj, log_norm, mean_sz, sums, pair_sums = posterior(*scorer, K, 2)
        stats = {"S_s": sums[0], "S_sz": sums[1], "S_szsz": pair_sums[0]}
        if self.full_psi:
            stats["S_ss"], stats["T"] = pair_sums[1], pair_sums[2]
        stats["S_ysz"] = Y.T @ mean_sz       # one BLAS call, also when the block's kernels are split among threads
        stats["yy"] = np.array(np.einsum("nd,nd->", Y, Y))
        stats["free_energy"] = np.array(log_norm.sum())
        stats["N"] = np.array(float(Y.shape[0]))
        new_K, _, accepted = evolve(K, lpj, self.H, self.evolution, _expected_active(params), scorer, rng,
                                    want_lpj=False)
        stats["accepted"] = np.array(float(accepted))
        return new_K, stats

    def refine(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray, rngs: list) -> np.ndarray:
        """``len(rngs)`` evolutionary E-steps with Θ frozen and no statistics; the log-joints of K are
        scored once (in the first step) and carried from step to step (under a fixed Θ they do not change)."""
        return self._evolve_frozen(K, None, params, self._scorer(Y, params), rngs)

    def _evolve_frozen(self, K: np.ndarray, lpj: np.ndarray | None, params: dict[str, np.ndarray], scorer: Scorer,
                       rngs: Sequence) -> np.ndarray:
        """One evolutionary E-step per rng under a fixed Θ, carrying the log-joints of K along."""
        for rng in rngs:
            K, lpj, _ = evolve(K, lpj, self.H, self.evolution, _expected_active(params), scorer, rng)
        return K

    def estimate(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray) -> np.ndarray:
        """Posterior-predictive mean of the clean patch: ŷ_n = Σ_{s∈K_n} q_n(s) W_A m_{n,s} = W ⟨s⊙z⟩_n."""
        mean_sz = posterior(*self._scorer(Y, params), K, 1)[2]
        return row_product(mean_sz, params["W"].T)

    # ----------------------------------------------------------------- M-step
    def m_step(self, params: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Closed-form exact EM updates (DESIGN.md §1.1); a pure function of (params, stats), so every MPI
        rank computes the same Θ. Latents that no patch uses keep their old W column, μ_h and Ψ_hh."""
        N = float(stats["N"])
        S_s, S_sz, S_szsz, S_ysz = stats["S_s"], stats["S_sz"], stats["S_szsz"], stats["S_ysz"]
        used = S_s > UNUSED_MASS * N
        if not used.all():
            self._repaired(f"{np.count_nonzero(~used)} latent(s) used by no patch keep their W column, μ and Ψ")
        W = _solve_ridge(S_szsz, S_ysz, used, params["W"])
        pi = np.clip(S_s / N, PI_FLOOR, 1.0 - PI_FLOOR)
        safe_S_s = np.where(used, S_s, 1.0)
        mu = np.where(used, S_sz / safe_S_s, params["mu"])
        if self.full_psi:
            psi = _full_psi(S_szsz, stats["S_ss"], stats["T"], mu, used, params["psi"])
        else:
            psi = np.where(used, np.diagonal(S_szsz) / safe_S_s - mu**2, params["psi"])
            psi = np.maximum(psi, VARIANCE_FLOOR * max(1.0, float(np.abs(psi).max())))
        return {"W": W, "pi": pi, "mu": mu, "psi": psi,
                "sigma2": self._sigma2(stats, W, S_ysz, S_szsz) if self.learn_sigma else params["sigma2"]}

    def _sigma2(self, stats: dict[str, np.ndarray], W: np.ndarray, S_ysz: np.ndarray, S_szsz: np.ndarray) -> np.ndarray:
        """σ² = (Σ‖y‖² − 2 tr(Wᵀ S_ysz) + tr(WᵀW S_szsz)) / (N·D), the mean squared residual, floored."""
        N, D = float(stats["N"]), W.shape[0]
        residual = float(stats["yy"]) - 2.0 * np.sum(W * S_ysz) + np.sum((W.T @ W) * S_szsz)
        floor = _sigma2_floor(float(stats["yy"]), N, D)
        if residual / (N * D) < floor:
            self._repaired(f"σ² → 0 (the model explains the data exactly); floored at {floor:.3g}")
        return np.array(max(residual / (N * D), floor))

    def noise_variance(self, params: dict[str, np.ndarray]) -> float:
        return float(params["sigma2"])


def _sigma2_floor(yy: float, N: float, D: int) -> float:
    """The smallest σ²: VARIANCE_FLOOR × the mean squared pixel value Σ‖y‖²/(N·D), at least SIGMA2_ABSOLUTE_FLOOR."""
    return max(VARIANCE_FLOOR * yy / (N * D), SIGMA2_ABSOLUTE_FLOOR)


def pca_columns(sample: np.ndarray, H: int) -> np.ndarray:
    """(D, min(H, ⌈D/2⌉)): the leading eigenvectors u_h of the sample's (uncentred) second moments
    C = YᵀY/N, largest eigenvalue first, each scaled by √λ_h and signed so that its largest-magnitude entry is
    positive. Only the leading half: the trailing directions of a noisy sample are mostly noise (measured:
    H = D = 64 PCA columns denoise worse than 32 PCA + 32 random ones)."""
    Y = np.asarray(sample, dtype=np.float64)
    N, D = Y.shape
    values, vectors = np.linalg.eigh(Y.T @ Y / N)
    order = np.argsort(values)[::-1][:min(H, (D + 1) // 2)]
    U = vectors[:, order]
    U = U * np.where(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])] < 0, -1.0, 1.0)
    return U * np.sqrt(np.maximum(values[order], 0.0))


def kmeans_centroids(sample: np.ndarray, H: int, rng: np.random.Generator,
                     iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """(H, D): k-means centroids of the sample rows: k-means++ seeding, then ``iterations`` Lloyd steps; a
    cluster that empties takes the sample point farthest from its centroid. Fewer distinct rows than H: the
    missing centroids are repeats of sample rows (the init's small noise separates them)."""
    Y = np.asarray(sample, dtype=np.float64)
    N = Y.shape[0]
    norms = np.einsum("nd,nd->n", Y, Y)

    def sq_dist(C):
        return np.maximum(norms[:, None] - 2.0 * Y @ C.T + np.einsum("kd,kd->k", C, C)[None, :], 0.0)

    centres = np.empty((H, Y.shape[1]))
    centres[0] = Y[rng.integers(N)]
    closest = sq_dist(centres[:1])[:, 0]
    for k in range(1, H):                       # k-means++: draw ∝ squared distance to the nearest centre
        total = closest.sum()
        i = rng.choice(N, p=closest / total) if total > 0 else rng.integers(N)
        centres[k] = Y[i]
        closest = np.minimum(closest, sq_dist(centres[k:k + 1])[:, 0])
    for _ in range(iterations):
        d = sq_dist(centres)
        label = d.argmin(axis=1)
        counts = np.bincount(label, minlength=H)
        sums = np.zeros_like(centres)
        np.add.at(sums, label, Y)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            far = np.argsort(d[np.arange(N), label])[::-1][:empty.size]
            new[empty[:far.size]] = Y[far]
        if np.array_equal(new, centres):
            break
        centres = new
    return centres


def _expected_active(params: dict[str, np.ndarray]) -> float:
    """ρ = Σ_h π_h, the prior's expected number of active latents (steers the sparse mutation)."""
    return float(np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR).sum())


def _solve_ridge(S_szsz: np.ndarray, S_ysz: np.ndarray, used: np.ndarray, W_old: np.ndarray) -> np.ndarray:
    """W = S_ysz S_szsz⁻¹ over the used latents, by a Cholesky solve with a tiny ridge (never an explicit
    inverse); unused columns keep their old values."""
    W = W_old.copy()
    idx = np.flatnonzero(used)
    if idx.size == 0:
        return W
    A = S_szsz[np.ix_(idx, idx)]
    A = A + (1e-10 * np.trace(A) / idx.size + 1e-300) * np.eye(idx.size)
    try:
        W[:, idx] = cho_solve(cho_factor(A), S_ysz[:, idx].T).T
    except np.linalg.LinAlgError:   # numerically singular even with the ridge: minimum-norm least squares
        W[:, idx] = np.linalg.lstsq(A, S_ysz[:, idx].T, rcond=None)[0].T
    return W


def _full_psi(S_szsz, S_ss, T, mu, used, psi_old):
    """Ψ = X ⊘ S_ss with X_hh' = (S_szsz)_hh' − μ_h T_hh' − μ_h' T_h'h + μ_h μ_h' (S_ss)_hh', projected to
    positive definite (eigenvalues floored); rows/columns of unused latents keep their old values."""
    X = S_szsz - mu[:, None] * T - (mu[:, None] * T).T + np.outer(mu, mu) * S_ss
    with np.errstate(divide="ignore", invalid="ignore"):
        psi = np.where(S_ss > 0, X / S_ss, 0.0)
    both = np.outer(used, used)
    psi = np.where(both, psi, psi_old)
    psi = 0.5 * (psi + psi.T)
    values, vectors = np.linalg.eigh(psi)
    floor = VARIANCE_FLOOR * max(1.0, float(values.max()))
    return (vectors * np.maximum(values, floor)) @ vectors.T
