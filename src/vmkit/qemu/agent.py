"""Client for qemu-guest-agent on the VM's virtio-serial socket.

The agent protocol is JSON lines without a greeting (so not QMP). Every session starts with
`guest-sync-delimited` and a random id; replies to earlier, abandoned requests that may still sit
in the channel are skipped until the matching id comes back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vmkit.errors import AgentError, AgentRefused, OperationTimeout, QemuError
from vmkit.model.views import ExecResult
from vmkit.qemu import peer

_DELIMITER = b"\xff"
# Everything the guest says is untrusted: one reply may hold a 1 MiB chunk as base64 (1.4 MB)
# or a command's captured output; nothing larger is buffered.
MAX_FRAME = 16 << 20


class AgentConnection:
    def __init__(self, socket_path: Path, *, timeout: float = 5.0):
        self._path = socket_path
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> None:
        self.close()
        try:
            sock = peer.connect_unix(self._path, self._timeout)
        except (OSError, QemuError) as exc:
            raise AgentError(f"cannot connect to the guest agent socket {self._path}: {exc}") \
                from exc
        self._sock = sock
        self._buffer = b""

    def sync(self, timeout: float) -> bool:
        """Send guest-sync-delimited; True when the agent echoed our id within `timeout`."""
        if self._sock is None:
            self.connect()
        token = random.randrange(1, 2**31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self._read_message(deadline)
            except OperationTimeout:
                return False
            if reply.get("return") == token:
                return True
        return False

    def call(self, command: str, arguments: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        limit = timeout if timeout is not None else self._timeout
        deadline = time.monotonic() + limit  # the sync of a new session included
        if self._sock is None:
            self.connect()
            if not self.sync(limit):
                raise AgentError(f"the guest agent did not answer on {self._path} "
                                 f"within {limit:g}s", hint="is the VM running and booted?")
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        reply = self._read_message(deadline)
        if "error" in reply:
            error = reply["error"]
            said = error.get("desc", error) if isinstance(error, dict) else error
            raise AgentRefused(f"guest agent command {command} failed: {str(said)[:300]}",
                               detail=f"sent: {json.dumps(message)}")
        return reply.get("return")

    def _send(self, message: dict[str, Any]) -> None:
        assert self._sock is not None
        try:
            # A 0xFF before the sync request makes the agent drop any partial input first.
            prefix = _DELIMITER if message["execute"] == "guest-sync-delimited" else b""
            self._sock.sendall(prefix + json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise AgentError(f"guest agent socket {self._path} write failed: {exc}") from exc

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """Next JSON object from the agent; replies end with a newline, a sync reply starts 0xFF."""
        assert self._sock is not None
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                line = line.lstrip(_DELIMITER).strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a fragment cut by an earlier, abandoned session
                if isinstance(obj, dict):
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeout(f"the guest agent on {self._path} did not reply in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise OperationTimeout(
                    f"the guest agent on {self._path} did not reply in time") from None
            except OSError as exc:
                raise AgentError(f"guest agent socket {self._path} read failed: {exc}") from exc
            if not chunk:
                raise AgentError(f"the guest agent socket {self._path} closed")
            self._buffer += chunk
            if len(self._buffer) > MAX_FRAME:
                self.close()  # a guest that floods the channel is cut off, not buffered
                raise AgentError(f"the guest agent sent a message over {MAX_FRAME >> 20} MiB "
                                 "without an end: refused")


def wait_agent_ready(socket_path: Path, timeout: float, *, alive: Any = None) -> float:
    """Block until the agent answers a sync; returns seconds waited. `alive()` aborts early."""
    start = time.monotonic()
    deadline = start + timeout
    conn = AgentConnection(socket_path, timeout=1.0)
    try:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise AgentError("the VM stopped before its guest agent answered")
            try:
                if conn._sock is None:
                    conn.connect()
                if conn.sync(min(0.5, max(0.01, deadline - time.monotonic()))):
                    return time.monotonic() - start
            except AgentError:
                conn.close()
                time.sleep(0.05)
        raise OperationTimeout(f"the guest agent did not answer within {timeout:g}s",
                               hint="look at the serial log: vmkit logs NAME")
    finally:
        conn.close()


# guest-exec-status polling: short commands (a reseed, cat) end within 10-600 ms, and doubling
# from 10 ms overshot their end by up to 150 ms (a restore waits for its reseed): every 5 ms at
# first, then up to every 25 ms for EXEC_POLL_FAST s, then slower for long commands.
EXEC_POLL_FIRST = 0.005
EXEC_POLL_FAST = 2.0
EXEC_POLL_MAX = (0.025, 0.2)


def guest_exec(socket_path: Path, argv: list[str], *, timeout: float,
               stdin: bytes | None = None) -> ExecResult:
    """Run argv in the guest, wait for it, and return its exit code and output. AgentRefused:
    the agent could not start it (no such program, not executable)."""
    if not argv:
        raise AgentError("nothing to run: the command is empty")
    deadline = time.monotonic() + timeout

    def left() -> float:
        """Every call waits only for what is left of `timeout` (and at most 10 s)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationTimeout(f"command {argv[0]!r} in the guest did not finish "
                                   f"within {timeout:g}s")
        return min(remaining, 10.0)

    with AgentConnection(socket_path, timeout=left()) as conn:
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        started = conn.call("guest-exec", arguments, timeout=left())  # AgentRefused: not run
        pid = _field(started, "pid", int, "guest-exec")
        delay = EXEC_POLL_FIRST
        while True:
            try:
                status = conn.call("guest-exec-status", {"pid": pid}, timeout=left())
            except AgentRefused as exc:  # it started: never to be taken for "not started"
                raise AgentError(exc.message, detail=exc.detail) from exc
            if not isinstance(status, dict):
                raise AgentError(f"the guest agent's guest-exec-status is not an object: "
                                 f"{str(status)[:80]!r}")
            if status.get("exited"):
                break
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"command {argv[0]!r} in the guest did not finish "
                                       f"within {timeout:g}s (guest pid {pid})")
            time.sleep(delay)
            fast = time.monotonic() < deadline - timeout + EXEC_POLL_FAST
            delay = min(EXEC_POLL_MAX[0] if fast else EXEC_POLL_MAX[1], delay * 1.5)
    exit_code, signal = status.get("exitcode"), status.get("signal")
    if not isinstance(exit_code, int | None) or not isinstance(signal, int | None):
        raise AgentError("the guest agent's guest-exec-status has a non-integer exit code "
                         "or signal")
    return ExecResult(exit_code=exit_code, signal=signal,
                      stdout=_output(status, "out-data"), stderr=_output(status, "err-data"))


