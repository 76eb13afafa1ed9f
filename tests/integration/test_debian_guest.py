"""A real Debian 12 guest under TCG: systemd, cloud-init identity, ssh, the agent, clean stops.

One VM is booted for the module (a Debian boot under TCG is the expensive part); the tests run
in order against it and leave it running for the next, except where a test says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home, run_cli
from vmkit import VM, Host, VmState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOT_TIMEOUT = 300.0
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, 'echo "ran as $(id -un)" > /root/runcmd-ok']
write_files:
  - path: /etc/vmkit-test
    content: written by cloud-init
"""


def sh(vm: VM, script: str, timeout: float = 120) -> str:
    result = vm.exec(["sh", "-c", script], timeout=timeout)
    assert result.exit_code == 0, f"{script}: {result.stderr}{result.stdout}"
    return result.stdout.strip()


def wait_booted(vm: VM) -> str:
    """systemd's own verdict once boot has finished: running or degraded (failed units)."""
    vm.wait_ready(timeout=BOOT_TIMEOUT)
    state = vm.exec(["systemctl", "is-system-running", "--wait"], timeout=BOOT_TIMEOUT)
    verdict = state.stdout.strip()
    assert verdict in ("running", "degraded"), verdict
    if verdict == "degraded":
        failed = sh(vm, "systemctl --failed --no-legend --plain")
        print(f"degraded: {failed}")
    return verdict


def unclean_messages(vm: VM) -> str:
    """Journal lines of this boot that tell of an unclean file system (the agent logs each
    command it runs, this one included: those lines are left out)."""
    return sh(vm, "journalctl -b -o cat | grep -v guest-exec | grep -i -e 'recovering journal' "
                  "-e 'not cleanly unmounted' -e 'orphan' -e 'EXT4-fs error' || true")


def fsck_clean(disk: Path, scratch: Path) -> str:
    """e2fsck -fn over a copy of the disk chain: exit 0 means the file system is clean."""
    raw = scratch / "fsck.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk),
                    str(raw)], check=True, capture_output=True, timeout=300)
    try:
        done = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True,
                              timeout=300, check=False)
    finally:
        raw.unlink()
    assert done.returncode == 0, f"e2fsck found problems:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ssh")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmkit-test",
                    "-f", str(folder / "id_ed25519")], check=True, timeout=30)
    return folder / "id_ed25519"


@pytest.fixture(scope="module")
def deb(debian_home: Path, key: Path) -> Iterator[VM]:
    with new_home(debian_home) as root:
        host = Host(root, lock_timeout=120)
        vm = host.create("db", image="debian-12", cpus=2, memory="1G", disk="4G",
                         hostname="db1", ssh_keys=[f"{key}.pub"], user_data=USER_DATA,
                         start=True)
        yield vm


def test_debian_boots_to_systemd_running_with_cloud_init_identity(deb: VM) -> None:
    started = time.monotonic()
    wait_booted(deb)
    print(f"boot to is-system-running: {time.monotonic() - started:.1f}s")
    assert sh(deb, "cloud-init status --wait", timeout=BOOT_TIMEOUT).endswith("done")
    assert sh(deb, "hostname") == "db1"
    assert sh(deb, "cat /root/runcmd-ok") == "ran as root"  # the user's runcmd took effect
    assert sh(deb, "cat /etc/vmkit-test") == "written by cloud-init"
    assert sh(deb, "cloud-init query instance_id") == f"vmkit-{deb.config.uuid}"
    # resizefs grew the image's root file system to the VM's 4G disk
    assert int(sh(deb, "df --output=size -B1M / | tail -1")) > 3500


