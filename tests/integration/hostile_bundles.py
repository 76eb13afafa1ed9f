"""Hostile bundles forged from a real export, shared by the tests that feed them to `vmkit
import` (test_bundle_hostile.py, test_clones_bundles.py) and to the daemon's upload routes
(test_daemon_bundle_hostile.py).

Each forgery changes one thing and recomputes the manifest's sizes and checksums (so only that
thing trips), except the damaged ones, whose bytes no longer match their manifest at all."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def rewrite_bundle(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    """A bundle with some members replaced and a manifest that matches them (a forgery)."""
    with tarfile.open(source) as tar:
        members = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar if m.isfile()}
    members.update(replace)
    manifest = json.loads(members.pop("manifest.json"))
    manifest["files"] = [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                         for n, d in members.items()]
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def forge_json(bundle: Path, target: Path, name: str, **changes: Any) -> Path:
    """`bundle` with one JSON member's dotted fields changed (the manifest made to match)."""
    data = json.loads(member(bundle, name))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    rewrite_bundle(bundle, target, {name: json.dumps(data).encode()})
    return target


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@dataclass(frozen=True)
class Forged:
    #: (bundle, a fragment of the refusal `vmkit import` gives), in the order they were made
    cases: list[tuple[Path, str]]
    #: where the external-data-file disk points (a write there would land outside the home)
    data_target: Path


def forge_field_cases(bundle: Path, folder: Path, image_sha256: str) -> Forged:
    """One hostile field each: options smuggled into QEMU's argv, unknown machine or CPU,
    snapshot pointers outside the folder, an external data file, a qcow2 bitmap bomb, extra
    disks leaning on host files, a base left out, a malformed repoint. `image_sha256`: the
    tiny image's (a bundle that leaves out a base this host has). Files go in `folder`."""
    with tarfile.open(bundle) as tar:
        assert {"disks/root.qcow2", "disks/base.qcow2"} <= set(tar.getnames())
    data_target = folder / "data-file.raw"
    external = folder / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data_target},data_file_raw=on", str(external), "64M"],
                   check=True)
    bomb = folder / "bomb.qcow2"  # 2 TiB, 8 auto-loaded bitmaps of 512 MiB each (1.3 MB file)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bomb), "2T"], check=True)
    for index in range(8):
        subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "-g", "512", "-f", "qcow2",
                        str(bomb), f"b{index}"], check=True)
    tree = json.loads(member(bundle, "snapshots.json"))
    layer = tree["active_layer"]
    node = {"name": "s1", "parent": None, "created_at": 1.0, "layer": "../../etc/passwd",
            "memory": None, "taken_in": "stopped"}
    memory_node = {**node, "layer": layer, "memory": "../../../root/.bashrc"}

    def forged(label: str, name: str, **changes: Any) -> Path:
        return forge_json(bundle, folder / f"{label}.vmkit", name, **changes)

    def disk(label: str, image: Path) -> Path:
        target = folder / f"{label}.vmkit"
        rewrite_bundle(bundle, target, {"disks/root.qcow2": image.read_bytes()})
        return target

    leaning = folder / "leaning.qcow2"  # an extra disk on a host file: /etc/shadow
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
                    str(leaning), "64M"], check=True)

    plain = folder / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    unnamed = folder / "volume-unnamed.vmkit"
    rewrite_bundle(bundle, unnamed, {"volumes/stowaway.qcow2": plain.read_bytes()})

    def volume(label: str, image: Path) -> Path:
        target = folder / f"{label}.vmkit"
        config = json.loads(member(bundle, "vm.json"))
        config["disks"] = [{"name": "data", "size": 64 << 20}]
        rewrite_bundle(bundle, target, {"vm.json": json.dumps(config).encode(),
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
            "from": "/etc/shadow", "image_sha256": image_sha256}),
         "leaves out its base image"),
        (forged("repoint-list", "manifest.json", repoint=["disks/base.qcow2"]),
         "repoint is not an object"),
    ]
    return Forged(cases, data_target)


#: where the damaged bundles' member and pointer escapes would land
ESCAPE_TARGET = Path("/etc/evil")


def forge_damaged(bundle: Path, folder: Path) -> list[tuple[Path, str]]:
    """Bundles damaged in transit or by hand, each with the message that refuses it: a flipped
    byte in a disk, cut in half, a disk whose backing file is /etc/shadow, a member named
    ../../etc/evil, an active layer outside the folder."""
    data = bytearray(bundle.read_bytes())
    offset = data.index(b"QFI\xfb")  # inside the first disk image
    data[offset + 200000] ^= 0xFF
    tampered = folder / "tampered.vmkit"
    tampered.write_bytes(bytes(data))
    truncated = folder / "truncated.vmkit"
    truncated.write_bytes(bundle.read_bytes()[: len(data) // 2])
    evil_disk = folder / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow",
                    str(evil_disk), "1M"], check=True)
    with tarfile.open(bundle) as tar:
        disk_name = next(m.name for m in tar if m.name.startswith("disks/"))
    malicious = folder / "malicious.vmkit"
    rewrite_bundle(bundle, malicious, {disk_name: evil_disk.read_bytes()})
    escape = folder / "escape.vmkit"
    rewrite_bundle(bundle, escape, {"../../etc/evil": b"x"})
    tree = json.loads(member(bundle, "snapshots.json"))
    tree["active_layer"] = "../../../etc/hostname"
    pointer = folder / "pointer.vmkit"
    rewrite_bundle(bundle, pointer, {"snapshots.json": json.dumps(tree).encode()})
    return [(tampered, "does not match its checksum"), (truncated, "truncated"),
            (malicious, "/etc/shadow"), (escape, "unexpected member"),
            (pointer, "is not a file of the bundle")]
