"""Property-based tests (hypothesis) of patch extraction/merging and of the config parser.

Patches: for random image (and stack) shapes, patch sizes and strides, every pixel is covered; merging the
noisy patches themselves gives back the image with zero variance; merging over any partition of the patch
set (simulated ranks and blocks) gives the same sums as one accumulator; extraction and merging match naive
loops.

Config: random documents of valid keys with random (valid or invalid) values either load into a Config that
round-trips through ``to_dict``/``config_from_dict`` and YAML, or raise a ConfigError naming the dotted key of
an offending value; unknown keys always raise a ConfigError naming the key; nothing else is ever raised.
"""
from __future__ import annotations

import dataclasses
import math
import string
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hpc_zsem.config import Config, config_from_dict, load_config
from hpc_zsem.errors import ConfigError
from hpc_zsem.patches import PatchGrid, PixelAccumulator

PROPS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
CONFIG_PROPS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


# ================================================================================================== patches

@st.composite
def grids(draw, max_side=24, max_sections=3, covering=True):
    """(PatchGrid, image) with random geometry; ``covering`` keeps stride <= patch size (so every pixel is
    covered by the grid's construction)."""
    Y = draw(st.integers(1, max_side))
    X = draw(st.integers(1, max_side))
    h = draw(st.integers(1, min(Y, 8)))
    w = draw(st.integers(1, min(X, 8)))
    stride = draw(st.integers(1, min(h, w) if covering else max(h, w) + 4))
    sections = draw(st.integers(1, max_sections))
    grid = PatchGrid((Y, X), (h, w), stride, sections)
    seed = draw(st.integers(0, 2**32 - 1))
    image = np.random.default_rng(seed).normal(100.0, 30.0, grid.volume_shape)
    return grid, image, seed


def _naive_corners(length: int, size: int, stride: int) -> list[int]:
    corners = list(range(0, length - size + 1, stride))
    if corners[-1] != length - size:
        corners.append(length - size)
    return corners


def _naive_patches(grid: PatchGrid, image: np.ndarray) -> np.ndarray:
    """All patches by a double loop over corners (sections outermost, then rows, then columns)."""
    stack = image.reshape((grid.sections, *grid.image_shape))
    h, w = grid.size
    rows = []
    for z in range(grid.sections):
        for y in _naive_corners(grid.image_shape[0], h, grid.stride):
            for x in _naive_corners(grid.image_shape[1], w, grid.stride):
                rows.append(stack[z, y:y + h, x:x + w].ravel())
    return np.array(rows, dtype=np.float64)


@PROPS
@given(grids())
def test_every_pixel_is_covered(case):
    grid, image, _ = case
    counts = np.bincount(grid.pixel_index(np.arange(grid.n_patches)).ravel(), minlength=image.size)
    assert counts.size == image.size and counts.min() >= 1
    # and no patch reaches outside its section
    z, y, x = grid.corners(np.arange(grid.n_patches))
    assert z.min() >= 0 and z.max() < grid.sections
    assert (y + grid.size[0] <= grid.image_shape[0]).all() and (x + grid.size[1] <= grid.image_shape[1]).all()


