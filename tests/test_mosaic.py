"""Mosaics and stacks: training on a sample, streamed tiled estimation equal to the whole-image run, (Z, Y, X)
volumes whose sections match single-section runs with the same model, and one model per section
(training.per_section) equal to separate single-section runs, resumable, on any number of ranks."""
import logging

import h5py
import numpy as np
import pytest
import tifffile

from conftest import REPO, SHARED_ISBI, DEMO_CLEAN, StopAtCheck, run_cli
from hpc_zsem.config import load_config
from hpc_zsem.io.checkpoint import find_resumable
from hpc_zsem.io.results import read_result
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import Run, run
from hpc_zsem.sections import parts_dir, run_per_section
from hpc_zsem.signals import StopRequested

SMALL = ["model.H=12", "truncation.S=8", "truncation.parents=4", "truncation.children=2", "training.epochs=4",
         "estimation.epochs=2", "patches.size=[6,6]", "checkpoint.every_epochs=0"]


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    """A 3-section EM stack (real ssTEM sections with noise σ = 25), 48×56 pixels, float32 TIFF."""
    if SHARED_ISBI.exists():
        clean = tifffile.imread(SHARED_ISBI, key=[3, 4, 5])[:, 100:148, 100:156].astype(np.float64)
    else:
        demo = tifffile.imread(DEMO_CLEAN).astype(np.float64)
        clean = np.stack([demo[i * 20:i * 20 + 48, :56] for i in range(3)])
    noisy = clean + np.random.default_rng(3).normal(0, 25, clean.shape)
    path = tmp_path_factory.mktemp("stack") / "stack.tif"
    tifffile.imwrite(path, noisy.astype(np.float32), photometric="minisblack")
    return path


def config_for(path, out, *extra):
    return load_config(REPO / "configs" / "demo.yaml", [f"input.path={path}", f"output.path={out}", *SMALL, *extra])


