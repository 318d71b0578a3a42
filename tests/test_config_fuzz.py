"""Fuzzing the config reader (hypothesis), beside the reader fuzzing of ``test_fuzz_readers.py``: config files
with random anchors, aliases and repeated keys, ``--set`` values of any text, integers of any size and values
of any shape and size must give a Config or a short one-line ConfigError naming the file or ``--set`` and the
key — never another exception, a long message, a value that cannot be stored, or a blow-up.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpc_zsem.config import Config, config_from_dict, load_config, tile_overhead
from hpc_zsem.errors import ConfigError

FUZZ = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
HINTS = {f"{s}.{k}": hint for s, cls in SECTIONS.items() for k, hint in typing.get_type_hints(cls).items()}
DOTTED = list(HINTS)
INT_KEYS = [d for d, hint in HINTS.items() if hint in (int, int | None)]
REQUIRED = ["input.path=in.tif", "output.path=out.h5"]
#: an error message is one line of at most this many characters besides the file name
MAX_MESSAGE = 400

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["sssc", "gpmm", "x.tif", "1e-3", "2GiB", "null"]))
#: values of any shape and size: deep, wide, long
BIG_VALUES = st.one_of(
    SCALARS,
    st.integers(10**30, 10**5000),
    st.text(min_size=200, max_size=5000),
    st.lists(st.integers(), min_size=50, max_size=3000),
    st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                  st.dictionaries(st.text(max_size=300), inner, max_size=6)),
                 max_leaves=60),
)


def _one_short_line(message: str, source: str) -> str:
    """The key a ConfigError message names, after checking it is one short line starting with ``source``."""
    assert "\n" not in message and message.startswith(f"{source}: "), message
    assert len(message) <= len(source) + MAX_MESSAGE, (len(message), message[:300])
    return message[len(source) + 2:].split(": ")[0]


# ------------------------------------------------------------------------------------- YAML files

@st.composite
def documents(draw):
    """(YAML text, expected refusal): a valid config in block style, sometimes with an anchor, an alias or a
    repeated key; the expected refusal is None, ("anchor", line) or ("duplicate", dotted key, line, first)."""
    sections = {"input": {"path": "a.tif"}, "output": {"path": "b.h5"},
                "model": {"H": draw(st.integers(8, 64))}, "patches": {"size": [6, 6]},
                "training": {"epochs": 2, "seed": draw(st.integers(0, 2**63 - 1))}}
    lines: list[tuple[str | None, str, str]] = []            # (section, key or "", text)
    for name, body in sections.items():
        lines.append((name, "", f"{name}:"))
        lines += [(name, key, f"  {key}: {json.dumps(value)}") for key, value in body.items()]
    values = [i for i, (_, key, _) in enumerate(lines) if key]
    kind = draw(st.sampled_from(["none", "anchor", "alias", "both", "duplicate key", "duplicate section"]))
    expected = None
    if kind in ("anchor", "both"):
        i = draw(st.sampled_from(values))
        name, key, _ = lines[i]
        lines[i] = (name, key, f"  {key}: &{draw(st.from_regex(r'[a-z][a-z0-9]{0,8}', fullmatch=True))} "
                               f"{json.dumps(sections[name][key])}")
        expected = ("anchor", i + 1)
    if kind in ("alias", "both"):
        j = draw(st.sampled_from(values))
        name, key, _ = lines[j]
        lines[j] = (name, key, f"  {key}: *{draw(st.from_regex(r'[a-z][a-z0-9]{0,8}', fullmatch=True))}")
        expected = min(expected or ("anchor", j + 1), ("anchor", j + 1), key=lambda e: e[1])
    if kind == "duplicate key":
        i = draw(st.sampled_from(values))
        name, key, text = lines[i]
        end = max(k for k, line in enumerate(lines) if line[0] == name)
        at = draw(st.integers(i + 1, end + 1))
        lines.insert(at, (name, key, text if draw(st.booleans()) else f"  {key}: 7"))
        expected = ("duplicate", f"{name}.{key}", at + 1, i + 1)
    if kind == "duplicate section":
        i = draw(st.sampled_from([k for k, (_, key, _) in enumerate(lines) if not key]))
        name = lines[i][0]
        lines += [(name, "", f"{name}:"), (name, "seed", "  seed: 3")]
        expected = ("duplicate", name, len(lines) - 1, i + 1)
    return "\n".join(text for _, _, text in lines) + "\n", expected


@FUZZ
@given(documents())
def test_files_with_anchors_aliases_or_repeated_keys_are_refused_naming_the_line(tmp_path, case):
    text, expected = case
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        message = str(exc)
        named = _one_short_line(message, str(path))
        assert expected is not None, message
        if expected[0] == "anchor":
            assert named == f"line {expected[1]}, column " + message.split("column ")[1].split(":")[0]
            assert "expected no YAML anchors (&name) or aliases (*name)" in message
        else:
            _, key, line, first = expected
            assert message == (f"{path}: {key}: expected each key once in a mapping, got it again at line {line} "
                               f"(first at line {first})")
        return
    assert expected is None, text


# ----------------------------------------------------------------------------------------- --set

TEXT_KEYS = {d: hint is not str for d, hint in HINTS.items() if hint in (str, str | None)}


@FUZZ
@given(st.sampled_from(sorted(TEXT_KEYS)), st.text(max_size=40) | st.sampled_from(
    ["null", "~", "yes", "no", "a #1.tif", "[a.tif]", "{a: 1}", "&a x", "*a", "1e3", "- x", "'q'", "a: b"]))
def test_set_takes_any_text_literally_for_text_keys(dotted, text):
    """--set KEY=TEXT gives exactly TEXT for a text key (only exactly 'null' is null, where the key may be
    null): no comment stripping, no YAML booleans, numbers, lists, anchors or quotes."""
    try:
        cfg = load_config(None, REQUIRED + [f"{dotted}={text}"])
    except ConfigError as exc:
        assert _one_short_line(str(exc), "--set") == dotted, str(exc)
        assert text == "" or dotted.startswith(("model.", "truncation.")), str(exc)   # empty, or not a choice
        return
    section, key = dotted.split(".")
    expected = None if text == "null" and TEXT_KEYS[dotted] else text
    assert getattr(getattr(cfg, section), key) == expected


# -------------------------------------------------------------------------------------- integers

@FUZZ
@given(st.sampled_from(INT_KEYS), st.one_of(st.integers(), st.integers(-2**70, 2**70),
                                            st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64])))
def test_every_accepted_integer_can_be_stored_in_a_result_file(dotted, value):
    """Item 7: any integer a config accepts fits the int64 HDF5 attributes and arrays of a result file."""
    h5py = pytest.importorskip("h5py")
    try:
        cfg = load_config(None, REQUIRED + [f"{dotted}={value}"])
    except ConfigError as exc:
        assert _one_short_line(str(exc), "--set") in DOTTED
        return
    with h5py.File("attrs.h5", "w", driver="core", backing_store=False) as f:
        for section, body in cfg.to_dict().items():
            for key, v in body.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    f.attrs[f"{section}.{key}"] = v
                    assert f.attrs[f"{section}.{key}"].dtype.kind == "i"


# --------------------------------------------------------------------------- any value, any key

@FUZZ
@given(st.sampled_from(DOTTED), BIG_VALUES)
def test_any_value_gives_a_config_or_a_short_error(dotted, value):
    """Item 11: an echoed value is cut to a short repr, whatever its size (was the full repr)."""
    section, key = dotted.split(".")
    raw = {"input": {"path": "a.tif"}, "output": {"path": "b.h5"}}
    raw.setdefault(section, {})[key] = value
    try:
        cfg = config_from_dict(raw, source="fuzz")
    except ConfigError as exc:
        assert _one_short_line(str(exc), "fuzz") in DOTTED
        return
    assert config_from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(st.one_of(st.text(min_size=1, max_size=3000), st.integers(), st.integers(10**4400, 10**5000)), BIG_VALUES,
       st.sampled_from([None, *SECTIONS]))
def test_any_unknown_key_gives_a_short_error(key, value, section):
    raw = {"input": {"path": "a.tif"}, "output": {"path": "b.h5"}}
    if section is None:
        assume(key not in SECTIONS)
        raw[key] = value
    else:
        assume(key not in typing.get_type_hints(SECTIONS[section]))
        raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="fuzz")
    _one_short_line(str(info.value), "fuzz")
    assert "unknown key" in str(info.value)


# ----------------------------------------------------------------------------------------- tiles

@FUZZ
@given(st.integers(2, 64), st.integers(2, 64), st.integers(16, 200), st.integers(16, 200), st.booleans())
def test_tiles_smaller_than_the_patch_are_refused_and_slow_ones_warned(h, w, ty, tx, streamed):
    """Item 17: a tile smaller than the patch is refused; a legal one that computes each patch twice or more
    in a streamed pass gets one warning line."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("hpc_zsem")
    logger.addHandler(handler)
    try:
        cfg = load_config(None, REQUIRED + [f"patches.size=[{h}, {w}]", f"estimation.tile=[{ty}, {tx}]",
                                            "patches.stride=1"] + (["training.max_patches=100"] if streamed else []))
    except ConfigError as exc:
        assert str(exc) == (f"--set: estimation.tile: expected at least patches.size [{h}, {w}] in each direction, "
                            f"got [{ty}, {tx}]")
        assert ty < h or tx < w
        return
    finally:
        logger.removeHandler(handler)
    assert ty >= h and tx >= w and cfg.estimation.tile == (ty, tx)
    slow = streamed and tile_overhead((ty, tx), (h, w)) >= 2
    assert len(records) == int(slow) and all("\n" not in r.getMessage() for r in records)
