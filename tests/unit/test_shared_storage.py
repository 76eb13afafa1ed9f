"""Shared storage's pure and file-level parts: the registration a host keeps for a VM whose
folder is elsewhere, the nonce that proves two hosts see the same folder, and the checks that
keep a planted folder or link from being run as a VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmkit.errors import BrokenVm, InvalidValue, MoveRefused
from vmkit.storage import shared
from vmkit.storage.layout import (
    HomeLayout,
    Registration,
    VmFolder,
    check_shared_folder,
    read_registration,
    write_registration,
)


def test_a_registered_vm_splits_what_it_is_from_what_this_host_runs(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path / "home")
    layout.ensure()
    local = layout.vms / "web"
    local.mkdir()
    write_registration(local, Registration("/pool/web", 3, "u-1"))
    folder = layout.vm("web")
    assert folder == VmFolder(Path("/pool/web"), runtime=local) and folder.shared
    assert folder.config_file == Path("/pool/web/vm.json")
    assert folder.disks == Path("/pool/web/disks") and folder.nvram.parent == folder.disks
    for runtime_path in (folder.state_file, folder.qmp_socket, folder.serial_log,
                         folder.exit_file, folder.seed_file):
        assert runtime_path.is_relative_to(local), runtime_path
    plain = layout.vm("db")
    assert not plain.shared and plain.runtime_root == plain.path == layout.vms / "db"
    assert plain.state_file == layout.vms / "db/state.json"


@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"folder": "relative/web", "generation": 1}',
    b'{"folder": "/pool/../etc", "generation": 1}', b'{"folder": "/pool/web", "generation": -1}',
    b'{"folder": "/pool/web", "generation": "1"}', b'{"folder": "/pool/web\\n", "generation": 1}',
    b'{"generation": 1}'])
def test_a_damaged_registration_is_a_broken_vm(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "shared.json").write_bytes(content)
    with pytest.raises(BrokenVm, match=r"shared\.json"):
        read_registration(tmp_path)


def test_a_registration_that_is_a_link_is_never_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps({"folder": "/pool/web", "generation": 1}))
    local = tmp_path / "vm"
    local.mkdir()
    (local / "shared.json").symlink_to(real)
    with pytest.raises(BrokenVm, match="cannot open"):
        read_registration(local)
    assert read_registration(tmp_path / "absent") is None


@pytest.mark.parametrize("path", ["pool", "/", "/pool/", "/pool/./web", "/a\x01b"])
def test_a_shared_folder_must_be_an_absolute_normal_path(path: str) -> None:
    with pytest.raises(InvalidValue):
        check_shared_folder(path)


def test_the_nonce_proves_the_same_folder(tmp_path: Path) -> None:
    folder = tmp_path / "web"
    folder.mkdir()
    nonce = shared.write_nonce(folder)
    assert shared.sees(str(folder), nonce) is None
    other = "0" * 64
    assert "does not see" in (shared.sees(str(folder), other) or "")
    # same prefix (the file name), other secret: a different folder at that path
    forged = nonce[:16] + ("1" if nonce[16] != "1" else "2") + nonce[17:]
    assert "not the source's folder" in (shared.sees(str(folder), forged) or "")
    assert "malformed" in (shared.sees(str(folder), "../../x") or "")
    with pytest.raises(MoveRefused, match="does not see"):
        shared.require_sees(str(tmp_path / "absent"), nonce)
    shared.remove_nonce(folder, nonce)
    assert not list(folder.iterdir())


def test_a_nonce_link_is_not_followed(tmp_path: Path) -> None:
    folder = tmp_path / "web"
    folder.mkdir()
    nonce = "ab" * 32
    target = tmp_path / "secret"
    target.write_text(nonce)
    (folder / f".move-{nonce[:16]}").symlink_to(target)
    assert shared.sees(str(folder), nonce) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply to root")
def test_a_folder_a_user_could_plant_is_never_run(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    (pool / "web").mkdir(parents=True)
    pool.chmod(0o755)
    (pool / "web").chmod(0o710)
    shared.require_root_owned(str(pool / "web"))
    os.chown(pool, 65534, 65534)  # a pool a user owns: they could swap the folder
    with pytest.raises(MoveRefused, match="only root may change"):
        shared.require_root_owned(str(pool / "web"))
    os.chown(pool, 0, 0)
    (pool / "web").chmod(0o777)
    with pytest.raises(MoveRefused, match="only root may change"):
        shared.require_root_owned(str(pool / "web"))


def test_a_pool_must_be_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidValue, match="not an absolute path"):
        shared.check_pool("pool")
    with pytest.raises(InvalidValue, match="no such folder"):
        shared.check_pool(tmp_path / "absent")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidValue, match="not a folder"):
        shared.check_pool(tmp_path / "link")
    assert shared.check_pool(tmp_path) == tmp_path


def test_the_pool_keeps_one_copy_of_an_image(tmp_path: Path) -> None:
    source = tmp_path / "root.qcow2"
    source.write_bytes(b"base" * 100)
    first = shared.pool_base(tmp_path, "tiny", "ab12", source)
    assert first == tmp_path / ".images/tiny-ab12.qcow2" and first.read_bytes() == b"base" * 100
    assert first.stat().st_mode & 0o777 == 0o644
    source.write_bytes(b"changed")
    assert shared.pool_base(tmp_path, "tiny", "ab12", source).read_bytes() == b"base" * 100
    assert [p.name for p in (tmp_path / ".images").iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="uid ranges are recorded by root")
def test_hosts_sharing_a_pool_must_not_share_vm_uids(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    pool.mkdir(mode=0o755)
    monkeypatch.setenv("VMKIT_UID_REGISTRY", str(tmp_path / "uids-a"))
    monkeypatch.setenv("VMKIT_UID_RANGE", "3000000:1000")
    shared.claim_uid_range(pool)
    shared.claim_uid_range(pool)  # the same host again: its record is kept
    monkeypatch.setenv("VMKIT_UID_REGISTRY", str(tmp_path / "uids-b"))
    monkeypatch.setenv("VMKIT_UID_RANGE", "3000500:1000")
    with pytest.raises(InvalidValue, match="overlap") as refused:
        shared.claim_uid_range(pool)
    assert "VMKIT_UID_RANGE" in (refused.value.hint or "")
    monkeypatch.setenv("VMKIT_UID_RANGE", "3001000:1000")
    shared.claim_uid_range(pool)
    ranges = sorted(json.loads(p.read_text())["base"] for p in (pool / ".hosts").glob("*.json"))
    assert ranges == [3000000, 3001000]


def test_a_link_anywhere_on_the_path_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "web").mkdir(parents=True)
    (tmp_path / "via").symlink_to(real)
    assert "link" in (shared.untrusted_part(tmp_path / "via" / "web") or "")
    assert shared.untrusted_part(real / "web") is None
    with pytest.raises(MoveRefused, match="link"):
        shared.require_root_owned(str(tmp_path / "via" / "web"))


def test_a_shared_vm_stands_only_on_its_pools_images() -> None:
    shared.check_chain_bottom("/pool/web", None)
    shared.check_chain_bottom("/pool/web", "/pool/.images/tiny-ab12.qcow2")
    for bad in ("/var/lib/vmkit/vms/db/disks/root.qcow2", "/etc/shadow",
                "/pool/.images/../db/disks/root.qcow2", "/pool/.images/x/y.qcow2",
                "/other/.images/tiny.qcow2"):
        with pytest.raises(MoveRefused, match="stands on"):
            shared.check_chain_bottom("/pool/web", bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is root's to change")
def test_disown_takes_back_only_what_the_freed_uid_owns(tmp_path: Path) -> None:
    from vmkit.isolation import jail

    folder = tmp_path / "web"
    (folder / "disks").mkdir(parents=True)
    mine, theirs = folder / "disks/root.qcow2", folder / "disks/snap.qcow2"
    for path in (mine, theirs):
        path.write_bytes(b"x")
    os.chown(folder, 0, 3000001)
    os.chown(mine, 3000001, 3000001)
    os.chown(theirs, 3000777, 3000777)  # another host's VM runs it now
    outside = tmp_path / "outside"
    outside.write_bytes(b"y")
    os.chown(outside, 3000001, 3000001)  # a link to it is not followed
    (folder / "disks/link.qcow2").symlink_to(outside)
    jail.disown(3000001, folder)
    assert (mine.stat().st_uid, mine.stat().st_gid) == (0, 0)
    assert folder.stat().st_gid == 0
    assert theirs.stat().st_uid == 3000777
    assert outside.stat().st_uid == 3000001
