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
import logging
import math
import os
import re
import reprlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol, cast, get_type_hints

import yaml

from hpc_zsem.errors import ConfigError
from hpc_zsem.units import SIZE_TEXT, parse_bytes

OVERRIDE_SOURCE = "--set"

#: how ``--set section.key=VALUE`` reads VALUE (for ``--help`` texts and docs)
OVERRIDE_HELP = ("override a config key, e.g. --set model.H=128 (repeatable); the value is YAML (numbers, true/false, "
                 "[lists], null) except for text keys (paths, names), where it is taken literally: "
                 "--set 'input.path=img/a #1.tif' is that file, and only exactly 'null' means null "
                 "(for keys that may be null)")

#: longest echo of a user's value in an error message (longer ones are cut and end in "…")
ECHO_CHARS = 80
#: YAML integers longer than this many characters stay text (Python refuses to convert > 4300 digits)
MAX_INT_CHARS = 200

#: upper bounds of the integer keys: a value beyond them is a typo, or cannot be stored or allocated
MAX_SEED = 2**63 - 1            # result files store the seed as an int64 HDF5 attribute
MAX_PIXEL = 2**31 - 1           # coordinates and section indices (products of two stay within int64)
MAX_EPOCHS = 10**6
MAX_PATCHES = 10**12            # a 1-terapixel mosaic has about as many patches
MAX_BLOCK = 2**20
MAX_S = 10_000
MAX_C = 100_000
MAX_NEW_STATES = 1_000          # children per parent, generations per E-step

log = logging.getLogger("hpc_zsem")


class _Expected(Exception):
    """Raised by a validator: ``what`` completes the sentence "expected <what>"."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class Validator(Protocol):
    """A config value check: returns the (normalised) value or raises ``_Expected``; ``what`` completes
    "expected ..." in messages and the schema listing."""

    what: str

    def __call__(self, value: Any) -> Any: ...


class _Echo(reprlib.Repr):
    """reprlib with room for a config value; huge integers are described (Python refuses to print them)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = ECHO_CHARS
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 8
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 13_000:          # about 3900 digits; Python refuses to print more than 4300
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_ECHO = _Echo()


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message: one line of at most :data:`ECHO_CHARS` characters (a longer one
    ends in "…"), computed without building the full repr of a huge value."""
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 1] + "…"


def _key_text(key: Any) -> str:
    """A user's key as it appears in a message: as written if it is short printable text, else its short repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= ECHO_CHARS:
        return key
    return short_repr(key)


# --------------------------------------------------------------------------------------------- validators

def _described(check: Callable[[Any], Any], what: str) -> Validator:
    """``check`` with ``check.what`` = what it accepts (completes "expected ..."; listed by :func:`schema_help`)."""
    setattr(check, "what", what)
    return cast(Validator, check)


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

    return _described(check, what)


AUTO = "auto"


def integer_or_auto(lo: int, hi: int) -> Validator:
    """An int in [lo, hi], or the word ``auto``."""
    inner = integer(lo, hi)
    what = f"{inner.what} or 'auto'"

    def check(value: Any) -> int | str:
        if value == AUTO:
            return AUTO
        try:
            return inner(value)
        except _Expected:
            raise _Expected(what) from None

    return _described(check, what)


def _bounds_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


_MAX_FLOAT = sys.float_info.max
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > _MAX_FLOAT:
            raise _Expected(what)
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0) or (nonnegative and value < 0):
            raise _Expected(what)
        return value

    return _described(check, what)


