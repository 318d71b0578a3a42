"""Gamma-Poisson mixture model (GPMM) with exact posteriors (Monk, Savin & Lücke 2018; DESIGN.md §1.2).

Generative model, for a patch y ∈ R^D_{≥0} (photon counts)::

    p(c) = π_c,   z ~ Gamma(α_c, β_c)  (shape, rate),   y_d ~ Poisson(z W_cd)

With ŷ = Σ_d y_d and S_c = Σ_d W_cd the intensity z integrates out exactly::

    log p(y|c) = Σ_d [y_d log W_cd − log Γ(y_d+1)] + α_c log β_c − log Γ(α_c)
                 + log Γ(α_c+ŷ) − (α_c+ŷ) log(β_c+S_c)

and z | c, y ~ Gamma(α_c+ŷ, β_c+S_c). Counts may be non-integer floats (after the gain mapping of
``hpc_zsem.intensity``); log Γ(y+1) is used throughout, so nothing needs rounding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import digamma, gammaln, logsumexp, polygamma

from hpc_zsem.errors import InputError
from hpc_zsem.models.base import PatchRng, PatchSummary, Stats
from hpc_zsem.rowwise import row_product

_W_FLOOR = 1e-12        # smallest entry of W, so that log W stays finite
_DEAD_CLASS = 1e-10     # a class with R_c ≤ _DEAD_CLASS·N counts as unused in the M-step
_PI_FLOOR = 1e-10       # prior probability given back to an unused class
_ALPHA_RANGE = (1e-6, 1e10)
_NEWTON_ITERS = 50
_INIT_JITTER = 0.05     # relative multiplicative jitter of the seed patches


class _Posterior(NamedTuple):
    """Exact posterior quantities of a block of N patches under C classes."""

    resp: np.ndarray      # (N, C) r_nc = p(c | y_n)
    log_py: np.ndarray    # (N,)   log p(y_n), including −Σ_d log Γ(y_nd+1)
    shape: np.ndarray     # (N, C) α_c + ŷ_n     (shape of z | c, y_n)
    rate: np.ndarray      # (C,)   β_c + S_c     (rate of z | c, y_n)


def _posterior(Y: np.ndarray, params: dict[str, np.ndarray], fixed_block: bool = False) -> _Posterior:
    """Class posteriors r_nc = softmax_c(log π_c + log p(y_n|c)) and log p(y_n) = logsumexp_c(…) − Σ log Γ(y+1).

    The log Γ(y_d+1) term does not depend on c: it is left out of the softmax and added to log p(y_n) only.
    Σ_d y_nd log W_cd by BLAS for a training block (``fixed_block``: the same patches on any rank count), else by
    ``row_product`` (a patch's posterior does not depend on the batch it is estimated in).
    """
    W, pi, alpha, beta = params["W"], params["pi"], params["alpha"], params["beta"]
    yhat = Y.sum(axis=1)
    shape = alpha[None, :] + yhat[:, None]
    rate = beta + W.sum(axis=1)
    class_const = np.log(pi) + alpha * np.log(beta) - gammaln(alpha)
    data_term = Y @ np.log(W).T if fixed_block else row_product(Y, np.log(W).T)
    log_joint = data_term + class_const + gammaln(shape) - shape * np.log(rate)
    log_norm = logsumexp(log_joint, axis=1)
    resp = np.exp(log_joint - log_norm[:, None])
    log_py = log_norm - gammaln(Y + 1.0).sum(axis=1)
    return _Posterior(resp, log_py, shape, rate)


def _solve_gamma_shape(s: np.ndarray) -> np.ndarray:
    """Solve log α − ψ(α) = s (s > 0) for α by Newton's method in x = log α, from Minka's start.

    Minka (2002): α₀ = (3 − s + √((s−3)² + 24 s)) / (12 s). Newton step on f(x) = x − ψ(eˣ) − s with
    f'(x) = 1 − α ψ'(α). This is the maximum-likelihood shape of a Gamma with log E[z] − E[log z] = s.
    """
    s = np.maximum(np.asarray(s, dtype=np.float64), 1e-15)
    alpha = (3.0 - s + np.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    x = np.log(np.clip(alpha, *_ALPHA_RANGE))
    lo, hi = np.log(_ALPHA_RANGE[0]), np.log(_ALPHA_RANGE[1])
    for _ in range(_NEWTON_ITERS):
        a = np.exp(x)
        f = x - digamma(a) - s
        df = 1.0 - a * polygamma(1, a)
        step = f / df
        x = np.clip(x - step, lo, hi)
        if np.all(np.abs(step) < 1e-12):
            break
    return np.exp(x)


def _kmeanspp_indices(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): pick row i with probability ∝ min_j ‖x_i − x_{c_j}‖².

    Needs k ≤ len(X). Falls back to a uniform pick among unpicked rows when all remaining distances are 0.
    """
    M = X.shape[0]
    sq_norms = np.einsum("md,md->m", X, X)
    chosen = np.empty(k, dtype=np.intp)
    chosen[0] = rng.integers(M)
    d2 = np.full(M, np.inf)
    for j in range(1, k):
        last = X[chosen[j - 1]]
        d2 = np.minimum(d2, np.maximum(sq_norms - 2.0 * X @ last + last @ last, 0.0))
        d2[chosen[:j]] = 0.0
        total = d2.sum()
        if total > 0.0:
            chosen[j] = rng.choice(M, p=d2 / total)
        else:
            chosen[j] = rng.choice(np.setdiff1d(np.arange(M), chosen[:j]))
    return chosen


def _seed_patches(sample: np.ndarray, C: int, rng: np.random.Generator) -> np.ndarray:
    """C seed patches: k-means++ on the sample when M ≥ C, else every sample row repeated cyclically in a
    random order; always times a small multiplicative jitter exp(ε·N(0,1)) so that no two seeds coincide."""
    M = sample.shape[0]
    if M >= C:
        idx = _kmeanspp_indices(sample, C, rng)
    else:
        idx = np.resize(rng.permutation(M), C)
    jitter = np.exp(_INIT_JITTER * rng.standard_normal((C, sample.shape[1])))
    return sample[idx] * jitter


def _moment_matched_gamma(totals: np.ndarray) -> tuple[float, float]:
    """Gamma(α, β) of z from patch sums ŷ ~ Poisson(z) (S_c = 1): E z = E ŷ, Var z = Var ŷ − E ŷ,
    α = (E z)² / Var z, β = E z / Var z. Var z is floored at (E z)²/100 (i.e. α ≤ 100)."""
    mean = max(float(np.mean(totals)), 1e-3)
    var_z = max(float(np.var(totals)) - mean, mean**2 / 100.0)
    return mean**2 / var_z, mean / var_z


class GPMM:
    """Gamma-Poisson mixture with C classes; ``gamma`` = "per_class" (α_c, β_c) or "shared" (one α, β).

    Parameters (float64): W (C, D) > 0, pi (C,), alpha (C,), beta (C,). With "shared", alpha and beta hold C
    equal values. Normalisation (a symmetry (W_c, β_c) → (W_c/k, β_c/k) of the model): "per_class" keeps
    S_c = Σ_d W_cd = 1; "shared" rescales all classes by one k = Σ_c π_c S_c (a per-class k would break the
    sharing of β).
    """

    name = "gpmm"

    def __init__(self, C: int, gamma: str = "shared"):
        if C < 1:
            raise ValueError(f"GPMM: C must be ≥ 1, got {C}")
        if gamma not in ("shared", "per_class"):
            raise ValueError(f"GPMM: gamma must be 'shared' or 'per_class', got {gamma!r}")
        self.C = int(C)
        self.gamma = gamma

    def init_params(self, summary: PatchSummary, sample: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """W_c = (seed patch + 0.1·mean pixel + 1e-3) normalised to S_c = 1; π uniform; α, β moment-matched
        to the patch sums of ``sample`` (identical on every rank, deterministic given rng)."""
        sample = np.asarray(sample, dtype=np.float64)
        if sample.size == 0 or sample.min() < 0.0:
            low = sample.min() if sample.size else "empty sample"
            raise InputError(f"gpmm: patches must be non-negative counts (minimum {low}); "
                             "map intensities to counts first (intensity gain/offset)")
        floor = 0.1 * float(np.mean(summary.mean)) + 1e-3
        W = _seed_patches(sample, self.C, rng) + floor
        W /= W.sum(axis=1, keepdims=True)
        alpha, beta = _moment_matched_gamma(sample.sum(axis=1))
        return {
            "W": np.maximum(W, _W_FLOOR),
            "pi": np.full(self.C, 1.0 / self.C),
            "alpha": np.full(self.C, alpha),
            "beta": np.full(self.C, beta),
        }

    def init_block_state(self, Y: np.ndarray, params: dict[str, np.ndarray], rng: PatchRng,
                         refine_rngs: Sequence[PatchRng] = ()) -> None:
        """Exact posteriors need no per-block state."""
        return None

    def e_step(self, Y: np.ndarray, params: dict[str, np.ndarray], state: None,
               rng: PatchRng) -> tuple[None, Stats]:
        """Sufficient statistics R_c = Σ_n r_nc, RY_cd = Σ_n r_nc y_nd, RZ_c = Σ_n r_nc E[z|c,y_n],
        RLZ_c = Σ_n r_nc E[log z|c,y_n] with E[z] = (α_c+ŷ)/(β_c+S_c), E[log z] = ψ(α_c+ŷ) − log(β_c+S_c);
        free_energy = Σ_n log p(y_n) (the exact log-likelihood)."""
        Y = np.asarray(Y, dtype=np.float64)
        post = _posterior(Y, params, fixed_block=True)
        r = post.resp
        stats = {
            "R": r.sum(axis=0),
            "RY": r.T @ Y,
            "RZ": np.einsum("nc,nc->c", r, post.shape) / post.rate,
            "RLZ": np.einsum("nc,nc->c", r, digamma(post.shape)) - r.sum(axis=0) * np.log(post.rate),
            "free_energy": np.asarray(post.log_py.sum()),
            "N": np.asarray(float(Y.shape[0])),
        }
        return None, stats

    def refine(self, Y: np.ndarray, params: dict[str, np.ndarray], state: None,
               rngs: Sequence[PatchRng]) -> None:
        """Exact posteriors: nothing to improve."""
        return None

    def m_step(self, params: dict[str, np.ndarray], stats: Stats) -> dict[str, np.ndarray]:
        """π_c = R_c/N; W_cd = RY_cd/RZ_c; α from log α − ψ(α) = log(RZ/R) − RLZ/R; β = α R/RZ
        (sums over c for "shared"); then the normalisation of the class docstring. Unused classes
        (R_c ≤ 1e-10·N) keep W_c, α_c, β_c and get π_c = 1e-10 before π is renormalised."""
        N = float(stats["N"])
        if N <= 0.0:
            return {key: np.array(value, dtype=np.float64) for key, value in params.items()}
        R, RZ = stats["R"], stats["RZ"]
        live = R > _DEAD_CLASS * N
        safe_R, safe_RZ = np.where(live, R, 1.0), np.where(live, RZ, 1.0)
        pi = np.where(live, R / N, _PI_FLOOR)
        W = np.where(live[:, None], stats["RY"] / safe_RZ[:, None], params["W"])
        alpha, beta = self._gamma_m_step(params, stats, live, safe_R, safe_RZ)
        scale = W.sum(axis=1) if self.gamma == "per_class" else np.full(self.C, pi @ W.sum(axis=1) / pi.sum())
        return {
            "W": np.maximum(W / scale[:, None], _W_FLOOR),
            "pi": pi / pi.sum(),
            "alpha": alpha,
            "beta": beta / scale,
        }

    def _gamma_m_step(self, params: dict[str, np.ndarray], stats: Stats, live: np.ndarray,
                      safe_R: np.ndarray, safe_RZ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ML Gamma prior: α solves log α − ψ(α) = log(RZ/R) − RLZ/R, β = α R/RZ; per class, or with
        R, RZ, RLZ summed over the used classes for "shared". Unused classes keep their α, β."""
        if self.gamma == "shared":
            R, RZ, RLZ = (np.sum(stats[key][live]) for key in ("R", "RZ", "RLZ"))
            a = _solve_gamma_shape(np.log(RZ / R) - RLZ / R)
            return np.full(self.C, a), np.full(self.C, a * R / RZ)
        safe_RLZ = np.where(live, stats["RLZ"], 0.0)
        a = _solve_gamma_shape(np.log(safe_RZ / safe_R) - safe_RLZ / safe_R)
        return np.where(live, a, params["alpha"]), np.where(live, a * safe_R / safe_RZ, params["beta"])

    def estimate(self, Y: np.ndarray, params: dict[str, np.ndarray], state: None) -> np.ndarray:
        """Posterior mean of the clean patch: ŷ_d = Σ_c p(c|y) · W_cd · (α_c + Σ_d y_d) / (β_c + S_c)."""
        post = _posterior(np.asarray(Y, dtype=np.float64), params)
        return row_product(post.resp * post.shape / post.rate, params["W"])

    def noise_variance(self, params: dict[str, np.ndarray]) -> float:
        """GPMM has no scalar noise level (the noise is Poisson): NaN."""
        return float("nan")
