"""``hpc-zsem slurm``: print a job script from ``jobs/`` filled in for a config (ranks, time, memory).

Only the template's ``#SBATCH`` lines and its ``NAME=${NAME:-default}`` variable block are changed, so the
printed script is the tested template with other values. The memory request per CPU is

    (hpc_zsem.pipeline.memory_per_rank(...)["total"]                 the busiest rank's data and temporaries
     + 2 · n_training · S · ⌈H/64⌉ · 8 B                              SSSC: all truncated sets, gathered on
     + BASELINE) / cpus-per-task, rounded up to 100 MiB                rank 0 for a checkpoint (list + array)

where n_training is the training set (all patches, ``training.max_patches`` for mosaics, one section with
``training.per_section``) and BASELINE = 150 MiB for the interpreter and its libraries (measured ≈ 62 MiB for
the imports alone; peaks of 127/175 MiB for whole demo runs with H = 32/64 on one rank).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from hpc_zsem.errors import InputError

TEMPLATES = ("long_requeue", "single_node", "multi_node", "array")
MB = 2**20
BASELINE = 150 * MB


def template_dir() -> Path:
    """``jobs/`` of the source tree this package was installed from (editable installs and checkouts)."""
    return Path(__file__).resolve().parents[1] / "jobs"


def memory_estimate(config, ranks: int) -> tuple[int, int, int]:
    """(bytes on the busiest rank, extra bytes on rank 0 while it writes a checkpoint, training patches) for
    the config's input (headers only); see the module docstring."""
    from hpc_zsem.pipeline import input_geometry, memory_per_rank

    plane, n_sections = input_geometry(config)
    estimate, n_train = memory_per_rank(config, plane, n_sections, ranks)
    t = config.truncation
    gathered = 2 * n_train * t.S * math.ceil(config.model.H / 64) * 8 if config.model.name == "sssc" else 0
    return BASELINE + estimate["total"], gathered, n_train


def fill(text: str, sbatch: dict[str, str], variables: dict[str, str]) -> str:
    """Replace ``#SBATCH --key=value`` lines (adding missing keys after the last one) and the defaults of
    ``NAME=${NAME:-default}`` variable lines."""
    lines: list[str | None] = list(text.splitlines())
    done: set[str] = set()
    last = 0
    for i, line in enumerate(lines):
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
            if "}" in value or "\n" in value:
                raise InputError(f"{name}: a value for a job template may not contain '}}' or a newline")
            lines[i] = re.sub(rf"^{name}=\$\{{{name}:-[^}}]*\}}", f"{name}=${{{name}:-{value}}}", lines[i])
    extra = [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if k not in done]
    lines[last + 1:last + 1] = extra
    return "\n".join(line for line in lines if line is not None) + "\n"


def render(config_path: str, config, template: str, ranks: int, nodes: int, time: str | None, cpus_per_task: int,
           overrides: list[str]) -> str:
    if template not in TEMPLATES:
        raise InputError(f"--template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    path = template_dir() / f"{template}.sbatch"
    if not path.is_file():
        raise InputError(f"{path}: job template not found (hpc-zsem slurm needs the jobs/ directory of a source "
                         "checkout)")
    per_rank, rank0, n_train = memory_estimate(config, ranks)
    mem_per_cpu = math.ceil((per_rank + rank0) / cpus_per_task / (100 * MB)) * 100
    sbatch = {"nodes": str(nodes), "cpus-per-task": str(cpus_per_task), "mem-per-cpu": f"{mem_per_cpu}M"}
    if template == "multi_node":
        if ranks % nodes:
            raise InputError(f"--ranks {ranks} is not a multiple of --nodes {nodes}")
        sbatch["ntasks-per-node"] = str(ranks // nodes)
    else:
        sbatch["ntasks"] = str(ranks)
    if time:
        sbatch["time"] = time
    variables = {"CONFIG": config_path, "OUTDIR": str(Path(config.output.path).parent)}
    if overrides:
        variables["SET"] = " ".join(f"--set {o}" for o in overrides)
    header = (f"# filled by `hpc-zsem slurm` for {config_path}: {n_train} training patches on {ranks} rank(s); "
              f"memory estimate {per_rank / MB:.0f} MB per rank "
              f"+ {rank0 / MB:.0f} MB on rank 0 (rough upper bound)")
    text = fill(path.read_text(), sbatch, variables)
    first, _, rest = text.partition("\n")
    return f"{first}\n{header}\n{rest}"
