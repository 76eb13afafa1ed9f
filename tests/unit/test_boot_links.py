"""A move leaves out boot files the receiver already has (same sha256): the digests are
remembered per inode, and a manifest's boot_links may only name boot files it leaves out,
each one an image file of the receiving host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from vmkit.images import catalog
from vmkit.ops import bundles
from vmkit.ops.bundles import BundleError
from vmkit.storage.layout import HomeLayout


def _image(home: HomeLayout, name: str, kernel: bytes, initrd: bytes) -> Path:
    folder = home.image(name)
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(kernel)
    (folder / "initrd.img").write_bytes(initrd)
    (folder / "image.json").write_text(json.dumps({
        "name": name, "os": "test", "kernel_version": "6.1", "root_disk": "root.qcow2",
        "cmdline": "console=ttyS0", "recipe_hash": "0" * 64, "sha256": "1" * 64, "size": 1,
        "virtual_size": 1, "built_at": 0.0, "packages": {}}))
    return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_digest_is_read_once_per_inode_and_a_replaced_file_is_hashed_again(
        tmp_path: Path) -> None:
    home = HomeLayout(tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel one")
    assert catalog.remembered_sha256(kernel, home) == _sha(b"kernel one")
    memo = next((tmp_path / "cache" / "digests").iterdir())
    memo.write_text("f" * 64)  # the memo, not the file, answers while the inode is the same
    assert catalog.remembered_sha256(kernel, home) == "f" * 64
    memo.write_text("not a digest")
    assert catalog.remembered_sha256(kernel, home) == _sha(b"kernel one")
    replacement = tmp_path / "new"
    replacement.write_bytes(b"kernel two, longer")
    os.replace(replacement, kernel)  # how a rebuild changes an image file: a new inode
    assert catalog.remembered_sha256(kernel, home) == _sha(b"kernel two, longer")


def test_the_boot_files_of_every_image_are_found_by_digest(tmp_path: Path) -> None:
    home = HomeLayout(tmp_path)
    tiny = _image(home, "tiny", b"k1", b"i1")
    other = _image(home, "other", b"k2", b"i1")
    found = catalog.boot_files(home)
    assert found[_sha(b"k1")] == tiny / "vmlinuz"
    assert found[_sha(b"k2")] == other / "vmlinuz"
    assert found[_sha(b"i1")].name == "initrd.img" and len(found) == 3


class _Host:
    def __init__(self, layout: HomeLayout) -> None:
        self.layout = layout


def _links(home: HomeLayout, links: Any, *, expected: dict[str, Any] | None = None,
           moving: bool = True) -> dict[str, tuple[str, Path]]:
    return bundles._boot_links(_Host(home), {"boot_links": links},  # type: ignore[arg-type]
                               expected or {}, Path("b.vmkit"), moving=moving)


def test_boot_links_name_this_hosts_image_files(tmp_path: Path) -> None:
    home = HomeLayout(tmp_path)
    tiny = _image(home, "tiny", b"k1", b"i1")
    assert _links(home, {"boot/vmlinuz": _sha(b"k1"), "boot/initrd.img": _sha(b"i1")}) == {
        "boot/vmlinuz": (_sha(b"k1"), tiny / "vmlinuz"),
        "boot/initrd.img": (_sha(b"i1"), tiny / "initrd.img")}
    assert _links(home, {}) == {} and _links(home, None, moving=False) == {}


@pytest.mark.parametrize(("links", "moving", "message"), [
    ({"boot/vmlinuz": "k1"}, False, "written for a move"),
    ({"boot/..": "k1"}, True, "not a boot file it leaves out"),
    ({"boot/.": "k1"}, True, "not a boot file it leaves out"),
    ({"disks/root.qcow2": "k1"}, True, "not a boot file it leaves out"),
    ({"boot/a/b": "k1"}, True, "not a boot file it leaves out"),
    ({"../../etc/passwd": "k1"}, True, "not a boot file it leaves out"),
    ({"boot/member": "k1"}, True, "not a boot file it leaves out"),  # also in the bundle
    ({"boot/vmlinuz": 5}, True, "not a boot file it leaves out"),
    ({"boot/vmlinuz": "0" * 64}, True, "which no image of this host has"),
    ({f"boot/k{i}": "k1" for i in range(5)}, True, "at most 4"),
])
def test_hostile_or_stale_boot_links_are_refused(tmp_path: Path, links: Any, moving: bool,
                                                 message: str) -> None:
    home = HomeLayout(tmp_path)
    _image(home, "tiny", b"k1", b"i1")
    digests = {"k1": _sha(b"k1")}
    if isinstance(links, dict):
        links = {k: digests.get(v, v) if isinstance(v, str) else v for k, v in links.items()}
    with pytest.raises(BundleError, match=message):
        _links(home, links, expected={"boot/member": {}}, moving=moving)


def _manifest_in_tar(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "b.vmkit"
    data = json.dumps(document).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


_GOOD = {"format": bundles.FORMAT, "format_version": bundles.FORMAT_VERSION, "vm": "web",
         "files": [{"path": "vm.json", "size": 2, "sha256": "0" * 64}]}


@pytest.mark.parametrize(("document", "message"), [
    ([_GOOD], "manifest.json is not an object"),
    ({k: v for k, v in _GOOD.items() if k != "vm"}, "names no VM"),
    ({**_GOOD, "vm": 5}, "names no VM"),
    ({**_GOOD, "files": "vm.json"}, "path, size and sha256"),
    ({**_GOOD, "files": ["vm.json"]}, "path, size and sha256"),
    ({**_GOOD, "files": [{"path": "vm.json"}]}, "path, size and sha256"),
    ({**_GOOD, "files": [{"path": "vm.json", "size": "many", "sha256": "0"}]},
     "path, size and sha256"),
    ({**_GOOD, "files": [{"path": "vm.json", "size": -1, "sha256": "0"}]},
     "path, size and sha256"),
    ({**_GOOD, "files": [{"path": "vm.json", "size": True, "sha256": "0"}]},
     "path, size and sha256"),
    ({**_GOOD, "repoint": ["x"]}, "repoint is not an object"),
    ({**_GOOD, "overlay": "disks/x.qcow2"}, "overlay is not an object"),
    ({**_GOOD, "boot_links": ["boot/vmlinuz"]}, "boot_links is not an object"),
])
def test_a_manifest_of_the_wrong_shape_is_a_bundle_error_not_a_crash(
        tmp_path: Path, document: Any, message: str) -> None:
    with tarfile.open(_manifest_in_tar(tmp_path, document)) as tar, \
            pytest.raises(BundleError, match=message):
        bundles._read_manifest(tar, tmp_path / "b.vmkit")


def test_a_well_formed_manifest_is_read(tmp_path: Path) -> None:
    with tarfile.open(_manifest_in_tar(tmp_path, _GOOD)) as tar:
        assert bundles._read_manifest(tar, tmp_path / "b.vmkit")["vm"] == "web"


def test_linked_boot_files_are_the_image_files_and_checked_against_their_digest(
        tmp_path: Path) -> None:
    home = HomeLayout(tmp_path)
    tiny = _image(home, "tiny", b"k1", b"i1")
    folder = tmp_path / "arriving"
    (folder / "boot").mkdir(parents=True)
    links = _links(home, {"boot/vmlinuz": _sha(b"k1")})
    bundles._link_boot_files(_Host(home), links, folder,  # type: ignore[arg-type]
                             Path("b.vmkit"))
    assert (folder / "boot/vmlinuz").stat().st_ino == (tiny / "vmlinuz").stat().st_ino
    # an image rebuilt between the lookup and the link: other bytes under that path
    replacement = tmp_path / "new-kernel"
    replacement.write_bytes(b"a rebuilt kernel")
    os.replace(replacement, tiny / "vmlinuz")
    again = tmp_path / "again"
    (again / "boot").mkdir(parents=True)
    with pytest.raises(BundleError, match="changed here while the move's files arrived"):
        bundles._link_boot_files(_Host(home), links, again,  # type: ignore[arg-type]
                                 Path("b.vmkit"))


def test_link_or_copy_never_writes_onto_an_existing_file(tmp_path: Path) -> None:
    image_file = tmp_path / "vmlinuz"
    image_file.write_bytes(b"the image's kernel")
    existing = tmp_path / "existing"
    os.link(image_file, existing)  # e.g. a VM's boot file: the same inode as the image's
    other = tmp_path / "other"
    other.write_bytes(b"something else")
    with pytest.raises(FileExistsError):
        catalog.link_or_copy(other, existing)
    assert image_file.read_bytes() == b"the image's kernel"
