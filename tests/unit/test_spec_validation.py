"""Every field of vm.json and snapshots.json is validated by the model: good values pass, hostile
ones are refused with an InvalidValue (exit 2) naming the field and the value."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from tests.unit.test_cloudinit import ED25519
from vmkit.errors import InvalidValue, exit_code_for
from vmkit.model.snapshots import SnapshotTree
from vmkit.model.spec import VmConfig

UUID = "11111111-1111-4111-8111-111111111111"


def _config(**changes: Any) -> dict[str, Any]:
    """A vm.json as vmkit writes it (a tiny VM on the image's base, with cloud-init)."""
    data: dict[str, Any] = {
        "schema_version": 1, "uuid": UUID, "mac": "52:54:00:ab:cd:ef", "created_at": 1.5e9,
        "spec": {"name": "web", "image": "tiny", "cpus": 2, "memory": 256 << 20,
                 "disk": 2 << 30, "max_cpus": 4, "max_memory": 1 << 30,
                 "limits": {"cpu_weight": 100, "pids": 512}},
        "hardware": {"machine": "pc-q35-10.0", "cpu_model": "qemu64", "firmware": "qboot",
                     "hotplug_ports": 4},
        "boot": {"kernel": "boot/vmlinuz", "initrd": "boot/initrd.img",
                 "cmdline": "console=ttyS0 root=/dev/vda rw quiet vmkit.hostname=web"},
        "disk_file": "disks/root.qcow2",
        "backing_file": "/var/lib/vmkit/images/tiny/root-a328f71e9444.qcow2",
        "base_image_sha256": "ab" * 32,
        "cloud_init": {"instance_id": f"vmkit-{UUID}", "hostname": "web",
                       "ssh_keys": [ED25519], "user_data": "#cloud-config\n{}\n"},
        "ssh_user": "root", "ssh_identity": "/root/.ssh/id_ed25519",
    }
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
    return data


def _load(data: dict[str, Any]) -> VmConfig:
    return VmConfig.model_validate_json(json.dumps(data))


def test_vm_json_as_vmkit_writes_it_is_valid() -> None:
    config = _load(_config())
    assert config.hardware.machine == "pc-q35-10.0" and config.ssh_user == "root"
    for good in ({"backing_file": None}, {"backing_file": "base.qcow2"},
                 {"cloud_init": None, "ssh_user": None, "ssh_identity": None},
                 {"hardware.cpu_model": "Skylake-Client-v4"}, {"hardware.firmware": "seabios"},
                 {"hardware.machine": "microvm"}, {"mac": "02:00:00:00:00:01"},
                 {"ssh_user": "_svc-user1"}, {"disk_file": "disks/3fa9c2d1e0b4.qcow2"},
                 {"spec.limits.cpu_limit": 250.0},
                 {"hardware.firmware": "seabios", "hardware.vmgenid": True}):
        _load(_config(**good))


def test_an_extra_disk_is_a_file_of_the_folder_named_by_the_disk() -> None:
    config = _load(_config(disks=[{"name": "data", "size": 10 << 30}]))
    assert config.disks[0].file == "volumes/data.qcow2"


def test_vm_json_from_before_vmgenid_keeps_its_machine() -> None:
    """No vmgenid key (vmkit before it): no device, the same machine as before."""
    assert _load(_config()).hardware.vmgenid is False


def test_vmgenid_needs_a_firmware_that_can_place_it() -> None:
    """qboot stops at the ACPI WRITE_POINTER command vmgenid needs: the guest would never boot."""
    for firmware in ("qboot", "microvm"):
        with pytest.raises(InvalidValue) as caught:
            _load(_config(**{"hardware.firmware": firmware, "hardware.vmgenid": True}))
        assert "hardware.vmgenid" in str(caught.value) and "seabios" in str(caught.value)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("uuid", "not-a-uuid", "uuid"),
    ("uuid", "ABCDEF01-1111-4111-8111-111111111111", "uuid"),
    ("uuid", UUID + ",x", "uuid"),
    ("mac", "52:54:00:12:34:56\nadd rule inet filter input accept", "mac"),
    ("mac", "52:54:00:12:34:5G", "mac"),
    ("mac", "52:54:00:AB:CD:EF", "mac"),  # lower-case only
    ("mac", "01:00:5e:00:00:01", "mac"),  # multicast
    ("mac", "00:00:00:00:00:00", "mac"),
    ("mac", "52-54-00-12-34-56", "mac"),
    ("hardware.machine", "pc-q35-10.0,accel=kvm", "hardware.machine"),
    ("hardware.machine", "q35 -device virtio-net-pci", "hardware.machine"),
    ("hardware.machine", "-q35", "hardware.machine"),
    ("hardware.machine", "", "hardware.machine"),
    ("hardware.machine", "a" * 65, "hardware.machine"),
    ("hardware.cpu_model", "qemu64,+vmx", "hardware.cpu_model"),
    ("hardware.cpu_model", "host -S", "hardware.cpu_model"),
    ("hardware.firmware", "../../../tmp/evil.rom", "hardware.firmware"),
    ("hardware.devices", ["virtio-blk-pci", "vfio-pci,host=00:02.0"], "hardware.devices"),
    ("boot.kernel", "/etc/shadow", "boot.kernel"),
    ("boot.kernel", "../../etc/shadow", "boot.kernel"),
    ("boot.initrd", "boot/../../x", "boot.initrd"),
    ("boot.initrd", "boot/initrd img", "boot.initrd"),
    ("boot.cmdline", "quiet\ninit=/bin/sh", "boot.cmdline"),
    ("boot.cmdline", "x" * 2049, "boot.cmdline"),
    ("disk_file", "../other-vm/disks/root.qcow2", "disk_file"),
    ("disk_file", "/var/lib/vmkit/vms/x/disks/root.qcow2", "disk_file"),
    ("disk_file", "disks/root.raw", "disk_file"),
    ("backing_file", "../../etc/shadow.qcow2", "backing_file"),
    ("backing_file", "/var/lib/vmkit/../../etc/shadow", "backing_file"),
    ("backing_file", "/tmp/a\nb.qcow2", "backing_file"),
    ("base_image_sha256", "zz", "base_image_sha256"),
    ("ssh_user", "x@-oProxyCommand=touch /tmp/pwned", "ssh_user"),
    ("ssh_user", "-oProxyCommand=x", "ssh_user"),
    ("ssh_user", "Root", "ssh_user"),
    ("ssh_user", "a" * 33, "ssh_user"),
    ("ssh_identity", "relative/key", "ssh_identity"),
    ("ssh_identity", "/root/key\n-oProxyCommand=x", "ssh_identity"),
    ("schema_version", 99, "schema_version"),
    ("created_at", -1.0, "created_at"),
    ("cloud_init.hostname", "web;reboot", "cloud_init.hostname"),
    ("cloud_init.hostname", "a" * 64, "cloud_init.hostname"),
    ("cloud_init.instance_id", "i\nlocal-hostname: evil", "cloud_init.instance_id"),
    ("cloud_init.ssh_keys", [ED25519 + "\nssh-rsa AAAA evil"], "cloud_init.ssh_keys[0]"),
    ("cloud_init.ssh_keys", ["not a key"], "cloud_init.ssh_keys[0]"),
    ("cloud_init.user_data", "#cloud-config\n" + "x" * (1 << 20), "cloud_init.user_data"),
    ("cloud_init.user_data", "#!/bin/sh\n\0", "cloud_init.user_data"),
    ("disks", [{"name": "../../etc", "size": 1}], "disk name"),
    ("disks", [{"name": "data,serial=x", "size": 1}], "disk name"),
    ("disks", [{"name": "a" * 21, "size": 1}], "disk name"),
    ("disks", [{"name": "data", "size": 1}, {"name": "data", "size": 2}], "disks"),
    ("disks", [{"name": f"d{i}", "size": 1} for i in range(9)], "disks"),
    ("disks", [{"name": "data", "size": 1 << 61}], "disk size"),
])
def test_hostile_values_are_refused_naming_the_field(field: str, value: Any, named: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        _load(_config(**{field: value}))
    message = str(caught.value)
    assert named in message, message
    assert exit_code_for(caught.value) == 2
    assert "\n" not in caught.value.message.split(":", 1)[0]  # the value is shown as a repr
    assert len(caught.value.message) < 600  # a long value is cut


@pytest.mark.parametrize(("field", "value"), [
    ("spec.cpus", 100000), ("spec.limits.pids", 1 << 30), ("spec.limits.cpu_weight", 0),
    ("spec.limits.disk_iops", -5), ("spec.name", "Web Server"), ("spec.image", "../tiny"),
    ("hardware.hotplug_ports", 99), ("nics", "eth0"), ("surprise", 1),
    ("hardware.vmgenid", "yes"), ("hardware.vmgenid", 1),
    ("disks", [{"name": "data", "size": 0}]), ("disks", [{"name": "data"}]),
    ("disks", [{"name": "data", "size": 1, "file": "/etc/shadow"}]),
])
def test_numbers_and_names_out_of_range_are_refused(field: str, value: Any) -> None:
    data = _config(**{field: value}) if field != "surprise" else {**_config(), "surprise": 1}
    with pytest.raises((InvalidValue, ValidationError)):
        _load(data)


def _tree(**node: Any) -> dict[str, Any]:
    base = {"name": "s1", "parent": None, "created_at": 1.0, "layer": "disks/a1b2c3.qcow2",
            "memory": "snapshots/s1.state", "memory_size": 10, "taken_in": "running"}
    base.update(node)
    return {"schema_version": 1, "current": base["name"], "nodes": {base["name"]: base}}


def test_snapshot_tree_as_vmkit_writes_it_is_valid() -> None:
    tree = SnapshotTree.model_validate_json(json.dumps(_tree()))
    assert tree.nodes["s1"].layer == "disks/a1b2c3.qcow2"
    child = {"name": "s2", "parent": "s1", "created_at": 2.0, "layer": "disks/d4.qcow2",
             "taken_in": "stopped"}
    data = _tree()
    data["nodes"]["s2"] = child
    SnapshotTree.model_validate_json(json.dumps(data))
    SnapshotTree.model_validate_json("{}")


@pytest.mark.parametrize(("node", "named"), [
    ({"layer": "../../etc/passwd"}, "snapshot layer"),
    ({"layer": "disks/../../../etc/passwd.qcow2"}, "snapshot layer"),
    ({"layer": "/etc/passwd"}, "snapshot layer"),
    ({"layer": "snapshots/s1.qcow2"}, "snapshot layer"),
    ({"memory": "../../root/.ssh/authorized_keys"}, "snapshot memory"),
    ({"memory": "disks/root.qcow2"}, "snapshot memory"),
    ({"name": "S1;rm"}, "snapshot name"),
    ({"parent": "nowhere"}, "parent"),
    ({"memory_size": -1}, "memory_size"),
])
def test_hostile_snapshot_trees_are_refused(node: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        SnapshotTree.model_validate_json(json.dumps(_tree(**node)))
    assert named in str(caught.value), str(caught.value)


def test_snapshot_tree_must_be_a_tree() -> None:
    data = _tree(parent="s2")
    data["nodes"]["s2"] = {"name": "s2", "parent": "s1", "created_at": 2.0,
                           "layer": "disks/d4.qcow2", "taken_in": "stopped"}
    with pytest.raises(InvalidValue, match="ancestor"):
        SnapshotTree.model_validate_json(json.dumps(data))
    renamed = _tree()
    renamed["nodes"] = {"other": renamed["nodes"]["s1"]}
    renamed["current"] = None
    with pytest.raises(InvalidValue, match="snapshot key"):
        SnapshotTree.model_validate_json(json.dumps(renamed))
    with pytest.raises(InvalidValue, match="current"):
        SnapshotTree.model_validate_json(json.dumps({**_tree(), "current": "gone"}))
