"""Memory estimate per rank and the resources.max_memory_per_rank refusal (hpc_zsem.resources)."""
import numpy as np
import pytest
import yaml

from hpc_zsem import resources
from hpc_zsem.config import load_config
from hpc_zsem.errors import ConfigError
from hpc_zsem.models.gpmm import GPMM
from hpc_zsem.models.sssc import SSSC
from hpc_zsem.parallel import block_ranges, shard
from hpc_zsem.patches import PatchGrid
from hpc_zsem.pipeline import preflight
from hpc_zsem.resources import (COMPONENTS, MemoryLimit, cgroup_memory, check_memory, default_memory_limit,
                                estimate_memory_per_rank, measure_peak, ranks_needed, ranks_on_this_node, slurm_memory)
from hpc_zsem.units import format_bytes, parse_bytes
from hpc_zsem.variational.evolution import EvolutionSettings
from hpc_zsem.variational.states import pack

GiB = 2**30


def _sssc_params(D, H, k, rng):
    return {"W": rng.standard_normal((D, H)), "pi": np.full(H, k / H), "mu": np.zeros(H), "psi": np.ones(H),
            "sigma2": np.array(1.0)}


def _states(N, S, H, k, rng):
    """(N, S, ⌈H/64⌉) packed states with exactly k active units each."""
    idx = np.argsort(rng.random((N, S, H)), axis=2)[:, :, :k]
    bits = np.zeros((N, S, H), bool)
    np.put_along_axis(bits, idx, True, axis=2)
    return pack(bits)


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("H", [12, 70])
def test_patches_and_truncated_sets_match_the_real_arrays(ranks, H):
    """The per-rank patch data and truncated sets of a small run, built as the pipeline builds them (blocks,
    shard, extract, init_block_state), are within 25 % of the estimate for the busiest rank."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (40, 37))
    grid = PatchGrid(image.shape, (5, 5), 1)
    S, block_size = 6, 100
    model = SSSC(H, EvolutionSettings(S=S, parents=3, children=1))
    params = _sssc_params(grid.dim, H, 2, rng)
    blocks = block_ranges(grid.n_patches, block_size)
    per_rank = []
    for rank in range(ranks):
        nbytes = {"patches": 0, "truncated_sets": 0}
        for b in shard(len(blocks), rank, ranks):
            Y = grid.extract(image, np.arange(*blocks[b]))
            K = model.init_block_state(Y, params, np.random.default_rng(b))
            nbytes["patches"] += Y.nbytes
            nbytes["truncated_sets"] += K.nbytes
        per_rank.append(nbytes)
    real = max(per_rank, key=lambda d: d["patches"])
    est = estimate_memory_per_rank(grid.n_patches, ranks, grid.dim, "sssc", H, S, 3, 1, block_size, image.size)
    for key in ("patches", "truncated_sets"):
        assert abs(est[key] - real[key]) <= 0.25 * real[key], (key, est[key], real[key])
    both_est, both_real = est["patches"] + est["truncated_sets"], real["patches"] + real["truncated_sets"]
    assert abs(both_est - both_real) <= 0.25 * both_real
    assert est["total"] == sum(est[c] for c in COMPONENTS)


def test_sssc_estep_temporaries_are_close_to_the_measured_peak():
    """The calibrated per-pair constants predict tracemalloc's peak of one E-step within a factor 1.6."""
    rng = np.random.default_rng(1)
    N, D, H, S, parents, k = 512, 36, 48, 16, 8, 4
    model = SSSC(H, EvolutionSettings(S=S, parents=parents, children=2))
    Y = rng.standard_normal((N, D))
    params, K = _sssc_params(D, H, k, rng), _states(N, S, H, k, rng)
    model.e_step(Y, params, K, np.random.default_rng(2))        # warm up caches and lazy imports
    peak = measure_peak(lambda: model.e_step(Y, params, K, np.random.default_rng(2)))
    est = estimate_memory_per_rank(N, 1, D, "sssc", H, S, parents * 2, 1, N, 64 * 64,
                                   parents=parents)["estep_temporaries"]
    assert peak / 1.6 <= est <= 1.6 * peak, (est, peak)