def test_the_guest_runs_the_patched_kernel_of_the_hosts_apt(deb: VM) -> None:
    """Built with the update and security suites the host's apt uses: the guest's kernel is
    the newest cloud kernel those lists offer, and the image says where it came from."""
    from vmkit.images import debpkg
    from vmkit.images.debian import host_sources

    wait_booted(deb)
    newest = debpkg.resolve_kernel_package("linux-image-cloud-amd64")
    assert sh(deb, "uname -r") == newest.removeprefix("linux-image-")
    image = deb.host.image("debian-12")
    assert image.suites == list(host_sources())
    assert sh(deb, "cat /etc/apt/sources.list").count(" main") == len(image.suites)
    listed = next(i for i in deb.host.images(check_updates=True) if i.name == "debian-12")
    assert listed.newer_packages == []  # just built from these lists: nothing newer


def test_ssh_login_with_the_given_key(deb: VM, key: Path) -> None:
    argv = deb.ssh_argv(["sh", "-c", "echo $(id -un)@$(hostname)"], batch=True)
    assert "-i" in argv and str(key) in argv  # the private key next to the .pub
    deadline, done = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0:
            break
        time.sleep(2)
    assert done is not None and done.returncode == 0, done.stderr if done else "no attempt"
    assert done.stdout.strip() == "root@db1"
    # the host key was remembered in the VM's folder; a second login checks it strictly
    assert (deb.folder.path / "ssh_known_hosts").read_text().count("ssh-") >= 1
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and again.stdout.strip() == "root@db1"
    # without the key, no way in
    denied = subprocess.run([*argv[:argv.index("-i")], *argv[argv.index("-i") + 2:]],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "HOME": str(key.parent), "SSH_AUTH_SOCK": ""})
    assert denied.returncode != 0


def test_info_reports_what_the_agent_says(deb: VM) -> None:
    status = deb.status(query_qemu=True)
    assert status.guest is not None
    assert "Debian GNU/Linux 12" in status.guest["os"]["pretty-name"]
    assert status.guest["hostname"] == "db1"
    assert any("198.18.0.15" in addrs for addrs in status.guest["addresses"].values())
    assert status.guest["uptime"] > 0
    assert status.ssh is not None and status.ssh.startswith("root@127.0.0.1:")
    shown = run_cli(Path(deb.host.layout.root), "info", "db", check=True).stdout
    assert "Debian GNU/Linux 12" in shown and "vmkit ssh db" in shown


def test_copy_50_mib_in_and_out(deb: VM, tmp_path: Path) -> None:
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(50 << 20))
    os.chmod(source, 0o640)
    deb.copy_in(source, "/root/blob")
    assert sh(deb, "stat -c %a /root/blob") == "640"
    back = tmp_path / "back"
    deb.copy_out("/root/blob", back)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert sh(deb, "sha256sum /root/blob | cut -d' ' -f1") == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    sh(deb, "rm /root/blob")


def test_disk_snapshot_during_writes_is_consistent(deb: VM, tmp_path: Path) -> None:
    sh(deb, "nohup sh -c 'i=0; while :; do i=$((i+1)); dd if=/dev/urandom of=/var/tmp/w$((i%8)) "
            "bs=64k count=32 conv=fsync 2>/dev/null; echo $i > /var/tmp/count; done' "
            ">/dev/null 2>&1 </dev/null &")
    time.sleep(3)
    info = deb.snapshot("busy", disk_only=True)
    assert info.quiesced is True  # frozen through the agent: application-consistent
    assert int(sh(deb, "cat /var/tmp/count")) > 0
    assert [s.name for s in deb.snapshots()] == ["busy"]
    fsck_clean(_snapshot_layer(deb, "busy"), tmp_path)  # frozen point: no replay, no repair
    deb.restore("busy")  # a disk-only snapshot: the VM is powered off at that disk
    assert deb.state is VmState.STOPPED
    deb.start()
    wait_booted(deb)
    assert unclean_messages(deb) == ""


def _snapshot_layer(vm: VM, name: str) -> Path:
    from vmkit.core import store

    return vm.folder.path / store.load_tree(vm).get(vm.name, name).layer


