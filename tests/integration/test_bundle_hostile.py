"""Hostile bundles: each forged from a real export with one hostile field (the manifest's sizes
and checksums recomputed, so only that field trips), each refused by `vmkit import` with exit 2,
nothing registered and nothing written outside the home. And exports are owner-only (0600)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import run_cli
from tests.integration.test_clones_bundles import _rewrite_bundle
from vmkit import Host, InvalidValue


def _member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def _forge_json(bundle: Path, target: Path, member: str, **changes: Any) -> Path:
    data = json.loads(_member(bundle, member))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    _rewrite_bundle(bundle, target, {member: json.dumps(data).encode()})
    return target


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture
def exported(host: Host, tmp_path: Path) -> Path:
    vm = host.create("sealed")
    bundle = tmp_path / "sealed.vmkit"
    vm.export(bundle)
    vm.delete()
    return bundle


def test_hostile_bundles_are_refused_with_nothing_left(host: Host, home: Path, tmp_path: Path,
                                                       exported: Path) -> None:
    bundle = exported
    with tarfile.open(bundle) as tar:
        assert {"disks/root.qcow2", "disks/base.qcow2"} <= set(tar.getnames())
    data_target = tmp_path / "data-file.raw"
    external = tmp_path / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data_target},data_file_raw=on", str(external), "64M"],
                   check=True)
    bomb = tmp_path / "bomb.qcow2"  # 2 TiB, 8 auto-loaded bitmaps of 512 MiB each (1.3 MB file)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bomb), "2T"], check=True)
    for index in range(8):
        subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "-g", "512", "-f", "qcow2",
                        str(bomb), f"b{index}"], check=True)
    tree = json.loads(_member(bundle, "snapshots.json"))
    layer = tree["active_layer"]
    node = {"name": "s1", "parent": None, "created_at": 1.0, "layer": "../../etc/passwd",
            "memory": None, "taken_in": "stopped"}
    memory_node = {**node, "layer": layer, "memory": "../../../root/.bashrc"}

    def forged(label: str, member: str, **changes: Any) -> Path:
        return _forge_json(bundle, tmp_path / f"{label}.vmkit", member, **changes)

    def disk(label: str, image: Path) -> Path:
        target = tmp_path / f"{label}.vmkit"
        _rewrite_bundle(bundle, target, {"disks/root.qcow2": image.read_bytes()})
        return target

    leaning = tmp_path / "leaning.qcow2"  # an extra disk on a host file: /etc/shadow
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
                    str(leaning), "64M"], check=True)

    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    unnamed = tmp_path / "volume-unnamed.vmkit"
    _rewrite_bundle(bundle, unnamed, {"volumes/stowaway.qcow2": plain.read_bytes()})

    def volume(label: str, image: Path) -> Path:
        target = tmp_path / f"{label}.vmkit"
        config = json.loads(_member(bundle, "vm.json"))
        config["disks"] = [{"name": "data", "size": 64 << 20}]
        _rewrite_bundle(bundle, target, {"vm.json": json.dumps(config).encode(),
                                         "volumes/data.qcow2": image.read_bytes()})
        return target

    cases: list[tuple[Path, str]] = [
        (forged("mac", "vm.json",
                mac="52:54:00:12:34:56\nadd rule inet filter input accept"), "invalid mac"),
        (forged("ssh", "vm.json", ssh_user="x@-oProxyCommand=touch /tmp/pwned"),
         "invalid ssh_user"),
        (forged("machine-opt", "vm.json", **{"hardware.machine": "pc-q35-10.0,accel=kvm"}),
         "invalid hardware.machine"),
        (forged("machine-dev", "vm.json",
                **{"hardware.machine": "q35 -device virtio-net-pci"}),
         "invalid hardware.machine"),
        (forged("machine-unknown", "vm.json", **{"hardware.machine": "pc-q35-99.9"}),
         "not a machine type this host's QEMU offers"),
        (forged("cpu-opt", "vm.json", **{"hardware.cpu_model": "qemu64,+vmx"}),
         "invalid hardware.cpu_model"),
        (forged("cpu-unknown", "vm.json", **{"hardware.cpu_model": "Zen9000"}),
         "not a CPU model this host's QEMU offers"),
        (forged("cmdline", "vm.json", **{"boot.cmdline": "quiet\ninit=/bin/sh"}),
         "invalid boot.cmdline"),
        (forged("layer", "snapshots.json", nodes={"s1": node}, current="s1"),
         "snapshot layer '../../etc/passwd'"),
        (forged("memory", "snapshots.json", nodes={"s1": memory_node}, current="s1"),
         "snapshot memory"),
        (disk("external", external), "external data file"),
        (disk("bomb", bomb), "resource limits"),
        (volume("volume-backing", leaning), "volumes/data.qcow2 names another file"),
        (volume("volume-external", external), "volumes/data.qcow2 names another file"),
        (forged("volume-missing", "vm.json", disks=[{"name": "data", "size": 1 << 20}]),
         "vm.json disk data 'volumes/data.qcow2' is not a file of the bundle"),
        (unnamed, "volumes/stowaway.qcow2 is no extra disk vm.json names"),
        (forged("volume-name", "vm.json", disks=[{"name": "../../etc", "size": 1 << 20}]),
         "invalid disk name"),
        # only a move leaves the base out (it asked which bases the receiver has)
        (forged("base-left-out", "manifest.json", repoint={
            "from": "/etc/shadow", "image_sha256": host.image("tiny").sha256}),
         "leaves out its base image"),
        (forged("repoint-list", "manifest.json", repoint=["disks/base.qcow2"]),
         "repoint is not an object"),
    ]
    passwd, bashrc = _digest(Path("/etc/passwd")), _digest(Path("/root/.bashrc"))
    for path, message in cases:
        started = time.monotonic()
        done = run_cli(home, "import", str(path), timeout=120)
        elapsed = time.monotonic() - started
        assert done.returncode == 2, (path.name, done.stderr)
        assert message in done.stderr, (path.name, done.stderr)
        assert elapsed < 60, (path.name, elapsed)  # no hang: the limits stop qemu-img
        assert os.listdir(home / "vms") == [], path.name  # nothing registered, nothing staged
        with pytest.raises(InvalidValue):
            host.import_bundle(path, name="again")
        assert os.listdir(home / "vms") == [], path.name
    assert host.vms() == []
    assert not Path("/tmp/pwned").exists()
    assert _digest(Path("/etc/passwd")) == passwd and _digest(Path("/root/.bashrc")) == bashrc
    assert not data_target.exists() or data_target.stat().st_size == 64 << 20
    host.import_bundle(bundle)  # the genuine bundle still imports


def test_an_imported_vm_never_uses_the_exporters_ssh_key(host: Host, tmp_path: Path,
                                                         exported: Path) -> None:
    forged = _forge_json(exported, tmp_path / "key.vmkit", "vm.json", ssh_user="root",
                         ssh_identity="/root/.ssh/id_ed25519")
    vm = host.import_bundle(forged)
    assert vm.config.ssh_user == "root" and vm.config.ssh_identity is None
    copy = host.import_bundle(forged, name="copy")
    assert copy.config.ssh_identity is None


def test_exports_are_owner_only_from_the_first_byte(host: Host, home: Path,
                                                    tmp_path: Path) -> None:
    host.create("private")
    target = tmp_path / "private.vmkit"
    old = os.umask(0)  # even a permissive umask gives an owner-only bundle
    try:
        done = run_cli(home, "export", "private", str(target))
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    listing = subprocess.run(["ls", "-l", str(target)], capture_output=True, text=True,
                             check=True).stdout
    assert listing.startswith("-rw------- "), listing
    assert os.listdir(tmp_path) == ["private.vmkit"]  # no temporary file left
    result = host.get("private").export(tmp_path / "again.vmkit")
    assert result["mode"] == "0600" and result["path"] == str(tmp_path / "again.vmkit")
    seen: list[int] = []

    def watch(done_bytes: int, total: int) -> None:  # the partial file is 0600 too
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".third.vmkit.")]
        assert len(partial) == 1 and stat.S_IMODE(partial[0].stat().st_mode) == 0o600
        seen.append(done_bytes)
        if done_bytes > 1 << 20:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        host.get("private").export(tmp_path / "third.vmkit", progress=watch)
    assert seen and sorted(os.listdir(tmp_path)) == ["again.vmkit", "private.vmkit"]
    done = run_cli(home, "export", "private", str(target))  # never replaces a file
    assert done.returncode == 2 and "already exists" in done.stderr
