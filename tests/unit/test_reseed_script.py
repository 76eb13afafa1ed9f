"""The reseed a clone runs after its identity script, in one guest-exec (qemu/agent.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmkit.qemu import agent

# stands in for the Python reseed program (no RNG ioctls on the test host): it reports what it
# got on stdin
PROBE = "import sys\nd=sys.stdin.buffer.read(64)\nprint('reseeded', len(d))\n"


def _run(first: str) -> subprocess.CompletedProcess[bytes]:
    if Path(agent.RESEED_HELPER).exists():
        pytest.skip(f"{agent.RESEED_HELPER} exists here: the script would run it")
    argv = agent.reseed_argv(first)
    argv[-1] = PROBE
    return subprocess.run(argv, input=os.urandom(agent.RESEED_BYTES), capture_output=True,
                          timeout=30, check=False)


def test_the_identity_script_cannot_take_the_reseed_program_or_its_bytes() -> None:
    """`set --` (the MACs) and a read of stdin in the identity part leave the reseed alone."""
    done = _run("set -- 52:54:00:00:00:01 52:54:00:00:00:02; shift; read -r x; echo id >&2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"reseeded 64\n" and done.stderr == b"id\n"


def test_a_failed_identity_script_is_told_apart_and_skips_the_reseed() -> None:
    done = _run("echo x > /nonexistent/dir/hostname || exit 1")
    assert done.returncode == agent.RESEED_FIRST_FAILED
    assert done.stdout == b""


def test_without_a_first_script_only_the_reseed_runs() -> None:
    done = _run("")
    assert done.returncode == 0 and done.stdout == b"reseeded 64\n"
