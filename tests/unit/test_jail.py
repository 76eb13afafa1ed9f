"""Per-VM uids (the registry), the exec chain that jails QEMU, and ACL entries for clones."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from vmkit.errors import HostError, InvalidValue
from vmkit.isolation import acl, jail, uids


def _vm_folder(tmp_path: Path, name: str, vm_uuid: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vm.json").write_text(json.dumps({"uuid": vm_uuid}))
    return folder


def test_each_vm_gets_its_own_uid_kept_until_released(tmp_path: Path) -> None:
    registry = tmp_path / "uids"
    small = uids.UidRange(base=5000, count=3)
    a = uids.claim("uuid-a", _vm_folder(tmp_path, "a", "uuid-a"), registry=registry,
                   uid_range=small)
    b = uids.claim("uuid-b", _vm_folder(tmp_path, "b", "uuid-b"), registry=registry,
                   uid_range=small)
    assert (a, b) == (5000, 5001)
    assert uids.claim("uuid-a", tmp_path / "a", registry=registry, uid_range=small) == a
    assert uids.lookup("uuid-b", registry=registry) == b
    uids.release("uuid-a", registry=registry)
    uids.release("uuid-a", registry=registry)  # idempotent
    assert uids.lookup("uuid-a", registry=registry) is None
    c = uids.claim("uuid-c", _vm_folder(tmp_path, "c", "uuid-c"), registry=registry,
                   uid_range=small)
    assert c == 5000  # freed, taken again
    assert oct((registry / "5000").stat().st_mode & 0o777) == "0o600"


def test_a_stale_claim_is_reused_and_a_full_range_refused(tmp_path: Path) -> None:
    registry = tmp_path / "uids"
    small = uids.UidRange(base=5000, count=1)
    gone = _vm_folder(tmp_path, "gone", "uuid-gone")
    assert uids.claim("uuid-gone", gone, registry=registry, uid_range=small) == 5000
    live = _vm_folder(tmp_path, "live", "uuid-live")
    with pytest.raises(HostError, match="no free VM uid"):
        uids.claim("uuid-live", live, registry=registry, uid_range=small)
    (gone / "vm.json").unlink()  # its home was removed by hand: the claim is stale
    assert uids.claim("uuid-live", live, registry=registry, uid_range=small) == 5000


def test_uid_range_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_UID_RANGE", "10:5")
    with pytest.raises(InvalidValue, match="uid range"):
        uids.configured_range()
    monkeypatch.setenv("VMKIT_UID_RANGE", "nonsense")
    with pytest.raises(InvalidValue, match="VMKIT_UID_RANGE"):
        uids.configured_range()
    monkeypatch.setenv("VMKIT_UID_RANGE", "3000000:100")
    assert uids.configured_range() == uids.UidRange(3000000, 100)


def test_exec_chain_joins_the_cgroup_then_drops_privileges() -> None:
    owner = jail.RunAs(2000001, 2000001)
    argv = jail.drop_to(owner, ["qemu-system-x86_64", "-name", "a,b"],
                        join=[Path("/sys/fs/cgroup/cpu/vmkit/a/cgroup.procs")])
    assert argv[:6] == ["/bin/sh", "-c", jail._JOIN_SCRIPT, "vmkit-join", "1",
                        "/sys/fs/cgroup/cpu/vmkit/a/cgroup.procs"]
    assert argv[6:13] == ["setpriv", "--reuid=2000001", "--regid=2000001", "--clear-groups",
                          "--no-new-privs", "--inh-caps=-all", "--"]
    assert argv[13:] == ["qemu-system-x86_64", "-name", "a,b"]  # QEMU's argv untouched
    assert jail.drop_to(None, ["qemu"]) == ["qemu"]


def test_join_script_writes_its_own_pid_then_execs(tmp_path: Path) -> None:
    procs = [tmp_path / "p1", tmp_path / "p2"]
    out = tmp_path / "out"
    argv = jail.drop_to(None, ["/bin/sh", "-c", f'echo $$ > {out}'], join=procs)
    pid = os.spawnv(os.P_WAIT, argv[0], argv)
    assert pid == 0
    written = {p.read_text().strip() for p in procs}
    assert written == {out.read_text().strip()}  # the same process: exec, no extra child


def test_acl_render_round_trip_and_mask() -> None:
    entries = acl.from_mode(0o640)
    entries[(acl.USER, 2000005)] = acl.READ
    blob = acl.render(entries)
    assert struct.unpack_from("<I", blob)[0] == 2
    parsed = acl.parse(blob)
    assert parsed[(acl.USER, 2000005)] == acl.READ
    assert parsed[(acl.MASK, 0xFFFFFFFF)] == acl.READ  # user r | group obj r
    tags = [t for (t, _i) in sorted(parsed)]
    assert tags == sorted(tags)
    parsed.pop((acl.USER, 2000005))
    assert (acl.MASK, 0xFFFFFFFF) not in acl.parse(acl.render(parsed))


@pytest.mark.skipif(os.geteuid() != 0, reason="ACLs for other uids need root")
def test_acl_grant_and_revoke_on_a_file(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_text("x")
    os.chmod(path, 0o600)
    try:
        acl.grant(str(path), 2000007, acl.READ)
    except OSError as exc:  # a file system without ACLs
        pytest.skip(f"no POSIX ACLs here: {exc}")
    assert acl.users(str(path)) == {2000007: acl.READ}
    acl.revoke(str(path), 2000007)
    acl.revoke(str(path), 2000007)
    assert acl.users(str(path)) == {}
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(OSError):
        acl.grant(str(link), 2000007, acl.READ)  # never through a symlink
