"""A full disk during snapshot, clone and export: a clear error, the VM keeps running, nothing
half-made is listed, the space comes back, and a retry after freeing space works."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import sh
from vmkit import Host, VmkitError, VmState
from vmkit.images.catalog import link_image
from vmkit.storage.layout import HomeLayout

MiB = 1 << 20


@pytest.fixture
def small_home(image_home: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vmkf-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400M,mode=0755", "vmkit-full",
                    str(root)], check=True)
    try:
        link_image(HomeLayout(image_home), HomeLayout(root), "tiny")
        yield root
    finally:
        Host(root).delete_all()
        subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _fill_until(root: Path, leave: int) -> Path:
    filler = root / "filler"
    size = max(0, _free(root) - leave)
    with open(filler, "wb") as handle:
        handle.truncate(0)
        os.posix_fallocate(handle.fileno(), 0, size)
    return filler


def _listing(root: Path) -> list[str]:
    return sorted(os.listdir(root / "vms"))


def test_disk_full_during_snapshot_clone_and_export(small_home: Path) -> None:
    host = Host(small_home)
    vm = host.create("tight", memory="256M", disk="300M")
    vm.start(wait=True)
    sh(vm, "echo precious > /root/f; sync")
    folder = vm.folder.path
    disks_before = sorted(p.name for p in (folder / "disks").iterdir())

    # 1. a memory snapshot needs ~150 MB: leave 40 MB
    filler = _fill_until(small_home, 40 * MiB)
    free_before = _free(small_home)
    with pytest.raises(VmkitError, match=r"(?i)no space|failed"):
        vm.snapshot("too-big")
    assert vm.state is VmState.RUNNING and sh(vm, "cat /root/f") == "precious"
    assert vm.snapshots() == []
    assert sorted(p.name for p in (folder / "disks").iterdir()) == disks_before
    assert not any((folder / "snapshots").glob("*")) if (folder / "snapshots").exists() else True
    assert abs(_free(small_home) - free_before) < 2 * MiB  # the space came back
    filler.unlink()
    vm.snapshot("fits")  # the retry after freeing space works
    assert [s.name for s in vm.snapshots()] == ["fits"]

    # 2. a full clone (a flat copy of ~20 MB) with 3 MB free
    filler = _fill_until(small_home, 3 * MiB)
    free_before = _free(small_home)
    with pytest.raises(VmkitError):
        vm.clone("copy")
    assert _listing(small_home) == ["tight"]
    assert abs(_free(small_home) - free_before) < 2 * MiB
    assert [s.name for s in vm.snapshots()] == ["fits"]  # the clone's still point was merged
    filler.unlink()
    copy = vm.clone("copy")
    copy.start(wait=True)
    assert sh(copy, "cat /root/f") == "precious"
    copy.delete(force=True)

    # 3. an export to a file system without room for it
    filler = _fill_until(small_home, 10 * MiB)
    free_before = _free(small_home)
    bundle = small_home / "tight.vmkit"
    with pytest.raises(VmkitError):
        vm.export(bundle)
    assert not bundle.exists()
    assert abs(_free(small_home) - free_before) < 2 * MiB
    assert vm.state is VmState.RUNNING and [s.name for s in vm.snapshots()] == ["fits"]
    filler.unlink()
    vm.export(bundle)
    assert bundle.stat().st_size > 10 * MiB
