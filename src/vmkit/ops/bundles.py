"""Portable VM bundles: `export` writes one tar file, `import` checks it before anything exists.

A bundle holds manifest.json (format, version, and size + sha256 of every other member),
vm.json, snapshots.json, boot/ (kernel, initrd), disks/*.qcow2 (every layer; a base outside the
VM folder — the image, or a linked clone's source — is flattened into disks/base.qcow2; the
manifest's `repoint` tells import which backing name to rewrite to it) and snapshots/*.state.

Export creates the bundle file owner-only (0600) from its first byte, under a temporary name
in the destination folder, and links it into place once complete: a reader never sees a partial
bundle, and a failed export leaves nothing.

Import trusts nothing: member names must be plain paths in the known folders, every member must
be listed with the right size and sha256 (a tampered or truncated bundle is refused); every field
of vm.json and snapshots.json is validated by the model (model/spec.py, model/snapshots.py), the
machine type and CPU model must be ones this host's QEMU offers, and every file the metadata names
must be a file of the bundle in its own folder. `ssh_identity` names a key file on the exporting
host: it is dropped (vmkit ssh then uses ssh's default keys). Every qcow2 is inspected by an
unprivileged, resource-limited qemu-img with an explicit format (img.info(untrusted=True)): a
backing file or data file that is not another disk of the bundle is refused, and so is a header
that makes qemu-img exceed its limits. Only then is the folder renamed into vms/.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from vmkit.core import layers, store
from vmkit.core.journal import Journal, fault_point, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import InvalidState, InvalidValue, NotFound, VmkitError, os_errors
from vmkit.images import catalog
from vmkit.isolation import jail
from vmkit.model.journal import JournalEntry
from vmkit.model.names import validate_name
from vmkit.model.spec import (
    NVRAM_FILE,
    TPM_STATE_FILE,
    VmConfig,
    as_new_machine,
    check_relative_path,
    disk_names,
    shown,
)
from vmkit.model.state import LIVE_STATES
from vmkit.qemu import hostinfo, img
from vmkit.qemu.argv import OVMF_VARS_TEMPLATE
from vmkit.storage.layout import VmFolder, fsync_dir

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host

FORMAT = "vmkit-bundle"
FORMAT_VERSION = 1
BASE_LAYER = "disks/base.qcow2"
_CHUNK = 1 << 20
_MEMBER = re.compile(r"^(vm\.json|snapshots\.json|boot/[\w.-]+|(disks|volumes)/[\w.-]+\.qcow2|"
                     r"disks/nvram\.fd|tpm/tpm2-00\.permall|snapshots/[\w.-]+\.(state|nvram\.fd))$",
                     re.ASCII)
MAX_BOOT_LINKS = 4  # kernel, PVH kernel, initrd: a VM's boot/ holds no more
MAX_OVERLAY = 1 << 50  # 1 PiB: a qcow2 with 64 KiB clusters addresses 2 PiB at most
_BOOT_MEMBER = re.compile(r"boot/\w[\w.-]*", re.ASCII)
BUNDLE_MODE = 0o600  # disks and memory: readable by the exporting user only
_MANIFEST_LIMIT = 1 << 20
Progress = Callable[[int, int], None]
_Model = TypeVar("_Model", bound=BaseModel)


class BundleError(InvalidValue):
    """The bundle cannot be imported (exit 2: nothing was created)."""


class _HashingReader(io.RawIOBase):
    """Hands a file to tarfile while hashing exactly the bytes tarfile reads."""

    def __init__(self, handle: IO[bytes], progress: Callable[[int], None]):
        self._handle = handle
        self.digest = hashlib.sha256()
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self._progress(len(data))
        return data


# -- export -------------------------------------------------------------------------------
def export(vm: VM, path: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Write the VM (stopped, or running: at a consistent, quiesced point) as one file."""
    path = Path(path).absolute()
    if os.path.lexists(path):
        raise InvalidValue(f"export target {path} already exists", hint="choose a new file name")
    if not path.parent.is_dir():
        raise InvalidValue(f"export target folder {path.parent} does not exist")
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        live = record.state in LIVE_STATES
        if live and vm.config.disks:
            raise InvalidState(f"cannot export VM {vm.name!r} while it is "
                               f"{record.state.value}: its extra disks "
                               f"({disk_names(vm.config)}) are copied as they are, and a "
                               "running guest is writing them",
                               hint=f"stop it first (vmkit stop {vm.name})")
        point = f"export-{uuidlib.uuid4().hex[:8]}" if live else None
        staging = vm.host.layout.cache / f"export-{uuidlib.uuid4().hex[:8]}"
        partial = path.parent / f".{path.name}.{uuidlib.uuid4().hex[:8]}.partial"
        # journalled: a cut leaves no partial file, no staging copy, no helper snapshot and
        # no frozen guest once the next command on this VM (or vmkit recover) has run
        log = Journal(vm.folder.runtime_root)
        log.begin("export", path=str(path), partial=str(partial), staging=str(staging),
                  point=point, frozen=live)
        try:
            if point is not None:
                layers.take_locked(held, vm, record, point, disk_only=True, journal=False)
            log.step("snapshot-taken")
            with os_errors(f"exporting VM {vm.name!r} to {path}"):
                result = _write_bundle(vm, partial, point, staging, progress)
                log.step("written")
                _publish(partial, path)
                log.step("published")
            return {**result, "path": str(path), "mode": f"{BUNDLE_MODE:04o}"}
        finally:
            _export_cleanup(held, vm, partial, staging, point)
            log.end()


