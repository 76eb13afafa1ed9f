"""Network neighbours, on tiny guests inside network namespaces this module creates.

`iso` is the host's stand-in (vmkit, its bridges, dnsmasq, rules, QEMUs); `out` is a peer
joined by a veth pair (iso 198.19.1.1 <-> out 198.19.1.2). Two isolated networks named so that
either could come first in a name-ordered ruleset: `aaa` (VMs p and r) and `zzz` (VM q).
Only 198.18.0.0/15 addresses; no traffic leaves the namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.test_networks import Lab, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

GW_AAA, GW_ZZZ = "198.18.50.1", "198.18.51.1"
P, R, Q = "198.18.50.10", "198.18.50.11", "198.18.51.10"
HOST_OUT = "198.19.1.1"  # the lab host's address towards `out`


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def lab(image_home: Path) -> Iterator[Lab]:
    tag = f"{os.getpid() % 100000}"
    ns, out = f"vmk-iso-{tag}", f"vmk-out-{tag}"
    _run("ip", "netns", "add", ns)
    _run("ip", "netns", "add", out)
    try:
        for name in (ns, out):
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "wan0",
             "netns", out)
        _run("ip", "-n", ns, "addr", "add", f"{HOST_OUT}/24", "dev", "uplink0")
        _run("ip", "-n", out, "addr", "add", "198.19.1.2/24", "dev", "wan0")
        _run("ip", "-n", ns, "link", "set", "uplink0", "up")
        _run("ip", "-n", out, "link", "set", "wan0", "up")
        with new_home(image_home) as home:
            lab = Lab(ns, out, home)
            try:
                yield lab
            finally:
                for vm in ("p", "q", "r", "x", "y"):
                    lab.cli("delete", "--force", vm)
                for net in ("aaa", "zzz"):
                    lab.cli("network", "delete", net)
                lab.wipe()
    finally:
        for name in (ns, out):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                           check=False)


def http_from_guest(lab: Lab, vm: str, address: str, port: int) -> str:
    """The page a guest gets from address:port ('' when nothing answers)."""
    done = lab.guest(vm, f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 6 nc -w 4 {address} "
                         f"{port}", timeout=30)
    return done.stdout


def curl(lab: Lab, ns: str, url: str) -> str:
    done = lab.in_ns(ns, "curl", "-s", "-m", "5", url)
    return done.stdout.strip() if done.returncode == 0 else ""


def bridge_counters(lab: Lab, tap: str) -> dict[str, int]:
    """Packets each drop rule of the bridge table counted for `tap`, by the rule's text."""
    listing = lab.in_ns(lab.ns, "nft", "list", "ruleset").stdout
    counted = {}
    for line in listing.splitlines():
        if f'iifname "{tap}"' in line and "counter packets" in line:
            rule, _, rest = line.strip().partition(" counter packets ")
            counted[rule.split(f'"{tap}" ', 1)[1]] = int(rest.split()[0])
    return counted


def tap_of(lab: Lab, network: str, vm: str) -> str:
    info = json.loads(lab.ok("network", "info", network, "--format", "json"))
    return str(next(a["tap"] for a in info["attached"] if a["vm"] == vm))


def test_vms_up_with_forwards_on_chosen_addresses(lab: Lab) -> None:
    lab.ok("network", "create", "aaa", "--subnet", "198.18.50.0/24", "--isolated")
    lab.ok("network", "create", "zzz", "--subnet", "198.18.51.0/24", "--isolated")
    lab.ok("create", "p", "--network", "aaa", "--port", "0.0.0.0:8081:80")  # every address
    lab.ok("create", "r", "--network", "aaa", "--port", "8083:80")  # 127.0.0.1 by default
    lab.ok("create", "q", "--network", "zzz", "--port", "0.0.0.0:8082:80")
    for vm in ("p", "r", "q"):
        lab.ok("start", vm, "--wait")
        lab.sh(vm, f"mkdir -p /www && echo hello-from-{vm} > /www/index.html && "
                   "httpd -p 80 -h /www")
    assert P in lab.sh("p", "ip -4 addr show eth0") and Q in lab.sh("q", "ip -4 addr show eth0")
    wait_for(lambda: lab.guest("r", f"ping -c1 -W2 {P}").returncode == 0, "r to reach p")