@PROPS
@given(grids())
def test_extract_matches_a_naive_double_loop(case):
    grid, image, seed = case
    naive = _naive_patches(grid, image)
    assert grid.n_patches == len(naive)
    np.testing.assert_array_equal(grid.extract(image, np.arange(grid.n_patches)), naive)
    # any subset, in any order
    pick = np.random.default_rng(seed).permutation(grid.n_patches)[: max(1, grid.n_patches // 2)]
    np.testing.assert_array_equal(grid.extract(image, pick), naive[pick])


def _merged_everything(grid, image, estimates):
    """One accumulator over all patches of ``grid`` with the given estimates."""
    acc = PixelAccumulator(grid.volume_shape)
    acc.add(grid, np.arange(grid.n_patches), grid.extract(image, np.arange(grid.n_patches)), estimates)
    return acc


def _noisy_estimates(grid, image, seed, sigma):
    """All patches of ``image`` and estimates = patches + N(0, σ²) noise."""
    Y = grid.extract(image, np.arange(grid.n_patches))
    return Y, Y + np.random.default_rng(seed).normal(0.0, sigma, Y.shape)


@PROPS
@given(grids())
def test_merging_the_noisy_patches_gives_back_the_image_with_zero_variance(case):
    grid, image, _ = case
    acc = _merged_everything(grid, image, grid.extract(image, np.arange(grid.n_patches)))
    mean, variance = PixelAccumulator.finish(acc.sums, image)
    np.testing.assert_array_equal(mean, image)
    np.testing.assert_array_equal(variance, 0.0)
    # counts are whole numbers and sum to n_patches · D
    assert acc.sums[0].sum() == grid.n_patches * grid.dim


@PROPS
@given(grids(), st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_merging_over_any_partition_gives_the_same_sums(case, ranks, max_blocks, seed):
    """Patches dealt out to random 'ranks' (any assignment, not only contiguous shards), each rank adding its
    patches in random 'blocks' in random order, then the per-rank sums added: identical counts, sums equal to
    1e-12, to one accumulator over everything."""
    grid, image, _ = case
    Y, estimates = _noisy_estimates(grid, image, seed, 5.0)
    one = _merged_everything(grid, image, estimates)

    rng = np.random.default_rng(seed + 1)
    owner = rng.integers(0, ranks, grid.n_patches)
    total = np.zeros_like(one.sums)
    for r in range(ranks):
        mine = rng.permutation(np.flatnonzero(owner == r))
        acc = PixelAccumulator(grid.volume_shape)
        for block in np.array_split(mine, rng.integers(1, max_blocks + 1)):
            if block.size:
                acc.add(grid, block, Y[block], estimates[block])
        total += acc.sums
    np.testing.assert_array_equal(total[0], one.sums[0])
    scale = max(1.0, float(np.abs(one.sums[1:]).max()))
    np.testing.assert_allclose(total[1:], one.sums[1:], rtol=1e-12, atol=1e-12 * scale)
    m1, v1 = PixelAccumulator.finish(one.sums, image)
    m2, v2 = PixelAccumulator.finish(total, image)
    np.testing.assert_allclose(m2, m1, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(v2, v1, rtol=1e-9, atol=1e-9 * scale**2)


@PROPS
@given(grids(max_side=14, max_sections=2), st.integers(0, 2**32 - 1))
def test_merge_equals_naive_per_pixel_mean_and_population_variance(case, seed):
    grid, image, _ = case
    everything = np.arange(grid.n_patches)
    _, estimates = _noisy_estimates(grid, image, seed, 10.0)
    acc = _merged_everything(grid, image, estimates)
    mean, variance = PixelAccumulator.finish(acc.sums, image)
    per_pixel: list[list[float]] = [[] for _ in range(image.size)]
    for n, pixels in enumerate(grid.pixel_index(everything)):
        for d, p in enumerate(pixels):
            per_pixel[p].append(estimates[n, d])
    naive_mean = np.array([np.mean(v) for v in per_pixel]).reshape(image.shape)
    naive_var = np.array([np.var(v) for v in per_pixel]).reshape(image.shape)
    np.testing.assert_allclose(mean, naive_mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(variance, naive_var, rtol=1e-9, atol=1e-8)


def test_stride_larger_than_the_patch_is_refused_before_any_work():
    """Found by this file: patches.size 4 with patches.stride 5 leaves pixels 4, 9 of each row uncovered and
    used to fail only at the very end of a run. Now the config and PatchGrid refuse it."""
    with pytest.raises(ValueError, match="stride 5 is larger than the patch size"):
        PatchGrid((14, 14), (4, 4), 5)
    with pytest.raises(ConfigError, match="patches.stride"):
        load_config(None, ["input.path=a.tif", "output.path=b.h5", "patches.size=4", "patches.stride=5"])


# ================================================================================================== config

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
FIELDS = {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
DOTTED = [f"{s}.{k}" for s, fields in FIELDS.items() for k in fields]
REQUIRED = [f"{s}.{k}" for s, fields in FIELDS.items() for k, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
BASE = {"input": {"path": "in.tif"}, "output": {"path": "out.h5"}}

_TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=8)
_WORDS = st.sampled_from(["sssc", "gpmm", "diag", "full", "shared", "per_class", "fitness", "uniform", "best",
                          "sparse", "random", "x.tif", "out.h5", "builtin:demo", "1e-3", "2.5", "", "true",
                          "null", "8", "-1"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.integers(0, 1500), st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 100), _WORDS, _TEXT)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.integers(-2, 70), max_size=5),
    st.lists(st.integers(0, 40), min_size=4, max_size=4).map(sorted),     # often a valid crop box
    st.lists(SCALARS, max_size=3),
    st.dictionaries(_TEXT, SCALARS, max_size=2),
)
_CANDIDATES = [None, True, False, 0, 1, 2, 3, 4, 5, 8, 12, 20, 33, 64, 100, 1000, 0.5, 2.5, 1800.0, "1e-3", "sssc",
               "gpmm", "diag", "full", "shared", "per_class", "fitness", "uniform", "best", "sparse", "random",
               "x.tif", "builtin:demo", "run/out.h5", [2, 2], [8, 8], [3, 5], [0, 10, 0, 10], [5, 20, 3, 9]]


def _valid_values(dotted: str):
    """Values the field accepts (from a fixed candidate list), mixed with arbitrary ones."""
    ok = [v for v in _CANDIDATES if _valid(dotted, v)]
    if not ok:
        return VALUES
    return st.integers(0, 3).flatmap(lambda i: VALUES if i == 0 else st.sampled_from(ok))   # 3/4 accepted


_KEY = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=12)
#: keys whose type is text (str or str | None) → whether they may be null: --set takes their value literally
TEXT_KEYS = {f"{s}.{k}": hint is not str for s, cls in SECTIONS.items()
             for k, hint in typing.get_type_hints(cls).items() if hint in (str, str | None)}


def _check(dotted: str):
    section, key = dotted.split(".")
    return FIELDS[section][key].metadata.get("check")


def _valid(dotted: str, value) -> bool:
    """Whether the field's own validator accepts the value (the oracle for single-key problems)."""
    check = _check(dotted)
    if check is None:   # schema without per-field validators: no single-key oracle
        return True
    try:
        check(value)
    except Exception:   # noqa: BLE001 - any refusal counts as "invalid" for the oracle
        return False
    return True


def _named_key(message: str, source: str) -> str:
    """The key a ConfigError names: ``"<source>: <key>: ..."``."""
    assert message.startswith(f"{source}: "), message
    return message[len(source) + 2:].split(": ")[0]


def _load_text(text: str) -> Config:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path)
        except ConfigError as exc:   # re-raise with the file name replaced by a stable marker
            raise ConfigError(str(exc).replace(str(path), "<file>", 1)) from None


def _assert_round_trips(cfg: Config) -> None:
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict() and again.hash() == cfg.hash()
    assert _load_text(cfg.to_yaml()) == cfg


def _offending(raw: dict) -> set[str]:
    """Keys whose value is refused on its own: invalid values, missing required keys, non-mapping sections."""
    bad = set()
    for section, fields in FIELDS.items():
        body = raw.get(section)
        if body is not None and not isinstance(body, dict):
            bad.add(section)
            continue
        body = body or {}
        for key in fields:
            dotted = f"{section}.{key}"
            if key not in body:
                if dotted in REQUIRED:
                    bad.add(dotted)
            elif not _valid(dotted, body[key]):
                bad.add(dotted)
    return bad


def _check_outcome(raw: dict, load, source: str) -> None:
    """load() must return a round-tripping Config, or raise a ConfigError naming an offending key; with no
    single-key problem, only a cross-key check may refuse (and it names a schema key)."""
    offending = _offending(raw)
    try:
        cfg = load()
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg
        named = _named_key(msg, source)
        event("refused: " + ("single-key problem" if offending else "cross-key check"))
        if offending:
            assert named in offending, (msg, offending)
        else:
            assert named in DOTTED, msg
            if named in ("truncation.S", "truncation.parents"):   # the known cross checks: verify the reason
                t, m = raw.get("truncation") or {}, raw.get("model") or {}
                S, H, P = t.get("S", 60), m.get("H", 64), t.get("parents", 20)
                assert m.get("name", "sssc") == "sssc" and (S > 2**H or P > S), (msg, raw)
        return
    assert not offending, (offending, raw)
    event("loaded")
    _assert_round_trips(cfg)


@st.composite
def raw_configs(draw):
    """A config document: BASE, with random schema keys set to random values, required keys sometimes dropped,
    a section sometimes replaced by a non-mapping."""
    raw = {s: dict(v) for s, v in BASE.items()}
    for dotted in draw(st.lists(st.sampled_from(DOTTED), unique=True, max_size=5)):
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = draw(_valid_values(dotted))
    for dotted in REQUIRED:
        if draw(st.integers(0, 9)) == 0:
            section, key = dotted.split(".")
            raw.get(section, {}).pop(key, None)
    if draw(st.integers(0, 14)) == 0:
        raw[draw(st.sampled_from(list(SECTIONS)))] = draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=2)))
    return raw


