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
