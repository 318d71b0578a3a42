"""training.epochs: auto — training stops when the free energy per patch pixel changes by less than
stop_tolerance per epoch over stop_window epochs (at most max_epochs); the stop resumes and is rank-independent."""
import shutil

import numpy as np
import pytest

from conftest import REPO, StopAtCheck, run_cli
from hpc_zsem.config import ConfigError, load_config
from hpc_zsem.io import checkpoint as ck
from hpc_zsem.io.results import read_result
from hpc_zsem.parallel import SerialComm
from hpc_zsem.pipeline import run
from hpc_zsem.signals import StopRequested

DEMO = REPO / "configs" / "demo.yaml"
SMALL = ["input.crop=[0, 64, 0, 64]", "model.H=12", "truncation.S=8", "truncation.parents=4",
         "patches.size=[6,6]", "estimation.epochs=1", "training.epochs=auto", "training.stop_window=3",
         "training.stop_tolerance=0.01", "training.max_epochs=60", "checkpoint.every_epochs=1"]


def _config(tmp_path, *extra, name="out.h5"):
    return load_config(DEMO, SMALL + [f"output.path={tmp_path / name}", *extra])


def _rule_holds(free_energy, window, tolerance, D):
    return abs(free_energy[-1] - free_energy[-1 - window]) / (window * D) < tolerance


def test_auto_stops_at_the_first_epoch_that_meets_the_rule(tmp_path):
    config = _config(tmp_path)
    run(config, SerialComm())
    F = list(read_result(config.output.path)["history"]["free_energy"])
    D = 36
    assert 3 < len(F) < 60
    assert _rule_holds(F, 3, 0.01, D)
    assert not any(_rule_holds(F[:t], 3, 0.01, D) for t in range(4, len(F)))


def test_auto_stops_at_max_epochs_with_a_warning(tmp_path, caplog):
    config = _config(tmp_path, "training.stop_tolerance=1e-12", "training.max_epochs=6")
    run(config, SerialComm())
    assert len(read_result(config.output.path)["history"]["epoch"]) == 6
    assert any("not converged after training.max_epochs = 6" in r.message for r in caplog.records)


@pytest.mark.parametrize("stop_at", [2, "estimate"])
def test_auto_resumes_to_the_same_result(tmp_path, stop_at):
    reference = _config(tmp_path, name="ref.h5")
    run(reference, SerialComm())
    epochs = len(read_result(reference.output.path)["history"]["epoch"])
    config = _config(tmp_path)
    checks = stop_at if stop_at != "estimate" else epochs + 1      # the first estimation epoch
    with pytest.raises(StopRequested):
        run(config, SerialComm(), stop=StopAtCheck(checks))
    ckpt = ck.find_resumable(config)
    assert ckpt.stage == ("estimate" if stop_at == "estimate" else "train")
    run(config, SerialComm(), resume=ckpt)
    a, b = read_result(reference.output.path), read_result(config.output.path)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    np.testing.assert_array_equal(a["history"]["free_energy"], b["history"]["free_energy"])


def test_the_stopping_rule_may_change_during_training_but_not_after(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(StopRequested):
        run(config, SerialComm(), stop=StopAtCheck(2))
    looser = _config(tmp_path, "training.stop_tolerance=0.02")
    assert ck.find_resumable(looser).stage == "train"          # still training: the rule may change
    run(looser, SerialComm(), resume=ck.find_resumable(looser))
    epochs = len(read_result(looser.output.path)["history"]["epoch"])
    with pytest.raises(StopRequested):
        run(looser, SerialComm(), overwrite=True, stop=StopAtCheck(epochs + 1))
    assert ck.find_resumable(looser).stage == "estimate"
    with pytest.raises(ConfigError, match="training.stop_tolerance"):
        ck.find_resumable(_config(tmp_path, "training.stop_tolerance=0.03"))


def test_auto_is_refused_for_unknown_words():
    with pytest.raises(ConfigError, match="or 'auto'"):
        load_config(DEMO, ["training.epochs=sometimes", "output.path=x.h5"])


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_auto_stops_at_the_same_epoch_on_one_and_two_ranks(tmp_path):
    results = []
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}.h5"
        args = ["run", DEMO, *[x for kv in SMALL + [f"output.path={out}"] for x in ("--set", kv)]]
        proc = run_cli(args, ranks=ranks, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "training stops after epoch" in proc.stdout
        results.append(read_result(out))
    assert len(results[0]["history"]["epoch"]) == len(results[1]["history"]["epoch"])
    np.testing.assert_allclose(results[0]["mean"], results[1]["mean"], atol=1e-4)