def _field(reply: Any, key: str, kind: type, command: str) -> Any:
    """`reply[key]` of the type expected; anything else from the guest is an AgentError."""
    if not isinstance(reply, dict) or not isinstance(reply.get(key), kind):
        raise AgentError(f"the guest agent's {command} reply has no {kind.__name__} {key!r}: "
                         f"{str(reply)[:80]!r}")
    return reply[key]


def _output(status: dict[str, Any], key: str) -> str:
    """A captured stream of guest-exec-status (base64; the guest's bytes, untrusted)."""
    return _b64(status.get(key, ""), key).decode(errors="replace")


def _b64(data: Any, what: str) -> bytes:
    """Base64 from the guest (untrusted): anything else is an AgentError."""
    try:
        if not isinstance(data, str):
            raise ValueError(what)
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise AgentError(f"the guest agent's {what} is not base64") from exc


COPY_CHUNK = 1 << 20  # bytes per guest-file-read/write (1.4 MB of base64 per message)


def copy_to_guest(socket_path: Path, source: Path, dest: str, *, timeout: float,
                  progress: Any = None) -> int:
    """Stream a host file into the guest in chunks; returns bytes written."""
    written = 0
    with AgentConnection(socket_path, timeout=timeout) as conn, open(source, "rb") as handle, \
            _guest_file(conn, dest, "wb") as guest:
        while chunk := handle.read(COPY_CHUNK):
            conn.call("guest-file-write",
                      {"handle": guest, "buf-b64": base64.b64encode(chunk).decode()})
            written += len(chunk)
            if progress:
                progress(written)
    return written


