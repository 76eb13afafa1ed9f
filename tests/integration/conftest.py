"""Integration harness: real QEMU guests (TCG) in an isolated VMKIT_HOME per test.

The tiny image is built once per session (a no-op when VMKIT_HOME already has it) and hard-linked
into each test's home. Teardown kills and deletes every VM the test left, so no QEMU outlives it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit import VM, Host
from vmkit.images.catalog import link_image
from vmkit.storage.home import default_home
from vmkit.storage.layout import HomeLayout

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def image_home() -> Path:
    home = Host(default_home())
    home.build_image("tiny")
    return home.layout.root


@pytest.fixture(scope="session")
def debian_home(image_home: Path) -> Path:
    """The debian-12 image too (debootstrap: minutes the first time, a no-op after)."""
    Host(image_home).build_image("debian-12")
    return image_home


@contextlib.contextmanager
def new_home(image_home: Path) -> Iterator[Path]:
    """A fresh VMKIT_HOME under /tmp (short: UNIX socket paths) with the images built so far;
    on exit every VM in it is deleted and the folder removed."""
    root = Path(tempfile.mkdtemp(prefix="vmk-", dir="/tmp"))
    for image in Host(image_home).images():
        link_image(HomeLayout(image_home), HomeLayout(root), image.name)
    try:
        yield root
    finally:
        Host(root).delete_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def home(image_home: Path) -> Iterator[Path]:
    with new_home(image_home) as root:
        yield root


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


COUNTER = ("sh -c 'echo $$ > /run/counter.pid; i=0; "
           "while true; do i=$((i+1)); echo $i > /run/counter; usleep 20000; done' "
           ">/dev/null 2>&1 </dev/null &")


def sh(vm: VM, script: str) -> str:
    result = vm.exec(["sh", "-c", script], timeout=120)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def chain_is_sound(folder: Path) -> None:
    """Every layer opens with its whole backing chain: no dangling backing file anywhere."""
    for layer in (folder / "disks").glob("*.qcow2"):
        subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "-f", "qcow2", str(layer)],
                       check=True, capture_output=True)
