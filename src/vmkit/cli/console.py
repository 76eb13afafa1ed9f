"""Interactive serial console: the terminal in raw mode, bytes both ways, Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.errors import InvalidValue, QemuError
from vmkit.qemu import peer

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

DETACH_BYTE = b"\x1d"  # Ctrl-]
DETACH_KEY = "Ctrl-]"


@contextlib.contextmanager
def _raw_terminal(stdin: int) -> Iterator[None]:
    """The terminal in raw mode (when it is one) for the console's life, restored after."""
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _typed(stdin: int, send: Callable[[bytes], object]) -> bool:
    """Forward what was typed; False at end of input or at the detach key (what came before
    it is still sent)."""
    data = os.read(stdin, 1024)
    if not data:
        return False
    if DETACH_BYTE in data:
        before = data.split(DETACH_BYTE, 1)[0]
        if before:
            send(before)
        return False
    send(data)
    return True


def attach(socket_path: Path) -> None:
    try:
        sock = peer.connect_unix(socket_path, timeout=5.0)
        sock.settimeout(None)
    except OSError as exc:
        raise QemuError(f"cannot connect to the serial console {socket_path}: {exc}") from exc
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    try:
        with _raw_terminal(stdin):
            sock.sendall(b"\r")  # make the guest print a prompt
            while True:
                ready, _, _ = select.select([stdin, sock], [], [])
                if sock in ready:
                    data = sock.recv(4096)
                    if not data:
                        break
                    os.write(stdout, data)
                if stdin in ready and not _typed(stdin, sock.sendall):
                    break
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def attach_remote(url: str, headers: dict[str, str], context: object | None) -> None:
    """The same console through a daemon's websocket (`/1.0/vms/NAME/console`)."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect, unix_connect

    # entered as a context manager: websockets 17.1 deprecated using connect() directly
    connection = contextlib.ExitStack()
    try:
        if url.startswith("unix://"):
            path, _, rest = url[len("unix://"):].partition("|")
            ws = connection.enter_context(
                unix_connect(path, f"ws://vmkit{rest}", additional_headers=headers))
        else:
            ws = connection.enter_context(connect(
                url, additional_headers=headers, ssl=context))  # type: ignore[arg-type]
    except (OSError, ConnectionClosed, InvalidHandshake) as exc:  # refused: 401, 404, ...
        raise QemuError(f"cannot connect to the console at {url}: {exc}") from exc
    with connection:
        _pump_console(ws, ConnectionClosed)


def _pump_console(ws: ClientConnection, closed: type[Exception]) -> None:
    """Terminal to websocket and back, until either side ends."""
    import threading

    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    done = threading.Event()

    def pump() -> None:
        with contextlib.suppress(closed, OSError):
            for message in ws:
                if isinstance(message, str):
                    if message.startswith("{") and '"error"' in message:
                        os.write(stdout, (message + "\r\n").encode())
                        break
                    message = message.encode()
                os.write(stdout, message)
        done.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        with _raw_terminal(stdin):
            ws.send(b"\r")
            while not done.is_set():
                ready, _, _ = select.select([stdin], [], [], 0.2)
                if ready and not _typed(stdin, ws.send):
                    break
    except closed:
        pass
    finally:
        with contextlib.suppress(Exception):
            ws.close()


def tcp_peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of a loopback TCP connection (from /proc/net/tcp{,6})."""
    port = conn.getpeername()[1]
    local_port = conn.getsockname()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            here, there = fields[1].rsplit(":", 1), fields[2].rsplit(":", 1)
            if int(here[1], 16) == port and int(there[1], 16) == local_port:
                return int(fields[7])
    return None


def forward_vnc(socket_path: Path, port: int, *, ready: Callable[[int], object] | None = None,
                should_stop: Callable[[], bool] | None = None) -> None:
    """Forward 127.0.0.1:`port` (0: any free one) to the VM's VNC unix socket until
    interrupted: a VNC viewer that only speaks TCP can then attach. Loopback only, and only
    for the user running this command (another local user's connection is closed unanswered:
    VNC itself has no password here); the VM's socket is peer-checked."""
    import threading

    try:
        listener = socket.create_server(("127.0.0.1", port))
    except OSError as exc:
        raise InvalidValue(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                           hint="pick another --port (0: any free one)") from None
    listener.settimeout(0.5)
    if ready is not None:
        ready(listener.getsockname()[1])

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve(client: socket.socket) -> None:
        with client:
            if tcp_peer_uid(client) != os.getuid():
                return  # someone else on this host
            try:
                vnc = peer.connect_unix(socket_path, 10.0)
            except (OSError, QemuError):
                return
            vnc.settimeout(None)
            with vnc:
                back = threading.Thread(target=pump, args=(vnc, client), daemon=True)
                back.start()
                pump(client, vnc)
                back.join(timeout=5)

    with listener:
        while should_stop is None or not should_stop():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(client,), daemon=True).start()
