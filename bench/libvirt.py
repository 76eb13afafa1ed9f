"""vmkit next to libvirt, side by side in one run, on the same guest. Prints one JSON object per
figure and, as the last line, {"op": {"vmkit": s, "libvirt": s, "ratio": vmkit/libvirt}, ...}.

The peer is libvirt's QEMU driver driven the way its users drive it: `virsh` and `virt-clone`.
It is installed from Debian when missing (the libvirt of bookworm-backports when the QEMU comes
from there too, as libvirt 9.0 predates QEMU 10), and its daemons are started by hand (these
hosts have no systemd) and stopped again at the end: only the ones this run started.

The same guest under both: vmkit's `tiny` image (kernel, initramfs, command line, root disk),
256 MiB, 1 vCPU, TCG (libvirt: domain type 'qemu'), the machine type, CPU model, firmware
(SeaBIOS), vmgenid and devices of vmkit's default VM (virtio disk on a qcow2 overlay of the
image's disk, virtio-serial with the org.qemu.guest_agent.0 port, one user-mode virtio NIC on
198.18.0.0/24, balloon with free page reporting, virtio-rng, no HPET, a serial console). libvirt
gets byte-identical copies of the image's files in a folder of its own: its DAC driver chowns
every file a domain opens (kernel, initrd and the backing chain included), and vmkit's scratch
home only hard-links the real images. libvirt's "default" network (192.168.122.0/24) is never
started: its autostart link is removed before the daemon starts. The kernel is the same; libvirt
boots the image's bzImage as its users do (`<kernel>`), vmkit the same kernel through its PVH
entry (images/kernel.py: vmkit's own boot path), each with its own memory and TCG defaults.

Operations, each a median of --runs (5) runs, vmkit and libvirt alternated (the order swapped
every run), wall clock of the commands a user types, until the guest agent answers where the
guest runs (libvirt: `virsh qemu-agent-command DOM guest-ping` polled; vmkit: the command waits
for the agent itself, and one guest-ping on its agent socket is timed after it to be sure):

- create_start: `vmkit create --start --wait` / qemu-img overlay + `virsh define` + `virsh start`;
  create_start_debian12: the same with the debian-12 image (1 GiB, 1 vCPU; systemd, cloud-init
  from a NoCloud seed: vmkit's own per VM, libvirt's the files vmkit wrote for a probe VM,
  attached as vmkit attaches it, a read-only virtio disk), --debian-runs (3) runs, before the
  listing's 100 VMs exist;
- live_snapshot, restore: `vmkit snapshot create|restore` / libvirt's internal snapshot
  (`virsh snapshot-create-as DOM SNAP`, what users type; `virsh snapshot-revert`) of a running
  guest, memory included; live_snapshot_external, restore_external: libvirt's external one
  (--memspec, --diskspec), next to the same vmkit runs;
- full_clone: `vmkit clone` / `virt-clone --original --name --file` of a stopped VM;
- list_100: `vmkit list` / `virsh list --all` with --list-vms (100) defined VMs each, median of
  --list-runs (15).

Only one guest runs at a time: a guest waiting for its turn is paused. Everything made is
removed at the end, on failure and on Ctrl-C too (domains undefined with their snapshot
metadata, storage pools virt-clone added, files, the scratch VMKIT_HOME, the daemons started).
Run it alone on the machine (`flock /tmp/vmkit-vm.lock ...`): TCG guests on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import drop, median, scratch_host
from vmkit import Host
from vmkit.errors import VmkitError
from vmkit.images.seed import write_seed
from vmkit.model.cloudinit import seed_files
from vmkit.model.spec import with_hostname
from vmkit.qemu.agent import AgentConnection

URI = "qemu:///system"
PACKAGES = ("libvirt-daemon-system", "libvirt-clients", "virtinst")
BACKPORTED = frozenset({"libvirt-daemon-system", "libvirt-clients"})  # their deps follow
QEMU_PACKAGE = "qemu-system-x86"
NETWORK_AUTOSTART = Path("/etc/libvirt/qemu/networks/autostart/default.xml")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
LIBVIRT_IMAGES = Path("/var/lib/libvirt/images")
QEMU_LOGS = Path("/var/log/libvirt/qemu")
QEMU_DRIVER = "/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"
SEABIOS = "/usr/share/seabios/bios-256k.bin"
USER_NET = ("198.18.0.0", "24")  # vmkit's user-mode network (qemu/argv.py USER_NET)
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
VMKIT = (str(Path(sys.executable).with_name("vmkit")) if Path(sys.executable).with_name(
    "vmkit").exists() else None)

READY_TIMEOUT = 300.0  # a TCG boot (debian-12: 60-120 s here), a snapshot load: until the agent
COMMAND_TIMEOUT = 300.0  # any one command
DAEMON_TIMEOUT = 60.0  # libvirtd answering after its start, or gone after SIGTERM
INSTALL_TIMEOUT = 1200.0
POLL = 0.05  # seconds between readiness probes (vmkit's own wait sleeps as long)
SETTLE = 0.3  # after a paused guest is resumed, before its turn is timed


Op = Callable[[str], None]  # an operation on a snapshot name


class BenchError(Exception):
    """An expected failure: reported in one line, exit status 1."""


def run(argv: list[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except FileNotFoundError as exc:
        raise BenchError(f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)}: no end within {timeout:g} s") from exc
    if check and done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise BenchError(f"{' '.join(argv)} failed (exit {done.returncode}): {output}")
    return done


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def emit(figure: dict[str, Any]) -> None:
    print(json.dumps(figure), flush=True)


def side_by_side(op: str, vmkit_runs: list[float], libvirt_runs: list[float],
                 **extra: Any) -> dict[str, Any]:
    v, lv = median(vmkit_runs), median(libvirt_runs)
    figure = {"figure": op, "vmkit_s": round(v, 3), "libvirt_s": round(lv, 3),
              "ratio": round(v / lv, 2),
              "vmkit_runs_s": [round(t, 3) for t in vmkit_runs],
              "libvirt_runs_s": [round(t, 3) for t in libvirt_runs], **extra}
    emit(figure)
    return figure


# -- installing and starting libvirt ---------------------------------------------------------
def libvirt_installed() -> bool:
    return (all(shutil.which(tool) for tool in ("virsh", "virt-clone", "virtlogd"))
            and any(shutil.which(d) for d in ("libvirtd", "virtqemud"))
            and bool(glob.glob(QEMU_DRIVER)))


def backports_suite() -> str | None:
    """The backports suite to take libvirt from: when this host's QEMU is a backport and
    libvirt has a candidate there (a libvirt that knows that QEMU)."""
    qemu = run(["dpkg-query", "-W", "-f", "${Version}", QEMU_PACKAGE], check=False)
    if qemu.returncode != 0 or "bpo" not in qemu.stdout:
        return None
    policy = run(["apt-cache", "policy", "libvirt-daemon-system"], check=False).stdout
    suites = re.findall(r"\s(\S+-backports)/\S+\s", policy)
    return suites[0] if suites else None


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """Debian's maintainer scripts start the daemons they install (and with them libvirt's
    default network); a policy-rc.d that says 101 stops that, for the install only."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# bench/libvirt.py: no service starts during its install\n"
                           "exit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def install_attempts(suite: str | None) -> list[list[str]]:
    """apt-get install arguments, in order: libvirt from `suite` for its packages only, then
    with `-t suite` (which may move other packages, e.g. systemd, to that suite too), then the
    distribution's own."""
    attempts = [list(PACKAGES)]
    if suite:
        attempts[:0] = [[f"{p}/{suite}" if p in BACKPORTED else p for p in PACKAGES],
                        ["-t", suite, *PACKAGES]]
    return attempts


