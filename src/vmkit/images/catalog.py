"""The image catalog: images/<name>/image.json describes each built image."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from vmkit.errors import NotFound
from vmkit.model.names import validate_name
from vmkit.model.views import ImageInfo
from vmkit.storage.layout import HomeLayout, read_json


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
