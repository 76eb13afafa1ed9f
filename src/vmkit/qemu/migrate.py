"""QEMU's side of a move between hosts: TLS-PSK credentials, the memory stream on a socket
vmkit hands over, the disk copied by a mirror job into the destination's NBD export.

Both QEMUs speak TLS with a pre-shared key made for this one migration (QEMU's tls-creds-psk:
a folder with `keys.psk`, `USER:HEXKEY`), so neither the memory stream nor the NBD export can be
read or joined by a third party: a connection without the key fails its handshake. The memory
socket is connected by the daemons (a one-time token first, see daemon/migrations.py) and given
to QEMU with `getfd`; the NBD export listens on a socket vmkit bound and handed over."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkit.errors import OperationTimeout, QemuError, VmkitError, os_errors
from vmkit.isolation.jail import RunAs
from vmkit.model.migration import (
    MigrationOptions,
    Progress,
    memory_progress,
    qemu_downtime_limit,
)
from vmkit.qemu.blockops import top_node
from vmkit.qemu.process import CLEAN_ENV
from vmkit.qemu.qmp import QmpConnection

PSK_USER = "vmkit"
TLS_ID = "vmkit-migration-tls"
NBD_NODE = "vmkit-migration-nbd"
MIRROR_JOB = "vmkit-migration-mirror"
EXPORT = "vmkit-disk"
_UNTHROTTLED = 1 << 40
# GnuTLS's default order, with a pre-shared key (bound to SHA-256), skips AES-256-GCM-SHA384 and
# lands on ChaCha20-Poly1305: 1.3 s for 200 MB of guest memory here, against 0.5 s with
# AES-128-GCM, which the CPU's AES instructions run (measured with bare QEMU, /tmp/probe in
# the session note). Both sides name the same order; ChaCha20 stays as the fallback for a
# CPU without AES instructions on either side.
TLS_PRIORITY = "NORMAL:-CIPHER-ALL:+AES-128-GCM:+CHACHA20-POLY1305"
# A host with a system-wide GnuTLS policy (crypto-policies on Fedora/RHEL, an /etc/gnutls/config
# an admin wrote) gets no priority from vmkit: QEMU's own default applies, which distributions
# with such policies build to follow them (Fedora: "@QEMU,SYSTEM"). GnuTLS applies a policy's
# global overrides to any priority string; vmkit's order would still replace the policy's
# preferences with its own. The probe asks the libgnutls.so.30 the dynamic loader finds (the
# one a distribution's QEMU links), in QEMU's clean environment, whether "@SYSTEM" is defined.
# Debian ships no policy: there "@SYSTEM" is an error (GNUTLS_E_INVALID_REQUEST).
_POLICY_PROBE = """
import ctypes
lib = ctypes.CDLL("libgnutls.so.30")
lib.gnutls_priority_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                     ctypes.POINTER(ctypes.c_char_p)]
cache, where = ctypes.c_void_p(), ctypes.c_char_p()
print("yes" if lib.gnutls_priority_init(ctypes.byref(cache), b"@SYSTEM",
                                        ctypes.byref(where)) == 0 else "no")