@CONFIG_PROPS
@given(raw_configs())
def test_random_config_files_load_or_name_the_offending_key(raw):
    text = yaml.safe_dump(raw, allow_unicode=True)
    seen = yaml.safe_load(text)          # what the loader sees after the YAML round trip
    _check_outcome(seen, lambda: _load_text(text), "<file>")


def _override(dotted: str, value) -> tuple[str, typing.Any]:
    """What a user types after ``--set dotted=`` for ``value``, and the value the loader must see: a text key
    takes the text literally (only exactly ``null`` is null, where the key may be null); others read YAML."""
    if dotted in TEXT_KEYS:
        text = "null" if value is None else str(value)
        return text, None if text == "null" and TEXT_KEYS[dotted] else text
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
    return text, yaml.safe_load(text)


@CONFIG_PROPS
@given(st.lists(st.sampled_from(DOTTED), max_size=5), st.data())
def test_random_set_overrides_load_or_name_the_offending_key(keys, data):
    overrides = ["input.path=in.tif", "output.path=out.h5"]
    raw = {s: dict(v) for s, v in BASE.items()}
    for dotted in keys:
        text, seen = _override(dotted, data.draw(_valid_values(dotted)))
        overrides.append(f"{dotted}={text}")
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = seen
    _check_outcome(raw, lambda: load_config(None, overrides), "--set")


