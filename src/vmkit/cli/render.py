"""Rendering for humans (tables on stdout, messages on stderr) and machines (JSON).

rich is imported only when something needs it: `out` and `err` (rich consoles) are made on
first use, and `table` writes a plain table itself when rich would print it unchanged (cells of
plain ASCII that fit the console's width: no wrapping to apply). It then writes exactly what
rich writes, bold header included on a terminal (tests/unit/test_cli_imports.py compares the
two); any other table goes through rich.

What vmkit prints is data, never markup: the consoles apply no markup and no emoji codes,
and table cells are rich Text. (With them a MAC such as 52:54:00:ab:cd:ef printed as
52:54:00🆎cd:ef, and a guest's text holding "[/x]" made `vmkit info` fail.)
"""

from __future__ import annotations

import json
import os
import re
import sys

from vmkit.model.sizes import format_size

TYPE_CHECKING = False  # no typing at run time: the fast `vmkit list` renders with this module
if TYPE_CHECKING:
    from typing import Any

    from rich.console import Console

#: what rich prints as it is: printable ASCII (no escapes, tabs or wide characters)
_PLAIN_CELL = re.compile(r"[ -~]*")
_BOLD, _RESET = "\x1b[1m", "\x1b[0m"
LIST_COLUMNS = ["NAME", "STATE", "VCPUS", "MEMORY", "DISK", "UPTIME", "PID", "ACCEL"]


def __getattr__(name: str) -> Console:
    """`out` and `err`, the rich consoles (stdout, stderr), made when first used."""
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _console(name)


def _console(name: str) -> Console:
    console: Console | None = globals().get(name)
    if console is None:
        from rich.console import Console

        console = globals()[name] = Console(stderr=name == "err", highlight=False,
                                            markup=False, emoji=False)
    return console


def say(text: str) -> None:
    """A message on stderr, as `err.print(text)` prints it: written directly when rich would
    print it unchanged (printable ASCII lines that fit the console, no rich console on stderr
    yet), which spares a command rich's import (~15 ms)."""
    lines = text.split("\n")
    terminal = _is_terminal(sys.stderr)
    width = _console_width(bool(terminal)) if terminal is not None else None
    if "err" in globals() or width is None or not all(
            _PLAIN_CELL.fullmatch(line) and len(line) <= width and not line.endswith(" ")
            for line in lines):
        _console("err").print(text)
        return
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


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
    """Columns separated by two spaces, the header bold on a terminal (rich's Table with
    box=None, pad_edge=False)."""
    text = _plain_table(columns, rows)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()  # as rich does: a closed pipe is seen here, not at exit
        return
    _console("out").print(_rich_table(columns, rows))


def _rich_table(columns: list[str], rows: list[list[str]]) -> Any:
    """The rich Table `table` prints when it cannot print plainly: every cell as Text."""
    from rich.table import Table
    from rich.text import Text

    result = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        result.add_column(Text(column))
    for row in rows:
        result.add_row(*(Text(cell) for cell in row))
    return result


def size(value: int) -> str:
    return format_size(value)


def vm_list(statuses: list[dict[str, Any]], *, as_json: bool) -> None:
    """`vmkit list`: VM statuses as VmStatus.model_dump(mode="json") gives them."""
    if as_json:
        print_json(statuses)
        return
    table(LIST_COLUMNS,
          [[s["name"], s["state"], str(s["cpus"]), size(s["memory"]), size(s["disk"]),
            format_uptime(s["uptime"]), str(s["pid"] or "-"), s["accel"] or "-"]
           for s in statuses])


def _plain_table(columns: list[str], rows: list[list[str]]) -> str | None:
    """The table as rich prints it to sys.stdout, or None when rich would change a cell (a
    character it interprets, a table wider than the console) or the console is unusual."""
    cells = [columns, *rows]
    if any(len(row) != len(columns) for row in rows) or not all(
            isinstance(cell, str) and _PLAIN_CELL.fullmatch(cell) for row in cells for cell in row):
        return None
    terminal = _is_terminal()
    if terminal is None:
        return None
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    console_width = _console_width(terminal)
    # one space of padding left and right of each cell, none at the table's edges
    if not columns or min(widths) == 0 or console_width is None or (
            sum(widths) + 2 * (len(columns) - 1) > console_width):
        return None
    bold = terminal and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
    last = len(columns) - 1
    lines = []
    if bold:
        lines.append("".join(
            (f"{_BOLD} {_RESET}" if i else "") + f"{_BOLD}{cell.ljust(widths[i])}{_RESET}"
            + (f"{_BOLD} {_RESET}" if i < last else "") for i, cell in enumerate(columns)))
    else:
        lines.append(_plain_row(columns, widths))
    lines += [_plain_row(row, widths) for row in rows]
    return "".join(line + "\n" for line in lines)


def _plain_row(row: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))


def _is_terminal(stream: Any = None) -> bool | None:
    """Whether rich takes `stream` (sys.stdout) for a terminal (None: a case left to rich)."""
    import builtins

    if hasattr(builtins, "get_ipython") or str(
            getattr(sys.stdin, "__module__", "")).startswith("idlelib"):
        return None
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    isatty = getattr(sys.stdout if stream is None else stream, "isatty", None)
    try:
        return False if isatty is None else bool(isatty())
    except ValueError:
        return False


def _console_width(terminal: bool) -> int | None:
    """The width rich gives a console on sys.stdout (rich.console.Console.size)."""
    columns, lines = os.environ.get("COLUMNS"), os.environ.get("LINES")
    fixed = int(columns) if columns is not None and columns.isdigit() else None
    if fixed is not None and lines is not None and lines.isdigit():
        return fixed or None
    if terminal and os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return 80
    if fixed is not None:
        return fixed or None
    for fd in (0, 1, 2):
        try:
            return os.get_terminal_size(fd).columns or 80
        except (AttributeError, ValueError, OSError):
            continue
    return 80
