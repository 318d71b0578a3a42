"""YAML config → typed, validated, frozen :class:`Config`.

The schema is declarative: every section is a frozen dataclass whose fields carry their validator, default
and help text (``_opt`` / ``_req``); a generic walker checks a raw mapping against it. Adding a section means
adding one dataclass and one field of :class:`Config`. Every error is a one-line :class:`ConfigError`
``"<file or --set>: <dotted.key>: expected <what>, got <repr>"``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, get_type_hints

import yaml

from hpc_zsem.errors import ConfigError

OVERRIDE_SOURCE = "--set"


class _Expected(Exception):
    """Raised by a validator: ``what`` completes the sentence "expected <what>"."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


Validator = Callable[[Any], Any]


# --------------------------------------------------------------------------------------------- validators

def _is_int(value: Any) -> bool:
    """True for a real int (``bool`` is not an int here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None, *, nullable: bool = False) -> Validator:
    """An int in [lo, hi] (either bound optional), or null if ``nullable``."""
    what = "an integer" + _bounds_text(lo, hi) + (" or null" if nullable else "")

    def check(value: Any) -> int | None:
        if value is None and nullable:
            return None
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _Expected(what)
        return value

    return check


def _bounds_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def real(*, positive: bool = False, nonnegative: bool = False, nullable: bool = False) -> Validator:
    """A finite float (an int is accepted), > 0 if ``positive``, >= 0 if ``nonnegative``, or null if ``nullable``.

    A string such as ``1e-3`` is accepted as a number: PyYAML (YAML 1.1) reads exponents without a dot as
    strings, which would otherwise surprise users.
    """
    what = ("a number > 0" if positive else "a number >= 0" if nonnegative else "a number") + \
        (" or null" if nullable else "")

    def check(value: Any) -> float | None:
        if value is None and nullable:
            return None
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Expected(what)
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0) or (nonnegative and value < 0):
            raise _Expected(what)
        return value

    return check


def string(*, nullable: bool = False) -> Validator:
    """A non-empty string, or null if ``nullable``."""
    what = "a non-empty string" + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            raise _Expected(what)
        return value

    return check


def boolean() -> Validator:
    """``true`` or ``false``."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Expected("true or false")
        return value

    return check


def choice(*options: str) -> Validator:
    """One of the given strings."""
    what = "one of " + ", ".join(repr(o) for o in options)

    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _Expected(what)
        return value

    return check


def int_pair(lo: int, hi: int) -> Validator:
    """Two ints in [lo, hi] (a single int n means [n, n]); stored as a tuple."""
    what = f"an integer or a list of 2 integers, each in [{lo}, {hi}]"

    def check(value: Any) -> tuple[int, int]:
        if _is_int(value):
            value = [value, value]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _Expected(what)
        if not all(_is_int(v) and lo <= v <= hi for v in value):
            raise _Expected(what)
        return tuple(value)

    return check


def crop_box() -> Validator:
    """null or [y0, y1, x0, x1] with 0 <= y0 < y1 and 0 <= x0 < x1; stored as a tuple."""
    what = "null or a list [y0, y1, x0, x1] of integers with 0 <= y0 < y1 and 0 <= x0 < x1"

    def check(value: Any) -> tuple[int, int, int, int] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_int(v) for v in value):
            raise _Expected(what)
        y0, y1, x0, x1 = value
        if not (0 <= y0 < y1 and 0 <= x0 < x1):
            raise _Expected(what)
        return tuple(value)

    return check


# ------------------------------------------------------------------------------------------------- schema

