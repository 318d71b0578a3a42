"""Faults never hang a job or lose data: a rank killed with SIGKILL, a full disk while writing the result."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env, write_old_result
from hpc_zsem.config import load_config
from hpc_zsem.errors import OutputError
from hpc_zsem.io import checkpoint as ckpt_io
from hpc_zsem.io import volumes
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import run

SMALL = ["model.H=12", "truncation.S=8", "truncation.parents=4", "truncation.children=2", "patches.size=[6,6]",
         "estimation.epochs=1"]


def rank_pids(marker):
    out = subprocess.run(["pgrep", "-f", f"python.*{marker}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None or shutil.which("pgrep") is None, reason="needs mpiexec, pgrep")
def test_a_rank_killed_with_sigkill_ends_the_job_and_keeps_the_checkpoint(em_crop, tmp_path):
    _, noisy = em_crop
    out = tmp_path / "killed_rank_run.h5"
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "hpc_zsem", "run", "configs/demo.yaml",
           "--set", f"input.path={noisy}", "--set", f"output.path={out}", "--set", "training.epochs=400",
           "--set", "checkpoint.every_epochs=1", *[x for kv in SMALL for x in ("--set", kv)]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "killed_rank_run.ckpt.h5"
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), "no checkpoint appeared"
        pids = rank_pids("killed_rank_run")
        assert len(pids) >= 2, pids
        os.kill(max(pids), signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not out.exists()
    ckpt = ckpt_io.load_latest(checkpoint)            # the last good checkpoint is usable
    assert ckpt is not None and ckpt.epoch >= 1 and ckpt.states.shape[1] == 8


def test_full_disk_while_writing_the_result_keeps_the_old_result(em_crop, tmp_path, monkeypatch):
    _, noisy = em_crop
    out = tmp_path / "result.h5"
    yesterday = write_old_result(out)
    config = load_config(REPO / "configs" / "demo.yaml", [f"input.path={noisy}", f"output.path={out}",
                                                          "training.epochs=2", *SMALL])

    def disk_full(f, metadata):      # the last step of VolumeWriter.close
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volumes, "write_metadata", disk_full)
    with pytest.raises(OutputError, match="No space left on device"):
        run(config, SerialComm(), overwrite=True)
    assert out.read_bytes() == yesterday
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_full_disk_in_a_streamed_volume_write(em_crop, tmp_path, monkeypatch):
    _, noisy = em_crop
    out = tmp_path / "mosaic.h5"
    config = load_config(REPO / "configs" / "demo.yaml", [f"input.path={noisy}", f"output.path={out}",
                                                          "training.epochs=2", "training.max_patches=500",
                                                          "estimation.tile=[32,32]", *SMALL])
    from hpc_zsem.io.volumes import VolumeWriter
    real_write = VolumeWriter.write
    calls = []

    def fails_on_third_tile(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(VolumeWriter, "write", fails_on_third_tile)
    with pytest.raises(OutputError, match="No space left"):
        run(config, SerialComm())
    assert not out.exists() and not any("tmp" in p.name for p in tmp_path.iterdir())
    assert ckpt_io.load_latest(tmp_path / "mosaic.ckpt.h5").epoch == 2     # resume skips the training