def test_graceful_stop_then_clean_start(deb: VM, tmp_path: Path) -> None:
    started = time.monotonic()
    deb.stop(timeout=120)
    took = time.monotonic() - started
    status = deb.status()
    assert status.state is VmState.STOPPED
    assert status.last_exit is not None and "killed" not in status.last_exit.description
    print(f"graceful stop took {took:.1f}s")
    assert "files" in fsck_clean(deb.folder.path / deb.active_layer(), tmp_path)
    deb.start()
    wait_booted(deb)
    assert unclean_messages(deb) == ""
    # the boot's own check of the root file system found it clean (nothing to repair)
    fsck_log = sh(deb, "journalctl -b -o cat -u systemd-fsck-root.service")
    assert "vmkit-root: clean," in fsck_log, fsck_log


def test_a_tiny_guest_runs_beside_it(deb: VM) -> None:
    tiny = deb.host.create("box", image="tiny", start=True, wait=True)
    try:
        assert "Debian" in sh(deb, "grep PRETTY_NAME /etc/os-release")
        assert tiny.exec(["cat", "/proc/version"]).exit_code == 0
        assert deb.state is VmState.RUNNING and tiny.state is VmState.RUNNING
    finally:
        tiny.delete(force=True)


def test_an_instant_clone_of_a_debian_guest_is_told_its_identity(deb: VM) -> None:
    wait_booted(deb)  # the agent in the copy must answer: clone a guest that has booted
    copy = deb.clone("db-live", live=True)
    try:
        assert copy.config.cloud_init is not None and deb.config.cloud_init is not None
        assert copy.config.cloud_init.instance_id == f"vmkit-{copy.config.uuid}"
        assert copy.config.cloud_init.hostname == "db-live"  # cloud-init's at its next boot
        assert sh(copy, "hostname") == "db-live"  # told through the agent at once
        assert sh(copy, "cat /sys/class/net/enp0s4/address") == copy.config.mac
        assert sh(deb, "hostname") == "db1" and deb.state is VmState.RUNNING
    finally:
        copy.delete(force=True)
        deb.delete_snapshot("clone-db-live")