def _export_cleanup(held: Held, vm: VM, partial: Path, staging: Path,
                    point: str | None) -> None:
    partial.unlink(missing_ok=True)  # gone already when published
    shutil.rmtree(staging, ignore_errors=True)
    if point is not None and point in store.load_tree(vm).nodes:
        layers.delete_locked(held, vm, vm._record(), point)


def recover_export(held: Held, vm: VM, entry: JournalEntry) -> None:
    """An export cut short: its partial file, staging copy and helper snapshot go (a
    published bundle stays: it was complete); a guest it froze is thawed."""
    intent = entry.intent
    partial, staging = Path(str(intent["partial"])), Path(str(intent["staging"]))
    # only names this export made: a hidden .NAME.HEX.partial and a cache/export-HEX folder
    if not partial.name.endswith(".partial") or staging.parent != vm.host.layout.cache:
        raise InvalidValue(f"the export journal of VM {vm.name!r} names unexpected files")
    point = intent.get("point")
    record = vm._observe(persist=True, held=held)
    if intent.get("frozen") and vm._alive(record):
        layers.thaw(vm)
    _export_cleanup(held, vm, partial, staging, point if isinstance(point, str) else None)


def _create_private(path: Path) -> IO[bytes]:
    """A new file readable and writable by its owner only, from its first byte (never an
    existing file, never through a symlink)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 BUNDLE_MODE)
    try:
        os.fchmod(fd, BUNDLE_MODE)  # exactly 0600, whatever the umask
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def _publish(partial: Path, path: Path) -> None:
    """Give the complete bundle its name without replacing a file that appeared meanwhile."""
    try:
        os.link(partial, path, follow_symlinks=False)
    except FileExistsError:
        raise InvalidValue(f"export target {path} already exists",
                           hint="choose a new file name") from None
    except OSError as exc:  # a file system without hard links: check, then rename
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise InvalidValue(f"export target {path} already exists",
                               hint="choose a new file name") from None
        os.rename(partial, path)
    else:
        os.unlink(partial)
    fsync_dir(path.parent)


def _write_bundle(vm: VM, path: Path, point: str | None, staging: Path,
                  progress: Progress | None, *, leave_out_active: bool = False,
                  bases_there: frozenset[str] = frozenset(),
                  boot_there: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`leave_out_active`: a live move's files (the active layer is what the guest writes
    now: it travels by the disk mirror into an empty overlay the manifest describes).
    `bases_there`: the sha256 of the image root disks the receiving host holds (a move): a
    VM on an image's base whose content is among them travels without it. `boot_there`: the
    same for kernels and initrds (the manifest's boot_links name what the receiver links)."""
    folder = vm.folder.path
    tree = store.load_tree(vm)
    config = vm.config
    active = vm.active_layer()
    if point is not None:  # the bundle's present is the export point's frozen layer
        active = tree.nodes[point].layer
        tree = tree.without(point).model_copy(update={"current": tree.nodes[point].parent})
    tree = tree.model_copy(update={"active_layer": active})
    layers = {*(node.layer for node in tree.nodes.values())}
    overlay: dict[str, Any] = {}
    if leave_out_active:
        info = img.info(folder / active)
        overlay = {"path": active, "backing": info.get("backing-filename"),
                   "size": int(info["virtual-size"])}
    else:
        layers.add(active)
    files: dict[str, Path] = {}
    boot_links: dict[str, str] = {}
    for item in sorted(vm.folder.boot.iterdir()):
        digest = catalog.remembered_sha256(item, vm.host.layout) if boot_there else None
        if digest is not None and digest in boot_there:
            boot_links[f"boot/{item.name}"] = digest
        else:
            files[f"boot/{item.name}"] = item
    if vm.folder.nvram.is_file():
        files[NVRAM_FILE] = vm.folder.nvram
    tpm_state = vm.folder.path / TPM_STATE_FILE
    if config.hardware.tpm and os.path.lexists(tpm_state):
        files[TPM_STATE_FILE] = tpm_state  # the TPM's keys travel with its machine
    for layer in sorted(layers):
        files[layer] = folder / layer
    for disk in config.disks:
        files[disk.file] = folder / disk.file
    for node in tree.nodes.values():
        for kept in (node.memory, node.nvram):
            if kept:
                files[kept] = folder / kept
    repoint: dict[str, str] = {}
    if config.backing_file is not None and not Path(config.backing_file).is_absolute():
        files[f"disks/{config.backing_file}"] = folder / "disks" / config.backing_file
    shared_base = _image_base_sha256(vm) if bases_there and config.backing_file else None
    if shared_base is not None and shared_base in bases_there:
        # the receiver has this very base (same sha256): it re-points the layers at its own
        repoint = {"from": str(config.backing_file), "image_sha256": shared_base}
    elif config.backing_file is not None and Path(config.backing_file).is_absolute():
        # the base outside the folder travels flattened; the layers keep their bytes and the
        # manifest says which backing name import re-points at it (no copy of big layers here)
        staging.mkdir(parents=True)
        files[BASE_LAYER] = staging / "base.qcow2"
        img.convert_flat(Path(config.backing_file), files[BASE_LAYER], untrusted=True,
                         owner=vm.disk_owner())
        repoint = {"from": config.backing_file, "to": Path(BASE_LAYER).name}
        config = config.model_copy(update={"backing_file": Path(BASE_LAYER).name})
    metadata = {
        "vm.json": json.dumps(config.model_dump(mode="json"), indent=2).encode(),
        "snapshots.json": json.dumps(tree.model_dump(mode="json"), indent=2).encode(),
    }
    total = sum(p.stat().st_size for p in files.values())
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    entries: list[dict[str, Any]] = []
    started = time.monotonic()
    with _create_private(path) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _fill_tar(tar, {"vm": vm.name, "repoint": repoint, "overlay": overlay,
                            "boot_links": boot_links}, metadata, files, entries, advance)
        raw.flush()
        os.fsync(raw.fileno())
    elapsed = time.monotonic() - started
    return {"path": str(path), "files": len(entries) + 1, "bytes": path.stat().st_size,
            "seconds": elapsed}


