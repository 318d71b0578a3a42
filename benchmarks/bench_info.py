"""Memory of ``hpc-zsem info`` on a large result: it must read metadata only (issue 12: under 100 MB on a
16384² result). Writes a result of the given size — mean, variance and input, float32, smooth synthetic
values — in HDF5 and in OME-Zarr with the package's own writers (the images through ``open_result_store``,
tile by tile), then runs ``hpc-zsem info`` on each in a fresh process and prints its wall time and peak
resident memory (VmHWM), next to that of a process that only imports the package.

    python benchmarks/bench_info.py [--size 16384] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_zsem.io.stores import open_result_store
from hpc_zsem.parallel import SerialComm

TILE = 1024
# VmHWM (the peak resident set of this process image), not ru_maxrss: ru_maxrss survives exec, so a child
# forked from this (large) benchmark process would report the parent's peak
_HWM = "print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
PEAK = ("import sys; from hpc_zsem.cli import main; sys.argv = ['hpc-zsem', 'info', sys.argv[1]]; rc = main(); "
        + _HWM + "; sys.exit(rc)")
IMPORT_ONLY = "import hpc_zsem.cli, hpc_zsem.io.stores, h5py, zarr; " + _HWM


@dataclass(frozen=True)
class Region:
    z: None
    y0: int
    y1: int
    x0: int
    x1: int


def write_result(path: Path, size: int) -> float:
    """A size² result written tile by tile; returns the seconds it took."""
    t0 = time.perf_counter()
    store = open_result_store(SerialComm(), path, (size, size), element_size_um=(0.005, 0.005), extra=("input",),
                              tile=(TILE, TILE))
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    for y0 in range(0, size, TILE):
        for x0 in range(0, size, TILE):
            mean = 100 + 20 * np.sin((yy + y0) / 97.0) * np.cos((xx + x0) / 131.0)
            store.write(Region(None, y0, y0 + TILE, x0, x0 + TILE), mean, 0.1 * mean, input=mean + 1)
    store.set_params({"W": np.zeros((64, 64)), "sigma2": np.array(400.0)})
    store.set_history({"epoch": np.arange(1.0, 51.0), "free_energy": np.linspace(-300, -290, 50)})
    store.set_metadata({"model": "sssc", "version": "bench", "config": "model: {name: sssc}"})
    store.close()
    return time.perf_counter() - t0


def peak_kb(code: str, *args: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB"))
    return int(line.split()[1]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="result of size × size pixels (a multiple of 1024)")
    ap.add_argument("--dir", default=None, help="where to write the two results (removed afterwards)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        base, _ = peak_kb(IMPORT_ONLY)
        print(f"result {args.size}² (mean, variance, input float32 = {3 * 4 * args.size**2 / 2**30:.1f} GiB "
              f"uncompressed); a process that only imports the package: {base / 1024:.0f} MB")
        print(f"{'store':8s} {'write s':>8s} {'info s':>7s} {'info peak MB':>13s}")
        for name in ("result.h5", "result.zarr"):
            seconds = write_result(work / name, args.size)
            peak, wall = peak_kb(PEAK, str(work / name))
            print(f"{Path(name).suffix[1:]:8s} {seconds:8.1f} {wall:7.2f} {peak / 1024:13.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