def test_gpmm_temporaries_are_close_to_the_measured_peak():
    rng = np.random.default_rng(3)
    N, D, C = 1024, 36, 50
    Y = rng.poisson(4.0, (N, D)).astype(float)
    W = rng.random((C, D))
    W /= W.sum(axis=1, keepdims=True)
    params = {"W": W, "pi": np.full(C, 1 / C), "alpha": np.full(C, 2.0), "beta": np.full(C, 1.0)}
    model = GPMM(C)
    model.e_step(Y, params, None, rng)
    peak = measure_peak(lambda: model.e_step(Y, params, None, rng))
    est = estimate_memory_per_rank(N, 1, D, "gpmm", 1, 1, 0, C, N, 100)
    assert peak / 1.6 <= est["gpmm_temporaries"] <= 1.6 * peak
    assert est["truncated_sets"] == est["estep_temporaries"] == 0


def test_more_ranks_never_need_more_memory():
    args = dict(n_patches_total=10**6, D=64, model="sssc", H=64, S=60, candidates_per_patch=20, C=1,
                block_size=1024, image_pixels=1000 * 1000)
    totals = [estimate_memory_per_rank(ranks=r, **args)["total"] for r in (1, 2, 3, 4, 8, 100, 977, 5000)]
    assert totals == sorted(totals, reverse=True)
    # beyond one block per rank nothing shrinks
    assert totals[-1] == totals[-2]


def test_each_kernel_thread_holds_one_block_of_temporaries():
    """Threads take whole blocks, so the temporaries scale with the threads — up to the rank's blocks."""
    args = dict(n_patches_total=10 * 1024, ranks=1, D=64, model="sssc", H=64, S=60, candidates_per_patch=20, C=1,
                block_size=1024, image_pixels=10**4)
    one, four = estimate_memory_per_rank(**args), estimate_memory_per_rank(**args, threads=4)
    assert four["estep_temporaries"] == 4 * one["estep_temporaries"] > 0
    assert four["total"] - one["total"] == 3 * one["estep_temporaries"]
    assert estimate_memory_per_rank(**{**args, "n_patches_total": 2048}, threads=4)["estep_temporaries"] == \
        2 * estimate_memory_per_rank(**{**args, "n_patches_total": 2048})["estep_temporaries"]
    gpmm = {**args, "model": "gpmm", "C": 100}
    assert estimate_memory_per_rank(**gpmm, threads=2)["gpmm_temporaries"] == \
        2 * estimate_memory_per_rank(**gpmm)["gpmm_temporaries"]


def test_check_memory_passes_under_the_limit_and_without_one():
    est = estimate_memory_per_rank(1000, 1, 64, "sssc", 64, 60, 20, 1, 1024, 10**4)
    check_memory(est, est["total"])
    check_memory(est, None)


def test_check_memory_names_the_key_the_estimate_and_a_rank_count_that_fits():
    est = estimate_memory_per_rank(4 * 10**6, 1, 64, "sssc", 256, 60, 20, 1, 1024, 2000 * 2000)
    limit = 2 * GiB
    assert est["total"] > limit
    with pytest.raises(ConfigError) as info:
        check_memory(est, limit)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("resources.max_memory_per_rank: the run needs about ")
    assert format_bytes(est["total"]) in msg and "but the limit is 2 GiB" in msg
    assert f"patches {format_bytes(est['patches'])}" in msg
    assert f"truncated sets {format_bytes(est['truncated_sets'])}" in msg
    assert "E-step temporaries" in msg and "GPMM" not in msg
    n = ranks_needed(est, limit)
    assert n is not None and n > 1
    assert msg.endswith(f"use at least {n} ranks or a smaller S/H")
    inputs = dict(est.inputs)
    assert estimate_memory_per_rank(**{**inputs, "ranks": n})["total"] <= limit
    assert estimate_memory_per_rank(**{**inputs, "ranks": n - 1})["total"] > limit
    # with that many ranks the check passes
    check_memory(estimate_memory_per_rank(**{**inputs, "ranks": n}), limit)