def _image_bases(host: Host) -> list[tuple[str, str, Path]]:
    """(name, sha256, root disk) of each image of `host`; none while a rebuild swaps an image
    folder (its image.json is read as the folder moves): the base then simply travels."""
    try:
        images = catalog.list_images(host.layout)
    except OSError:
        return []
    return [(image.name, image.sha256, host.layout.images / image.name / image.root_disk)
            for image in images]


def _image_base_sha256(vm: VM) -> str | None:
    """The sha256 of the image root disk `vm` stands on, when its base is one of this host's
    current images (not a linked clone's source, nor a retired base an image rebuild kept)."""
    for _, sha256, disk in _image_bases(vm.host):
        if vm.config.backing_file == str(disk) and sha256 == vm.config.base_image_sha256:
            return sha256
    return None


def _local_base(host: Host, repoint: dict[str, Any], path: Path) -> tuple[str, Path]:
    """(name, root disk) of this host's image whose base has the sha256 a moving VM's manifest
    names: the VM's layers are re-pointed at it instead of a base in the bundle."""
    wanted = repoint.get("image_sha256")
    for name, sha256, disk in _image_bases(host):
        if sha256 == wanted and disk.is_file():
            return name, disk
    raise BundleError(f"bundle {path}: it leaves out its base image (sha256 {shown(wanted)}), "
                      "which this host does not have",
                      hint="the image was removed or rebuilt here since the move began; "
                           "try the move again (the base then travels)")