def install_libvirt() -> None:
    if os.geteuid() != 0:
        raise BenchError("libvirt (libvirtd, virsh, virt-clone) is not installed, and installing "
                         "it needs root: run as root, or install libvirt-daemon-system "
                         "libvirt-clients virtinst")
    if not shutil.which("apt-get"):
        raise BenchError("libvirt (libvirtd, virsh, virt-clone) is not installed and this host "
                         "has no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = None
    with no_service_starts():
        for refreshed in (False, True):
            if refreshed:  # stale or missing package lists: refresh them once
                run(["apt-get", "update"], timeout=INSTALL_TIMEOUT, env=env)
            for packages in install_attempts(backports_suite()):
                argv = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
                print(f"installing libvirt: {' '.join(argv)}", file=sys.stderr, flush=True)
                done = run(argv, timeout=INSTALL_TIMEOUT, check=False, env=env)
                if done.returncode == 0:
                    break
            if done is not None and done.returncode == 0:
                break
    if done is None or done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:] if done else ""
        raise BenchError(f"libvirt is not installed and could not be installed: {output}")
    if not libvirt_installed():
        raise BenchError(f"{' '.join(PACKAGES)} installed, but libvirtd, virsh, virt-clone or "
                         "libvirt's QEMU driver is still missing")