def string(*, nullable: bool = False) -> Validator:
    """A non-empty string, or null if ``nullable``."""
    what = "a non-empty string" + (" or null" if nullable else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value:
            raise _Expected(what)
        return value

    return _described(check, what)


def boolean() -> Validator:
    """``true`` or ``false``."""
    what = "true or false"

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Expected(what)
        return value

    return _described(check, what)


def choice(*options: str) -> Validator:
    """One of the given strings."""
    what = "one of " + ", ".join(repr(o) for o in options)

    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _Expected(what)
        return value

    return _described(check, what)


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

    return _described(check, what)


def crop_box(hi: int) -> Validator:
    """null or [y0, y1, x0, x1] with 0 <= y0 < y1 <= hi and 0 <= x0 < x1 <= hi; stored as a tuple."""
    what = f"null or a list [y0, y1, x0, x1] of integers with 0 <= y0 < y1 <= {hi} and 0 <= x0 < x1 <= {hi}"

    def check(value: Any) -> tuple[int, int, int, int] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_int(v) for v in value):
            raise _Expected(what)
        y0, y1, x0, x1 = value
        if not (0 <= y0 < y1 <= hi and 0 <= x0 < x1 <= hi):
            raise _Expected(what)
        return tuple(value)

    return _described(check, what)


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
    section: int | None = _opt(None, integer(0, MAX_PIXEL, nullable=True), "index of one section of a stack")
    crop: tuple[int, int, int, int] | None = _opt(None, crop_box(MAX_PIXEL), "[y0, y1, x0, x1] region to denoise")
    downsample: int = _opt(1, integer(1, 1024), "keep every k-th pixel in each direction (after crop)")
    gain: float | None = _opt(None, real(positive=True, nullable=True),
                              "GPMM: counts = (I - offset)/gain; null = estimate")
    offset: float | None = _opt(None, real(nullable=True), "GPMM: intensity of zero counts; null = estimate")


