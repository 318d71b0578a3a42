"""Bit-packed binary latent states and the set operations the truncated posteriors need.

A state s ∈ {0,1}^H is stored as ⌈H/64⌉ little-endian uint64 words (bit h of the state is bit h mod 64 of
word h // 64), so a patch's truncated set of S states costs S·⌈H/64⌉·8 bytes.
"""
from __future__ import annotations

import itertools

import numpy as np


def n_words(H: int) -> int:
    """Number of uint64 words that hold H bits."""
    return (H + 63) // 64


def pack(bits: np.ndarray) -> np.ndarray:
    """(..., H) bool → (..., ⌈H/64⌉) uint64."""
    bits = np.asarray(bits, dtype=bool)
    H = bits.shape[-1]
    nbytes = n_words(H) * 8
    packed = np.packbits(bits, axis=-1, bitorder="little")
    if packed.shape[-1] < nbytes:
        pad = [(0, 0)] * (packed.ndim - 1) + [(0, nbytes - packed.shape[-1])]
        packed = np.pad(packed, pad)
    return np.ascontiguousarray(packed).view(np.uint64)


def unpack(words: np.ndarray, H: int) -> np.ndarray:
    """(..., ⌈H/64⌉) uint64 → (..., H) bool."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    as_bytes = words.view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, count=H, bitorder="little").astype(bool)


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


def lowest_weight_states(H: int, count: int) -> np.ndarray:
    """The first ``count`` states of {0,1}^H in order of increasing number of ones (0, singletons, pairs, …),
    as (count, H) bool. Used to guarantee S distinct initial states per patch."""
    out = np.zeros((count, H), dtype=bool)
    row = 0
    for k in range(H + 1):
        for active in itertools.combinations(range(H), k):
            if row == count:
                return out
            out[row, list(active)] = True
            row += 1
    if row < count:
        raise ValueError(f"only {row} distinct states exist for H={H}, {count} requested")
    return out