def test_check_memory_says_when_no_rank_count_fits():
    # a 20000² image alone (accumulators + image) needs ~22 GiB on rank 0
    est = estimate_memory_per_rank(10**6, 4, 64, "gpmm", 1, 1, 0, 1000, 1024, 20000 * 20000)
    with pytest.raises(ConfigError, match=r"^resources\.max_memory_per_rank: .* more ranks cannot make it fit: "
                                          r"use a smaller C, .*input\.crop") as info:
        check_memory(est, 8 * GiB)
    assert "pixel accumulators" in str(info.value) and "\n" not in str(info.value)


def test_check_memory_on_a_plain_dict():
    with pytest.raises(ConfigError, match=r"needs about 3 GiB per rank \(patches 1 GiB, image 2 GiB\) but the "
                                          r"limit is 2 GiB; use more ranks"):
        check_memory({"patches": GiB, "image": 2 * GiB, "total": 3 * GiB}, 2 * GiB)


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * GiB), ("2 GiB", 2 * GiB), ("2gib", 2 * GiB), ("2G", 2 * GiB), ("2g", 2 * GiB),
    ("1500MB", 1500 * 10**6), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 2**20), ("512M", 512 * 2**20),
    ("64K", 65536), ("1TiB", 2**40), ("1T", 2**40), ("4096", 4096), ("4096B", 4096), (" 3 MiB ", 3 * 2**20),
    (".5GiB", GiB // 2), (123456, 123456), (2.0 * GiB, 2 * GiB),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("junk", ["", "GiB", "2 GiBs", "two GiB", "-1GiB", "0", 0, -5, "1e9", "2 G B", "2XB",
                                  True, None, [2], {"a": 1}, float("nan"), float("inf"), "nan"])