def _boot_links(host: Host, manifest: dict[str, Any], expected: dict[str, Any], path: Path, *,
                moving: bool) -> dict[str, tuple[str, Path]]:
    """The boot files a move left out because the receiver has the same bytes (by sha256):
    member name -> (its digest, this host's image file to link in its place)."""
    links = manifest.get("boot_links") or {}  # an object: _read_manifest checked it
    if links and not moving:  # only a move, which asked what this host has, omits them
        raise BundleError(f"bundle {path} leaves out its boot files (it was written for a "
                          "move); refused", hint="export the VM with vmkit export to import it")
    if len(links) > MAX_BOOT_LINKS:  # each one a kernel-sized link, or copy, here
        raise BundleError(f"bundle {path}: its manifest's boot_links names {len(links)} "
                          f"files; a VM boots from at most {MAX_BOOT_LINKS}; refused")
    for member, digest in links.items():
        if not _BOOT_MEMBER.fullmatch(member) or member in expected or \
                not isinstance(digest, str):
            raise BundleError(f"bundle {path}: its manifest's boot_links names {shown(member)}, "
                              "which is not a boot file it leaves out; refused")
    here = catalog.boot_files(host.layout) if links else {}
    found: dict[str, tuple[str, Path]] = {}
    for member, digest in links.items():
        local = here.get(digest)
        if local is None:
            raise BundleError(f"bundle {path}: it leaves out {member} (sha256 {shown(digest)}), "
                              "which no image of this host has",
                              hint="an image was removed or rebuilt here since the move "
                                   "began; try the move again (the file then travels)")
        found[member] = (digest, local)
    return found


def _link_boot_files(host: Host, links: dict[str, tuple[str, Path]], folder: Path,
                     path: Path) -> None:
    """This host's image files in place of the boot files a move left out, each checked
    against the digest the manifest names once linked (an image rebuilt since the lookup
    has other files at those paths)."""
    for member, (digest, own) in links.items():
        catalog.link_or_copy(own, folder / member)
        if catalog.remembered_sha256(folder / member, host.layout) != digest:
            raise BundleError(f"bundle {path}: {member} (sha256 {shown(digest)}) changed here "
                              "while the move's files arrived; refused",
                              hint="an image was rebuilt meanwhile; try the move again")


def _fill_tar(tar: tarfile.TarFile, about: dict[str, Any], metadata: dict[str, bytes],
              files: dict[str, Path], entries: list[dict[str, Any]],
              advance: Callable[[int], None]) -> None:
    tar.copybufsize = _CHUNK  # type: ignore[attr-defined]  # bigger copies: ~2x faster
    for name, data in metadata.items():
        _add_bytes(tar, name, data)
        entries.append({"path": name, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    for name, source in files.items():
        info = tarfile.TarInfo(name)
        info.mode = 0o600
        with _open_regular(source) as handle:
            info.size = os.fstat(handle.fileno()).st_size
            reader = _HashingReader(handle, advance)
            tar.addfile(info, reader)
        entries.append({"path": name, "size": info.size,
                        "sha256": reader.digest.hexdigest()})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **about,
                "created_at": time.time(), "files": entries}
    _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())


