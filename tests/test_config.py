"""Tests of hpc_zsem.config: defaults, overrides, one-line errors, hashing and round trips."""
import dataclasses
import time
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from hpc_zsem.config import (ECHO_CHARS, Config, _Expected, _sections, config_from_dict, load_config, schema_help,
                             short_repr, tile_overhead)
from hpc_zsem.errors import ConfigError
from hpc_zsem.patches import PatchGrid
from hpc_zsem.tiles import plan_tiles, tile_grid

REQUIRED = ["input.path=in.tif", "output.path=out.h5"]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    cfg = load_config(None, REQUIRED)
    assert isinstance(cfg, Config)
    assert cfg.input.path == "in.tif" and cfg.output.path == "out.h5"
    assert cfg.patches.size == (8, 8) and cfg.patches.stride == 1
    assert (cfg.model.name, cfg.model.H, cfg.model.psi, cfg.model.C) == ("sssc", 64, "diag", 100)
    assert (cfg.truncation.S, cfg.truncation.parents, cfg.truncation.crossover) == (60, 20, False)
    assert cfg.training.block_size == 1024 and cfg.estimation.epochs == 20
    assert cfg.input.crop is None and cfg.input.downsample == 1


def test_file_and_overrides_with_types(tmp_path):
    path = write(tmp_path, "input: {path: a.tif, crop: [0, 10, 2, 12]}\noutput: {path: r.h5}\nmodel: {H: 16}\n")
    cfg = load_config(path, ["model.H=128", "patches.size=[6,5]", "input.crop=null", "input.gain=2",
                             "truncation.crossover=true"])
    assert cfg.model.H == 128
    assert cfg.patches.size == (6, 5)
    assert cfg.input.crop is None
    assert cfg.input.gain == 2.0 and isinstance(cfg.input.gain, float)
    assert cfg.truncation.crossover is True


def test_single_int_patch_size():
    assert load_config(None, REQUIRED + ["patches.size=5"]).patches.size == (5, 5)


def test_config_is_frozen():
    cfg = load_config(None, REQUIRED)
    with pytest.raises(AttributeError):
        cfg.model.H = 3


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: r.h5}\nmodel: {HH: 3}\n")
    assert error(path) == f"{path}: model.HH: unknown key; did you mean 'model.H'?"
    assert "did you mean 'model'?" in error(None, REQUIRED + ["modle.H=3"])


def test_wrong_type_names_key_and_source(tmp_path):
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: r.h5}\ntraining: {epochs: many}\n")
    assert error(path) == f"{path}: training.epochs: expected an integer in [0, 1000000] or 'auto', got 'many'"
    assert error(path, ["training.epochs=3", "model.H=x"]).startswith("--set: model.H: expected an integer")


def test_bool_is_not_int():
    assert "model.H: expected an integer" in error(None, REQUIRED + ["model.H=true"])


def test_out_of_range_and_choices():
    assert "patches.size" in error(None, REQUIRED + ["patches.size=[1,8]"])
    assert "'sssc', 'gpmm'" in error(None, REQUIRED + ["model.name=pca"])
    assert "input.crop" in error(None, REQUIRED + ["input.crop=[5,5,0,4]"])
    assert "input.gain: expected a number > 0" in error(None, REQUIRED + ["input.gain=0"])


def test_model_init():
    assert load_config(None, REQUIRED).model.init == "random"
    assert load_config(None, REQUIRED + ["model.init=kmeans"]).model.init == "kmeans"
    assert error(None, REQUIRED + ["model.init=PCA"]) == \
        "--set: model.init: expected one of 'random', 'pca', 'kmeans', got 'PCA'"
    assert "model.init (default 'random'; one of 'random', 'pca', 'kmeans')" in schema_help()


def test_s_larger_than_states_rejected():
    message = error(None, REQUIRED + ["model.H=3"])
    assert message == "--set: truncation.S: expected at most 2**model.H = 8 distinct states, got 60"
    load_config(None, REQUIRED + ["model.name=gpmm", "model.H=3"])  # irrelevant for GPMM


def test_parents_at_most_s():
    assert "truncation.parents: expected at most truncation.S = 10" in error(
        None, REQUIRED + ["truncation.S=10", "truncation.parents=11"])


def test_missing_required(tmp_path):
    path = write(tmp_path, "input: {path: a.tif}\n")
    assert error(path).startswith(f"{path}: output.path: missing required key")


def test_yaml_syntax_error_names_file(tmp_path):
    path = write(tmp_path, "input: {path: a.tif\nmodel: [\n")
    assert error(path).startswith(f"{path}: YAML syntax error")