def test_parse_bytes_refuses_junk(junk, tmp_path):
    with pytest.raises(ValueError, match="expected a memory size"):
        parse_bytes(junk)
    if junk is not None:            # null is the config's "no limit"; everything else is a one-line error
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"input": {"path": "x.tif"}, "output": {"path": "o.h5"},
                                        "resources": {"max_memory_per_rank": junk}}))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        msg = str(info.value)
        assert "resources.max_memory_per_rank: expected a memory size" in msg and "\n" not in msg


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
                                     (2 * GiB, "2 GiB"), (int(3.2 * GiB), "3.2 GiB"), (5 * 2**40, "5 TiB"),
                                     (int(1.25 * 2**20), "1.2 MiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_estimate_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="model"):
        estimate_memory_per_rank(10, 1, 4, "pca", 1, 1, 1, 1, 10, 100)


# ------------------------------------------------- issue 13 item 14: the default limit is this machine's memory

def _no_machine_limits(monkeypatch, physical=64 * GiB, cgroup=None):
    monkeypatch.setattr(resources, "physical_memory", lambda: physical)
    monkeypatch.setattr(resources, "cgroup_memory", lambda: cgroup)


def test_slurm_memory_reads_the_allocation():
    assert slurm_memory({}) is None
    assert slurm_memory({"SLURM_MEM_PER_NODE": "4096"}) == (4 * GiB, "SLURM_MEM_PER_NODE")
    assert slurm_memory({"SLURM_MEM_PER_NODE": "0", "SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}) == \
        (4000 * 2**20, "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE")
    assert slurm_memory({"SLURM_MEM_PER_CPU": "1000"}) is None
    assert slurm_memory({"SLURM_MEM_PER_NODE": "lots"}) is None


def test_cgroup_memory_takes_the_tightest_limit(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job_7/step_0\n")
    (tmp_path / "job_7" / "step_0").mkdir(parents=True)
    (tmp_path / "job_7" / "memory.max").write_text(f"{3 * GiB}\n")
    (tmp_path / "job_7" / "step_0" / "memory.max").write_text("max\n")
    assert cgroup_memory(tmp_path, membership) == 3 * GiB
    membership.write_text("4:memory:/a\n3:cpu:/b\n")
    (tmp_path / "memory" / "a").mkdir(parents=True)
    (tmp_path / "memory" / "a" / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # v1: unlimited
    assert cgroup_memory(tmp_path, membership) == 2 * GiB
    assert cgroup_memory(tmp_path / "none", tmp_path / "no_membership") is None


def test_ranks_on_this_node_from_the_launcher():
    assert ranks_on_this_node({}) == 1
    assert ranks_on_this_node({"MPI_LOCALNRANKS": "4"}) == 4
    assert ranks_on_this_node({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}) == 8
    assert ranks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "16(x2),3"}) == 16


def test_default_limit_is_the_smallest_memory_shared_by_the_ranks_on_the_node(monkeypatch):
    _no_machine_limits(monkeypatch, physical=64 * GiB)
    assert default_memory_limit({}) == MemoryLimit(64 * GiB, 64 * GiB, "physical memory of this machine", 1)
    env = {"SLURM_MEM_PER_NODE": str(32 * 1024), "MPI_LOCALNRANKS": "4"}
    assert default_memory_limit(env) == MemoryLimit(8 * GiB, 32 * GiB, "SLURM allocation, SLURM_MEM_PER_NODE", 4)
    _no_machine_limits(monkeypatch, physical=64 * GiB, cgroup=16 * GiB)
    assert default_memory_limit(env).per_rank == 4 * GiB
    _no_machine_limits(monkeypatch, physical=None)
    assert default_memory_limit({}) is None


def test_check_memory_without_a_limit_refuses_what_the_machine_cannot_hold(monkeypatch):
    """Item 14: with resources.max_memory_per_rank null there was no check at all, so truncation.S 10000
    with model.H 1024 died in numpy after the input was read."""
    _no_machine_limits(monkeypatch, physical=8 * GiB)
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    est = estimate_memory_per_rank(4 * 10**6, 2, 64, "sssc", 256, 60, 20, 1, 1024, 2000 * 2000)
    assert 4 * GiB < est["total"]
    with pytest.raises(ConfigError) as info:
        check_memory(est, None)
    msg = str(info.value)
    n = ranks_needed(est, 4 * GiB)
    assert msg == (f"resources.max_memory_per_rank: the run needs about {format_bytes(est['total'])} per rank "
                   f"(patches {format_bytes(est['patches'])}, truncated sets {format_bytes(est['truncated_sets'])}, "
                   f"E-step temporaries {format_bytes(est['estep_temporaries'])}, pixel accumulators 183.1 MiB, "
                   "image 30.5 MiB) but the limit is 4 GiB per rank (8 GiB physical memory of this machine / 2 "
                   "rank(s) on this node, as resources.max_memory_per_rank is null); use at least "
                   f"{n} ranks with at most 2 per node or a smaller S/H; or set resources.max_memory_per_rank if "
                   "the estimate is too high")
    check_memory(est, 64 * GiB)                  # an explicit limit replaces the machine's
    monkeypatch.delenv("MPI_LOCALNRANKS")
    _no_machine_limits(monkeypatch, physical=None)
    check_memory(est, None)                      # nothing known: no check


def test_preflight_refuses_a_huge_truncated_set_before_any_work(tmp_path):
    """The call site (pipeline.preflight passes the config's null limit) now gets the machine check."""
    config = load_config(None, ["input.path=builtin:demo", f"output.path={tmp_path / 'o.h5'}",
                                "truncation.S=10000", "model.H=1024", "training.block_size=65536"])
    with pytest.raises(ConfigError, match=r"^resources\.max_memory_per_rank: the run needs about .* per rank .*"
                                          r"as resources\.max_memory_per_rank is null\)"):
        preflight(config, overwrite=False)
