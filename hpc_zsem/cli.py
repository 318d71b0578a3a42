"""The ``hpc-zsem`` command: ``run`` a config, show ``info`` on a result file, ``export`` images.

Exit codes: 0 success, 2 bad config/input/output (one-line message, nothing written), 1 unexpected error
(traceback; under MPI every rank is aborted).
"""
from __future__ import annotations

import argparse
import logging
import sys

from hpc_zsem import __version__
from hpc_zsem.errors import HpcZsemError


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("hpc_zsem")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def _cmd_run(args: argparse.Namespace) -> int:
    from hpc_zsem.config import load_config
    from hpc_zsem.parallel import get_comm, install_abort_on_exception, limit_blas_threads
    from hpc_zsem import pipeline

    comm = get_comm()
    install_abort_on_exception(comm)
    _setup_logging(comm.rank)
    # Expected errors are found on rank 0 and broadcast, so every rank exits with the same message and code.
    outcome = None
    if comm.rank == 0:
        try:
            config = load_config(args.config, args.set)
            pipeline.preflight(config, args.overwrite)
            outcome = ("ok", config)
        except HpcZsemError as exc:
            outcome = ("error", str(exc))
    status, payload = comm.bcast(outcome)
    if status == "error":
        if comm.rank == 0:
            print(f"hpc-zsem: error: {payload}", file=sys.stderr)
        return 2
    with limit_blas_threads(args.threads if args.threads else (1 if comm.size > 1 else None)):
        try:
            pipeline.run(payload, comm, overwrite=args.overwrite)
        except HpcZsemError as exc:
            if comm.size > 1:
                comm.abort(f"hpc-zsem: error: {exc}", 2)
            print(f"hpc-zsem: error: {exc}", file=sys.stderr)
            return 2
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from hpc_zsem.io.results import read_result

    result = read_result(args.file)
    meta = result["metadata"]
    history = result["history"]
    print(f"{args.file}: hpc_zsem result (format {meta.get('format_version')}), written {meta.get('created')} "
          f"by hpc_zsem {meta.get('version')} on {meta.get('ranks')} rank(s)")
    print(f"  model {meta.get('model')}, image {result['mean'].shape}, {meta.get('n_patches')} patches of "
          f"{meta.get('patch_size')}, input {meta.get('input_path')} ({meta.get('input_checksum')})")
    if history.get("epoch") is not None and len(history["epoch"]):
        print(f"  {len(history['epoch'])} epochs; last free energy per patch {history['free_energy'][-1]:.6g}, "
              f"sigma2 {history['sigma2'][-1]:.6g}; runtime {meta.get('runtime_seconds', float('nan')):.1f}s")
    print("  params: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in result["params"].items()))
    print(f"  config (hash {meta.get('config_hash')}):")
    for line in str(meta.get("config", "")).splitlines():
        print("    " + line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hpc_zsem import export

    parser = argparse.ArgumentParser(prog="hpc-zsem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpc-zsem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="learn a model of a noisy image and write its mean/variance images")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set model.H=128 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    run.add_argument("--threads", type=int, default=0,
                     help="BLAS threads per rank (default: 1 under MPI, the library default otherwise)")
    run.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="show what a result file holds")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)

    export.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HpcZsemError as exc:
        print(f"hpc-zsem: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