def copy_from_guest(socket_path: Path, source: str, dest: BinaryIO, *, timeout: float,
                    max_bytes: int, progress: Any = None) -> int:
    """Stream a guest file into `dest` in chunks; returns bytes read. The guest decides how
    much it sends, so the total is bounded by `max_bytes` and the whole copy by `timeout`."""
    read = 0
    deadline = time.monotonic() + timeout
    with AgentConnection(socket_path, timeout=timeout) as conn, \
            _guest_file(conn, source, "rb") as guest:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeout(f"copying {source} out of the guest took longer than "
                                       f"{timeout:g}s")
            reply = conn.call("guest-file-read", {"handle": guest, "count": COPY_CHUNK},
                              timeout=remaining)
            if not isinstance(reply, dict):
                raise AgentError(f"the guest agent's guest-file-read reply is not a chunk: "
                                 f"{str(reply)[:80]!r}")
            data = _b64(reply.get("buf-b64", ""), "guest-file-read's buf-b64")
            if read + len(data) > max_bytes:
                raise AgentError(f"{source} in the guest is larger than the {max_bytes} bytes "
                                 "the host has room for: copy refused")
            dest.write(data)
            read += len(data)
            if progress:
                progress(read)
            if reply.get("eof") or not data:
                break
    return read


@contextlib.contextmanager
def _guest_file(conn: AgentConnection, path: str, mode: str) -> Iterator[int]:
    """A file handle in the guest, closed whatever happens."""
    handle: int = conn.call("guest-file-open", {"path": path, "mode": mode})
    try:
        yield handle
    finally:
        conn.call("guest-file-close", {"handle": handle})


def guest_facts(socket_path: Path, *, timeout: float = 10.0) -> dict[str, Any]:
    """OS, hostname and network addresses as the guest itself reports them."""
    facts: dict[str, Any] = {}
    with AgentConnection(socket_path, timeout=timeout) as conn:
        for key, command in (("os", "guest-get-osinfo"), ("hostname", "guest-get-host-name"),
                             ("interfaces", "guest-network-get-interfaces")):
            try:
                facts[key] = conn.call(command)
            except (AgentError, OperationTimeout) as exc:
                facts[key] = {"error": exc.message}
                break  # an agent that does not answer will not answer the next question
    if not any(isinstance(v, dict) and "error" in v for v in facts.values()):
        with contextlib.suppress(AgentError, OperationTimeout, ValueError, IndexError):
            uptime = guest_exec(socket_path, ["cat", "/proc/uptime"], timeout=timeout)
            facts["uptime"] = float(uptime.stdout.split()[0])
    hostname = facts.get("hostname")
    if isinstance(hostname, dict) and "host-name" in hostname:
        facts["hostname"] = hostname["host-name"]
    interfaces = facts.get("interfaces")
    if isinstance(interfaces, list):  # the guest's words: anything of another shape is left out
        facts["addresses"] = {
            nic["name"]: [a["ip-address"] for a in nic.get("ip-addresses") or []
                          if isinstance(a, dict) and isinstance(a.get("ip-address"), str)]
            for nic in interfaces
            if isinstance(nic, dict) and isinstance(nic.get("name"), str)
            and nic["name"] != "lo" and isinstance(nic.get("ip-addresses") or [], list)}
    return facts


# -- fresh entropy ---------------------------------------------------------------------------
# A restored snapshot or an instant clone resumes with its origin's RNG state. The kernel only
# reseeds its CRNG on a timer (every 60 s once up 2 minutes), and writing to /dev/urandom mixes
# bytes in without reseeding. So the host hands the guest RESEED_BYTES of its own entropy and
# the guest (as root) credits them (RNDADDENTROPY) and forces a reseed (RNDRESEEDCRNG):
# the tiny image with its static /usr/sbin/vmkit-reseed, any other Linux guest with python3.
RESEED_BYTES = 64
RESEED_HELPER = "/usr/sbin/vmkit-reseed"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RESEED_PYTHON = (
    "import fcntl,os,struct,sys\n"
    f"d=sys.stdin.buffer.read({RESEED_BYTES})\n"
    "if not d: sys.exit('vmkit-reseed: no bytes on stdin')\n"
    "f=os.open('/dev/urandom',os.O_WRONLY)\n"
    f"fcntl.ioctl(f,{RNDADDENTROPY:#x},struct.pack('ii',len(d)*8,len(d))+d)\n"
    f"fcntl.ioctl(f,{RNDRESEEDCRNG:#x})\n"
)
# $1 is the Python program: no quoting of it inside the shell script
RESEED_SCRIPT = (
    f'if [ -x {RESEED_HELPER} ]; then exec {RESEED_HELPER}; fi; '
    'command -v python3 >/dev/null 2>&1 && exec python3 -c "$1"; '
    'echo "vmkit-reseed: neither the helper nor python3 in this guest" >&2; exit 127'
)


