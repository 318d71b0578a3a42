"""Packaging: a wheel (and the sdist) ship the job templates of jobs/ and the presets of configs/, an installed
wheel runs them from any directory, an editable install reads the checkout; ``--preset`` and ``hpc-zsem
config`` on the command line.

Builds run offline (``--no-index --no-build-isolation``: the installed setuptools and wheel) on a copy of the
checkout, so they never write into it (``build/``, ``*.egg-info``). Venvs use ``--system-site-packages`` for
numpy & co. and install hpc_zsem with ``--no-deps``."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hpc_zsem
from hpc_zsem import presets
from hpc_zsem.cli import main
from hpc_zsem.config import load_config, schema_help
from hpc_zsem.slurm import TEMPLATES, template_dir

REPO = Path(__file__).resolve().parents[1]
#: what must ship inside the package, as paths relative to the checkout
SHIPPED = sorted(path.relative_to(REPO) for pattern in ("jobs/*.sbatch", "jobs/*.sh", "jobs/README.md",
                                                         "configs/*.yaml") for path in REPO.glob(pattern))
PRESETS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
#: not part of a source tree (the checkout's own build output, caches, results)
JUNK = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "results", ".pytest_cache",
                              ".hypothesis", ".venv")


def _env() -> dict[str, str]:
    """The environment for child processes: one BLAS thread, nothing that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _check(cmd: list, cwd: Path, timeout: float = 300) -> str:
    """Run ``cmd`` in ``cwd``; its stdout, or a test failure showing its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_env())
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _wheel(source: Path, directory: Path) -> Path:
    """Build a wheel of ``source`` (a project directory or an sdist) into ``directory``, offline."""
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
            directory, source], cwd=directory.parent)
    (wheel,) = directory.glob("hpc_zsem-*.whl")
    return wheel


def _venv(directory: Path, *install: str | Path) -> Path:
    """A venv at ``directory`` seeing the system's site-packages, with ``pip install --no-deps *install`` (pip
    itself comes from the system site-packages); its ``bin`` directory."""
    _check([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", directory], cwd=directory.parent)
    _check([directory / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", *install],
           cwd=directory.parent)
    return directory / "bin"


def _assert_ships_data(names: set[str], prefix: str, read) -> None:
    """Every file of :data:`SHIPPED` is in the archive under ``prefix`` with the checkout's bytes."""
    for rel in SHIPPED:
        assert f"{prefix}{rel.as_posix()}" in names, f"{rel} missing from the archive"
        assert read(f"{prefix}{rel.as_posix()}") == (REPO / rel).read_bytes(), f"{rel} differs from the checkout"


def _copy(directory: Path) -> Path:
    """A copy of the checkout's source tree (no build output or caches) at ``directory/src``."""
    shutil.copytree(REPO, directory / "src", ignore=JUNK)
    return directory / "src"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's source tree, shared by the builds of this module."""
    return _copy(tmp_path_factory.mktemp("packaging"))


@pytest.fixture(scope="module")
def wheel(source) -> Path:
    """A wheel built from the copy of the checkout (what ``pip install .`` builds)."""
    directory = source.parent / "wheel"
    directory.mkdir()
    return _wheel(source, directory)


@pytest.fixture(scope="module")
def installed(wheel) -> Path:
    """The ``bin`` directory of a fresh venv with the wheel installed."""
    return _venv(wheel.parent.parent / "venv", wheel)


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """A working directory that is not the checkout and holds no jobs/ or configs/."""
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    return directory


def test_shipped_list_covers_templates_and_presets():
    assert {f"jobs/{t}.sbatch" for t in TEMPLATES} | {"jobs/submit.sh", "jobs/README.md", "configs/demo.yaml",
                                                       "configs/quality.yaml"} <= {p.as_posix() for p in SHIPPED}


def test_wheel_ships_templates_and_presets(wheel, source):
    with zipfile.ZipFile(wheel) as archive:
        _assert_ships_data(set(archive.namelist()), "hpc_zsem/_data/", archive.read)
    assert not (source / "hpc_zsem" / "_data").exists(), "the build wrote into the source tree"


def test_sdist_carries_sources_and_its_wheel_ships_them(source):
    directory = source.parent / "sdist"
    directory.mkdir()
    _check([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(directory)!r})"],
           cwd=source)
    (sdist,) = directory.glob("hpc_zsem-*.tar.gz")
    top = sdist.name[:-len(".tar.gz")] + "/"
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
        _assert_ships_data(names, top, lambda name: archive.extractfile(name).read())
        assert {top + "setup.py", top + "MANIFEST.in"} <= names
    (directory / "wheel").mkdir()
    with zipfile.ZipFile(_wheel(sdist, directory / "wheel")) as archive:
        _assert_ships_data(set(archive.namelist()), "hpc_zsem/_data/", archive.read)


