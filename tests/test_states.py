"""Bit-packed states: packing round trip and the kernel's per-patch de-duplication (an open-addressing hash
table), for one and several words per state."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpc_zsem.variational.kernel import _deduplicate
from hpc_zsem.variational.states import lowest_weight_states, pack, unpack


@pytest.mark.parametrize("H", [1, 7, 64, 65, 130])
def test_pack_round_trip_and_size(H):
    bits = np.random.default_rng(H).random((5, 3, H)) < 0.3
    words = pack(bits)
    assert words.dtype == np.uint64 and words.shape == (5, 3, (H + 63) // 64)
    np.testing.assert_array_equal(unpack(words, H), bits)


def brute_first_occurrence(words):
    return [next(j for j in range(len(words)) if np.array_equal(words[j], words[c])) for c in range(len(words))]


@settings(max_examples=60, deadline=None)
@given(H=st.sampled_from([3, 64, 70, 130]), C=st.integers(1, 40), split=st.integers(0, 40), seed=st.integers(0, 10**6),
       distinct=st.integers(1, 40))
def test_deduplication_finds_the_first_equal_state(H, C, split, seed, distinct):
    """rep[c] = the first candidate equal to candidate c (c itself for a new state, listed in todo), for one- and
    multi-word states (fingerprint: the word itself, or a hash of the words), also when the candidates come in two
    calls (parents, then children checked against every earlier candidate), in the smallest table the kernel may
    get (a power of two ≥ 2C: probe sequences collide and wrap around)."""
    rng = np.random.default_rng(seed)
    pool = rng.random((distinct, H)) < 0.5          # few distinct states → many duplicates
    words = pack(pool[rng.integers(0, distinct, size=C)])
    prints = np.empty(C, dtype=np.uint64)
    rep, todo = np.empty(C, dtype=np.int64), np.empty(C, dtype=np.int64)
    table = np.empty(1 << (2 * C - 1).bit_length(), dtype=np.int64)
    split = min(split, C)
    count = _deduplicate(words, 0, split, prints, rep, todo, table)
    count2 = _deduplicate(words, split, C, prints, rep, todo[count:], table)
    expected = brute_first_occurrence(words)
    np.testing.assert_array_equal(rep, expected)
    np.testing.assert_array_equal(np.concatenate([todo[:count], todo[count:count + count2]]),
                                  [c for c in range(C) if expected[c] == c])


def test_lowest_weight_states():
    s = lowest_weight_states(4, 11)
    assert s[0].sum() == 0 and all(s[1:5].sum(axis=1) == 1) and all(s[5:11].sum(axis=1) == 2)
    assert len({r.tobytes() for r in s}) == 11
    with pytest.raises(ValueError):
        lowest_weight_states(3, 9)
