"""The tiny image's helper gives an instant clone its identity in one program (each program a
clone starts costs 50-250 ms under TCG): run here, compiled as the image recipe compiles it,
in namespaces of its own (hostname, NICs, processes, and an /etc/hostname bound over)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmkit.images import tiny
from vmkit.qemu import agent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(tool) is None
                             for tool in ("gcc", "unshare", "ip", "mount")),
    reason="needs root (namespaces), gcc, ip and mount")

# Registration order (ifindex) in the namespace: lo 1, eth11 2 (a veth's peer comes first),
# eth10 3, br9 4 (a bridge the guest made: no device behind it), eth3 5, eth2 6. A VM's NICs
# have a device behind them (/sys/class/net/NAME/device); veths have none, so the test shows
# the helper a copy of /sys/class/net where the eth* have one (the MACs are set for real).
INSIDE = r"""
set -e
helper=$1 etc_hostname=$2; shift 2
mount -t sysfs sysfs /sys
mount --bind "$etc_hostname" /etc/hostname
ip link add eth10 type veth peer name eth11
ip link add br9 type bridge
ip link add eth2 type veth peer name eth3
ip link set eth2 up
view=$(mktemp -d)
for d in /sys/class/net/*; do
    n=${d##*/}; [ -d "$d" ] || continue
    mkdir "$view/$n"; cat "$d/type" > "$view/$n/type"; cat "$d/ifindex" > "$view/$n/ifindex"
    case $n in eth*) ln -s /sys/devices/virtual "$view/$n/device";; esac
done
mount --bind "$view" /sys/class/net
set +e
"$helper" "$@" < /dev/null
echo "exit $?"
set -e
echo "hostname $(hostname)"
for n in eth10 eth11 eth2 eth3 br9; do
    echo "$n $(ip -o link show dev $n | sed 's|.*link/ether \([^ ]*\).*|\1|')"
done
"""
MACS = ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02", "52:54:00:aa:bb:03"]


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("reseed")
    target = scratch / "vmkit-reseed"
    tiny._compile_static(tiny.RESEED_SOURCE, scratch, target)
    return target


def _identity(helper: Path, tmp_path: Path, *args: str) -> dict[str, str]:
    etc_hostname = tmp_path / "hostname"
    etc_hostname.write_text("old\n")
    # a networkctl that does nothing: the real one would ask the host's networkd to renew
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "networkctl").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "networkctl").chmod(0o755)
    done = subprocess.run(
        ["unshare", "--uts", "--net", "--mount", "--pid", "--fork", "--mount-proc",
         "sh", "-c", INSIDE, "inside", str(helper), str(etc_hostname), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    assert done.returncode == 0, done.stderr
    seen = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    seen["stderr"] = done.stderr
    seen["etc_hostname"] = etc_hostname.read_text()
    return seen


def _macs_in_registration_order(seen: dict[str, str]) -> None:
    """eth11, eth10 and eth3 take the MACs in that order (by name: eth10, eth11, eth2); the
    bridge between them is skipped, and eth2 (up), beyond the list, keeps its own."""
    assert (seen["eth11"], seen["eth10"], seen["eth3"]) == tuple(MACS), seen
    assert not seen["eth2"].startswith("52:54:00:aa:bb")
    assert not seen["br9"].startswith("52:54:00:aa:bb")


def _shell_version(tmp_path: Path, macs: list[str]) -> Path:
    """What a guest without the helper runs (debian-12, older tiny images), as a script."""
    script = tmp_path / "identity.sh"
    script.write_text("#!/bin/sh\n" + agent.identity_script("clone-8", macs))
    script.chmod(0o755)
    return script


def test_hostname_and_macs_in_nic_registration_order_then_the_reseed(helper: Path,
                                                                      tmp_path: Path) -> None:
    seen = _identity(helper, tmp_path, "--identity", "clone-7", *MACS)
    assert seen["hostname"] == "clone-7" and seen["etc_hostname"] == "clone-7\n"
    _macs_in_registration_order(seen)
    assert seen["vmkit-identity:"] == "set"  # how the host tells it from an older helper
    # then the reseed: with no bytes on stdin it says so (exit 1, not the identity's 3)
    assert seen["exit"] == "1" and "no bytes on stdin" in seen["stderr"]


def test_the_shell_version_sets_the_same_macs_in_the_same_order(tmp_path: Path) -> None:
    seen = _identity(_shell_version(tmp_path, MACS), tmp_path)
    assert seen["exit"] == "0", seen["stderr"]
    assert seen["hostname"] == "clone-8"
    _macs_in_registration_order(seen)


def test_a_mac_for_a_nic_the_guest_has_not_seen_is_left_to_its_device(
        helper: Path, tmp_path: Path) -> None:
    """Five MACs, four NICs (the bridge is none): the fifth is a NIC the guest has not probed
    (a driver it lacks, a hot-add a moment ago), which reads the clone's MAC from its device
    when it comes up. The four are set, the bridge is left alone, and the reseed follows."""
    macs = [*MACS, "52:54:00:aa:bb:04", "52:54:00:aa:bb:05"]
    seen = _identity(helper, tmp_path, "--identity", "clone-9", *macs)
    assert seen["vmkit-identity:"] == "set", seen
    assert seen["exit"] == "1" and "no bytes on stdin" in seen["stderr"]  # the reseed ran
    assert seen["eth2"] == macs[3] and not seen["br9"].startswith("52:54:00:aa:bb")
    shell = _identity(_shell_version(tmp_path, macs), tmp_path)
    assert shell["exit"] == "0" and shell["eth2"] == macs[3], shell


def test_a_mac_that_cannot_be_set_is_the_identity_failing(helper: Path,
                                                          tmp_path: Path) -> None:
    seen = _identity(helper, tmp_path, "--identity", "x", "52:54:00:aa:bb:zz")
    assert seen["exit"] == str(agent.RESEED_FIRST_FAILED)
    assert "reading the MAC 52:54:00:aa:bb:zz" in seen["stderr"]
    assert "no bytes on stdin" not in seen["stderr"]  # the reseed was not tried
    # every MAC is read before anything changes: no half-made identity
    assert seen["hostname"] != "x" and seen["etc_hostname"] == "old\n"
    assert "vmkit-identity:" not in seen


def test_anything_else_is_a_usage_error(helper: Path, tmp_path: Path) -> None:
    seen = _identity(helper, tmp_path, "--hostname", "x")
    assert seen["exit"] == "2" and "usage" in seen["stderr"]
    assert seen["etc_hostname"] == "old\n"
