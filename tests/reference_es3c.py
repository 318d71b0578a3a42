"""The pure-numpy ES3C E-step as it was before the compiled kernel (hpc_zsem at 34de753), kept verbatim as the
reference the kernel is tested against: the same truncated sets (states and order), log-joints and statistics.

``ReferenceSSSC`` is ``hpc_zsem.models.sssc.SSSC`` with its E-step methods (init_block_state, e_step, refine,
estimate) replaced by the old vectorised numpy code; parameters and the M-step are the package's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import logsumexp

from hpc_zsem.models.sssc import PI_FLOOR, SSSC
from hpc_zsem.variational.evolution import EvolutionSettings
from hpc_zsem.variational.states import lowest_weight_states, pack, unpack

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
PAIR_CHUNK = 1 << 21       # pairs × k² numbers per vectorised chunk (bounds the temporary memory)


def unique_states(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a (P, W) word array: (unique (U, W), inverse (P,)) with words[i] == unique[inverse[i]]."""
    if words.shape[1] == 1:
        uniq, inverse = np.unique(words[:, 0], return_inverse=True)
        return uniq[:, None], inverse.ravel()
    uniq, inverse = np.unique(words, axis=0, return_inverse=True)
    return uniq, inverse.ravel()


def first_occurrence(words: np.ndarray) -> np.ndarray:
    """For a (N, C, W) array of states per patch, the index (along C) of the first equal state in the same row.

    ``rep[n, c] == c`` marks the first occurrence of a state within patch n; duplicates point to it. A stable
    lexicographic sort over (row, words) groups equal states of a row with the earliest first.
    """
    N, C, W = words.shape
    if W == 1:   # one word per state: a stable sort within each row is enough (and ~3× faster)
        order = np.argsort(words[:, :, 0], axis=1, kind="stable")
        ordered = np.take_along_axis(words[:, :, 0], order, axis=1)
        starts = np.ones((N, C), dtype=bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(C), 0), axis=1)
        rep = np.empty((N, C), dtype=np.int64)
        np.put_along_axis(rep, order, np.take_along_axis(order, group_start, axis=1), axis=1)
        return rep
    flat = words.reshape(N * C, W)
    rows = np.repeat(np.arange(N), C)
    keys = [flat[:, w] for w in range(W - 1, -1, -1)] + [rows]
    order = np.lexsort(keys)
    sorted_words = flat[order]
    same_as_previous = np.zeros(N * C, dtype=bool)
    same_as_previous[1:] = (rows[order][1:] == rows[order][:-1]) & np.all(sorted_words[1:] == sorted_words[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(N * C)))
    rep_flat = np.empty(N * C, dtype=np.int64)
    rep_flat[order] = order[group_start]
    return (rep_flat - rows * C).reshape(N, C)



def select_parents(lpj: np.ndarray, n_parents: int, rule: str, rng: np.random.Generator) -> np.ndarray:
    """Indices (N, n_parents) of distinct parents per row of ``lpj`` (N, C).

    fitness: sampled without replacement with probability ∝ lpj − min(lpj) + 1 (Efraimidis–Spirakis keys
             u^(1/w), i.e. log(u)/w, largest first); uniform: uniformly without replacement; best: the top lpj.
    """
    N, C = lpj.shape
    if n_parents >= C:
        return np.broadcast_to(np.arange(C), (N, C)).copy()
    if rule == "best":
        keys = lpj
    elif rule == "uniform":
        keys = rng.random((N, C))
    elif rule == "fitness":
        weights = lpj - lpj.min(axis=1, keepdims=True) + 1.0
        keys = np.log(rng.random((N, C)) + 1e-300) / weights
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return np.argpartition(-keys, n_parents - 1, axis=1)[:, :n_parents]


