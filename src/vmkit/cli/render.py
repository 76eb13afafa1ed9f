"""Rendering for humans (rich tables on stdout, messages on stderr) and machines (JSON)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from vmkit.model.sizes import format_size

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def table(columns: list[str], rows: list[list[str]]) -> None:
    result = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        result.add_column(column)
    for row in rows:
        result.add_row(*row)
    out.print(result)


def size(value: int) -> str:
    return format_size(value)
