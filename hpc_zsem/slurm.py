"""``hpc-zsem slurm``: print a job script from ``jobs/`` filled in for a config (ranks, threads, time, memory).

Only the template's ``#SBATCH`` lines and its variable block are changed, so the printed script is the tested
template with other values. A job script is data, not code: every value written into it is validated, and
every value that can hold arbitrary text is shell-quoted (:func:`shlex.quote`):

* ``#SBATCH`` lines cannot be quoted, so their values are checked strictly: positive integers for
  ``--ranks``/``--nodes``/``--cpus-per-task``, one of SLURM's time formats for ``--time``, the computed
  memory request;
* the config file name and the output directory fill ``NAME=${NAME:-'quoted'}`` lines (unquoted assignments:
  the single quotes are removed by the shell, nothing inside them is expanded; inside double quotes
  ``"${NAME:-'x'}"`` would keep them), the ``--set`` overrides the bash array ``OVERRIDES=(--set 'key=value' …)``,
  so each override stays one argument whatever it holds;
* no value may hold a newline or another control character (a newline would end a line of the script).

Layout: ``--ranks`` MPI ranks × ``--cpus-per-task`` threads per rank = cores; the templates pass
``--threads $SLURM_CPUS_PER_TASK`` to ``hpc-zsem run`` and set the BLAS/OpenMP/Numba thread counts to it.

The memory request per CPU is

    (hpc_zsem.resources.memory_per_rank(...)["total"]                 the busiest rank's data and temporaries
     + 3 · n_training · S · ⌈H/64⌉ · 8 B                              SSSC: all truncated sets, gathered on
     + BASELINE) / cpus-per-task, rounded up to 100 MiB                rank 0 for a checkpoint (list + array
                                                                       + the file built in memory)

where n_training is the training set (all patches, ``training.max_patches`` for mosaics, one section with
``training.per_section``) and BASELINE = 150 MiB for the interpreter and its libraries (measured ≈ 62 MiB for
the imports alone; peaks of 127/175 MiB for whole demo runs with H = 32/64 on one rank). A request of more than
:data:`MAX_NODE_MEMORY` per node is refused and one of more than :data:`WARN_NODE_MEMORY` is printed with a
warning; both name the largest part of the estimate and the config keys it grows with.
"""
from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path

from hpc_zsem.errors import InputError

TEMPLATES = ("long_requeue", "single_node", "multi_node", "array")
MB = 2**20
TIB = 2**40
BASELINE = 150 * MB
#: per-node memory requests above this are printed with a warning on stderr
WARN_NODE_MEMORY = 1 * TIB
#: per-node memory requests above this are refused (no node has that much)
MAX_NODE_MEMORY = 16 * TIB
#: SLURM's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
#: days-hours:minutes:seconds
TIME_FORMAT = re.compile(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}")
_IMAGE_KEYS = "the image size (input.path, input.crop, input.downsample; estimation.tile when streaming)"
_PATCH_KEYS = "the training patches (image size, patches.size, patches.stride, training.max_patches)"
#: each part of the memory estimate: (what it is, the config keys it grows with)
PARTS = {
    "patches": ("patch data", f"patches.size and {_PATCH_KEYS}"),
    "truncated_sets": ("truncated sets", f"truncation.S, model.H and {_PATCH_KEYS}"),
    "estep_temporaries": ("E-step temporaries", "training.block_size, truncation.S, truncation.parents × "
                                                "children × generations, model.H"),
    "gpmm_temporaries": ("GPMM temporaries", "training.block_size, model.C"),
    "accumulators": ("pixel accumulators", _IMAGE_KEYS),
    "image": ("image", _IMAGE_KEYS),
    "baseline": ("interpreter and libraries", "the number of ranks per node, not with the config"),
    "gathered": ("truncated sets gathered on rank 0 for a checkpoint", f"truncation.S, model.H and {_PATCH_KEYS}"),
}


def template_dir() -> Path:
    """The job templates: ``jobs/`` as shipped in the package, or of the checkout (:mod:`hpc_zsem.presets`)."""
    from hpc_zsem.presets import jobs_dir

    return jobs_dir()


