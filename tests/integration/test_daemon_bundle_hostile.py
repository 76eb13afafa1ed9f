"""Hostile bundles uploaded through the daemon's HTTP API: `POST /1.0/vms/import` and the
destination side of a move, `POST /1.0/migrations` (live or not). Each is refused by its
operation with a 4xx that names the problem, and leaves nothing: no VM, nothing new in the home
(vms/, the spool, the move records, tombstones), no uid claim, nothing written outside the home.
The genuine bundle they were forged from still goes through each route afterwards.

No VM is started: a move's prepare only imports the files (its QEMU starts at /incoming)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import Daemon, running_daemon
from tests.integration.hostile_bundles import (
    ESCAPE_TARGET,
    digest,
    forge_damaged,
    forge_field_cases,
    forge_json,
    member,
)
from vmkit import Host
from vmkit.core import store
from vmkit.isolation import uids
from vmkit.model.spec import VmConfig

IMPORT = "/1.0/vms/import"
MOVES = "/1.0/migrations"
ARRIVAL = "arrival"  # the name a move's bundle is received under
#: host files the forgeries point at: read or written, none may change
WATCHED = [Path(p) for p in ("/etc/passwd", "/etc/shadow", "/etc/hostname", "/root/.bashrc")]
#: what the forgeries would create if a path escaped (the home's own tree is compared whole)
NEVER_CREATED = [ESCAPE_TARGET, Path("/etc/evil.qcow2"), Path("/tmp/pwned")]


@dataclass(frozen=True)
class Case:
    label: str
    path: Path
    #: a fragment of the refusal (error and hint) on each route; None: not hostile there
    on_import: str | None
    on_move: str | None
    code: int = 400  # the operation's error_code (400: a bad bundle; 409: a move refused)

    def message(self, route: str) -> str | None:
        return self.on_import if route == IMPORT else self.on_move


@dataclass
class Stage:
    """One home with its daemon, the genuine bundle exported there, and its forgeries."""

    home: Path
    host: Host
    daemon: Daemon
    bundle: Path
    uuid: str
    data_target: Path
    cases: list[Case]
    malformed: list[Case]


def _tar(target: Path, members: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()
         ) -> Path:
    """A tar of exactly these members (no manifest recomputed), then `extra` entries."""
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return target


def _archive_cases(bundle: Path, folder: Path) -> list[Case]:
    """Tricks at the tar level: a symlink, a hard link and a device node among the members,
    a member twice, random bytes, an empty upload."""
    with tarfile.open(bundle) as tar:
        members = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar if m.isfile()}
    links = []
    for kind, label in ((tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink")):
        link = tarfile.TarInfo("disks/extra.qcow2")
        link.type, link.linkname = kind, "/etc/shadow"
        links.append((label, link))
    device = tarfile.TarInfo("disks/extra.qcow2")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3  # /dev/null's
    cases = [Case(label, _tar(folder / f"{label}.vmkit", members, (info,)), "unexpected member",
                  "unexpected member") for label, info in [*links, ("device", device)]]
    twice = tarfile.TarInfo("disks/root.qcow2")
    twice.size = len(members["disks/root.qcow2"])
    duplicate = folder / "duplicate.vmkit"
    _tar(duplicate, members)
    with tarfile.open(duplicate, "a") as tar:  # the same member again, after the manifest
        tar.addfile(twice, io.BytesIO(members["disks/root.qcow2"]))
    garbage = folder / "garbage.vmkit"
    garbage.write_bytes(os.urandom(300_000))
    empty = folder / "empty.vmkit"
    empty.write_bytes(b"")
    return [*cases, Case("duplicate", duplicate, "unexpected member 'disks/root.qcow2'",
                         "unexpected member 'disks/root.qcow2'"),
            Case("garbage", garbage, "not a readable vmkit bundle",
                 "not a readable vmkit bundle"),
            Case("empty", empty, "not a readable vmkit bundle", "not a readable vmkit bundle")]


def _move_cases(bundle: Path, folder: Path) -> list[Case]:
    """What only a move reads: the empty overlay its manifest describes (an import ignores
    it), and a base it leaves out that this host does not have."""
    def overlay(label: str, **fields: Any) -> Case:
        path = forge_json(bundle, folder / f"{label}.vmkit", "manifest.json",
                          overlay={"path": "disks/top.qcow2", "backing": "root.qcow2",
                                   "size": 1 << 30, **fields})
        return Case(label, path, None, "is not an overlay on a disk of the bundle")

    member_twice = forge_json(bundle, folder / "overlay-member.vmkit", "manifest.json",
                              overlay={"path": "disks/root.qcow2", "backing": "base.qcow2",
                                       "size": 1 << 30})
    unknown_base = forge_json(bundle, folder / "base-unknown.vmkit", "manifest.json",
                              repoint={"from": "/etc/shadow", "image_sha256": "0" * 64})
    def boot_links(label: str, links: dict[str, str], message: str) -> Case:
        path = forge_json(bundle, folder / f"{label}.vmkit", "manifest.json", boot_links=links)
        return Case(label, path, "written for a move", message)

    return [boot_links("boot-link-escape", {"boot/..": "0" * 64}, "not a boot file it leaves"),
            boot_links("boot-link-outside", {"../../etc/passwd": "0" * 64},
                       "not a boot file it leaves"),
            boot_links("boot-link-member", {"boot/initrd.img": "0" * 64},
                       "not a boot file it leaves"),
            boot_links("boot-link-unknown", {"boot/other": "0" * 64},
                       "which no image of this host has"),
            overlay("overlay-escape", path="../../etc/evil.qcow2"),
            overlay("overlay-absolute", path="/etc/evil.qcow2"),
            overlay("overlay-backing", backing="/etc/shadow"),
            overlay("overlay-backing-up", backing="../../../etc/shadow"),
            overlay("overlay-size", size=-1),
            Case("overlay-member", member_twice, None,
                 "the overlay disks/root.qcow2 is also a member"),
            Case("base-unknown", unknown_base, "leaves out its base image",
                 "which this host does not have")]


def _malformed_cases(bundle: Path, folder: Path) -> list[Case]:
    """Manifests of the wrong shape (the members themselves intact)."""
    with tarfile.open(bundle) as tar:
        members = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar if m.isfile()}
    manifest = json.loads(members["manifest.json"])
    entries = manifest["files"]

    def shaped(label: str, document: Any, *, move_only: bool = False) -> Case:
        path = _tar(folder / f"{label}.vmkit",
                    {**members, "manifest.json": json.dumps(document).encode()})
        return Case(label, path, None if move_only else "manifest", "manifest")

    return [shaped("manifest-list", [manifest]),
            shaped("manifest-no-vm", {k: v for k, v in manifest.items() if k != "vm"}),
            shaped("files-string", {**manifest, "files": "vm.json"}),
            shaped("files-names", {**manifest, "files": [e["path"] for e in entries]}),
            shaped("files-no-size", {**manifest, "files": [{"path": e["path"]}
                                                           for e in entries]}),
            shaped("files-size-text", {**manifest, "files": [{**e, "size": "many"}
                                                             for e in entries]}),
            shaped("overlay-list", {**manifest, "overlay": ["disks/top.qcow2"]},
                   move_only=True),
            shaped("overlay-too-big", {**manifest, "overlay": {
                "path": "disks/top.qcow2", "backing": "root.qcow2", "size": 1 << 62}},
                move_only=True)]


@pytest.fixture(scope="module")
def stage(image_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    folder = tmp_path_factory.mktemp("hostile")
    with new_home(image_home) as home:
        host = Host(home, lock_timeout=60)
        vm = host.create("sealed")
        bundle = folder / "sealed.vmkit"
        vm.export(bundle)
        vm.delete()
        uuid = VmConfig.model_validate_json(member(bundle, "vm.json")).uuid
        fields = forge_field_cases(bundle, folder, host.image("tiny").sha256)
        cases = []
        for path, message in fields.cases:
            if path.stem == "base-left-out":  # a move reads the base it leaves out
                cases.append(Case(path.stem, path, message, "is not the base its manifest "
                                                            "leaves out"))
            else:
                cases.append(Case(path.stem, path, message, message))
        cases += [Case(path.stem, path, message, message)
                  for path, message in forge_damaged(bundle, folder)]
        cases += _archive_cases(bundle, folder) + _move_cases(bundle, folder)
        malformed = _malformed_cases(bundle, folder)
        with running_daemon(home) as daemon:
            yield Stage(home, host, daemon, bundle, uuid, fields.data_target, cases, malformed)


@pytest.fixture(autouse=True)
def _clean_after(stage: Stage) -> Iterator[None]:
    """A test that failed half-way leaves no VM to the next (which would then fail for it)."""
    yield
    with stage.daemon.unix_http() as client:
        for record in (stage.home / "daemon" / "migrations").glob("*.json"):
            if json.loads(record.read_text())["state"] == "prepared":
                client.delete(f"/1.0/migrations/{record.stem}")
        for vm in client.get("/1.0/vms").json()["metadata"]:
            _wait(client, client.delete(f"/1.0/vms/{vm['name']}", params={"force": True}))


# -- what an upload leaves ----------------------------------------------------------------
def _tree(home: Path) -> set[str]:
    """Every path in the home but the audit log (it grows with each request), the lock
    files (a name's lock file stays once taken, whether or not the VM came to be) and the
    memo of the images' file digests (a move's boot_links are looked up there)."""
    return {str(p.relative_to(home)) for p in home.rglob("*")
            if (p.parent != home / "locks" or p.suffix != ".lock")
            and home / "cache" / "digests" not in (p, p.parent)} - {"daemon/audit.log"}


@dataclass(frozen=True)
class Outside:
    digests: dict[Path, str | None]
    data_target: int | None

    @classmethod
    def now(cls, stage: Stage) -> Outside:
        target = stage.data_target
        return cls({path: digest(path) for path in WATCHED},
                   target.stat().st_size if target.exists() else None)


def _upload(client: httpx.Client, route: str, path: Path, params: dict[str, Any]
            ) -> tuple[dict[str, Any], float]:
    """POST the file (streamed), wait for its operation: (the operation, seconds taken)."""
    started = time.monotonic()
    with open(path, "rb") as body:
        response = client.post(route, params=params, content=body)
    assert response.status_code == 202, (route, path.name, response.text)
    waited = client.get(f"{response.headers['Location']}/wait", params={"timeout": 120})
    return waited.json()["metadata"], time.monotonic() - started


def _move_params(live: bool, name: str = ARRIVAL, generation: int = 2) -> dict[str, Any]:
    return {"name": name, "generation": generation, "live": "true" if live else "false"}


Wrong = tuple[int, str]  # (the operation's error_code, 0 if it did not fail; what went wrong)


def _refuse_all(stage: Stage, route: str, cases: list[Case], params: dict[str, Any],
                name: str | None) -> tuple[list[Wrong], list[str]]:
    """Upload each case for which `route` has a message: (refusals that are not the expected
    4xx naming the problem, traces left behind), one per problem. `name`: the VM the upload
    would make (None: one of that name is already there, the home's tree shows it unchanged).
    Tombstones and uid claims are compared with what there was before."""
    wrong: list[Wrong] = []
    left: list[str] = []
    client = stage.daemon.unix_http()
    with client:
        vms_before = [vm["name"] for vm in client.get("/1.0/vms").json()["metadata"]]
        for case in cases:
            message = case.message(route)
            if message is None:
                continue
            tree, outside = _tree(stage.home), Outside.now(stage)
            stone, claim = store.tombstone(stage.host, stage.uuid), uids.lookup(stage.uuid)
            op, elapsed = _upload(client, route, case.path, params)
            # the files first: a listing through the daemon sweeps a staging folder away
            changed = _tree(stage.home) ^ tree
            if changed:
                left.append(f"{case.label}: home changed: {sorted(changed)}")
            spooled = os.listdir(stage.home / "daemon" / "spool")
            if spooled:
                left.append(f"{case.label}: spool holds {spooled}")
            now = store.tombstone(stage.host, stage.uuid)
            if now != stone:
                left.append(f"{case.label}: tombstone now {now}")
            if uids.lookup(stage.uuid) != claim:
                left.append(f"{case.label}: uid claim now {uids.lookup(stage.uuid)}")
            if Outside.now(stage) != outside:
                left.append(f"{case.label}: a host file changed: {Outside.now(stage)}")
            created = [str(p) for p in NEVER_CREATED if os.path.lexists(p)]
            if created:
                left.append(f"{case.label}: created {created}")
            error = op.get("error") or {}
            code = int(error.get("error_code", 0)) if op["status"] == "failure" else 0
            said = f"{error.get('error')} {error.get('hint') or ''}"
            if code != case.code:
                wrong.append((code, f"{case.label}: {op['status']} {error or op['result']}"))
            elif message not in said:
                wrong.append((code, f"{case.label}: refused without {message!r}: {said}"))
            if elapsed > 60:  # no hang: the limits stop qemu-img
                wrong.append((code, f"{case.label}: took {elapsed:.0f}s"))
            if name is not None and client.get(f"/1.0/vms/{name}").status_code != 404:
                left.append(f"{case.label}: VM {name!r} exists")
            listed = [vm["name"] for vm in client.get("/1.0/vms").json()["metadata"]]
            if listed != vms_before:
                left.append(f"{case.label}: VMs now {listed}, before {vms_before}")
        assert client.get("/1.0").status_code == 200  # the daemon still serves
    return wrong, left


def _wait(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    op: dict[str, Any] = client.get(f"{response.headers['Location']}/wait",
                                    params={"timeout": 120}).json()["metadata"]
    return op


def _import_genuine(stage: Stage, client: httpx.Client) -> None:
    """The genuine bundle imports (identity kept), then is deleted with every trace."""
    op, _ = _upload(client, IMPORT, stage.bundle, {})
    assert op["status"] == "success", op["error"]
    assert op["result"]["name"] == "sealed" and op["result"]["uuid"] == stage.uuid
    assert client.get("/1.0/vms/sealed").json()["metadata"]["state"] == "defined"
    assert json.loads((stage.home / "vms/sealed/vm.json").read_text())["uuid"] == stage.uuid
    deleted = _wait(client, client.delete("/1.0/vms/sealed"))
    assert deleted["status"] == "success", deleted["error"]
    assert client.get("/1.0/vms/sealed").status_code == 404
    assert os.listdir(stage.home / "vms") == [] and uids.lookup(stage.uuid) is None


def _move_genuine(stage: Stage, client: httpx.Client, live: bool, generation: int = 2) -> None:
    """The genuine bundle arrives as a prepared move (the VM under its journal, a record
    "prepared"), then the source's abort removes it again."""
    op, _ = _upload(client, MOVES, stage.bundle, _move_params(live, generation=generation))
    assert op["status"] == "success", op["error"]
    mid = op["result"]["id"]
    assert op["result"] == {"id": mid, "name": ARRIVAL, "live": live}
    arrived = stage.home / "vms" / ARRIVAL
    config = json.loads((arrived / "vm.json").read_text())
    assert config["uuid"] == stage.uuid and config["generation"] == generation
    assert json.loads((arrived / "journal.json").read_text())["intent"]["migration"] == mid
    record = stage.home / "daemon" / "migrations" / f"{mid}.json"
    assert json.loads(record.read_text())["state"] == "prepared"
    assert client.get(f"/1.0/vms/{ARRIVAL}").status_code == 200
    aborted = client.delete(f"/1.0/migrations/{mid}").json()["metadata"]
    assert aborted == {"id": mid, "state": "aborted"}
    assert client.get(f"/1.0/vms/{ARRIVAL}").status_code == 404
    assert os.listdir(stage.home / "vms") == [] and uids.lookup(stage.uuid) is None
    assert json.loads(record.read_text())["state"] == "aborted"
    assert os.listdir(stage.home / "daemon" / "spool") == []


# -- the tests ----------------------------------------------------------------------------
def _lines(wrong: list[Wrong], left: list[str]) -> str:
    return "\n".join([text for _, text in wrong] + left)


def _nothing_of_it_here(stage: Stage) -> None:
    assert store.tombstone(stage.host, stage.uuid) is None
    assert uids.lookup(stage.uuid) is None


def test_hostile_bundles_uploaded_for_import_are_refused_and_leave_nothing(
        stage: Stage) -> None:
    _nothing_of_it_here(stage)
    wrong, left = _refuse_all(stage, IMPORT, stage.cases, {}, "sealed")
    assert not wrong and not left, _lines(wrong, left)
    _nothing_of_it_here(stage)
    with stage.daemon.unix_http() as client:
        _import_genuine(stage, client)


@pytest.mark.parametrize("live", [False, True], ids=["stopped", "live"])
def test_hostile_bundles_sent_as_a_move_are_refused_and_leave_nothing(stage: Stage,
                                                                      live: bool) -> None:
    _nothing_of_it_here(stage)
    wrong, left = _refuse_all(stage, MOVES, stage.cases, _move_params(live), ARRIVAL)
    assert not wrong and not left, _lines(wrong, left)
    _nothing_of_it_here(stage)
    with stage.daemon.unix_http() as client:
        _move_genuine(stage, client, live)


def test_a_move_of_a_machine_already_here_or_gone_from_here_is_refused(stage: Stage) -> None:
    """The genuine bundle replayed: as a second holder of a uuid this host has, over a VM of
    that name, or at a generation no newer than the one that left here. Refused (409), and the
    VM or the tombstone already here is left as it was; a newer generation is let in."""
    home = stage.home
    with stage.daemon.unix_http() as client:
        op, _ = _upload(client, IMPORT, stage.bundle, {})
        assert op["status"] == "success", op["error"]
        sealed = _tree(home)
        twice = [Case("uuid-here", stage.bundle, None,
                      f"a VM with uuid {stage.uuid} already exists on this host", 409)]
        wrong, left = _refuse_all(stage, MOVES, twice, _move_params(True), ARRIVAL)
        over = [Case("name-here", stage.bundle, None, "a VM named 'sealed' already exists",
                     409)]
        found = _refuse_all(stage, MOVES, over, _move_params(True, name="sealed"), None)
        wrong, left = wrong + found[0], left + found[1]
        assert not wrong and not left, _lines(wrong, left)
        assert _tree(home) == sealed
        assert client.get("/1.0/vms/sealed").json()["metadata"]["uuid"] == stage.uuid
        deleted = _wait(client, client.delete("/1.0/vms/sealed"))
        assert deleted["status"] == "success", deleted["error"]

        # the VM left this host at generation 3 (a tombstone, as a source's confirm writes it)
        config = VmConfig.model_validate_json(member(stage.bundle, "vm.json"))
        store.bury(stage.host, config, 3, "https://elsewhere:8443")
        stone = home / "moved" / f"{stage.uuid}.json"
        kept = stone.read_bytes()
        try:
            for generation in (2, 3):
                stale = [Case(f"generation-{generation}", stage.bundle, None,
                              "already left this host at generation 3", 409)]
                wrong, left = _refuse_all(stage, MOVES, stale,
                                          _move_params(False, generation=generation), ARRIVAL)
                assert not wrong and not left, _lines(wrong, left)
            assert stone.read_bytes() == kept  # a refused move does not touch it
            _move_genuine(stage, client, False, generation=4)  # a newer one is let in
        finally:
            stone.unlink()
    _nothing_of_it_here(stage)


@pytest.mark.parametrize("route", ["import", "move-stopped", "move-live"])
def test_malformed_manifests_are_refused_as_bad_requests(stage: Stage, route: str) -> None:
    path, params, name = ((IMPORT, {}, "sealed") if route == "import" else
                          (MOVES, _move_params(route == "move-live"), ARRIVAL))
    wrong, left = _refuse_all(stage, path, stage.malformed, params, name)
    # a manifest of the wrong shape was a 500 (KeyError, TypeError, AttributeError, or
    # qemu-img refusing a 2^62-byte overlay) before _read_manifest checked its shape
    assert not wrong and not left, _lines(wrong, left)
    with stage.daemon.unix_http() as client:
        if route == "import":
            _import_genuine(stage, client)
        else:
            _move_genuine(stage, client, route == "move-live")
