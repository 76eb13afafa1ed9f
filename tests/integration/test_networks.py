"""Virtual networks on tiny guests, all inside network namespaces this module creates.

`lab` is the host's stand-in: vmkit (CLI), its bridges, taps, dnsmasq, nftables and the VMs'
QEMUs all live in it. `inet` is a stand-in for the internet, joined to `lab` by a veth pair
(lab 198.19.0.1 <-> inet 198.19.0.2) and serving one page. Nothing touches the host's own
network; every address is in 198.18.0.0/15.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import new_home

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

INET_PAGE = "page-from-the-test-internet"


@dataclass
class Lab:
    ns: str
    inet: str
    home: Path

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VMKIT_HOME": str(self.home), "COLUMNS": "200"}
        return subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                               "vmkit.cli.main", *args], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"vmkit {' '.join(args)}: {done.stderr}"
        return done.stdout

    def guest(self, vm: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", "--timeout", str(timeout), vm, "--", "sh", "-c", script,
                        timeout=timeout + 30)

    def sh(self, vm: str, script: str) -> str:
        done = self.guest(vm, script)
        assert done.returncode == 0, f"{vm}: {script}: {done.stdout}{done.stderr}"
        return done.stdout.strip()

    def in_ns(self, ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], text=True,
                              capture_output=True, timeout=timeout, check=False)

    def wipe(self) -> None:
        """Delete every VM and network of the lab's home from inside its namespace, so the
        home's teardown (in the root namespace) has nothing left to reconcile there."""
        script = ("import sys; from vmkit import Host; h = Host(sys.argv[1]); h.delete_all(); "
                  "[h.delete_network(n.name) for n in h.networks()]")
        subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", script,
                        str(self.home)], capture_output=True, timeout=300, check=False)

    def links(self) -> list[str]:
        out = self.in_ns(self.ns, "ip", "-o", "link", "show").stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def lab(image_home: Path) -> Iterator[Lab]:
    tag = f"{os.getpid() % 100000}"
    ns, inet = f"vmk-lab-{tag}", f"vmk-inet-{tag}"
    _run("ip", "netns", "add", ns)
    _run("ip", "netns", "add", inet)
    httpd: subprocess.Popen[bytes] | None = None
    try:
        for name in (ns, inet):
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "wan0",
             "netns", inet)
        _run("ip", "-n", ns, "addr", "add", "198.19.0.1/24", "dev", "uplink0")
        _run("ip", "-n", inet, "addr", "add", "198.19.0.2/24", "dev", "wan0")
        _run("ip", "-n", ns, "link", "set", "uplink0", "up")
        _run("ip", "-n", inet, "link", "set", "wan0", "up")
        with new_home(image_home) as home:
            www = home / "inet-www"
            www.mkdir()
            (www / "index.html").write_text(INET_PAGE + "\n")
            httpd = subprocess.Popen(["ip", "netns", "exec", inet, "busybox", "httpd", "-f",
                                      "-p", "198.19.0.2:80", "-h", str(www)])
            lab = Lab(ns, inet, home)
            try:
                yield lab
            finally:
                lab.cli("delete", "--force", "a")
                for vm in ("b", "c", "u"):
                    lab.cli("delete", "--force", vm)
                for net in ("lan", "backend"):
                    lab.cli("network", "delete", net)
                lab.wipe()
    finally:
        if httpd is not None:
            httpd.send_signal(signal.SIGTERM)
            httpd.wait(timeout=10)
        for name in (ns, inet):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                           check=False)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_vms_on_one_network_reach_each_other_by_name(lab: Lab) -> None:
    lab.ok("network", "create", "lan", "--subnet", "198.18.10.0/24", "--nat")
    lab.ok("network", "create", "backend", "--subnet", "198.18.20.0/24", "--isolated")
    lab.ok("create", "a", "--network", "lan", "--port", "198.19.0.1:8080:80")
    lab.ok("create", "b", "--network", "lan")
    lab.ok("create", "c", "--network", "backend")
    for vm in ("a", "b", "c"):
        lab.ok("start", vm, "--wait")
    for vm in ("a", "b"):
        lab.sh(vm, f"mkdir -p /www && echo hello-from-{vm} > /www/index.html && "
                   "httpd -p 80 -h /www")
    wait_for(lambda: lab.guest("a", "ping -c1 -W2 b").returncode == 0, "a to reach b")
    assert lab.sh("a", "timeout 10 wget -q -O - http://b/") == "hello-from-b"
    assert lab.sh("b", "timeout 10 wget -q -O - http://a.lan.vmkit/") == "hello-from-a"
    # the fixed lease vmkit chose is what the guest got, and info says so
    info = lab.ok("network", "info", "lan")
    assert "198.18.10.10" in info and "198.18.10.11" in info
    assert "198.18.10.10/24" in lab.sh("a", "ip -4 addr show eth0")