def test_streamed_tiles_equal_the_whole_image(em_crop, tmp_path):
    _, noisy = em_crop
    results = []
    for tile in ([64, 64], [16, 16], [24, 40]):        # [64, 64]: one tile = the whole 64×64 image
        out = tmp_path / f"t{tile[0]}x{tile[1]}.h5"
        run(config_for(noisy, out, "training.max_patches=1500", f"estimation.tile={tile}"), SerialComm())
        results.append(read_result(out))
        assert results[-1]["metadata"]["n_training_patches"] == 1500
    for other in results[1:]:
        np.testing.assert_allclose(other["mean"], results[0]["mean"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(other["variance"], results[0]["variance"], rtol=0, atol=1e-3)
    clean, _ = em_crop
    assert np.mean((results[0]["mean"] - clean) ** 2) < 0.6 * 25**2      # it denoises


def test_one_estimation_path_whatever_the_tiling_and_whether_training_used_a_sample(em_crop, tmp_path):
    """An image held in memory is estimated as a stream of tiles from fresh truncated sets: with the same model
    a run that trained on every patch and runs that trained on a sample or use other tiles give the same pixels."""
    _, noisy = em_crop
    whole = tmp_path / "whole.h5"
    run(config_for(noisy, whole), SerialComm())              # every patch trains; one 64×64 tile
    reference = read_result(whole)
    assert reference["metadata"]["n_training_patches"] == reference["metadata"]["n_patches"]
    for name, extra in {"sample": ["training.max_patches=1500"], "tiles": ["estimation.tile=[24,40]"],
                        "both": ["training.max_patches=900", "estimation.tile=[16,16]"]}.items():
        job = Run(config_for(noisy, tmp_path / f"{name}.h5", *extra), SerialComm())
        job.training.params = reference["params"]
        assert job.estimate({"model": "sssc"}, overwrite=False)
        other = read_result(tmp_path / f"{name}.h5")
        np.testing.assert_array_equal(other["mean"], reference["mean"])
        np.testing.assert_array_equal(other["variance"], reference["variance"])


def test_stack_gives_a_volume_whose_sections_match_single_section_runs(stack_path, tmp_path):
    out = tmp_path / "stack.h5"
    run(config_for(stack_path, out, "training.max_patches=3000", "estimation.tile=[32,32]"), SerialComm())
    with h5py.File(out) as f:
        assert f["mean"].shape == (3, 48, 56) and f["mean"].chunks[0] == 1
        assert f["mean"].attrs["axes"] == "ZYX"
    stack = read_result(out)
    for z in (0, 2):
        job = Run(config_for(stack_path, tmp_path / f"z{z}.h5", f"input.section={z}", "training.max_patches=3000",
                             "estimation.tile=[48,56]"), SerialComm())
        job.training.params = stack["params"]           # the model learned on the whole stack
        assert job.estimate({"model": "sssc"}, overwrite=False)
        single = read_result(tmp_path / f"z{z}.h5")
        np.testing.assert_allclose(single["mean"], stack["mean"][z], rtol=0, atol=1e-4)
        np.testing.assert_allclose(single["variance"], stack["variance"][z], rtol=0, atol=1e-3)


def test_in_memory_stack_and_two_ranks_streaming(stack_path, tmp_path):
    out = tmp_path / "mem.h5"
    run(config_for(stack_path, out), SerialComm())
    assert read_result(out)["mean"].shape == (3, 48, 56)
    outs = {}
    for ranks in (1, 2):
        outs[ranks] = tmp_path / f"r{ranks}.h5"
        proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={stack_path}", "--set",
                        f"output.path={outs[ranks]}", *[x for kv in SMALL for x in ("--set", kv)],
                        "--set", "training.max_patches=2000", "--set", "estimation.tile=[32,32]"],
                       ranks=ranks, timeout=180, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "estimation: tiles" in proc.stdout
    a, b = read_result(outs[1]), read_result(outs[2])
    np.testing.assert_allclose(b["mean"], a["mean"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b["params"]["W"], a["params"]["W"], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ training.per_section
@pytest.fixture(scope="module")
def per_section_reference(stack_path, tmp_path_factory):
    """An uninterrupted per-section run of the 3-section stack on one rank."""
    out = tmp_path_factory.mktemp("per_section") / "ref.h5"
    run_per_section(config_for(stack_path, out, "training.per_section=true"), SerialComm())
    return out


def test_per_section_volume_holds_one_model_per_section(stack_path, per_section_reference, tmp_path):
    ref = read_result(per_section_reference)
    assert ref["mean"].shape == (3, 48, 56) and ref["input"].shape == (3, 48, 56)
    assert ref["params"]["W"].shape == (3, 36, 12)
    assert not np.allclose(ref["params"]["W"][0], ref["params"]["W"][2])        # separate models
    np.testing.assert_array_equal(np.unique(ref["history"]["section"]), [0, 1, 2])
    assert ref["metadata"]["per_section"] and ref["metadata"]["axes"] == "ZYX"
    assert not parts_dir(config_for(stack_path, per_section_reference)).exists()
    for z in (0, 2):                                          # equal to a separate run of that section alone
        out = tmp_path / f"z{z}.h5"
        run(config_for(stack_path, out, f"input.section={z}"), SerialComm())
        single = read_result(out)
        np.testing.assert_array_equal(single["mean"], ref["mean"][z])
        np.testing.assert_array_equal(single["variance"], ref["variance"][z])
        np.testing.assert_array_equal(single["params"]["W"], ref["params"]["W"][z])


def test_per_section_into_ome_zarr_equals_the_hdf5_volume(stack_path, per_section_reference, tmp_path):
    import zarr
    out = tmp_path / "stack.zarr"
    run_per_section(config_for(stack_path, out, "training.per_section=true"), SerialComm())
    ref = read_result(per_section_reference)
    root = zarr.open_group(str(out), mode="r")
    for name in ("mean", "variance", "input"):
        np.testing.assert_array_equal(root[name]["0"][:], ref[name])
    np.testing.assert_array_equal(root["params"]["W"][:], ref["params"]["W"])
    assert root.attrs["per_section"] and root.attrs["axes"] == "ZYX"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.zarr"]       # no parts, no HDF5 under that name


def test_per_section_resumes_after_a_stop_and_skips_finished_sections(stack_path, per_section_reference,
                                                                       tmp_path, caplog, monkeypatch):
    import hpc_zsem.sections as sections

    monkeypatch.setattr(sections, "CHUNK", 16)            # assemble in bands of 16 rows (3 per section)
    monkeypatch.setattr(sections, "COPY_BYTES", 1)
    out = tmp_path / "stopped.h5"
    config = config_for(stack_path, out, "training.per_section=true")
    with pytest.raises(StopRequested):
        run_per_section(config, SerialComm(), stop=StopAtCheck(9))     # section 0 done, section 1 mid-training
    assert not out.exists()
    assert (parts_dir(config) / "z0000.h5").exists() and (parts_dir(config) / "z0001.ckpt.h5").exists()
    with caplog.at_level(logging.INFO, logger="hpc_zsem"):
        run_per_section(config, SerialComm())
    assert "section 1/3: finished earlier" in caplog.text and "resuming from" in caplog.text
    resumed, ref = read_result(out), read_result(per_section_reference)
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(resumed[name], ref[name])
    np.testing.assert_array_equal(resumed["params"]["W"], ref["params"]["W"])


def test_per_section_cli_on_two_ranks_equals_one_rank(stack_path, per_section_reference, tmp_path):
    out = tmp_path / "r2.h5"
    proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={stack_path}", "--set", f"output.path={out}",
                    *[x for kv in SMALL for x in ("--set", kv)], "--set", "training.per_section=true"],
                   ranks=2, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "section 3/3: its own model" in proc.stdout
    info = run_cli(["info", str(out)], cwd=REPO)
    assert "12 epochs over 3 sections, one model each" in info.stdout
    two, one = read_result(out), read_result(per_section_reference)
    np.testing.assert_allclose(two["mean"], one["mean"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(two["params"]["W"], one["params"]["W"], rtol=1e-9, atol=1e-9)


def test_per_section_with_streamed_sections(stack_path, tmp_path):
    """Sections trained on a sample and estimated tile by tile assemble into the same kind of volume."""
    out = tmp_path / "streamed.h5"
    run_per_section(config_for(stack_path, out, "training.per_section=true", "training.max_patches=1500",
                               "estimation.tile=[32,32]"), SerialComm())
    result = read_result(out)
    assert result["mean"].shape == (3, 48, 56) and result["input"] is None
    assert np.isfinite(result["mean"]).all() and (result["variance"] >= 0).all()
    assert result["metadata"]["n_training_patches"] == 3 * 1500


def test_each_rank_reads_only_its_share_of_the_training_sample(em_crop, tmp_path, monkeypatch):
    """With training.max_patches the sample is drawn identically on every rank but each rank reads only the
    patches of its own blocks (I/O and memory per rank = sample / ranks)."""
    import hpc_zsem.dataset as dataset

    _, noisy = em_crop
    read, original = [], dataset.read_patches

    def counting(src, ids, *args, **kwargs):
        read.append(np.array(ids))
        return original(src, ids, *args, **kwargs)

    monkeypatch.setattr(dataset, "read_patches", counting)
    config = config_for(noisy, tmp_path / "x.h5", "training.max_patches=1500", "training.block_size=200")
    jobs = [Run(config, type("Rank", (SerialComm,), {"rank": r, "size": 2})()) for r in (0, 1)]
    assert [len(ids) for ids in read] == [800, 700]                       # 4 and 4 blocks of 200 (last 100)
    np.testing.assert_array_equal(np.concatenate(read), jobs[0].data.train_ids)  # together: the whole sample, once
    whole = Run(config, SerialComm())
    np.testing.assert_array_equal(np.concatenate([b.Y for job in jobs for b in job.training.blocks]),
                                  np.concatenate([b.Y for b in whole.training.blocks]))


def test_a_stopped_estimation_pass_continues_with_the_tiles_not_yet_written(em_crop, tmp_path, caplog):
    _, noisy = em_crop
    settings = ["training.max_patches=1500", "estimation.tile=[16,16]"]          # 16 tiles, one per round
    reference = tmp_path / "ref.h5"
    run(config_for(noisy, reference, *settings), SerialComm())
    out = tmp_path / "stopped.h5"
    config = config_for(noisy, out, *settings)
    with pytest.raises(StopRequested, match="continues with the tiles not yet written"):
        run(config, SerialComm(), stop=StopAtCheck(4 + 6))            # 4 training epochs, then 6 rounds of tiles
    assert not out.exists() and (tmp_path / "stopped.h5.partial").exists()
    with caplog.at_level(logging.INFO, logger="hpc_zsem"):
        run(config, SerialComm(), resume=find_resumable(config))
    assert "6 were written before the stop, 10 to go" in caplog.text
    resumed, ref = read_result(out), read_result(reference)
    np.testing.assert_array_equal(resumed["mean"], ref["mean"])
    np.testing.assert_array_equal(resumed["variance"], ref["variance"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.h5", "stopped.h5"]


def test_per_section_refuses_a_foreign_finished_section(stack_path, tmp_path):
    """A finished section of another config is never silently replaced: one-line error, exit code 2."""
    out = tmp_path / "o.h5"
    parts = tmp_path / "o.h5.sections"
    parts.mkdir()
    run(config_for(stack_path, parts / "z0000.h5", "input.section=0", "training.epochs=1"), SerialComm())
    before = (parts / "z0000.h5").read_bytes()
    proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={stack_path}", "--set", f"output.path={out}",
                    *[x for kv in SMALL for x in ("--set", kv)], "--set", "training.per_section=true"], cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "z0000.h5: a finished section of a different run" in proc.stderr and "--restart" in proc.stderr
    assert (parts / "z0000.h5").read_bytes() == before and not out.exists()