def test_missing_file_and_non_mapping(tmp_path):
    assert error(tmp_path / "nope.yaml").startswith(f"{tmp_path / 'nope.yaml'}: cannot read")
    assert "expected a mapping" in error(write(tmp_path, "- 1\n- 2\n"))


def test_bad_override_syntax():
    assert error(None, REQUIRED + ["model.H"]) == "--set: expected section.key=value, got 'model.H'"


def test_hash_stable_and_sensitive():
    a, b = load_config(None, REQUIRED), load_config(None, REQUIRED)
    assert a.hash() == b.hash() and len(a.hash()) == 64
    assert load_config(None, REQUIRED + ["training.seed=1"]).hash() != a.hash()


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = load_config(None, REQUIRED + ["input.crop=[0,4,0,4]", "model.name=gpmm"])
    d = cfg.to_dict()
    assert d["patches"]["size"] == [8, 8] and d["input"]["crop"] == [0, 4, 0, 4]
    assert config_from_dict(d) == cfg
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg


def test_schema_help_lists_every_key():
    text = schema_help()
    assert "input.path (required; a non-empty string): " in text
    assert "truncation.crossover (default False; true or false): " in text
    assert "training.seed (default 0; an integer in [0, 9223372036854775807]): " in text
    assert text.splitlines()[-1].startswith("--set KEY=VALUE: ") and "taken literally" in text


@settings(max_examples=40, deadline=None)
@given(epochs=st.integers(0, 10**6), seed=st.integers(0, 2**63 - 1), H=st.integers(6, 1024),
       stride=st.integers(1, 8))   # at most the default patch size 8
def test_int_overrides_round_trip(epochs, seed, H, stride):
    cfg = load_config(None, REQUIRED + [f"training.epochs={epochs}", f"training.seed={seed}",
                                        f"model.H={H}", f"patches.stride={stride}"])
    assert (cfg.training.epochs, cfg.training.seed, cfg.model.H, cfg.patches.stride) == (epochs, seed, H, stride)
    assert config_from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------- issue 13: bounds, --set, YAML, tiles

def _fields():
    """(dotted key, validator) of every key of the schema."""
    return [(f"{name}.{f.name}", f.metadata["check"]) for name, cls in _sections().items()
            for f in dataclasses.fields(cls)]


def test_every_integer_key_is_bounded():
    """Item 7: an integer key that accepted 2**63 or more (training.seed = 2**64 failed only when the result's
    HDF5 attributes were written, after all the compute) — now every key refuses it (floats may take it)."""
    for dotted, check in _fields():
        for huge in (2**63, 2**64, [2**64, 2**64], [0, 2**64, 0, 2**64]):
            try:
                value = check(huge)
            except _Expected:
                continue
            assert isinstance(value, float), (dotted, huge, value)


def test_seed_is_an_int64():
    h5py = pytest.importorskip("h5py")
    assert error(None, REQUIRED + ["training.seed=18446744073709551616"]) == \
        "--set: training.seed: expected an integer in [0, 9223372036854775807], got 18446744073709551616"
    seed = load_config(None, REQUIRED + [f"training.seed={2**63 - 1}"]).training.seed
    with h5py.File("seed.h5", "w", driver="core", backing_store=False) as f:
        f.attrs["seed"] = seed
        assert f.attrs["seed"] == 2**63 - 1


def test_an_integer_too_long_for_python_names_the_key(tmp_path):
    """A 5000-digit integer used to escape as a ValueError traceback (Python refuses to convert it)."""
    message = error(None, REQUIRED + ["training.seed=" + "9" * 5000])
    assert message.startswith("--set: training.seed: expected an integer in [0, ") and len(message) < 200
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: b.h5}\nmodel: {C: " + "1" * 5000 + "}\n")
    assert error(path).startswith(f"{path}: model.C: expected an integer in [1, 100000], got '111")


def test_values_and_keys_python_cannot_convert_are_config_errors():
    """Found by tests/test_config_fuzz.py: input.gain = 10**400 raised OverflowError (int to float), an
    integer key of 5000 digits raised ValueError (int to str)."""
    base = {"input": {"path": "a.tif"}, "output": {"path": "b.h5"}}
    with pytest.raises(ConfigError, match=r"^stored config: input\.gain: expected a number > 0 or null, got 1000"):
        config_from_dict({**base, "input": {"path": "a.tif", "gain": 10**400}})
    with pytest.raises(ConfigError, match=r"^stored config: model\.<an integer of 16610 bits>: unknown key"):
        config_from_dict({**base, "model": {10**5000: 1}})


