"""Bit-packed states: packing round trip and per-row de-duplication, for one and several words per state."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpc_zsem.variational.states import first_occurrence, lowest_weight_states, pack, unique_states, unpack


@pytest.mark.parametrize("H", [1, 7, 64, 65, 130])
def test_pack_round_trip_and_size(H):
    bits = np.random.default_rng(H).random((5, 3, H)) < 0.3
    words = pack(bits)
    assert words.dtype == np.uint64 and words.shape == (5, 3, (H + 63) // 64)
    np.testing.assert_array_equal(unpack(words, H), bits)


def brute_first_occurrence(words):
    N, C, _ = words.shape
    rep = np.empty((N, C), dtype=int)
    for n in range(N):
        for c in range(C):
            rep[n, c] = next(j for j in range(C) if np.array_equal(words[n, j], words[n, c]))
    return rep


@settings(max_examples=40, deadline=None)
@given(H=st.sampled_from([3, 64, 70]), N=st.integers(1, 4), C=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_first_occurrence_matches_brute_force(H, N, C, seed):
    rng = np.random.default_rng(seed)
    pool = rng.random((4, H)) < 0.5          # few distinct states → many duplicates
    words = pack(pool[rng.integers(0, 4, size=(N, C))])
    np.testing.assert_array_equal(first_occurrence(words), brute_first_occurrence(words))


def test_unique_states_inverse():
    rng = np.random.default_rng(0)
    for H in (10, 100):
        words = pack(rng.random((50, H)) < 0.05)
        uniq, inv = unique_states(words)
        np.testing.assert_array_equal(uniq[inv], words)
        assert len({w.tobytes() for w in words}) == len(uniq)


def test_lowest_weight_states():
    s = lowest_weight_states(4, 11)
    assert s[0].sum() == 0 and all(s[1:5].sum(axis=1) == 1) and all(s[5:11].sum(axis=1) == 2)
    assert len({r.tobytes() for r in s}) == 11
    with pytest.raises(ValueError):
        lowest_weight_states(3, 9)
