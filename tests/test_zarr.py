"""OME-Zarr results (NGFF 0.5, validated with ome-zarr's reader) written by every rank, and zarr inputs.

- the store round trip (2-D and 3-D, any tile order): values, pixel size, multiscale levels, params/history/
  metadata, read back by ``ome_zarr`` as NGFF 0.5 images with axes and µm scales;
- ``hpc-zsem run`` on 2 and 3 ranks into ``out.zarr`` gives bit for bit the HDF5 result of the same config;
- a streamed pass stopped on 2 ranks continues on 3 and equals the uninterrupted result;
- a write failing on one rank is one line on every rank and leaves nothing behind; path safety (foreign
  directories refused even with --overwrite, only our own results replaced, a full disk refused);
- a zarr / OME-Zarr input reads like the TIFF it was made from (pixels, pixel size, checksum, a whole run).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from conftest import REPO, StopAtCheck, cli_env, run_cli
from hpc_zsem.config import load_config
from hpc_zsem.errors import ConfigError, OutputError
from hpc_zsem.io.checkpoint import find_resumable
from hpc_zsem.io.images import file_checksum, input_file
from hpc_zsem.io.paths import check_run_paths
from hpc_zsem.io.regions import open_source, pixel_size_um, zarr_array_path
from hpc_zsem.io.results import read_result
from hpc_zsem.io.stores import RankZeroStore, check_output_path, open_result_store
from hpc_zsem.io.zarr_store import ZarrResultStore, chunks_for_tile, is_zarr_result, level_shapes
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import run
from hpc_zsem.signals import StopRequested
from hpc_zsem.tiles import plan_tiles

ome_zarr = pytest.importorskip("ome_zarr")
from ome_zarr.io import parse_url  # noqa: E402 - after the importorskip above
from ome_zarr.reader import Reader  # noqa: E402

SMALL = ["model.H=8", "truncation.S=6", "truncation.parents=3", "truncation.children=2", "training.epochs=2",
         "estimation.epochs=1", "patches.size=[6,6]", "checkpoint.every_epochs=0", "training.max_patches=1000",
         "estimation.tile=[32,32]"]
needs_mpi = pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec (pip install mpich)")


@pytest.fixture(scope="module")
def image96(tmp_path_factory):
    """A 96×96 noisy float32 TIFF with a pixel size of 5 nm (ImageJ resolution tags)."""
    rng = np.random.default_rng(11)
    y, x = np.mgrid[:96, :96]
    clean = 120 + 60 * np.sin(y / 7.0) * np.cos(x / 9.0)
    path = tmp_path_factory.mktemp("zin") / "in.tif"
    tifffile.imwrite(path, (clean + rng.normal(0, 25, clean.shape)).astype(np.float32), imagej=True,
                     resolution=(200.0, 200.0), metadata={"unit": "um"})
    return path


def _ngff_nodes(path):
    loc = parse_url(str(path))
    assert loc is not None and loc.version == "0.5"
    nodes = list(Reader(loc)())
    assert len(nodes) == 1
    return nodes[0]


def _fill(store, shape, tile, rng):
    mean = rng.normal(size=shape).astype(np.float32)
    var = rng.random(size=shape).astype(np.float32)
    tiles = plan_tiles(shape, tile, (4, 4), 1)
    for i in rng.permutation(len(tiles)):
        t = tiles[i]
        store.write(t, mean[t.out_index], var[t.out_index])
    return mean, var


# ------------------------------------------------------------------------------------------- the store
def test_chunks_divide_the_tiles():
    assert chunks_for_tile((512, 512), (10000, 10000)) == (256, 256)
    assert chunks_for_tile((32, 48), (96, 96)) == (32, 48)
    assert chunks_for_tile((300, 768), (5000, 5000)) == (150, 256)
    assert chunks_for_tile((257, 512), (5000, 5000)) == (257, 256)       # a prime: one chunk per tile
    assert chunks_for_tile((512, 512), (100, 40)) == (100, 40)            # never more than the plane
    assert level_shapes((3, 300, 530), (1, 128, 128)) == [(3, 300, 530), (3, 150, 265), (3, 75, 133), (3, 38, 67)]


@pytest.mark.parametrize("shape", [(200, 330), (3, 130, 100)])
def test_round_trip_is_valid_ngff_with_levels_and_pixel_size(tmp_path, shape):
    path = tmp_path / "out.zarr"
    rng = np.random.default_rng(0)
    store = ZarrResultStore(SerialComm(), path, shape, tile=(64, 64), element_size_um=(0.005, 0.004),
                            attrs={"model": "sssc"})
    mean, var = _fill(store, shape, (64, 64), rng)
    assert not path.exists()                         # nothing final before close
    store.set_params({"W": np.ones((3, 2)), "sigma2": 2.5})
    store.set_history({"epoch": [1, 2], "free_energy": [0.5, float("nan")]})
    store.set_metadata({"config": "a: 1\n", "ranks": 1, "runtime_seconds": float("nan"), "patch_size": [6, 6]})
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    assert is_zarr_result(path)
    three = len(shape) == 3
    for name, ref in (("mean", mean), ("variance", var)):
        node = _ngff_nodes(path / name)
        axes = node.metadata["axes"]
        assert [a["name"] for a in axes] == (["z", "y", "x"] if three else ["y", "x"])
        assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in axes)
        levels = [np.asarray(d) for d in node.data]
        np.testing.assert_array_equal(levels[0], ref)
        assert levels[0].dtype == np.float32
        assert max(levels[-1].shape[-2:]) <= 64 and len(levels) >= 3
        # level 1 is the mean of 2×2 pixels of level 0 (an odd edge: of the pixels there)
        a = ref.astype(np.float64)
        pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
        a = np.pad(a, pad, mode="edge")
        expect = a.reshape(*a.shape[:-2], a.shape[-2] // 2, 2, a.shape[-1] // 2, 2).mean(axis=(-3, -1))
        np.testing.assert_allclose(levels[1], expect.astype(np.float32), rtol=1e-6)
        transforms = node.metadata["coordinateTransformations"]
        assert transforms[0] == [{"type": "scale", "scale": ([1.0] if three else []) + [0.005, 0.004]}]
        assert transforms[2][0]["scale"][-2:] == pytest.approx([0.02, 0.016])
        assert transforms[2][1]["translation"][-2:] == pytest.approx([0.0075, 0.006])
        chunks = zarr.open_array(str(path / name / "0"), mode="r").chunks
        assert chunks == ((1, 64, 64) if three else (64, 64))
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    assert attrs["format"] == "hpc_zsem-result" and attrs["format_version"] == 1
    assert attrs["axes"] == ("ZYX" if three else "YX") and attrs["model"] == "sssc" and attrs["ranks"] == 1
    assert attrs["element_size_um"] == pytest.approx(([1.0] if three else []) + [0.005, 0.004])
    assert attrs["runtime_seconds"] == "NaN" and attrs["config"] == "a: 1\n"
    assert not {"resume_key", "clean", "written_tiles"} & set(attrs)
    json.loads((path / "zarr.json").read_text())      # strict JSON: no NaN literals
    np.testing.assert_array_equal(root["params"]["W"][:], np.ones((3, 2)))
    assert root["params"]["sigma2"][()] == 2.5
    np.testing.assert_array_equal(root["history"]["epoch"][:], [1.0, 2.0])


def test_unaligned_or_incomplete_writes_are_refused_and_leave_nothing(tmp_path):
    path = tmp_path / "out.zarr"
    store = ZarrResultStore(SerialComm(), path, (96, 96), tile=(32, 32))
    tiles = plan_tiles((96, 96), (32, 32), (4, 4), 1)
    with pytest.raises(ValueError, match="not aligned"):
        store.write(plan_tiles((96, 96), (16, 16), (4, 4), 1)[1], np.zeros((16, 16)), np.zeros((16, 16)))
    store.write(tiles[0], np.zeros((32, 32)), np.zeros((32, 32)))
    with pytest.raises(ValueError, match="already written"):
        store.write(tiles[0], np.zeros((32, 32)), np.zeros((32, 32)))
    with pytest.raises(OutputError, match="only 1024 of 9216 pixels"):
        store.close()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_nothing_is_replaced(tmp_path, monkeypatch):
    path = tmp_path / "out.zarr"
    store = ZarrResultStore(SerialComm(), path, (96, 96), tile=(32, 32), resume_key="k")
    tile = plan_tiles((96, 96), (32, 32), (4, 4), 1)[0]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(OutputError, match="not enough disk space") as err:
        store.write(tile, np.zeros((32, 32)), np.zeros((32, 32)))
    assert "\n" not in str(err.value)
    store.abort()
    assert list(tmp_path.iterdir()) == []


def test_foreign_directories_are_refused_and_only_our_results_replaced(tmp_path):
    foreign = tmp_path / "data.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(4, 4), dtype="f4")
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not an hpc_zsem result" if overwrite else "exists"):
            check_output_path(foreign, overwrite)
        with pytest.raises(OutputError):
            ZarrResultStore(SerialComm(), foreign, (8, 8), overwrite=overwrite)
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before
    # a foreign directory named like our partial store is never removed
    partial = tmp_path / "out.zarr.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a partial hpc_zsem result"):
        ZarrResultStore(SerialComm(), tmp_path / "out.zarr", (8, 8), resume_key="k")
    assert (partial / "notes.txt").read_text() == "mine"
    # our result: refused without --overwrite, replaced with it
    ours = tmp_path / "ours.zarr"
    for value, overwrite in ((1.0, False), (2.0, True)):
        store = ZarrResultStore(SerialComm(), ours, (8, 8), overwrite=overwrite)
        t = plan_tiles((8, 8), (8, 8), (4, 4), 1)[0]
        store.write(t, np.full((8, 8), value), np.zeros((8, 8)))
        store.close()
        assert zarr.open_array(str(ours / "mean" / "0"), mode="r")[0, 0] == value
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        check_output_path(ours, False)
    # a file of the user inside our result: not ours any more as a whole, so never deleted
    (ours / "mean" / "README").write_text("keep")
    with pytest.raises(OutputError, match="did not write"):
        ZarrResultStore(SerialComm(), ours, (8, 8), overwrite=True)
    assert (ours / "mean" / "README").read_text() == "keep"
    assert zarr.open_array(str(ours / "mean" / "0"), mode="r")[0, 0] == 2.0      # nothing replaced
    assert sorted(p.name for p in tmp_path.iterdir() if "ours" in p.name) == ["ours.zarr"]
    with pytest.raises(OutputError, match="did not write"):
        check_output_path(ours, True)


def test_registry_chooses_the_store_by_suffix(tmp_path):
    h5 = open_result_store(SerialComm(), tmp_path / "a.h5", (8, 8))
    z = open_result_store(SerialComm(), tmp_path / "a.zarr", (8, 8), tile=(8, 8))
    assert isinstance(h5, RankZeroStore) and not h5.per_rank_writes
    assert isinstance(z, ZarrResultStore) and z.per_rank_writes
    h5.abort()
    z.abort()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- runs
def _config(inp, out, *extra):
    return load_config(REPO / "configs" / "demo.yaml", [f"input.path={inp}", f"output.path={out}", *SMALL, *extra])


def _sets(inp, out, *extra):
    return [x for kv in [f"input.path={inp}", f"output.path={out}", *SMALL, *extra] for x in ("--set", kv)]


def _zarr_images(path):
    g = zarr.open_group(str(path), mode="r")
    return {n: g[n]["0"][:] for n in ("mean", "variance", "input") if n in g}, dict(g.attrs)


@pytest.mark.mpi
@needs_mpi
def test_two_and_three_ranks_write_the_hdf5_result_bit_for_bit(image96, tmp_path):
    ref = tmp_path / "ref.h5"
    run(_config(image96, ref), SerialComm())
    expected = read_result(ref)
    for ranks in (2, 3):
        out = tmp_path / f"r{ranks}.zarr"
        proc = run_cli(["run", "configs/demo.yaml", *_sets(image96, out)], ranks=ranks, timeout=180, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        images, attrs = _zarr_images(out)
        assert set(images) == {"mean", "variance"} and expected["input"] is None   # a mosaic: no input copy
        for name in ("mean", "variance"):
            np.testing.assert_array_equal(images[name], expected[name])
        assert attrs["ranks"] == ranks and attrs["input_checksum"] == expected["metadata"]["input_checksum"]
        assert attrs["element_size_um"] == pytest.approx([0.005, 0.005])
        node = _ngff_nodes(out / "mean")
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([0.005, 0.005])
        g = zarr.open_group(str(out), mode="r")
        np.testing.assert_array_equal(g["params"]["W"][:], expected["params"]["W"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2.zarr", "r3.zarr", "ref.h5"]
    info = run_cli(["info", str(tmp_path / "r2.zarr")], cwd=REPO)          # metadata only, as for HDF5
    assert info.returncode == 0 and "hpc_zsem result" in info.stdout and "image (96, 96)" in info.stdout
    assert "params: " in info.stdout and "W (" in info.stdout
    export = run_cli(["export", str(tmp_path / "r2.zarr"), "--format", "tiff"], cwd=REPO)      # level 0, exact values
    assert export.returncode == 0, export.stderr
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "r2_export" / "r2_mean.tif"), expected["mean"])


def test_a_stopped_pass_resumes_into_the_same_zarr_result(image96, tmp_path, caplog):
    import logging

    ref = tmp_path / "ref.zarr"
    run(_config(image96, ref), SerialComm())
    out = tmp_path / "stopped.zarr"
    config = _config(image96, out)
    with pytest.raises(StopRequested, match="continues with the tiles not yet written"):
        run(config, SerialComm(), stop=StopAtCheck(2 + 4))           # 2 training epochs, then 4 rounds of tiles
    partial = tmp_path / "stopped.zarr.partial"
    assert not out.exists() and partial.is_dir()
    attrs = json.loads((partial / "zarr.json").read_text())["attributes"]
    assert attrs["clean"] == 1 and len(attrs["written_tiles"]) == 4
    with caplog.at_level(logging.INFO, logger="hpc_zsem"):
        run(config, SerialComm(), resume=find_resumable(config))
    assert "4 were written before the stop, 5 to go" in caplog.text
    a, _ = _zarr_images(out)
    b, _ = _zarr_images(ref)
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(a[name], b[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.zarr", "stopped.zarr"]


_DRIVER = """
import sys
from hpc_zsem import signals
from hpc_zsem.cli import main
from hpc_zsem.parallel import get_comm

