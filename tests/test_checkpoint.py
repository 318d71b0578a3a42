"""Checkpoints and exact resume: file round trip, corruption fallback, refusal of foreign checkpoints, stop on
request, and resume after SIGKILL (at a random point and in the middle of a checkpoint write), on 1 and on
3 → 2 ranks. Subprocesses run a small config (a 64×64 crop of the demo image) with timeouts."""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import StopAtCheck
from hpc_zsem import pipeline
from hpc_zsem.config import load_config
from hpc_zsem.io import checkpoint as ck
from hpc_zsem.io.results import read_result
from hpc_zsem.parallel import SerialComm
from hpc_zsem.signals import DUPLICATE_WINDOW, EXIT_RESUME, StopFlag, StopRequested

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = ["input.crop=[0, 64, 0, 64]", "model.H=12", "truncation.S=8", "truncation.parents=4",
         "training.block_size=256", "training.epochs=16", "estimation.epochs=3", "checkpoint.every_epochs=1",
         "checkpoint.every_seconds=0"]
TIMEOUT = 120


# ------------------------------------------------------------------------------------------------ helpers

def _cli(out: Path, *extra: str, ranks: int = 0) -> list[str]:
    cmd = [shutil.which("hpc-zsem") or "hpc-zsem", "run", str(DEMO), "--threads", "1"]
    for item in SMALL + [f"output.path={out}", *extra]:
        cmd += ["--set", item]
    return (["mpiexec", "-n", str(ranks)] + cmd) if ranks else cmd


def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    return _finish(_start(cmd, log, env))


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 60.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _epoch_of(path: Path) -> int:
    return ck.read_checkpoint(path).epoch


def _assert_same_result(a: Path, b: Path, exact: bool = True) -> None:
    ra, rb = read_result(a), read_result(b)
    compare = np.testing.assert_array_equal if exact else \
        (lambda x, y, err_msg="": np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6 * np.abs(x).max(),
                                                             err_msg=err_msg))
    for name in ("mean", "variance"):
        compare(ra[name], rb[name], err_msg=name)
    assert ra["params"].keys() == rb["params"].keys()
    for name in ra["params"]:
        compare(ra["params"][name], rb["params"][name], err_msg=f"params/{name}")
    assert ra["history"].keys() == rb["history"].keys()
    for name in ra["history"]:
        if name != "seconds":
            compare(ra["history"][name], rb["history"][name], err_msg=f"history/{name}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted serial run of the small config."""
    d = tmp_path_factory.mktemp("reference")
    out = d / "ref.h5"
    assert _run(_cli(out), d / "log") == 0, (d / "log").read_text()
    assert not ck.checkpoint_path(load_config(DEMO, SMALL + [f"output.path={out}"])).exists(), \
        "the checkpoint must be removed once the result is written"
    return out


def _small_config(tmp_path: Path, *extra: str, name: str = "out.h5"):
    return load_config(DEMO, SMALL + [f"output.path={tmp_path / name}", *extra])


def _fake_checkpoint(config, epoch: int, stage: str = "train", n: int = 50, seed: int = 0) -> ck.Checkpoint:
    rng = np.random.default_rng(seed)
    return ck.Checkpoint(
        stage=stage, epoch=epoch,
        params={"W": rng.standard_normal((64, 12)), "pi": rng.random(12), "sigma2": np.array(3.25)},
        history={"epoch": np.arange(1.0, epoch + 1), "free_energy": rng.standard_normal(epoch),
                 "seconds": rng.random(epoch)},
        states=rng.integers(0, 2**63, size=(n, 8, 1), dtype=np.uint64), config_yaml=config.to_yaml(),
        config_hash=config.hash(), input_path="demo.tif", input_checksum="sha256:abc",
        geometry={"image_shape": [64, 64], "patch_size": [8, 8], "stride": 1, "n_patches": n, "block_size": 256},
        model="sssc", ranks=3, elapsed_seconds=12.5, free_energy=-1.5, version="test")


# ------------------------------------------------------------------------------------------------ file format

def test_round_trip_keeps_everything_exactly_and_rotates_previous(tmp_path, capsys):
    config = _small_config(tmp_path)
    path = ck.checkpoint_path(config)
    assert path == tmp_path / "out.ckpt.h5" and ck.previous_path(path) == tmp_path / "out.ckpt.prev.h5"
    first, second = _fake_checkpoint(config, 1, seed=1), _fake_checkpoint(config, 2, stage="estimate", seed=2)
    ck.write_checkpoint(path, first)
    assert not ck.previous_path(path).exists()
    ck.write_checkpoint(path, second)
    assert ck.is_checkpoint(path) and not ck.is_checkpoint(DEMO)
    back, prev = ck.read_checkpoint(path), ck.read_checkpoint(ck.previous_path(path))
    assert (back.stage, back.epoch, prev.stage, prev.epoch) == ("estimate", 2, "train", 1)
    for name, value in second.params.items():
        assert back.params[name].dtype == np.float64 and back.params[name].shape == np.shape(value)
        np.testing.assert_array_equal(back.params[name], value)
    for name, value in second.history.items():
        np.testing.assert_array_equal(back.history[name], value)
    assert back.states.dtype == np.uint64
    np.testing.assert_array_equal(back.states, second.states)
    np.testing.assert_array_equal(prev.states, first.states)
    assert back.geometry == second.geometry and back.ranks == 3 and back.config_hash == config.hash()
    assert back.config_yaml == config.to_yaml() and back.elapsed_seconds == 12.5
    # `hpc-zsem info` understands checkpoints
    from hpc_zsem.cli import main
    assert main(["info", str(ck.previous_path(path))]) == 0
    text = capsys.readouterr().out
    assert "checkpoint at training epoch 1" in text and "3 rank(s)" in text and "checksum ok" in text
    assert "free energy per patch -1.5" in text and "model sssc" in text and "H: 12" in text
    # GPMM-like: no per-patch state
    ck.write_checkpoint(path, ck.Checkpoint(**{**second.__dict__, "states": None, "path": None}))
    assert ck.read_checkpoint(path).states is None


def _flip_byte_in(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 3)
        byte = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["flip params", "flip states", "truncate", "delete"])
