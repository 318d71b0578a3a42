"""The ``hpc-zsem`` command: ``run`` a config, show ``info`` on a result file, ``export`` images, print a
``slurm`` job script, show the ``config`` schema or a resolved config.

Exit codes: 0 success, 2 bad config/input/output (one-line message, nothing written), 1 unexpected error
(traceback; under MPI every rank is aborted), 75 stopped by SIGUSR1/SIGTERM after writing a checkpoint (run
the same command again to resume), 130 Ctrl-C, 141 the reader of the output went away (``| head``), 143 a
second SIGTERM (immediate exit).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import numpy as np

from hpc_zsem import __version__
from hpc_zsem.errors import ConfigError, HpcZsemError

EXIT_INTERRUPTED = 130    # 128 + SIGINT
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("hpc_zsem")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def _cmd_run(args: argparse.Namespace) -> int:
    from hpc_zsem.io.runlock import RunLock

    lock = RunLock()
    try:
        return _run_locked(args, lock)
    finally:
        lock.release()


def _threads(args: argparse.Namespace, config, node_ranks: int) -> int:
    """Kernel threads per rank: --threads, else resources.threads, else ``parallel.default_threads`` for the
    ``node_ranks`` ranks on this node."""
    from hpc_zsem.parallel import default_threads

    return args.threads or config.resources.threads or default_threads(node_ranks)


def _run_locked(args: argparse.Namespace, lock) -> int:
    """``hpc-zsem run``; rank 0 takes ``lock`` (a :class:`~hpc_zsem.io.runlock.RunLock`) on the run's output
    and checkpoint after the cheap checks and before it reads a checkpoint; the caller releases it."""
    from hpc_zsem.config import load_config
    from hpc_zsem.io.checkpoint import check_checkpoint_path, find_resumable
    from hpc_zsem.io.paths import check_run_paths, locked_paths, lock_path
    from hpc_zsem.parallel import get_comm, install_abort_on_exception, limit_blas_threads
    from hpc_zsem.variational.kernel import set_threads
    from hpc_zsem import pipeline, sections, signals

    comm = get_comm()
    install_abort_on_exception(comm)
    stop = signals.install()
    _setup_logging(comm.rank)
    # Expected errors are found on rank 0 and broadcast, so every rank exits with the same message and code.
    outcome: tuple[str, Any] | None = None
    resume = None
    node_ranks = comm.ranks_on_this_node()
    if comm.rank == 0:
        try:
            config = load_config(args.config, args.set)
            check_run_paths(config)
            n_sections = pipeline.preflight(config, args.overwrite, comm.size, _threads(args, config, node_ranks))
            check_checkpoint_path(config)
            lock.acquire([lock_path(p) for _, p in locked_paths(config)])
            per_section = config.training.per_section and n_sections > 1
            if not per_section:
                resume = find_resumable(config, restart=args.restart)
            outcome = ("ok", (config, per_section))
        except HpcZsemError as exc:
            outcome = ("error", str(exc))
    status, payload = comm.bcast(outcome)
    if status == "error":
        if comm.rank == 0:
            print(f"hpc-zsem: error: {payload}", file=sys.stderr)
        return 2
    config, per_section = payload
    threads = set_threads(_threads(args, config, node_ranks))
    if comm.rank == 0:
        logging.getLogger("hpc_zsem").info(
            "%d rank(s) × %d thread(s) per rank%s", comm.size, threads, "" if args.threads or config.resources.threads
            else f" (the CPUs this process may use, shared by the {node_ranks} rank(s) on its node; --threads sets it)")
    # One BLAS thread: the kernel threads take whole blocks (kernel.map_in_order), each with its own BLAS calls
    # (GPMM's E-step is one BLAS product per block), so BLAS threads would only oversubscribe the cores.
    with limit_blas_threads(1):
        try:
            if per_section:
                sections.run_per_section(config, comm, overwrite=args.overwrite, restart=args.restart, stop=stop)
            else:
                pipeline.run(config, comm, overwrite=args.overwrite, resume=resume, stop=stop)
        except signals.StopRequested as exc:
            if comm.rank == 0:
                logging.getLogger("hpc_zsem").info("%s (exit code %d)", exc, exc.exit_code)
            return exc.exit_code
        except HpcZsemError as exc:
            if comm.size > 1:
                lock.release()          # MPI_Abort ends the process before the caller's `finally` could
                comm.abort(f"hpc-zsem: error: {exc}", 2)
            print(f"hpc-zsem: error: {exc}", file=sys.stderr)
            return 2
    return 0


def _cmd_info_checkpoint(path: str) -> int:
    from hpc_zsem.io.checkpoint import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(path)
        integrity = "checksum ok"
    except CheckpointError as exc:
        print(f"hpc-zsem: error: {exc}", file=sys.stderr)
        return 2
    g = ckpt.geometry
    print(f"{path}: hpc_zsem checkpoint at {ckpt.position}, written {ckpt.created} by hpc_zsem {ckpt.version} "
          f"on {ckpt.ranks} rank(s) ({integrity})")
    print(f"  model {ckpt.model}, image {tuple(g['image_shape'])}, {g['n_patches']} patches of {g['patch_size']} "
          f"(stride {g['stride']}, blocks of {g['block_size']}), input {ckpt.input_path} ({ckpt.input_checksum})")
    epochs = len(ckpt.history.get("epoch", []))
    print(f"  {epochs} training epochs done; last free energy per patch {ckpt.free_energy:.6g}; "
          f"run time so far {ckpt.elapsed_seconds:.1f}s")
    states = "none" if ckpt.states is None else f"{ckpt.states.dtype} {tuple(ckpt.states.shape)}"
    print("  params: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in ckpt.params.items()) + f"; states: {states}")
    print(f"  config (hash {ckpt.config_hash}):")
    for line in ckpt.config_yaml.splitlines():
        print("    " + line)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from hpc_zsem.io.checkpoint import is_checkpoint
    from hpc_zsem.io.stores import read_result_summary

    if is_checkpoint(args.file) or ".ckpt." in os.path.basename(args.file):
        return _cmd_info_checkpoint(args.file)
    result = read_result_summary(args.file)
    meta = result["metadata"]
    history = result["history"]
    print(f"{args.file}: hpc_zsem result (format {meta.get('format_version')}), written {meta.get('created')} "
          f"by hpc_zsem {meta.get('version')} on {meta.get('ranks')} rank(s)")
    print(f"  model {meta.get('model')}, image {result['shape']}, {meta.get('n_patches')} patches of "
          f"{meta.get('patch_size')}, input {meta.get('input_path')} ({meta.get('input_checksum')})")
    if history.get("epoch") is not None and len(history["epoch"]):
        models = f" over {len(set(history['section']))} sections, one model each" if "section" in history else ""
        free_energy = history.get("free_energy")
        last = f"{free_energy[-1]:.6g}" if free_energy is not None and len(free_energy) else "n/a"
        print(f"  {len(history['epoch'])} epochs{models}; last free energy per patch {last}"
              f"{_sigma2_text(result['params'])}; runtime {meta.get('runtime_seconds', float('nan')):.1f}s")
    print("  params: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in result["params"].items()))
    print(f"  config (hash {meta.get('config_hash')}):")
    for line in str(meta.get("config", "")).splitlines():
        print("    " + line)
    return 0


def _sigma2_text(params: dict) -> str:
    """σ² of the final parameters (one value, or the range over the sections of a per-section result)."""
    if "sigma2" not in params:
        return ""
    values = np.ravel(params["sigma2"])
    if values.size == 1:
        return f", sigma2 {values[0]:.6g}"
    return f", sigma2 {values.min():.6g}..{values.max():.6g} over {values.size} sections"


def _cmd_slurm(args: argparse.Namespace) -> int:
    from hpc_zsem.config import load_config
    from hpc_zsem.slurm import render

    config = load_config(args.config, args.set)
    print(render(args.config, config, args.template, args.ranks, args.nodes, args.time, args.cpus_per_task,
                 args.set), end="")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    """``hpc-zsem config``: every config key with its default, bounds and meaning; with CONFIG or ``--preset``
    that config fully resolved (defaults filled in, ``--set`` applied) as YAML."""
    from hpc_zsem.config import load_config, schema_help

    if args.config is None:
        if args.set:
            raise ConfigError("--set: needs a CONFIG file or --preset NAME to apply to")
        print(schema_help())
    else:
        print(load_config(args.config, args.set).to_yaml(), end="")
    return 0


def _choose_config(args: argparse.Namespace) -> None:
    """Put the file of ``--preset NAME`` into ``args.config``; a one-line ConfigError (listing the presets)
    unless exactly one of CONFIG and ``--preset`` is given (``hpc-zsem config`` also takes neither)."""
    from hpc_zsem.presets import preset_names, preset_path

    if args.config is not None and args.preset is not None:
        raise ConfigError(f"give a CONFIG file or --preset NAME, not both (got {args.config!r} and --preset "
                          f"{args.preset!r})")
    if args.preset is not None:
        args.config = str(preset_path(args.preset))
    elif args.config is None and args.command != "config":
        raise ConfigError(f"expected a CONFIG file or --preset NAME (presets: {', '.join(preset_names())})")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The optional CONFIG file and ``--preset NAME`` (one of them; see :func:`_choose_config`)."""
    from hpc_zsem.presets import preset_names

    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="YAML config file (all keys, defaults and bounds: hpc-zsem config)")
    parser.add_argument("--preset", metavar="NAME",
                        help=f"a preset from configs/ instead of CONFIG: {', '.join(preset_names())} (its full "
                             "config: hpc-zsem config --preset NAME)")


