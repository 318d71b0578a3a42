"""Shared fixtures: small real EM crops with synthetic noise, a helper to read one image plane, and a helper to
run the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parent.parent
SHARED_ISBI = REPO.parent / "shared" / "data" / "isbi2012_sstem_30x512x512.tif"
DEMO_CLEAN = REPO / "hpc_zsem" / "data" / "demo_clean.tif"


def psnr(estimate, clean, data_range=255.0):
    return 10 * np.log10(data_range**2 / np.mean((np.asarray(estimate, float) - clean) ** 2))


@pytest.fixture(scope="session")
def em_crop(tmp_path_factory):
    """(clean, noisy path): a 64×64 crop of a real EM section (the shared ISBI stack if present, else the
    packaged demo crop) with Gaussian noise σ = 25, written as a float32 TIFF."""
    if SHARED_ISBI.exists():
        clean = tifffile.imread(SHARED_ISBI, key=1)[200:264, 220:284].astype(np.float64)
    else:
        clean = tifffile.imread(DEMO_CLEAN)[32:96, 32:96].astype(np.float64)
    noisy = clean + np.random.default_rng(7).normal(0, 25, clean.shape)
    path = tmp_path_factory.mktemp("em") / "noisy.tif"
    tifffile.imwrite(path, noisy.astype(np.float32))
    return clean, path


def read_plane(path, section=None, crop=None, downsample=1) -> np.ndarray:
    """One plane of an input image as float64, through the package's reader
    (``open_source(path, section, crop=crop, downsample=downsample).read_section()``). A stack is a volume
    there; a plane of it needs ``section`` (ValueError without one)."""
    from hpc_zsem.io.regions import open_source

    with open_source(path, section, crop=crop, downsample=downsample) as source:
        if source.ndim != 2:
            raise ValueError(f"{path}: a stack of {source.n_sections} sections; pass section=")
        return source.read_section()


def write_old_result(path) -> bytes:
    """A small but real earlier hpc_zsem result at ``path`` (what --overwrite may replace); its bytes."""
    from hpc_zsem.io.volumes import write_result

    image = np.arange(64.0).reshape(8, 8)
    write_result(path, mean=image, variance=image, noisy=image, params={}, history={}, metadata={})
    return Path(path).read_bytes()


def cli_env(threads=1):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    return env


def run_cli(args, ranks=None, timeout=300, cwd=None):
    """Run ``hpc-zsem ARGS`` (under ``mpiexec -n RANKS`` if given) with a timeout; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "hpc_zsem", *map(str, args)]
    if ranks is not None:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)


class StopAtCheck:
    """A stop flag that turns true at its n-th check (what a signal would do): the pipeline checks it once per
    epoch, and once per round of tiles in a streamed estimation pass."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __bool__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n