"""


# RFC 7919's ffdhe2048 group (PKCS#3: its prime, generator 2), as `openssl genpkey -genparam
# -algorithm DH -pkeyopt group:ffdhe2048` prints it. A tls-creds-psk server without a
# dh-params.pem in its folder generates 2048-bit parameters itself: 0.3-1.6 s of the
# destination's start on every move (measured, object-add alone), against 1 ms with this file.
# Public, standard numbers: nothing secret, nothing to make per move.
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
CREDENTIAL_FILES = ("keys.psk", "dh-params.pem")


def write_psk(folder: Path, key_hex: str, owner: RunAs | None) -> None:
    """`folder/keys.psk` (and the DH parameters a server endpoint reads) readable by root and
    the VM's group only; the folder is root's (so the VM's uid cannot swap the files) and
    made fresh (never an existing path followed)."""
    if not key_hex or any(c not in "0123456789abcdef" for c in key_hex) or len(key_hex) < 32:
        raise ValueError("a migration key is at least 16 bytes of lower-case hex")
    with os_errors(f"writing this move's TLS credentials in {folder}"):
        remove_psk(folder)
        _write_credentials(folder, key_hex, owner)


def _write_credentials(folder: Path, key_hex: str, owner: RunAs | None) -> None:
    os.mkdir(folder, 0o700)
    for name, text in zip(CREDENTIAL_FILES, (f"{PSK_USER}:{key_hex}\n", DH_PARAMS),
                          strict=True):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600)
        try:
            os.write(fd, text.encode())
            if owner is not None:
                os.fchown(fd, 0, owner.gid)
                os.fchmod(fd, 0o640)
        finally:
            os.close(fd)
    if owner is not None:
        os.chown(folder, 0, owner.gid, follow_symlinks=False)
        os.chmod(folder, 0o750)


def remove_psk(folder: Path) -> None:
    """The credentials folder and whatever is in it (root's own: a file another vmkit
    version left there too), never a link followed; nothing there is fine."""
    if folder.is_symlink():
        folder.unlink()
        return
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_psk(Path(entry.path))
        else:
            os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        folder.rmdir()


_POLICY: dict[tuple[tuple[str, str], ...], bool] = {}  # environment -> a policy is defined


def system_tls_policy(env: dict[str, str] | None = None) -> bool:
    """Whether GnuTLS has a system-wide policy ("@SYSTEM") in QEMU's environment; asked once
    per process (a Python child, 13-30 ms). False when it cannot be asked (vmkit's order)."""
    key = tuple(sorted((env or CLEAN_ENV).items()))
    if key not in _POLICY:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _POLICY_PROBE],
                                  env=dict(key), capture_output=True, text=True, timeout=10,
                                  check=False)
            _POLICY[key] = done.stdout.strip() == "yes"
        except (OSError, subprocess.SubprocessError):
            _POLICY[key] = False
    return _POLICY[key]


def tls_priority(system_policy: bool) -> str | None:
    """vmkit's cipher order, or None (QEMU's default) on a host with a system policy."""
    return None if system_policy else TLS_PRIORITY


def add_tls(qmp: QmpConnection, psk_dir: Path, *, server: bool) -> None:
    arguments: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": TLS_ID,
                                 "endpoint": "server" if server else "client",
                                 "dir": str(psk_dir)}
    priority = tls_priority(system_tls_policy())
    if priority is not None:
        arguments["priority"] = priority
    if not server:
        arguments["username"] = PSK_USER
    qmp.execute("object-add", arguments)


def tune_source(qmp: QmpConnection, options: MigrationOptions) -> None:
    """Bandwidth, downtime target, TLS, and the convergence aids the user asked for."""
    capabilities = [{"capability": "auto-converge", "state": options.auto_converge},
                    {"capability": "postcopy-ram", "state": options.postcopy},
                    {"capability": "pause-before-switchover", "state": True},
                    # MIGRATION events: vmkit hears of the switch-over when it happens
                    {"capability": "events", "state": True}]
    qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
    qmp.execute("migrate-set-parameters", {
        "tls-creds": TLS_ID, "tls-hostname": "",
        "max-bandwidth": options.bandwidth or _UNTHROTTLED,
        "downtime-limit": qemu_downtime_limit(options.downtime_ms)})


def reset(qmp: QmpConnection) -> None:
    """Leave QEMU as a move found it: no TLS, default capabilities and limits (a later
    memory snapshot or instant clone migrates to a file or a socketpair without them)."""
    with contextlib.suppress(QemuError):
        qmp.execute("migrate-set-parameters", {"tls-creds": "", "downtime-limit": 300,
                                               "max-bandwidth": _UNTHROTTLED})
    with contextlib.suppress(QemuError):
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": False} for name in (
                "auto-converge", "postcopy-ram", "pause-before-switchover",
                "late-block-activate", "events")]})
    with contextlib.suppress(QemuError):
        qmp.execute("object-del", {"id": TLS_ID})


def tune_destination(qmp: QmpConnection, *, postcopy: bool) -> None:
    """TLS, and disks activated only at `cont` (the NBD export writes them until then)."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "late-block-activate", "state": True},
        {"capability": "postcopy-ram", "state": postcopy},
        {"capability": "events", "state": True}]})
    qmp.execute("migrate-set-parameters", {"tls-creds": TLS_ID})


def serve_disk(qmp: QmpConnection, listener: socket.socket) -> None:
    """Export the incoming VM's disk (its top layer) over NBD on `listener`, TLS only."""
    qmp.send_fd(listener.fileno(), "vmkit-nbd-listen")
    qmp.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "vmkit-nbd-listen"}},
                                     "tls-creds": TLS_ID, "max-connections": 4})
    qmp.execute("nbd-server-add", {"device": top_node(qmp), "name": EXPORT, "writable": True})