def _opt(default: Any, check: Validator, help: str) -> Any:
    """A field with a default; ``check`` validates and normalises a user value."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


def _req(check: Validator, help: str) -> Any:
    """A required field (no default)."""
    return dataclasses.field(metadata={"check": check, "help": help})


@dataclass(frozen=True)
class InputConfig:
    path: str = _req(string(), "input image (TIFF), relative to the working directory, or 'builtin:demo'")
    section: int | None = _opt(None, integer(0, nullable=True), "index of one section of a stack")
    crop: tuple[int, int, int, int] | None = _opt(None, crop_box(), "[y0, y1, x0, x1] region to denoise")
    downsample: int = _opt(1, integer(1), "keep every k-th pixel in each direction (after crop)")
    gain: float | None = _opt(None, real(positive=True, nullable=True), "GPMM: counts = (I - offset)/gain; null = estimate")
    offset: float | None = _opt(None, real(nullable=True), "GPMM: intensity of zero counts; null = estimate")


@dataclass(frozen=True)
class PatchesConfig:
    size: tuple[int, int] = _opt((8, 8), int_pair(2, 64), "patch height and width (an int n means [n, n])")
    stride: int = _opt(1, integer(1), "step between patches")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("sssc", choice("sssc", "gpmm"), "generative model")
    H: int = _opt(64, integer(1, 1024), "SSSC: number of latents")
    psi: str = _opt("diag", choice("diag", "full"), "SSSC: prior covariance of the slab")
    C: int = _opt(100, integer(1), "GPMM: number of classes")
    gamma: str = _opt("shared", choice("shared", "per_class"), "GPMM: Gamma prior shared or per class")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = _opt(50, integer(0), "training epochs")
    seed: int = _opt(0, integer(0), "random seed")
    block_size: int = _opt(1024, integer(1), "patches per vectorised E-step block (speed/memory only: random "
                           "numbers are keyed by global patch index, so results do not depend on it)")
    max_patches: int | None = _opt(None, integer(1, nullable=True), "train on this many patches drawn uniformly "
                                   "across the image/stack (reading only their regions), then estimate tile by tile; "
                                   "null = train on all patches in memory")
    per_section: bool = _opt(False, boolean(), "stacks: learn one model per section (each section is trained and "
                             "estimated on its own; the output is still one (Z, Y, X) volume)")


@dataclass(frozen=True)
class EstimationConfig:
    epochs: int = _opt(5, integer(0), "evolutionary E-steps with frozen parameters before estimating")
    tile: tuple[int, int] = _opt((512, 512), int_pair(16, 65536), "tile height and width of the streamed "
                                 "estimation pass (with training.max_patches)")


@dataclass(frozen=True)
class TruncationConfig:
    S: int = _opt(60, integer(1), "states per truncated set")
    parents: int = _opt(20, integer(1), "parents per generation")
    children: int = _opt(1, integer(1), "children per parent")
    generations: int = _opt(1, integer(1), "generations per E-step")
    selection: str = _opt("fitness", choice("fitness", "uniform", "best"), "parent selection")
    mutation: str = _opt("random", choice("sparse", "random"), "bit-flip mutation: random = one uniformly chosen "
                         "bit; sparse = per-bit flips drifting towards the prior's number of active units")
    crossover: bool = _opt(False, boolean(), "use crossover")


@dataclass(frozen=True)
class OutputConfig:
    path: str = _req(string(), "result file (.h5)")


@dataclass(frozen=True)
class LoggingConfig:
    every_epochs: int = _opt(1, integer(1), "epochs between progress lines")


@dataclass(frozen=True)
class CheckpointConfig:
    path: str | None = _opt(None, string(nullable=True), "checkpoint file; null = output.path with suffix .ckpt.h5")
    every_epochs: int = _opt(10, integer(0), "write a checkpoint every n epochs (0 = off)")
    every_seconds: float = _opt(1800.0, real(nonnegative=True), "write a checkpoint when this many seconds have "
                                "passed since the last one (0 = off)")


def memory_size() -> Validator:
    """A memory size such as 2GiB, 1500MB, 2G or a number of bytes (see resources.parse_bytes), or null."""
    from hpc_zsem.resources import parse_bytes

    def check(value: Any) -> int | None:
        if value is None:
            return None
        try:
            return parse_bytes(value)
        except ConfigError:
            raise _Expected("a memory size > 0 such as 2GiB, 1500MB, 2G or a number of bytes, or null") from None

    return check


@dataclass(frozen=True)
class ResourcesConfig:
    max_memory_per_rank: int | None = _opt(None, memory_size(), "refuse to start when the estimated memory per "
                                           "rank exceeds this (e.g. 4GiB); null = no check")


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; build it with :func:`load_config` or :func:`config_from_dict`."""

    input: InputConfig
    patches: PatchesConfig
    model: ModelConfig
    training: TrainingConfig
    estimation: EstimationConfig
    truncation: TruncationConfig
    output: OutputConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    resources: ResourcesConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of builtins (tuples become lists)."""
        return {name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in _sections()}

    def to_yaml(self) -> str:
        """The config as YAML text (sections and keys in schema order)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def hash(self) -> str:
        """Hex sha256 of the canonical JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _sections() -> dict[str, type]:
    """Section name → section dataclass, in schema order."""
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def schema_help() -> str:
    """One line per key: ``section.key (default ...): help`` — for ``--help`` texts and docs."""
    lines = []
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else f"default {_plain(f.default)!r}"
            lines.append(f"{name}.{f.name} ({default}): {f.metadata['help']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- walker

def _unknown(source: str, key: str, valid: Sequence[str]) -> ConfigError:
    """ConfigError for an unknown dotted ``key``, suggesting the closest valid key."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: {key}: unknown key{hint}")