def virsh(*args: str, timeout: float = COMMAND_TIMEOUT,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-c", URI, *args], timeout=timeout, check=check)


def libvirt_answers() -> bool:
    return virsh("list", "--all", timeout=10, check=False).returncode == 0


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class Daemons:
    """libvirt's daemons, started by hand when none answers; stop() ends only those."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[str, int]] = []

    def ensure(self) -> None:
        # the default network (192.168.122.0/24) must never start on these hosts
        NETWORK_AUTOSTART.unlink(missing_ok=True)
        if libvirt_answers():
            return
        if os.geteuid() != 0:
            raise BenchError("libvirt's system daemon does not answer and starting it needs root")
        if run(["pgrep", "-x", "virtlogd"], check=False).returncode != 0:
            self._start("virtlogd")
        self._start("libvirtd" if shutil.which("libvirtd") else "virtqemud")
        deadline = time.monotonic() + DAEMON_TIMEOUT
        while not libvirt_answers():
            if time.monotonic() > deadline:
                raise BenchError(f"libvirt did not answer on {URI} within {DAEMON_TIMEOUT:g} s "
                                 "of its daemon's start")
            time.sleep(0.2)

    def _start(self, daemon: str) -> None:
        pidfile = self.folder / f"{daemon}.pid"
        run([daemon, "-d", "--pid-file", str(pidfile)], timeout=DAEMON_TIMEOUT)
        deadline = time.monotonic() + DAEMON_TIMEOUT
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise BenchError(f"{daemon} -d wrote no pid file within {DAEMON_TIMEOUT:g} s")
            time.sleep(0.05)
        self.started.append((daemon, int(pidfile.read_text().split()[0])))

    def stop(self) -> None:
        for daemon, pid in reversed(self.started):
            if not process_alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + DAEMON_TIMEOUT
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_alive(pid):
                print(f"{daemon} (pid {pid}) still runs {DAEMON_TIMEOUT:g} s after SIGTERM: "
                      "killed", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
        self.started.clear()


# -- the two sides -------------------------------------------------------------------------
class Guest:
    """What vmkit's default VM of `image` is (given its memory, 1 vCPU), read from a VM vmkit
    made: the libvirt domain copies it, its cloud-init seed included (the same files)."""

    def __init__(self, host: Host, image: str = "tiny", memory: str = "256M") -> None:
        probe = host.create("lvprobe", accel="tcg", image=image, memory=memory, cpus=1)
        try:
            config = probe.config
            spec, hw = config.spec, config.hardware
            self.image_name, self.memory = image, memory
            self.memory_mib = spec.memory >> 20
            self.cpus = spec.cpus
            self.seed = seed_files(config.cloud_init) if config.cloud_init else None
            self.machine = hw.machine
            self.cpu_model = hw.cpu_model
            self.vmgenid = hw.vmgenid
            self.cmdline = config.boot.cmdline
            self.disk_size = spec.disk
            if hw.firmware != "seabios" or config.nics:
                raise BenchError(f"vmkit's default VM changed (firmware {hw.firmware}, NICs "
                                 f"{len(config.nics)}): update bench/libvirt.py's domain to match")
            self.image = host.image(spec.image)
            self.image_dir = host.layout.image(self.image.name)
        finally:
            probe.delete(force=True)


class VmkitSide:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.env = {k: v for k, v in os.environ.items() if k not in ("VMKIT_REMOTE",)}
        self.env["VMKIT_HOME"] = str(host.layout.root)

    def cli(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [VMKIT] if VMKIT else [sys.executable, "-m", "vmkit.cli.main"]
        return run([*argv, *args], timeout=timeout, env=self.env)

    def ping(self, name: str) -> None:
        """One guest-ping on the VM's agent socket (the commands timed have waited for it)."""
        socket_path = self.host.get(name).folder.agent_socket
        try:
            with AgentConnection(socket_path, timeout=10) as agent:
                agent.call("guest-ping")
        except VmkitError as exc:
            raise BenchError(f"vmkit VM {name}: the guest agent does not answer: {exc}") from exc

    def create_started(self, name: str, guest: Guest) -> None:
        self.cli("create", name, "--image", guest.image_name, "--accel", "tcg", "--memory",
                 guest.memory, "--cpus", "1", "--start", "--wait", "--timeout",
                 str(READY_TIMEOUT), timeout=READY_TIMEOUT + 60)
        self.ping(name)

    def snapshot(self, name: str, snap: str) -> None:
        self.cli("snapshot", "create", name, snap)

    def restore(self, name: str, snap: str) -> None:
        self.cli("snapshot", "restore", name, snap, timeout=READY_TIMEOUT + 60)
        self.ping(name)

    def clone(self, name: str, target: str) -> None:
        self.cli("clone", name, target)

    def listing(self) -> str:
        return self.cli("list").stdout

    def pause(self, name: str) -> None:
        self.host.get(name).pause()

    def resume(self, name: str) -> None:
        self.host.get(name).resume()

    def kill(self, name: str) -> None:
        self.host.get(name).kill()

    def delete(self, name: str) -> None:
        self.host.get(name).delete(force=True)


class LibvirtSide:
    """Domains named PREFIX-*, their files in one folder under /var/lib/libvirt/images."""

    def __init__(self, guest: Guest, folder: Path, prefix: str) -> None:
        self.guest = guest
        self.folder = folder
        self.prefix = prefix
        self.domains: set[str] = set()
        self.pools_before: set[str] = set(self._pools())
        # byte-identical copies of the image (libvirt chowns what its guests open)
        for source, dest in ((guest.image.kernel, "vmlinuz"), (guest.image.initrd, "initrd.img"),
                             (guest.image.root_disk, "base.qcow2")):
            shutil.copyfile(guest.image_dir / source, folder / dest)
            (folder / dest).chmod(0o644)
        self.kernel, self.initrd = folder / "vmlinuz", folder / "initrd.img"
        self.base = folder / "base.qcow2"
        self.seed: Path | None = None
        if guest.seed is not None:  # what vmkit writes at a start, for this domain to read
            self.seed = folder / "seed.iso"
            write_seed(self.seed, guest.seed)
            self.seed.chmod(0o644)

    def dom(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def disk(self, name: str) -> Path:
        return self.folder / f"{self.dom(name)}.qcow2"

    def domain_xml(self, name: str) -> str:
        g = self.guest
        dom = ET.Element("domain", type="qemu")  # TCG
        ET.SubElement(dom, "name").text = self.dom(name)
        if g.vmgenid:
            ET.SubElement(dom, "genid")
        ET.SubElement(dom, "memory", unit="MiB").text = str(g.memory_mib)
        ET.SubElement(dom, "currentMemory", unit="MiB").text = str(g.memory_mib)
        ET.SubElement(dom, "vcpu", placement="static").text = str(g.cpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine=g.machine).text = "hvm"
        ET.SubElement(os_el, "loader", type="rom", readonly="yes").text = SEABIOS
        ET.SubElement(os_el, "kernel").text = str(self.kernel)
        ET.SubElement(os_el, "initrd").text = str(self.initrd)
        ET.SubElement(os_el, "cmdline").text = with_hostname(g.cmdline, self.dom(name))
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
        ET.SubElement(cpu, "model", fallback="forbid").text = g.cpu_model
        clock = ET.SubElement(dom, "clock", offset="utc")
        ET.SubElement(clock, "timer", name="hpet", present="no")
        for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                              ("on_crash", "destroy")):
            ET.SubElement(dom, event).text = action
        devices = ET.SubElement(dom, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", discard="unmap")
        ET.SubElement(disk, "source", file=str(self.disk(name)))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        if self.seed is not None:  # as vmkit attaches it: a read-only raw virtio disk
            seed = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(seed, "driver", name="qemu", type="raw")
            ET.SubElement(seed, "source", file=str(self.seed))
            ET.SubElement(seed, "target", dev="vdb", bus="virtio")
            ET.SubElement(seed, "readonly")
        ET.SubElement(devices, "controller", type="usb", model="none")
        ET.SubElement(devices, "controller", type="virtio-serial", index="0")
        nic = ET.SubElement(devices, "interface", type="user")  # never libvirt's networks
        ET.SubElement(nic, "ip", family="ipv4", address=USER_NET[0], prefix=USER_NET[1])
        ET.SubElement(nic, "model", type="virtio")
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "log", file=str(self.folder / f"{self.dom(name)}.serial.log"),
                      append="off")
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
        ET.SubElement(devices, "memballoon", model="virtio", freePageReporting="on")
        rng = ET.SubElement(devices, "rng", model="virtio")
        ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="none")
        return ET.tostring(dom, encoding="unicode")

    def write_xml(self, name: str) -> Path:
        path = self.folder / f"{self.dom(name)}.xml"
        path.write_text(self.domain_xml(name))
        return path

    def overlay(self, name: str) -> None:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base),
             str(self.disk(name)), str(self.guest.disk_size)])

    def define(self, name: str, xml: Path) -> None:
        self.domains.add(self.dom(name))
        virsh("define", str(xml))

    def wait_agent(self, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        ping = json.dumps({"execute": "guest-ping"})
        while True:
            answer = virsh("qemu-agent-command", self.dom(name), ping, "--timeout", "2",
                           timeout=30, check=False)
            if answer.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"libvirt domain {self.dom(name)}: the guest agent did not "
                                 f"answer within {READY_TIMEOUT:g} s: {answer.stderr.strip()}")
            time.sleep(POLL)

    def create_started(self, name: str, xml: Path) -> None:
        self.overlay(name)
        self.define(name, xml)
        virsh("start", self.dom(name))
        self.wait_agent(name)

    def snapshot(self, name: str, snap: str) -> None:
        virsh("snapshot-create-as", self.dom(name), snap)

    def snapshot_external(self, name: str, snap: str) -> None:
        memory = self.folder / f"{self.dom(name)}.{snap}.mem"
        overlay = self.folder / f"{self.dom(name)}.{snap}.qcow2"
        for path in (memory, overlay):
            if "," in str(path):
                raise BenchError(f"{path}: a comma cannot be passed in --memspec/--diskspec")
        virsh("snapshot-create-as", self.dom(name), snap,
              "--memspec", f"file={memory},snapshot=external",
              "--diskspec", f"vda,snapshot=external,file={overlay}")

    def restore(self, name: str, snap: str) -> None:
        virsh("snapshot-revert", self.dom(name), snap, timeout=READY_TIMEOUT)
        self.wait_agent(name)

    def clone(self, name: str, target: str) -> None:
        self.domains.add(self.dom(target))
        run(["virt-clone", "--connect", URI, "--original", self.dom(name), "--name",
             self.dom(target), "--file", str(self.disk(target))])

    def listing(self) -> str:
        return virsh("list", "--all").stdout

    def pause(self, name: str) -> None:
        virsh("suspend", self.dom(name))

    def resume(self, name: str) -> None:
        virsh("resume", self.dom(name))

    def kill(self, name: str) -> None:
        virsh("destroy", self.dom(name))

    def delete(self, name: str) -> None:
        self._undefine(self.dom(name))
        for path in self.folder.glob(f"{self.dom(name)}.*"):
            path.unlink(missing_ok=True)

    def _undefine(self, dom: str) -> None:
        virsh("destroy", dom, check=False)
        answer = virsh("undefine", dom, "--snapshots-metadata", "--checkpoints-metadata",
                       check=False)
        if answer.returncode == 0 or "failed to get domain" in answer.stderr:
            self.domains.discard(dom)
            for log in QEMU_LOGS.glob(f"{dom}.log*"):  # libvirt keeps a domain's QEMU log
                log.unlink(missing_ok=True)
        else:
            print(f"libvirt domain {dom}: undefine failed: {answer.stderr.strip()}",
                  file=sys.stderr)

    def _pools(self) -> list[str]:
        return virsh("pool-list", "--all", "--name").stdout.split()

    def cleanup(self) -> None:
        listed = virsh("list", "--all", "--name", check=False).stdout.split()
        for dom in sorted(self.domains | {d for d in listed if d.startswith(self.prefix + "-")}):
            self._undefine(dom)
        for pool in set(self._pools()) - self.pools_before:  # virt-clone adds one per folder
            virsh("pool-destroy", pool, check=False)
            virsh("pool-undefine", pool, check=False)


