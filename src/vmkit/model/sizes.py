"""Sizes written by people ("512M", "2G", "1.5GiB") parsed to bytes, and bytes shown back."""

from __future__ import annotations

import re

from vmkit.errors import InvalidValue

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, field: str = "size", default_unit: str = "") -> int:
    """Bytes for `value`; units are binary (M = MiB) as in QEMU. Zero and negatives are refused."""
    if isinstance(value, bool):
        raise InvalidValue(f"invalid {field} {value!r}: not a size")
    if isinstance(value, int):
        number, unit = float(value), default_unit
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise InvalidValue(
                f"invalid {field} {value!r}: not a size",
                hint="write a positive number with a unit, e.g. 512M, 2G, 1.5GiB",
            )
        number, unit = float(match.group(1)), match.group(2) or default_unit
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InvalidValue(
            f"invalid {field} {value!r}: unknown unit {unit!r}",
            hint="use one of K, M, G, T (binary: 1M = 1024 KiB)",
        )
    result = int(number * factor)
    if result <= 0:
        raise InvalidValue(f"invalid {field} {value!r}: must be greater than zero")
    return result


def format_size(num_bytes: int) -> str:
    """Short human form: 512M, 2G, 1.5G (binary units, as parse_size reads them back)."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if num_bytes >= factor:
            value = num_bytes / factor
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{num_bytes}B"


def parse_count(value: int | str, field: str) -> int:
    """A whole number >= 1 (vCPUs and the like), with an error that names the field."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InvalidValue(f"invalid {field} {value!r}: not a whole number") from None
    if count < 1:
        raise InvalidValue(f"invalid {field} {value!r}: must be at least 1")
    return count
