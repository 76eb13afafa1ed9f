"""The image catalog: images/<name>/image.json describes each built image."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vmkit.errors import NotFound
from vmkit.model.names import validate_name
from vmkit.storage.layout import HomeLayout, read_json

IMAGE_SCHEMA_VERSION = 1


class ImageInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = IMAGE_SCHEMA_VERSION
    name: str
    os: str
    kernel_version: str
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    root_disk: str
    cmdline: str
    recipe_hash: str
    sha256: str
    size: int
    virtual_size: int
    built_at: float
    packages: dict[str, str]
    cloud_init: bool = False  # reads a NoCloud seed (hostname, ssh keys, user-data)
    ssh_user: str | None = None  # runs an ssh server; the login keys are given to
    build_seconds: float | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if (destination / item.name).exists():
            continue
        try:
            os.link(item, destination / item.name)
        except OSError:
            shutil.copyfile(item, destination / item.name)


def list_images(home: HomeLayout) -> list[ImageInfo]:
    images = []
    if home.images.exists():
        for folder in sorted(home.images.iterdir()):
            meta = folder / "image.json"
            if not folder.name.startswith(".") and meta.exists():
                images.append(ImageInfo.model_validate(read_json(meta)))
    return images