def memory_estimate(config, ranks: int, threads: int = 1) -> tuple[dict[str, int], int]:
    """(bytes by part of :data:`PARTS` on the busiest rank — ``"gathered"`` only on rank 0 while it writes a
    checkpoint —, training patches) for the config's input (headers only); see the module docstring."""
    from hpc_zsem.resources import COMPONENTS, input_geometry, memory_per_rank

    plane, n_sections = input_geometry(config)
    estimate, n_train = memory_per_rank(config, plane, n_sections, ranks, threads)
    t = config.truncation
    gathered = 3 * n_train * t.S * math.ceil(config.model.H / 64) * 8 if config.model.name == "sssc" else 0
    return {**{c: estimate[c] for c in COMPONENTS}, "baseline": BASELINE, "gathered": gathered}, n_train


def positive(option: str, value) -> int:
    """``value`` if it is an integer ≥ 1, else a one-line InputError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{option}: expected a positive integer, got {value!r}")
    return value


def walltime(value: str) -> str:
    """``value`` if it is a non-zero time limit in one of SLURM's formats (:data:`TIME_FORMAT`), else a one-line
    InputError naming ``--time``."""
    if not TIME_FORMAT.fullmatch(value) or not re.search("[1-9]", value):
        raise InputError(f"--time: expected a time limit > 0 as minutes, minutes:seconds, hours:minutes:seconds, "
                         f"days-hours, days-hours:minutes or days-hours:minutes:seconds (e.g. 90, 24:00:00, "
                         f"2-00:00:00), got {value!r}")
    return value


def script_text(what: str, value: str) -> str:
    """``value`` if it holds no newline or other control character (which would end or garble a line of the job
    script), else a one-line InputError naming ``what``."""
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise InputError(f"{what}: {value!r} holds a newline or another control character; such a value cannot "
                         "be written into a job script")
    return value


def assignment(name: str, value: str | list[str]) -> str:
    """The variable line of a template for ``value``: ``NAME=${NAME:-'value'}`` for a string (the environment
    of sbatch still wins), ``NAME=('item' …)`` for a list; every value shell-quoted."""
    if isinstance(value, list):
        return f"{name}=({' '.join(shlex.quote(v) for v in value)})"
    return f"{name}=${{{name}:-{shlex.quote(value)}}}"


def fill(text: str, sbatch: dict[str, str], variables: dict[str, str | list[str]]) -> str:
    """Replace ``#SBATCH --key=value`` lines (adding missing keys after the last one) and the variable lines
    ``NAME=${NAME:-default}`` (string values) or ``NAME=()`` (list values) by :func:`assignment`. The
    ``sbatch`` values must have been validated: an ``#SBATCH`` line cannot be quoted."""
    lines: list[str | None] = list(text.splitlines())
    done: set[str] = set()
    last = 0
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"#SBATCH\s+--([\w-]+)(=(\S*))?", line)
        if m:
            last = i
            if m.group(1) in sbatch:
                lines[i] = f"#SBATCH --{m.group(1)}={sbatch[m.group(1)]}"
                done.add(m.group(1))
            elif m.group(1) == "ntasks" and "ntasks-per-node" in sbatch or \
                    m.group(1) == "ntasks-per-node" and "ntasks" in sbatch:
                lines[i] = None
                continue
        for name, value in variables.items():
            default = r"\(\)" if isinstance(value, list) else rf"\$\{{{name}:-[^}}]*\}}"
            new, n = re.subn(rf"^{name}={default}", lambda _: assignment(name, value), line)
            if n:
                lines[i] = line = new
                done.add(name)
    missing = [name for name in variables if name not in done]
    if missing:
        raise InputError(f"job template: no variable line for {', '.join(missing)} (jobs/ edited?)")
    extra = [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if k not in done]
    lines[last + 1:last + 1] = extra
    return "\n".join(line for line in lines if line is not None) + "\n"