def _open_regular(path: Path) -> IO[bytes]:
    """A file to export, opened without following a symlink (tpm/ is the VM's uid's: it could
    plant one there) and only if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"cannot export {path}: {exc.strerror} (a symlink or missing)") \
            from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"cannot export {path}: not a regular file")
    return os.fdopen(fd, "rb")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


# -- import -------------------------------------------------------------------------------
def import_bundle(host: Host, path: Path, *, name: str | None = None,
                  progress: Progress | None = None,
                  arriving: Callable[[VmFolder, VmConfig], VmConfig] | None = None) -> VM:
    """`arriving`: a VM moving here (ops/migration): it keeps its identity under `name`, and
    the callback marks the folder as incoming before it is published."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"bundle {path} does not exist")
    try:
        with tarfile.open(path, "r:") as tar:
            manifest = _read_manifest(tar, path)
            original = str(manifest["vm"])
            target = validate_name(name if name is not None else original)
            expected = {e["path"]: e for e in manifest["files"]}
            repoint = manifest.get("repoint") or {}
            image: str | None = None
            if "image_sha256" in repoint:
                if arriving is None:  # only a move, which asked what this host has, omits it
                    raise BundleError(f"bundle {path} leaves out its base image (it was "
                                      "written for a move); refused",
                                      hint="export the VM with vmkit export to import it")
                image = _local_base(host, repoint, path)[0]
            boot_links = _boot_links(host, manifest, expected, path, moving=arriving is not None)

            def build(work: VmFolder) -> VmConfig:
                with os_errors(f"importing {path}"):
                    _extract_checked(tar, work.path, expected, path, progress)
                    _link_boot_files(host, boot_links, work.path, path)
                fault_point("import", "extracted")
                # the disks are inspected by qemu-img without root: they become its files
                # (disks are what a VM's uid owns anyway; the folders stay root's)
                owner = img.untrusted_owner()
                with os_errors(f"importing {path}"):
                    _hand_disks(work.path, owner)
                # under the image's lock: its base is the one this VM now stands on
                local = None
                if image:
                    again, disk = _local_base(host, repoint, path)
                    if again != image:
                        raise BundleError(f"bundle {path}: image {image!r} changed while the "
                                          "move's files arrived; refused",
                                          hint="try the move again")
                    local = str(disk)
                _repoint(work.path, repoint, path, owner, local_base=local)
                if arriving is not None:
                    _empty_overlay(work.path, manifest.get("overlay") or {}, path, owner)
                config = _check_metadata(work.path, path, rebased=(
                    str(repoint.get("from")), local) if local else None)
                if local:  # what it stands on now, whatever the sender's vm.json said
                    config = config.model_copy(
                        update={"base_image_sha256": repoint["image_sha256"]})
                _check_disks(work.path, path, owner, local_base=local)
                fault_point("import", "checked")
                # ssh_identity and media name files on the exporting host: never opened here
                # (a bundle's media path would have root lend that file to the guest)
                config = config.model_copy(update={"ssh_identity": None, "media": None})
                if arriving is not None:  # the same machine, maybe under a new name
                    return arriving(work, config.model_copy(update={
                        "spec": config.spec.model_copy(update={"name": target})}))
                if target != original:  # a copy: a new identity, never the source's
                    config = as_new_machine(config, target, created_at=time.time())
                    # nor its TPM's keys: the copy's TPM starts empty
                    (work.path / TPM_STATE_FILE).unlink(missing_ok=True)
                return config

            # an image's shared lock, as a create takes it: no rebuild retires the base
            # this VM is re-pointed at before the VM is listed
            with host._image_lock(image, shared=True) if image else contextlib.nullcontext():
                vm = host._new_vm_folder(target, build)
            fault_point("import", "published")
    except tarfile.TarError as exc:
        raise BundleError(f"bundle {path} is not a readable vmkit bundle: {exc}",
                          hint="was it truncated or damaged in transfer?") from exc
    return vm


