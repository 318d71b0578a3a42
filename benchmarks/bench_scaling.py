"""Strong scaling of one ES3C epoch on 1 and 2 ranks (one BLAS thread per rank) and the bytes allreduced
per epoch. Setting of issue 2: N = 62,001 patches of 8×8, H = 64, S = 60, 20 parents × 1 child.

    python benchmarks/bench_scaling.py [--ranks 1,2] [--epochs 3]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012_sstem_30x512x512.tif"
REPO = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"epoch (\d+)/\d+ .* ([0-9.]+)s +[0-9]+ patches/s")
ALLREDUCE = re.compile(r"allreduce of ([0-9,]+) bytes per epoch")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    clean = tifffile.imread(ISBI, key=0)[128:384, 128:384].astype(np.float64)
    noisy = clean + np.random.default_rng(0).normal(0, 25, clean.shape)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "noisy.tif"
        tifffile.imwrite(path, noisy.astype(np.float32))
        for ranks in map(int, args.ranks.split(",")):
            cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpc_zsem", "run",
                   str(REPO / "configs" / "quality.yaml"), "--set", f"input.path={path}",
                   "--set", f"output.path={Path(tmp) / f'r{ranks}.h5'}", "--set", f"training.epochs={args.epochs}",
                   "--set", "estimation.epochs=0", "--set", "truncation.children=1",
                   "--set", "truncation.generations=1",
                   "--set", "checkpoint.every_epochs=0", "--threads", "1"]
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            log = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            seconds = [float(m.group(2)) for m in EPOCH.finditer(log)]
            timings[ranks] = float(np.mean(seconds[1:] or seconds))   # the first epoch also warms caches
            moved = ALLREDUCE.search(log)
            print(f"{ranks} rank(s): {timings[ranks]:.2f} s per epoch (mean of epochs 2..{args.epochs}), "
                  f"speed-up {timings[min(timings)] / timings[ranks]:.2f}; "
                  f"{moved.group(1) if moved else '?'} bytes allreduced per epoch", flush=True)


if __name__ == "__main__":
    main()
