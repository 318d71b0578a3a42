"""Mosaic benchmark (issue 5): a tiled BigTIFF with EM-like content (ISBI sections + noise σ = 25), learned on
`training.max_patches` patches, then the streamed estimation pass on 2 ranks. Prints pixels/s per rank, peak
resident memory per rank for each mosaic size (it should stay flat as the mosaic grows), the output size,
and the projected time for a 50-gigapixel mosaic on 1,024 ranks.

    python benchmarks/bench_mosaic.py [--sizes 4096,8192,16384] [--ranks 2] [--max-patches 100000]

Measured on the 2-core development machine (2 ranks): 4096² 3.83e4, 8192² 3.08e4 (other work running),
16384² 4.43e4 pixels/s per rank; peak RSS per rank 248/236, 266/260, 272/255 MB; 16384² takes ~50 min.

The model is deliberately small (H = 16, S = 8, 6×6 patches, 2 frozen-Θ E-steps per patch) so that the
numbers measure the streaming machinery; the cost per pixel scales with the E-step of the chosen model
(see bench_speed.py).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["model.H=16", "truncation.S=8", "truncation.parents=4", "truncation.children=2", "patches.size=[6,6]",
            "training.epochs=5", "estimation.epochs=2", "estimation.tile=[512,512]", "checkpoint.every_epochs=0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,8192,16384")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-patches", type=int, default=100000)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rate = None
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, args.sizes.split(",")):
            mosaic, out = Path(tmp) / f"m{size}.tif", Path(tmp) / f"m{size}.h5"
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_mosaic.py"), "--size", str(size),
                            "--path", str(mosaic)], check=True, stdout=subprocess.DEVNULL)
            cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "hpc_zsem", "run",
                   str(REPO / "configs" / "demo.yaml"), "--set", f"input.path={mosaic}", "--set", f"output.path={out}",
                   "--set", f"training.max_patches={args.max_patches}"]
            for kv in SETTINGS:
                cmd += ["--set", kv]
            t0 = time.perf_counter()
            log = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            seconds = time.perf_counter() - t0
            tiles = re.findall(r"estimation: tiles (\d+)/(\d+), ([0-9.e+]+) pixels/s", log)
            peak = re.search(r"peak resident memory per rank ([0-9/]+) MB", log).group(1)
            rate = float(tiles[-1][2]) / args.ranks
            print(f"{size}x{size}: {size * size / 1e6:.0f} Mpixel, {seconds:.0f} s total, estimation "
                  f"{rate:.3g} pixels/s per rank, peak RSS per rank {peak} MB, input "
                  f"{mosaic.stat().st_size / 2**20:.0f} MiB, output {out.stat().st_size / 2**20:.0f} MiB", flush=True)
    if rate:
        hours = 50e9 / (rate * 1024) / 3600
        print(f"projection: 50 gigapixels on 1,024 ranks at {rate:.3g} pixels/s per rank: {hours:.2f} h "
              "for the estimation pass (this small model)")


if __name__ == "__main__":
    main()
