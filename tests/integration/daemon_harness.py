"""A vmkit daemon started by a test: its own VMKIT_HOME, a unix socket in /tmp, a TLS port on
127.0.0.1 (or another address), a token; killed or stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from vmkit.client.remote import RemoteHost, connect


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def cli(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "VMKIT_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "vmkit.cli.main", *args], env=full,
                          text=True, capture_output=True, timeout=timeout, check=False)


class Daemon:
    def __init__(self, home: Path, *, listen: str | None = None, group: str | None = None,
                 prefix: tuple[str, ...] = ()):
        self.home = home
        self.socket = Path(f"{home}.sock")
        self.pidfile = Path(f"{home}.pid")
        self.log = Path(f"{home}.daemon.log")
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.group = group
        self.prefix = prefix  # e.g. ip netns exec NS: the daemon in a network namespace
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    @property
    def url(self) -> str:
        return f"https://{self.listen}"

    @property
    def server_cert(self) -> Path:
        return self.home / "daemon" / "server.crt"

    def start(self, env: dict[str, str] | None = None, timeout: float = 60) -> Daemon:
        """Start it and wait until it answers; on any failure the process is not left behind."""
        try:
            return self._start(env, timeout)
        except BaseException:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=30)
            raise

    def _start(self, env: dict[str, str] | None, timeout: float) -> Daemon:
        argv = [*self.prefix, sys.executable, "-m", "vmkit.cli.main", "daemon", "--socket",
                str(self.socket),
                "--pidfile", str(self.pidfile), "--listen", self.listen]
        if self.group:
            argv += ["--group", self.group]
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(argv, env={**os.environ, "VMKIT_HOME": str(self.home),
                                                   **(env or {})},
                                        stdout=out, stderr=out, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError, httpx.HTTPError), httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(self.socket)),
                    base_url="http://vmkit", timeout=2) as client:
                if client.get("/1.0").status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"daemon did not answer:\n{self.log.read_text()[-3000:]}")
        if not self.token:
            done = cli(self.home, "token", "create", f"tests-{uuid.uuid4().hex[:12]}")
            assert done.returncode == 0, done.stderr
            self.token = done.stdout.strip()
        return self

    def kill(self) -> None:
        """SIGKILL, like a crash of the daemon (its VMs keep running)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stacks(self) -> str:
        """Every thread's stack (the daemon dumps them on SIGUSR1) and the log's tail: what a
        test that found the daemon unresponsive reports."""
        if self.process is None or self.process.poll() is not None:
            return f"daemon not running; log tail:\n{self.log.read_text(errors='replace')[-4000:]}"
        self.process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        return self.log.read_text(errors="replace")[-12000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def local(self) -> RemoteHost:
        return connect(f"unix://{self.socket}")

    def remote(self, token: str | None = None) -> RemoteHost:
        return connect(self.url, token=token if token is not None else self.token,
                       server_cert=self.server_cert)

    def http(self, *, token: str | None = None) -> httpx.Client:
        """A raw HTTPS client (pinned certificate), with or without a token."""
        import ssl

        context = ssl.create_default_context(cafile=str(self.server_cert))
        context.check_hostname = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=context, headers=headers, timeout=30)

    def unix_http(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://vmkit", timeout=60)


@contextlib.contextmanager
def running_daemon(home: Path, **kwargs: Any) -> Iterator[Daemon]:
    daemon = Daemon(home, **kwargs)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        for path in (daemon.socket, daemon.pidfile):
            path.unlink(missing_ok=True)


class Events:
    """A websocket listener on /1.0/events collecting events in a thread."""

    def __init__(self, daemon: Daemon, query: str = ""):
        import threading

        from websockets.sync.client import unix_connect

        self.events: list[dict[str, Any]] = []
        self._connection = contextlib.ExitStack()  # websockets 17.1: connect() as a context
        self.ws = self._connection.enter_context(
            unix_connect(str(daemon.socket), f"ws://vmkit/1.0/events{query}"))
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with contextlib.suppress(Exception):
            for message in self.ws:
                self.events.append(json.loads(message))

    def actions(self, vm: str) -> list[str]:
        return [e["metadata"]["action"] for e in list(self.events)
                if e["type"] == "lifecycle" and e["metadata"].get("vm") == vm]

    def wait_for(self, vm: str, action: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event["type"] == "lifecycle" and event["metadata"].get("vm") == vm and \
                        event["metadata"]["action"] == action:
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no {action} event for {vm} within {timeout}s: "
                             f"{self.actions(vm)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()


def qemu_count(vm_uuid: str) -> int:
    """QEMU processes whose command line names this VM's uuid."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and \
                any(vm_uuid.encode() in part for part in cmdline):
            count += 1
    return count
