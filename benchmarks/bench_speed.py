"""Speed of one ES3C training epoch (the hot loop), one rank, one BLAS thread.

The reference setting of issue 2: N = 62,001 patches of 8×8 (a 256×256 image), H = 64, S = 60,
20 parents × 1 child, 1 generation. tvo (PyTorch, CPU) needs 1,609 s per epoch for this here (≈325 µs per
evaluated (patch, state)); target ≤ 40 s.

    python benchmarks/bench_speed.py [--epochs 3] [--H 64] [--S 60] [--profile]

Prints seconds per epoch and µs per (patch, state) evaluation, where an epoch evaluates the S states of
every truncated set (statistics and free energy) plus parents × children × generations new candidates.
"""
import argparse
import time

import numpy as np
import tifffile
from threadpoolctl import threadpool_limits

from hpc_zsem.models.base import PatchSummary
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.parallel import block_ranges
from hpc_zsem.patches import PatchGrid
from hpc_zsem.randomness import PatchRandom
from hpc_zsem.variational.evolution import EvolutionSettings

ISBI = "../shared/data/isbi2012_sstem_30x512x512.tif"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--S", type=int, default=60)
    ap.add_argument("--parents", type=int, default=20)
    ap.add_argument("--children", type=int, default=1)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--mutation", default="random", choices=["random", "sparse"])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    clean = tifffile.imread(ISBI, key=0)[128:384, 128:384].astype(np.float64)
    noisy = clean + np.random.default_rng(0).normal(0, 25, clean.shape)
    grid = PatchGrid(noisy.shape, (8, 8))
    ranges = block_ranges(grid.n_patches, args.block)
    blocks = [grid.extract(noisy, np.arange(a, b)) for a, b in ranges]
    model = SSSC(args.H, EvolutionSettings(S=args.S, parents=args.parents, children=args.children,
                                                     mutation=args.mutation))
    Y_all = np.concatenate(blocks)
    rng = np.random.default_rng(0)
    params = model.init_params(PatchSummary.from_patches(Y_all), Y_all[:10], rng)
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        states = [model.init_block_state(Y, params, PatchRandom(0, 0, 0, np.arange(*r))) for Y, r in zip(blocks, ranges)]
        print(f"N={grid.n_patches} D=64 H={args.H} S={args.S} parents={args.parents} children={args.children}: "
              f"init {time.perf_counter() - t0:.1f}s")
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            total = None
            for i, Y in enumerate(blocks):
                states[i], stats = model.e_step(Y, params, states[i], PatchRandom(0, 1, epoch, np.arange(*ranges[i])))
                total = stats if total is None else {k: total[k] + stats[k] for k in total}
            params = model.m_step(params, total)
            dt = time.perf_counter() - t0
            evaluations = grid.n_patches * (args.S + args.parents * args.children)
            print(f"epoch {epoch + 1}: {dt:.2f} s  ({1e6 * dt / evaluations:.2f} µs per (patch, state); "
                  f"F/N={float(total['free_energy']) / grid.n_patches:.4f}, sigma={np.sqrt(params['sigma2']):.3f}, "
                  f"accepted={int(total['accepted'])})")
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