def uniform_crossover(parents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each parent (N, P, H) mates with a random other parent of the same patch; every bit of the child is
    taken from either of the two with probability ½."""
    N, P, H = parents.shape
    if P < 2:
        return parents.copy()
    partner = (np.arange(P) + rng.integers(1, P, size=(N, P))) % P
    mates = np.take_along_axis(parents, partner[:, :, None], axis=1)
    return np.where(rng.random((N, P, H)) < 0.5, parents, mates)


def flip_one_bit(parents: np.ndarray, n_children: int, H: int, rng: np.random.Generator) -> np.ndarray:
    """The "random" mutation on packed states: children (N, P·n_children, W) of parents (N, P, W), each with
    exactly one uniformly chosen bit h ∈ [0, H) flipped (bit h mod 64 of word h // 64). No unpacking."""
    kids = np.repeat(parents, n_children, axis=1)
    bit = rng.integers(0, H, size=kids.shape[:2])
    flips = np.zeros_like(kids)
    np.put_along_axis(flips, (bit // 64)[:, :, None],
                      np.left_shift(np.uint64(1), (bit % 64).astype(np.uint64))[:, :, None],
                      axis=2)
    return kids ^ flips


def mutate_sparse(parents: np.ndarray, n_children: int, expected_active: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The "sparse" mutation: children (N, P·n_children, H) of parents (N, P, H) (bool).

    Every bit flips independently, with probabilities chosen so that one bit flips on average and the
    expected number of active units after the flip moves to the prior mean ρ = Σ_h π_h: for a parent with
    k ones, k·p(1→0) = (1 − ρ + k)/2 and (H−k)·p(0→1) = (1 + ρ − k)/2 (clipped to [0, 1]). A child that
    equals its parent gets one uniformly chosen flip instead.
    """
    N, P, H = parents.shape
    kids = np.repeat(parents, n_children, axis=1)
    one_flip = np.zeros(kids.shape, dtype=bool)
    np.put_along_axis(one_flip, rng.integers(0, H, size=kids.shape[:2])[:, :, None], True, axis=2)
    k = kids.sum(axis=2, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_off = np.clip((1.0 - expected_active + k) / (2.0 * k), 0.0, 1.0)
        p_on = np.clip((1.0 + expected_active - k) / (2.0 * (H - k)), 0.0, 1.0)
    p_flip = np.where(kids, np.nan_to_num(p_off), np.nan_to_num(p_on))
    flips = rng.random(kids.shape) < p_flip
    unchanged = ~flips.any(axis=2, keepdims=True)
    return kids ^ np.where(unchanged, one_flip, flips)


def score_new(candidates: np.ndarray, lpj: np.ndarray, n_known: int, score: ScoreFn) -> np.ndarray:
    """Fill in log-joints of candidates[:, n_known:] (packed, (N, C, W)); lpj[:, :n_known] are known.

    Each distinct (patch, state) pair is scored once: duplicates of a known state or of another new candidate
    copy its value.
    """
    N, C, _ = candidates.shape
    rep = first_occurrence(candidates)
    own = rep == np.arange(C)
    todo = own & (np.arange(C) >= n_known)
    rows, cols = np.nonzero(todo)
    lpj = lpj.copy()
    if rows.size:
        lpj[rows, cols] = score(rows, candidates[rows, cols])
    return np.take_along_axis(lpj, rep, axis=1)


def best_distinct(candidates: np.ndarray, lpj: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N, S) of the S best distinct candidates per row and how many of them come from beyond the
    first S candidates (the old set) — the number of newly accepted states."""
    N, C, _ = candidates.shape
    rep = first_occurrence(candidates)
    keyed = np.where(rep == np.arange(C), lpj, -np.inf)
    order = np.argsort(-keyed, axis=1, kind="stable")[:, :S]
    return order, int(np.count_nonzero(order >= S))


def evolve(K: np.ndarray, lpj_K: np.ndarray, H: int, settings: EvolutionSettings, expected_active: float,
           score: ScoreFn, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One evolutionary E-step for a block: (K (N, S, W) packed, lpj_K (N, S)) → (new K, its lpj, accepted)."""
    candidates, cand_lpj = K, lpj_K
    population, pop_lpj = K, lpj_K
    for _ in range(settings.generations):
        parent_idx = select_parents(pop_lpj, settings.parents, settings.selection, rng)
        parents = np.take_along_axis(population, parent_idx[:, :, None], axis=1)
        if settings.crossover:
            parents = pack(uniform_crossover(unpack(parents, H), rng))
        if settings.mutation == "random":
            children = flip_one_bit(parents, settings.children, H, rng)
        elif settings.mutation == "sparse":
            children = pack(mutate_sparse(unpack(parents, H), settings.children, expected_active, rng))
        else:
            raise ValueError(f"unknown mutation rule {settings.mutation!r}")
        n_known = candidates.shape[1]
        candidates = np.concatenate([candidates, children], axis=1)
        padded = np.concatenate([cand_lpj, np.full(children.shape[:2], np.nan)], axis=1)
        cand_lpj = score_new(candidates, padded, n_known, score)
        population, pop_lpj = children, cand_lpj[:, n_known:]
    keep, accepted = best_distinct(candidates, cand_lpj, settings.S)
    new_K = np.take_along_axis(candidates, keep[:, :, None], axis=1)
    return new_K, np.take_along_axis(cand_lpj, keep, axis=1), accepted


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
    B = Y W (N, H), i.e. b_n = Wᵀy_n, and yy = ‖y_n‖². Returns lpj (P,) and, with keep_groups, the posterior
    moments grouped by k."""
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
            stats["S_szsz"] += _bincount(pair_idx,
                                         (qk[:, :, None] * m[:, :, None] * m[:, None, :]).reshape(len(qk), -1),
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


class ReferenceSSSC(SSSC):
    """SSSC with the old numpy E-step."""

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



def _expected_active(params: dict[str, np.ndarray]) -> float:
    return float(np.clip(params["pi"], PI_FLOOR, 1.0 - PI_FLOOR).sum())