def test_installed_wheel_has_templates_presets_and_config_outside_checkout(installed, elsewhere):
    python, cli = installed / "python", installed / "hpc-zsem"
    site = Path(_check([python, "-c", "import hpc_zsem, os; print(os.path.dirname(hpc_zsem.__file__))"],
                       cwd=elsewhere).strip())
    assert site.is_relative_to(installed.parent), f"hpc_zsem imported from {site}, not from the venv"
    assert _check([python, "-c", "from hpc_zsem.slurm import template_dir; print(template_dir())"],
                  cwd=elsewhere).strip() == str(site / "_data" / "jobs")
    script = _check([cli, "slurm", "--preset", "demo", "--template", "single_node"], cwd=elsewhere)
    assert script.startswith("#!/bin/bash\n")
    assert f"CONFIG=${{CONFIG:-{shlex.quote(str(site / '_data' / 'configs' / 'demo.yaml'))}}}" in script
    assert _check([cli, "config"], cwd=elsewhere) == schema_help() + "\n"
    assert _check([cli, "config", "--preset", "quality"], cwd=elsewhere) == \
        load_config(REPO / "configs" / "quality.yaml").to_yaml()


@pytest.mark.slow
def test_installed_wheel_runs_a_preset_outside_checkout(installed, elsewhere):
    # tens of seconds: a fresh install compiles its kernels on first use
    _check([installed / "hpc-zsem", "run", "--preset", "demo", "--set", "output.path=out.h5",
            "--set", "training.epochs=1", "--set", "estimation.epochs=1"], cwd=elsewhere)
    assert (elsewhere / "out.h5").is_file()


def test_editable_install_reads_the_checkout(tmp_path, elsewhere):
    source = _copy(tmp_path)
    bin_dir = _venv(source.parent / "venv-editable", "--no-build-isolation", "-e", source)
    (source / "configs" / "new_preset.yaml").write_text((source / "configs" / "demo.yaml").read_text())
    where = _check([bin_dir / "python", "-c", "from hpc_zsem.slurm import template_dir; "
                    "from hpc_zsem.presets import preset_path; "
                    "print(template_dir()); print(preset_path('new_preset'))"],
                   cwd=elsewhere).split()
    assert where == [str(source / "jobs"), str(source / "configs" / "new_preset.yaml")]
    assert not (source / "hpc_zsem" / "_data").exists()


def test_presets_are_the_checkouts_configs():
    assert presets.preset_names() == PRESETS
    assert presets.preset_path("demo").read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()
    assert {rel.name for rel in SHIPPED if rel.parts[0] == "jobs"} <= {p.name for p in template_dir().iterdir()}


@pytest.mark.skipif((Path(hpc_zsem.__file__).parent / "_data").exists(), reason="tests run on an installed wheel")
def test_checkout_falls_back_to_its_own_directories():
    assert template_dir() == REPO / "jobs"
    assert presets.preset_path("demo") == REPO / "configs" / "demo.yaml"


def _one_line_error(capsys, argv: list[str]) -> str:
    """The one-line error of ``hpc-zsem ARGV`` (exit code 2, nothing on stdout)."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("hpc-zsem: error: "), err
    return err


@pytest.mark.parametrize("command", ["run", "slurm"])
def test_config_or_preset_is_required(capsys, command):
    err = _one_line_error(capsys, [command])
    assert "expected a CONFIG file or --preset NAME" in err and ", ".join(PRESETS) in err


@pytest.mark.parametrize("command", ["run", "slurm", "config"])
def test_config_and_preset_together_are_refused(capsys, command, tmp_path):
    assert "not both" in _one_line_error(capsys, [command, str(tmp_path / "x.yaml"), "--preset", "demo"])


@pytest.mark.parametrize("command", ["run", "slurm", "config"])
def test_unknown_preset_is_refused_with_the_names(capsys, command):
    err = _one_line_error(capsys, [command, "--preset", "dmeo"])
    assert "--preset 'dmeo': no such preset" in err and ", ".join(PRESETS) in err


def test_config_set_needs_a_config(capsys):
    assert "--set: needs a CONFIG file or --preset NAME" in _one_line_error(capsys, ["config", "--set", "model.H=8"])


def test_config_prints_schema(capsys):
    assert main(["config"]) == 0
    assert capsys.readouterr().out == schema_help() + "\n"


def test_config_prints_resolved_preset_and_file(capsys):
    assert main(["config", "--preset", "demo", "--set", "model.H=16"]) == 0
    resolved = load_config(REPO / "configs" / "demo.yaml", ["model.H=16"]).to_yaml()
    assert capsys.readouterr().out == resolved
    assert main(["config", str(REPO / "configs" / "demo.yaml"), "--set", "model.H=16"]) == 0
    assert capsys.readouterr().out == resolved


def test_config_errors_are_one_line(capsys):
    _one_line_error(capsys, ["config", "--preset", "demo", "--set", "model.nope=1"])


def test_slurm_preset_uses_the_preset_file(capsys):
    assert main(["slurm", "--preset", "demo", "--template", "single_node"]) == 0
    assert f"CONFIG=${{CONFIG:-{shlex.quote(str(presets.preset_path('demo')))}}}" in capsys.readouterr().out


def test_run_help_points_at_config_command(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "hpc-zsem config" in out and "--preset NAME" in out