RESEED_FIRST_FAILED = 3  # the exit code of reseed_argv(first=...) when `first` failed, and of
#                          the helper's --identity when the hostname or a MAC could not be set
IDENTITY_SET = "vmkit-identity: set"  # what the helper prints once --identity is done


def reseed_argv(first: str = "") -> list[str]:
    """What a guest without the helper runs (stdin: the host's bytes) to credit them and
    reseed its RNG; `first`, a shell script, runs before in the same process (one guest-exec
    less: each costs 0.1-0.25 s on a guest that has just resumed under TCG) and exits
    RESEED_FIRST_FAILED when it fails."""
    # a subshell: `first` may not touch "$1" (the Python reseed) nor read the host's bytes
    before = f"( {first}\n) </dev/null || exit {RESEED_FIRST_FAILED}\n" if first else ""
    return ["sh", "-c", before + RESEED_SCRIPT, "vmkit-reseed", RESEED_PYTHON]


def identity_script(hostname: str, macs: list[str]) -> str:
    """The shell version of the helper's --identity (for a guest without the helper): the
    hostname, each Ethernet NIC backed by a device (not a bridge, veth or tunnel the guest
    made) in ifindex order (the kernel's registration order, i.e. the NIC slots' PCI order;
    names sort enp10s0 before enp2s0) its MAC (each must be set; a MAC left over is a NIC the
    guest has not probed yet, which takes the clone's MAC from its device; anything else is
    best effort), and a new lease (busybox udhcpc: release + renew; systemd:
    networkctl). Shell built-ins wherever they do (hostname through /proc, udhcpc found
    through /proc)."""
    name = shlex.quote(hostname)
    return (
        f"echo {name} > /proc/sys/kernel/hostname || exit 1; "
        f"if [ -w /etc/hostname ]; then echo {name} > /etc/hostname; fi; "
        f"set -- {' '.join(shlex.quote(mac) for mac in macs)}; "
        "nics=$(for d in /sys/class/net/*; do [ -e $d/device ] || continue; "
        "read -r t 2>/dev/null < $d/type || continue; "
        "[ \"$t\" = 1 ] && read -r i < $d/ifindex && echo \"$i ${d##*/}\"; done "
        "| sort -n | cut -d' ' -f2); "
        "for n in $nics; do "
        "[ $# -gt 0 ] || break; ip link set dev \"$n\" address \"$1\" || exit 1; shift; "
        "if command -v networkctl >/dev/null; then networkctl renew \"$n\"; fi; done; "
        "for p in /proc/[0-9]*; do read -r c < $p/comm 2>/dev/null || continue; "
        "if [ \"$c\" = udhcpc ]; then kill -USR2 ${p#/proc/}; kill -USR1 ${p#/proc/}; fi; "
        "done; exit 0"
    )


def reseed(socket_path: Path, timeout: float, *,
           identity: tuple[str, list[str]] | None = None) -> ExecResult | None:
    """Give the guest RESEED_BYTES from the host's os.urandom, credited, and make its kernel
    reseed the CRNG now; with `identity` (hostname, MACs), an instant clone's new identity
    first, in the same guest process. The helper (the tiny image's) does it all in one
    program; a guest without it, or with a helper too old to know --identity (it says
    nothing of it), runs the shell and Python versions (two or three programs more). The
    guest's result (ok: reseeded; exit RESEED_FIRST_FAILED: the identity failed); None when
    the agent did not answer within `timeout`."""
    deadline = time.monotonic() + timeout
    helper = [RESEED_HELPER, *(("--identity", identity[0], *identity[1]) if identity else ())]
    try:
        done: ExecResult | None = None
        with contextlib.suppress(AgentRefused):  # no helper: the agent could not start it
            done = guest_exec(socket_path, helper, timeout=timeout,
                              stdin=os.urandom(RESEED_BYTES))
        if done is not None and (identity is None or not done.ok
                                 or IDENTITY_SET in done.stdout.splitlines()):
            return done
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        first = identity_script(*identity) if identity else ""
        return guest_exec(socket_path, reseed_argv(first), timeout=left,
                          stdin=os.urandom(RESEED_BYTES))  # fresh bytes: none credited twice
    except (AgentError, OperationTimeout):
        return None