def _count(lowest: int):
    """An argparse type: an integer >= ``lowest``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from hpc_zsem import export
    from hpc_zsem.config import OVERRIDE_HELP

    parser = argparse.ArgumentParser(prog="hpc-zsem", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpc-zsem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="learn a model of a noisy image and write its mean/variance images",
                         description="Learn a model of a noisy image and write its mean/variance images. Every "
                                     "config key with its default, bounds and meaning: hpc-zsem config; a "
                                     "preset's full config: hpc-zsem config --preset NAME.")
    _add_config_arguments(run)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    run.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    run.add_argument("--restart", action="store_true",
                     help="ignore an existing checkpoint and start afresh (it is replaced when this run writes "
                          "its first checkpoint); by default a run resumes from its checkpoint")
    run.add_argument("--threads", type=_count(0), default=0,
                     help="threads per rank for the E-step kernel (ranks × threads = the cores of the job; "
                          "default: resources.threads, else SLURM's --cpus-per-task, else the CPUs this process may "
                          "use shared by the ranks on its node; results do not depend on it)")
    run.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="show what a result or checkpoint file holds")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)

    slurm = sub.add_parser("slurm", help="print a SLURM job script from jobs/ filled in for a config "
                                          "(ranks, time, memory estimate)")
    _add_config_arguments(slurm)
    slurm.add_argument("--template", default="long_requeue",
                       help="long_requeue (default), single_node, multi_node or array (see jobs/README.md)")
    slurm.add_argument("--ranks", type=int, default=4, help="MPI ranks (default 4)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--cpus-per-task", type=int, default=1,
                       help="cores per rank, passed to hpc-zsem run --threads (default 1)")
    slurm.add_argument("--time", help="walltime, e.g. 24:00:00 (default: the template's)")
    slurm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, also passed on to the job (repeatable)")
    slurm.set_defaults(func=_cmd_slurm)

    config = sub.add_parser("config", help="print every config key with its default, bounds and meaning, or "
                                           "a config (CONFIG or --preset) fully resolved as YAML")
    _add_config_arguments(config)
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    config.set_defaults(func=_cmd_config)

    export.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "preset"):
            _choose_config(args)
        return args.func(args)
    except HpcZsemError as exc:
        print(f"hpc-zsem: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hpc-zsem: interrupted (Ctrl-C); files written so far are complete (checkpoints are atomic): run "
              "the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (e.g. `hpc-zsem info x.h5 | head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