def test_networks_do_not_see_each_other_and_isolated_has_no_way_out(lab: Lab) -> None:
    assert "198.18.20.10/24" in lab.sh("c", "ip -4 addr show eth0")
    assert lab.guest("c", "ping -c1 -W2 198.18.10.10").returncode != 0
    assert lab.guest("c", "timeout 5 wget -q -O - http://198.18.10.10/").returncode != 0
    assert "default" not in lab.sh("c", "ip route")  # no router was offered
    assert lab.guest("c", "ping -c1 -W2 198.19.0.2").returncode != 0
    assert lab.guest("a", "ping -c1 -W2 198.18.20.10").returncode != 0


def test_nat_network_reaches_the_outside(lab: Lab) -> None:
    assert lab.sh("a", "timeout 10 wget -q -O - http://198.19.0.2/") == INET_PAGE


def test_port_forward_reaches_the_guest_from_outside(lab: Lab) -> None:
    done = lab.in_ns(lab.inet, "timeout", "10", "busybox", "wget", "-q", "-O", "-",
                     "http://198.19.0.1:8080/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello-from-a"


def test_user_networking_needs_no_bridge_and_forwards_ports(lab: Lab) -> None:
    taps = [n for n in lab.links() if n.startswith("vmkt")]
    lab.ok("create", "u", "--network", "user", "--port", "18080:80")
    try:
        lab.ok("start", "u", "--wait")
        lab.sh("u", "mkdir -p /www && echo hello-from-u > /www/index.html && httpd -p 80 -h /www")
        assert [n for n in lab.links() if n.startswith("vmkt")] == taps  # no tap for it
        done = lab.in_ns(lab.ns, "timeout", "10", "busybox", "wget", "-q", "-O", "-",
                         "http://127.0.0.1:18080/")
        assert done.stdout.strip() == "hello-from-u", done.stderr
    finally:
        lab.cli("delete", "--force", "u")


def test_spoofed_addresses_are_dropped(lab: Lab) -> None:
    assert lab.guest("a", "ping -c1 -W2 198.18.10.11").returncode == 0
    spoof_ip = lab.guest("a", "ip addr add 198.18.10.99/24 dev eth0; "
                              "ping -I 198.18.10.99 -c1 -W2 198.18.10.11; r=$?; "
                              "ip addr del 198.18.10.99/24 dev eth0; exit $r")
    assert spoof_ip.returncode != 0
    mac = lab.sh("a", "cat /sys/class/net/eth0/address")
    spoof_mac = lab.guest("a", "ip link set eth0 address 52:54:00:66:66:66; "
                               "arp -d 198.18.10.11 2>/dev/null; ping -c1 -W2 198.18.10.11; "
                               f"r=$?; ip link set eth0 address {mac}; exit $r")
    assert spoof_mac.returncode != 0
    assert lab.guest("a", "ping -c1 -W2 198.18.10.11").returncode == 0  # itself again: fine


def test_hot_added_nic_gets_a_lease_and_hot_removed_goes(lab: Lab) -> None:
    lab.ok("nic", "add", "c", "--network", "lan")
    wait_for(lambda: "198.18.10.12/24" in lab.guest("c", "ip -4 addr").stdout,
             "the hot-added NIC's lease")
    wait_for(lambda: lab.guest("c", "ping -c1 -W2 198.18.10.10").returncode == 0,
             "c to reach a over its new NIC")
    lab.ok("nic", "remove", "c", "lan")
    assert "198.18.10.12" not in lab.guest("c", "ip -4 addr").stdout
    assert lab.guest("c", "ping -c1 -W2 198.18.10.10").returncode != 0
    assert "lan" not in lab.ok("info", "c", "--format", "json").split('"nics"')[1]


def test_delete_refused_while_attached_and_crashed_taps_are_cleaned(lab: Lab) -> None:
    done = lab.cli("network", "delete", "lan")
    assert done.returncode == 2 and "in use by VM(s) a, b" in done.stderr
    taps_before = [n for n in lab.links() if n.startswith("vmkt")]
    assert len(taps_before) == 3
    pid = int(lab.ok("info", "b", "--format", "json").split('"pid": ')[1].split(",")[0])
    os.kill(pid, signal.SIGKILL)  # QEMU of b dies; its tap is left behind
    time.sleep(1)
    assert '"crashed"' in lab.ok("info", "b", "--format", "json")  # the next operation...
    assert len([n for n in lab.links() if n.startswith("vmkt")]) == 2  # ...took its tap


def test_networks_come_back_after_a_reboot(lab: Lab) -> None:
    for vm in ("a", "c"):
        lab.ok("stop", vm)
    # what a host reboot does: bridges, taps, rules and dnsmasq are gone
    for link in lab.links():
        if link.startswith("vmk"):
            lab.in_ns(lab.ns, "ip", "link", "del", link)
    for table in lab.in_ns(lab.ns, "nft", "list", "tables").stdout.splitlines():
        lab.in_ns(lab.ns, "nft", "delete", *table.split())
    subprocess.run(["pkill", "-KILL", "-f", f"dnsmasq --conf-file={lab.home}"], check=False)
    assert not [n for n in lab.links() if n.startswith("vmk")]
    lab.ok("network", "reconcile")
    assert len([n for n in lab.links() if n.startswith("vmkb")]) == 2
    lab.ok("start", "a", "--wait")
    try:
        wait_for(lambda: lab.guest("a", "timeout 10 wget -q -O - http://198.19.0.2/")
                 .returncode == 0, "NAT after the reboot")
    except AssertionError:
        print(lab.guest("a", "ip -4 addr; ip route; timeout 10 wget -O - http://198.19.0.2/"))
        print(lab.in_ns(lab.ns, "nft", "list", "ruleset").stdout)
        print(lab.in_ns(lab.ns, "ip", "-br", "addr").stdout)
        raise


def test_bridged_network_joins_the_hosts_bridge_and_leaves_it_alone(lab: Lab) -> None:
    for argv in (("link", "add", "extbr0", "type", "bridge"),
                 ("addr", "add", "198.18.40.1/24", "dev", "extbr0"),
                 ("link", "set", "extbr0", "up")):
        assert lab.in_ns(lab.ns, "ip", *argv).returncode == 0
    try:
        done = lab.cli("network", "create", "ext", "--bridged", "--parent", "nosuchbr0")
        assert done.returncode == 2 and "no bridge 'nosuchbr0'" in done.stderr
        lab.ok("network", "create", "ext", "--bridged", "--parent", "extbr0")
        done = lab.cli("create", "x", "--network", "ext", "--port", "8081:80")
        assert done.returncode == 2 and "is bridged" in done.stderr
        lab.ok("nic", "add", "a", "--network", "ext")
        ports = lab.in_ns(lab.ns, "ip", "-o", "link", "show", "master", "extbr0").stdout
        assert "vmkt" in ports  # a's new tap is a port of the host's bridge
        # no DHCP on that LAN here: give the guest an address by hand, then reach the host
        wait_for(lambda: lab.guest("a", "ip addr add 198.18.40.50/24 dev eth1 2>/dev/null; "
                                        "ping -c1 -W2 198.18.40.1").returncode == 0,
                 "a to reach the host over the bridged LAN")
        lab.ok("nic", "remove", "a", "ext")
        lab.ok("network", "delete", "ext")
        addr = lab.in_ns(lab.ns, "ip", "-br", "addr", "show", "extbr0").stdout
        assert "198.18.40.1/24" in addr  # the host's bridge is still there, unchanged
        assert "vmkt" not in lab.in_ns(lab.ns, "ip", "-o", "link", "show", "master",
                                       "extbr0").stdout
    finally:
        lab.in_ns(lab.ns, "ip", "link", "del", "extbr0")


def test_nothing_is_left_after_deleting_everything(lab: Lab) -> None:
    for vm in ("a", "b", "c"):
        lab.ok("delete", "--force", vm)
    for net in ("lan", "backend"):
        lab.ok("network", "delete", net)
    assert not [n for n in lab.links() if n.startswith("vmk")]
    assert lab.in_ns(lab.ns, "nft", "list", "tables").stdout.strip() == ""
    left = subprocess.run(["pgrep", "-f", f"dnsmasq --conf-file={lab.home}"],
                          capture_output=True, text=True, check=False).stdout
    assert left == ""
    assert lab.ok("network", "list", "--format", "json").strip() == "[]"