def test_the_hosts_localhost_reaches_the_guest(lab: Lab) -> None:
    assert curl(lab, lab.ns, "http://127.0.0.1:8083/") == "hello-from-r"
    assert curl(lab, lab.ns, "http://127.0.0.1:8081/") == "hello-from-p"  # 0.0.0.0: lo too
    route_localnet = lab.in_ns(lab.ns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet")
    assert route_localnet.stdout.strip() == "0"  # only vmkit's bridges carry it


def test_a_forward_is_not_reachable_on_an_address_not_chosen(lab: Lab) -> None:
    assert curl(lab, lab.inet, f"http://{HOST_OUT}:8081/") == "hello-from-p"  # chosen: all
    assert curl(lab, lab.inet, f"http://{HOST_OUT}:8083/") == ""  # r's is 127.0.0.1 only
    assert curl(lab, lab.ns, f"http://{HOST_OUT}:8083/") == ""  # not even from the host


@pytest.mark.parametrize("vm,own_gateway,other_gateway,ports", [
    ("p", GW_AAA, GW_ZZZ, (8082,)),  # aaa -> zzz's forward
    ("q", GW_ZZZ, GW_AAA, (8081, 8083)),  # zzz -> aaa's forwards
])
def test_a_network_never_reaches_another_networks_forwards(
        lab: Lab, vm: str, own_gateway: str, other_gateway: str, ports: tuple[int, ...]) -> None:
    for port in ports:
        for address in (own_gateway, other_gateway, HOST_OUT):
            assert "hello-from" not in http_from_guest(lab, vm, address, port), \
                f"{vm} reached forward {port} through {address}"
    # nor its own network's forwards through the host: DNAT never applies to a vmkit bridge
    own = 8081 if vm == "q" else 8082
    assert "hello-from" not in http_from_guest(lab, vm, own_gateway, own)


def observe(lab: Lab, rules: list[str]) -> Callable[[], list[int]]:
    """A bridge table of the test's own counting frames as the bridge forwards them out of a
    port (after vmkit's prerouting checks): what a neighbour's NIC actually receives."""
    body = "\n".join(f"    {rule} counter" for rule in rules)
    ruleset = ("table bridge vmkit_test_observer\ndelete table bridge vmkit_test_observer\n"
               "table bridge vmkit_test_observer {\n  chain forward {\n"
               "    type filter hook forward priority 0; policy accept;\n" + body + "\n  }\n}\n")
    done = subprocess.run(["ip", "netns", "exec", lab.ns, "nft", "-f", "-"], input=ruleset,
                          text=True, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr

    def counts() -> list[int]:
        listing = lab.in_ns(lab.ns, "nft", "list", "table", "bridge",
                            "vmkit_test_observer").stdout
        return [int(line.split("counter packets ")[1].split()[0])
                for line in listing.splitlines() if "counter packets" in line]
    return counts


def test_a_guest_is_no_dhcp_server_for_its_neighbour(lab: Lab) -> None:
    p_tap, r_tap = tap_of(lab, "aaa", "p"), tap_of(lab, "aaa", "r")
    r_mac = lab.sh("r", "cat /sys/class/net/eth0/address")
    counts = observe(lab, [f'oifname "{p_tap}" ether saddr {r_mac} ether type ip udp sport 67',
                           f'oifname "{p_tap}" ether saddr {r_mac} ether type ip icmp type '
                           "echo-request"])
    before = bridge_counters(lab, r_tap)
    try:
        # r runs a DHCP server (busybox udhcpd) offering addresses and itself as the router
        lab.sh("r", "printf 'start 198.18.50.200\\nend 198.18.50.210\\ninterface eth0\\n"
                    "lease_file /tmp/rogue.leases\\noption router 198.18.50.11\\n' "
                    "> /tmp/rogue.conf && touch /tmp/rogue.leases && "
                    "(udhcpd -f /tmp/rogue.conf >/tmp/rogue.log 2>&1 </dev/null &); sleep 1; "
                    "pidof udhcpd")
        # p asks for a lease (without applying it) a few times; r answers each time
        lab.guest("p", "udhcpc -i eth0 -n -q -t 4 -T 1 -s /bin/true", timeout=30)
        rule = "ether type ip udp sport 67"
        # udhcpd ARP-probes an address before it offers it: its answer comes seconds later,
        # and is dropped at its own tap
        wait_for(lambda: bridge_counters(lab, r_tap)[rule] > before[rule], "r's offer", 30)
        assert lab.guest("r", f"ping -c1 -W2 {P}").returncode == 0  # r does reach p
        heard_offers, heard_pings = counts()
        assert heard_pings >= 1  # the observer sees what r sends p...
        assert heard_offers == 0  # ...and no DHCP answer of r's ever reached p's NIC
    finally:
        lab.guest("r", "pkill udhcpd")
        lab.in_ns(lab.ns, "nft", "delete", "table", "bridge", "vmkit_test_observer")


def test_ipv6_from_a_guest_is_dropped(lab: Lab) -> None:
    link_local = lab.sh("p", "ip -6 -o addr show dev eth0 scope link")
    if "fe80::" not in link_local:
        pytest.skip("the tiny guest's kernel has no IPv6")
    address = link_local.split("inet6 ")[1].split("/")[0]
    tap = tap_of(lab, "aaa", "r")
    before = bridge_counters(lab, tap)["ether type != { ip, arp }"]
    assert lab.guest("r", f"ping -c1 -W2 {P}").returncode == 0  # IPv4 to it: fine
    assert lab.guest("r", f"ping6 -c2 -W2 -I eth0 {address}").returncode != 0
    after = bridge_counters(lab, tap)["ether type != { ip, arp }"]
    assert after > before  # every IPv6 frame of r's (router adverts included) is dropped


def test_a_host_port_in_use_is_refused_naming_its_holder(lab: Lab) -> None:
    www = lab.home / "held-www"
    www.mkdir(exist_ok=True)
    holder = subprocess.Popen(["ip", "netns", "exec", lab.ns, "busybox", "httpd", "-f", "-p",
                               "127.0.0.1:8090", "-h", str(www)])
    try:
        wait_for(lambda: ":8090 " in lab.in_ns(lab.ns, "ss", "-ltn").stdout, "the holder")
        for argv in (("create", "x", "--network", "aaa", "--port", "8090:80"),
                     ("create", "x", "--network", "user", "--port", "8090:80"),
                     ("create", "x", "--network", "aaa", "--port", "0.0.0.0:8090:80"),
                     ("nic", "add", "r", "--network", "zzz", "--port", "8090:80")):
            done = lab.cli(*argv)
            assert done.returncode == 2, (argv, done.stderr)
            assert "8090/tcp is in use by busybox (pid " in done.stderr, done.stderr
        done = lab.cli("create", "x", "--network", "aaa", "--port", "8081:80")
        assert done.returncode == 2 and "another vmkit VM 'p'" in done.stderr, done.stderr
        done = lab.cli("create", "x", "--network", "aaa", "--port", "198.18.250.9:8091:80")
        assert done.returncode == 2 and "not an address of this host" in done.stderr
        assert "x" not in [vm["name"] for vm in json.loads(lab.ok("list", "--format", "json"))]
        # at start: the port was free at create, something took it since
        lab.ok("create", "y", "--network", "user", "--port", "127.0.0.1:8092:80")
        taker = subprocess.Popen(["ip", "netns", "exec", lab.ns, "busybox", "httpd", "-f",
                                  "-p", "127.0.0.1:8092", "-h", str(www)])
        try:
            wait_for(lambda: ":8092 " in lab.in_ns(lab.ns, "ss", "-ltn").stdout, "the taker")
            done = lab.cli("start", "y")
            assert done.returncode == 2 and "8092/tcp is in use by busybox" in done.stderr
            state = json.loads(lab.ok("info", "y", "--format", "json"))["state"]
            assert state in ("stopped", "defined"), state
        finally:
            taker.send_signal(signal.SIGTERM)
            taker.wait(timeout=10)
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)
        lab.cli("delete", "--force", "y")