def disk_facts(path: Path) -> dict[str, Any]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return {"bytes": path.stat().st_size, "backing": info.get("backing-filename")}


# -- the operations --------------------------------------------------------------------------
def alternate(runs: int) -> Iterator[tuple[int, tuple[str, str]]]:
    for index in range(runs):
        yield index, (("vmkit", "libvirt") if index % 2 == 0 else ("libvirt", "vmkit"))


def create_start(vk: VmkitSide, lv: LibvirtSide, runs: int, *, stem: str = "cs",
                 op: str = "create_start") -> dict[str, Any]:
    """create+start until the agent answers; the last run's VMs stay, stopped: clone sources."""
    times: dict[str, list[float]] = {"vmkit": [], "libvirt": []}
    for index, order in alternate(runs):
        name = f"{stem}{index}"
        for side in order:
            if side == "vmkit":
                times[side].append(timed(partial(vk.create_started, name, lv.guest)))
                vk.kill(name)
                if index < runs - 1:
                    vk.delete(name)
            else:
                xml = lv.write_xml(name)
                times[side].append(timed(partial(lv.create_started, name, xml)))
                lv.kill(name)
                if index < runs - 1:
                    lv.delete(name)
    return side_by_side(op, times["vmkit"], times["libvirt"])


def create_start_debian(vk: VmkitSide, lv: LibvirtSide, runs: int) -> dict[str, Any]:
    """The same row for the debian-12 image (systemd, cloud-init from the seed, the agent)."""
    figure = create_start(vk, lv, runs, stem="deb", op="create_start_debian12")
    vk.delete(f"deb{runs - 1}")
    lv.delete(f"deb{runs - 1}")
    return figure