def _read_manifest(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    try:
        member = tar.getmember("manifest.json")
    except KeyError:
        raise BundleError(f"bundle {path} has no manifest.json (truncated, or not a vmkit "
                          "bundle)") from None
    if not member.isfile() or member.size > _MANIFEST_LIMIT:
        raise BundleError(f"bundle {path}: manifest.json is not a small regular file")
    handle = tar.extractfile(member)
    assert handle is not None
    try:
        manifest: dict[str, Any] = json.loads(handle.read())
    except ValueError as exc:
        raise BundleError(f"bundle {path}: manifest.json is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: manifest.json is not an object; refused")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle {path}: format {manifest.get('format')!r} version "
                          f"{manifest.get('format_version')!r} is not {FORMAT} {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(manifest.get("vm"), str) or not isinstance(files, list) or \
            not all(_listed(entry) for entry in files):
        raise BundleError(f"bundle {path}: its manifest names no VM, or does not list each "
                          "file as path, size and sha256; refused")
    for key in ("repoint", "overlay", "boot_links"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise BundleError(f"bundle {path}: its manifest's {key} is not an object; refused")
    return manifest


def _listed(entry: Any) -> bool:
    """One file of a manifest: {path, size, sha256} of the right types."""
    return isinstance(entry, dict) and isinstance(entry.get("path"), str) and \
        type(entry.get("size")) is int and entry["size"] >= 0 and \
        isinstance(entry.get("sha256"), str)


def _extract_checked(tar: tarfile.TarFile, dest: Path, expected: dict[str, dict[str, Any]],
                     path: Path, progress: Progress | None) -> None:
    total = sum(int(e["size"]) for e in expected.values())
    done = 0
    seen: set[str] = set()
    for member in tar:
        if member.name == "manifest.json":
            continue
        if not member.isfile() or not _MEMBER.match(member.name) or member.name in seen:
            raise BundleError(f"bundle {path}: unexpected member {member.name!r}",
                              hint="only vm.json, snapshots.json, boot/, disks/*.qcow2, "
                                   "volumes/*.qcow2, disks/nvram.fd, tpm/tpm2-00.permall, "
                                   "snapshots/*.state and snapshots/*.nvram.fd may be in a "
                                   "bundle")
        entry = expected.get(member.name)
        if entry is None:
            raise BundleError(f"bundle {path}: {member.name} is not in the manifest")
        seen.add(member.name)
        target = dest / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        with open(target, "wb") as out:
            size, digest = _copy_hashing(source, out, done, total, progress)
        done += size
        if size != int(entry["size"]) or digest != entry["sha256"]:
            raise BundleError(f"bundle {path}: {member.name} does not match its checksum "
                              "(tampered with or damaged)")
    missing = sorted(set(expected) - seen)
    if missing:
        raise BundleError(f"bundle {path} is incomplete: missing {', '.join(missing)}",
                          hint="was it truncated in transfer?")


def _empty_overlay(folder: Path, overlay: dict[str, Any], path: Path,
                   owner: jail.RunAs | None) -> None:
    """The layer a live move's disk mirror fills: empty, on the bundle's layer it names."""
    if not overlay:
        return
    layer, backing, size = overlay.get("path"), overlay.get("backing"), overlay.get("size")
    try:
        if not isinstance(layer, str):
            raise InvalidValue("path")
        check_relative_path("overlay", layer, under="disks", suffix=".qcow2")
        if not isinstance(backing, str) or not re.fullmatch(r"[\w.-]+\.qcow2", backing) \
                or not (folder / "disks" / backing).is_file():
            raise InvalidValue("backing")
        if type(size) is not int or not 0 < size <= MAX_OVERLAY:
            raise InvalidValue("size")
    except InvalidValue:
        raise BundleError(f"bundle {path}: its manifest's overlay {shown(overlay)} is not an "
                          "overlay on a disk of the bundle; refused") from None
    target = folder / str(layer)
    if os.path.lexists(target):
        raise BundleError(f"bundle {path}: the overlay {layer} is also a member; refused")
    img.create_overlay(target, backing, size, unopened=True)  # checked with the rest
    _hand_disks(folder, owner)


def _hand_disks(folder: Path, owner: jail.RunAs | None) -> None:
    """Give the staged disks (regular files, no symlink followed) to `owner`, 0600."""
    if owner is None:
        return
    for disk in sorted([*(folder / "disks").glob("*.qcow2"),
                        *(folder / "volumes").glob("*.qcow2")]):
        fd = os.open(disk, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, owner.uid, owner.gid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def _repoint(folder: Path, repoint: dict[str, str], path: Path,
             owner: jail.RunAs | None, local_base: str | None = None) -> None:
    """Re-point layers that named the exporter's base at the bundle's flattened base, or at
    `local_base` (a move whose base this host has). Only the header is rewritten
    (`rebase -u`): the old name is never opened."""
    if not repoint:
        return
    old, new = repoint.get("from"), local_base or repoint.get("to")
    if local_base is not None:
        if not isinstance(old, str):
            raise BundleError(f"bundle {path}: its manifest's repoint names no base; refused")
    elif not isinstance(old, str) or not isinstance(new, str) or \
            not re.fullmatch(r"[\w.-]+\.qcow2", new) or not (folder / "disks" / new).is_file():
        raise BundleError(f"bundle {path}: its manifest re-points disks at {new!r}, which is "
                          "not a disk of the bundle; refused")
    assert isinstance(new, str)
    for disk in sorted((folder / "disks").glob("*.qcow2")):
        if disk.name != new and _disk_info(disk, path, owner).get("backing-filename") == old:
            try:
                img.rebase_unsafe(disk, new, untrusted=True, owner=owner)
            except VmkitError as exc:
                raise BundleError(f"bundle {path}: disks/{disk.name} could not be re-pointed "
                                  f"at {new}; refused", detail=str(exc)) from exc


def _disk_info(disk: Path, path: Path, owner: jail.RunAs | None) -> dict[str, Any]:
    """qemu-img info of one staged disk: unprivileged, resource-limited, format explicit."""
    try:
        return img.info(disk, untrusted=True, owner=owner)
    except VmkitError as exc:
        raise BundleError(f"bundle {path}: {disk.parent.name}/{disk.name} is not a qcow2 image "
                          f"vmkit can accept: {exc.message}", detail=exc.detail) from exc


def _copy_hashing(source: IO[bytes], out: IO[bytes], done: int, total: int,
                  progress: Progress | None) -> tuple[int, str]:
    """Copy while hashing; the hash of one chunk runs in a thread while the next is read and
    written (hashlib and file I/O release the GIL), so checking costs little extra time."""
    digest = hashlib.sha256()
    size = 0
    with ThreadPoolExecutor(max_workers=1) as hasher:
        pending: Future[None] | None = None
        while chunk := source.read(_CHUNK):
            out.write(chunk)
            if pending is not None:
                pending.result()
            pending = hasher.submit(digest.update, chunk)
            size += len(chunk)
            if progress:
                progress(done + size, total)
        if pending is not None:
            pending.result()
    return size, digest.hexdigest()


def _check_metadata(folder: Path, path: Path, rebased: tuple[str, str] | None = None
                    ) -> VmConfig:
    """Every field of vm.json and snapshots.json passes the model's validation; machine type and
    CPU model are ones this QEMU offers; the metadata names only files of this bundle, each in
    its own folder. `rebased` (a move that left its base out): vm.json's backing_file must be
    the exporter's base it names first, and becomes this host's image base it names second."""
    config = _validated(folder, "vm.json", VmConfig, path)
    if rebased is not None:
        if config.backing_file != rebased[0]:
            raise BundleError(f"bundle {path}: vm.json backing_file "
                              f"{shown(config.backing_file)} is not the base its manifest "
                              "leaves out; refused")
        config = config.model_copy(update={"backing_file": rebased[1]})
    tree = _validated(folder, "snapshots.json", store.DiskState, path)
    hardware = config.hardware
    if hardware.machine not in hostinfo.machine_types():
        raise BundleError(f"bundle {path}: vm.json hardware.machine {shown(hardware.machine)} is "
                          "not a machine type this host's QEMU offers; refused",
                          hint="see qemu-system-x86_64 -machine help")
    if hardware.cpu_model not in hostinfo.cpu_models():
        raise BundleError(f"bundle {path}: vm.json hardware.cpu_model "
                          f"{shown(hardware.cpu_model)} is not a CPU model this host's QEMU "
                          "offers; refused", hint="see qemu-system-x86_64 -cpu help")
    named: list[tuple[str, str | None, str, str]] = [
        ("vm.json disk_file", config.disk_file, "disks", ".qcow2"),
        ("snapshots.json active_layer", tree.active_layer, "disks", ".qcow2"),
    ]
    if config.boot is not None:
        named += [("vm.json boot.kernel", config.boot.kernel, "boot", ""),
                  ("vm.json boot.initrd", config.boot.initrd, "boot", "")]
    if hardware.firmware == "ovmf":
        named.append(("the UEFI variables", NVRAM_FILE, "disks", ".fd"))
    if config.backing_file is not None and rebased is None:
        named.append(("vm.json backing_file", f"disks/{config.backing_file}", "disks", ".qcow2"))
    for disk in config.disks:
        named.append((f"vm.json disk {disk.name}", disk.file, "volumes", ".qcow2"))
    for node in tree.nodes.values():
        named.append((f"snapshots.json snapshot {node.name} layer", node.layer, "disks",
                      ".qcow2"))
        if node.memory is not None:
            named.append((f"snapshots.json snapshot {node.name} memory", node.memory,
                          "snapshots", ".state"))
        if node.nvram is not None:
            named.append((f"snapshots.json snapshot {node.name} nvram", node.nvram,
                          "snapshots", ".fd"))
    for field, value, under, suffix in named:
        if field == "vm.json disk_file" and tree.active_layer is not None:
            continue  # superseded by the active layer
        try:
            if value is None:
                raise InvalidValue("missing")
            check_relative_path(field, value, under=under, suffix=suffix)
        except InvalidValue:
            raise BundleError(f"bundle {path}: {field} {shown(value)} is not a file of the "
                              "bundle; refused", hint=f"expected {under}/NAME{suffix}") from None
        target = folder / value
        if target.is_symlink() or not target.is_file():
            raise BundleError(f"bundle {path}: {field} {shown(value)} is not a file of the "
                              "bundle; refused")
    volumes = folder / "volumes"
    present = {p.name for p in volumes.iterdir()} if volumes.is_dir() else set()
    unnamed = sorted(present - {Path(d.file).name for d in config.disks})
    if unnamed:
        raise BundleError(f"bundle {path}: volumes/{unnamed[0]} is no extra disk vm.json "
                          "names; refused")
    if hardware.firmware == "ovmf":
        try:
            expected = os.path.getsize(OVMF_VARS_TEMPLATE)
        except OSError:
            raise BundleError(f"bundle {path}: the VM boots through UEFI, and this host has "
                              f"no OVMF ({OVMF_VARS_TEMPLATE})",
                              hint="apt-get install ovmf (make run installs it)") from None
        for stores in (NVRAM_FILE, *(n.nvram for n in tree.nodes.values() if n.nvram)):
            size = (folder / stores).stat().st_size
            if size != expected:
                raise BundleError(f"bundle {path}: the UEFI variables ({stores}) are {size} "
                                  f"bytes, this host's OVMF takes {expected}; refused")
    return config


def _validated(folder: Path, name: str, model: type[_Model], path: Path) -> _Model:
    """A metadata file parsed by its model; a refusal names the file and the field."""
    try:
        return model.model_validate_json((folder / name).read_bytes())
    except InvalidValue as exc:
        raise BundleError(f"bundle {path}: {name}: {exc.message}; refused", hint=exc.hint,
                          detail=exc.detail) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(the document)"
        raise BundleError(f"bundle {path}: {name}: invalid {field} "
                          f"{shown(first.get('input'))}: {first['msg']}; refused") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {path}: unreadable {name}", detail=str(exc)) from exc


def _check_disks(folder: Path, path: Path, owner: jail.RunAs | None,
                 local_base: str | None = None) -> None:
    """Every qcow2 may only lean on another disk of the bundle (no /etc/shadow as backing), or
    on `local_base`, the image base of this host a moving VM was re-pointed at."""
    disks = {p.name for p in (folder / "disks").glob("*.qcow2")}
    for disk in sorted((folder / "disks").glob("*.qcow2")):
        info = _disk_info(disk, path, owner)
        backing = info.get("backing-filename")
        inside = backing in disks and "/" not in backing
        if backing is not None and (not (inside or (local_base and backing == local_base))
                                    or info.get("backing-filename-format") != "qcow2"):
            raise BundleError(f"bundle {path}: {disk.name} names {backing!r} as its backing "
                              "file, which is not a qcow2 disk inside the bundle; refused")
        data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
        if data_file is not None:
            raise BundleError(f"bundle {path}: {disk.name} has an external data file "
                              f"{data_file!r}; refused")
    for volume in sorted((folder / "volumes").glob("*.qcow2")):
        info = _disk_info(volume, path, owner)  # an extra disk stands alone
        data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
        if info.get("backing-filename") is not None or data_file is not None:
            raise BundleError(f"bundle {path}: volumes/{volume.name} names another file "
                              f"({info.get('backing-filename') or data_file!r}); refused",
                              hint="an extra disk of a bundle is a qcow2 without backing or "
                                   "data file")


register_recovery("export", recover_export)