def stop_serving(qmp: QmpConnection) -> None:
    with contextlib.suppress(QemuError):
        qmp.execute("nbd-server-stop")


def start_mirror(qmp: QmpConnection, host: str, port: int) -> None:
    """Copy the source's top layer into the destination's export; writes keep being copied
    once it is in step (`ready`). The layers below already exist on the destination."""
    qmp.execute("blockdev-add", {
        "driver": "nbd", "node-name": NBD_NODE, "export": EXPORT, "tls-creds": TLS_ID,
        "server": {"type": "inet", "host": host, "port": str(port)}})
    qmp.execute("blockdev-mirror", {"job-id": MIRROR_JOB, "device": top_node(qmp),
                                    "target": NBD_NODE, "sync": "top",
                                    "auto-finalize": True, "auto-dismiss": False})


def mirror_state(qmp: QmpConnection) -> dict[str, Any] | None:
    """The mirror job as `query-jobs` shows it (kept after it ends, so its error is known):
    offset/len/ready added in the shape of query-block-jobs; None once dismissed."""
    for job in qmp.execute("query-jobs"):
        if job.get("id") == MIRROR_JOB:
            if job.get("status") == "concluded":
                with contextlib.suppress(QemuError):
                    qmp.execute("job-dismiss", {"id": MIRROR_JOB})
                raise QemuError("the disk copy to the destination stopped: "
                                f"{job.get('error', 'it ended early')}")
            return {**job, "offset": job.get("current-progress", 0),
                    "len": job.get("total-progress", 0), "ready": job.get("status") == "ready"}
    return None


