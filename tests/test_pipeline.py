"""End to end through the CLI on real EM content: quality, output file contents, refusals."""
import h5py
import numpy as np
import pytest

from conftest import REPO, psnr, read_plane, run_cli

SMALL = ["--set", "model.H=24", "--set", "truncation.S=20", "--set", "truncation.parents=8",
         "--set", "truncation.children=2", "--set", "patches.size=[6,6]", "--set", "estimation.epochs=3"]


@pytest.mark.slow
def test_denoises_em_crop_by_more_than_3db(em_crop, tmp_path):
    clean, noisy_path = em_crop
    out = tmp_path / "result.h5"
    proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={noisy_path}", "--set", f"output.path={out}",
                    "--set", "training.epochs=25", *SMALL], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 25/25" in proc.stdout and "patches/s" in proc.stdout
    with h5py.File(out) as f:
        mean, variance = f["mean"][:], f["variance"][:]
        assert mean.dtype == np.float32 and mean.shape == clean.shape == variance.shape
        history = {k: f["history"][k][:] for k in f["history"]}
        assert f.attrs["ranks"] == 1 and f.attrs["input_checksum"].decode().startswith("sha256:")
        assert "model:" in f.attrs["config"].decode()
        sigma_learned = np.sqrt(f["params/sigma2"][()])
    noisy = read_plane(noisy_path)
    gain = psnr(mean, clean) - psnr(noisy, clean)
    assert gain >= 3.0, f"PSNR gain {gain:.2f} dB"
    assert np.all(np.diff(history["free_energy"]) > -1e-6 * np.abs(history["free_energy"][1:]))
    assert 15 < sigma_learned < 40         # the noise level is learned (true σ = 25), never given
    assert np.all(variance >= 0) and variance.mean() > 0


def test_refuses_to_overwrite_and_bad_keys(em_crop, tmp_path):
    _, noisy_path = em_crop
    out = tmp_path / "exists.h5"
    out.write_bytes(b"previous result")
    proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={noisy_path}", "--set", f"output.path={out}"],
                   cwd=REPO)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"previous result"
    proc = run_cli(["run", "configs/demo.yaml", "--set", "model.HH=3"], cwd=REPO)
    assert proc.returncode == 2 and "model.HH" in proc.stderr and "model.H" in proc.stderr
    proc = run_cli(["run", "configs/demo.yaml", "--set", f"input.path={tmp_path / 'missing.tif'}",
                    "--set", f"output.path={tmp_path / 'x.h5'}"], cwd=REPO)
    assert proc.returncode == 2 and "missing.tif" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["patches.size=[64,64]", "input.crop=[0,32,0,32]"], "smaller than patches.size"),
    (["resources.max_memory_per_rank=1MiB"], "resources.max_memory_per_rank: the run needs about"),
    (["output.path=/nonexistent_dir/x.h5"], "/nonexistent_dir"),
    (["input.crop=[0,100,0,100]"], "outside the image"),
], ids=["image-smaller-than-patch", "memory-limit", "missing-output-dir", "crop-outside"])
def test_refused_before_any_work_with_a_one_line_message(em_crop, tmp_path, overrides, message):
    _, noisy = em_crop
    args = ["run", "configs/demo.yaml", "--set", f"input.path={noisy}", "--set", f"output.path={tmp_path / 'o.h5'}"]
    proc = run_cli(args + [x for kv in overrides for x in ("--set", kv)], cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "epoch" not in proc.stdout                                  # no work was started
