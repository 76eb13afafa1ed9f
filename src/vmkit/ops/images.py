"""Image use cases: build an image from its recipe (a no-op when nothing changed), never
retiring a base disk a VM still uses."""

from __future__ import annotations

from pathlib import Path

from vmkit.core.engine import Host, Progress
from vmkit.errors import InvalidValue, NotFound
from vmkit.images import catalog, debpkg
from vmkit.images.debian import SUITE, UPDATE_SUITES
from vmkit.model.names import validate_name
from vmkit.model.views import ImageInfo

#: what the tiny image's packages come from (apt-get download of bookworm's candidates)
DEFAULT_SUITES = (SUITE, *UPDATE_SUITES)


def build_image(host: Host, name: str, *, force: bool = False, progress: Progress | None = None,
                packages: list[str] | None = None) -> tuple[ImageInfo, bool]:
    """Build an image from its recipe (a no-op when its inputs have not changed).
    `packages` adds Debian packages to images that have a package manager (debian-12)."""
    validate_name(name, kind="image name")
    if name not in ("tiny", "debian-12"):
        raise NotFound(f"no recipe for image {name!r}", hint="known recipes: tiny, debian-12")
    if packages and name != "debian-12":
        raise InvalidValue(f"image {name!r} takes no extra packages",
                           hint="use --packages with debian-12")
    from vmkit.images.debian import build_debian
    from vmkit.images.tiny import build_tiny

    with host._image_lock(name, timeout=3600):
        # decided under the lock: a create holds it shared until its VM is published
        in_use = frozenset(Path(vm.config.backing_file) for vm in host.vms()
                           if vm.config.backing_file)
        if name == "debian-12":
            return build_debian(host.layout, packages=packages, force=force,
                                progress=progress, in_use=in_use)
        return build_tiny(host.layout, force=force, progress=progress, in_use=in_use)


def list_images(host: Host, *, check_updates: bool = False) -> list[ImageInfo]:
    """The built images; with `check_updates`, each says which of its packages apt here has
    newer versions of (from the suites the host's apt uses)."""
    images = catalog.list_images(host.layout)
    if not check_updates:
        return images
    return [image.model_copy(update={"newer_packages": debpkg.newer_available(
        image.packages, image.suites or list(DEFAULT_SUITES))}) for image in images]