def wait_mirror_ready(qmp: QmpConnection, timeout: float,
                      report: Callable[[Progress], None]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = mirror_state(qmp)
        if job is None:
            raise QemuError("the disk copy to the destination stopped (its connection failed)")
        report(Progress(stage="disk", transferred=int(job["offset"]),
                        remaining=max(0, int(job["len"]) - int(job["offset"])),
                        total=int(job["len"]), status=str(job["status"])))
        if job.get("ready"):
            return
        if time.monotonic() >= deadline:
            raise OperationTimeout(f"the disk copy was not in step within {timeout:g}s")
        time.sleep(0.05)


def complete_mirror(qmp: QmpConnection, timeout: float) -> None:
    """End the mirror once the source is paused: what is in flight lands, the source keeps
    its own disk (a ready mirror's cancel completes without switching over)."""
    mirror_state(qmp)  # raises when it already ended on an error
    qmp.execute("block-job-cancel", {"device": MIRROR_JOB})
    if not _mirror_ended(qmp, timeout):
        raise OperationTimeout(f"the disk copy did not finish within {timeout:g}s")
    drop_nbd(qmp)


def _mirror_ended(qmp: QmpConnection, timeout: float) -> bool:
    """Wait for the cancelled mirror job to conclude, then dismiss it; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        job = next((j for j in qmp.execute("query-jobs") if j.get("id") == MIRROR_JOB), None)
        if job is None or job.get("status") == "concluded":
            with contextlib.suppress(QemuError):
                qmp.execute("job-dismiss", {"id": MIRROR_JOB})
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def abandon_mirror(qmp: QmpConnection) -> None:
    """Stop copying (a failed or cancelled move): forced, the destination is thrown away."""
    with contextlib.suppress(QemuError):
        qmp.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
    _mirror_ended(qmp, 10)
    drop_nbd(qmp)


def drop_nbd(qmp: QmpConnection) -> None:
    with contextlib.suppress(QemuError):
        qmp.execute("blockdev-del", {"node-name": NBD_NODE})


def send_memory(qmp: QmpConnection, sock: socket.socket) -> None:
    qmp.send_fd(sock.fileno(), "vmkit-migration-out")
    qmp.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "fd", "str": "vmkit-migration-out"}}]})


def receive_memory(qmp: QmpConnection, sock: socket.socket) -> None:
    qmp.send_fd(sock.fileno(), "vmkit-migration-in")
    qmp.execute("migrate-incoming", {"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "fd", "str": "vmkit-migration-in"}}]})


def watch_memory(qmp: QmpConnection, *, timeout: float, stall: float, postcopy: bool,
                 report: Callable[[Progress], None],
                 at_switchover: Callable[[], None] | None) -> dict[str, Any]:
    """Poll the outgoing migration to its end. A stream that sends nothing for `stall`
    seconds (a cut link) is cancelled; with post-copy allowed, a pre-copy that has not
    converged after three passes over memory switches to post-copy, and this returns once it
    has (the source is paused for good; the rest follows on demand: `wait_outgoing`)."""
    deadline = time.monotonic() + timeout
    last_bytes, last_move = -1, time.monotonic()
    switched = continued = False
    switchover_ms: float | None = None
    # the switch-over's pause starts when QEMU stops the vCPUs and lasts until vmkit has
    # answered: QEMU's MIGRATION event wakes the loop at once; between events it polls
    # for progress (a query costs ~0.3 ms)
    poll = 0.02
    with qmp.listening("MIGRATION") as events:
        while True:
            info: dict[str, Any] = qmp.execute("query-migrate")
            status = info.get("status", "")
            if status == "completed" or (switched and status == "postcopy-active"):
                if switchover_ms is not None:
                    info["vmkit-switchover-ms"] = round(switchover_ms, 1)
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"the memory transfer {status}: {info.get('error-desc', status)}")
            if status == "pre-switchover":  # vCPUs stopped, disks still active
                # once only: migrate-continue just wakes QEMU's migration thread, so the next
                # query may still say pre-switchover (the mirror is gone by then)
                if not continued:
                    began = time.monotonic()
                    if at_switchover is not None:
                        at_switchover()
                    qmp.execute("migrate-continue", {"state": "pre-switchover"})
                    continued = True
                    last_move = time.monotonic()
                    switchover_ms = (last_move - began) * 1000
                elif time.monotonic() - last_move > stall:
                    cancel(qmp)
                    raise OperationTimeout(f"the switch-over did not go on within {stall:g}s")
                qmp.next_event(events, 0.005)
                continue
            reading = memory_progress(info)
            report(reading)
            now = time.monotonic()
            if reading.transferred != last_bytes:
                last_bytes, last_move = reading.transferred, now
            elif now - last_move > stall:
                cancel(qmp)
                raise OperationTimeout(f"the memory transfer sent nothing for {stall:g}s "
                                       "(the link to the destination is cut?)")
            if now >= deadline:
                cancel(qmp)
                raise OperationTimeout(f"the memory transfer did not finish within {timeout:g}s")
            ram = info.get("ram") or {}
            if (postcopy and not switched and status == "active"
                    and int(ram.get("dirty-sync-count", 0)) >= 3):
                qmp.execute("migrate-start-postcopy")
                switched = True
            qmp.next_event(events, poll)


def cancel(qmp: QmpConnection) -> None:
    with contextlib.suppress(VmkitError):
        qmp.execute("migrate_cancel")


def incoming_status(qmp: QmpConnection) -> str:
    return str(qmp.execute("query-migrate").get("status", ""))


def wait_outgoing(qmp: QmpConnection, timeout: float) -> dict[str, Any]:
    """Block until a post-copy has sent its last page (QEMU: completed)."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled", "postcopy-paused"):
            raise QemuError(f"the post-copy transfer stopped: {info.get('status')}")
        if time.monotonic() >= deadline:
            raise OperationTimeout(f"the post-copy did not finish within {timeout:g}s")
        time.sleep(0.02)


def wait_incoming(qmp: QmpConnection, timeout: float, *, postcopy: bool = False) -> None:
    """Block until the destination has the whole memory state (QEMU: completed), or, with
    post-copy, until the source has switched over (the rest arrives on demand)."""
    deadline = time.monotonic() + timeout
    with qmp.listening("MIGRATION") as events:  # the guest's pause lasts until this is seen
        while True:
            status = incoming_status(qmp)
            if status == "completed" or (postcopy and status == "postcopy-active"):
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"the incoming memory transfer {status}")
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"the incoming memory did not arrive within "
                                       f"{timeout:g}s")
            qmp.next_event(events, 0.05)


def announce(qmp: QmpConnection) -> None:
    """Tell the network where the guest's MACs are now (gratuitous ARP/RARP)."""
    with contextlib.suppress(QemuError):
        qmp.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
