"""``hpc-zsem slurm``: print a job script from ``jobs/`` filled in for a config (ranks, time, memory).

Only the template's ``#SBATCH`` lines and its ``NAME=${NAME:-default}`` variable block are changed, so the
printed script is the tested template with other values. The memory request per CPU is

    (hpc_zsem.resources.estimate_memory_per_rank(...)["total"]       the busiest rank's data and temporaries
     + 2 · n_patches · S · ⌈H/64⌉ · 8 B                               SSSC: all truncated sets, gathered on
     + BASELINE) / cpus-per-task, rounded up to 100 MiB                rank 0 for a checkpoint (list + array)

with BASELINE = 150 MiB for the interpreter and its libraries (measured ≈ 62 MiB for the imports alone; peaks
of 127/175 MiB for whole demo runs with H = 32/64 on one rank).
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


def n_patches(image_shape: tuple[int, int], size: tuple[int, int], stride: int) -> int:
    return ((image_shape[0] - size[0]) // stride + 1) * ((image_shape[1] - size[1]) // stride + 1)


def effective_shape(config) -> tuple[int, int]:
    """The image shape the run works on (after input.crop and input.downsample)."""
    from hpc_zsem.io.images import image_shape

    shape = image_shape(config.input.path, section=config.input.section)
    crop = config.input.crop
    if crop is not None:
        shape = (min(crop[1], shape[0]) - crop[0], min(crop[3], shape[1]) - crop[2])
    k = config.input.downsample
    return (-(-shape[0] // k), -(-shape[1] // k))


def memory_estimate(config, image_shape: tuple[int, int], ranks: int) -> tuple[int, int]:
    """(bytes on the busiest rank, extra bytes on rank 0 while it writes a checkpoint); see the module
    docstring."""
    from hpc_zsem.resources import estimate_memory_per_rank

    c = config
    n = n_patches(image_shape, tuple(c.patches.size), c.patches.stride)
    t = c.truncation
    estimate = estimate_memory_per_rank(n, ranks, c.patches.size[0] * c.patches.size[1], c.model.name, c.model.H,
                                        t.S, t.parents * t.children * t.generations, c.model.C,
                                        c.training.block_size, image_shape[0] * image_shape[1])
    gathered = 2 * n * t.S * math.ceil(c.model.H / 64) * 8 if c.model.name == "sssc" else 0
    return BASELINE + estimate["total"], gathered


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


def render(config_path: str, config, image_shape: tuple[int, int], template: str, ranks: int, nodes: int,
           time: str | None, cpus_per_task: int, overrides: list[str]) -> str:
    if template not in TEMPLATES:
        raise InputError(f"--template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    path = template_dir() / f"{template}.sbatch"
    if not path.is_file():
        raise InputError(f"{path}: job template not found (hpc-zsem slurm needs the jobs/ directory of a source "
                         "checkout)")
    per_rank, rank0 = memory_estimate(config, image_shape, ranks)
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
    header = (f"# filled by `hpc-zsem slurm` for {config_path}: {n_patches(image_shape, tuple(config.patches.size), config.patches.stride)} "
              f"patches on {ranks} rank(s); memory estimate {per_rank / MB:.0f} MB per rank "
              f"+ {rank0 / MB:.0f} MB on rank 0 (rough upper bound)")
    text = fill(path.read_text(), sbatch, variables)
    first, _, rest = text.partition("\n")
    return f"{first}\n{header}\n{rest}"
