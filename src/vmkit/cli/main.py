"""`vmkit`: the entry point. `vmkit list`, the command people and scripts run most, is answered
by vmkit.cli.fast without importing the full CLI; every other command (and every unusual form
of `list`) by vmkit.cli.commands (typer + rich).

Errors: every VmkitError is caught in `main`, printed to stderr with its hint, and mapped to an
exit code by vmkit.errors.exit_code_for (2 = wrong request, nothing changed; 1 = failed).
"""

from __future__ import annotations

import errno
import os
import sys

from vmkit.cli import fast
from vmkit.errors import VmkitError, exit_code_for


def main() -> None:
    """Run the CLI; usage errors exit 2 (typer), vmkit errors by exit_code_for."""
    # vmkit uses no pydantic plugins: looking for them costs every command ~10 ms (the
    # setting reaches the programs vmkit starts too, none of which is a pydantic program)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        code = _fast(sys.argv[1:])
        if code is not None:
            sys.exit(code)
        with fast.imports_kept():
            from vmkit.cli.commands import app_for
        app_for(sys.argv[1:])()
    except VmkitError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exit_code_for(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug of vmkit's: still no traceback for the user
        sys.stderr.write(f"error: vmkit failed unexpectedly: {type(exc).__name__}: {exc}\n"
                         "hint: this is a bug; run with VMKIT_DEBUG=1 for the traceback and "
                         "report it\n")
        if os.environ.get("VMKIT_DEBUG"):
            raise
        sys.exit(1)


def _fast(argv: list[str]) -> int | None:
    """vmkit.cli.fast's exit code, or None for the full CLI. A stdout closed early (vmkit list |
    head) and shell completion are handled as typer handles them."""
    if any(key.startswith("_") and key.endswith("_COMPLETE") for key in os.environ):
        return None
    try:
        return fast.run(argv)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        # exit 1 quietly, as typer does; what is left in stdout's buffer goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    main()
