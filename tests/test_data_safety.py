"""Issue 13: never lose a user's data. One test (or more) per reproduced case; each failed on the code before.

The rule: a run writes, replaces or deletes only files it created for this run, or results/checkpoints it
verified as its own; inputs are never touched; a full disk is a one-line error with everything earlier intact.
"""
import errno
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tifffile

from conftest import REPO, cli_env, run_cli, write_old_result
from hpc_zsem import cli
from hpc_zsem.cli import main
from hpc_zsem.config import load_config
from hpc_zsem.errors import ConfigError, InputError, OutputError
from hpc_zsem.io import checkpoint as ckpt_io
from hpc_zsem.io.paths import check_run_paths
from hpc_zsem.io.runlock import RunLock
from hpc_zsem.io.volumes import VolumeWriter
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import run
from hpc_zsem.tiles import plan_tiles

TINY = """input: {path: builtin:demo}
patches: {size: [6, 6]}
model: {name: sssc, H: 8}
training: {epochs: 3}
estimation: {epochs: 1}
truncation: {S: 10, parents: 5}
output: {path: out/t.h5}
"""


@pytest.fixture
def tiny(tmp_path):
    """A directory with tiny.yaml, out/ and img/victim.tif (a copy of the demo image)."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "out").mkdir()
    (tmp_path / "img").mkdir()
    shutil.copy(REPO / "hpc_zsem" / "data" / "demo_noisy.tif", tmp_path / "img" / "victim.tif")
    return tmp_path


def hpc(tmp_path, *args, ranks=None):
    sets = [x for kv in args if "=" in kv and not kv.startswith("-") for x in ("--set", kv)]
    flags = [a for a in args if a.startswith("--")]
    return run_cli(["run", "tiny.yaml", *sets, *flags], ranks=ranks, cwd=tmp_path, timeout=120)


def tiny_config(tmp_path, *overrides):
    return load_config(tmp_path / "tiny.yaml", [f"output.path={tmp_path / 'out' / 't.h5'}", *overrides])


# ------------------------------------------------------------------ 1, 2, 5, 15: one rule for paths

def test_1_checkpoint_path_on_the_input_is_refused_even_with_restart(tiny):
    before = (tiny / "img" / "victim.tif").read_bytes()
    proc = hpc(tiny, "input.path=img/victim.tif", "checkpoint.path=img/victim.tif", "--restart")
    assert proc.returncode == 2 and "is the input file" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert (tiny / "img" / "victim.tif").read_bytes() == before


def test_1_a_foreign_file_at_the_checkpoint_path_is_never_replaced(tiny):
    notes = tiny / "out" / "notes.txt"
    notes.write_text("my notes")
    for flags in ((), ("--restart",)):
        proc = hpc(tiny, f"checkpoint.path={notes}", *flags)
        assert proc.returncode == 2 and "is not an hpc_zsem checkpoint" in proc.stderr
    assert notes.read_text() == "my notes" and not (tiny / "out" / "t.h5").exists()


def test_2_checkpoint_path_equal_to_output_path_is_refused(tiny):
    proc = hpc(tiny, "checkpoint.path=out/b2.h5", "output.path=out/b2.h5", "--overwrite")
    assert proc.returncode == 2 and "are the same file" in proc.stderr
    assert not (tiny / "out" / "b2.h5").exists()


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotdot"])
def test_5_output_path_naming_the_input_is_refused_with_overwrite(tiny, how):
    victim = tiny / "img" / "victim.tif"
    before = victim.read_bytes()
    target = {"same": "img/victim.tif", "dotdot": "out/../img/victim.tif", "symlink": "out/link.tif",
              "hardlink": "out/hard.tif"}[how]
    if how == "symlink":
        os.symlink(victim, tiny / target)
    if how == "hardlink":
        os.link(victim, tiny / target)
    proc = hpc(tiny, "input.path=img/victim.tif", f"output.path={target}", "--overwrite")
    assert proc.returncode == 2 and "is the input file" in proc.stderr
    assert victim.read_bytes() == before


def test_5_overwrite_replaces_only_an_hpc_zsem_result(tiny):
    foreign = tiny / "out" / "t.h5"
    with h5py.File(foreign, "w") as f:          # somebody's HDF5 data, not a result
        f["data"] = np.arange(10)
    before = foreign.read_bytes()
    proc = hpc(tiny, "--overwrite")
    assert proc.returncode == 2 and "is not an hpc_zsem result" in proc.stderr
    assert foreign.read_bytes() == before
    foreign.unlink()
    write_old_result(foreign)                   # an earlier result of ours: replaced
    assert hpc(tiny, "--overwrite").returncode == 0


def test_15_names_too_long_for_the_file_system_are_refused_before_any_work(tiny):
    for length in (250, 240):
        proc = hpc(tiny, f"output.path=out/{'a' * length}.h5")
        assert proc.returncode == 2 and "too long" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tiny / "out") == []


def test_run_paths_are_checked_on_the_config(tiny):
    with pytest.raises(ConfigError, match="same file"):
        check_run_paths(tiny_config(tiny, f"checkpoint.path={tiny / 'out' / 't.h5.partial'}"))
    check_run_paths(tiny_config(tiny))


# ------------------------------------------------------------------ 16: one run per output

def test_16_a_second_run_on_the_same_output_is_refused_naming_the_first(tiny):
    first = subprocess.Popen([sys.executable, "-m", "hpc_zsem", "run", "tiny.yaml", "--set", "training.epochs=400"],
                             cwd=tiny, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tiny / "out" / "t.h5.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = hpc(tiny, "--restart")
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "another hpc-zsem run" in second.stderr
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=30)
    lock = RunLock()                             # the kernel released the dead run's lock
    lock.acquire([tiny / "out" / "t.h5.lock"])
    lock.release()
    assert not (tiny / "out" / "t.h5.lock").exists()


def test_16_lock_is_exclusive_within_one_process_too(tmp_path):
    a, b = RunLock(), RunLock()
    a.acquire([tmp_path / "x.lock"])
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        b.acquire([tmp_path / "y.lock", tmp_path / "x.lock"])
    assert not (tmp_path / "y.lock").exists()    # a failed acquire keeps nothing locked
    a.release()


# ------------------------------------------------------------------ 3: HDF5 input end to end

@pytest.mark.parametrize("mode", ["in_memory", "section", "streamed"])
def test_3_hdf5_input_gives_a_result(tiny, mode):
    stack = np.random.default_rng(0).integers(0, 255, (2, 48, 48)).astype(np.uint8)
    with h5py.File(tiny / "img" / "stack.h5", "w") as f:
        f["em/data"] = stack
    extra = {"in_memory": [], "section": ["input.section=1"],
             "streamed": ["input.section=0", "training.max_patches=500", "estimation.tile=[32,32]"]}[mode]
    config = tiny_config(tiny, f"input.path={tiny / 'img' / 'stack.h5'}:/em/data", "checkpoint.every_epochs=1",
                         *extra)
    run(config, SerialComm())
    with h5py.File(config.output.path) as f:
        assert np.isfinite(f["mean"][()]).all()
        assert f.attrs["input_checksum"].decode().startswith("sha256:")
    assert not ckpt_io.checkpoint_path(config).exists()


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_3_hdf5_input_under_mpi(tiny):
    with h5py.File(tiny / "img" / "stack.h5", "w") as f:
        f["data"] = np.random.default_rng(0).integers(0, 255, (48, 48)).astype(np.uint8)
    proc = hpc(tiny, "input.path=img/stack.h5:/data", "checkpoint.every_epochs=1", ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert (tiny / "out" / "t.h5").exists()


# ------------------------------------------------------------------ 4, 13: degenerate images

@pytest.mark.parametrize("kind", ["zeros", "constant", "huge"])
def test_4_13_degenerate_images_give_a_finite_result_and_a_warning(tiny, kind, caplog):
    image = {"zeros": np.zeros((40, 40), np.uint8), "constant": np.full((40, 40), 100, np.uint16),
             "huge": (np.random.default_rng(0).random((40, 40)) * 1e32).astype(np.float32)}[kind]
    tifffile.imwrite(tiny / "img" / "d.tif", image)
    config = tiny_config(tiny, f"input.path={tiny / 'img' / 'd.tif'}")
    run(config, SerialComm())
    with h5py.File(config.output.path) as f:
        assert np.isfinite(f["mean"][()]).all() and np.isfinite(f["variance"][()]).all()
        if kind != "huge":
            np.testing.assert_allclose(f["mean"][()], image, atol=1e-3)
    assert any(r.levelname == "WARNING" and ("constant" in r.message or "clipped" in r.message)
               for r in caplog.records)


def test_4_a_blank_section_of_a_per_section_stack(tiny):
    stack = np.random.default_rng(1).integers(0, 255, (3, 40, 40)).astype(np.uint8)
    stack[1] = 0
    tifffile.imwrite(tiny / "img" / "z.tif", stack, photometric="minisblack")
    config = tiny_config(tiny, f"input.path={tiny / 'img' / 'z.tif'}", "training.per_section=true")
    from hpc_zsem.sections import run_per_section
    run_per_section(config, SerialComm())
    with h5py.File(config.output.path) as f:
        assert np.isfinite(f["mean"][()]).all() and np.isfinite(f["variance"][()]).all()
        assert not f["mean"][1].any()


def test_13_intensities_that_overflow_float64_are_refused(tiny):
    tifffile.imwrite(tiny / "img" / "d.tif", np.random.default_rng(0).random((40, 40)) * 1e200)
    with pytest.raises(InputError, match="too large"):
        run(tiny_config(tiny, f"input.path={tiny / 'img' / 'd.tif'}"), SerialComm())


# ------------------------------------------------------------------ 6: full disk

def _fill(directory, leave_bytes):
    """Fill the file system of ``directory`` up to ``leave_bytes`` free."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * (1 << 16)
        for _ in range(max(0, free - leave_bytes) // len(chunk)):
            fh.write(chunk)


@pytest.fixture
def tiny_disk(tiny):
    """An 8 MB tmpfs at tiny/full (root and a mountable tmpfs needed)."""
    disk = tiny / "full"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_6_full_disk_for_the_result_is_a_one_line_error_and_keeps_the_old_result(tiny, tiny_disk):
    old = write_old_result(tiny_disk / "r.h5")
    _fill(tiny_disk, 20_000)
    for i, extra in enumerate(((), ("training.max_patches=2000", "estimation.tile=[64,64]"))):
        # the checkpoint of the end of training stays (for a rerun on a freed disk); each variant has its own
        proc = hpc(tiny, "output.path=full/r.h5", f"checkpoint.path=out/c{i}.h5", "--overwrite", *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "space" in proc.stderr.lower()
        assert (tiny_disk / "r.h5").read_bytes() == old
        assert sorted(os.listdir(tiny_disk)) == ["filler", "r.h5"]


def test_6_full_disk_for_checkpoints_is_logged_and_the_run_goes_on(tiny, tiny_disk):
    _fill(tiny_disk, 20_000)
    proc = hpc(tiny, "checkpoint.path=full/c.h5", "checkpoint.every_epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("writing the checkpoint") >= 3 and "No space left on device" in proc.stdout
    assert (tiny / "out" / "t.h5").exists() and sorted(os.listdir(tiny_disk)) == ["filler"]


def test_6_volume_writer_stops_before_the_disk_is_full(tmp_path, monkeypatch):
    w = VolumeWriter(tmp_path / "v.h5", (64, 64))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    with pytest.raises(OutputError, match="not enough disk space"):
        w.write(plan_tiles((64, 64), (32, 32), (4, 4))[0], np.zeros((32, 32)), np.zeros((32, 32)))
    assert os.listdir(tmp_path) == []


def test_6_a_failing_result_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="Input/output error"):
        write_old_result(tmp_path / "r.h5")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 8, 9: GPMM identity map, ranks without blocks

def test_8_gpmm_with_an_explicit_identity_intensity_map_runs(tiny):
    proc = hpc(tiny, "model.name=gpmm", "model.C=5", "input.gain=1", "input.offset=0")
    assert proc.returncode == 0, proc.stderr
    assert "clipped to 0" in proc.stdout


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_9_more_ranks_than_blocks(tiny):
    one = hpc(tiny, "training.block_size=100000", "output.path=out/one.h5")
    two = hpc(tiny, "training.block_size=100000", "output.path=out/two.h5", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    with h5py.File(tiny / "out" / "one.h5") as a, h5py.File(tiny / "out" / "two.h5") as b:
        np.testing.assert_array_equal(a["mean"][()], b["mean"][()])


# ------------------------------------------------------------------ 17, 18, 19: the command line

def test_17_negative_threads_are_refused(tiny):
    proc = hpc(tiny, "--threads=-1")
    assert proc.returncode == 2 and "--threads" in proc.stderr and "Traceback" not in proc.stderr


def test_18_a_closed_pipe_and_ctrl_c_end_quietly(tiny, monkeypatch, capsys):
    write_old_result(tiny / "out" / "r.h5")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sys.__stdout__.fileno()

    saved = os.dup(sys.__stdout__.fileno())
    try:
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        assert main(["info", str(tiny / "out" / "r.h5")]) == 141
    finally:
        os.dup2(saved, sys.__stdout__.fileno())
        os.close(saved)
        monkeypatch.undo()

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert main(["info", str(tiny / "out" / "r.h5")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_19_mpi4py_without_an_mpi_library_falls_back_to_one_rank(monkeypatch):
    import builtins

    from hpc_zsem import parallel

    real_import = builtins.__import__

    def no_mpi(name, *args, **kwargs):
        if name == "mpi4py":
            raise RuntimeError("cannot load MPI library")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi)
    assert isinstance(parallel.get_comm(), parallel.SerialComm)


def test_19_info_shows_sigma2_of_the_final_parameters(tiny):
    assert hpc(tiny).returncode == 0
    result = tiny / "out" / "t.h5"
    with h5py.File(result, "a") as f:
        f["history/sigma2"][-1] = 12345.0     # the last history row is before the final M-step
        final = float(f["params/sigma2"][()])
    proc = run_cli(["info", result], cwd=tiny)
    assert f"sigma2 {final:.6g}" in proc.stdout and "12345" not in proc.stdout


def test_a_foreign_file_named_like_a_lock_or_a_temporary_file_is_never_touched(tmp_path):
    from hpc_zsem.io.results import write_atomically

    lock = tmp_path / "x.h5.lock"
    lock.write_text("my notes")
    with pytest.raises(OutputError, match="not an hpc-zsem lock file"):
        RunLock().acquire([lock])
    assert lock.read_text() == "my notes"
    tmp = tmp_path / f"r.h5.tmp-{os.getpid()}"
    tmp.write_text("mine")
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "r.h5", b"data")
    assert tmp.read_text() == "mine" and not (tmp_path / "r.h5").exists()
