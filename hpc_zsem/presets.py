"""Where the SLURM job templates (``jobs/``) and the config presets (``configs/``) are at run time.

An installed wheel carries copies of both in ``hpc_zsem/_data/`` (written by ``setup.py`` at build time, never
committed); an editable install or a checkout has no ``_data`` and reads the top-level ``jobs/`` and
``configs/`` of the source tree, their single source. Both are found through :mod:`importlib.resources`, which
gives file system paths because pip installs packages as files.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from hpc_zsem.errors import ConfigError

#: the source tree of an editable install or checkout (in a wheel install, site-packages: never used there)
CHECKOUT = Path(__file__).resolve().parents[1]


def _data_dir(kind: str) -> Path:
    """The directory of ``kind`` (``"jobs"`` or ``"configs"``): the packaged copy if the package has one (an
    installed package is a directory, so ``resources.files`` gives a ``Path``), else the checkout's."""
    packaged = resources.files("hpc_zsem") / "_data" / kind
    return packaged if isinstance(packaged, Path) and packaged.is_dir() else CHECKOUT / kind


def jobs_dir() -> Path:
    """The directory of the SLURM job templates (``jobs/``)."""
    return _data_dir("jobs")


def preset_names() -> list[str]:
    """The names of the presets: the file stems of ``configs/*.yaml``, sorted."""
    return sorted(path.stem for path in _data_dir("configs").glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; a one-line ConfigError listing the presets if there is none."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"--preset {name!r}: no such preset; expected one of {', '.join(names) or '(none found)'}")
    return _data_dir("configs") / f"{name}.yaml"
