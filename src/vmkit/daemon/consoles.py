"""Several viewers on one serial console.

QEMU's socket chardev serves one client at a time: a second `connect` waits unanswered until
the first leaves. The daemon therefore holds one connection per console and shares it: what
the guest writes goes to every viewer, what any viewer types goes to the guest. The
connection closes when its last viewer leaves, so `vmkit console` without the daemon can have
the socket again. A viewer that falls behind by more than VIEWER_BACKLOG chunks is dropped
(its socket closed), never allowed to make the guest's output wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

VIEWER_BACKLOG = 256  # chunks of up to 64 KiB queued for one viewer
CONNECT_TIMEOUT = 5.0


@dataclass(eq=False)
class Viewer:
    console: SharedConsole
    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(VIEWER_BACKLOG))

    async def send(self, data: bytes) -> None:
        await self.console.write(data)


@dataclass(eq=False)
class SharedConsole:
    path: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    viewers: set[Viewer] = field(default_factory=set)
    pump: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        """The guest's output to every viewer; the end of the line ends every viewer."""
        try:
            while data := await self.reader.read(65536):
                for viewer in list(self.viewers):
                    try:
                        viewer.queue.put_nowait(data)
                    except asyncio.QueueFull:  # too slow: dropped, the others go on
                        self.viewers.discard(viewer)
                        _end(viewer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for viewer in list(self.viewers):
                _end(viewer)
            self.viewers.clear()
            self.writer.close()


def _end(viewer: Viewer) -> None:
    """Tell a viewer its console is gone (room is made if its queue is full)."""
    with contextlib.suppress(asyncio.QueueEmpty):
        if viewer.queue.full():
            viewer.queue.get_nowait()
    viewer.queue.put_nowait(None)


class ConsoleHub:
    """The shared consoles of one daemon, by socket path (a restarted VM's new QEMU makes a
    new connection: the old one ended with the old QEMU)."""

    def __init__(self) -> None:
        self._consoles: dict[str, SharedConsole] = {}
        self._lock = asyncio.Lock()

    async def join(self, path: Path) -> Viewer:
        from vmkit.qemu.peer import connect_unix  # SO_PEERCRED-checked like every connection

        key = str(path)
        async with self._lock:
            console = self._consoles.get(key)
            if console is None or console.pump is None or console.pump.done():
                sock = await asyncio.to_thread(connect_unix, path, CONNECT_TIMEOUT)
                sock.setblocking(False)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
                console = SharedConsole(key, reader, writer)
                console.pump = asyncio.create_task(console.run())
                self._consoles[key] = console
            viewer = Viewer(console)
            console.viewers.add(viewer)
            return viewer

    async def leave(self, viewer: Viewer) -> None:
        async with self._lock:
            console = viewer.console
            console.viewers.discard(viewer)
            if not console.viewers and console.pump is not None:
                console.pump.cancel()  # the last one out closes the line
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await console.pump
                if self._consoles.get(console.path) is console:
                    del self._consoles[console.path]
