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
    os.geteuid() != 0 or shutil.which("gcc") is None or shutil.which("unshare") is None,
    reason="needs root (namespaces) and gcc")

INSIDE = """
set -e
mount -t sysfs sysfs /sys
mount --bind "$2" /etc/hostname
ip link add eth10 type veth peer name eth11
ip link add eth2 type veth peer name eth3
ip link set eth2 up
set +e
"$1" "$3" "$4" "$5" "$6" < /dev/null
echo "exit $?"
set -e
echo "hostname $(hostname)"
for n in eth10 eth11 eth2 eth3; do echo "$n $(cat /sys/class/net/$n/address)"; done
"""


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scratch = tmp_path_factory.mktemp("reseed")
    target = scratch / "vmkit-reseed"
    tiny._compile_static(tiny.RESEED_SOURCE, scratch, target)
    return target


def _identity(helper: Path, tmp_path: Path, *args: str) -> dict[str, str]:
    etc_hostname = tmp_path / "hostname"
    etc_hostname.write_text("old\n")
    padded = [*args, "", "", "", ""][:4]
    done = subprocess.run(
        ["unshare", "--uts", "--net", "--mount", "--pid", "--fork", "--mount-proc",
         "sh", "-c", INSIDE, "inside", str(helper), str(etc_hostname), *padded],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    seen["stderr"] = done.stderr
    seen["etc_hostname"] = etc_hostname.read_text()
    return seen


def test_hostname_and_macs_in_nic_registration_order_then_the_reseed(helper: Path,
                                                                      tmp_path: Path) -> None:
    seen = _identity(helper, tmp_path, "--identity", "clone-7", "52:54:00:aa:bb:01",
                     "52:54:00:aa:bb:02")
    assert seen["hostname"] == "clone-7" and seen["etc_hostname"] == "clone-7\n"
    _macs_in_registration_order(seen)
    assert seen["vmkit-identity:"] == "set"  # how the host tells it from an older helper
    # then the reseed: with no bytes on stdin it says so (exit 1, not the identity's 3)
    assert seen["exit"] == "1" and "no bytes on stdin" in seen["stderr"]


def _macs_in_registration_order(seen: dict[str, str]) -> None:
    """The pair eth10/eth11 was made first, and a veth's peer is registered before it
    (ifindex 2: eth11, 3: eth10): they take the MACs in that order (by name eth10, then eth11,
    eth2 and eth3 would); eth3 and eth2 (up), beyond the list, keep their own."""
    assert seen["eth11"] == "52:54:00:aa:bb:01" and seen["eth10"] == "52:54:00:aa:bb:02"
    assert not seen["eth2"].startswith("52:54:00:aa:bb")
    assert not seen["eth3"].startswith("52:54:00:aa:bb")


def test_the_shell_version_sets_the_same_macs_in_the_same_order(tmp_path: Path) -> None:
    """What a guest without the helper runs (debian-12, older tiny images)."""
    script = tmp_path / "identity.sh"
    script.write_text("#!/bin/sh\n" + agent.identity_script("clone-8", ["52:54:00:aa:bb:01",
                                                        "52:54:00:aa:bb:02"]))
    script.chmod(0o755)
    seen = _identity(script, tmp_path)
    assert seen["exit"] == "0", seen["stderr"]
    assert seen["hostname"] == "clone-8"
    _macs_in_registration_order(seen)


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