def snapshots(vk: VmkitSide, lv: LibvirtSide, runs: int) -> list[dict[str, Any]]:
    """Live snapshot with memory, and restore until the agent answers, of a running guest; the
    guests not being timed are paused."""
    vk.create_started("snap", lv.guest)
    vk.pause("snap")
    lv.create_started("snapi", lv.write_xml("snapi"))
    lv.pause("snapi")
    lv.create_started("snapx", lv.write_xml("snapx"))
    lv.pause("snapx")
    # party: (guest, take a snapshot, restore it, resume the guest, pause it)
    parties: dict[str, tuple[str, Op, Op, Op, Op]] = {
        "vmkit": ("snap", partial(vk.snapshot, "snap"), partial(vk.restore, "snap"),
                  vk.resume, vk.pause),
        "libvirt": ("snapi", partial(lv.snapshot, "snapi"), partial(lv.restore, "snapi"),
                    lv.resume, lv.pause),
        "libvirt_external": ("snapx", partial(lv.snapshot_external, "snapx"),
                             partial(lv.restore, "snapx"), lv.resume, lv.pause),
    }
    take: dict[str, list[float]] = {p: [] for p in parties}
    back: dict[str, list[float]] = {p: [] for p in parties}
    external_error = None
    for index in range(runs):
        order = list(parties) if index % 2 == 0 else list(reversed(parties))
        for party in order:
            if party == "libvirt_external" and external_error:
                continue
            guest, snap_op, restore_op, resume, pause = parties[party]
            snap = f"s{index}"
            resume(guest)
            time.sleep(SETTLE)
            try:
                took = timed(partial(snap_op, snap))
                back_s = timed(partial(restore_op, snap))
            except BenchError as exc:
                if party != "libvirt_external":
                    raise
                external_error = str(exc)  # reported; the internal snapshot is the main row
                emit({"figure": "libvirt_external_snapshot", "error": external_error})
                virsh("destroy", lv.dom("snapx"), check=False)  # out of the others' way
                continue
            take[party].append(took)
            back[party].append(back_s)
            pause(guest)
    for name in ("snap",):
        vk.delete(name)
    for name in ("snapi", "snapx"):
        lv.delete(name)
    figures = [side_by_side("live_snapshot", take["vmkit"], take["libvirt"],
                            libvirt_kind="internal (virsh snapshot-create-as DOM SNAP)"),
               side_by_side("restore", back["vmkit"], back["libvirt"],
                            libvirt_kind="internal (virsh snapshot-revert)")]
    if take["libvirt_external"]:
        figures += [
            side_by_side("live_snapshot_external", take["vmkit"], take["libvirt_external"],
                         libvirt_kind="external (--memspec file=...,snapshot=external "
                                      "--diskspec vda,snapshot=external)"),
            side_by_side("restore_external", back["vmkit"], back["libvirt_external"],
                         libvirt_kind="external (virsh snapshot-revert)")]
    return figures


