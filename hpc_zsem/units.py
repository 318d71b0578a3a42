"""Memory sizes and durations as text: ``parse_bytes("2GiB")``, ``format_bytes(2 * 2**30)`` (the config schema,
the memory check, the SLURM job sizing) and ``format_seconds(75)`` (progress lines)."""
from __future__ import annotations

import re
from typing import Any

#: the largest memory size accepted (1 EiB): larger ones are typos
MAX_SIZE = 2**60
SIZE_TEXT = "a memory size > 0 and <= 1 EiB such as 2GiB, 1500MB, 2G or a number of bytes"

_UNITS = {"": 1, "b": 1,
          "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any) -> int:
    """A memory size → bytes: an int (bytes) or a string ``"2GiB"``, ``"1500MB"``, ``"2G"``, ``"512 MiB"``.

    Units (case-insensitive): B; KiB/MiB/GiB/TiB and the SLURM-style K/M/G/T are powers of 1024; KB/MB/GB/TB
    are powers of 1000. Anything else (or a size <= 0 or > :data:`MAX_SIZE`) raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_TEXT}")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected {SIZE_TEXT}")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"expected {SIZE_TEXT}")
    if not 0 < number <= MAX_SIZE or int(number) <= 0:   # NaN fails the first test, 0.5 bytes the second
        raise ValueError(f"expected {SIZE_TEXT}")
    return int(number)


def format_bytes(n: int | float) -> str:
    """``1536`` → ``"1.5 KiB"``, ``2 * 2**30`` → ``"2 GiB"``, ``3435973837`` → ``"3.2 GiB"`` (binary units, one
    decimal, trailing ``.0`` dropped)."""
    n = float(n)
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{int(n)} B"
    text = f"{n:.1f}".rstrip("0").rstrip(".")
    return f"{text} {units[i]}"


def format_seconds(seconds: float) -> str:
    """``75`` → ``"1m15s"``, ``3725`` → ``"1h02m05s"`` (rounded to whole seconds)."""
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