def test_a_clone_is_re_identified_by_cloud_init(deb: VM) -> None:
    source_keys = sh(deb, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    deb.stop(timeout=120)
    clone = deb.clone("db-copy", linked=True)
    assert clone.config.cloud_init is not None and deb.config.cloud_init is not None
    assert clone.config.cloud_init.instance_id != deb.config.cloud_init.instance_id
    clone.start()
    try:
        wait_booted(clone)
        assert sh(clone, "cloud-init status --wait", timeout=BOOT_TIMEOUT).endswith("done")
        assert sh(clone, "hostname") == "db-copy"
        assert sh(clone, "cloud-init query instance_id") == f"vmkit-{clone.config.uuid}"
        assert sh(clone, "cat /etc/ssh/ssh_host_ed25519_key.pub") != source_keys  # new host keys
    finally:
        clone.delete(force=True)


def test_bad_cloud_init_input_is_refused_and_nothing_is_created(debian_home: Path,
                                                                 key: Path,
                                                                 tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("#cloud-config\nruncmd: [unclosed\n")
    with new_home(debian_home) as root:
        cases = [
            (["--image", "tiny", "--ssh-key", f"{key}.pub"], "has no cloud-init"),
            (["--image", "debian-12", "--ssh-key", str(tmp_path / "missing.pub")],
             "cannot read ssh key"),
            (["--image", "debian-12", "--ssh-key", str(key)], "is a private key"),
            (["--image", "debian-12", "--user-data", str(bad_yaml)], "not valid YAML"),
            (["--image", "debian-12", "--hostname", "Bad_Name"], "invalid hostname"),
        ]
        for args, message in cases:
            done = run_cli(root, "create", "x", *args)
            assert done.returncode == 2, (args, done.stderr)
            assert message in done.stderr, (args, done.stderr)
        assert not (root / "vms" / "x").exists()
        assert run_cli(root, "list", "--format", "json", check=True).stdout.strip() == "[]"
        done = run_cli(root, "image", "build", "tiny", "--packages", "curl")
        assert done.returncode == 2 and "takes no extra packages" in done.stderr
        done = run_cli(root, "image", "build", "debian-12", "--packages", "curl;rm")
        assert done.returncode == 2 and "invalid Debian package name" in done.stderr
        done = run_cli(root, "image", "build", "debian-12", "--packages", "curl,no-such-pkg-x")
        assert done.returncode == 2 and "unknown Debian package(s): no-such-pkg-x" in done.stderr
        tiny = Host(root).create("t", image="tiny")
        done = run_cli(root, "ssh", "t")
        assert done.returncode == 2 and "runs no ssh server" in done.stderr
        assert tiny.state is VmState.DEFINED


def test_image_build_with_extra_packages(debian_home: Path, tmp_path: Path) -> None:
    """--packages lands in the image (chroot apt-get); the package cache is shared, so only
    what is new is downloaded."""
    from vmkit.images.debian import build_debian
    from vmkit.storage.layout import HomeLayout

    home = HomeLayout(tmp_path / "home")
    home.ensure()
    (home.cache / "debootstrap").symlink_to(HomeLayout(debian_home).cache / "debootstrap")
    info, built = build_debian(home, packages=["curl"])
    assert built and "curl" in info.packages and "libcurl4" in info.packages
    base = Host(debian_home).image("debian-12")
    assert "curl" not in base.packages and info.recipe_hash != base.recipe_hash
    again, rebuilt = build_debian(home, packages=["curl"])
    assert not rebuilt and again.recipe_hash == info.recipe_hash  # same inputs: a no-op


def test_the_image_as_a_foreign_disk_boots_through_firmware_in_each_format(
        debian_home: Path, tmp_path: Path) -> None:
    """debian-12 given a boot loader (GRUB for BIOS and UEFI, by grub-mkrescue, its root file
    system found by UUID) and converted to raw, vmdk, vdi and vhdx: each is a disk made
    elsewhere that vmkit takes with --from-disk. Raw boots through SeaBIOS and vhdx through
    OVMF; vmdk and vdi (each boot took ~70 s more) must hold, block for block, the disk that
    booted, so they would boot the same."""
    from tests.integration.anyos_media import bootable_disk
    from vmkit.model.spec import FIRMWARE_CHOICES

    disk = bootable_disk(debian_home, tmp_path / "disk", "debian-12")
    with new_home(debian_home) as root:
        host = Host(root, lock_timeout=120)
        for fmt, firmware, boot in (("raw", "bios", True), ("vmdk", "uefi", False),
                                    ("vdi", "bios", False), ("vhdx", "uefi", True)):
            source = disk if fmt == "raw" else disk.with_suffix(f".{fmt}")
            if fmt != "raw":
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(disk),
                                str(source)], check=True, capture_output=True, timeout=300)
            vm = host.create(f"from-{fmt}", from_disk=source, firmware=firmware,
                             memory="1G")
            if boot:
                vm.start()
                vm.wait_ready(timeout=BOOT_TIMEOUT)
                assert 'VERSION_CODENAME=bookworm' in sh(vm, "cat /etc/os-release"), fmt
                assert vm.status().boot == "disk" and vm.status().image is None
                uefi = sh(vm, "test -d /sys/firmware/efi && echo uefi || echo bios")
                assert uefi == firmware, (fmt, uefi)
                vm.kill()
            else:
                assert vm.status().boot == "disk" and \
                    vm.config.hardware.firmware == FIRMWARE_CHOICES[firmware]
                same = subprocess.run(
                    ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(disk),
                     str(vm.folder.path / vm.active_layer())],
                    capture_output=True, text=True, timeout=300)
                assert same.returncode == 0, (fmt, same.stdout, same.stderr)
            vm.delete()
            if source != disk:
                source.unlink()