def test_damaged_checkpoint_is_detected_and_previous_used(tmp_path, caplog, damage):
    config = _small_config(tmp_path)
    path = ck.checkpoint_path(config)
    ck.write_checkpoint(path, _fake_checkpoint(config, 1, seed=1))
    ck.write_checkpoint(path, _fake_checkpoint(config, 2, seed=2))
    if damage == "flip params":          # silent corruption: HDF5 reads it, only the checksum notices
        _flip_byte_in(path, "params/W")
    elif damage == "flip states":
        _flip_byte_in(path, "states")
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()
    if damage != "delete":
        with pytest.raises(ck.CheckpointError, match="checksum|unreadable"):
            ck.read_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="hpc_zsem"):
        got = ck.load_latest(path)
    assert got.epoch == 1 and got.path == ck.previous_path(path)
    if damage != "delete":
        assert "unusable" in caplog.text and "falling back to the previous checkpoint" in caplog.text
    # when the previous one is damaged too, the run is refused (rather than silently starting over)
    os.truncate(ck.previous_path(path), 100)
    with pytest.raises(ck.CheckpointError, match="no usable checkpoint.*--restart"):
        ck.load_latest(path)


def test_fuzzed_checkpoints_are_refused_before_hdf5_parses_them(tmp_path):
    """Random bit flips, zeroed runs and truncations: every changed file is refused with CheckpointError (no
    other exception, no hang: HDF5 loops forever on some damaged metadata, so the bytes are checked first)."""
    config = _small_config(tmp_path)
    good = tmp_path / "good.ckpt.h5"
    ck.write_checkpoint(good, _fake_checkpoint(config, 2, n=300))
    data = good.read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.ckpt.h5"
    refused = 0
    for case in range(300):
        b = bytearray(data)
        if case % 3 == 0:
            for p in rng.integers(0, len(b), rng.integers(1, 9)):
                b[p] ^= 1 << int(rng.integers(0, 8))
        elif case % 3 == 1:
            p, k = int(rng.integers(0, len(b))), int(rng.integers(1, 64))
            b[p:p + k] = bytes(len(b[p:p + k]))
        else:
            b = b[:int(rng.integers(0, len(b)))]
        bad.write_bytes(bytes(b))
        try:
            ck.read_checkpoint(bad)
        except ck.CheckpointError:
            refused += 1
            continue
        assert bytes(b) == data, f"case {case}: a changed file was accepted"
    assert refused > 250


