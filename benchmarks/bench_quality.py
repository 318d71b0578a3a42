"""Quality benchmark: PSNR of the mean image on ISBI EM slices with Gaussian noise, next to NL-means
(scikit-image, given the TRUE σ; h = 0.8σ, 5×5 patches, distance 6) and BM3D (given the TRUE σ, where the
`bm3d` package is installed; it is not a dependency). hpc_zsem is never told the noise level.

    python benchmarks/bench_quality.py [--cases c256_25,c256_50,full_25,full_50] [--epochs 60] [--ranks 1]

Reference points (slice 0, DESIGN.md §4): σ=25: noisy 20.16, NL-means 24.97, BM3D 26.66 dB;
σ=50: noisy 14.14, NL-means 21.79, BM3D 23.41 dB (512²). Centre 256², σ=25: NL-means 24.85, BM3D 26.56 dB.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import tifffile

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012_sstem_30x512x512.tif"
REPO = Path(__file__).resolve().parents[1]


def psnr(x, clean):
    return 10 * np.log10(255.0**2 / np.mean((np.asarray(x, float) - clean) ** 2))


def nl_means(noisy, sigma):
    from skimage.restoration import denoise_nl_means
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)


def bm3d_true_sigma(noisy, sigma):
    try:
        import bm3d
    except ImportError:
        return None
    return bm3d.bm3d(noisy, sigma_psd=sigma)


def run_hpc_zsem(noisy, args, workdir):
    path = Path(workdir) / "noisy.tif"
    out = Path(workdir) / "result.h5"
    tifffile.imwrite(path, noisy.astype(np.float32))
    cmd = [sys.executable, "-m", "hpc_zsem", "run", str(REPO / "configs" / "quality.yaml"),
           "--set", f"input.path={path}", "--set", f"output.path={out}", "--overwrite",
           "--set", f"training.epochs={args.epochs}"] + [x for kv in args.set for x in ("--set", kv)]
    if args.ranks > 1:
        cmd = ["mpiexec", "-n", str(args.ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1" if args.ranks > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    with h5py.File(out) as f:
        return f["mean"][:], float(np.sqrt(f["params/sigma2"][()])), seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="c256_25,c256_50,full_25,full_50")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    section = tifffile.imread(ISBI, key=0).astype(np.float64)
    crops = {"c256": section[128:384, 128:384], "full": section}
    print(f"{'case':10s} {'noisy':>7s} {'NLmeans':>8s} {'BM3D(σ)':>8s} {'hpc_zsem':>9s} {'σ learned':>10s} {'seconds':>8s}")
    for case in args.cases.split(","):
        crop, sigma = case.split("_")
        clean = crops[crop]
        noisy = clean + np.random.default_rng(0).normal(0, float(sigma), clean.shape)
        bm = bm3d_true_sigma(noisy, float(sigma))
        nlm = nl_means(noisy, float(sigma))
        with tempfile.TemporaryDirectory() as tmp:
            mean, sigma_hat, seconds = run_hpc_zsem(noisy, args, tmp)
        print(f"{case:10s} {psnr(noisy, clean):7.2f} {psnr(nlm, clean):8.2f} "
              f"{(psnr(bm, clean) if bm is not None else float('nan')):8.2f} {psnr(mean, clean):9.2f} "
              f"{sigma_hat:10.2f} {seconds:8.0f}", flush=True)


if __name__ == "__main__":
    main()
