"""VolumeWriter: tile-by-tile, any order, chunked+compressed, atomic."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from conftest import write_old_result
from hpc_zsem.errors import OutputError
from hpc_zsem.io.results import read_result
from hpc_zsem.io.volumes import VolumeWriter
from hpc_zsem.tiles import plan_tiles


def _fill(shape, tile, writer, rng, extra=False):
    mean = rng.normal(size=shape).astype(np.float32)
    var = rng.random(size=shape).astype(np.float32)
    tiles = plan_tiles(shape, tile, (4, 4), 1)
    for i in rng.permutation(len(tiles)):   # any order
        t = tiles[i]
        kw = {"input": mean[t.out_index] + 1} if extra else {}
        writer.write(t, mean[t.out_index], var[t.out_index], **kw)
    return mean, var


@pytest.mark.parametrize("shape", [(300, 530), (3, 270, 300)])
def test_round_trip_chunked_compressed(tmp_path, shape):
    path = tmp_path / "out.h5"
    rng = np.random.default_rng(0)
    with VolumeWriter(path, shape, attrs={"model": "sssc"}, element_size_um=(0.005, 0.005)) as w:
        mean, var = _fill(shape, (256, 256), w, rng)
        assert not path.exists()   # nothing final before close
        w.set_params({"W": np.ones((3, 2))})
        w.set_history({"epoch": [1, 2], "free_energy": [0.5, 0.4]})
    assert not list(tmp_path.glob("*.tmp-*"))
    with h5py.File(path, "r") as f:
        for name, ref in (("mean", mean), ("variance", var)):
            ds = f[name]
            assert ds.shape == shape and ds.dtype == np.float32
            assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.shuffle
            assert ds.chunks == ((256, 256) if len(shape) == 2 else (1, 256, 256))
            assert ds.attrs["axes"] == ("YX" if len(shape) == 2 else "ZYX")
            size = ds.attrs["element_size_um"]
            assert len(size) == len(shape) and np.allclose(size[-2:], 0.005)
            np.testing.assert_array_equal(ds[()], ref)
        assert f.attrs["model"] == b"sssc" and f.attrs["format"] == b"hpc_zsem-result"   # fixed-length bytes
        np.testing.assert_array_equal(f["params/W"][()], np.ones((3, 2)))


def test_result_file_compatible_with_read_result(tmp_path):
    path = tmp_path / "r.h5"
    w = VolumeWriter(path, (64, 40), extra=("input",))
    mean, _ = _fill((64, 40), (32, 16), w, np.random.default_rng(1), extra=True)
    w.close()
    result = read_result(path)
    np.testing.assert_array_equal(result["mean"], mean)
    np.testing.assert_array_equal(result["input"], mean + 1)
    assert result["metadata"]["axes"] == "YX"


def test_incomplete_or_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.h5"
    w = VolumeWriter(path, (100, 100))
    t = plan_tiles((100, 100), (50, 50), (4, 4))[0]
    w.write(t, np.zeros((50, 50)), np.zeros((50, 50)))
    with pytest.raises(ValueError, match="already written"):
        w.write(t, np.zeros((50, 50)), np.zeros((50, 50)))
    with pytest.raises(ValueError, match="only 2500 of 10000 pixels"):
        w.close()
    assert not path.exists() and not list(tmp_path.iterdir())

    # an exception inside the with-block (e.g. a rank failed) discards everything, keeps an old output
    old = write_old_result(path)
    with pytest.raises(RuntimeError, match="boom"):
        with VolumeWriter(path, (100, 100), overwrite=True) as w:
            w.write(t, np.zeros((50, 50)), np.zeros((50, 50)))
            raise RuntimeError("boom")
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]

    # a bad core shape aborts the writer
    w = VolumeWriter(path, (100, 100), overwrite=True)
    with pytest.raises(ValueError, match="core of shape"):
        w.write(t, np.zeros((40, 50)), np.zeros((50, 50)))
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]


def test_output_checks(tmp_path):
    (tmp_path / "exists.h5").write_bytes(b"x")
    with pytest.raises(OutputError, match="exists"):
        VolumeWriter(tmp_path / "exists.h5", (10, 10))
    with pytest.raises(OutputError, match="does not exist"):
        VolumeWriter(tmp_path / "nodir" / "o.h5", (10, 10))
    w = VolumeWriter(tmp_path / "o.h5", (3, 10, 10))
    with pytest.raises(ValueError, match="does not match"):
        w.write(plan_tiles((10, 10), (10, 10), (2, 2))[0], np.zeros((10, 10)), np.zeros((10, 10)))
    w.abort()
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("shape", [(100, 120), (2, 100, 120)])
def test_suspended_pass_resumes_only_with_the_same_key_and_a_clean_suspend(tmp_path, shape):
    path = tmp_path / "out.h5"
    rng = np.random.default_rng(5)
    mean = rng.normal(size=shape).astype(np.float32)
    var = rng.random(size=shape).astype(np.float32)
    tiles = plan_tiles(shape, (50, 50), (4, 4), 1)

    def write(w, chosen):
        for t in chosen:
            w.write(t, mean[t.out_index], var[t.out_index])

    w = VolumeWriter(path, shape, resume_key="run A")
    write(w, tiles[:3])
    w.suspend()
    assert not path.exists() and (tmp_path / "out.h5.partial").exists()
    w = VolumeWriter(path, shape, resume_key="run A")
    assert w.written == {(t.z, t.y0, t.y1, t.x0, t.x1) for t in tiles[:3]}
    write(w, tiles[3:])
    w.close()
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["mean"][()], mean)
        np.testing.assert_array_equal(f["variance"][()], var)
        assert "clean" not in f.attrs and "written_tiles" not in f
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]

    other = tmp_path / "other.h5"
    w = VolumeWriter(other, shape, resume_key="run A")
    write(w, tiles[:2])
    w.suspend()
    w = VolumeWriter(other, shape, resume_key="run B")
    assert w.written == set()                # another run: starts afresh
    write(w, tiles[:2])
    w._file.close()                          # as if the job was SIGKILLed while the file was open (clean = 0)
    w._file = None
    w = VolumeWriter(other, shape, resume_key="run B")
    assert w.written == set()
    w.abort()
    assert not (tmp_path / "other.h5.partial").exists()