def full_clone(vk: VmkitSide, lv: LibvirtSide, source: str, runs: int) -> dict[str, Any]:
    """A full (standalone) clone of a stopped VM: the create_start run's last VMs."""
    times: dict[str, list[float]] = {"vmkit": [], "libvirt": []}
    disks: dict[str, dict[str, Any]] = {}
    for index, order in alternate(runs):
        target = f"cl{index}"
        for side in order:
            if side == "vmkit":
                times[side].append(timed(partial(vk.clone, source, target)))
                vm = vk.host.get(target)
                disks.setdefault(side, disk_facts(vm.folder.path / vm.active_layer()))
                vk.delete(target)
            else:
                times[side].append(timed(partial(lv.clone, source, target)))
                disks.setdefault(side, disk_facts(lv.disk(target)))
                lv.delete(target)
    return side_by_side("full_clone", times["vmkit"], times["libvirt"], disks=disks)


def list_vms(vk: VmkitSide, lv: LibvirtSide, count: int, runs: int) -> dict[str, Any]:
    for index in range(count):
        vk.host.create(f"ls{index:03d}", accel="tcg")
        name = f"ls{index:03d}"
        lv.overlay(name)
        lv.define(name, lv.write_xml(name))
    listings = {"vmkit": vk.listing, "libvirt": lv.listing}
    for _ in range(2):  # warm: bytecode and page cache, libvirt's and vmkit's
        for side, listing in listings.items():
            rows = [line for line in listing().splitlines() if line.strip()]
            expected = count + (1 if side == "vmkit" else 2)  # header (and virsh's rule)
            if len(rows) != expected:
                raise BenchError(f"{side} list printed {len(rows)} lines, not {expected}")
    times: dict[str, list[float]] = {"vmkit": [], "libvirt": []}
    for _, order in alternate(runs):
        for side in order:
            times[side].append(timed(listings[side]))
    return side_by_side(f"list_{count}", times["vmkit"], times["libvirt"],
                        commands={"vmkit": "vmkit list", "libvirt": "virsh list --all"})