def test_foreign_checkpoint_is_refused_naming_the_difference(tmp_path):
    config = _small_config(tmp_path)
    at4 = _fake_checkpoint(config, 4)
    assert ck.incompatibilities(at4, config, "sha256:abc") == []
    # allowed to differ: output path, checkpoint and logging settings, more training epochs
    relaxed = _small_config(tmp_path, "checkpoint.every_epochs=7", "logging.every_epochs=3", "training.epochs=40",
                            name="elsewhere.h5")
    assert ck.incompatibilities(at4, relaxed, "sha256:abc") == []
    problems = ck.incompatibilities(at4, _small_config(tmp_path, "model.H=13", "truncation.S=9"), "sha256:abc")
    assert len(problems) == 2 and problems[0].startswith("model.H: 12 in the checkpoint, 13 now")
    assert problems[1].startswith("truncation.S: 8 in the checkpoint, 9 now")
    assert "content differs" in ck.incompatibilities(at4, config, "sha256:other")[0]
    assert "beyond training.epochs = 3" in ck.incompatibilities(at4, _small_config(tmp_path, "training.epochs=3"),
                                                                "sha256:abc")[0]
    est = _fake_checkpoint(config, 2, stage="estimate")
    assert ck.incompatibilities(est, config, "sha256:abc") == []
    assert "training.epochs" in ck.incompatibilities(est, relaxed, "sha256:abc")[0]


def test_checkpoint_of_an_older_version_without_a_newer_key_resumes_with_its_default(tmp_path):
    """A checkpoint whose config predates a key (here model.sigma, added with default 'learned') ran with that
    default: it resumes under the default and is refused, naming the key, under another value."""
    import yaml

    config = _small_config(tmp_path, "model.sigma=learned")
    older = yaml.safe_load(config.to_yaml())
    del older["model"]["sigma"]
    ckpt = dataclasses.replace(_fake_checkpoint(config, 4), config_yaml=yaml.safe_dump(older))
    assert ck.incompatibilities(ckpt, config, "sha256:abc") == []
    problems = ck.incompatibilities(ckpt, _small_config(tmp_path, "model.sigma=pca"), "sha256:abc")
    assert problems == ["model.sigma: 'learned' in the checkpoint, 'pca' now"]


