"""cloud-init seed inputs: key, user-data and hostname checks; the seed files and the ISO."""

import json
from pathlib import Path

import pytest
import yaml

from vmkit.errors import InvalidValue
from vmkit.images.debpkg import parse_mirrors
from vmkit.images.seed import read_seed, write_seed
from vmkit.model.cloudinit import (
    CloudInit,
    check_user_data,
    parse_ssh_public_keys,
    seed_files,
    validate_hostname,
)

# a real ed25519 public key (made with ssh-keygen for this test; the private half is discarded)
ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOHEdZUqPvSwBVaxfF3beWbObGqcECOHp4RhvGXpb8qO "
           "test@vmkit")


def test_public_keys_are_parsed_and_comments_skipped() -> None:
    text = f"# my keys\n\n{ED25519}\n"
    assert parse_ssh_public_keys(text, "k") == (ED25519,)


@pytest.mark.parametrize(("text", "fragment"), [
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "is a private key"),
    ("ssh-ed25519 notbase64!!", "line 1 is not an SSH public key"),
    ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHE/P/6QS9sMzZKO7nqY5mngFpBcJfGWr0fM4QbMQ2fR",
     "not an SSH public key"),  # blob says ed25519, type says rsa
    ("hello world", "not an SSH public key"),
    ("# only a comment\n", "holds no SSH public key"),
])
def test_bad_keys_are_refused_with_the_reason(text: str, fragment: str) -> None:
    with pytest.raises(InvalidValue, match=fragment):
        parse_ssh_public_keys(text, "k")


def test_user_data_is_checked_but_passed_unchanged() -> None:
    text = "#cloud-config\nruncmd:\n  - [touch, /root/ok]\n"
    assert check_user_data(text, "u") is text
    script = "#!/bin/sh\necho hi\n"
    assert check_user_data(script, "u") is script
    with pytest.raises(InvalidValue, match="not valid YAML"):
        check_user_data("#cloud-config\nruncmd: [unclosed\n", "u")
    with pytest.raises(InvalidValue, match="mapping"):
        check_user_data("#cloud-config\n- a\n- b\n", "u")
    with pytest.raises(InvalidValue, match="not user-data cloud-init understands"):
        check_user_data("runcmd: []\n", "u")


@pytest.mark.parametrize("name", ["db1", "web-2.example.org", "a"])
def test_good_hostnames(name: str) -> None:
    assert validate_hostname(name) == name


@pytest.mark.parametrize("name", ["-db", "db-", "DB1", "a_b", "x" * 64, "a..b", ""])
def test_bad_hostnames(name: str) -> None:
    with pytest.raises(InvalidValue, match="invalid hostname"):
        validate_hostname(name)


def test_seed_files_and_iso(tmp_path: Path) -> None:
    user = "#cloud-config\nruncmd: [[touch, /root/ok]]\n"
    ci = CloudInit(instance_id="vmkit-1", hostname="db1", ssh_keys=(ED25519,), user_data=user)
    files = seed_files(ci)
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "vmkit-1", "local-hostname": "db1", "public-keys": [ED25519]}
    assert files["user-data"] == user.encode()  # the user's own, byte for byte
    iso = tmp_path / "seed.iso"
    write_seed(iso, files)
    back = read_seed(iso)
    assert back.pop(".label") == b"cidata"
    assert back == files
    assert not list(tmp_path.glob(".*partial"))


def test_seed_without_user_data_is_an_empty_cloud_config() -> None:
    files = seed_files(CloudInit(instance_id="i", hostname="h"))
    assert files["user-data"].startswith(b"#cloud-config")
    assert json.loads(files["meta-data"])["public-keys"] == []


def test_mirror_is_read_from_both_source_formats() -> None:
    one_line = ("deb http://mirror.example/debian bookworm main contrib\n"
                "deb http://security.example bookworm-security main\n")
    deb822 = ("Types: deb\nURIs: http://m2.example/debian/\nSuites: bookworm bookworm-updates\n"
              "Components: main\n\nTypes: deb\nURIs: http://other\nSuites: trixie\n"
              "Components: main\n")
    assert parse_mirrors([one_line, deb822], "bookworm") == [
        "http://mirror.example/debian", "http://m2.example/debian"]
    assert parse_mirrors(["deb http://x bookworm contrib\n"], "bookworm") == []


def test_a_copy_gets_its_own_identity_and_cloud_init_instance() -> None:
    from vmkit.model.spec import BootConfig, HardwareProfile, VmConfig, VmSpec, as_new_machine

    source = VmConfig(
        uuid="11111111-1111-4111-8111-111111111111", mac="52:54:00:00:00:01", created_at=0.0,
        spec=VmSpec(name="db", image="debian-12", cpus=1, memory=1 << 30, disk=4 << 30),
        hardware=HardwareProfile(machine="pc-q35-10.0"),
        boot=BootConfig(kernel="boot/vmlinuz", initrd="boot/initrd.img",
                        cmdline="ro quiet vmkit.hostname=db1"),
        cloud_init=CloudInit(instance_id="vmkit-11111111-1111-4111-8111-111111111111",
                             hostname="db1", ssh_keys=(ED25519,), user_data="#cloud-config\n"),
    )
    copy = as_new_machine(source, "db2", created_at=5.0)
    assert copy.uuid != source.uuid and copy.mac != source.mac and copy.created_at == 5.0
    assert copy.spec.name == "db2" and copy.boot.cmdline == "ro quiet vmkit.hostname=db2"
    assert copy.cloud_init is not None
    assert copy.cloud_init.instance_id == f"vmkit-{copy.uuid}"
    assert copy.cloud_init.hostname == "db2"
    assert copy.cloud_init.ssh_keys == (ED25519,)  # keys and user-data travel with the copy
    assert copy.cloud_init.user_data == "#cloud-config\n"
