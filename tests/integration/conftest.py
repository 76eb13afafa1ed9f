"""Integration harness: real QEMU guests (TCG) in an isolated VMKIT_HOME per test.

The tiny image is built once per session (a no-op when VMKIT_HOME already has it) and hard-linked
into each test's home. Teardown kills and deletes every VM the test left, so no QEMU outlives it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit import Host
from vmkit.images.catalog import link_image
from vmkit.storage.layout import HomeLayout, default_home

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def image_home() -> Path:
    home = Host(default_home())
    home.build_image("tiny")
    return home.layout.root


@pytest.fixture
def home(image_home: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vmk-", dir="/tmp"))
    link_image(HomeLayout(image_home), HomeLayout(root), "tiny")
    try:
        yield root
    finally:
        leftover = Host(root)
        for vm in leftover.vms():
            vm.delete(force=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def host(home: Path) -> Host:
    return Host(home, lock_timeout=60)


def run_cli(home: Path, *args: str, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMKIT_HOME": str(home), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"vmkit {' '.join(args)} -> {done.returncode}\n{done.stderr}")
    return done