def _build_section(name: str, cls: type, raw: Any, sources: Mapping[str, str], default_source: str) -> Any:
    """Validate one section's raw mapping against its dataclass and construct it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{default_source}: {name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{name}.{key}"
            raise _unknown(sources.get(dotted, default_source), dotted, [f"{name}.{k}" for k in fields])
    values = {}
    for key, f in fields.items():
        dotted = f"{name}.{key}"
        source = sources.get(dotted, default_source)
        if key not in raw:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"{source}: {dotted}: missing required key ({f.metadata['help']}); "
                                  f"set it in the config file or with --set {dotted}=...")
            continue
        try:
            values[key] = f.metadata["check"](raw[key])
        except _Expected as exc:
            raise ConfigError(f"{source}: {dotted}: expected {exc.what}, got {raw[key]!r}") from None
    return cls(**values)


def _check_cross(cfg: Config, sources: Mapping[str, str], default_source: str) -> None:
    """Checks that involve several keys."""
    if cfg.patches.stride > min(cfg.patches.size):
        source = sources.get("patches.stride", default_source)
        raise ConfigError(f"{source}: patches.stride: expected at most the patch size {min(cfg.patches.size)} "
                          f"(larger strides leave pixels uncovered), got {cfg.patches.stride}")
    if cfg.model.name != "sssc":
        return
    t, H = cfg.truncation, cfg.model.H
    if t.S > 2**H:
        source = sources.get("truncation.S", default_source)
        raise ConfigError(f"{source}: truncation.S: expected at most 2**model.H = {2**H} distinct states, got {t.S}")
    if t.parents > t.S:
        source = sources.get("truncation.parents", default_source)
        raise ConfigError(f"{source}: truncation.parents: expected at most truncation.S = {t.S}, got {t.parents}")


def _top_level(raw: Any, source: str) -> Mapping:
    """The document's top level: a mapping of sections (an empty document counts as empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {raw!r}")
    return raw


def _build(raw: Any, sources: Mapping[str, str], default_source: str) -> Config:
    """Validate a raw top-level mapping and construct the :class:`Config`."""
    raw = _top_level(raw, default_source)
    sections = _sections()
    for name in raw:
        if name not in sections:
            raise _unknown(sources.get(str(name), default_source), str(name), list(sections))
    cfg = Config(**{name: _build_section(name, cls, raw.get(name), sources, default_source)
                    for name, cls in sections.items()})
    _check_cross(cfg, sources, default_source)
    return cfg


def _read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML document of a config file; any failure is a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{os.fspath(path)}: expected a UTF-8 text (YAML) file") from None
    except RecursionError:
        raise ConfigError(f"{os.fspath(path)}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{os.fspath(path)}: YAML syntax error{line}: {problem}") from None


def _apply_override(raw: dict, text: str, sources: dict[str, str]) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to ``raw`` in place."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{OVERRIDE_SOURCE}: expected section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(value_text)
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"{OVERRIDE_SOURCE}: {key}: expected a YAML value, got {value_text!r}") from None
    section, name = parts
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    raw[section][name] = value
    sources[key] = OVERRIDE_SOURCE
    sources.setdefault(section, OVERRIDE_SOURCE)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (None = all defaults), apply ``--set`` overrides and validate.

    Raises :class:`ConfigError` with a one-line message naming the file or ``--set`` and the key.
    """
    source = os.fspath(path) if path is not None else OVERRIDE_SOURCE
    raw = _top_level(_read_yaml(path) if path is not None else None, source)
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    sources: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, sources)
    return _build(raw, sources, source)


def config_from_dict(d: Mapping[str, Any], source: str = "stored config") -> Config:
    """Re-build a :class:`Config` from :meth:`Config.to_dict` output (e.g. stored in a result file)."""
    return _build(d, {}, source)