MODE = sys.argv.pop(1)
if MODE.startswith("stop"):
    class Stop:                      # turns true at the n-th check on every rank (as a signal would)
        def __init__(self, n):
            self.n, self.calls = n, 0
        def __bool__(self):
            self.calls += 1
            return self.calls >= self.n
    signals.install = lambda flag=None: Stop(int(MODE[4:]))
elif MODE == "fail" and get_comm().rank == 1:
    from hpc_zsem.io.zarr_store import ZarrResultStore
    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    ZarrResultStore.write = broken
sys.exit(main(sys.argv[1:]))
"""


def _driver(tmp_path, mode, ranks, args):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(_DRIVER))
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, str(script), mode, *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180, env=cli_env(),
                          cwd=REPO)


@pytest.mark.mpi
@needs_mpi
def test_a_pass_stopped_on_two_ranks_continues_on_three(image96, tmp_path):
    ref = tmp_path / "ref.h5"
    run(_config(image96, ref), SerialComm())
    out = tmp_path / "o.zarr"
    args = ["run", "configs/demo.yaml", *_sets(image96, out)]
    proc = _driver(tmp_path, "stop4", 2, args)                       # 2 epochs, then 2 rounds = 4 tiles
    assert proc.returncode == 75, proc.stdout + proc.stderr
    attrs = json.loads((tmp_path / "o.zarr.partial" / "zarr.json").read_text())["attributes"]
    assert attrs["clean"] == 1 and len(attrs["written_tiles"]) == 4     # both ranks' tiles were recorded
    proc = run_cli(args, ranks=3, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 were written before the stop, 5 to go" in proc.stdout
    images, _ = _zarr_images(out)
    expected = read_result(ref)
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(images[name], expected[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "o.zarr", "ref.h5"]


@pytest.mark.mpi
@needs_mpi
def test_a_write_failing_on_one_rank_is_one_line_everywhere_and_leaves_nothing(image96, tmp_path):
    out = tmp_path / "o.zarr"
    proc = _driver(tmp_path, "fail", 2, ["run", "configs/demo.yaml", *_sets(image96, out)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # every rank knows the one-line error; the CLI then ends the job with MPI_Abort, whose launcher may drop
    # the ranks' last stderr lines, so only what arrived is checked
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "hpc-zsem: error" in line]
    assert all("No space left on device" in line for line in errors), proc.stderr
    # no result, partial or temporary store; the checkpoint (and the lock file of the aborted job) stay
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("o.zarr.lock",)) == ["driver.py", "o.ckpt.h5"]


# ------------------------------------------------------------------------------------------- zarr inputs
@pytest.fixture(scope="module")
def zarr_inputs(image96, tmp_path_factory):
    """The TIFF as an OME-Zarr 0.4 image written by ome-zarr (zarr v2) and as a plain zarr v3 array."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    data = tifffile.imread(image96)
    where = tmp_path_factory.mktemp("zarr_in")
    ome = where / "img.ome.zarr"
    group = zarr.open_group(str(ome), mode="w", zarr_format=2)
    write_image(data, group, axes="yx", fmt=FormatV04(), scale_factors=(2,), scale={"y": 0.005, "x": 0.005},
                axes_units={"y": "micrometer", "x": "micrometer"})
    plain = where / "plain.zarr"
    root = zarr.open_group(str(plain), mode="w")
    root.create_group("em").create_array("raw", data=np.stack([data, data + 1]), chunks=(1, 40, 40))
    return data, ome, plain


