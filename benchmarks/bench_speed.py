"""Speed of one ES3C training epoch (the hot loop): the compiled E-step kernel against the previous numpy E-step.

The reference setting (issue 2/11): N = 62,001 patches of 8×8 (a 256×256 crop of ISBI slice 0, σ = 25 noise),
S = 60, 20 parents × 1 child, 1 generation, H = 64 and 256, one rank, one BLAS thread. An epoch = one E-step
(posterior statistics of every K_n, free energy, evolutionary search) over all blocks plus the M-step; it
evaluates N·(S + parents·children·generations) (patch, state) pairs. `--children 5 --generations 2` is the search of
configs/quality.yaml (what a quality run spends most of its time on); with `--H 128 --sigma pca --init pca
--slice 15 --warmup 25` the whole quality model on a textured EM crop, whose truncated sets are dense (most
kept states have 4–6 active units instead of ≤ 2).

    python benchmarks/bench_speed.py [--H 64 256] [--repeats 3] [--threads 1 2] [--compare] [--profile]

Prints, per H: µs per (patch, state) and s per epoch (min/median of the repeats, each from the same state),
the achieved GFLOP/s as a share of this run's one-thread fp64 matmul rate, the 2-thread/1-thread speed-up (with
the process CPU time and how much it exceeds the one-thread run's — the cost of running threads: GIL hand-offs,
context switches; the load average says how busy the cores were with other jobs), the
memory (bytes per patch held across epochs; the peak of one block's E-step temporaries, tracemalloc), and with
--compare the same epoch with the previous numpy E-step (tests/reference_es3c.py), the ratio, and whether both
give the same truncated sets and statistics.
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import tifffile
from threadpoolctl import threadpool_limits

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.parallel import block_ranges
from hpc_zsem.patches import PatchGrid
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.variational.evolution import EvolutionSettings
from hpc_zsem.variational.kernel import map_in_order, set_threads

ROOT = Path(__file__).resolve().parent.parent
ISBI = ROOT.parent / "shared" / "data" / "isbi2012_sstem_30x512x512.tif"
sys.path.insert(0, str(ROOT / "tests"))
from reference_es3c import ReferenceSSSC  # noqa: E402


def patches(block: int, section: int = 0):
    clean = tifffile.imread(ISBI, key=section)[128:384, 128:384].astype(np.float64)
    noisy = clean + np.random.default_rng(0).normal(0, 25, clean.shape)
    grid = PatchGrid(noisy.shape, (8, 8))
    ranges = block_ranges(grid.n_patches, block)
    return [grid.extract(noisy, np.arange(a, b)) for a, b in ranges], ranges


def epoch(model, blocks, ranges, params, states, number):
    """One E-step over every block and the M-step; returns (new states, new params, stats)."""
    total, new_states = None, []
    steps = map_in_order(lambda block: model.e_step(block[0], params, block[2], PatchRandom(0, 1, number,
                                                                                          np.arange(*block[1]))),
                         list(zip(blocks, ranges, states)))             # as hpc_zsem.training.Training.e_step
    for K, stats in steps:
        new_states.append(K)
        total = stats if total is None else {k: total[k] + stats[k] for k in total}
    return new_states, model.m_step(params, total), total


def matmul_rate() -> float:
    """GFLOP/s of a one-thread fp64 numpy matmul (1000×1000)."""
    a = np.random.default_rng(0).random((1000, 1000))
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2e9 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def flops_per_epoch(N, D, H, pairs) -> float:
    """Useful FLOPs: B = Y W and S_ysz = Yᵀ⟨s⊙z⟩ (2·N·D·H each) and ~20 per evaluated pair (k ≤ 2 forms)."""
    return 4.0 * N * D * H + 20.0 * pairs


def run_h(args, H, blocks, ranges, rate):
    settings = EvolutionSettings(S=args.S, parents=args.parents, children=args.children, generations=args.generations)
    model = SSSC(H, settings, init=args.init, sigma=args.sigma)
    reference = ReferenceSSSC(H, settings, init=args.init, sigma=args.sigma)
    Y_all = np.concatenate(blocks)
    N, D = Y_all.shape
    sample = Y_all[:10]
    if args.init == "pca":                           # as the pipeline: a sample of up to 2,000 patches
        sample = Y_all[np.random.default_rng(0).choice(N, min(N, 2000), replace=False)]
    params = model.init_params(PatchSummary.from_patches(Y_all), sample, np.random.default_rng(0))
    set_threads(1)
    states = [model.init_block_state(Y, params, PatchRandom(0, 0, 0, np.arange(*r))) for Y, r in zip(blocks, ranges)]
    for e in range(args.warmup):                     # realistic truncated sets and parameters
        states, params, _ = epoch(model, blocks, ranges, params, states, e)
    pairs = N * (args.S + args.parents * args.children * args.generations)

    cpu = {}

    def timing(m, threads):
        set_threads(threads)
        walls = []
        for _ in range(args.repeats):
            process = time.process_time()
            walls.append(_timed(lambda: epoch(m, blocks, ranges, params, states, 99)))
            cpu.setdefault(threads, []).append(time.process_time() - process)
        return walls

    times = {t: timing(model, t) for t in args.threads}
    one = times[args.threads[0]]
    print(f"H={H}: N={N} D={D} S={args.S} parents={args.parents}×{args.children}×{args.generations} generation(s), "
          f"{pairs} (patch, state) per epoch")
    for t, ts in times.items():
        process = min(cpu[t])
        extra = process / min(cpu[args.threads[0]]) - 1.0
        print(f"  kernel, {t} thread(s): {min(ts):.3f} s/epoch min, {statistics.median(ts):.3f} median  "
              f"→ {1e6 * min(ts) / pairs:.4f} µs per (patch, state);  "
              f"{flops_per_epoch(N, D, H, pairs) / min(ts) / 1e9:.2f} GFLOP/s;  CPU {process:.3f} s "
              f"({process / min(ts):.2f} cores busy" + (f", {100 * extra:+.1f} % CPU time over {args.threads[0]} "
                                                       "thread(s)" if t != args.threads[0] else "") + ")")
    print(f"  GFLOP/s share of the one-thread matmul rate ({rate:.1f} GFLOP/s): "
          f"{100 * flops_per_epoch(N, D, H, pairs) / min(one) / 1e9 / rate:.1f} %")
    if len(args.threads) > 1:
        print(f"  speed-up {args.threads[-1]} threads vs {args.threads[0]}: "
              f"{min(one) / min(times[args.threads[-1]]):.2f}× (min), "
              f"{statistics.median(one) / statistics.median(times[args.threads[-1]]):.2f}× (median); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs share them)")
    set_threads(1)
    resident, peak = memory(model, blocks, ranges, params, states)
    print(f"  memory: {resident:.0f} B per patch held across epochs (patch data + packed states); E-step peak "
          f"temporaries {peak / 2**20:.1f} MiB per block of {blocks[0].shape[0]} "
          f"(+{peak / N:.0f} B per patch at this N, flat in N)")
    if args.compare:
        ref = timing(reference, 1)
        set_threads(1)
        print(f"  previous numpy E-step: {min(ref):.3f} s/epoch min, {statistics.median(ref):.3f} median "
              f"→ {1e6 * min(ref) / pairs:.4f} µs per (patch, state);  kernel is {min(ref) / min(one):.1f}× faster "
              f"(median {statistics.median(ref) / statistics.median(one):.1f}×)")
        new, _, stats_new = epoch(model, blocks, ranges, params, states, 99)
        old, _, stats_old = epoch(reference, blocks, ranges, params, states, 99)
        same = all(np.array_equal(a, b) for a, b in zip(new, old))
        rel = max(float(np.max(np.abs(stats_new[k] - stats_old[k]) / np.maximum(np.abs(stats_old[k]), 1e-300)))
                  for k in ("S_s", "S_sz", "S_ysz", "free_energy"))
        print(f"  same truncated sets as the numpy E-step: {same}; max relative difference of the statistics "
              f"S_s, S_sz, S_ysz, F: {rel:.1e}")
    if args.profile:
        import cProfile
        import pstats
        profile = cProfile.Profile()
        profile.runcall(epoch, model, blocks, ranges, params, states, 99)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


def memory(model, blocks, ranges, params, states) -> tuple[float, int]:
    """(bytes per patch of the patches and packed states, tracemalloc's peak of one block's E-step)."""
    resident = (sum(Y.nbytes for Y in blocks) + sum(K.nbytes for K in states)) / sum(Y.shape[0] for Y in blocks)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    model.e_step(blocks[0], params, states[0], PatchRandom(0, 1, 99, np.arange(*ranges[0])))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return resident, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--S", type=int, default=60)
    ap.add_argument("--parents", type=int, default=20)
    ap.add_argument("--children", type=int, default=1)
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--sigma", choices=("learned", "pca"), default="learned", help="model.sigma")
    ap.add_argument("--init", choices=("random", "pca"), default="random", help="model.init")
    ap.add_argument("--slice", type=int, default=0, help="ISBI slice of the 256² crop")
    ap.add_argument("--warmup", type=int, default=2, help="epochs before timing (realistic states)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--compare", action="store_true", help="also time the previous numpy E-step")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    blocks, ranges = patches(args.block, args.slice)
    with threadpool_limits(limits=1):
        rate = matmul_rate()
        for H in args.H:
            run_h(args, H, blocks, ranges, rate)


if __name__ == "__main__":
    main()
