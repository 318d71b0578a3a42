"""The job templates of jobs/ on a real SLURM (skipped when `sinfo` does not answer; CI starts a one-node SLURM
with ../shared/tools/setup-local-slurm.sh). The templates are submitted unchanged: only their variables are
set, through the environment that sbatch exports, and #SBATCH options are overridden on the command line.
Job states are polled with `scontrol show job` under a timeout (not `sbatch --wait`).
Without SLURM, the printed job scripts run under bash with SLURM's variables faked and a stand-in srun that
records its arguments: hostile config names, output paths and overrides must arrive literally and run nothing."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import read_plane
from hpc_zsem.config import load_config
from hpc_zsem.io.results import read_result
from hpc_zsem.slurm import TEMPLATES, assignment, render

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def _slurm_ready() -> bool:
    if not all(shutil.which(c) for c in ("sinfo", "sbatch", "scontrol", "scancel", "srun")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(line.split()[:1] == ["up"] and not line.split()[1].startswith(("down", "drain"))
                                       for line in out.stdout.splitlines() if len(line.split()) == 2)


SLURM_READY = _slurm_ready()
needs_slurm = pytest.mark.skipif(not SLURM_READY, reason="no SLURM answers (sinfo); CI runs "
                                 "../shared/tools/setup-local-slurm.sh first")


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20)
    fields: dict[str, str] = {}
    for line in out.stdout.splitlines():      # one line per array task; keep the first and the states of all
        for key, value in re.findall(r"(\w+)=(\S*)", line):
            fields.setdefault(key, value)
        fields.setdefault("_states", "")
        fields["_states"] += re.search(r"JobState=(\S+)", line).group(1) + " " if "JobState=" in line else ""
    return fields


def _wait_job(job: str, timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(job)
        states = info.get("_states", "").split()
        if states and all(s in FINAL for s in states):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not finished after {timeout}s: {_job(job)}")


def _submit(cwd: Path, env: dict[str, str], script: str, *options: str) -> str:
    out = subprocess.run([str(JOBS / "submit.sh"), "--parsable", *options, str(JOBS / script)], cwd=cwd,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _same(a: Path, b: Path) -> None:
    ra, rb = read_result(a), read_result(b)
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    for name in ra["params"]:
        np.testing.assert_array_equal(ra["params"][name], rb["params"][name], err_msg=name)
    for name in ra["history"]:
        if name != "seconds":
            np.testing.assert_array_equal(ra["history"][name], rb["history"][name], err_msg=name)


CONFIG = """\
input:
  path: builtin:demo
model:
  H: 12
truncation:
  S: 8
  parents: 4
training:
  epochs: 30
estimation:
  epochs: 3
checkpoint:
  every_epochs: 2
  every_seconds: 0
output:
  path: results/out.h5
