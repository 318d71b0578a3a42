"""Tests of hpc_zsem.config: defaults, overrides, one-line errors, hashing and round trips."""
import pytest
from hypothesis import given, settings, strategies as st

from hpc_zsem.config import Config, config_from_dict, load_config, schema_help
from hpc_zsem.errors import ConfigError

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
    assert cfg.training.block_size == 1024 and cfg.estimation.epochs == 5
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
    assert error(path) == f"{path}: training.epochs: expected an integer >= 0, got 'many'"
    assert error(path, ["training.epochs=3", "model.H=x"]).startswith("--set: model.H: expected an integer")


def test_bool_is_not_int():
    assert "model.H: expected an integer" in error(None, REQUIRED + ["model.H=true"])


def test_out_of_range_and_choices():
    assert "patches.size" in error(None, REQUIRED + ["patches.size=[1,8]"])
    assert "'sssc', 'gpmm'" in error(None, REQUIRED + ["model.name=pca"])
    assert "input.crop" in error(None, REQUIRED + ["input.crop=[5,5,0,4]"])
    assert "input.gain: expected a number > 0" in error(None, REQUIRED + ["input.gain=0"])


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
    assert "input.path (required)" in text and "truncation.crossover (default False)" in text


@settings(max_examples=40, deadline=None)
@given(epochs=st.integers(0, 10**6), seed=st.integers(0, 2**63), H=st.integers(6, 1024),
       stride=st.integers(1, 8))   # at most the default patch size 8
def test_int_overrides_round_trip(epochs, seed, H, stride):
    cfg = load_config(None, REQUIRED + [f"training.epochs={epochs}", f"training.seed={seed}",
                                        f"model.H={H}", f"patches.stride={stride}"])
    assert (cfg.training.epochs, cfg.training.seed, cfg.model.H, cfg.patches.stride) == (epochs, seed, H, stride)
    assert config_from_dict(cfg.to_dict()) == cfg