@pytest.mark.parametrize("override, key, value", [
    ("input.path=img/a #1.tif", "input", "img/a #1.tif"),        # was 'img/a' (YAML comment)
    ("input.path=yes", "input", "yes"),                          # was True, refused
    ("input.path=null", "input", "null"),                        # not nullable: a file called null
    ("input.path=[a.tif]", "input", "[a.tif]"),
    ("input.path=a=b: c.tif", "input", "a=b: c.tif"),
    ("input.path= spaced .tif", "input", " spaced .tif"),
    ("checkpoint.path=null", "checkpoint", None),                # nullable: exactly null is null
    ("checkpoint.path=~", "checkpoint", "~"),
    ("checkpoint.path=Null", "checkpoint", "Null"),
    ("checkpoint.path=ck #2.h5", "checkpoint", "ck #2.h5"),
])
def test_set_takes_text_keys_literally(override, key, value):
    """Item 10: --set values of text keys were read as YAML."""
    cfg = load_config(None, REQUIRED + [override])
    assert getattr(cfg, key).path == value


def test_set_still_reads_yaml_for_other_keys():
    cfg = load_config(None, REQUIRED + ["model.H=128", "input.crop=[0, 8, 0, 8]", "input.gain=2.5",
                                        "truncation.crossover=yes", "training.max_patches=null",
                                        "model.name=gpmm", "patches.size=6 # a comment"])
    assert (cfg.model.H, cfg.input.crop, cfg.input.gain, cfg.truncation.crossover) == (128, (0, 8, 0, 8), 2.5, True)
    assert cfg.training.max_patches is None and cfg.model.name == "gpmm" and cfg.patches.size == (6, 6)
    assert error(None, REQUIRED + ["input.path="]) == "--set: input.path: expected a non-empty string, got ''"
    assert error(None, REQUIRED + ["model.psi= full"]) == \
        "--set: model.psi: expected one of 'diag', 'full', got ' full'"


def _bomb(levels):
    """A billion-laughs document: each level is a list of 9 aliases of the previous one."""
    names = "abcdefghijklmnop"
    parts = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, levels)]
    return "input:\n  path: a.tif\n  crop: [" + ", ".join(parts) + "]\noutput: {path: o.h5}\n"


@pytest.mark.parametrize("levels", [7, 12])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, levels):
    """Item 11: 309 bytes (7 levels) made a 39 MB error line; a few more levels ran out of memory."""
    path = write(tmp_path, _bomb(levels))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 20 * 2**20
    assert message == (f"{path}: line 3, column 10: expected no YAML anchors (&name) or aliases (*name) in a "
                       "config, got '&a'")


def test_yaml_aliases_are_refused_in_files_and_overrides(tmp_path):
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: *p}\n")
    assert error(path).startswith(f"{path}: line 2, column 16: expected no YAML anchors")
    assert error(None, REQUIRED + ["input.crop=&c [0, 4, 0, 4]"]).startswith(
        "--set: input.crop: line 1, column 1: expected no YAML anchors (&name) or aliases (*name)")


@pytest.mark.parametrize("text, key, line, first", [
    ("input: {path: a.tif}\noutput: {path: b.h5}\nmodel: {H: 8}\nmodel: {H: 16}\n", "model", 4, 3),
    ("input: {path: a.tif}\noutput: {path: b.h5}\nmodel: {H: 8, name: sssc, H: 16}\n", "model.H", 3, 3),
    ("input:\n  path: a.tif\n  crop: [0, 4, 0, 4]\n  path: b.tif\noutput: {path: b.h5}\n", "input.path", 4, 2),
    ("input: {path: a.tif}\noutput: {path: b.h5}\nmodel: {H: 8}\ntruncation: {S: 4}\nmodel:\n", "model", 5, 3),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, line, first):
    """Items 11/18: the second of two equal keys silently won."""
    path = write(tmp_path, text)
    assert error(path) == (f"{path}: {key}: expected each key once in a mapping, got it again at line {line} "
                           f"(first at line {first})")


def test_duplicate_keys_inside_values_and_equal_after_resolution(tmp_path):
    path = write(tmp_path, "input: {path: a.tif, crop: [{a: 1, a: 2}]}\noutput: {path: b.h5}\n")
    assert error(path).startswith(f"{path}: input.crop[0].a: expected each key once")
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: b.h5}\ntraining: {1: 2, 0x1: 3}\n")
    assert error(path).startswith(f"{path}: training.1: expected each key once")