def check_node_memory(per_node: int, parts: dict[str, int], layout: str) -> None:
    """Refuse a memory request of more than :data:`MAX_NODE_MEMORY` per node, warn on stderr above
    :data:`WARN_NODE_MEMORY`; the message names the largest part of the estimate and the config keys that
    drive it."""
    from hpc_zsem.units import format_bytes

    if per_node <= WARN_NODE_MEMORY:
        return
    largest = max(parts, key=parts.__getitem__)
    label, keys = PARTS[largest]
    what = (f"the memory request is {format_bytes(per_node)} per node ({layout}); its largest part, the "
            f"{label} ({format_bytes(parts[largest])} per rank), grows with {keys}")
    if per_node > MAX_NODE_MEMORY:
        raise InputError(f"{what}: more than {format_bytes(MAX_NODE_MEMORY)} per node is refused; lower them "
                         "or spread the ranks over more --nodes")
    print(f"hpc-zsem: warning: {what}; check that your nodes have that much", file=sys.stderr)


def render(config_path: str, config, template: str, ranks: int, nodes: int, time: str | None, cpus_per_task: int,
           overrides: list[str]) -> str:
    """The job script ``jobs/<template>.sbatch`` for ``config`` (read from ``config_path`` with ``overrides``):
    ``ranks`` MPI ranks with ``cpus_per_task`` threads each on ``nodes`` nodes, time limit ``time`` (None: the
    template's), memory per CPU from :func:`memory_estimate`, ``overrides`` passed on to ``hpc-zsem run``.
    Invalid values raise a one-line InputError naming the option."""
    if template not in TEMPLATES:
        raise InputError(f"--template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    ranks, nodes, cpus = (positive(o, v) for o, v in (("--ranks", ranks), ("--nodes", nodes),
                                                        ("--cpus-per-task", cpus_per_task)))
    if nodes > ranks:
        raise InputError(f"--nodes {nodes}: expected at most --ranks ({ranks}) nodes, one rank per node or more")
    if template == "multi_node" and ranks % nodes:
        raise InputError(f"--ranks {ranks} is not a multiple of --nodes {nodes}")
    time = None if time is None else walltime(time)
    for what, value in (("config", config_path), ("output.path", config.output.path),
                        *(("--set", o) for o in overrides)):
        script_text(what, str(value))
    path = template_dir() / f"{template}.sbatch"
    if not path.is_file():
        raise InputError(f"{path}: job template not found (hpc-zsem slurm needs the jobs/ directory of a source "
                         "checkout)")
    parts, n_train = memory_estimate(config, ranks, cpus)
    per_rank = sum(parts.values()) - parts["gathered"]
    mem_per_cpu = math.ceil(sum(parts.values()) / cpus / (100 * MB)) * 100
    ranks_per_node = math.ceil(ranks / nodes)
    layout = f"{ranks_per_node} rank(s) × {cpus} cpu(s) × {mem_per_cpu} MiB"
    check_node_memory(ranks_per_node * cpus * mem_per_cpu * MB, parts, layout)
    sbatch = {"nodes": str(nodes), "cpus-per-task": str(cpus), "mem-per-cpu": f"{mem_per_cpu}M"}
    if template == "multi_node":
        sbatch["ntasks-per-node"] = str(ranks_per_node)
    else:
        sbatch["ntasks"] = str(ranks)
    if time is not None:
        sbatch["time"] = time
    variables: dict[str, str | list[str]] = {
        "CONFIG": config_path, "OUTDIR": str(Path(config.output.path).parent),
        "OVERRIDES": [arg for o in overrides for arg in ("--set", o)]}
    header = (f"# filled by `hpc-zsem slurm` for {config_path}: {ranks} rank(s) × {cpus} thread(s) per rank "
              f"(--cpus-per-task, hpc-zsem run --threads) = {ranks * cpus} cores on {nodes} node(s)\n"
              f"# {n_train} training patches; memory estimate {per_rank / MB:.0f} MB per rank "
              f"+ {parts['gathered'] / MB:.0f} MB on rank 0 (rough upper bound)")
    text = fill(path.read_text(), sbatch, variables)
    first, _, rest = text.partition("\n")
    return f"{first}\n{header}\n{rest}"
