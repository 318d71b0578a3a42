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