def test_cli_refuses_foreign_checkpoint_and_restart_ignores_it(tmp_path):
    out = tmp_path / "out.h5"
    config = _small_config(tmp_path)
    ck.write_checkpoint(ck.checkpoint_path(config), _fake_checkpoint(config, 3))
    proc = subprocess.run(_cli(out, "model.H=10"), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert "belongs to a different run" in proc.stderr and "model.H: 12 in the checkpoint, 10 now" in proc.stderr
    assert "--restart" in proc.stderr and not out.exists()
    assert ck.read_checkpoint(ck.checkpoint_path(config)).epoch == 3          # untouched
    missing = subprocess.run(_cli(out, f"checkpoint.path={tmp_path}/nowhere/x.h5"), capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert missing.returncode == 2 and "checkpoint directory" in missing.stderr and "does not exist" in missing.stderr
    # --restart starts afresh; the old checkpoint survives until the new run writes its first one
    proc = _start(_cli(out, "model.H=10", "training.epochs=3") + ["--restart"], tmp_path / "log")
    assert _finish(proc) == 0, (tmp_path / "log").read_text()
    assert "--restart: starting afresh" in (tmp_path / "log").read_text() and out.exists()


# ------------------------------------------------------------------------------------------------ signals

def test_stop_flag_and_second_sigterm():
    now = [100.0]
    exits = []
    flag = StopFlag(clock=lambda: now[0], hard_exit=exits.append)
    assert not flag
    flag.handle(signal.SIGUSR1)
    assert flag and flag.signal_name == "SIGUSR1" and exits == []
    flag.handle(signal.SIGTERM)                       # first SIGTERM: just a request
    now[0] += DUPLICATE_WINDOW / 2
    flag.handle(signal.SIGTERM)                       # the same SIGTERM fanned out by SLURM/srun/the batch shell
    assert exits == []
    now[0] += DUPLICATE_WINDOW
    flag.handle(signal.SIGTERM)                       # a real second SIGTERM: exit at once
    assert exits == [128 + signal.SIGTERM]


# ------------------------------------------------------------------------------------------------ exact resume

@pytest.mark.parametrize("model,stop_at", [("sssc", 3), ("sssc", 13), ("gpmm", 2)],
                         ids=["sssc-train", "sssc-estimate", "gpmm-train"])
def test_resume_in_process_is_bit_identical(tmp_path, model, stop_at):
    extra = ["training.epochs=4", "estimation.epochs=2", "input.crop=[0, 40, 0, 40]"] + \
        (["training.epochs=12"] if stop_at > 12 else []) + \
        (["model.name=gpmm", "model.C=6", "input.gain=4", "input.offset=0"] if model == "gpmm" else [])
    ref = _small_config(tmp_path, *extra, name="ref.h5")
    pipeline.run(ref, SerialComm())
    config = _small_config(tmp_path, *extra, "checkpoint.every_epochs=0")
    with pytest.raises(StopRequested):
        pipeline.run(config, SerialComm(), stop=StopAtCheck(stop_at))
    saved = ck.read_checkpoint(ck.checkpoint_path(config))
    # a stop during the estimation pass keeps the checkpoint of the end of training (no states: the pass starts
    # every patch from a fresh set) and the finished tiles in out.h5.partial
    assert (saved.stage, saved.epoch) == (("train", stop_at) if stop_at <= 12 else ("estimate", 12))
    assert (saved.states is None) == (model == "gpmm" or saved.stage == "estimate")
    resume = ck.find_resumable(config)
    assert resume is not None and resume.epoch == saved.epoch
    pipeline.run(config, SerialComm(), resume=resume)
    _assert_same_result(tmp_path / "ref.h5", tmp_path / "out.h5")
    assert read_result(tmp_path / "out.h5")["metadata"]["resumed_from"].startswith(str(saved.path))
    assert not ck.checkpoint_path(config).exists()


def test_raising_training_epochs_continues_training(tmp_path):
    """A checkpoint taken at the end of a 3-epoch training resumes under training.epochs = 5 and gives the
    5-epoch run's result."""
    extra = ["input.crop=[0, 40, 0, 40]", "estimation.epochs=1", "checkpoint.every_epochs=0"]
    pipeline.run(_small_config(tmp_path, *extra, "training.epochs=5", name="ref.h5"), SerialComm())
    short = _small_config(tmp_path, *extra, "training.epochs=3")
    with pytest.raises(StopRequested):
        pipeline.run(short, SerialComm(), stop=StopAtCheck(3))
    longer = _small_config(tmp_path, *extra, "training.epochs=5")
    pipeline.run(longer, SerialComm(), resume=ck.find_resumable(longer))
    _assert_same_result(tmp_path / "ref.h5", tmp_path / "out.h5")


# ------------------------------------------------------------------------------------------------ real kills

def test_resume_after_sigkill_at_a_random_point(tmp_path, reference):
    out = tmp_path / "out.h5"
    path = tmp_path / "out.ckpt.h5"
    proc = _start(_cli(out), tmp_path / "log1")
    _wait_for(path.exists, proc, what="the first checkpoint")
    time.sleep(random.uniform(0.0, 0.4))        # any moment: in an E-step, an M-step or a checkpoint write
    assert proc.poll() is None, "the run finished before it could be killed; make SMALL longer"
    os.killpg(proc.pid, signal.SIGKILL)
    assert _finish(proc) == -signal.SIGKILL
    killed_at = ck.load_latest(path)          # whatever the kill hit, a usable checkpoint is there
    assert 1 <= killed_at.epoch < 16 or killed_at.stage == "estimate"
    assert _run(_cli(out), tmp_path / "log2") == 0, (tmp_path / "log2").read_text()
    log = (tmp_path / "log2").read_text()
    assert f"resuming from {killed_at.path} at " in log
    _assert_same_result(reference, out)
    assert not path.exists() and not ck.previous_path(path).exists()


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "out.h5"
    path = tmp_path / "out.ckpt.h5"
    proc = _start(_cli(out), tmp_path / "log1", env={ck.TEST_SLEEP_ENV: "3:60"})
    _wait_for(lambda: "sleeping" in (tmp_path / "log1").read_text(), proc, what="the writer of epoch 3")
    # the epoch-3 checkpoint is built in memory: nothing of it is on disk yet
    assert not list(tmp_path.glob("out.ckpt.h5.new*"))
    os.killpg(proc.pid, signal.SIGKILL)
    _finish(proc)
    assert _epoch_of(path) == 2 and _epoch_of(ck.previous_path(path)) == 1
    assert _run(_cli(out), tmp_path / "log2") == 0, (tmp_path / "log2").read_text()
    assert "at training epoch 2" in (tmp_path / "log2").read_text()
    _assert_same_result(reference, out)
    assert list(tmp_path.glob("out.ckpt*")) == []                # stale temporary file cleaned up too


def test_sigusr1_checkpoints_and_exits_75_then_rerun_completes(tmp_path, reference):
    out = tmp_path / "out.h5"
    path = tmp_path / "out.ckpt.h5"
    proc = _start(_cli(out, "checkpoint.every_epochs=0"), tmp_path / "log1")
    _wait_for(lambda: "epoch 1/16" in (tmp_path / "log1").read_text(), proc, what="epoch 1")
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGUSR1)
    assert _finish(proc) == EXIT_RESUME, (tmp_path / "log1").read_text()
    assert time.monotonic() - sent < 30                # within one epoch and one checkpoint write
    log = (tmp_path / "log1").read_text()
    assert "received SIGUSR1" in log and "stopped on request" in log
    saved = ck.read_checkpoint(path)
    assert saved.stage == "train" and 1 <= saved.epoch < 16 and not out.exists()
    assert len(saved.history["epoch"]) == saved.epoch
    assert _run(_cli(out, "checkpoint.every_epochs=0"), tmp_path / "log2") == 0
    assert f"resuming from {path} at training epoch {saved.epoch}" in (tmp_path / "log2").read_text()
    _assert_same_result(reference, out)


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_resume_on_2_ranks_a_run_checkpointed_on_3(tmp_path, reference):
    out = tmp_path / "out.h5"
    path = tmp_path / "out.ckpt.h5"
    proc = _start(_cli(out, ranks=3), tmp_path / "log1")
    _wait_for(path.exists, proc, what="the first checkpoint")
    ours = [p for p in _descendants(proc.pid) if "hpc-zsem" in Path(f"/proc/{p}/cmdline").read_text()]
    ranks = [p for p in ours if not set(_children(p)) & set(ours)]      # leaves: not a wrapper of a rank
    assert len(ranks) == 3, ranks
    os.kill(ranks[-1], signal.SIGUSR1)          # one rank is enough: the flag travels with the allreduce
    assert _finish(proc) == EXIT_RESUME, (tmp_path / "log1").read_text()
    saved = ck.read_checkpoint(path)
    assert saved.ranks == 3 and saved.stage == "train" and saved.epoch < 16
    assert _run(_cli(out, ranks=2), tmp_path / "log2") == 0, (tmp_path / "log2").read_text()
    assert f"at training epoch {saved.epoch} (written by 3 rank(s)" in (tmp_path / "log2").read_text()
    meta = read_result(out)["metadata"]
    assert meta["ranks"] == 2 and "written by 3 rank(s)" in meta["resumed_from"]
    _assert_same_result(reference, out, exact=False)