# -- the run ---------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = virsh("version").stdout
    library = re.search(r"Using library: libvirt (\S+)", out)
    qemu = re.search(r"Running hypervisor: QEMU (\S+)", out)
    return {"libvirt": library.group(1) if library else "?", "qemu": qemu.group(1) if qemu else "?"}


def check_peer() -> None:
    """libvirt takes this QEMU under TCG, and the network rule holds."""
    caps = virsh("domcapabilities", "--virttype", "qemu", "--arch", "x86_64", check=False)
    if caps.returncode != 0:
        raise BenchError(f"libvirt does not accept this QEMU for TCG guests: {caps.stderr.strip()}")
    active = virsh("net-list", "--name").stdout.split()
    if "default" in active:
        raise BenchError("libvirt's default network (192.168.122.0/24) is active: only "
                         "198.18.0.0/15 may be used here; stop it (virsh net-destroy default)")


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description="vmkit next to libvirt on the same guest")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")),
                        help="runs per operation (median; env BENCH_RUNS)")
    parser.add_argument("--list-runs", type=int, default=15)
    parser.add_argument("--list-vms", type=int, default=100)
    parser.add_argument("--debian-runs", type=int, default=3,
                        help="create+start runs of the debian-12 image (1 GiB; 0: skip)")
    args = parser.parse_args()
    if args.runs < 1 or args.list_runs < 1 or args.list_vms < 1:
        parser.error("--runs, --list-runs and --list-vms: at least 1")
    signal.signal(signal.SIGTERM, interrupted)

    host: Host | None = None
    daemons: Daemons | None = None
    lv: LibvirtSide | None = None
    lv_debian: LibvirtSide | None = None
    folder: Path | None = None
    results: dict[str, dict[str, float]] = {}
    try:
        if not libvirt_installed():
            install_libvirt()
        LIBVIRT_IMAGES.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="vmkb-libvirt-", dir=LIBVIRT_IMAGES))
        folder.chmod(0o711)  # QEMU runs as libvirt-qemu: it must reach its files in here
        daemons = Daemons(folder)
        daemons.ensure()
        check_peer()
        host = scratch_host(("tiny", "debian-12") if args.debian_runs > 0 else ("tiny",))
        guest = Guest(host)
        vk = VmkitSide(host)
        lv = LibvirtSide(guest, folder, f"vmkb-{secrets.token_hex(3)}")
        emit({"figure": "setup", **versions(), "machine": guest.machine,
              "cpu_model": guest.cpu_model, "memory_mib": guest.memory_mib, "cpus": guest.cpus,
              "cmdline": guest.cmdline, "runs": args.runs, "daemons_started":
              [d for d, _ in daemons.started]})

        figures = [create_start(vk, lv, args.runs)]
        figures += snapshots(vk, lv, args.runs)
        figures.append(full_clone(vk, lv, f"cs{args.runs - 1}", args.runs))
        vk.delete(f"cs{args.runs - 1}")
        lv.delete(f"cs{args.runs - 1}")
        # before the 100 VMs of the listing exist (a start's admission reads every VM)
        if args.debian_runs > 0:
            (folder / "debian-12").mkdir()
            (folder / "debian-12").chmod(0o711)  # as the folder above, whatever the umask
            debian = Guest(host, "debian-12", "1G")
            lv_debian = LibvirtSide(debian, folder / "debian-12", f"{lv.prefix}d")
            figures.append(create_start_debian(vk, lv_debian, args.debian_runs))
        figures.append(list_vms(vk, lv, args.list_vms, args.list_runs))
        for figure in figures:
            results[figure["figure"]] = {"vmkit": figure["vmkit_s"],
                                         "libvirt": figure["libvirt_s"],
                                         "ratio": figure["ratio"]}
    except BenchError as exc:
        print(f"bench/libvirt.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/libvirt.py: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup([side for side in (lv, lv_debian) if side is not None], host, daemons,
                folder)
    print(json.dumps(results))
    return 0


def cleanup(sides: list[LibvirtSide], host: Host | None, daemons: Daemons | None,
            folder: Path | None) -> None:
    steps: list[tuple[str, Callable[[], None]]] = []
    for side in sides:
        steps.append(("libvirt domains and pools", side.cleanup))
    if host is not None:
        steps.append(("the scratch VMKIT_HOME", lambda: drop(host)))
    if daemons is not None:
        steps.append(("libvirt's daemons", daemons.stop))
    if folder is not None:
        steps.append(("the libvirt folder", lambda: shutil.rmtree(folder, ignore_errors=True)))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # one failed step must not keep the others from running
            print(f"bench/libvirt.py: cleaning up {what} failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