"""


#: runs `touch PWNED` wherever a job script lets the shell expand it, and is changed by word splitting, quote
#: removal, globbing, tilde or parameter expansion, a '}' ending ${...:-...}, or a '#' starting a comment
HOSTILE = "a $(touch PWNED) `touch PWNED` 'q' \"d\" #1 * ~ ${HOME} \\"


def _submit_long_requeue(tmp_path: Path, config: str, name: str) -> tuple[str, Path]:
    """Submit jobs/long_requeue.sbatch on 2 ranks for ``config``; returns the job id and its checkpoint path."""
    (tmp_path / "run.yaml").write_text(config)
    env = {"CONFIG": "run.yaml", "OUTDIR": "results", "WORKDIR": str(tmp_path), "MAX_RESTARTS": "3"}
    job = _submit(tmp_path, env, "long_requeue.sbatch", "--ntasks=2", "--mem-per-cpu=400M", "--time=10:00",
                  f"--job-name={name}")
    return job, tmp_path / "results" / "out.ckpt.h5"


def _wait_for_checkpoint(job: str, ckpt, timeout: float = 60.0) -> None:
    """Poll until the running job has written its first checkpoint; fail if the job ends first."""
    end = time.monotonic() + timeout
    while not ckpt.exists():
        state = _job(job).get("JobState", "")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), f"job {job} ended early: {state}"
        assert time.monotonic() < end, f"no checkpoint after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow
@needs_slurm
def test_long_requeue_checkpoints_requeues_resumes_and_matches_uninterrupted_run(tmp_path):
    job, ckpt = _submit_long_requeue(tmp_path, CONFIG, "ckpt-test")
    reference = None
    try:
        _wait_for_checkpoint(job, ckpt)
        # the warning signal that --signal=B:USR1@... would send near the time limit
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=20)
        # meanwhile (the requeued job waits ~10 s before it starts again) the uninterrupted run, same 2 ranks
        reference = subprocess.Popen(["mpiexec", "-n", "2", "hpc-zsem", "run", "run.yaml", "--threads", "1",
                                      "--set", "output.path=results/ref.h5"], cwd=tmp_path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        info = _wait_job(job, timeout=120)
        assert reference.wait(timeout=120) == 0
    finally:
        subprocess.run(["scancel", job], timeout=20)
        if reference is not None and reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
    log = (tmp_path / "logs" / f"ckpt-test-{job}.out").read_text()      # --open-mode=append: both starts
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", (info, log)
    assert "start 1 (restart 0)" in log and "start 2 (restart 1)" in log, log
    assert "batch shell got SIGUSR1" in log and f"requeueing job {job}" in log, log
    stopped = re.search(r"stopped on request after train epoch (\d+)", log)
    assert stopped, log
    assert f"resuming from results/out.ckpt.h5 at training epoch {stopped.group(1)} (written by 2 rank(s)" in log
    assert int(stopped.group(1)) < 30, "the signal came too late to test a resume of training"
    assert not ckpt.exists() and not (tmp_path / "results" / "out.ckpt.prev.h5").exists()
    meta = read_result(tmp_path / "results" / "out.h5")["metadata"]
    assert meta["ranks"] == 2 and meta["resumed_from"].startswith("results/out.ckpt.h5")
    _same(tmp_path / "results" / "ref.h5", tmp_path / "results" / "out.h5")


def _has_partition(name: str) -> bool:
    out = subprocess.run(["sinfo", "-h", "-p", name, "-o", "%P"], capture_output=True, text=True, timeout=10)
    return out.returncode == 0 and bool(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(not SLURM_READY or not _has_partition("urgent"),
                    reason="needs the preempting 'urgent' partition of setup-local-slurm.sh")
def test_long_requeue_survives_preemption(tmp_path):
    """A job in 'urgent' preempts it (PreemptMode=REQUEUE, GraceTime): slurmstepd sends SIGTERM to the tasks,
    which checkpoint within the grace time and exit 75; the job is requeued and resumes."""
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=10).stdout.split()[0]
    job, ckpt = _submit_long_requeue(tmp_path, CONFIG.replace("epochs: 30", "epochs: 50"), "preempt-test")
    urgent = None
    try:
        _wait_for_checkpoint(job, ckpt)
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", f"--ntasks={cpus}", "--mem-per-cpu=50M",
                                 "--output=/dev/null", "--wrap", "sleep 2"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        reference = subprocess.run(["mpiexec", "-n", "2", "hpc-zsem", "run", "run.yaml", "--threads", "1", "--set",
                                    "output.path=results/ref.h5"], cwd=tmp_path, capture_output=True, timeout=120)
        assert reference.returncode == 0
        info = _wait_job(job, timeout=120)
    finally:
        subprocess.run(["scancel", job] + ([urgent] if urgent else []), timeout=20)
    log = (tmp_path / "logs" / f"preempt-test-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "received SIGTERM" in log and "second SIGTERM" not in log, log
    stopped = re.search(r"stopped on request after train epoch (\d+)", log)
    assert stopped and f"at training epoch {stopped.group(1)} (written by 2 rank(s)" in log, log
    _same(tmp_path / "results" / "ref.h5", tmp_path / "results" / "out.h5")


@pytest.mark.slow
@needs_slurm
def test_array_runs_one_task_per_image(tmp_path):
    demo = read_plane("builtin:demo")
    # an image name that must reach `hpc-zsem run` literally (`--set` takes text keys literally, " #" included)
    names = ["left", "right " + HOSTILE]
    tifffile.imwrite(tmp_path / f"{names[0]}.tif", demo[:48, :48])
    tifffile.imwrite(tmp_path / f"{names[1]}.tif", demo[-48:, -48:])
    (tmp_path / "images.txt").write_text("".join(f"{name}.tif\n" for name in names))
    (tmp_path / "run.yaml").write_text(CONFIG.replace("epochs: 30", "epochs: 3"))
    env = {"CONFIG": "run.yaml", "LIST": "images.txt", "OUTDIR": "out", "WORKDIR": str(tmp_path)}
    job = _submit(tmp_path, env, "array.sbatch", "--array=1-2", "--ntasks=1", "--mem-per-cpu=400M",
                  "--time=10:00", "--job-name=array-test")
    try:
        info = _wait_job(job, timeout=120)
    finally:
        subprocess.run(["scancel", job], timeout=20)
    logs = {n: (tmp_path / "logs" / f"array-test-{job}_{i}.out").read_text() for i, n in enumerate(names, 1)}
    assert info["_states"].split() == ["COMPLETED", "COMPLETED"], (info, logs)
    for i, name in enumerate(names, 1):
        assert f"task {i}: {name}.tif -> out/{name}.h5" in logs[name], logs[name]
        result = read_result(tmp_path / "out" / f"{name}.h5")
        assert result["mean"].shape == (48, 48) and result["metadata"]["input_path"].endswith(f"{name}.tif")
        local = tmp_path / f"local-{name}.h5"
        subprocess.run(["hpc-zsem", "run", "run.yaml", "--threads", "1", "--set", f"input.path={name}.tif",
                        "--set", f"output.path={local}"], cwd=tmp_path, check=True, timeout=120,
                       capture_output=True)
        _same(local, tmp_path / "out" / f"{name}.h5")


def _slurm(cwd: Path, config: str, *args: str) -> subprocess.CompletedProcess:
    """`hpc-zsem slurm CONFIG ARGS...` in ``cwd``."""
    return subprocess.run(["hpc-zsem", "slurm", config, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _render(tmp_path: Path, *args: str, config: str = "run.yaml") -> str:
    out = _slurm(tmp_path, config, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _hostile_config(tmp_path: Path, epochs: int) -> tuple[str, str]:
    """Write CONFIG (``epochs`` training epochs) under a HOSTILE file name, with a HOSTILE output directory;
    returns (config file name, output.path)."""
    config, output = f"{HOSTILE}.yaml", f"out/{HOSTILE}/x.h5"
    text = CONFIG.replace("epochs: 30", f"epochs: {epochs}").replace("results/out.h5", json.dumps(output))
    (tmp_path / config).write_text(text)
    return config, output


FAKE_SRUN = r"""#!/bin/bash
# stands in for srun: records its arguments and the thread settings, drops srun's options, runs the rest if asked
printf '%s\0' "$@" > "$FAKE_SRUN_LOG"
env | grep -E '^((OMP|OPENBLAS|MKL|NUMBA)_NUM_THREADS|SRUN_CPUS_PER_TASK)=' > "$FAKE_SRUN_LOG.env"
while [[ $1 == -* ]]; do shift; done
if [ "$FAKE_SRUN_EXEC" = 1 ]; then exec "$@"; fi
"""


def _run_as_job(script: Path, cwd: Path, execute: bool, cpus: int = 1,
                **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict[str, str]]:
    """Run a job script with bash as SLURM would start it (SLURM_* variables faked, ``cpus`` per task) with a
    stand-in srun that runs the command only if ``execute``; returns the process, srun's arguments and the
    thread variables srun saw. Works without SLURM."""
    bin_dir = cwd / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    log = cwd / "srun.args"
    template_variables = ("CONFIG", "SET", "WORKDIR", "OUTDIR", "SETUP", "SRUN_MPI", "LIST", "MAX_RESTARTS")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in template_variables}
    fake = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SRUN_LOG": str(log), "FAKE_SRUN_EXEC": str(int(execute)),
            "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_NTASKS": "1",
            "SLURM_CPUS_PER_TASK": str(cpus), "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_SUBMIT_DIR": str(cwd)}
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env={**base, **fake, **env}, capture_output=True,
                          text=True, timeout=120)
    argv = log.read_text().split("\0")[:-1] if log.exists() else []
    seen = dict(line.split("=", 1) for line in log.with_name("srun.args.env").read_text().split()) \
        if log.exists() else {}
    return proc, argv, seen


def test_slurm_command_fills_only_sbatch_lines_and_variables(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    text = _render(tmp_path, "--ranks", "6", "--time", "1-00:00:00", "--set", "model.H=64")
    original = (JOBS / "long_requeue.sbatch").read_text().splitlines()
    lines = text.splitlines()
    assert "#SBATCH --ntasks=6" in lines and "#SBATCH --time=1-00:00:00" in lines
    assert "#SBATCH --signal=B:USR1@300" in lines and "#SBATCH --requeue" in lines
    assert "CONFIG=${CONFIG:-run.yaml}" in text and "OVERRIDES=(--set model.H=64)" in text
    assert "SET=${SET:-}" in text and "OUTDIR=${OUTDIR:-results}" in text
    mem = re.search(r"#SBATCH --mem-per-cpu=(\d+)M", text)
    assert mem and 150 <= int(mem.group(1)) <= 1000
    assert "6 rank(s) × 1 thread(s) per rank" in lines[1] and "= 6 cores on 1 node(s)" in lines[1]
    assert re.search(r"memory estimate \d+ MB per rank", lines[2])
    changed = [line for line in lines[3:] if line not in original]
    assert all(line.startswith(("#SBATCH", "CONFIG=", "OVERRIDES=", "OUTDIR=")) for line in changed), changed
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    multi = _render(tmp_path, "--template", "multi_node", "--ranks", "8", "--nodes", "2")
    assert "#SBATCH --ntasks-per-node=4" in multi and "#SBATCH --nodes=2" in multi and "--ntasks=" not in multi
    # a mosaic run trains on its sample only: the estimate counts those patches, not every patch of the image
    whole = int(re.search(r"(\d+) training patches", lines[2]).group(1))
    sampled = _render(tmp_path, "--ranks", "6", "--set", "model.H=64", "--set", "training.max_patches=500")
    assert "500 training patches" in sampled and whole > 500
    assert int(re.search(r"--mem-per-cpu=(\d+)M", sampled).group(1)) <= int(mem.group(1))


@pytest.mark.parametrize("value", [HOSTILE, "", "'", "}", "a}'b", "-n", "plain/name.yaml", "x\\"])
def test_variable_lines_keep_any_value_literally(tmp_path, value):
    """``NAME=${NAME:-'…'}`` gives exactly the value (or the environment's), ``NAME=(…)`` exactly the items."""
    script = (f"{assignment('X', value)}  # comment\n{assignment('A', [value, 'b c', '--set'])}\n"
              "printf '%s\\0' \"$X\" \"${A[@]}\"\n")
    for env, x in (({}, value), ({"X": "from the environment"}, "from the environment")):
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"PATH": os.environ["PATH"], **env},
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0 and out.stdout.split("\0")[:-1] == [x, value, "b c", "--set"], out
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("template", TEMPLATES)
def test_rendered_script_passes_hostile_values_literally(tmp_path, template):
    """Config name, output directory, --set overrides (and the array's image path) with $(…), backticks,
    quotes, '#', '}', spaces and globs reach `hpc-zsem run` each as one literal argument; nothing runs."""
    config, output = _hostile_config(tmp_path, epochs=2)
    overrides = ["--set", f"checkpoint.path=ck/{HOSTILE}.h5", "--set", "input.crop=[0, 64, 0, 64]"]
    text = _render(tmp_path, "--template", template, "--ranks", "2", "--cpus-per-task", "3", *overrides,
                   config=config)
    assert "2 rank(s) × 3 thread(s) per rank (--cpus-per-task, hpc-zsem run --threads) = 6 cores" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    (tmp_path / "job.sh").write_text(text)
    (tmp_path / "images.txt").write_text(f"img/{HOSTILE}.tif\r\n")     # the array's list, saved on Windows
    proc, argv, threads = _run_as_job(tmp_path / "job.sh", tmp_path, execute=False, cpus=3,
                                      SET="--set model.H=6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = ["--mpi=pmi2", "--kill-on-bad-exit=1", "hpc-zsem", "run", config, "--threads", "3", *overrides,
                "--set", "model.H=6"]
    if template == "array":
        expected += ["--set", f"input.path=img/{HOSTILE}.tif", "--set", f"output.path=out/{HOSTILE}/{HOSTILE}.h5"]
    assert argv == expected
    assert threads == dict.fromkeys(["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                     "NUMBA_NUM_THREADS", "SRUN_CPUS_PER_TASK"], "3")
    assert (tmp_path / output).parent.is_dir() and not list(tmp_path.rglob("PWNED"))


def test_rendered_script_writes_the_literal_output_path(tmp_path):
    """The script body run by bash outside SLURM (srun standing in), `hpc-zsem run` for real."""
    config, output = _hostile_config(tmp_path, epochs=2)
    (tmp_path / "job.sh").write_text(_render(tmp_path, "--ranks", "1", "--set", "input.crop=[0, 48, 0, 48]",
                                             config=config))
    proc, _, _ = _run_as_job(tmp_path / "job.sh", tmp_path, execute=True)
    assert proc.returncode == 0 and "hpc-zsem exited with code 0" in proc.stdout, proc.stdout + proc.stderr
    assert read_result(tmp_path / output)["mean"].shape == (48, 48)
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("config, args, message", [
    ("run.yaml", ["--cpus-per-task", "0"], "--cpus-per-task: expected a positive integer, got 0"),
    ("run.yaml", ["--nodes", "0"], "--nodes: expected a positive integer, got 0"),
    ("run.yaml", ["--ranks", "0"], "--ranks: expected a positive integer, got 0"),
    ("run.yaml", ["--ranks", "-2"], "--ranks: expected a positive integer, got -2"),
    ("run.yaml", ["--ranks", "2", "--nodes", "3"], "--nodes 3: expected at most --ranks (2) nodes"),
    ("run.yaml", ["--time", "banana"], "--time: expected a time limit > 0 as minutes, "),
    ("run.yaml", ["--time", "0:00"], "--time: expected a time limit > 0 as minutes, "),
    ("run.yaml", ["--time", "1:00\ntouch PWNED"], "--time: expected a time limit > 0 as minutes, "),
    ("run.yaml", ["--set", "checkpoint.path=a\ntouch PWNED"], "--set: 'checkpoint.path=a\\ntouch PWNED' holds a "
                                                              "newline"),
    ("run\n.yaml", [], "config: 'run\\n.yaml' holds a newline"),
])
def test_slurm_refuses_bad_values_with_one_line(tmp_path, config, args, message):
    (tmp_path / config).write_text(CONFIG)
    out = _slurm(tmp_path, config, *args)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out
    assert out.stderr.startswith(f"hpc-zsem: error: {message}"), out.stderr


def test_slurm_accepts_every_slurm_time_format(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "run.yaml")
    for limit in ("90", "90:30", "24:00:00", "2-12", "2-12:30", "2-12:30:00"):
        text = render("run.yaml", config, "single_node", 2, 1, limit, 1, [])
        assert f"\n#SBATCH --time={limit}\n" in text


def test_slurm_refuses_impossible_memory_and_warns_about_huge(tmp_path):
    """Per node: > 16 TiB refused, > 1 TiB printed with a warning; both name the keys that drive the estimate."""
    (tmp_path / "run.yaml").write_text(CONFIG)
    # every rank holds one E-step block of all patches with 4·10⁶ children each: ≈ 0.9 TiB
    huge = ["--set", "model.H=1024", "--set", "training.block_size=1048576", "--set", "truncation.S=10000",
            "--set", "truncation.children=1000", "--set", "truncation.generations=1000", "--ranks", "32"]
    refused = _slurm(tmp_path, "run.yaml", *huge)                   # ≈ 28 TiB on one node
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused
    assert "TiB per node (32 rank(s)" in refused.stderr and "E-step temporaries" in refused.stderr
    assert "training.block_size, truncation.S" in refused.stderr and "--nodes" in refused.stderr
    spread = _slurm(tmp_path, "run.yaml", *huge, "--nodes", "2")    # ≈ 14 TiB on each of two nodes
    assert spread.returncode == 0 and re.match(r"hpc-zsem: warning: the memory request is [\d.]+ TiB per node "
                                               r"\(16 rank\(s\)", spread.stderr), spread.stderr
    assert spread.stderr.count("\n") == 1 and "model.H" in spread.stderr and "--mem-per-cpu=" in spread.stdout
    assert _slurm(tmp_path, "run.yaml").stderr == ""


@pytest.mark.slow
@needs_slurm
@pytest.mark.parametrize("template", ["single_node", "multi_node"])
def test_rendered_script_runs(tmp_path, template):
    """`hpc-zsem slurm` output submitted as it is (multi_node on the one node there is), for a config file and
    an output directory whose names would run `touch PWNED` if the script let the shell expand them."""
    config, output = _hostile_config(tmp_path, epochs=2)
    script = tmp_path / "job.sbatch"
    script.write_text(_render(tmp_path, "--template", template, "--ranks", "2", "--nodes", "1", "--time", "5:00",
                              config=config))
    env = {**os.environ, "WORKDIR": str(tmp_path)}
    (tmp_path / "logs").mkdir()
    out = subprocess.run(["sbatch", "--parsable", "--job-name=single-test", str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    try:
        info = _wait_job(job, timeout=120)
    finally:
        subprocess.run(["scancel", job], timeout=20)
    log = (tmp_path / "logs" / f"single-test-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log)
    assert "2 task(s)" in log and "2 rank(s)" in log and "hpc-zsem exited with code 0" in log, log
    assert read_result(tmp_path / output)["metadata"]["ranks"] == 2
    assert not list(tmp_path.rglob("PWNED"))
