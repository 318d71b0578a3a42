"""Counter-based per-patch random numbers: a patch's numbers do not depend on which patches share its block."""
import numpy as np

from hpc_zsem.randomness import PatchRandom


def draws(ids, seed=0, stage=1, epoch=2):
    r = PatchRandom(seed, stage, epoch, ids)
    return r.random((len(ids), 5, 7)), r.integers(3, 11, (len(ids), 4))


def test_same_numbers_for_a_patch_in_any_block():
    ids = np.arange(500, 900)
    full_u, full_i = draws(ids)
    for part in (slice(0, 1), slice(17, 230), slice(399, 400)):
        u, i = draws(ids[part])
        np.testing.assert_array_equal(u, full_u[part])
        np.testing.assert_array_equal(i, full_i[part])
    shuffled = np.random.default_rng(0).permutation(ids)
    u, _ = draws(shuffled)
    np.testing.assert_array_equal(u, full_u[shuffled - 500])


def test_keys_change_the_stream_and_values_are_uniform():
    ids = np.arange(20000)
    base, ints = draws(ids)
    for key in ({"seed": 1}, {"stage": 2}, {"epoch": 3}):
        other, _ = draws(ids, **key)
        assert np.mean(other == base) < 1e-4
    assert abs(base.mean() - 0.5) < 0.005 and abs(base.var() - 1 / 12) < 0.002
    counts = np.bincount(ints.ravel() - 3, minlength=8)
    assert ints.min() == 3 and ints.max() == 10
    assert np.all(np.abs(counts / counts.sum() - 1 / 8) < 0.01)
    # successive calls give fresh numbers
    r = PatchRandom(0, 0, 0, ids[:10])
    assert not np.array_equal(r.random((10, 3)), r.random((10, 3)))


def test_splitmix64_reference_and_the_documented_streams():
    """_mix on Python ints and on uint64 arrays is SplitMix64's output function (the reference generator's
    sequence for seed 1234567), and a patch's numbers are the documented counter construction: patch n's
    stream s_n = mix(n·γ + hash(seed, stage, epoch)), element j ≥ 1 of call c: mix(s_n + hash(key, c) + j·γ)
    with hash(w₁ … w_m) = h_m, h_i = mix(h_{i−1} + w_i + γ), h₀ = 0 (what checkpoints of earlier versions
    resume with)."""
    from hpc_zsem import randomness

    bits = (1 << 64) - 1
    state, sequence = 1234567, []
    for _ in range(5):
        state = (state + randomness._GAMMA) & bits
        sequence.append(randomness._mix(state))
    assert sequence == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                        16408922859458223821]
    states = np.array([1234567 + randomness._GAMMA, 2**64 - 1, 0], dtype=np.uint64)
    assert randomness._mix(states).dtype == np.uint64
    assert randomness._mix(states).tolist() == [randomness._mix(int(s)) for s in states]

    def hashed(*words):
        h = 0
        for w in words:
            h = randomness._mix((h + w + randomness._GAMMA) & bits)
        return h

    ids = [0, 5, 2**40]
    r = PatchRandom(3, 1, 7, np.array(ids))
    u = r.random((3, 4))
    for row, n in enumerate(ids):
        stream = randomness._mix((n * randomness._GAMMA + hashed(3, 1, 7)) & bits)
        for j in range(4):
            x = randomness._mix((stream + hashed(3, 1, 7, 1) + (j + 1) * randomness._GAMMA) & bits)
            assert u[row, j] == (x >> 11) * 2.0**-53
