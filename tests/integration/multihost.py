"""Two hosts on one machine, for moves between hosts (tests/integration/test_migration.py and
bench/migrate.py): two network namespaces joined by a veth pair (198.18.x), each with its own
VMKIT_HOME, uid range and registry, config folder and `vmkit daemon --listen ADDR:8443` run
under `ip netns exec`; each knows the other as a remote (a token made there, its certificate's
fingerprint pinned)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.daemon_harness import Daemon, cli, qemu_count

PORT = 8443


@dataclass
class Side:
    name: str
    home: Path
    namespace: str
    veth: str
    daemon: Daemon
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return cli(self.home, *args, env=self.env, prefix=self.daemon.prefix, timeout=timeout)

    def ok(self, *args: str, timeout: float = 900) -> str:
        done = self.cli(*args, timeout=timeout)
        assert done.returncode == 0, f"host {self.name}: vmkit {' '.join(args)}: {done.stderr}"
        return done.stdout

    def exec(self, vm: str, script: str, timeout: float = 600) -> str:
        return self.ok("exec", vm, "--", "sh", "-c", script, timeout=timeout)

    def has_vm(self, vm: str) -> bool:
        return (self.home / "vms" / vm).exists()

    def serial_log(self, vm: str) -> Path:
        return self.home / "vms" / vm / "logs" / "serial.log"

    def qemus(self, vm_uuid: str) -> list[int]:
        """This host's QEMU processes of the VM (by uuid and home in the command line)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if vm_uuid.encode() in cmdline and str(self.home).encode() in cmdline \
                        and cmdline.startswith(b"qemu-system"):
                    found.append(int(entry))
        return found


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=60)


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def two_hosts(stack: contextlib.ExitStack, new_home: Callable[[], Path], *,
              addresses: tuple[str, str], uid_base: int, tag: str) -> tuple[Side, Side]:
    """Hosts `a` and `b`; every piece is undone by `stack`, last first. `new_home` makes a
    VMKIT_HOME with the images (and registers its own removal on `stack`)."""
    suffix = uuid.uuid4().hex[:6]
    names = [f"{tag}-mig-{side}-{suffix}" for side in "ab"]
    veths = [f"{tag}{suffix}{side}" for side in "ab"]
    for ns in names:
        ip("netns", "add", ns)
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True,
                       check=False)
    ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
    stack.callback(subprocess.run, ["ip", "link", "del", veths[0]], capture_output=True,
                   check=False)  # gone with its namespace once moved there
    sides = []
    for index, name in enumerate("ab"):
        ns, veth, address = names[index], veths[index], addresses[index]
        ip("link", "set", veth, "netns", ns)
        ip("-n", ns, "addr", "add", f"{address}/30", "dev", veth)
        ip("-n", ns, "link", "set", veth, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        home = new_home()
        scratch = Path(tempfile.mkdtemp(prefix=f"{tag}-{name}-"))
        stack.callback(subprocess.run, ["rm", "-rf", str(scratch)], check=False)
        env = {"VMKIT_CONFIG_DIR": str(scratch / "config"),
               "VMKIT_UID_REGISTRY": str(scratch / "uids"),
               "VMKIT_UID_RANGE": f"{uid_base + index * 1000}:1000"}
        daemon = Daemon(home, listen=f"{address}:{PORT}", prefix=("ip", "netns", "exec", ns))
        daemon.start(env=env)
        stack.callback(daemon.stop)
        side = Side(name, home, ns, veth, daemon, env)
        # a VM left by a failed test, deleted through this host's own uid registry
        stack.callback(side.cli, "delete", "--all", "--force", timeout=300)
        sides.append(side)
    a, b = sides
    for here, there in ((a, b), (b, a)):
        here.ok("remote", "add", there.name, there.daemon.url, "--token",
                there.daemon.token, "--accept-fingerprint",
                fingerprint(there.daemon.server_cert))
    return a, b


# -- what the move tests check on either host ---------------------------------------------
def vm_uuid_on(side: Side, vm: str) -> str:
    return str(json.loads(side.ok("info", vm, "--format", "json"))["uuid"])


def uptime_on(side: Side, vm: str) -> float:
    return float(side.exec(vm, "cut -d' ' -f1 /proc/uptime").split()[0])


def snapshots_on(side: Side, vm: str) -> list[str]:
    return [s["name"] for s in json.loads(side.ok("snapshot", "list", vm, "--format", "json"))]


def one_qemu_on(side: Side, other: Side, vm_uuid: str) -> None:
    assert len(side.qemus(vm_uuid)) == 1, "the VM's QEMU runs once on its owner"
    assert other.qemus(vm_uuid) == [], "no QEMU of the VM is left on the other host"
    assert qemu_count(vm_uuid) == 1


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
