"""The image catalog: images/<name>/image.json describes each built image."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

from vmkit.errors import NotFound
from vmkit.model.names import validate_name
from vmkit.model.views import ImageInfo
from vmkit.storage.layout import HomeLayout, read_json, write_bytes_atomic

_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return _sha256_of(handle.fileno())


def _sha256_of(fd: int) -> str:
    digest = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: Path, home: HomeLayout) -> str:
    """The sha256 of an image or boot file, remembered by its inode, size and mtime: these
    files are replaced, never rewritten in place, so a 50 MB kernel is read once, not on every
    move. The file is opened once (stat and hash of the same inode, whatever replaces it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        memo = home.cache / "digests" / f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
        try:
            known = memo.read_text()
            if _SHA256.fullmatch(known):
                return known
        except OSError:
            pass
        digest = _sha256_of(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # only a memo: the next caller hashes again
        write_bytes_atomic(memo, digest.encode(), mode=0o600)
    return digest


def boot_files(home: HomeLayout) -> dict[str, Path]:
    """sha256 -> path of every image's kernel, PVH kernel and initrd here: a moving VM's boot
    files with one of these digests need not travel (the receiver links its own)."""
    found: dict[str, Path] = {}
    for image in list_images(home):
        for name in (image.kernel, image.pvh_kernel, image.initrd):
            path = home.image(image.name) / name if name else None
            if path is not None and path.is_file() and not path.is_symlink():
                try:
                    found.setdefault(remembered_sha256(path, home), path)
                except OSError:
                    continue  # replaced by a rebuild meanwhile: it simply travels
    return found


def image_info(home: HomeLayout, name: str) -> ImageInfo:
    validate_name(name, kind="image name")
    path = home.image(name) / "image.json"
    if not path.exists():
        known = ", ".join(i.name for i in list_images(home)) or "none built yet"
        raise NotFound(f"unknown image {name!r} (built images: {known})",
                       hint=f"build it: vmkit image build {name}")
    return ImageInfo.model_validate(read_json(path))


def link_image(source: HomeLayout, target: HomeLayout, name: str) -> None:
    """Make image `name` of another VMKIT_HOME available here: hard links (copies across file
    systems). Image files are never rewritten in place, so sharing them is safe."""
    image_info(source, name)
    destination = target.image(name)
    destination.mkdir(parents=True, exist_ok=True)
    for item in source.image(name).iterdir():
        if not (destination / item.name).exists():
            link_or_copy(item, destination / item.name)


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link an unchanging image or boot file into a new `dest`; a copy where no link can
    be made (another file system, the link limit). Never onto an existing file: that could be
    a link to an image file, which a copy would rewrite."""
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
            raise
        with open(source, "rb") as src, open(dest, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def list_images(home: HomeLayout) -> list[ImageInfo]:
    images = []
    if home.images.exists():
        for folder in sorted(home.images.iterdir()):
            meta = folder / "image.json"
            if not folder.name.startswith(".") and meta.exists():
                images.append(ImageInfo.model_validate(read_json(meta)))
    return images