def test_echoed_values_and_keys_are_short(tmp_path):
    """Item 11: every echoed value was its full repr (351 MB for an alias bomb)."""
    for override in ["input.crop=[" + ", ".join(["1"] * 5_000) + "]", "model.name=" + "x" * 100_000,
                     "input.gain=" + "y" * 100_000, "model.H=" + "'" + "z\\n" * 1000 + "'",
                     "training.epochs={" + ", ".join(f"k{i}: {i}" for i in range(1_000)) + "}",
                     "input." + "k" * 10_000 + "=1", "x" * 10_000]:
        message = error(None, REQUIRED + [override])
        assert len(message) < 250 + ECHO_CHARS, message
    assert error(write(tmp_path, "input: {path: a.tif, " + "k" * 500 + ": 1}\n"), ["output.path=b.h5"]).endswith(
        "input.'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk': unknown key; valid "
        "keys: input.path, input.section, input.crop, input.downsample, input.gain, input.offset")
    path = write(tmp_path, "input: {path: a.tif}\noutput: {path: b.h5}\n\"" + "q\\n" * 5000 + "\": 1\n")
    message = error(path)
    assert len(message) < len(str(path)) + 250 and "\n" not in message
    assert short_repr(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    assert len(short_repr("a" * 10**6)) <= ECHO_CHARS
    assert short_repr(10**5000) == "<an integer of 16610 bits>"
    assert short_repr([1, 2]) == "[1, 2]"


@pytest.mark.parametrize("override, message", [
    ("truncation.S=100000000", "--set: truncation.S: expected an integer in [1, 10000], got 100000000"),
    ("model.C=100000000", "--set: model.C: expected an integer in [1, 100000], got 100000000"),
    ("model.H=5000", "--set: model.H: expected an integer in [1, 1024], got 5000"),
    ("patches.size=65", "--set: patches.size: expected an integer or a list of 2 integers, each in [2, 64], got 65"),
    ("resources.max_memory_per_rank=2EiB", "--set: resources.max_memory_per_rank: expected a memory size > 0 and "
                                           "<= 1 EiB such as 2GiB, 1500MB, 2G or a number of bytes, or null, "
                                           "got '2EiB'"),
])
def test_huge_sizes_are_refused(override, message):
    """Item 14: truncation.S = 1e8 or model.C = 1e8 passed validation and died in numpy."""
    assert error(None, REQUIRED + [override]) == message


def test_a_memory_size_beyond_float_range_is_a_config_error():
    """'9…9TiB' with 400 digits used to raise OverflowError (int of an infinite float)."""
    assert error(None, REQUIRED + ["resources.max_memory_per_rank=" + "9" * 400 + "TiB"]).startswith(
        "--set: resources.max_memory_per_rank: expected a memory size > 0 and <= 1 EiB")


def test_a_tile_smaller_than_the_patch_is_refused():
    """Item 17: estimation.tile 16 with 32×32 patches was accepted (each patch computed ~9× or more)."""
    assert error(None, REQUIRED + ["patches.size=32", "estimation.tile=16"]) == \
        "--set: estimation.tile: expected at least patches.size [32, 32] in each direction, got [16, 16]"
    assert "estimation.tile" in error(None, REQUIRED + ["patches.size=[8, 20]", "estimation.tile=[512, 16]"])
    load_config(None, REQUIRED + ["patches.size=[8, 16]", "estimation.tile=[16, 16]"])


def test_a_slow_tile_gets_a_one_line_warning(caplog):
    with caplog.at_level("WARNING", logger="hpc_zsem"):
        load_config(None, REQUIRED + ["estimation.tile=16", "patches.size=12", "training.max_patches=1000"])
    (record,) = caplog.records
    assert record.getMessage() == (
        "--set: estimation.tile: [16, 16] with patches.size [12, 12] computes each patch about 2.8 times in the "
        "streamed pass (patches on tile borders are computed by every tile they touch); tiles of at least 8x the "
        "patch size keep it below 1.3")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpc_zsem"):
        load_config(None, REQUIRED + ["estimation.tile=16", "patches.size=12"])        # not streamed
        load_config(None, REQUIRED + ["training.max_patches=1000", "patches.size=64"])  # default tile 512
    assert not caplog.records


@pytest.mark.parametrize("shape, tile, patch", [((512, 512), (16, 16), (8, 8)), ((600, 500), (16, 20), (12, 5)),
                                                ((512, 384), (64, 64), (64, 64))])
def test_tile_overhead_counts_the_patches_a_streamed_pass_computes(shape, tile, patch):
    computed = sum(tile_grid(t, shape, patch)[1].size for t in plan_tiles(shape, tile, patch))
    assert computed / PatchGrid(shape, patch, 1).n_patches == pytest.approx(tile_overhead(tile, patch), rel=0.02)
