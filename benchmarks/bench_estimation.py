"""What the estimation side can still buy (issue 14): with one trained Θ, the PSNR of the mean image under
variants of the estimation pass, all against the clean reference of bench_quality.py's protocol (same images,
same seeded noise, one core).

Θ comes from one `hpc-zsem run` of --config (kept as --workdir/<image>_<σ>.h5 and reused when present). Then,
patch by patch with that Θ (stride 1, the package's fresh truncated sets and frozen-Θ E-steps):
    epochs      the mean image after e estimation E-steps, for each e in --epochs (the uniform mean: what
                `hpc-zsem run` writes for estimation.epochs = e; the row with the config's e must equal the
                run's own mean image: printed as a check)
    S           the same with a larger truncated set in the estimation only (--S, Θ unchanged)
    weights     at the config's estimation epochs, each pixel the mean of its patches' estimates weighted by a
                per-patch number from the posterior q_n over K_n — 1/(E_q[|s|] + c) (BM3D's aggregation weight
                1/(σ² N_nonzero), which approximates a patch estimate's inverse variance), max_s q_n(s),
                exp(−entropy of q_n) — or per pixel position by a Gaussian window over the patch (BM3D's Kaiser
                window)
    dihedral    the mean of the 8 rotated/flipped copies of the image, each estimated with the same Θ and
                transformed back (a self-ensemble), at --dihedral-epochs E-steps
    Wiener      the run's mean image as the pilot of an empirical Wiener filter of the noisy patches' 2-D DCT
                coefficients (gain p²/(p² + σ²), σ the model's; patches of the model's size, stride 1, averaged
                uniformly or weighted by 1/Σ gain²): BM3D's second step without its block matching
Only the uniform mean is the paper's estimate; the others ask whether a change of the mean image pays.

    python benchmarks/bench_estimation.py --image camera --sigma 25 --workdir /tmp/est \\
        --json benchmarks/results/estimation_camera_25.json
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402
from scipy.fft import dctn, idctn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402

from hpc_zsem.config import load_config  # noqa: E402
from hpc_zsem.estimation import estimation_state  # noqa: E402
from hpc_zsem.models import build_model  # noqa: E402
from hpc_zsem.variational.kernel import posterior, set_threads  # noqa: E402

#: the 8 symmetries of the square: (quarter turns, transposed first)
DIHEDRAL = [(turns, flip) for turns in range(4) for flip in (False, True)]


def all_patches(image, p):
    """Every p×p patch of the image at stride 1, row-major corners, as (n, p²) float64."""
    return np.ascontiguousarray(sliding_window_view(image, (p, p)).reshape(-1, p * p), dtype=np.float64)


def combine(estimates, weights, shape, p):
    """Per pixel Σ w·ŷ / Σ w over the patches covering it (weights per patch (n,) or per patch pixel (n, p²))."""
    ny, nx = shape[0] - p + 1, shape[1] - p + 1
    w = np.broadcast_to(weights.reshape(len(estimates), -1), estimates.shape).reshape(ny, nx, p, p)
    e = estimates.reshape(ny, nx, p, p)
    num, den = np.zeros(shape), np.zeros(shape)
    for i in range(p):
        for j in range(p):
            num[i:i + ny, j:j + nx] += w[:, :, i, j] * e[:, :, i, j]
            den[i:i + ny, j:j + nx] += w[:, :, i, j]
    return num / den


def pilot_wiener(noisy, pilot, sigma, p, weighted):
    """Each p×p patch's 2-D DCT coefficients z shrunk by g = c²/(c² + σ²) (c: the pilot patch's coefficients),
    back-transformed and averaged per pixel, uniformly or with weight 1/Σ g² per patch (BM3D's)."""
    gains = dctn(sliding_window_view(pilot, (p, p)), axes=(2, 3), norm="ortho") ** 2
    gains /= gains + sigma ** 2
    patches = idctn(gains * dctn(sliding_window_view(noisy, (p, p)), axes=(2, 3), norm="ortho"), axes=(2, 3),
                    norm="ortho")
    weights = 1.0 / np.maximum((gains ** 2).sum((2, 3)), 1e-3) if weighted else np.ones(gains.shape[:2])
    return combine(patches.reshape(-1, p * p), weights.ravel(), noisy.shape, p)


def estimate(config, params, Y):
    """The package's estimation of patches Y (global indices 0…n−1; ``estimation_state``, ``model.estimate``):
    estimates (n, D) and, per patch, the posterior's E_q[|s|], max_s q(s) and entropy over its final set."""
    model = build_model(config)
    size = config.training.block_size
    out, ek, qmax, entropy = np.empty_like(Y), np.empty(len(Y)), np.empty(len(Y)), np.empty(len(Y))
    for a in range(0, len(Y), size):
        part, ids = slice(a, a + size), np.arange(a, min(a + size, len(Y)))
        K = estimation_state(config, model, params, Y[part], ids)
        lpj, log_norm = posterior(*model._scorer(Y[part], params), K, 0)[:2]
        q = np.exp(lpj - log_norm[:, None])
        k = np.unpackbits(K.view(np.uint8), axis=-1, bitorder="little").sum(-1)
        ek[part], qmax[part] = (q * k).sum(1), q.max(1)
        entropy[part] = -(q * np.log(np.maximum(q, 1e-300))).sum(1)
        out[part] = model.estimate(Y[part], params, K)
    return out, ek, qmax, entropy


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--image", default="camera", choices=list(bq.IMAGES))
    ap.add_argument("--sigma", type=float, default=25.0)
    ap.add_argument("--config", default="quality")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for the training run")
    ap.add_argument("--workdir", required=True, help="keeps the training run's noisy TIFF and result file")
    ap.add_argument("--epochs", default="10,40,80", help="estimation E-steps to compare")
    ap.add_argument("--S", type=int, default=120, help="a larger truncated set for the estimation (0: skip)")
    ap.add_argument("--dihedral-epochs", type=int, default=10, help="E-steps per copy of the self-ensemble "
                    "(0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    set_threads(1)

    clean = bq.IMAGES[args.image]()
    noisy = clean + np.random.default_rng(bq.noise_seed(args.image, args.sigma)).normal(0.0, args.sigma, clean.shape)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.image}_{args.sigma:g}"
    result = work / f"{tag}.h5"
    rows = []

    def row(name, image, cpu):
        psnr = bq.metrics(image, clean)[0]
        rows.append({"variant": name, "psnr": psnr, "cpu_s": cpu})
        print(f"{name:40s} {psnr:7.3f} dB  {cpu:7.1f} CPU s", flush=True)

    if not result.exists():
        _, _, _, cpu, _, _ = bq.run_hpc_zsem(noisy, args.config, args.set, work, tag=tag)
        print(f"# trained: {bq.config_path(args.config)} in {cpu:.1f} CPU s", flush=True)
    with h5py.File(result) as f:
        params = {key: f["params"][key][()] for key in f["params"]}
        run_mean = f["mean"][:].astype(np.float64)
    def configured(*extra):
        return load_config(bq.config_path(args.config), [*args.set, f"input.path={work / tag}.tif",
                                                         f"output.path={result}", *extra])

    config = configured()
    p = config.patches.size[0]
    e0 = config.estimation.epochs
    row(f"run's mean image (e = {e0})", run_mean, 0.0)
    read = noisy.astype(np.float32).astype(np.float64)                  # the run read a float32 TIFF
    Y = all_patches(read, p)
    shape = noisy.shape
    uniform = np.ones(len(Y))
    for e in sorted({int(x) for x in args.epochs.split(",")} | {e0}):
        t0 = time.process_time()
        est, ek, qmax, entropy = estimate(configured(f"estimation.epochs={e}"), params, Y)
        cpu = time.process_time() - t0
        row(f"uniform, e = {e}", combine(est, uniform, shape, p), cpu)
        if e != e0:
            continue
        for c in (1.0, 4.0):
            row(f"weights 1/(E[k] + {c:g}), e = {e}", combine(est, 1.0 / (ek + c), shape, p), cpu)
        row(f"weights max q, e = {e}", combine(est, qmax, shape, p), cpu)
        row(f"weights exp(-entropy), e = {e}", combine(est, np.exp(-entropy), shape, p), cpu)
        for s in (2.0, 4.0):
            g = np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2.0) / s) ** 2)
            row(f"Gaussian window s = {s:g}, e = {e}", combine(est, np.tile(np.outer(g, g).ravel(), (len(Y), 1)),
                                                             shape, p), cpu)
    if args.S:
        t0 = time.process_time()
        est = estimate(configured(f"truncation.S={args.S}"), params, Y)[0]
        row(f"S = {args.S} in the estimation, e = {e0}", combine(est, uniform, shape, p), time.process_time() - t0)
    if args.dihedral_epochs:
        total, cpu = np.zeros(shape), 0.0
        short = configured(f"estimation.epochs={args.dihedral_epochs}")
        for turns, flip in DIHEDRAL:
            t0 = time.process_time()
            image = np.ascontiguousarray(np.rot90(read.T if flip else read, turns))
            est = estimate(short, params, all_patches(image, p))[0]
            back = np.rot90(combine(est, np.ones(len(est)), image.shape, p), -turns)
            total += back.T if flip else back
            cpu += time.process_time() - t0
        row(f"dihedral ensemble of 8, e = {args.dihedral_epochs}", total / len(DIHEDRAL), cpu)
    for weighted in (False, True):
        row(f"Wiener, mean image as pilot{', weighted' if weighted else ''}",
            pilot_wiener(read, run_mean, np.sqrt(params["sigma2"]), p, weighted),
            0.0)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "image": args.image, "sigma": args.sigma,
                                               "config": str(bq.config_path(args.config)), "sets": args.set,
                                               "sigma_learned": float(np.sqrt(params["sigma2"])), "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
