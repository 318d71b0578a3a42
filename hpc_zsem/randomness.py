"""Counter-based random numbers keyed by global patch index.

Every random number the E-step draws for patch n is a pure function of (seed, stage, epoch, call, n,
element): SplitMix64 (Steele, Lea & Flood 2014) run over a per-patch stream. So a patch gets the same random
numbers whichever block, tile or rank processes it, and however many other patches are processed with it:
results do not depend on the rank count, the block size or the tiling of a mosaic, and a resume needs no RNG
state. Cost: a few vectorised uint64 operations per number (≈10 ns).

``PatchRandom`` offers the two ``numpy.random.Generator`` methods the evolutionary E-step uses, ``random`` and
``integers``, for arrays whose first axis runs over the patches.
"""
from __future__ import annotations

import numpy as np

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_BITS64 = (1 << 64) - 1
_TO_UNIT = 2.0**-53


def _mix(x):
    """The SplitMix64 output function (a bijection of uint64 with good avalanche) of a Python int or a uint64
    array (products modulo 2⁶⁴)."""
    x = x ^ (x >> 30)
    x = (x * _M1) & _BITS64
    x = x ^ (x >> 27)
    x = (x * _M2) & _BITS64
    return x ^ (x >> 31)


def _hash(*words: int) -> np.uint64:
    """One uint64 from a few non-negative integers (in Python ints: 1-element arrays cost ≈ 2 % of an epoch)."""
    h = 0
    for w in words:
        h = _mix((h + (w & _BITS64) + _GAMMA) & _BITS64)
    return np.uint64(h)


class PatchRandom:
    """Random numbers for the patches with global indices ``patches`` at one (seed, stage, epoch)."""

    def __init__(self, seed: int, stage: int, epoch: int, patches: np.ndarray):
        self._key = (int(seed), int(stage), int(epoch))
        self._patch_streams = _mix(np.asarray(patches, dtype=np.uint64) * _GAMMA + _hash(*self._key))
        self._calls = 0

    def next_call(self, n_patches: int) -> tuple[np.ndarray, np.uint64]:
        """Start the next call: (the per-patch streams s_n, the call key c). Element j ≥ 1 of patch n in this
        call is mix(s_n + c + j·γ) — what :meth:`random`/:meth:`integers` compute here and the compiled
        kernel (``hpc_zsem.variational.kernel.counter_numbers``) computes in one pass, bit for bit."""
        if n_patches != self._patch_streams.size:
            raise ValueError(f"first axis {n_patches} must run over the {self._patch_streams.size} patches")
        self._calls += 1
        return self._patch_streams, _hash(*self._key, self._calls)

    def _bits(self, size: tuple[int, ...]) -> np.ndarray:
        streams, call = self.next_call(size[0])
        per_patch = int(np.prod(size[1:], dtype=np.int64))
        elements = (np.arange(1, per_patch + 1, dtype=np.uint64) * _GAMMA) + call
        x = streams[:, None] + elements[None, :]
        return _mix(x).reshape(size)

    def random(self, size) -> np.ndarray:
        """Uniform floats in [0, 1) of the given shape (first axis = patches)."""
        size = (size,) if np.isscalar(size) else tuple(size)
        return (self._bits(size) >> np.uint64(11)).astype(np.float64) * _TO_UNIT

    def integers(self, low: int, high: int, size) -> np.ndarray:
        """Integers uniform in [low, high) (high − low < 2³²), via the multiply-shift map of 32 random bits."""
        size = (size,) if np.isscalar(size) else tuple(size)
        span = np.uint64(high - low)
        return ((self._bits(size) >> np.uint64(32)) * span >> np.uint64(32)).astype(np.int64) + low
