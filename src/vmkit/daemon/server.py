"""Running the daemon: uvicorn on a unix socket (0660, a chosen group) and, when asked, on TCP
with TLS only; `--detach` with a pid file for hosts without systemd.

Each connection's peer is identified once, when it is made (SO_PEERCRED on the unix socket,
the client certificate on TLS), by a thin subclass of uvicorn's HTTP protocol that puts a
`Peer` into the connection's ASGI state; a unix peer that is not allowed is disconnected before
a byte is read."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import grp
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from vmkit.daemon import auth
from vmkit.daemon.api import build_app
from vmkit.daemon.service import Service, paths_for
from vmkit.errors import HostError, InvalidValue
from vmkit.host import Host

DEFAULT_SOCKET = Path("/run/vmkit/vmkit.sock")
DEFAULT_PIDFILE = Path("/run/vmkit/vmkitd.pid")
DETACH_TIMEOUT = 30.0
MAX_CONNECTIONS = 1000  # beyond this uvicorn answers 503; descriptors stay for the VMs' pidfds
TLS_HANDSHAKE_TIMEOUT = 10.0
STOP_GRACE = 10.0  # seconds running operations get at SIGTERM before the process ends


@dataclass(frozen=True)
class DaemonOptions:
    socket: Path = DEFAULT_SOCKET
    group: str | None = None
    listen: str | None = None  # IP:PORT for TLS
    pidfile: Path | None = None
    log: Path | None = None


def _protocol_class(group: int | None) -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools is in uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class Identified(Base):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                peer = auth.unix_peer(sock, group)
                if not peer.allowed:
                    transport.close()
                    return
            else:
                ssl_object = transport.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
                address = transport.get_extra_info("peername")
                peer = auth.Peer("tls", address=f"{address[0]}:{address[1]}" if address else "?",
                                 cert_fingerprint=auth.fingerprint_der(der) if der else None)
            self.app_state = {**self.app_state, "peer": peer}

    return Identified


class _Quiet(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises SIGTERM after serving, which would
    end the process before the daemon's cleanup): serve() installs the daemon's handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        try:
            return grp.getgrgid(int(name)).gr_gid
        except (KeyError, ValueError):
            raise InvalidValue(f"unknown group {name!r}",
                               hint="create it (groupadd vmkit) or pick an existing one") \
                from None


def _bind_unix(path: Path, gid: int | None) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket() or path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a daemon that was killed
        else:
            raise HostError(f"a daemon already listens on {path}",
                            hint="stop it (vmkit daemon --stop) or pick another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chown(path, -1, gid if gid is not None else os.getegid())
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def _tls_context(service: Service, host: str) -> ssl.SSLContext:
    paths = service.paths
    auth.ensure_server_cert(paths.server_cert, paths.server_key, [host])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(paths.server_cert, paths.server_key)
    context.load_verify_locations(service.client_ca.ensure())
    context.verify_mode = ssl.CERT_OPTIONAL  # a token is the other way in
    # no TLS 1.3 session tickets: they arrive after the handshake, unasked, and a client that
    # waits for the socket to be readable and then reads on a blocking socket (websockets'
    # threaded client does) wakes for a ticket and blocks in the read while its request is
    # still being written -- the handshake then never completes. Resumption is not needed.
    context.num_tickets = 0
    return context


def serve(host: Host, options: DaemonOptions, *, ready: Any = None) -> None:
    """Run the daemon in this process until SIGTERM/SIGINT."""
    gid = _group_id(options.group)
    _raise_file_limit()
    # kill -USR1 PID writes every thread's stack to the daemon's log: what a stuck daemon waits on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    service = Service(host, paths_for(host), group=gid)
    service.acquire()
    unix_sock = _bind_unix(options.socket, gid)
    listeners = [f"unix:{options.socket}"]
    tcp_sock = None
    context = None
    if options.listen:
        address, port = auth.check_listen(options.listen)
        context = _tls_context(service, address)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        tcp_sock = socket.socket(family, socket.SOCK_STREAM)
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp_sock.bind((address, port))
        except OSError as exc:
            raise HostError(f"cannot listen on {options.listen}: {exc.strerror}") from exc
        tcp_sock.listen(128)
        listeners.append(f"https://{options.listen}")
    service.listeners[:] = listeners  # shared with the parts that read it
    if options.pidfile:
        options.pidfile.parent.mkdir(parents=True, exist_ok=True)
        options.pidfile.write_text(f"{os.getpid()}\n")
    try:
        service.start()
    except BaseException:
        _remove(options)
        raise
    # operations run in worker threads; a short GIL switch interval keeps the event loop (every
    # read) from waiting behind them for whole 5 ms slices
    sys.setswitchinterval(0.0005)
    app = build_app(service)
    protocol = _protocol_class(gid)
    common: dict[str, Any] = {"lifespan": "off", "http": protocol, "ws": "websockets-sansio",
                              "log_level": "warning", "access_log": False,
                              "timeout_graceful_shutdown": 3, "proxy_headers": False,
                              "limit_concurrency": MAX_CONNECTIONS}
    main = _Quiet(uvicorn.Config(app, **common))
    servers = [main.serve(sockets=[unix_sock])]
    secure = None
    if tcp_sock is not None:
        secure = _Quiet(uvicorn.Config(app, **common))
        servers.append(_serve_tls(secure, tcp_sock, context))
    service.publish_info(str(options.socket), options.listen,
                         str(options.pidfile) if options.pidfile else None)
    print(f"vmkit daemon {os.getpid()} serving {host.layout.root} on "
          f"{', '.join(listeners)}", file=sys.stderr, flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: setattr(main, "should_exit", True))

        async def follow() -> None:
            while not main.should_exit:
                await asyncio.sleep(0.2)
            if secure is not None:
                secure.should_exit = True
        await asyncio.gather(*servers, follow())

    try:
        asyncio.run(run())
    finally:
        service.stop(grace=STOP_GRACE)
        _remove(options)
    # an operation still running after the grace is cut here, as a kill would cut it: its
    # journal finishes or undoes it at the next start (waiting for it would keep the
    # daemon's lock and its socket's name from the next daemon)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _remove(options: DaemonOptions) -> None:
    with contextlib.suppress(FileNotFoundError):
        options.socket.unlink()
    if options.pidfile:
        with contextlib.suppress(FileNotFoundError):
            options.pidfile.unlink()


def _raise_file_limit() -> None:
    """Descriptors: one pidfd per live VM plus every connection; the soft limit goes up to
    the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve_tls(server: uvicorn.Server, sock: socket.socket,
                     context: ssl.SSLContext | None) -> None:
    """uvicorn's Config takes TLS as files; the context built here (client CA, optional client
    certificate) is handed to the listening server directly."""
    config = server.config
    config.load()
    server.lifespan = config.lifespan_class(config)
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        return config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=server.server_state, app_state={})

    listener = await loop.create_server(factory, sock=sock, ssl=context, backlog=128,
                                        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
    server.servers = [listener]
    server.started = True
    await server.main_loop()
    listener.close()
    await server.shutdown(sockets=None)


def detach(argv: list[str], options: DaemonOptions) -> int:
    """Start the daemon in the background (own session, output to its log); wait until its
    socket answers. Returns its pid."""
    pidfile = options.pidfile or DEFAULT_PIDFILE
    log = options.log or Path("/var/log/vmkitd.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    env = dict(os.environ)
    import subprocess

    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, env=env, close_fds=True)
    os.close(out)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise HostError(f"the daemon exited at once (status {child.returncode})",
                            hint=f"see its log: {log}", detail=_tail(log))
        if options.socket.is_socket() and pidfile.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(OSError):
                probe.connect(str(options.socket))
                probe.close()
                return child.pid
            probe.close()
        time.sleep(0.05)
    child.terminate()
    raise HostError(f"the daemon did not answer within {DETACH_TIMEOUT:.0f}s",
                    hint=f"see its log: {log}")


def stop_daemon(pidfile: Path, timeout: float = 30.0) -> int | None:
    """SIGTERM the daemon of `pidfile` and wait for it to go; its VMs keep running."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None  # no pid file, or its process is gone
    if (b"vmkit.cli.main" not in cmdline and not any(a.endswith(b"vmkit") for a in cmdline)) \
            or b"daemon" not in cmdline:
        raise HostError(f"pid {pid} in {pidfile} is not a vmkit daemon: not signalled",
                        hint=f"remove the stale pid file {pidfile}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        time.sleep(0.05)
    raise HostError(f"the daemon (pid {pid}) did not stop within {timeout:.0f}s")


def _tail(path: Path, size: int = 2000) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode(errors="replace")
    return ""
