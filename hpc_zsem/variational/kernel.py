"""The compiled ES3C E-step (numba): log-joints of (patch, state) pairs in the information form, the posterior
statistics of the truncated sets, and the evolutionary search of every patch — selection, crossover, mutation,
de-duplication and the merge of the S best distinct states — with no Python work per (patch, state) pair.

Maths (DESIGN.md §1.1). A packed state s with active set A (k = |A|), G = WᵀW, b_n = Wᵀy_n/σ² (the kernels
take B = Y W/σ², one row per patch, divided once per block instead of once per state and unit):
    M_A = Ψ_AA⁻¹ + G_AA/σ²,   c_A = Ψ_AA⁻¹ μ_A,   r = c_A + b_A,   m = M_A⁻¹ r
    log p(y_n, s) = const_A + ½ rᵀm + tail_n
    const_A = log p(s) − ½ log det Ψ_AA − ½ log det M_A − ½ μ_Aᵀ c_A,   tail_n = −½ ‖y_n‖²/σ² − D/2·log(2πσ²)
The state-only terms (M_A⁻¹, c_A, const_A) of every state with k ≤ 2 are tabulated once per Θ (``theta_terms``) in
one table, the single-unit and empty states as pairs with exact zeros, so that one branch-free closed form scores
and accumulates every k ≤ 2 state (``_pair_form``; with σ learned ≈ 97 % of the truncated sets' states). With a
diagonal Ψ, states with k > 2 are scored, and their M_A⁻¹ formed for the statistics, from their first two units'
table row bordered by the other units (``_border``: a Schur complement, factorised L D Lᵀ; k = 3, 4 in closed
form by ``_bordered_pair``; with σ estimated a textured EM image keeps mostly k = 3 … 6). A full Ψ, and states
whose elimination would lose digits, take a square-root-free Cholesky factorisation M_A = L D Lᵀ
(``_solve_state``), and for the statistics a Cholesky factor and its inverse. The posterior keeps each bordered
state's elimination for its statistics (``_eliminations``). In the search, a child that adds one unit to a
parent with 3 … EXTEND_MAX − 1 units is scored by appending one row to the parent's factor (``_append_unit``,
O(k²)); the parents' factors are built the same way and inherited by the next generation (``_factor_parents``).

The kernels release the GIL. A training epoch runs whole blocks concurrently on ``set_threads(n)`` Python
threads (``map_in_order``: no hand-off between threads inside a block, the blocks' statistics added in block
order); elsewhere ``run_split`` splits a block's patches among the threads, and ``run_parts`` runs the block's
BLAS product Y W by fixed parts on the same threads (Yᵀ⟨s⊙z⟩ is one BLAS call). A patch's results never depend on which
thread handles it, and the statistics are summed over a fixed number of parts of the block, added in a fixed
order, so results do not depend on the thread count. The random numbers are drawn
before the search (``hpc_zsem.variational.evolution``) in the order and shapes the numpy E-step used — those of a
``PatchRandom`` bit for bit by ``counter_numbers`` — so the truncated sets are exactly those of that E-step.
Orders (parent selection, the S best) come from rank counting (``_top_ranked``), not sorting; duplicates are found
by 64-bit fingerprints in a small open-addressing table (``_deduplicate``). The hot loops' indices are declared
non-negative (``_index``), which spares them numba's negative-index wraparound. Memory latency is hidden by prefetching
(``_prefetch``): each candidate's table row as soon as its first two units are known (for a table beyond L2's share,
``PREFETCH_TABLE_BYTES``), and the next patch's row of B while this patch is worked on.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
from numba import njit
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

log = logging.getLogger("hpc_zsem")

# No kernel allocates (every buffer comes from Python), so none needs numba's reference counting, which would
# otherwise cost atomic operations on every array handed to an inlined helper.
JIT = dict(cache=True, nogil=True, error_model="numpy", _nrt=False)
INLINE = dict(JIT, inline="always")   # per-element helpers: no call overhead in the loops that use them
# Constants passed to kernels as typed values, not literals: numba compiles a function once per literal argument.
ZERO, ONE, TWO, NO = np.int64(0), np.int64(1), np.int64(2), np.bool_(False)
SELECTIONS = ("fitness", "uniform", "best")      # codes 0, 1, 2 in the kernel
MUTATIONS = ("random", "sparse")                 # codes 0, 1
STATS_PARTS = 4          # parts of a block whose sums are added in order (threads take whole parts)
WELL_CONDITIONED = 1e-3  # _border: a pivot below this share of its diagonal hands the state to the factorisation
_ONE, _TOP = np.uint64(1), np.uint64(1) << np.uint64(63)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)   # 2⁶⁴/φ: the hash multiplier and SplitMix64's increment


# ----------------------------------------------------------------------------------------------- states
@intrinsic
def _float_bits(typingctx, x):
    """The bits of the float64 x as an int64."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, x):
    """The float64 whose bits are the int64 x."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the cache for the line holding array.flat[index] (llvm.prefetch: read, keep in all levels), without
    waiting for it: the loads that follow later find it there instead of stalling on a miss."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch." + ("p0" if getattr(address.type, "is_opaque", False) else "p0i8"))  # LLVM ≥ 15 / 14
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, types.int64), codegen


@intrinsic
def _index(typingctx, x):
    """The int64 x ≥ 0, declared non-negative to the compiler (``llvm.assume``; no instruction). numba wraps every
    signed index that might be negative (i < 0 → i + n: three instructions and a register per access; in the hot
    loops about as many as the arithmetic itself, 12–20 % of the posterior's and the search's time); an index that
    went through here compiles to a plain access. Used on the indices of the hot loops that come from arguments,
    index arrays or arithmetic the compiler cannot bound, and on the variable of a loop over range(a, b) with a
    not a constant (``for c in range(start, end): c = _index(c)``: the start's sign is not carried through the
    loop); a loop over range(n) needs nothing. A negative x is undefined behaviour, as an index out of range is."""
    def codegen(context, builder, signature, args):
        assume = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(1)]),
                                                "llvm.assume")
        builder.call(assume, [builder.icmp_signed(">=", args[0], ir.Constant(args[0].type, 0))])
        return args[0]
    return types.int64(types.int64), codegen


@njit(**INLINE)
def _prefetch_row(array, row):
    """Prefetch the row array[row] of a C-contiguous 2-D array, every 64-byte line of it."""
    width = array.shape[1]
    for i in range(0, width, 8):
        _prefetch(array, row * width + i)
    _prefetch(array, row * width + width - 1)


@intrinsic
def _popcount(typingctx, x):
    """The number of set bits of the uint64 x (one instruction)."""
    def codegen(context, builder, signature, args):
        return builder.zext(builder.ctpop(args[0]), ir.IntType(64))
    return types.int64(types.uint64), codegen


@njit(**INLINE)
def _first_two(words, row):
    """(k, h, l) of the packed state words[row]: its number of active units k, its first active unit h and its
    second l (l = h if k = 1; h = l = 0 if k = 0), without branches on k (the loop runs over the words; one word,
    H ≤ 64, written out: half the time of the loop; a mask of the nonzero words instead of the loop's selects was
    2–3 % slower on dense two-word sets)."""
    if words.shape[1] == 1:
        x = words[row, 0]
        k = _popcount(x)
        h = _lowest_bit(x) if k > 0 else 0
        return k, h, (_lowest_bit(x & (x - _ONE)) if k > 1 else h)
    k, h, l = 0, 0, 0
    for w in range(words.shape[1]):
        x = words[row, w]
        count = _popcount(x)
        first = 64 * w + _lowest_bit(x)
        second = 64 * w + _lowest_bit(x & (x - _ONE))
        h = first if (k == 0) & (count > 0) else h
        l = second if (k == 0) & (count > 1) else (first if (k == 1) & (count > 0) else l)
        k += count
    return k, h, (h if k == 1 else l)


@njit(**INLINE)
def _lowest_bit(x):
    """The index of the lowest set bit of the uint64 x (63 for x = 0)."""
    return np.int64(trailing_zeros(x | _TOP))


@njit(**INLINE)
def _active_units(words, row, k, out):
    """Fill out[:k, row] with the k ≥ 3 active units h (increasing) of the packed state words[row] (bit h mod 64 of
    word h // 64). One word with k = 3 or 4 (the commonest such states) by clearing its lowest bits one after
    another, without the loop over the set bits, whose exit mispredicts (−2 % of a search, −2…−6 % after 30 epochs)."""
    if (words.shape[1] == 1) & (k <= 4):
        x = words[row, 0]
        for i in range(3):
            out[i, row] = _lowest_bit(x)
            x &= x - _ONE
        out[k - 1, row] = _lowest_bit(x) if k == 4 else out[2, row]
        return
    i = 0
    for w in range(words.shape[1]):
        x = words[row, w]
        while x != 0:
            out[i, row] = 64 * w + np.int64(trailing_zeros(x))
            i += 1
            x &= x - _ONE


@njit(**INLINE)
def _flip(words, row, h):
    """Flip bit h of the packed state words[row] in place."""
    words[row, _index(h) >> 6] ^= _ONE << np.uint64(h & 63)


@njit(**INLINE)
def _bit(words, row, h):
    """Bit h (0 or 1) of the packed state words[row]."""
    return (words[row, _index(h) >> 6] >> np.uint64(h & 63)) & _ONE


# ----------------------------------------------------------------------------------------------- small dense algebra
@njit(**JIT)
def _cholesky(M, k):
    """In place, the lower Cholesky factor L of M[:k, :k] = L Lᵀ; returns log det M = 2 Σ_i log L_ii
    (NaN if M is not positive definite)."""
    half_logdet = 0.0
    for j in range(k):
        s = M[j, j]
        for p in range(j):
            s -= M[j, p] * M[j, p]
        if not s > 0.0:
            return np.nan
        d = np.sqrt(s)
        M[j, j] = d
        half_logdet += np.log(d)
        for i in range(j + 1, k):
            s = M[i, j]
            for p in range(j):
                s -= M[i, p] * M[j, p]
            M[i, j] = s / d
    return 2.0 * half_logdet


@njit(**JIT)
def _inverse_from_cholesky(L, k, out):
    """out[:k, :k] = M⁻¹ = L⁻ᵀ L⁻¹ for the Cholesky factor L of M (L is overwritten by L⁻¹)."""
    for j in range(k):
        L[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, k):
            s = 0.0
            for p in range(j, i):
                s -= L[i, p] * L[p, j]
            L[i, j] = s / L[i, i]
    for i in range(k):
        for j in range(i, k):
            s = 0.0
            for p in range(j, k):
                s += L[p, i] * L[p, j]
            out[i, j] = s
            out[j, i] = s


# ----------------------------------------------------------------------------------------------- state terms
# θ = (Ψ as (1, H) or (H, H), G/σ², μ, log-odds, [σ², log p(0)], per-unit diag-Ψ terms (H, 6) [1/ψ_h, μ_h/ψ_h,
#      log ψ_h, μ_h²/ψ_h, (M_A)_hh = 1/ψ_h + G_hh/σ², log-odds_h − ½ log ψ_h − ½ μ_h²/ψ_h], the table of the states
#      with k ≤ 2 (H(H+1)/2 + 1, 6), see ``_tabulate``).
@njit(**INLINE)
def _precision(psi, G_scaled, mu, unit, log_odds, log_p0, A, k, M, tmp, c):
    """M[:k, :k] = M_A = Ψ_AA⁻¹ + G_AA/σ², c = Ψ_AA⁻¹ μ_A (Ψ diagonal: from the per-unit terms; full: from the
    Cholesky factor of Ψ_AA, ``tmp`` is k×k scratch); returns the state-only part of the log-joint without its
    −½ log det M_A term: log p(s) − ½ log det Ψ_AA − ½ μ_Aᵀ Ψ_AA⁻¹ μ_A."""
    logdet_psi, mu_c = 0.0, 0.0
    if psi.shape[0] == 1:
        for i in range(k):
            h = A[i]
            for j in range(k):
                M[i, j] = 0.0
            M[i, i] = unit[h, 0]
            c[i] = unit[h, 1]
            logdet_psi += unit[h, 2]
            mu_c += unit[h, 3]
    else:
        for i in range(k):
            for j in range(k):
                tmp[i, j] = psi[A[i], A[j]]
        logdet_psi = _cholesky(tmp, k)
        _inverse_from_cholesky(tmp, k, M)
        for i in range(k):
            s = 0.0
            for j in range(k):
                s += M[i, j] * mu[A[j]]
            c[i] = s
        for i in range(k):
            mu_c += mu[A[i]] * c[i]
    for i in range(k):
        for j in range(k):
            M[i, j] = M[i, j] + G_scaled[A[i], A[j]]
    prior = 0.0
    for i in range(k):
        prior += log_odds[A[i]]
    return log_p0 + prior - 0.5 * (logdet_psi + mu_c)


@njit(**JIT)
def _state_terms(theta, A, k, work, tmp, cov, c):
    """For the active set A[:k]: cov = M_A⁻¹ (from the Cholesky factor of M_A), c = Ψ_AA⁻¹ μ_A; returns
    const_A = log p(s) − ½ log det Ψ_AA − ½ log det M_A − ½ μ_Aᵀ Ψ_AA⁻¹ μ_A."""
    const = _precision(theta[0], theta[1], theta[2], theta[5], theta[3], theta[4][1], A, k, work, tmp, c)
    logdet_M = _cholesky(work, k)
    _inverse_from_cholesky(work, k, cov)
    return const - 0.5 * logdet_M


@njit(**INLINE)
def _ldl(M, k, relative):
    """In place, the square-root-free Cholesky factorisation M[:k, :k] = L D Lᵀ (reads the lower triangle; D goes
    on the diagonal, the unit lower L below it). Returns log det M = Σ log D_jj (one log per ~150 decades of the
    running product), or NaN if a pivot D_jj is not above ``relative`` × M_jj (relative = 0: not positive)."""
    product, log_det = 1.0, 0.0
    for j in range(k):
        d = M[j, j]
        for p in range(j):
            d -= M[j, p] * M[j, p] * M[p, p]
        if not d > relative * M[j, j]:
            return np.nan
        M[j, j] = d
        inverse = 1.0 / d
        for i in range(j + 1, k):
            s = M[i, j]
            for p in range(j):
                s -= M[i, p] * M[j, p] * M[p, p]
            M[i, j] = s * inverse
        product *= d
        if not 1e-150 < product < 1e150:
            log_det += np.log(product)
            product = 1.0
    return log_det + np.log(product)


@njit(**INLINE)
def _ldl_solve(L, k, x, first, row, means):
    """rᵀ M⁻¹ r for M = L D Lᵀ factorised by ``_ldl`` and r in x[first:first + k, row]: w = L⁻¹ r,
    rᵀ M⁻¹ r = Σ w_j²/D_jj; with ``means`` x[first:first + k, row] becomes M⁻¹ r = L⁻ᵀ D⁻¹ w (else it holds w)."""
    rm = 0.0
    for i in range(k):
        s = x[first + i, row]
        for j in range(i):
            s -= L[i, j] * x[first + j, row]
        x[first + i, row] = s
        rm += s * (s / L[i, i])
    if means:
        for i in range(k - 1, -1, -1):
            s = x[first + i, row] / L[i, i]
            for j in range(i + 1, k):
                s -= L[j, i] * x[first + j, row]
            x[first + i, row] = s
    return rm


@njit(**JIT)
def _solve_state(psi, G_scaled, mu, unit, log_odds, scalars, b, A, k, work, tmp, c, m, row, means):
    """const_A + ½ rᵀm for one patch (b = Wᵀy/σ²) and a state with k > 2 active units A[:k], with r = c + b_A
    and (with ``means``) m = M_A⁻¹ r into m[:k, row] (else m[:, row] is scratch), by the square-root-free Cholesky
    factorisation M_A = L D Lᵀ (``_ldl``): log det M_A = Σ log D_jj, rᵀm = Σ w_j²/D_jj with w = L⁻¹ r."""
    const = _precision(psi, G_scaled, mu, unit, log_odds, scalars[1], A, k, work, tmp, c)
    log_det = _ldl(work, k, 0.0)
    for i in range(k):
        m[i, row] = c[i] + b[A[i]]
    return (const - 0.5 * log_det) + 0.5 * _ldl_solve(work, k, m, 0, row, means)


@njit(**INLINE)
def _pair_form(pairs, t, b0, b1):
    """(m₀, m₁, const_A + ½ rᵀm) of the state in row t of the k ≤ 2 table for one patch (b₀, b₁ its units' entries
    of b = Wᵀy/σ²): r = c_A + b_A, m = M_A⁻¹ r from the row's (cov₀₀, cov₀₁, cov₁₁, c₀, c₁, const_A)."""
    r0, r1 = pairs[t, 3] + b0, pairs[t, 4] + b1
    m0 = pairs[t, 0] * r0 + pairs[t, 1] * r1
    m1 = pairs[t, 1] * r0 + pairs[t, 2] * r1
    return m0, m1, pairs[t, 5] + 0.5 * (r0 * m0 + r1 * m1)


@njit(**INLINE)
def _border(G_scaled, unit, pairs, t, A, k, U, S):
    """Block elimination of M_A for a state with k ≥ 3 active units A[:k] and a diagonal Ψ, from its first two
    units' pair P = {A₀, A₁} (M_P⁻¹ = C in row t of the k ≤ 2 table) bordered by Q = A[2:k] (q = k − 2 units):
        M_A = [[M_P, G_PQ], [G_QP, M_Q]],   U = C G_PQ,   S = M_Q − G_QP U   (the Schur complement)
    with G_PQ etc. from G/σ² and M_Q = diag(1/ψ_Q) + G_QQ/σ². U goes to U[:2, :q], G_PQ to U[2:4, :q], and S is
    factorised in place, S = L D Lᵀ (``_ldl``) in S[:q, :q]. Returns log det S (log det M_A = log det M_P +
    log det S), or NaN where the elimination would lose more than ~3 digits: a nearly singular M_P (correlation
    of its two units above 0.9995), S_jj below 10⁻³ of the diagonal of M_A it comes from, or a pivot below 10⁻³
    of its S_jj (nearly parallel columns of W, e.g. a model of constant patches) — callers then factorise M_A."""
    p0, p1 = A[0], A[1]
    c00, c01, c11 = pairs[t, 0], pairs[t, 1], pairs[t, 2]
    if not c01 * c01 < 0.999 * (c00 * c11):
        return np.nan
    for j in range(k - 2):
        h = A[2 + j]
        g0, g1 = G_scaled[p0, h], G_scaled[p1, h]
        u0, u1 = c00 * g0 + c01 * g1, c01 * g0 + c11 * g1
        U[0, j], U[1, j], U[2, j], U[3, j] = u0, u1, g0, g1
        for i in range(j):
            S[j, i] = G_scaled[A[2 + i], h] - (U[2, i] * u0 + U[3, i] * u1)
        S[j, j] = unit[h, 4] - (g0 * u0 + g1 * u1)
        if not S[j, j] > WELL_CONDITIONED * unit[h, 4]:
            return np.nan
    return _ldl(S, k - 2, WELL_CONDITIONED)


@njit(**INLINE)
def _bordered_pair(G_scaled, unit, pairs, b, A, k, pair, moments, row, U, S, keep):
    """``_bordered`` for k = 3 or 4 (with a diagonal Ψ the commonest k > 2 states) in closed form: S = M_Q −
    G_QP U is a number (k = 3) or 2×2 (k = 4), so log det S, S⁻¹ t and the conditioning checks of ``_border`` are
    written out (straight-line code: the loops of the general form cost 10–20 % more on such states). With
    ``keep`` also U and S = L D Lᵀ as ``_border`` leaves them (bit for bit)."""
    p0, p1, q0 = A[0], A[1], A[2]
    t = _pair_row(p0, p1, unit.shape[0])
    c00, c01, c11 = pairs[t, 0], pairs[t, 1], pairs[t, 2]
    if not c01 * c01 < 0.999 * (c00 * c11):
        return np.nan
    g00, g10 = G_scaled[p0, q0], G_scaled[p1, q0]
    u00, u10 = c00 * g00 + c01 * g10, c01 * g00 + c11 * g10
    s00 = unit[q0, 4] - (g00 * u00 + g10 * u10)
    if not s00 > WELL_CONDITIONED * unit[q0, 4]:
        return np.nan
    m0, m1, value = pair
    t0 = unit[q0, 1] + b[q0] - (g00 * m0 + g10 * m1)
    value += unit[q0, 5]
    if keep:
        U[0, 0], U[1, 0], U[2, 0], U[3, 0], S[0, 0] = u00, u10, g00, g10, s00
    if k == 3:
        n0 = t0 / s00
        moments[0, row], moments[1, row], moments[2, row] = m0 - u00 * n0, m1 - u10 * n0, n0
        return value - 0.5 * np.log(s00) + 0.5 * t0 * n0
    q1 = A[3]
    g01, g11 = G_scaled[p0, q1], G_scaled[p1, q1]
    u01, u11 = c00 * g01 + c01 * g11, c01 * g01 + c11 * g11
    s01 = G_scaled[q0, q1] - (g00 * u01 + g10 * u11)
    s11 = unit[q1, 4] - (g01 * u01 + g11 * u11)
    if not (s11 > WELL_CONDITIONED * unit[q1, 4]) & (s01 * s01 < 0.999 * (s00 * s11)):
        return np.nan
    t1 = unit[q1, 1] + b[q1] - (g01 * m0 + g11 * m1)
    if keep:
        U[0, 1], U[1, 1], U[2, 1], U[3, 1] = u01, u11, g01, g11
        S[1, 0] = s01 * (1.0 / s00)
        S[1, 1] = s11 - S[1, 0] * S[1, 0] * s00
    det = s00 * s11 - s01 * s01
    n0, n1 = (s11 * t0 - s01 * t1) / det, (s00 * t1 - s01 * t0) / det
    moments[0, row], moments[1, row] = m0 - (u00 * n0 + u01 * n1), m1 - (u10 * n0 + u11 * n1)
    moments[2, row], moments[3, row] = n0, n1
    return value + unit[q1, 5] - 0.5 * np.log(det) + 0.5 * (t0 * n0 + t1 * n1)


@njit(**INLINE)
def _bordered(G_scaled, unit, pairs, b, A, k, pair, U, S, moments, row, means):
    """const_A + ½ rᵀm for one patch (b = Wᵀy/σ²) and a state with k ≥ 3 active units A[:k] and a diagonal Ψ,
    from its pair's table row and ``_border`` (r = c + b; ``pair``: (m⁰_P, const_P + ½ r_Pᵀ m⁰_P) as ``_pair_form``
    gives them for P = {A₀, A₁}, m⁰_P = M_P⁻¹ r_P):
        t = r_Q − G_QP m⁰_P,   m_Q = S⁻¹ t,   m_P = m⁰_P − U m_Q,   rᵀ M_A⁻¹ r = r_Pᵀ m⁰_P + tᵀ S⁻¹ t,
        const_A = const_P + Σ_{h∈Q} (log-odds_h − ½ log ψ_h − ½ μ_h²/ψ_h) − ½ log det S.
    With ``means`` m = (m_P, m_Q) goes to moments[:k, row] (else rows 2 … k−1 are scratch). NaN as ``_border``."""
    t = _pair_row(A[0], A[1], unit.shape[0])
    log_det = _border(G_scaled, unit, pairs, t, A, k, U, S)
    if not np.isfinite(log_det):
        return np.nan
    m0, m1, value = pair
    q = k - 2
    for j in range(q):
        h = A[2 + j]
        moments[2 + j, row] = unit[h, 1] + b[h] - (U[2, j] * m0 + U[3, j] * m1)
        value += unit[h, 5]
    value += 0.5 * (_ldl_solve(S, q, moments, TWO, row, means) - log_det)
    if means:
        for j in range(q):
            m0 -= U[0, j] * moments[2 + j, row]
            m1 -= U[1, j] * moments[2 + j, row]
        moments[0, row], moments[1, row] = m0, m1
    return value


@njit(**INLINE)
def _bordered_covariance(pairs, t, k, U, S, cov):
    """M_A⁻¹ into cov[:k, :k] from ``_border``'s U and S = L D Lᵀ (C = M_P⁻¹ from row t of the k ≤ 2 table):
        S⁻¹ = L⁻ᵀ D⁻¹ L⁻¹,   V = U S⁻¹,   M_A⁻¹ = [[C + V Uᵀ, −V], [−Vᵀ, S⁻¹]]
    (L is overwritten by L⁻¹, D by D⁻¹)."""
    q = k - 2
    for j in range(q):                      # L⁻¹ (unit lower) in place, column by column; D⁻¹ on the diagonal
        S[j, j] = 1.0 / S[j, j]
        for i in range(j + 1, q):
            s = -S[i, j]
            for p in range(j + 1, i):
                s -= S[i, p] * S[p, j]
            S[i, j] = s
    for i in range(q):
        for j in range(i, q):
            s = S[j, i] * S[j, j] if j > i else S[j, j]
            for p in range(j + 1, q):
                s += S[p, i] * S[p, j] * S[p, p]
            cov[2 + i, 2 + j] = s
            cov[2 + j, 2 + i] = s
    v00 = v01 = v11 = 0.0
    for j in range(q):
        a0, a1 = 0.0, 0.0
        for i in range(q):
            a0 += U[0, i] * cov[2 + i, 2 + j]
            a1 += U[1, i] * cov[2 + i, 2 + j]
        cov[0, 2 + j], cov[2 + j, 0], cov[1, 2 + j], cov[2 + j, 1] = -a0, -a0, -a1, -a1
        v00 += a0 * U[0, j]
        v01 += a0 * U[1, j]
        v11 += a1 * U[1, j]
    cov[0, 0], cov[1, 1] = pairs[t, 0] + v00, pairs[t, 2] + v11
    cov[0, 1] = cov[1, 0] = pairs[t, 1] + v01


@njit(**INLINE)
def _pair_row(h, l, H):
    """Row of the state {h, l} (h ≤ l; h = l: the single-unit state {h}) in the table of states with k ≤ 2: the
    row-major upper triangle of an H×H matrix, diagonal included; the empty state is row H(H+1)/2."""
    return _index(h * H - (h * (h - 1)) // 2 + (l - h))


@njit(**JIT)
def _tabulate(theta, unit, pairs, scratch):
    """The per-unit diagonal-Ψ terms (``unit``), and per state with k ≤ 2 active units the row
    (cov₀₀, cov₀₁, cov₁₁, c₀, c₁, const) of ``pairs`` at ``_pair_row``: a pair {h < l} its 2×2 M_A⁻¹, c_A and
    const_A; a single unit {h} (row (h, h)) (M_A⁻¹, 0, 0, c_A, 0, const_A); the empty state zeros and log p(0).
    With these zeros the k ≤ 2 forms of ``_score`` and ``_accumulate`` give for k = 1 and k = 0 exactly
    (bit for bit) the one-unit and empty-state values, with no branch on k."""
    psi, mu = theta[0], theta[2]
    H = unit.shape[0]
    if psi.shape[0] == 1:
        for h in range(H):
            unit[h, 0], unit[h, 1], unit[h, 2] = 1.0 / psi[0, h], mu[h] / psi[0, h], np.log(psi[0, h])
            unit[h, 3] = mu[h] * unit[h, 1]
            unit[h, 4] = unit[h, 0] + theta[1][h, h]
            unit[h, 5] = theta[3][h] - 0.5 * (unit[h, 2] + unit[h, 3])
    A, work, tmp, cov, c = scratch
    pairs[:] = 0.0
    pairs[H * (H + 1) // 2, 5] = theta[4][1]
    for h in range(H):
        A[0] = h
        t = _pair_row(h, h, H)
        const = _state_terms(theta, A, ONE, work, tmp, cov, c)
        pairs[t, 0], pairs[t, 3], pairs[t, 5] = cov[0, 0], c[0], const
        for l in range(h + 1, H):
            A[1] = l
            const = _state_terms(theta, A, TWO, work, tmp, cov, c)
            t = _pair_row(h, l, H)
            pairs[t, 0], pairs[t, 1], pairs[t, 2], pairs[t, 3], pairs[t, 4], pairs[t, 5] = (
                cov[0, 0], cov[0, 1], cov[1, 1], c[0], c[1], const)


def theta_terms(G, sigma2, psi, mu, log_odds, log_p0):
    """The Θ-derived arrays every kernel takes (the θ tuple described above)."""
    ensure_compiled()
    theta = _theta_arrays(G, sigma2, psi, mu, log_odds, log_p0)
    _tabulate(theta, theta[5], theta[6], _scratch(2))
    return theta


def _theta_arrays(G, sigma2, psi, mu, log_odds, log_p0):
    """The θ tuple with its per-unit table zero and its k ≤ 2 table unfilled (``_tabulate`` fills both)."""
    H = G.shape[0]
    return (np.ascontiguousarray(psi.reshape(1, H) if psi.ndim == 1 else psi, dtype=np.float64),
            np.ascontiguousarray(G / sigma2, dtype=np.float64), np.ascontiguousarray(mu, dtype=np.float64),
            np.ascontiguousarray(log_odds, dtype=np.float64), np.array([sigma2, log_p0], dtype=np.float64),
            np.zeros((H, 6)), np.empty((H * (H + 1) // 2 + 1, 6)))


def _scratch(H):
    """Scratch of the state terms (any k ≤ H): A, work, tmp, cov, c (tmp has ≥ 4 rows: ``_border``'s U, G_PQ)."""
    H = max(H, 4)
    return np.empty(H, dtype=np.int64), np.empty((H, H)), np.empty((H, H)), np.empty((H, H)), np.empty(H)


def _candidates(C, W, H):
    """Buffers of C scored candidates of a patch: states (C, W), rows 0…C−1, log-joints, active units
    (H, C), their counts k, posterior means m (H, C) (candidate c in column c: the k ≤ 2 states' (h, l) and
    (m₀, m₁) of all candidates lie in two contiguous rows)."""
    H = max(H, 2)                       # k ≤ 2 states keep (h, l) and (m₀, m₁) whatever H
    return (np.empty((C, W), dtype=np.uint64), np.arange(C), np.empty(C), np.empty((H, C), dtype=np.int64),
            np.empty(C, dtype=np.int64), np.empty((H, C)))


PREFETCH_TABLE_BYTES = 1 << 19   # _score prefetches the table rows of a larger k ≤ 2 table (H ≥ 148): at H = 256
# (1.6 MB, beyond this core's 1 MB L2) the search −10 %, the posterior −8 %; a table that L2 holds (H = 64: 0.1 MB,
# H = 128: 0.4 MB) gains nothing from it (−2 … +3.5 % in repeated runs), so it is spared the prefetches' work
KEPT_MAX = 8        # the posterior keeps the eliminations of states with k − 2 ≤ KEPT_MAX bordering units


def _eliminations(C):
    """Buffers in which ``_score`` keeps, for the statistics, each of C states' block elimination (``_border``'s
    U (4, KEPT_MAX) and factorised S (KEPT_MAX, KEPT_MAX)) and whether it did (C,); C = 0: none kept."""
    return np.empty((C, 4, KEPT_MAX)), np.empty((C, KEPT_MAX, KEPT_MAX)), np.zeros(C, dtype=np.bool_)


@njit(**JIT)
def _score(theta, B, n, tail, cand, rows, count, lpj, units, ks, moments, scratch, means, kept):
    """For the candidates c = rows[:count] of patch n: lpj[c] = log p(y_n, cand[c]) = const_A + ½ rᵀm + tail
    with r = c_A + b_A, m = M_A⁻¹ r (b = B[n] = Wᵀy_n/σ²); also ks[c] = k, units[:k, c] = A (for k ≤ 2:
    units[:2, c] = (h, l) as in ``_first_two``) and, with ``means``, moments[:k, c] = m (k ≤ 2: moments[:2, c],
    zeros for absent units). One branch-free pass gives every state the closed form of its first two units on
    the ``pairs`` table (``_pair_form``): the result for k ≤ 2; with k > 2 and a diagonal Ψ that pair is then
    bordered by the other units (``_bordered_pair`` for k = 3, 4, else ``_bordered``), others take an L D Lᵀ
    factorisation (``_solve_state``). Where ``kept`` has room, the bordered forms' elimination of state c (U,
    S = L D Lᵀ) is kept in kept[0][c], kept[1][c] for ``_accumulate``, and kept[2][c] says whether it was."""
    psi, G_scaled, mu, log_odds, scalars, unit, pairs = theta
    A, work, tmp, _, cvec = scratch
    U_kept, S_kept, is_kept = kept
    keep = is_kept.shape[0] > 0
    H = unit.shape[0]
    empty = _index(H * (H + 1) // 2)
    diagonal = psi.shape[0] == 1
    far = pairs.nbytes > PREFETCH_TABLE_BYTES
    b = B[n]
    for i in range(count):          # every state's k and first two units, then the k ≤ 2 form for all of them:
        c = _index(rows[i])         # branch-free, the table rows' loads overlap (at H = 256 the table is not
        k, h, l = _first_two(cand, c)   # in L2: 12–16 % faster there than one loop with a branch on k), and a
        ks[c] = k                   # large table's rows are prefetched (``PREFETCH_TABLE_BYTES``)
        units[0, c], units[1, c] = h, l
        if far:
            _prefetch_row(pairs, _pair_row(h, l, H) if k > 0 else empty)
    for i in range(count):
        c = _index(rows[i])
        h, l = _index(units[0, c]), _index(units[1, c])
        m0, m1, value = _pair_form(pairs, _pair_row(h, l, H) if ks[c] > 0 else empty, b[h], b[l])
        moments[0, c], moments[1, c] = m0, m1
        lpj[c] = value              # (the tail is added below: a k > 2 state borders this pair form first)
    for i in range(count):          # then k > 2 (apart: 15 % faster on dense sets than one loop with both)
        c = _index(rows[i])
        k = ks[c]
        if k <= 2:
            lpj[c] += tail
            continue
        pair = moments[0, c], moments[1, c], lpj[c]     # the form of its first two units, bordered below
        _active_units(cand, c, k, units)
        for j in range(k):
            A[j] = units[j, c]
        value = np.nan
        q = k - 2
        here = keep and q <= KEPT_MAX
        if diagonal & (k <= 4):
            value = _bordered_pair(G_scaled, unit, pairs, b, A, k, pair, moments, c, tmp, work, here)
        elif diagonal:
            value = _bordered(G_scaled, unit, pairs, b, A, k, pair, tmp, work, moments, c, means)
        if keep:
            is_kept[c] = here and np.isfinite(value)
            if is_kept[c]:              # a copy (choosing the buffers here instead costs 2 s of compile time)
                for j in range(q):
                    for i in range(4):
                        U_kept[c, i, j] = tmp[i, j]
                    for i in range(j, q):
                        S_kept[c, i, j] = work[i, j]
        if not np.isfinite(value):      # full Ψ, or the elimination lost to cancellation: L D Lᵀ of M_A
            value = _solve_state(psi, G_scaled, mu, unit, log_odds, scalars, b, A, k, work, tmp, cvec, moments,
                                 c, means)
        lpj[c] = value + tail


# ----------------------------------------------------------------------------------------------- exp
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10   # ln 2 = hi + lo, hi: 32 bits
_ROUND = 6755399441055744.0             # 1.5·2⁵²: (x + _ROUND) − _ROUND rounds x to an integer
LANES = 32                              # _exp loops run over a multiple of this many elements (no scalar tail)


@njit(**INLINE)
def _exp(x):
    """eˣ within 1 ulp of the correctly rounded value (89 % exact; 0 for x ≤ −750, ∞ for x ≥ 710, NaN kept),
    by plain arithmetic that the compiler vectorises (a loop of libm ``exp`` calls does not): with
    n = round(x / ln 2) and r = x − n ln 2 (|r| ≤ ½ ln 2, n ln 2 in two parts so that r is exact),
        eˣ = 2ⁿ eʳ,   eʳ = Σ_{i ≤ 13} rⁱ / i!   (Horner; the remainder is below 2⁻⁵⁶ eʳ),
    and 2ⁿ = 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋) from the exponent bits (both factors normal down to the subnormal range)."""
    x = -750.0 if x < -750.0 else (710.0 if x > 710.0 else x)
    n = (x * _LOG2E + _ROUND) - _ROUND
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    for factorial in (479001600.0, 39916800.0, 3628800.0, 362880.0, 40320.0, 5040.0, 720.0, 120.0, 24.0, 6.0, 2.0,
                      1.0, 1.0):
        p = p * r + 1.0 / factorial
    k = np.int64(n)
    half = k >> 1
    return p * _bits_float((half + 1023) << 52) * _bits_float((k - half + 1023) << 52)


# ----------------------------------------------------------------------------------------------- posterior
@njit(**INLINE)
def _add_means(q, S, units, ks, moments, mean):
    """⟨s⊙z⟩_n += Σ_s q[s] scatter_A(m_s) for patch n's S states (``_score``'s units and moments; a state with
    k ≤ 2 adds both of its (h, l), an absent unit's m being exactly 0)."""
    for s in range(S):
        k, qs = ks[s], q[s]
        if k <= 2:
            mean[_index(units[0, s])] += qs * moments[0, s]
            mean[_index(units[1, s])] += qs * moments[1, s]
        else:
            for i in range(k):
                mean[_index(units[i, s])] += qs * moments[i, s]


@njit(**INLINE)
def _add_units(qs, units, moments, s, k, mean, first):
    """mean[h] += q m_h, S_s[h] += q, S_sz[h] += q m_h for the k units h of state s (k > 2; in
    ``_accumulate_three``/``_four`` k is a constant and the loop unrolls)."""
    for i in range(k):
        h, m = _index(units[i, s]), moments[i, s]
        mean[h] += qs * m
        first[0, h] += qs
        first[1, h] += qs * m


@njit(**INLINE)
def _accumulate_three(pairs, H, qs, units, moments, s, U, S, mean, first, second):
    """``_accumulate`` of one state with k = 3 whose elimination ``_score`` kept, written out (bit for bit the
    general path: ``_bordered_covariance`` with q = 1, S = s₀₀ a number, d = 1/s₀₀):
        M_A⁻¹ = [[C + d u uᵀ, −d u], [−d uᵀ, d]],   u = U[:2, 0]."""
    h, l, g = _index(units[0, s]), _index(units[1, s]), _index(units[2, s])
    m0, m1, m2 = moments[0, s], moments[1, s], moments[2, s]
    t = _pair_row(h, l, H)
    d = 1.0 / S[0, 0]
    a0, a1 = 0.0 + U[0, 0] * d, 0.0 + U[1, 0] * d
    v00, v01, v11 = 0.0 + a0 * U[0, 0], 0.0 + a0 * U[1, 0], 0.0 + a1 * U[1, 0]
    _add_units(qs, units, moments, s, 3, mean, first)
    second[0, h, h] += qs * ((pairs[t, 0] + v00) + m0 * m0)
    second[0, h, l] += qs * ((pairs[t, 1] + v01) + m0 * m1)
    second[0, h, g] += qs * (-a0 + m0 * m2)
    second[0, l, l] += qs * ((pairs[t, 2] + v11) + m1 * m1)
    second[0, l, g] += qs * (-a1 + m1 * m2)
    second[0, g, g] += qs * (d + m2 * m2)


@njit(**INLINE)
def _accumulate_four(pairs, H, qs, units, moments, s, U, S, mean, first, second):
    """k = 4 as ``_accumulate_three``: S = L D Lᵀ is 2×2 (S[0, 0] = D₀, S[1, 0] = L₁₀, S[1, 1] = D₁), so
    S⁻¹ = [[1/D₀ + L₁₀² /D₁, −L₁₀/D₁], [−L₁₀/D₁, 1/D₁]] and V = U S⁻¹ (bit for bit ``_bordered_covariance``)."""
    h0, h1, h2, h3 = _index(units[0, s]), _index(units[1, s]), _index(units[2, s]), _index(units[3, s])
    m0, m1, m2, m3 = moments[0, s], moments[1, s], moments[2, s], moments[3, s]
    t = _pair_row(h0, h1, H)
    e0, l10, e1 = 1.0 / S[0, 0], -S[1, 0], 1.0 / S[1, 1]
    c22, c23, c33 = e0 + l10 * l10 * e1, l10 * e1, e1
    a0 = 0.0 + U[0, 0] * c22 + U[0, 1] * c23
    a1 = 0.0 + U[1, 0] * c22 + U[1, 1] * c23
    b0 = 0.0 + U[0, 0] * c23 + U[0, 1] * c33
    b1 = 0.0 + U[1, 0] * c23 + U[1, 1] * c33
    v00 = 0.0 + a0 * U[0, 0] + b0 * U[0, 1]
    v01 = 0.0 + a0 * U[1, 0] + b0 * U[1, 1]
    v11 = 0.0 + a1 * U[1, 0] + b1 * U[1, 1]
    _add_units(qs, units, moments, s, 4, mean, first)
    second[0, h0, h0] += qs * ((pairs[t, 0] + v00) + m0 * m0)
    second[0, h0, h1] += qs * ((pairs[t, 1] + v01) + m0 * m1)
    second[0, h0, h2] += qs * (-a0 + m0 * m2)
    second[0, h0, h3] += qs * (-b0 + m0 * m3)
    second[0, h1, h1] += qs * ((pairs[t, 2] + v11) + m1 * m1)
    second[0, h1, h2] += qs * (-a1 + m1 * m2)
    second[0, h1, h3] += qs * (-b1 + m1 * m3)
    second[0, h2, h2] += qs * (c22 + m2 * m2)
    second[0, h2, h3] += qs * (c23 + m2 * m3)
    second[0, h3, h3] += qs * (c33 + m3 * m3)


@njit(**INLINE)
def _accumulate(theta, q, S, units, ks, moments, scratch, kept, mean, first, second):
    """Add the posterior moments of a patch's S states, weighted by q[s] = q_n(s), to its ⟨s⊙z⟩_n (mean, in
    the same pass: as ``_add_means``) and to the M-step sums of a part: first = [S_s, S_sz] += [q s, q m],
    second = [S_szsz, (S_ss, T)] += [q (M_A⁻¹ + m mᵀ), (q s sᵀ, q s_h m_h' for a full Ψ)]. The symmetric S_szsz
    and S_ss get their upper triangle only (h ≤ h'; ``posterior`` mirrors it). States with k ≤ 2 add their
    (h, l) terms from the ``pairs`` row without a branch on k: the absent units' terms are exact zeros (0·q), so
    the sums are bit for bit those of adding the present units only; k > 2 states take M_A⁻¹ from their pair's
    row bordered by the other units (``_bordered_covariance``; written out for k = 3 and 4, the commonest k > 2,
    in ``_accumulate_three``/``_four``: 10–23 % faster statistics) where ``_score`` kept the elimination, else
    (k > KEPT_MAX + 2, a full Ψ, an ill-conditioned state) from a Cholesky factor and its inverse."""
    pairs = theta[6]
    A, work, tmp, cov, c = scratch
    H = theta[5].shape[0]
    empty = _index(H * (H + 1) // 2)
    full = second.shape[0] == 3
    for s in range(S):
        k, qs = ks[s], q[s]
        if k <= 2:
            h, l, m0, m1 = _index(units[0, s]), _index(units[1, s]), moments[0, s], moments[1, s]
            mean[h] += qs * m0
            mean[l] += qs * m1
            t = _pair_row(h, l, H) if k > 0 else empty
            one, two = qs * (k >= 1), qs * (k >= 2)         # q for a present unit (h, resp. l), else 0
            first[0, h] += one
            first[0, l] += two
            first[1, h] += qs * m0
            first[1, l] += qs * m1
            second[0, h, h] += qs * (pairs[t, 0] + m0 * m0)
            second[0, h, l] += qs * (pairs[t, 1] + m0 * m1)
            second[0, l, l] += qs * (pairs[t, 2] + m1 * m1)
            if full:
                second[1, h, h] += one
                second[1, h, l] += two
                second[1, l, l] += two
                second[2, h, h] += qs * m0
                second[2, h, l] += qs * m1
                second[2, l, h] += two * m0
                second[2, l, l] += qs * m1
            continue
        if kept[2][s] & (k <= 4) & (not full):
            if k == 3:
                _accumulate_three(pairs, H, qs, units, moments, s, kept[0][s], kept[1][s], mean, first, second)
            else:
                _accumulate_four(pairs, H, qs, units, moments, s, kept[0][s], kept[1][s], mean, first, second)
            continue
        _add_units(qs, units, moments, s, k, mean, first)
        for i in range(k):
            A[i] = units[i, s]
        if kept[2][s]:
            _bordered_covariance(pairs, _pair_row(A[0], A[1], H), k, kept[0][s], kept[1][s], cov)
        else:
            _state_terms(theta, A, k, work, tmp, cov, c)
        for i in range(k):
            h = _index(A[i])
            for j in range(i, k):
                second[0, h, _index(A[j])] += qs * (cov[i, j] + moments[i, s] * moments[j, s])
            if full:
                for j in range(i, k):
                    second[1, h, _index(A[j])] += qs
                for j in range(k):
                    second[2, h, _index(A[j])] += qs * moments[j, s]


@njit(**JIT)
def posterior_parts(theta, B, tails, K, want, first, last, lpj, log_norm, mean_sz, sums, pair_sums, scratch, buffers,
                    kept, q):
    """For the parts first … last−1 of a block (part p: patches [p·N/P, (p+1)·N/P) of N, P = len(sums)):
    log-joints lpj (N, S) of the truncated sets K (N, S, W) and log Σ_s p(s, y_n) (N,); with want ≥ 1
    ⟨s⊙z⟩_n = Σ_s q_n(s) scatter_A(m_{n,s}) into mean_sz (N, H); with want = 2 also the part's sums
    [S_s, S_sz] into sums (P, 2, H) and [S_szsz, (S_ss, T for a full Ψ)] into pair_sums (P, 1 or 3, H, H).
    The outputs need not be zeroed: each part's sums and each patch's ⟨s⊙z⟩_n start from 0 here (in the thread
    that fills them). ``q`` is scratch for the S weights, S rounded up to a multiple of LANES (``_exp``)."""
    N, S, W = K.shape
    P = sums.shape[0]
    _, rows, values, units, ks, moments = buffers    # the states are read from K in place
    for part in range(first, last):
        part = _index(part)
        sums[part] = 0.0
        pair_sums[part] = 0.0
        for n in range(part * N // P, (part + 1) * N // P):
            n = _index(n)
            if n + 1 < N:                       # the next patch's b (−2…−6 % of the posterior and of the search)
                _prefetch_row(B, n + 1)
            _score(theta, B, n, tails[n], K[n], rows, S, values, units, ks, moments, scratch, want >= 1, kept)
            top = -np.inf
            for s in range(S):
                lpj[n, s] = values[s]
                top = max(top, values[s])
            for s in range(S):                  # q (padded with −∞ → 0 to whole vectors): p(s, y_n) / max
                q[s] = values[s] - top
            for s in range(S, q.shape[0]):
                q[_index(s)] = -np.inf
            for s in range(q.shape[0]):
                q[s] = _exp(q[s])
            total = 0.0
            for s in range(S):
                total += q[s]
            log_norm[n] = np.log(total) + top
            if want >= 1:
                mean_sz[n] = 0.0
                for s in range(S):
                    q[s] /= total               # q_n(s) = p(s, y_n) / Σ_s' p(s', y_n)
                if want == 1:
                    _add_means(q, S, units, ks, moments, mean_sz[n])
                else:
                    _accumulate(theta, q, S, units, ks, moments, scratch, kept, mean_sz[n], sums[part],
                                pair_sums[part])


# ----------------------------------------------------------------------------------------------- evolution
RANK_BITS = 1024     # _count_above compares 1024 bits of codes at a time: 16 int64 or 32 int32 codes


@njit(**INLINE)
def _order_code(x):
    """An int64 whose order is the order of the float x: its bits, with the magnitude bits of negative numbers
    flipped (−0.0 counts as +0.0, NaN as −∞)."""
    bits = _float_bits(x + 0.0 if x == x else -np.inf)
    return bits ^ ((bits >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))


@intrinsic
def _count_above(typingctx, codes, count, b, ranks):
    """ranks[b + l] = #{j < count : codes[j] > codes[b + l]} for the L = RANK_BITS / (bits of a code) lanes l < L
    at once: the lanes as one vector, compared with each codes[j] in turn (codes, int32 or int64, and ranks, int64,
    hold ≥ b + L entries)."""
    width = codes.dtype.bitwidth
    lanes = RANK_BITS // width

    def codegen(context, builder, signature, args):
        codes_array = context.make_array(signature.args[0])(context, builder, args[0])
        ranks_array = context.make_array(signature.args[3])(context, builder, args[3])
        vector = ir.VectorType(ir.IntType(width), lanes)
        lane_codes = builder.load(builder.bitcast(builder.gep(codes_array.data, [args[2]]), vector.as_pointer()),
                                  align=width // 8)
        total = cgutils.alloca_once_value(builder, ir.Constant(vector, None))
        with cgutils.for_range(builder, args[1]) as loop:
            x = builder.load(builder.gep(codes_array.data, [loop.index]))
            spread = builder.shuffle_vector(builder.insert_element(ir.Constant(vector, ir.Undefined), x,
                                                                   ir.Constant(ir.IntType(32), 0)),
                                            ir.Constant(vector, ir.Undefined),
                                            ir.Constant(ir.VectorType(ir.IntType(32), lanes), None))
            above = builder.zext(builder.icmp_signed(">", spread, lane_codes), vector)
            builder.store(builder.add(builder.load(total), above), total)
        counts = builder.sext(builder.load(total), ir.VectorType(ir.IntType(64), lanes))
        builder.store(counts, builder.bitcast(builder.gep(ranks_array.data, [args[2]]), counts.type.as_pointer()),
                      align=8)
        return context.get_dummy_value()
    return types.void(codes, count, b, ranks), codegen


def ranking_buffers(count: int) -> tuple:
    """``_top_ranked``'s buffers for up to count members: codes (int64), their upper halves (int32), ranks (int64),
    each count rounded up to whole 1024-bit vectors of int32 (``_count_above`` reads and writes whole vectors)."""
    size = -(-count // (RANK_BITS // 32)) * (RANK_BITS // 32)
    return np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int32), np.empty(size, dtype=np.int64)


@njit(**INLINE)
def _counted_ranks(codes, count, ranks, slots):
    """r_i = #{j < count : codes_j > codes_i} (``_count_above``) and slots[r_i] = i for every member i; Σ_i r_i =
    count(count−1)/2 − #(tied pairs), so when the sum is count(count−1)/2 there are no ties and the r_i are the
    ranks. Returns whether there were ties."""
    lanes = RANK_BITS // (8 * codes.itemsize)
    for b in range(0, count, lanes):
        _count_above(codes, count, b, ranks)
    total = 0
    for i in range(count):
        total += ranks[i]
        slots[_index(ranks[i])] = i
    return total != count * (count - 1) // 2


@njit(**JIT)
def _top_ranked(buffers, count, first, slots):
    """slots[r] = i for the members i < count whose rank r is below ``first``, the rank being the position in
    the order of decreasing codes[:count] (buffers[0]; buffers from ``ranking_buffers``), ties by index (the order
    of a stable ``argsort(−codes)``); slots[first:count] are overwritten too. The ranks are counted on the codes'
    upper 32 bits, twice as many at a time (``_counted_ranks``): without ties there they order the codes; with
    (rare: two codes within ≈ 10⁻⁶ relative) on the whole codes, and with ties there too a last pass adds
    #{j < i : codes_j = codes_i}."""
    codes, upper, ranks = buffers
    for i in range(count):
        upper[i] = np.int32(codes[i] >> 32)
    if not _counted_ranks(upper, count, ranks, slots):
        return
    if not _counted_ranks(codes, count, ranks, slots):
        return
    for i in range(count):
        r = 0
        for j in range(count):
            r += (codes[j] > codes[i]) | ((codes[j] == codes[i]) & (j < i))
        if r < first:
            slots[_index(r)] = i


@njit(**JIT)
def _select(lpj, start, C, n_parents, rule, u, g, n, ranking, out):
    """The n_parents population members (lpj[start:start+C]) with the largest keys, largest first, ties by
    index (the order of ``argsort(−keys)``), into out: keys lpj (best), u (uniform), or log(u)/(lpj − min lpj + 1)
    (fitness: Efraimidis–Spirakis sampling without replacement ∝ lpj − min + 1, ``u`` holding log(u + 10⁻³⁰⁰)),
    with u = u[g, n]; all members in order if n_parents ≥ C. ``ranking``: ``_top_ranked``'s buffers (≥ C
    members). Returns the number selected."""
    if n_parents >= C:
        for i in range(C):
            out[i] = i
        return C
    start, g, n = _index(start), _index(g), _index(n)
    keys = ranking[0]
    low = np.inf
    for i in range(C):
        low = min(low, lpj[start + i])
    for i in range(C):
        if rule == 2:
            key = lpj[start + i]
        elif rule == 1:
            key = u[g, n, i]
        else:
            key = u[g, n, i] / ((lpj[start + i] - low) + 1.0)
        keys[i] = _order_code(key)
    _top_ranked(ranking, C, n_parents, out)
    return n_parents


@njit(**JIT)
def _crossover(parents, P, H, step, u, g, n, out):
    """Uniform crossover: child i takes bit h from parent i where u[g, n, i, h] < ½, else from parent
    (i + step[g, n, i]) mod P."""
    for i in range(P):
        mate = (i + step[g, n, i]) % P
        for w in range(parents.shape[1]):
            out[i, w] = parents[mate, w]
        for h in range(H):
            if u[g, n, i, h] < 0.5 and _bit(parents, i, h) != _bit(out, i, h):
                _flip(out, i, h)


@njit(**JIT)
def _mutate_sparse(cand, row, H, rho, u, g, n, j, one_flip):
    """Flip every bit of cand[row] independently (uniforms u[g, n, j]) with p(1→0) = clip((1 − ρ + k)/(2k)),
    p(0→1) = clip((1 + ρ − k)/(2(H − k))) (k ones, ρ = Σπ: one flip on average, moving k toward ρ); flip bit
    one_flip if none flipped."""
    k = 0
    for w in range(cand.shape[1]):
        x = cand[row, w]
        while x != 0:
            k += 1
            x &= x - _ONE
    kf = np.float64(k)
    p_off = min(max((1.0 - rho + kf) / (2.0 * kf), 0.0), 1.0) if k > 0 else 0.0
    p_on = min(max((1.0 + rho - kf) / (2.0 * (H - kf)), 0.0), 1.0) if k < H else 0.0
    flipped = False
    for h in range(H):                   # a flip of bit h leaves every other bit's decision unchanged
        if u[g, n, j, h] < (p_off if _bit(cand, row, h) else p_on):
            _flip(cand, row, h)
            flipped = True
    if not flipped:
        _flip(cand, row, one_flip)


@njit(**JIT)
def _make_children(cand, start, chosen, P, n_children, end, H, crossover, mutation, rho, g, n, cross_step, cross_u,
                   flip_bit, flip_u, parents, crossed):
    """Children of the chosen parents cand[start + chosen[:P]] into cand[end:end + P·n_children]: optional
    uniform crossover (on copies of the parents in ``parents``, into ``crossed``), then per child one uniform bit
    flip (mutation 0) or the sparse mutation (1)."""
    W = cand.shape[1]
    start, end, g, n = _index(start), _index(end), _index(g), _index(n)
    crossing = crossover and P >= 2
    if crossing:
        for i in range(P):
            for w in range(W):
                parents[i, w] = cand[start + _index(chosen[i]), w]
        _crossover(parents, P, H, cross_step, cross_u, g, n, crossed)
    for j in range(P * n_children):
        i = _index(j // n_children)
        for w in range(W):
            cand[end + j, w] = crossed[i, w] if crossing else cand[start + _index(chosen[i]), w]
        if mutation == 0:
            _flip(cand, end + j, flip_bit[g, n, j])
        else:
            _mutate_sparse(cand, end + j, H, rho, flip_u, g, n, j, flip_bit[g, n, j])


@njit(**JIT)
def _deduplicate(cand, first, last, prints, rep, todo, table):
    """rep[c] = the first candidate equal to cand[c] (c itself for a new state, then listed in todo) for c in
    first … last−1; returns the number of new states. Each candidate's 64-bit fingerprint (its word for H ≤ 64,
    else x = ⊕_w word_w·(γ + 2w), then x ⊕= x >> 29) goes into prints[c] and selects a slot of ``table`` (open
    addressing, linear probing; a power of two ≥ 2× the candidates, emptied when first = 0, i.e. for each new
    patch), which holds the first candidate of each distinct state: a slot whose candidate has the same
    fingerprint is compared word by word. O(1) expected work per candidate."""
    count, W = 0, cand.shape[1]
    shift = np.uint64(64 - np.int64(trailing_zeros(np.uint64(table.size))))
    mask = table.size - 1
    if first == 0:
        table[:] = -1
    for c in range(first, last):
        c = _index(c)
        x = cand[c, 0]
        if W > 1:                       # (the words' products are independent: a short dependency chain)
            x = np.uint64(0)
            for w in range(W):
                x ^= cand[c, w] * (_GAMMA + np.uint64(2 * w))
            x ^= x >> np.uint64(29)
        prints[c] = x
        rep[c] = c
        slot = _index(np.int64((x * _GAMMA) >> shift))
        while table[slot] >= 0:
            j = _index(table[slot])
            if prints[j] == x:
                same = True
                for w in range(W):
                    same &= cand[j, w] == cand[c, w]
                if same:
                    rep[c] = j
                    break
            slot = (slot + 1) & mask
        if rep[c] == c:
            table[slot] = c
            todo[_index(count)] = c
            count += 1
    return count


@njit(**JIT)
def _keep_best(cand, lpj, rep, count, C0, n, ranking, members, slots, new_K, new_lpj):
    """new_K[n] (and new_lpj[n] if new_lpj has columns) = the S best distinct of the count candidates (the first C0
    of them the parents), best first, ties by index (the order of a stable sort by −log-joint), the first occurrence
    standing for its duplicates, which follow in candidate order if fewer than S are distinct. Returns how many come
    from beyond the first S candidates. Only the children that beat the S-th best distinct parent can enter; the
    distinct parents and these entrants, in candidate order, are ranked (``_top_ranked``) — not at all when
    no child enters and the parents are in order already (as in most frozen-Θ steps)."""
    S = new_K.shape[1]
    n = _index(n)
    codes = ranking[0]
    parents = 0
    for i in range(C0):                               # (vectorised)
        codes[i] = _order_code(lpj[i])
        members[i] = i
        parents += rep[i] == i
    if parents < C0:                                  # duplicates (rare): keep the distinct ones' codes, in order
        parents = 0
        for i in range(C0):                           # (branch-free: a slot is written, kept if distinct)
            codes[_index(parents)] = codes[i]
            members[_index(parents)] = i
            parents += rep[i] == i
    in_order = True
    for i in range(1, parents):
        in_order &= codes[i - 1] >= codes[i]
    if parents < S:                                   # bar: the S-th largest parent code
        bar = np.iinfo(np.int64).min
    elif in_order:
        bar = codes[S - 1]
    elif parents == S:
        bar = codes[0]
        for i in range(1, parents):
            bar = min(bar, codes[i])
    else:
        _top_ranked(ranking, parents, S, slots)
        bar = codes[_index(slots[S - 1])]
    ranked = parents
    for i in range(C0, count):                        # (branch-free as above)
        i = _index(i)
        code = _order_code(lpj[i])
        codes[_index(ranked)] = code
        members[_index(ranked)] = i
        ranked += (rep[i] == i) & (code > bar)
    top = min(S, ranked)
    if in_order and ranked == parents:
        for r in range(top):
            slots[r] = members[r]
    else:
        _top_ranked(ranking, ranked, top, slots)
        for r in range(top):
            slots[r] = members[_index(slots[r])]
    r = top
    if r < S:
        for i in range(count):
            if r < S and rep[i] != i:
                slots[_index(r)] = i
                r += 1
    accepted = 0
    for r in range(S):
        accepted += slots[r] >= S
    if new_lpj.shape[1] > 0:
        for r in range(S):
            new_lpj[n, r] = lpj[_index(slots[r])]
    for r in range(S):
        for w in range(cand.shape[1]):
            new_K[n, r, w] = cand[_index(slots[r]), w]
    return accepted


# ----------------------------------------------------------------------------------------------- extension
EXTEND_MAX = 16     # parents with k < EXTEND_MAX active units pass their factor on to their children, from k = 3
EXTEND_MIN = 3      # (k = 4 with one child per parent: a 3-unit factor then costs more than its child's closed form)


def _factors(P, C):
    """Buffers of the factor extension: per parent slot, in two banks (this generation's parents, the previous
    one's), L (P, m, m) (1/D_jj on its diagonal), z (P, m), the units in factor order (P, m) and k (P,) (0: no
    factor), m = EXTEND_MAX; per candidate the row its extension appended (C, m) (l, then 1/d), z_h (C,), the
    added unit h (C,) and its parent's slot (C,) (−1: none)."""
    m = EXTEND_MAX
    return (np.empty((2, P, m, m)), np.empty((2, P, m)), np.empty((2, P, m), dtype=np.int64),
            np.zeros((2, P), dtype=np.int64), np.empty((C, m)), np.empty(C), np.empty(C, dtype=np.int64),
            np.full(C, -1, dtype=np.int64))


@njit(**INLINE)
def _append_unit(G_scaled, unit, b, h, k, L, z, A, row):
    """Extend M_A = L D Lᵀ (k units A[:k], 1/D_jj on the diagonal of L) and z = L⁻¹ r (r = c_A + b_A, diagonal Ψ)
    by the unit h, the bordering step of the factorisation:
        w = L⁻¹ g (g_j = (G/σ²)_{A_j h}),   l = D⁻¹ w,   d = (M)_hh − wᵀ l,   z_h = r_h − lᵀ z,
    so that log det M_{A∪h} = log det M_A + log d and rᵀ M⁻¹ r gains z_h²/d. Writes the new row (l, then 1/d)
    into row[:k + 1]; returns (d, z_h), d = NaN if not above WELL_CONDITIONED × (M)_hh (as ``_border``)."""
    for a in range(k):
        s = G_scaled[h, A[a]]
        for p in range(a):
            s -= L[a, p] * row[p]
        row[a] = s
    d, z_h = unit[h, 4], unit[h, 1] + b[h]
    for a in range(k):
        l = row[a] * L[a, a]
        d -= row[a] * l
        z_h -= l * z[a]
        row[a] = l
    if not d > WELL_CONDITIONED * unit[h, 4]:
        return np.nan, z_h
    row[k] = 1.0 / d
    return d, z_h


@njit(**INLINE)
def _root_factor(G_scaled, unit, b, words, row, smallest, L, z, A):
    """For the state words[row] with smallest ≤ k < EXTEND_MAX active units (A, increasing): M_A = L D Lᵀ with
    1/D_jj on the diagonal of L and z = L⁻¹ r, one unit after another (``_append_unit``), so that
    log p(y, s) = const − ½ Σ_j log D_jj + ½ Σ_j z_j²/D_jj. Returns k, or 0 (no factor: k out of range, or a
    pivot not above WELL_CONDITIONED × its diagonal). The units are read as in ``_active_units``, here into the
    slot's own row (going through ``_active_units``' column layout and copying cost 2–6 % of a dense search)."""
    k = 0
    for w in range(words.shape[1]):
        k += _popcount(words[row, w])
    if (k < smallest) or (k >= EXTEND_MAX):
        return 0
    i = 0
    for w in range(words.shape[1]):
        x = words[row, w]
        while x != 0:
            A[i] = 64 * w + np.int64(trailing_zeros(x))
            i += 1
            x &= x - _ONE
    for i in range(k):
        d, z[i] = _append_unit(G_scaled, unit, b, A[i], i, L, z, A, L[i])
        if not np.isfinite(d):
            return 0
    return k


@njit(**INLINE)
def _factor_parents(g, cand, start, chosen, P, n_children, rep, inherited, G_scaled, unit, b, factors):
    """The factors of generation g's parents cand[start + chosen[:P]] (their first occurrences) into bank g mod 2:
    a parent that a row extended from a parent of the previous generation (``inherited``: that generation's rows
    are valid) copies that parent's factor and appends the row, others with k ≥ EXTEND_MIN (one child per parent:
    k > EXTEND_MIN) are factorised (``_root_factor``). Returns the number of parents with a factor."""
    slot_L, slot_z, slot_A, slot_k, row_L, row_z, row_h, row_slot = factors
    bank, previous = g % 2, (g + 1) % 2
    smallest = EXTEND_MIN if n_children > 1 else EXTEND_MIN + 1
    factored = 0
    for i in range(P):
        c = rep[start + chosen[i]]
        s = row_slot[c] if inherited and c >= start else -1
        if s >= 0:
            k = slot_k[previous, s]
            for a in range(k):
                for j in range(a + 1):
                    slot_L[bank, i, a, j] = slot_L[previous, s, a, j]
                slot_z[bank, i, a] = slot_z[previous, s, a]
                slot_A[bank, i, a] = slot_A[previous, s, a]
            for j in range(k + 1):
                slot_L[bank, i, k, j] = row_L[c, j]
            slot_z[bank, i, k], slot_A[bank, i, k] = row_z[c], row_h[c]
            slot_k[bank, i] = k + 1
        else:
            slot_k[bank, i] = _root_factor(G_scaled, unit, b, cand, c, smallest, slot_L[bank, i], slot_z[bank, i],
                                           slot_A[bank, i])
        factored += slot_k[bank, i] > 0
    return factored


@njit(**INLINE)
def _score_extended(g, cand, start, end, parents_start, chosen, n_children, flip_bit, n, todo, count, lpj, G_scaled,
                    unit, b, factors):
    """Log-joints of generation g's new children cand[todo[:count]] that add one unit h to a parent with a factor
    (``random`` mutation, no crossover: child j is parent j // n_children with bit flip_bit[g, n, j] flipped),
    by appending a row to the parent's factor (``_append_unit``), O(k²) per child instead of O(k³):
        log p(y, s ∪ {h}) = log p(y, s) + (log-odds_h − ½ log ψ_h − ½ μ_h²/ψ_h) − ½ log d + ½ z_h²/d.
    The row (l, 1/d), z_h, h and the parent's slot are kept for the next generation. The other children (a unit
    removed, a parent without a factor, or d not above WELL_CONDITIONED × (M)_hh) stay in todo, moved to its
    front, for ``_score``; returns their number."""
    slot_L, slot_z, slot_A, slot_k, row_L, row_z, row_h, row_slot = factors
    bank = g % 2
    for c in range(start, end):
        row_slot[c] = -1
    rest = 0
    for t in range(count):
        c = todo[t]
        j = c - start
        i = j // n_children
        k = slot_k[bank, i]
        h = flip_bit[g, n, j]
        if (k == 0) or (k + 1 >= EXTEND_MAX) or (_bit(cand, c, h) == 0):
            todo[rest] = c
            rest += 1
            continue
        d, z_h = _append_unit(G_scaled, unit, b, h, k, slot_L[bank, i], slot_z[bank, i], slot_A[bank, i], row_L[c])
        if not np.isfinite(d):
            todo[rest] = c
            rest += 1
            continue
        row_z[c], row_h[c], row_slot[c] = z_h, h, i
        lpj[c] = lpj[parents_start + chosen[i]] + unit[h, 5] + 0.5 * (z_h * (z_h / d) - np.log(d))
    return rest


@njit(**JIT)
def evolve_range(first, last, K, lpj_K, known, n_parents, n_children, generations, rule, mutation, crossover,
                 rho, H, sel_u, cross_step, cross_u, flip_bit, flip_u, theta, B, tails, new_K, new_lpj, accepted,
                 scratch, buffers, search, factors, no_eliminations):
    """One evolutionary E-step for the patches first … last−1 of a block (DESIGN.md §1.1): starting from the
    candidates K (N, C₀, W) with log-joints lpj_K (scored here when not ``known``; duplicates share the first
    one's), ``generations`` times select parents from the population (the previous generation's children, K at
    first), cross them over (optional), mutate them into n_children children each (one uniform bit flip, or
    the sparse mutation), score the children that are new (each distinct state of a patch once). Writes the S
    best distinct candidates into new_K (N, S, W), their log-joints into new_lpj and, per patch, how many of
    them come from beyond the first S candidates into accepted."""
    C0, W = K.shape[1], K.shape[2]
    cand, _, lpj, units, ks, moments = buffers
    rep, todo, prints, chosen, ranking, slots, parents, crossed, table = search
    extend = (theta[0].shape[0] == 1) and (mutation == 0) and not (crossover and n_parents >= 2)
    flat = cand.reshape(-1)
    for n in range(first, last):
        n = _index(n)
        if n + 1 < B.shape[0]:
            _prefetch_row(B, n + 1)
        states = K[n].reshape(-1)
        for j in range(C0 * W):                       # (as one flat loop: 3× faster than rows of W words)
            flat[j] = states[j]
        count = _deduplicate(cand, ZERO, C0, prints, rep, todo, table)
        if known:
            for i in range(C0):
                lpj[i] = lpj_K[n, i]
        else:
            _score(theta, B, n, tails[n], cand, todo, count, lpj, units, ks, moments, scratch, NO, no_eliminations)
        start, end = ZERO, C0
        factored = False
        for g in range(generations + 1):
            for c in range(start, end):
                c = _index(c)
                if rep[c] != c:
                    lpj[c] = lpj[_index(rep[c])]
            if g == generations:
                break
            P = _select(lpj, start, end - start, n_parents, rule, sel_u, g, n, ranking, chosen)
            _make_children(cand, start, chosen, P, n_children, end, H, crossover, mutation, rho, g, n, cross_step,
                           cross_u, flip_bit, flip_u, parents, crossed)
            factored = extend and _factor_parents(g, cand, start, chosen, P, n_children, rep, factored, theta[1],
                                                  theta[5], B[n], factors) > 0
            parents_start, start, end = start, end, _index(end + P * n_children)
            count = _deduplicate(cand, start, end, prints, rep, todo, table)
            if factored:
                count = _score_extended(g, cand, start, end, parents_start, chosen, n_children, flip_bit, n, todo,
                                        count, lpj, theta[1], theta[5], B[n], factors)
            _score(theta, B, n, tails[n], cand, todo, count, lpj, units, ks, moments, scratch, NO, no_eliminations)
        accepted[n] = _keep_best(cand, lpj, rep, end, C0, n, ranking, chosen, slots, new_K, new_lpj)


# ----------------------------------------------------------------------------------------------- random numbers
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@njit(**JIT)
def counter_numbers(first, last, streams, call, low, span, out):
    """One call of ``hpc_zsem.randomness.PatchRandom`` for the patches first … last−1, bit for bit: with
    x = SplitMix64-mix(streams[n] + call + (e + 1)·γ) for the e-th number of patch n, out[n, e] =
    (x >> 11)·2⁻⁵³ (uniform in [0, 1), ``span`` = 0) or low + ((x >> 32)·span >> 32) (integers in
    [low, low + span))."""
    for n in range(first, last):
        base = streams[n] + call
        for e in range(out.shape[1]):
            x = base + np.uint64(e + 1) * _GAMMA
            x ^= x >> np.uint64(30)
            x *= _MIX1
            x ^= x >> np.uint64(27)
            x *= _MIX2
            x ^= x >> np.uint64(31)
            if span == 0:
                out[n, e] = np.float64(x >> np.uint64(11)) * 2.0**-53
            else:
                out[n, e] = low + np.int64(((x >> np.uint64(32)) * span) >> np.uint64(32))


# ----------------------------------------------------------------------------------------------- threads
_threads = 1
_pool: ThreadPoolExecutor | None = None
_on_this_thread = threading.local()   # .only = True inside a ``map_in_order`` task: kernels run unsplit
ITEMS_PER_THREAD = 4     # map_in_order runs whole items concurrently when each thread gets at least this many


def set_threads(n: int) -> int:
    """Run the E-step kernels on ``n`` threads of this process (n ≥ 1); returns n. The kernels release the GIL;
    a block's patches are split among the threads, and results do not depend on n."""
    global _threads, _pool
    n = max(1, int(n))
    if n != _threads and _pool is not None:
        _pool.shutdown()
        _pool = None
    _threads = n
    return n


def _threads_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads, thread_name_prefix="hpc_zsem-kernel")
    return _pool


def run_split(kernel, n_items: int, *args) -> None:
    """kernel(first, last, *args) over [0, n_items), split into one contiguous range per thread (unsplit on one
    thread, or inside a ``map_in_order`` task, whose thread is the only one for it)."""
    if _threads == 1 or n_items < 2 or getattr(_on_this_thread, "only", False):
        kernel(0, n_items, *args)
        return
    bounds = [i * n_items // _threads for i in range(_threads + 1)]
    list(_threads_pool().map(lambda i: kernel(bounds[i], bounds[i + 1], *args), range(_threads)))


def map_in_order(work: Callable, items: Sequence) -> Iterator:
    """work(item) for every item, the results in the order of ``items``. With n > 1 threads and at least
    ``ITEMS_PER_THREAD``·n items, whole items run concurrently, their kernels unsplit (``_concurrently``);
    otherwise one after another, each kernel split among the threads. work(item) gives the same numbers either
    way, so adding the results in order gives the same sums on any thread count."""
    if _threads == 1 or len(items) < ITEMS_PER_THREAD * _threads:
        return (work(item) for item in items)
    return _concurrently(work, items)


def _concurrently(work: Callable, items: Sequence) -> Iterator:
    """``map_in_order`` on n threads: the calling thread and n − 1 pool threads each run the next item that no
    one has taken yet, until none is left; the caller yields the results in order, running items itself while the
    next result is not ready. No hand-off between threads inside an item (the blocks of an epoch; with a hand-off
    per kernel call 2 threads ran an epoch of 1,024-patch blocks 1.2–1.6× faster than one, whole blocks
    1.85–2.0×), and the caller works instead of waking for every result (as a pool of n threads with an idle
    caller: 140–200 involuntary context switches per epoch, 2 threads 1.76–1.79× faster than one at H = 64; now
    3–4 and 1.89–1.99×). An item that raises stops the taking; its error is raised where its result would be
    yielded."""
    taken = itertools.count()            # next() is atomic: each index is taken by one thread
    done: dict[int, tuple[bool, object]] = {}
    finished = threading.Condition()
    failed = False

    def run_next() -> bool:
        """Run the next item not yet taken (its kernels unsplit); False if none is left, or after a failure (an
        item taken is always run: the caller waits for every item before a failed one)."""
        nonlocal failed
        if failed:
            return False
        i = next(taken)
        if i >= len(items):
            return False
        _on_this_thread.only = True
        try:
            result: tuple[bool, object] = (True, work(items[i]))
        except BaseException as error:    # raised in the caller, in order
            result = (False, error)
        finally:
            _on_this_thread.only = False
        with finished:
            done[i] = result
            failed |= not result[0]
            finished.notify()
        return result[0]

    def helper():
        while run_next():
            pass

    helpers = [_threads_pool().submit(helper) for _ in range(_threads - 1)]
    try:
        for i in range(len(items)):
            while i not in done and run_next():
                pass
            with finished:
                while i not in done:
                    finished.wait()
                ok, result = done.pop(i)
            if not ok:
                raise result        # type: ignore[misc]
            yield result
    finally:
        failed = True               # (also when the caller stops iterating early): the helpers stop taking
        futures_wait(helpers)


def run_parts(work, n_items: int, parts: int = STATS_PARTS) -> None:
    """work(a, b) for each of ``parts`` fixed contiguous ranges [a, b) of [0, n_items) (fewer when n_items <
    2·parts, so that every range has ≥ 2 items: a BLAS product of one row takes another code path), the ranges
    shared among the threads. The ranges never depend on the thread count, so neither do the results."""
    count = max(1, min(parts, n_items // 2))
    bounds = [p * n_items // count for p in range(count + 1)]

    def some(first, last):
        for p in range(first, last):
            work(bounds[p], bounds[p + 1])

    run_split(some, count)


def posterior(theta, B, tails, K, want: int):
    """Log-joints (N, S) of the truncated sets K (N, S, W), log Σ_s p(s, y_n) (N,), and with want ≥ 1
    ⟨s⊙z⟩ (N, H), with want = 2 also [S_s, S_sz] (2, H) and [S_szsz, (S_ss, T)] (1 or 3, H, H), summed over a
    fixed number of parts of the block in order (the same whatever the thread count)."""
    N, S, W = K.shape
    H = B.shape[1]
    parts = max(1, min(STATS_PARTS if want == 2 else 1, N))
    full = theta[0].shape[0] > 1
    lpj, log_norm = np.empty((N, S)), np.empty(N)
    mean_sz = np.empty((N, H) if want >= 1 else (0, H))
    sums = np.empty((parts, 2, H) if want == 2 else (parts, 2, 0))
    pair_sums = np.empty((parts, 3 if full else 1, H, H) if want == 2 else (parts, 1, 0, 0))
    K = np.ascontiguousarray(K, dtype=np.uint64)

    def work(first, last, *rows):      # rows: a slice of patches (no sums), else parts first … last−1
        if rows:
            a, b = rows
            args = (B[a:b], tails[a:b], K[a:b], want, 0, 1, lpj[a:b], log_norm[a:b],
                    mean_sz[a:b] if want else mean_sz)
        else:
            args = (B, tails, K, want, first, last, lpj, log_norm, mean_sz)
        weights = np.empty(-(-S // LANES) * LANES)
        posterior_parts(theta, *args, sums, pair_sums, _scratch(H), _candidates(S, W, H),
                        _eliminations(S if want == 2 else 0), weights)

    if want == 2:
        run_split(work, parts)
    else:   # no sums: any split of the patches gives the same numbers
        run_split(lambda first, last: work(0, 1, first, last), N)
    pair_sums = pair_sums.sum(axis=0)
    for symmetric in pair_sums[:2]:         # S_szsz (and S_ss): the kernels add the upper triangle only
        _mirror_upper(symmetric)
    return lpj, log_norm, mean_sz, sums.sum(axis=0), pair_sums


@njit(**JIT)
def _mirror_upper(M):
    """M[j, i] = M[i, j] for i < j, in place (the kernels sum symmetric matrices as upper triangles; one pass,
    no temporaries: 2.6× faster than numpy's triu-and-add, which was ≈ 2 % of an epoch at H = 256)."""
    for i in range(M.shape[0]):
        for j in range(i + 1, M.shape[1]):
            M[j, i] = M[i, j]


def search(K, lpj, n_parents: int, n_children: int, generations: int, rule: int, mutation: int, crossover: bool,
           rho: float, H: int, draws, theta, B, tails, S: int, want_lpj: bool = True):
    """``evolve_range`` over all patches of a block (split among the threads): (the S best distinct states
    (N, S, W), their log-joints (N, S), or (N, 0) without ``want_lpj``, the number of accepted states per patch)."""
    N, C0, W = K.shape
    C, population = C0, C0
    for _ in range(generations):
        population = min(n_parents, population) * n_children
        C += population
    known = lpj is not None
    K = np.ascontiguousarray(K, dtype=np.uint64)
    lpj = np.ascontiguousarray(lpj if known else np.empty((N, 0)), dtype=np.float64)
    new_K, new_lpj = np.empty((N, S, W), dtype=np.uint64), np.empty((N, S if want_lpj else 0))
    accepted = np.empty(N, dtype=np.int64)
    P = max(n_parents, 1)

    def work(first, last):
        index = lambda size: np.empty(size, dtype=np.int64)         # noqa: E731
        buffers = (index(C), index(C), np.empty(C, dtype=np.uint64), index(C), ranking_buffers(C), index(C),
                   np.empty((P, W), dtype=np.uint64), np.empty((P, W), dtype=np.uint64),
                   np.empty(1 << max(6, (2 * C - 1).bit_length()), dtype=np.int64))    # _deduplicate's table
        evolve_range(first, last, K, lpj, known, n_parents, n_children, generations, rule, mutation, crossover, rho,
                     H, *draws, theta, B, tails, new_K, new_lpj, accepted, _scratch(H), _candidates(C, W, H), buffers,
                     _factors(P, C), _eliminations(0))

    run_split(work, N)
    return new_K, new_lpj, accepted


# ----------------------------------------------------------------------------------------------- compilation
_compiled = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # glibc's mallopt parameters
_KEEP_FREED = 1 << 30
HELPER_TIMEOUT = 300    # s: ensure_compiled compiles the search itself after this


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory below 1 GiB per allocation for reuse (mallopt: no mmap, no trimming below
    1 GiB) instead of returning it to the OS and faulting it in again: the E-step allocates its per-block arrays
    afresh (several MiB at H = 256), and the page faults were 40 % of the posterior time at H = 256 here. Peak
    memory is unchanged; the resident size no longer shrinks after a peak. A no-op without glibc; returns whether
    it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED))
    except (OSError, AttributeError):
        return False


def _tiny_inputs(tabulated=True):
    """Θ terms (with or without their tables), B, tails and truncated sets of a 3-unit model: inputs on which the
    kernels compile."""
    H = 3
    terms = (np.eye(H), 1.0, np.ones(H), np.zeros(H), np.zeros(H), -1.0)
    theta = theta_terms(*terms) if tabulated else _theta_arrays(*terms)
    return theta, np.zeros((1, H)), np.zeros(1), np.array([[[1], [7]]], dtype=np.uint64)


def _warm_search(theta, B, tails, K) -> None:
    """One search on tiny inputs (compiles or loads the search kernel and what it calls)."""
    H = B.shape[1]
    draws = (np.full((1, 1, 2), 0.5), np.ones((1, 1, 1), dtype=np.int64), np.full((1, 1, 1, H), 0.5),
             np.zeros((1, 1, 1), dtype=np.int64), np.full((1, 1, 1, H), 0.5))
    search(K, np.zeros((1, 2)), 1, 1, 1, 0, 1, True, 1.0, H, draws, theta, B, tails, 2)


def compile_search() -> None:
    """The helper process of ``ensure_compiled``: compile the search kernel into numba's cache, nothing else (the
    search compiles on Θ terms whose tables are unfilled: the tables' kernel is the other process's)."""
    global _compiled
    _compiled = True
    _warm_search(*_tiny_inputs(tabulated=False))


def _search_compiler() -> subprocess.Popen | None:
    """Start a process that compiles the search kernel into numba's cache while this one compiles the others
    (numba compiles one function at a time per process); None if it cannot start."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))))
    try:
        return subprocess.Popen([sys.executable, "-c", "import hpc_zsem.variational.kernel as k; k.compile_search()"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def ensure_compiled() -> None:
    """Compile (or load from numba's cache) every kernel once per process, on tiny inputs of the dtypes the
    E-step uses (logs the time when anything had to be compiled), and ``keep_freed_memory``. On a first run
    with ≥ 2 kernel threads a helper process compiles the search kernel meanwhile (``_search_compiler``; this
    process then loads it from the cache, or compiles it itself if the helper failed)."""
    global _compiled
    if _compiled:
        return
    _compiled = True
    keep_freed_memory()
    t0 = time.perf_counter()
    for out, span in ((np.empty((1, 1)), 0), (np.empty((1, 1), dtype=np.int64), 2)):
        counter_numbers(0, 1, np.zeros(1, dtype=np.uint64), np.uint64(0), np.int64(0), np.uint64(span), out)
    first_run = sum(counter_numbers.stats.cache_misses.values()) > 0
    helper = _search_compiler() if first_run and _threads > 1 else None
    theta, B, tails, K = _tiny_inputs()
    posterior(theta, B, tails, K, 2)
    if helper is not None:
        try:
            helper.wait(timeout=HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    _warm_search(theta, B, tails, K)
    kernels = (_tabulate, posterior_parts, _mirror_upper, evolve_range, counter_numbers)
    if any(sum(kernel.stats.cache_misses.values()) for kernel in kernels):
        log.info("compiling kernels (once per machine; cached afterwards%s) … %.1f s",
                 "; the search in a second process" if helper is not None else "", time.perf_counter() - t0)