@dataclass(frozen=True)
class PatchesConfig:
    size: tuple[int, int] = _opt((8, 8), int_pair(2, 64), "patch height and width (an int n means [n, n])")
    stride: int = _opt(1, integer(1, 64), "step between patches (at most the patch size)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("sssc", choice("sssc", "gpmm"), "generative model")
    H: int = _opt(64, integer(1, 1024), "SSSC: number of latents")
    psi: str = _opt("diag", choice("diag", "full"), "SSSC: prior covariance of the slab")
    init: str = _opt("random", choice("random", "pca", "kmeans"), "SSSC: initial W: random = mean patch + "
                     "noise; pca = the leading principal directions of a patch sample (second moments, scaled by "
                     "the root of their eigenvalues) as the first min(H, D/2) columns (D = pixels per patch), "
                     "the others random; kmeans = k-means centroids of a patch sample")
    sigma: str = _opt("learned", choice("learned", "pca"), "SSSC: the noise level σ: learned = updated by every "
                      "M-step (the paper's EM; it also counts fine image texture the model cannot represent as "
                      "noise); pca = estimated once from the smallest eigenvalue of the training patches' covariance "
                      "(never told) and held fixed")
    C: int = _opt(100, integer(1, MAX_C), "GPMM: number of classes")
    gamma: str = _opt("shared", choice("shared", "per_class"), "GPMM: Gamma prior shared or per class")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int | str = _opt(50, integer_or_auto(0, MAX_EPOCHS), "training epochs, or 'auto': until the free "
                             "energy per patch pixel changes by less than stop_tolerance per epoch over the last "
                             "stop_window epochs, at most max_epochs")
    max_epochs: int = _opt(300, integer(1, MAX_EPOCHS), "with epochs: auto, the most training epochs")
    stop_window: int = _opt(10, integer(1, 1000), "with epochs: auto, epochs over which the change of the free "
                            "energy is measured")
    stop_tolerance: float = _opt(5e-4, real(positive=True), "with epochs: auto, stop when |F_t - F_(t-window)| / "
                                 "(window · D) < this (F = free energy per patch in nats, D pixels per patch)")
    seed: int = _opt(0, integer(0, MAX_SEED), "random seed")
    block_size: int = _opt(1024, integer(1, MAX_BLOCK), "patches per vectorised E-step block (speed/memory only: "
                           "random numbers are keyed by global patch index, so results do not depend on it)")
    max_patches: int | None = _opt(None, integer(1, MAX_PATCHES, nullable=True), "train on this many patches drawn "
                                   "uniformly across the image/stack (reading only their regions), then estimate tile "
                                   "by tile; null = train on all patches in memory")
    per_section: bool = _opt(False, boolean(), "stacks: learn one model per section (each section is trained and "
                             "estimated on its own; the output is still one (Z, Y, X) volume)")

    @property
    def epoch_limit(self) -> int:
        """The last epoch training may reach: ``epochs``, or ``max_epochs`` with ``epochs: auto``."""
        return self.max_epochs if self.epochs == AUTO else int(self.epochs)


@dataclass(frozen=True)
class EstimationConfig:
    epochs: int = _opt(20, integer(0, MAX_EPOCHS), "evolutionary E-steps with frozen parameters that improve each "
                       "patch's fresh truncated set before its estimate (more: closer to the trained sets' quality)")
    tile: tuple[int, int] = _opt((512, 512), int_pair(16, 65536), "tile height and width of the estimation pass "
                                 "(any tiling gives the same pixels); at least patches.size, and best >= 8x it: "
                                 "patches on tile borders are computed once per tile they touch")


@dataclass(frozen=True)
class TruncationConfig:
    S: int = _opt(60, integer(1, MAX_S), "states per truncated set")
    parents: int = _opt(20, integer(1, MAX_S), "parents per generation")
    children: int = _opt(1, integer(1, MAX_NEW_STATES), "children per parent")
    generations: int = _opt(1, integer(1, MAX_NEW_STATES), "generations per E-step")
    selection: str = _opt("fitness", choice("fitness", "uniform", "best"), "parent selection")
    mutation: str = _opt("random", choice("sparse", "random"), "bit-flip mutation: random = one uniformly chosen "
                         "bit; sparse = per-bit flips drifting towards the prior's number of active units")
    crossover: bool = _opt(False, boolean(), "use crossover")


@dataclass(frozen=True)
class OutputConfig:
    path: str = _req(string(), "result file (.h5)")


@dataclass(frozen=True)
class LoggingConfig:
    every_epochs: int = _opt(1, integer(1, MAX_EPOCHS), "epochs between progress lines")


@dataclass(frozen=True)
class CheckpointConfig:
    path: str | None = _opt(None, string(nullable=True), "checkpoint file; null = output.path with suffix .ckpt.h5")
    every_epochs: int = _opt(10, integer(0, MAX_EPOCHS), "write a checkpoint every n epochs (0 = off)")
    every_seconds: float = _opt(1800.0, real(nonnegative=True), "write a checkpoint when this many seconds have "
                                "passed since the last one (0 = off)")


def memory_size() -> Validator:
    """A memory size such as 2GiB, 1500MB, 2G or a number of bytes (see units.parse_bytes), or null."""
    what = f"{SIZE_TEXT}, or null"

    def check(value: Any) -> int | None:
        if value is None:
            return None
        try:
            return parse_bytes(value)
        except ValueError:
            raise _Expected(what) from None

    return _described(check, what)


@dataclass(frozen=True)
class ResourcesConfig:
    threads: int = _opt(0, integer(0, 1024), "threads of the E-step kernel in each rank; ranks × threads should be "
                        "the cores of the job; 0 = SLURM's --cpus-per-task where set, else the CPUs the process may "
                        "use shared by the ranks on its node (hpc-zsem run --threads overrides it; results do not "
                        "depend on it)")
    max_memory_per_rank: int | None = _opt(None, memory_size(), "refuse to start when the estimated memory per "
                                           "rank exceeds this (e.g. 4GiB); null = the memory of this machine, its "
                                           "SLURM allocation or cgroup limit (the smallest), shared by the ranks on "
                                           "the node")


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


def schema_default(key: str, missing: Any = None) -> Any:
    """The default of the dotted key ``section.name`` as :meth:`Config.to_dict` writes it (tuples as lists), or
    ``missing`` for an unknown key or one without a default (e.g. a config written before the key existed
    is read with the default the key has now)."""
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
    if field is None or field.default is dataclasses.MISSING:
        return missing
    return _plain(field.default)


def schema_help() -> str:
    """One line per key: ``section.key (default ...; what it accepts): help`` — for ``--help`` texts and docs;
    a last line says how ``--set`` reads values (:data:`OVERRIDE_HELP`)."""
    lines = []
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else f"default {_plain(f.default)!r}"
            lines.append(f"{name}.{f.name} ({default}; {f.metadata['check'].what}): {f.metadata['help']}")
    return "\n".join(lines + [f"--set KEY=VALUE: {OVERRIDE_HELP}"])


# ------------------------------------------------------------------------------------------------- walker

def _unknown(source: str, key: str, valid: Sequence[str]) -> ConfigError:
    """ConfigError for an unknown dotted ``key`` (as shown: see :func:`_key_text`), suggesting the closest
    valid key."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: {key}: unknown key{hint}")


def _build_section(name: str, cls: type, raw: Any, sources: Mapping[str, str], default_source: str) -> Any:
    """Validate one section's raw mapping against its dataclass and construct it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{default_source}: {name}: expected a mapping of keys, got {short_repr(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            source = sources.get(f"{name}.{key}", default_source) if isinstance(key, str) else default_source
            raise _unknown(source, f"{name}.{_key_text(key)}", [f"{name}.{k}" for k in fields])
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
            raise ConfigError(f"{source}: {dotted}: expected {exc.what}, got {short_repr(raw[key])}") from None
    return cls(**values)


def _check_cross(cfg: Config, sources: Mapping[str, str], default_source: str) -> None:
    """Checks that involve several keys."""
    size = cfg.patches.size
    if cfg.patches.stride > min(size):
        source = sources.get("patches.stride", default_source)
        raise ConfigError(f"{source}: patches.stride: expected at most the patch size {min(size)} "
                          f"(larger strides leave pixels uncovered), got {cfg.patches.stride}")
    tile = cfg.estimation.tile
    if tile[0] < size[0] or tile[1] < size[1]:
        source = sources.get("estimation.tile", default_source)
        raise ConfigError(f"{source}: estimation.tile: expected at least patches.size {list(size)} in each "
                          f"direction, got {list(tile)}")
    if cfg.model.name != "sssc":
        return
    t, H = cfg.truncation, cfg.model.H
    if t.S > 2**H:
        source = sources.get("truncation.S", default_source)
        raise ConfigError(f"{source}: truncation.S: expected at most 2**model.H = {2**H} distinct states, got {t.S}")
    if t.parents > t.S:
        source = sources.get("truncation.parents", default_source)
        raise ConfigError(f"{source}: truncation.parents: expected at most truncation.S = {t.S}, got {t.parents}")


#: a streamed pass that computes each patch this many times or more gets a warning about estimation.tile
SLOW_TILE_FACTOR = 2.0


def tile_overhead(tile: tuple[int, int], size: tuple[int, int]) -> float:
    """How many times a streamed estimation pass computes each patch: a tile computes every patch that covers
    one of its core pixels, ``ty + h − 1`` corner rows for ``ty`` core rows, so ≈ (1 + (h−1)/ty)·(1 + (w−1)/tx)
    (edge tiles compute fewer: this is the limit for images much larger than a tile)."""
    return (1 + (size[0] - 1) / tile[0]) * (1 + (size[1] - 1) / tile[1])


def _warn_slow_tile(cfg: Config, sources: Mapping[str, str], default_source: str) -> None:
    """A one-line warning when ``estimation.tile`` is legal but makes a streamed pass much slower."""
    factor = tile_overhead(cfg.estimation.tile, cfg.patches.size)
    if cfg.training.max_patches is None or factor < SLOW_TILE_FACTOR:
        return
    source = sources.get("estimation.tile", default_source)
    log.warning("%s: estimation.tile: %s with patches.size %s computes each patch about %.1f times in the "
                "streamed pass (patches on tile borders are computed by every tile they touch); tiles of at "
                "least 8x the patch size keep it below 1.3", source, list(cfg.estimation.tile),
                list(cfg.patches.size), factor)


def _top_level(raw: Any, source: str) -> Mapping:
    """The document's top level: a mapping of sections (an empty document counts as empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {short_repr(raw)}")
    return raw


def _build(raw: Any, sources: Mapping[str, str], default_source: str) -> Config:
    """Validate a raw top-level mapping and construct the :class:`Config`."""
    raw = _top_level(raw, default_source)
    sections = _sections()
    for name in raw:
        if name not in sections:
            source = sources.get(name, default_source) if isinstance(name, str) else default_source
            raise _unknown(source, _key_text(name), list(sections))
    cfg = Config(**{name: _build_section(name, cls, raw.get(name), sources, default_source)
                    for name, cls in sections.items()})
    _check_cross(cfg, sources, default_source)
    return cfg


# ------------------------------------------------------------------------------------------------- YAML

class _Refused(yaml.YAMLError):
    """A document the strict loader refuses; the message is what follows "<file>: " in the ConfigError."""


def _line(node_or_event: Any) -> int:
    """The 1-based line where a YAML node or event starts."""
    return node_or_event.start_mark.line + 1


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader for config text that refuses anchors and aliases (a few hundred bytes of nested aliases expand
    to gigabytes) and a key given twice in one mapping (the second silently won), and keeps integers longer than
    :data:`MAX_INT_CHARS` as text, so that the key's validator refuses them (Python cannot convert them)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = ("*" if isinstance(event, yaml.AliasEvent) else "&") + event.anchor
            raise _Refused(f"line {_line(event)}, column {event.start_mark.column + 1}: expected no YAML anchors "
                           f"(&name) or aliases (*name) in a config, got {short_repr(mark)}")
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node, "")
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: str) -> None:
        """Raise :class:`_Refused` naming the dotted key and both lines of a key given twice in a mapping."""
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._refuse_duplicate_keys(child, f"{path}[{i}]")
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            dotted = f"{path}.{_key_text(key)}" if path else _key_text(key)
            if key in first:
                raise _Refused(f"{dotted}: expected each key once in a mapping, got it again at line "
                               f"{_line(key_node)} (first at line {first[key]})")
            first[key] = _line(key_node)
            self._refuse_duplicate_keys(value_node, dotted)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        if len(node.value) > MAX_INT_CHARS:
            return self.construct_scalar(node)
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _parse_yaml(text: Any) -> Any:
    """The one YAML document of ``text`` (a string or a text stream), read by :class:`_StrictLoader`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML document of a config file; any failure is a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return _parse_yaml(fh)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{os.fspath(path)}: expected a UTF-8 text (YAML) file") from None
    except RecursionError:
        raise ConfigError(f"{os.fspath(path)}: YAML nested too deeply") from None
    except _Refused as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{os.fspath(path)}: YAML syntax error{line}: {problem}") from None


def _text_keys() -> dict[str, bool]:
    """Dotted key → nullable, for the keys whose type is text (``str`` or ``str | None``)."""
    out = {}
    for name, cls in _sections().items():
        for key, hint in get_type_hints(cls).items():
            if hint in (str, str | None):
                out[f"{name}.{key}"] = hint is not str
    return out


def _override_value(key: str, text: str) -> Any:
    """The value of ``--set key=text``: for a text key the text itself (only exactly ``null`` is null, and only
    where the key may be null), else the text read as YAML; see :data:`OVERRIDE_HELP`."""
    text_keys = _text_keys()
    if key in text_keys:
        return None if text_keys[key] and text == "null" else text
    try:
        return _parse_yaml(text)
    except _Refused as exc:
        raise ConfigError(f"{OVERRIDE_SOURCE}: {key}: {exc}") from None
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"{OVERRIDE_SOURCE}: {key}: expected a YAML value, got {short_repr(text)}") from None


def _apply_override(raw: dict, text: str, sources: dict[str, str]) -> None:
    """Apply one ``section.key=value`` override to ``raw`` in place."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{OVERRIDE_SOURCE}: expected section.key=value, got {short_repr(text)}")
    value = _override_value(key, value_text)
    section, name = parts
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    raw[section][name] = value
    sources[key] = OVERRIDE_SOURCE
    sources.setdefault(section, OVERRIDE_SOURCE)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (None = all defaults), apply ``--set`` overrides and validate.

    Raises :class:`ConfigError` with a one-line message naming the file or ``--set`` and the key; logs a
    one-line warning for a legal but slow setting.
    """
    source = os.fspath(path) if path is not None else OVERRIDE_SOURCE
    raw = _top_level(_read_yaml(path) if path is not None else None, source)
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    sources: dict[str, str] = {}
    for text in overrides:
        _apply_override(raw, text, sources)
    cfg = _build(raw, sources, source)
    _warn_slow_tile(cfg, sources, source)
    return cfg


def config_from_dict(d: Mapping[str, Any], source: str = "stored config") -> Config:
    """Re-build a :class:`Config` from :meth:`Config.to_dict` output (e.g. stored in a result file)."""
    return _build(d, {}, source)
