"""What every image recipe shares: the cached, atomic publish step and the root file system.

A recipe computes a hash of its inputs; the same hash means the image is kept. A build writes a
hidden folder and renames it into place, so an interrupted build never leaves a half image listed.
Root disks are named by recipe hash and never rewritten: a rebuild carries over every older root
disk in `in_use` (the backing file of some VM's overlay), so no VM loses its base.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from vmkit.errors import ImageBuildError
from vmkit.model.views import ImageInfo
from vmkit.storage.hooks import pause_point
from vmkit.storage.layout import HomeLayout

Progress = Callable[[str], None]
# build(work, out) fills `out` (kernel, initrd, root disk, image.json) using scratch space `work`
Build = Callable[[Path, Path], ImageInfo]
FAKE_TIME = "1700000000"  # file system timestamps that do not change between builds


def build_cached(home: HomeLayout, name: str, recipe_hash: str, build: Build, *,
                 force: bool = False, in_use: frozenset[Path] = frozenset()
                 ) -> tuple[ImageInfo, bool]:
    """Build images/NAME unless it already has `recipe_hash`; returns (image, built?)."""
    target = home.image(name)
    meta = target / "image.json"
    if meta.exists() and not force:
        current = ImageInfo.model_validate_json(meta.read_text())
        if current.recipe_hash == recipe_hash and (target / current.root_disk).exists():
            return current, False
    work = home.images / f".build-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        out = work / "out"
        out.mkdir()
        info = build(work, out)
        old = home.images / f".old-{name}-{uuid.uuid4().hex[:8]}"
        if target.exists():
            for disk in target.glob("root-*.qcow2"):
                keep = out / disk.name
                if disk in in_use and not keep.exists():
                    os.link(disk, keep)
            target.rename(old)
            pause_point("image", "swapping")  # (test hook) the image is briefly absent here
        out.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return info, True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fs_uuid_for(recipe_hash: str) -> str:
    """The root file system's UUID: derived from the recipe, so kernel command lines can name it."""
    return str(uuid.UUID(recipe_hash[:32]))


def tree_bytes(root: Path) -> int:
    """Bytes of regular files under `root` (what the file system must hold)."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


def make_ext4(rootfs: Path, raw: Path, recipe_hash: str, size_mib: int, *,
              label: str = "vmkit-root", timeout: float = 900) -> None:
    """An ext4 image holding `rootfs`, made without mounting anything (mkfs.ext4 -d)."""
    fs_uuid = fs_uuid_for(recipe_hash)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME}
    try:
        done = subprocess.run(
            # 4 KiB blocks whatever the size (mke2fs gives a small image 1 KiB ones): growing
            # a 64 MiB root to a 2 GiB disk then adds 16 block groups at first boot, not 256
            ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-U", fs_uuid,
             "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", str(rootfs), str(raw),
             f"{size_mib}M"],
            capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"mkfs.ext4 took longer than {timeout:g}s") from exc
    if done.returncode != 0:
        raise ImageBuildError("mkfs.ext4 failed", detail=done.stderr.strip())
