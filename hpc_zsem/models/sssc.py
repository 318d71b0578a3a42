"""Spike-and-slab sparse coding (SSSC) with truncated posteriors improved by evolutionary search (ES3C).

Generative model (DESIGN.md §1.1):
    s ∈ {0,1}^H,  p(s) = Π_h π_h^{s_h} (1−π_h)^{1−s_h};   z ~ N(μ, Ψ);   y | s, z ~ N(W (s⊙z), σ² I_D)

For a state with active set A (k = |A|) the slab integrates out. With the H×H Gram matrix G = WᵀW and
b = Wᵀy, in the k×k information form (never the D×D covariance):
    M_A = Ψ_AA⁻¹ + G_AA/σ²,   r = Ψ_AA⁻¹ μ_A + b_A/σ²,   m = M_A⁻¹ r = E[z_A | s, y]
    log p(y, s) = log p(s) − D/2·log(2πσ²) − ½ log det Ψ_AA − ½ log det M_A
                  − ½ (yᵀy/σ² + μ_Aᵀ Ψ_AA⁻¹ μ_A − rᵀ m)
Everything that depends on the state only (M_A⁻¹, the log-determinants, μ_Aᵀ Ψ_AA⁻¹ μ_A, Ψ_AA⁻¹ μ_A) is
computed once per *distinct* state of a block, batched over states with the same k; per (patch, state)
pair only the O(k²) product M_A⁻¹ r remains.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.special import logsumexp

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.variational.evolution import EvolutionSettings, best_distinct, evolve, score_new
from hpc_zsem.variational.states import lowest_weight_states, pack, unique_states, unpack

PI_FLOOR = 1e-6            # π stays in [PI_FLOOR, 1 − PI_FLOOR] so that log p(s) stays finite
VARIANCE_FLOOR = 1e-8      # relative floor of σ² and of the slab variances Ψ_hh
UNUSED_MASS = 1e-10        # a latent with Σ_n⟨s_h⟩ below this (× N) is "never used" in the M-step
PAIR_CHUNK = 1 << 21       # pairs × k² numbers per vectorised chunk (bounds the temporary memory)

log = logging.getLogger("hpc_zsem")


@dataclass(frozen=True)
class _Theta:
    """Quantities derived from the parameters once per E-step call."""

    W: np.ndarray
    G: np.ndarray           # WᵀW
    sigma2: float
    psi: np.ndarray         # (H,) diagonal or (H, H) full slab covariance
    mu: np.ndarray
    log_odds: np.ndarray    # log π_h − log(1 − π_h)
    log_p0: float           # log p(s = 0) = Σ_h log(1 − π_h)

    @classmethod
    def from_params(cls, params: dict[str, np.ndarray]) -> "_Theta":
        W = params["W"]
        pi = np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR)
        return cls(W=W, G=W.T @ W, sigma2=float(params["sigma2"]), psi=params["psi"], mu=params["mu"],
                   log_odds=np.log(pi) - np.log1p(-pi), log_p0=float(np.log1p(-pi).sum()))

    @property
    def full_psi(self) -> bool:
        return self.psi.ndim == 2


@dataclass
class _Group:
    """Posterior quantities of all evaluated pairs whose state has k active units."""

    pairs: np.ndarray       # (P_k,) positions in the evaluated pair list
    active: np.ndarray      # (P_k, k) active units of each pair's state
    m: np.ndarray           # (P_k, k) E[z_A | s, y]
    state_active: np.ndarray  # (U_k, k) active units of each distinct state
    cov: np.ndarray         # (U_k, k, k) M_A⁻¹ = Cov[z_A | s, y]
    state: np.ndarray       # (P_k,) index of each pair's state in state_active/cov


def _slab_prior_terms(theta: _Theta, A: np.ndarray):
    """Per distinct state (rows of A, (U, k)): Ψ_AA⁻¹ (U, k, k), log det Ψ_AA, Ψ_AA⁻¹μ_A, μ_Aᵀ Ψ_AA⁻¹ μ_A."""
    mu_A = theta.mu[A]
    if theta.full_psi:
        psi_AA = theta.psi[A[:, :, None], A[:, None, :]]
        chol = np.linalg.cholesky(psi_AA)
        logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        psi_inv = np.linalg.inv(psi_AA)
        c = np.einsum("uij,uj->ui", psi_inv, mu_A)
    else:
        psi_A = theta.psi[A]
        logdet = np.log(psi_A).sum(axis=1)
        psi_inv = np.zeros(A.shape + (A.shape[1],))
        idx = np.arange(A.shape[1])
        psi_inv[:, idx, idx] = 1.0 / psi_A
        c = mu_A / psi_A
    return psi_inv, logdet, c, np.einsum("ui,ui->u", mu_A, c)


def _state_terms(theta: _Theta, A: np.ndarray):
    """Per distinct state: M_A⁻¹ (U, k, k), Ψ_AA⁻¹μ_A (U, k), and the state-only part of log p(y, s):
    log p(s) − ½ log det Ψ_AA − ½ log det M_A − ½ μ_Aᵀ Ψ_AA⁻¹ μ_A."""
    psi_inv, logdet_psi, c, mu_c = _slab_prior_terms(theta, A)
    M = psi_inv + theta.G[A[:, :, None], A[:, None, :]] / theta.sigma2
    chol = np.linalg.cholesky(M)
    logdet_M = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    chol_inv = np.linalg.inv(chol)
    cov = np.einsum("uki,ukj->uij", chol_inv, chol_inv)
    const = theta.log_p0 + theta.log_odds[A].sum(axis=1) - 0.5 * (logdet_psi + logdet_M + mu_c)
    return cov, c, const


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate_pairs(theta: _Theta, B: np.ndarray, yy: np.ndarray, rows: np.ndarray, words: np.ndarray,
                   keep_groups: bool = False) -> tuple[np.ndarray, list[_Group]]:
    """Log-joints log p(y_n, s) for the pairs (patch rows[p], packed state words[p]) of a block, given
    B = Y W (N, H), i.e. b_n = Wᵀy_n, and yy = ‖y_n‖². Returns lpj (P,) and, with keep_groups, the posterior moments grouped by k."""
    H = theta.W.shape[1]
    D = theta.W.shape[0]
    uniq, inverse = unique_states(words)
    bits = unpack(uniq, H)
    k_of_state = bits.sum(axis=1)
    k_of_pair = k_of_state[inverse]
    lpj = np.empty(rows.shape[0])
    groups: list[_Group] = []
    for k in np.unique(k_of_state):
        states = np.flatnonzero(k_of_state == k)
        pairs = np.flatnonzero(k_of_pair == k)
        if k == 0:
            lpj[pairs] = theta.log_p0
            continue
        state_active = np.nonzero(bits[states])[1].reshape(-1, k)
        cov, c, const = _state_terms(theta, state_active)
        local = np.empty(uniq.shape[0], dtype=np.int64)
        local[states] = np.arange(states.size)
        state = local[inverse[pairs]]
        active = state_active[state]
        m = np.empty((pairs.size, k))
        for part in _chunks(pairs.size, max(1, PAIR_CHUNK // (k * k))):
            r = c[state[part]] + B[rows[pairs[part], None], active[part]] / theta.sigma2
            m[part] = np.einsum("pij,pj->pi", cov[state[part]], r)
            lpj[pairs[part]] = const[state[part]] + 0.5 * np.einsum("pi,pi->p", r, m[part])
        if keep_groups:
            groups.append(_Group(pairs, active, m, state_active, cov, state))
    lpj += -0.5 * yy[rows] / theta.sigma2 - 0.5 * D * np.log(2.0 * np.pi * theta.sigma2)
    return lpj, groups


def _pair_index(A: np.ndarray, H: int) -> np.ndarray:
    """Flat indices h·H + h' of all (h, h') ∈ A×A, shape (P, k·k)."""
    return (A[:, :, None] * H + A[:, None, :]).reshape(A.shape[0], -1)


def _bincount(index: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    return np.bincount(index.ravel(), weights=np.broadcast_to(weights, index.shape).ravel(), minlength=length)


def posterior_mean_sz(groups: list[_Group], q: np.ndarray, rows: np.ndarray, n_patches: int, H: int) -> np.ndarray:
    """⟨s⊙z⟩_n = Σ_{s∈K_n} q_n(s) · scatter_A(m_{n,s}), shape (N, H)."""
    out = np.zeros(n_patches * H)
    for g in groups:
        out += _bincount(rows[g.pairs, None] * H + g.active, q[g.pairs, None] * g.m, n_patches * H)
    return out.reshape(n_patches, H)


def sufficient_statistics(groups: list[_Group], q: np.ndarray, rows: np.ndarray, Y: np.ndarray, H: int,
                          full_psi: bool) -> dict[str, np.ndarray]:
    """The M-step sums over patches n and states s ∈ K_n weighted by q_n(s) (float64):
    S_s = Σ⟨s⟩, S_sz = Σ⟨s⊙z⟩, S_szsz = Σ⟨(s⊙z)(s⊙z)ᵀ⟩ (with ⟨z_A z_Aᵀ⟩ = M_A⁻¹ + m mᵀ), S_ysz = Σ y⟨s⊙z⟩ᵀ,
    Σ‖y‖², and for a full Ψ also S_ss = Σ⟨s sᵀ⟩ and T_hh' = Σ q s_h s_h' E[z_h']."""
    HH = H * H
    stats = {"S_s": np.zeros(H), "S_sz": np.zeros(H), "S_szsz": np.zeros(HH)}
    if full_psi:
        stats["S_ss"] = np.zeros(HH)
        stats["T"] = np.zeros(HH)
    for g in groups:
        k = g.active.shape[1]
        state_weight = np.bincount(g.state, weights=q[g.pairs], minlength=g.cov.shape[0])
        stats["S_szsz"] += _bincount(_pair_index(g.state_active, H),
                                     (state_weight[:, None, None] * g.cov).reshape(len(state_weight), -1), HH)
        for part in _chunks(g.pairs.size, max(1, PAIR_CHUNK // (k * k))):   # bounds the (pairs × k²) temporaries
            qk, m, active = q[g.pairs[part], None], g.m[part], g.active[part]
            stats["S_s"] += _bincount(active, qk, H)
            stats["S_sz"] += _bincount(active, qk * m, H)
            pair_idx = _pair_index(active, H)
            stats["S_szsz"] += _bincount(pair_idx, (qk[:, :, None] * m[:, :, None] * m[:, None, :]).reshape(len(qk), -1),
                                         HH)
            if full_psi:
                stats["S_ss"] += _bincount(pair_idx, qk, HH)
                t_weights = np.broadcast_to((qk * m)[:, None, :], (len(qk), k, k))   # [i, j] = q·m_j
                stats["T"] += _bincount(pair_idx, t_weights.reshape(len(qk), -1), HH)
    mean_sz = posterior_mean_sz(groups, q, rows, Y.shape[0], H)
    for name in ("S_szsz", "S_ss", "T"):
        if name in stats:
            stats[name] = stats[name].reshape(H, H)
    stats["S_ysz"] = Y.T @ mean_sz
    stats["yy"] = np.array(np.einsum("nd,nd->", Y, Y))
    return stats


class SSSC:
    """The SSSC model with evolutionary truncated posteriors, following the ``PatchModel`` contract."""

    name = "sssc"

    def __init__(self, H: int, evolution: EvolutionSettings, psi: str = "diag"):
        if psi not in ("diag", "full"):
            raise ValueError(f"psi must be 'diag' or 'full', got {psi!r}")
        self.H = H
        self.evolution = evolution
        self.full_psi = psi == "full"
        self._reported: set[str] = set()

    def _repaired(self, what: str) -> None:
        """Log a deterministic M-step repair once per kind (every rank repairs alike; rank 0 logs)."""
        if what not in self._reported:
            self._reported.add(what)
            log.info("M-step repair (logged once): %s", what)

    # ----------------------------------------------------------------- initialisation
    def init_params(self, summary: PatchSummary, sample: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """W = mean patch + 0.25·√σ²₀·N(0, 1) per entry, σ²₀ = mean per-pixel variance of the patches,
        π = 2/H, μ = 0, Ψ = I (as in the reference denoising examples)."""
        H = self.H
        sigma2 = max(float(summary.variance.mean()), VARIANCE_FLOOR)
        W = summary.mean[:, None] + 0.25 * np.sqrt(sigma2) * rng.standard_normal((summary.mean.size, H))
        return {"W": W, "pi": np.full(H, min(2.0 / H, 0.5)), "mu": np.zeros(H),
                "psi": np.eye(H) if self.full_psi else np.ones(H), "sigma2": np.array(sigma2)}

    def init_block_state(self, Y: np.ndarray, params: dict[str, np.ndarray], rng: np.random.Generator,
                         refine_rngs: Sequence[np.random.Generator] = ()) -> np.ndarray:
        """K_n = the S best distinct states (under the initial Θ) among the S lowest-weight states and S
        states drawn from the prior, then improved by ``len(refine_rngs)`` frozen-Θ E-steps (as ``refine``,
        reusing the log-joints the selection already has); returns (N, S, ⌈H/64⌉) packed states."""
        S, H, N = self.evolution.S, self.H, Y.shape[0]
        fixed = np.broadcast_to(lowest_weight_states(H, S), (N, S, H))
        drawn = rng.random((N, S, H)) < np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR)
        candidates = pack(np.concatenate([fixed, drawn], axis=1))
        score = self._scorer(self._block_terms(Y, params))
        lpj = score_new(candidates, np.full(candidates.shape[:2], np.nan), 0, score)
        keep, _ = best_distinct(candidates, lpj, S)
        K = np.take_along_axis(candidates, keep[:, :, None], axis=1)
        return self._evolve_frozen(K, np.take_along_axis(lpj, keep, axis=1), params, score, refine_rngs)

    # ----------------------------------------------------------------- E-step
    @staticmethod
    def _block_terms(Y: np.ndarray, params: dict[str, np.ndarray]):
        """Θ-derived quantities, B = Y W and ‖y_n‖² of a block: computed once per block and E-step."""
        theta = _Theta.from_params(params)
        return theta, Y @ theta.W, np.einsum("nd,nd->n", Y, Y)

    @staticmethod
    def _scorer(terms):
        theta, B, yy = terms
        return lambda rows, words: evaluate_pairs(theta, B, yy, rows, words)[0]

    @staticmethod
    def _posterior(terms, K: np.ndarray):
        """Log-joints (N, S) of the truncated sets, q_n(s) flattened, and the grouped posterior moments."""
        N, S, _ = K.shape
        rows = np.repeat(np.arange(N), S)
        lpj, groups = evaluate_pairs(*terms, rows, K.reshape(N * S, -1), keep_groups=True)
        lpj = lpj.reshape(N, S)
        log_norm = logsumexp(lpj, axis=1)
        q = np.exp(lpj - log_norm[:, None]).ravel()
        return lpj, log_norm, q, rows, groups

    def e_step(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray, rng: np.random.Generator):
        """Statistics of q(K, Θ) for the M-step and the free energy Σ_n log Σ_{s∈K_n} p(s, y_n), then one
        evolutionary improvement of K under the same Θ (used by the next epoch)."""
        terms = self._block_terms(Y, params)
        lpj, log_norm, q, rows, groups = self._posterior(terms, K)
        stats = sufficient_statistics(groups, q, rows, Y, self.H, self.full_psi)
        stats["free_energy"] = np.array(log_norm.sum())
        stats["N"] = np.array(float(Y.shape[0]))
        new_K, _, accepted = evolve(K, lpj, self.H, self.evolution, _expected_active(params), self._scorer(terms),
                                    rng)
        stats["accepted"] = np.array(float(accepted))
        return new_K, stats

    def refine(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray,
               rngs: list[np.random.Generator]) -> np.ndarray:
        """``len(rngs)`` evolutionary E-steps with Θ frozen and no statistics; the log-joints of K are
        scored once and carried from step to step (under a fixed Θ they do not change)."""
        N, S, _ = K.shape
        score = self._scorer(self._block_terms(Y, params))
        lpj = score(np.repeat(np.arange(N), S), K.reshape(N * S, -1)).reshape(N, S)
        return self._evolve_frozen(K, lpj, params, score, rngs)

    def _evolve_frozen(self, K: np.ndarray, lpj: np.ndarray, params: dict[str, np.ndarray], score,
                       rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """One evolutionary E-step per rng under a fixed Θ, carrying the log-joints of K along."""
        for rng in rngs:
            K, lpj, _ = evolve(K, lpj, self.H, self.evolution, _expected_active(params), score, rng)
        return K

    def estimate(self, Y: np.ndarray, params: dict[str, np.ndarray], K: np.ndarray) -> np.ndarray:
        """Posterior-predictive mean of the clean patch: ŷ_n = Σ_{s∈K_n} q_n(s) W_A m_{n,s} = W ⟨s⊙z⟩_n."""
        _, _, q, rows, groups = self._posterior(self._block_terms(Y, params), K)
        return posterior_mean_sz(groups, q, rows, Y.shape[0], self.H) @ params["W"].T

    # ----------------------------------------------------------------- M-step
    def m_step(self, params: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Closed-form exact EM updates (DESIGN.md §1.1); a pure function of (params, stats), so every MPI
        rank computes the same Θ. Latents that no patch uses keep their old W column, μ_h and Ψ_hh."""
        N = float(stats["N"])
        D = params["W"].shape[0]
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
        residual = float(stats["yy"]) - 2.0 * np.sum(W * S_ysz) + np.sum((W.T @ W) * S_szsz)
        floor = VARIANCE_FLOOR * float(stats["yy"]) / (N * D)
        if residual / (N * D) < floor:
            self._repaired(f"σ² → 0 (the model explains the data exactly); floored at {floor:.3g}")
        sigma2 = max(residual / (N * D), floor)
        return {"W": W, "pi": pi, "mu": mu, "psi": psi, "sigma2": np.array(sigma2)}

    def noise_variance(self, params: dict[str, np.ndarray]) -> float:
        return float(params["sigma2"])


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