def test_zarr_inputs_read_like_the_tiff(image96, zarr_inputs, tmp_path):
    data, ome, plain = zarr_inputs
    with open_source(ome) as src, open_source(image96) as tif:
        assert src.shape == tif.shape == (96, 96)
        np.testing.assert_array_equal(src.read(None, 10, 50, 3, 90), tif.read(None, 10, 50, 3, 90))
    assert pixel_size_um(ome) == pytest.approx((0.005, 0.005))
    with open_source(f"{plain}:/em/raw", section=1, crop=(0, 80, 8, 96), downsample=2) as src:
        np.testing.assert_array_equal(src.read_section(), data[0:80:2, 8:96:2] + 1)
    with open_source(f"{plain}:/em/raw") as src:
        assert src.shape == (2, 96, 96)
    assert pixel_size_um(f"{plain}:/em/raw") is None
    with pytest.raises(Exception, match="name the array"):
        open_source(plain)
    # identity: deterministic, per array, changes with the data
    assert input_file(f"{plain}:/em/raw") == plain
    first = file_checksum(ome)
    assert first == file_checksum(ome) and first.startswith("sha256:") and first != file_checksum(f"{plain}:/em/raw")
    store, level0 = zarr_array_path(ome)
    assert store == ome
    arr = zarr.open_array(str(ome / level0), mode="r+")
    arr[0, 0] = arr[0, 0] + 1
    assert file_checksum(ome) != first
    arr[0, 0] = arr[0, 0] - 1
    assert file_checksum(ome) == first
    # a result written into the input store is refused before any work
    with pytest.raises(ConfigError, match="inside the input store"):
        check_run_paths(_config(ome, ome / "out.zarr"))


def test_a_run_on_a_zarr_input_equals_the_run_on_the_tiff(image96, zarr_inputs, tmp_path):
    _, ome, _ = zarr_inputs
    whole = ["training.max_patches=null"]          # trains on every patch: the result holds the input too
    run(_config(image96, tmp_path / "tif.h5", *whole), SerialComm())
    run(_config(ome, tmp_path / "zarr.zarr", *whole), SerialComm())
    expected = read_result(tmp_path / "tif.h5")
    images, attrs = _zarr_images(tmp_path / "zarr.zarr")
    assert attrs["n_training_patches"] == attrs["n_patches"]
    for name in ("mean", "variance", "input"):
        np.testing.assert_array_equal(images[name], expected[name])
    assert attrs["input_checksum"] == file_checksum(ome)
    assert attrs["element_size_um"] == pytest.approx([0.005, 0.005])
    with h5py.File(tmp_path / "tif.h5") as f:
        assert f["mean"].attrs["element_size_um"] == pytest.approx([0.005, 0.005])
