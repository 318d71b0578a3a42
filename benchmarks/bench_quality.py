"""Quality protocol (issue 14, item 1): hpc_zsem against BM3D, NL-means and Zero-Shot Noise2Noise on images
with a clean reference, additive white Gaussian noise, PSNR and SSIM (skimage.metrics, data_range 255).

Images (256² each, intensities 0–255, float64):
    camera      /work/shared/data/camera_512x512.tif, centre 256²
    astronaut   skimage.data.astronaut(), grayscale (rgb2gray·255, rounded), centre 256²
    coffee      skimage.data.coffee(), grayscale (rgb2gray·255, rounded), centre 256²
    isbi0       ISBI 2012 ssTEM stack, slice 0, centre 256²
    isbi15      ISBI 2012 ssTEM stack, slice 15, centre 256²
The ISBI references are themselves textured: a fine granular texture the generative model partly treats as
noise (difference-based noise estimate of the clean crops: 12.1 for slice 0, 20.8 for slice 15; on the clean
slice 0 the demo model's σ is 18.1 at epoch 5, 8.9 at 40 and 5.7 at 200 — DESIGN.md §5's "σ ≈ 20" is an early-epoch
value), so PSNR against them rewards texture preservation, and the learned σ there sits above the added σ.

Methods (all on ONE core: BLAS/OpenMP/torch threads pinned to 1; CPU seconds are process time):
    noisy       the input
    nlmeans     skimage denoise_nl_means, given the TRUE σ (h = 0.8σ, 5×5 patches, distance 6, fast mode)
    bm3d        the `bm3d` package given the TRUE σ (optional: non-commercial licence, never a dependency of
                hpc_zsem; install it with the `[bench]` extra or `pip install bm3d`; skipped when absent)
    zsn2n       Zero-Shot Noise2Noise (Mansour & Heckel 2023; benchmarks/zs_n2n.py), not told σ; needs torch
                (CPU build: `pip install torch==2.13.0`); skipped when absent
    <config>    hpc_zsem run with configs/<config>.yaml (or a path to a YAML), `--threads 1`,
                OMP_NUM_THREADS=1; not told σ; CPU seconds = the child's user+system time; learned σ =
                sqrt(params/sigma2) of the result file

    python benchmarks/bench_quality.py --images camera,astronaut,coffee,isbi0,isbi15 --sigmas 25,50 \
        --configs demo --methods nlmeans,bm3d,zsn2n --json benchmarks/results/quality_DATE.json
    python benchmarks/bench_quality.py --images camera --sigmas 25 --configs demo --methods none \
        --set model.H=64 --label H64             # a variant of the hpc_zsem runs
    python benchmarks/bench_quality.py --stability isbi0 --sigmas 25 --configs demo --methods none
    python benchmarks/bench_quality.py --images isbi0,isbi15 --sigmas 0 --configs demo --methods none
                                                 # σ = 0: the clean reference itself (what σ does it learn?)
    python benchmarks/bench_quality.py --report benchmarks/results/quality_2026-11-30.json more.json
                                                 # no runs: per method and σ, PSNR per image and mean Δ vs the
                                                 # baselines, from earlier JSONs (a later file's row wins)

The noise seed of (image, σ) is crc32("<image>/<σ>") + --seed-offset, printed with every case; the same
noisy image goes to every method. Results are appended to the JSON after every case (a killed run keeps
what it measured).
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"          # one core for every method, set before numpy is imported

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ISBI = DATA / "isbi2012_sstem_30x512x512.tif"
CAMERA = DATA / "camera_512x512.tif"
SIZE = 256
BASELINES = ("nlmeans", "bm3d", "zsn2n")


def centre_crop(image, size=SIZE):
    y0, x0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[y0:y0 + size, x0:x0 + size], dtype=np.float64)


def _skimage_gray(name):
    import skimage.color
    import skimage.data
    return np.round(skimage.color.rgb2gray(getattr(skimage.data, name)()) * 255.0)


IMAGES = {
    "camera": lambda: centre_crop(tifffile.imread(CAMERA)),
    "astronaut": lambda: centre_crop(_skimage_gray("astronaut")),
    "coffee": lambda: centre_crop(_skimage_gray("coffee")),
    "isbi0": lambda: centre_crop(tifffile.imread(ISBI, key=0)),
    "isbi15": lambda: centre_crop(tifffile.imread(ISBI, key=15)),
}


def noise_seed(image, sigma, offset=0):
    return zlib.crc32(f"{image}/{sigma:g}".encode()) + offset


def metrics(x, clean):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    x = np.asarray(x, np.float64)
    return (float(peak_signal_noise_ratio(clean, x, data_range=255)),
            float(structural_similarity(clean, x, data_range=255)))


# ---------------------------------------------------------------- baselines (each returns image, CPU seconds)
def run_nlmeans(noisy, sigma, args):
    from skimage.restoration import denoise_nl_means
    t0 = time.process_time()
    out = denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return out, time.process_time() - t0


def run_bm3d(noisy, sigma, args):
    import bm3d
    t0 = time.process_time()
    out = bm3d.bm3d(noisy, sigma_psd=sigma)
    return np.asarray(out, np.float64), time.process_time() - t0


def run_zsn2n(noisy, sigma, args):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from zs_n2n import zs_n2n
    return zs_n2n(noisy, steps=args.zsn2n_steps, seed=0, threads=1)


def available(method):
    try:
        __import__({"bm3d": "bm3d", "zsn2n": "torch"}.get(method, "numpy"))
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- hpc_zsem
def config_path(name):
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else REPO / "configs" / f"{name}.yaml"


def run_hpc_zsem(noisy, config, sets, workdir, tag="run"):
    """One `hpc-zsem run` on one core. Returns mean, variance, learned σ, CPU s (child), wall s."""
    inp, out = Path(workdir) / f"{tag}.tif", Path(workdir) / f"{tag}.h5"
    tifffile.imwrite(inp, noisy.astype(np.float32))
    cmd = [sys.executable, "-m", "hpc_zsem", "run", str(config_path(config)), "--threads", "1", "--overwrite",
           "--restart", "--set", f"input.path={inp}", "--set", f"output.path={out}"]
    cmd += [x for kv in sets for x in ("--set", kv)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"hpc-zsem failed ({proc.returncode}): {' '.join(cmd)}\n{log[-3000:]}")
    with h5py.File(out) as f:
        mean, variance = f["mean"][:].astype(np.float64), f["variance"][:].astype(np.float64)
        sigma = float(np.sqrt(f["params/sigma2"][()]))
        epochs = int(len(f["history/epoch"])) if "history/epoch" in f else None
        history = {key: [round(float(v), 6) for v in f[f"history/{name}"][:]]
                   for key, name in (("sigma_history", "sigma2"), ("free_energy_history", "free_energy"),
                                     ("seconds_history", "seconds")) if f"history/{name}" in f}
    if "sigma_history" in history:       # σ at the start of each training epoch (σ² is logged before the M-step)
        history["sigma_history"] = [round(float(np.sqrt(v)), 4) for v in history["sigma_history"]]
    info = {"epochs_trained": epochs, "config_text": config_path(config).read_text(), **history}
    return mean, variance, sigma, usage.ru_utime + usage.ru_stime, wall, info


# ---------------------------------------------------------------- table
HEADER = (f"{'image':10s} {'σ':>3s} {'seed':>10s} {'method':18s} {'PSNR':>6s} {'SSIM':>6s} {'CPU s':>7s} "
          f"{'σ learned':>9s}")


def row_text(r):
    sig = f"{r['sigma_learned']:9.2f}" if r.get("sigma_learned") is not None else f"{'':9s}"
    cpu = f"{r['cpu_s']:7.1f}" if r.get("cpu_s") is not None else f"{'':7s}"
    return (f"{r['image']:10s} {r['sigma']:3g} {r['seed']:10d} {r['method']:18s} {r['psnr']:6.2f} "
            f"{r['ssim']:6.3f} {cpu} {sig}")


def gaps_text(rows, hpc_methods):
    """Per (image, σ): each hpc_zsem run minus each baseline, in dB PSNR (positive: hpc_zsem better)."""
    out = []
    cases = sorted({(r["image"], r["sigma"]) for r in rows}, key=lambda c: (c[1], list(IMAGES).index(c[0])
                                                                           if c[0] in IMAGES else 99))
    for image, sigma in cases:
        by = {r["method"]: r for r in rows if r["image"] == image and r["sigma"] == sigma}
        for m in hpc_methods:
            if m not in by:
                continue
            parts = [f"{b} {by[m]['psnr'] - by[b]['psnr']:+.2f}" for b in BASELINES if b in by]
            out.append(f"{image:10s} σ={sigma:<3g} {m:18s} Δ PSNR vs " + ", ".join(parts)
                       + f"   (σ learned {by[m]['sigma_learned']:.2f} / true {sigma:g})")
    return "\n".join(out)


def write_json(path, meta, rows, stability):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "stability": stability}, indent=1))
        os.replace(tmp, path)


def load_rows(paths):
    """Rows of result JSONs (this script's {"rows": …} files, or {"runs": [{"rows": …}, …]} collections); a later
    row of the same (image, σ, method) replaces an earlier one."""
    out = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for rows in ([run.get("rows", []) for run in data["runs"]] if "runs" in data else [data.get("rows", [])]):
            for r in rows:
                if r.get("psnr") is not None:
                    out[(r["image"], float(r["sigma"]), r["method"])] = r
    return list(out.values())


def report_text(rows):
    """Per method and σ: PSNR per image, mean Δ PSNR vs each baseline present for every image, mean CPU s and
    learned σ; the table of ``--report``."""
    by = {(r["image"], float(r["sigma"]), r["method"]): r for r in rows}
    images = [i for i in IMAGES if any(k[0] == i for k in by)]
    lines = [f"{'method':24s} {'σ':>3s} " + " ".join(f"{i:>9s}" for i in images)
             + "  " + " ".join(f"{'Δ' + b:>9s}" for b in BASELINES) + f" {'CPU s':>7s} {'σ learned':>10s}"]
    methods = sorted({k[2] for k in by if k[2] != "noisy"}, key=lambda m: (m not in BASELINES, m))
    for sigma in sorted({k[1] for k in by}):
        for m in methods:
            have = [i for i in images if (i, sigma, m) in by]
            if not have:
                continue
            cells = " ".join(f"{by[(i, sigma, m)]['psnr']:9.2f}" if (i, sigma, m) in by else f"{'':>9s}"
                             for i in images)
            deltas = []
            for b in BASELINES:
                pairs = [(by[(i, sigma, m)]["psnr"], by[(i, sigma, b)]["psnr"]) for i in have if (i, sigma, b) in by]
                deltas.append(f"{np.mean([a - c for a, c in pairs]):+9.2f}" if len(pairs) == len(have) and m != b
                              else f"{'':>9s}")
            cpu = [by[(i, sigma, m)]["cpu_s"] for i in have if by[(i, sigma, m)].get("cpu_s") is not None]
            sig = [by[(i, sigma, m)]["sigma_learned"] for i in have if by[(i, sigma, m)].get("sigma_learned")]
            lines.append(f"{m:24s} {sigma:3g} {cells}  {' '.join(deltas)} "
                         + (f"{np.mean(cpu):7.0f}" if cpu else f"{'':>7s}")
                         + (f" {min(sig):4.1f}–{max(sig):4.1f}" if sig else ""))
    return "\n".join(lines) + "\n(Δ: mean over the images the method ran on, PSNR dB, method minus baseline)"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        # python benchmarks/bench_quality.py --report a.json b.json …   (no runs: tabulate earlier results)
        print(report_text(load_rows(sys.argv[2:])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", default=",".join(IMAGES), help=f"comma list of {','.join(IMAGES)}")
    ap.add_argument("--sigmas", default="15,25,50")
    ap.add_argument("--configs", default="demo,quality",
                    help="hpc_zsem configs (names in configs/ or YAML paths); 'none' for no hpc_zsem run")
    ap.add_argument("--methods", default=",".join(BASELINES), help="baselines to run; 'none' for none")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed through to every hpc_zsem run (repeatable)")
    ap.add_argument("--label", default="", help="suffix for the hpc_zsem method names (to tell variants apart)")
    ap.add_argument("--zsn2n-steps", type=int, default=2000)
    ap.add_argument("--seed-offset", type=int, default=0, help="added to every noise seed")
    ap.add_argument("--stability", metavar="IMAGE", default=None,
                    help="also run the first config with training.seed 0 and 1 on IMAGE at the first σ and report "
                         "the Pearson correlation of the two variance (and mean) images")
    ap.add_argument("--stability-only", action="store_true", help="skip the main table, run --stability only")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every case)")
    args = ap.parse_args()

    images = [s for s in args.images.split(",") if s]
    unknown = [s for s in images if s not in IMAGES]
    if unknown:
        ap.error(f"unknown image(s) {unknown}; choose from {list(IMAGES)}")
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    configs = [] if args.configs in ("", "none") else args.configs.split(",")
    methods = [] if args.methods in ("", "none") else args.methods.split(",")
    for m in methods:
        if m not in BASELINES:
            ap.error(f"unknown method {m!r}; choose from {BASELINES}")
    skipped = [m for m in methods if not available(m)]
    methods = [m for m in methods if m not in skipped]
    if skipped:
        print(f"# skipped (not installed): {', '.join(skipped)}", flush=True)
    hpc_names = [Path(c).stem + (f"[{args.label}]" if args.label else "") for c in configs]

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv, "host": platform.node(), "python": platform.python_version(),
            "versions": {m: version(m) for m in ("numpy", "skimage", "torch", "hpc_zsem")},
            "bm3d": (__import__("importlib.metadata").metadata.version("bm3d") if available("bm3d") else None),
            "git_head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
            "threads": 1, "crop": SIZE, "images": images, "sigmas": sigmas, "configs": configs,
            "sets": args.set, "zsn2n_steps": args.zsn2n_steps,
            "noise": "clean + N(0, σ²) float64, numpy default_rng(seed), seed = crc32('<image>/<σ>') + offset; "
                     "no clipping of noisy or denoised images",
            "notes": "ISBI references contain fine granular texture (demo model learns σ≈20 on a clean slice): "
                     "PSNR there rewards texture preservation."}
    rows, stability = [], None
    print("# " + " ".join(sys.argv), flush=True)
    print(HEADER, flush=True)
    for sigma in ([] if args.stability_only else sigmas):
        for image in images:
            clean = IMAGES[image]()
            seed = noise_seed(image, sigma, args.seed_offset)
            noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
            base = {"image": image, "sigma": sigma, "seed": seed}

            def add(method, x, cpu=None, sigma_learned=None, **extra):
                p, s = metrics(x, clean)
                r = dict(base, method=method, psnr=p, ssim=s, cpu_s=cpu, sigma_learned=sigma_learned, **extra)
                rows.append(r)
                print(row_text(r), flush=True)
                write_json(args.json, meta, rows, stability)

            add("noisy", noisy)
            for m in methods:
                out, cpu = {"nlmeans": run_nlmeans, "bm3d": run_bm3d, "zsn2n": run_zsn2n}[m](noisy, sigma, args)
                add(m, out, cpu)
            for config, name in zip(configs, hpc_names):
                with tempfile.TemporaryDirectory() as tmp:
                    mean, _, sig, cpu, wall, info = run_hpc_zsem(noisy, config, args.set, tmp)
                add(name, mean, cpu, sig, wall_s=wall, config=str(config_path(config)), sets=args.set, **info)

    if args.stability:
        image, sigma, config = args.stability, sigmas[0], (configs or ["demo"])[0]
        clean = IMAGES[image]()
        seed = noise_seed(image, sigma, args.seed_offset)
        noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
        res = []
        with tempfile.TemporaryDirectory() as tmp:
            for train_seed in (0, 1):
                res.append(run_hpc_zsem(noisy, config, args.set + [f"training.seed={train_seed}"], tmp,
                                        tag=f"seed{train_seed}"))
        r_var = float(np.corrcoef(res[0][1].ravel(), res[1][1].ravel())[0, 1])
        r_mean = float(np.corrcoef(res[0][0].ravel(), res[1][0].ravel())[0, 1])
        stability = {"image": image, "sigma": sigma, "seed": seed, "config": str(config_path(config)),
                     "sets": args.set, "training_seeds": [0, 1], "pearson_variance": r_var, "pearson_mean": r_mean,
                     "psnr": [metrics(x[0], clean)[0] for x in res], "sigma_learned": [x[2] for x in res],
                     "cpu_s": [x[3] for x in res]}
        print(f"\n# stability: {image} σ={sigma:g} (noise seed {seed}), {Path(config).stem}, training.seed 0 vs 1: "
              f"Pearson r(variance) = {r_var:.4f}, r(mean) = {r_mean:.5f}; PSNR "
              f"{stability['psnr'][0]:.2f} / {stability['psnr'][1]:.2f}, σ learned "
              f"{res[0][2]:.2f} / {res[1][2]:.2f}, CPU s {res[0][3]:.0f} / {res[1][3]:.0f}", flush=True)
        write_json(args.json, meta, rows, stability)

    if rows:
        print("\n# full table\n" + HEADER)
        print("\n".join(row_text(r) for r in rows))
        if hpc_names:
            print("\n# gaps (hpc_zsem minus baseline, dB PSNR; positive = hpc_zsem better)")
            print(gaps_text(rows, hpc_names))


if __name__ == "__main__":
    main()