@CONFIG_PROPS
@given(_KEY, VALUES, st.sampled_from([None, *SECTIONS]))
def test_unknown_keys_always_raise_naming_the_key(key, value, section):
    raw = {s: dict(v) for s, v in BASE.items()}
    if section is None:
        assume(key not in SECTIONS)
        raw[key] = value
        expected = key
    else:
        assume(key not in FIELDS[section])
        raw.setdefault(section, {})[key] = value
        expected = f"{section}.{key}"
    with pytest.raises(ConfigError) as info:
        _load_text(yaml.safe_dump(raw, allow_unicode=True))
    msg = str(info.value)
    assert _named_key(msg, "<file>") == expected and "unknown key" in msg and "\n" not in msg
    # and the same through --set
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
    target = expected if section is not None else f"{key}.x"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["input.path=in.tif", "output.path=out.h5", f"{target}={text}"])
    assert _named_key(str(info.value), "--set") == expected


@CONFIG_PROPS
@given(st.sampled_from(DOTTED), st.data())
def test_a_typo_of_a_key_is_refused_with_a_suggestion(dotted, data):
    section, key = dotted.split(".")
    assume(len(key) >= 4)
    i = data.draw(st.integers(0, len(key) - 1))
    typo = key[:i] + key[i + 1:]
    assume(typo not in FIELDS[section])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["input.path=in.tif", "output.path=out.h5", f"{section}.{typo}=1"])
    msg = str(info.value)
    assert f"{section}.{typo}: unknown key; did you mean '{section}." in msg


JSONISH = st.recursive(st.one_of(SCALARS, _KEY), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(_KEY, st.sampled_from(DOTTED + list(SECTIONS))),
                                                 inner, max_size=3)), max_leaves=12)


@CONFIG_PROPS
@given(st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), _KEY), JSONISH, max_size=5))
def test_arbitrary_documents_give_a_config_or_a_config_error(raw):
    try:
        cfg = _load_text(yaml.safe_dump(raw, allow_unicode=True))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    _assert_round_trips(cfg)


@CONFIG_PROPS
@given(st.text(max_size=80))
def test_arbitrary_text_gives_a_config_or_a_config_error(text):
    try:
        _load_text(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_a_config_file_that_is_not_utf8_gives_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"input:\n  path: \"caf\xe9.tif\"\noutput:\n  path: out.h5\n")
    with pytest.raises(ConfigError, match="latin1.yaml"):
        load_config(path)


def test_a_deeply_nested_document_gives_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(None, ["input.path=a.tif", "output.path=b.h5", "model.H=" + "[" * 5000 + "]" * 5000])


def test_nan_and_infinite_numbers_are_refused_with_the_key():
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match=r"input\.gain: expected a number > 0"):
            config_from_dict({"input": {"path": "a.tif", "gain": value}, "output": {"path": "b.h5"}})
