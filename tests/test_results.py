"""Tests of hpc_zsem.io.results: round trip, atomic replacement and the dataset layout."""
import h5py
import numpy as np
import pytest

from hpc_zsem.errors import InputError, OutputError
from hpc_zsem.io import volumes
from hpc_zsem.io.results import check_output_path, read_result
from hpc_zsem.io.volumes import write_result


def payload(shape=(300, 70), value=0.0):
    rng = np.random.default_rng(0)
    return dict(mean=rng.random(shape) + value, variance=rng.random(shape), noisy=rng.random(shape),
                params={"W": rng.random((4, 3)), "sigma2": np.array(0.5)},
                history={"epoch": [0, 1, 2], "free_energy": [-3.0, -2.0, -1.5]},
                metadata={"version": "0.1.0", "model": "sssc", "ranks": 2, "seed": 7, "created": "now",
                          "labels": ["a", "b"], "config_hash": "abc"})


def test_round_trip(tmp_path):
    path = tmp_path / "r.h5"
    data = payload()
    write_result(path, **data)
    out = read_result(path)
    assert out["mean"].dtype == np.float32
    np.testing.assert_allclose(out["mean"], data["mean"], rtol=1e-6)
    np.testing.assert_allclose(out["input"], data["noisy"], rtol=1e-6)
    np.testing.assert_array_equal(out["params"]["W"], data["params"]["W"])
    np.testing.assert_array_equal(out["history"]["free_energy"], data["history"]["free_energy"])
    meta = out["metadata"]
    assert meta["format"] == "hpc_zsem-result" and meta["format_version"] == 1
    assert meta["ranks"] == 2 and meta["model"] == "sssc" and meta["labels"] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_chunked_and_compressed(tmp_path):
    path = tmp_path / "r.h5"
    write_result(path, **payload())
    with h5py.File(path) as f:
        for name in ("mean", "variance", "input"):
            ds = f[name]
            assert ds.chunks == (256, 70) and ds.compression == "gzip" and ds.compression_opts == 4
            assert ds.shuffle and ds.attrs["axes"] == "YX"


def test_refuse_existing_without_overwrite(tmp_path):
    path = tmp_path / "r.h5"
    write_result(path, **payload())
    with pytest.raises(OutputError, match="exists; pass --overwrite to replace it"):
        write_result(path, **payload(value=1.0))
    write_result(path, overwrite=True, **payload(value=1.0))
    assert read_result(path)["mean"].min() >= 1.0


def test_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "r.h5", overwrite=False)


def test_existing_result_untouched_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    write_result(path, **payload())
    before = path.read_bytes()

    def failing(f, metadata):
        raise RuntimeError("disk full")

    monkeypatch.setattr(volumes, "write_metadata", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_result(path, overwrite=True, **payload(value=1.0))
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_unequal_history_rejected(tmp_path):
    data = payload()
    data["history"] = {"epoch": [0, 1], "free_energy": [1.0]}
    with pytest.raises(ValueError, match="different lengths"):
        write_result(tmp_path / "r.h5", **data)


def test_read_refuses_non_results(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_result(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_result(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(InputError, match="not an hpc_zsem result file"):
        read_result(other)


def test_summary_reads_no_image_data(tmp_path, monkeypatch):
    from conftest import write_old_result
    from hpc_zsem.io.results import read_result_summary

    write_old_result(tmp_path / "r.h5")
    read_rows = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda ds, key: read_rows.append(ds.name) or real(ds, key))
    summary = read_result_summary(tmp_path / "r.h5")
    assert summary["shape"] == (8, 8) and "mean" not in summary
    assert not {"/mean", "/variance", "/input"} & set(read_rows)
