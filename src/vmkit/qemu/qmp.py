"""Synchronous QMP over the VM's UNIX socket, built on the `qemu.qmp` library.

Each `QmpConnection` owns a private event loop so the engine stays synchronous; every connect and
command has a timeout. Errors keep what was sent and what came back. `qemu.qmp` and asyncio
are imported by the first connection (~25 ms of every command that never talks to a QEMU:
create, clone or delete of a stopped VM, list).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmkit.errors import OperationTimeout, QemuError, VmkitError
from vmkit.qemu import peer
from vmkit.storage.layout import file_lock

if TYPE_CHECKING:
    from qemu.qmp import EventListener

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


MONITOR_LOCK = ".monitor.lock"  # in the VM folder (root's), beside run/


class QmpConnection:
    """One session on a VM's monitor. A session owns the monitor alone: it holds the VM's
    monitor lock (flock, waited for up to `timeout`, then LockTimeout naming the holder), so
    readers queue behind a snapshot or a migration instead of interleaving with it."""

    def __init__(self, socket_path: Path, *, timeout: float = 5.0, name: str = "vmkit"):
        self._path = socket_path
        self._timeout = timeout
        import asyncio

        from qemu.qmp import QMPClient

        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._owner: contextlib.ExitStack | None = None

    def __enter__(self) -> QmpConnection:
        owner = contextlib.ExitStack()
        try:
            owner.enter_context(file_lock(self._path.parent.parent / MONITOR_LOCK,
                                          timeout=self._timeout,
                                          what=f"the monitor of {self._path.parent.parent.name}"))
            self._owner = owner
            try:
                sock = peer.connect_unix(self._path, self._timeout)
            except OSError as exc:
                raise QemuError(f"cannot connect to QMP on {self._path}: {exc}") from exc
            self._run(self._client.connect(sock), what="connect")
        except BaseException:
            self._loop.close()
            owner.close()
            self._owner = None
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        import asyncio

        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2.0))
        except (TimeoutError, OSError, EOFError):
            pass  # teardown must not mask the error that brought us here
        finally:
            self._loop.close()
            if self._owner is not None:
                self._owner.close()
                self._owner = None

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        from qemu.qmp import ExecuteError

        coro = self._client.execute(command, arguments)
        try:
            return self._run(coro, what=command, timeout=timeout)
        except ExecuteError as exc:
            raise QemuError(f"QMP command {command} failed: {exc.error_class}: {exc}",
                            detail=f"sent: {command} {arguments or {}}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS), known to it as `name` (getfd)."""
        try:
            self._client.send_fd_scm(fd)
        except (OSError, ValueError) as exc:
            raise QemuError(f"passing a descriptor to QEMU on {self._path} failed: {exc}") \
                from exc
        self.execute("getfd", {"fdname": name})

    def add_fd(self, fd: int) -> int:
        """Hand QEMU an open file (SCM_RIGHTS) into a new fd set; returns the set's id, which
        QEMU opens as /dev/fdset/ID (remove it with `remove-fd` when done)."""
        try:
            self._client.send_fd_scm(fd)
        except (OSError, ValueError) as exc:
            raise QemuError(f"passing a descriptor to QEMU on {self._path} failed: {exc}") \
                from exc
        added: dict[str, int] = self.execute("add-fd")
        return int(added["fdset-id"])

    @contextlib.contextmanager
    def listening(self, *names: str) -> Iterator[EventListener]:
        """Keep QEMU's events of these names while in the block, so a wait for one
        (`next_event`) cannot miss an event that came between two waits."""
        from qemu.qmp import EventListener

        listener = EventListener(names)
        self._client.register_listener(listener)
        try:
            yield listener
        finally:
            self._client.remove_listener(listener)

    def next_event(self, listener: EventListener, timeout: float) -> dict[str, Any] | None:
        """The next event `listener` kept, waiting up to `timeout` seconds; None when none
        came (the session's other traffic goes on meanwhile)."""
        import asyncio

        try:
            message = self._loop.run_until_complete(asyncio.wait_for(listener.get(), timeout))
        except TimeoutError:
            return None
        return dict(message)

    def _run(self, coro: Any, *, what: str, timeout: float | None = None) -> Any:
        import asyncio

        from qemu.qmp import ExecuteError

        limit = timeout if timeout is not None else self._timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
        except TimeoutError:
            raise OperationTimeout(f"QMP {what} on {self._path} took longer than {limit:g}s") \
                from None
        except (OSError, EOFError) as exc:
            raise QemuError(f"QMP {what} on {self._path} failed: {exc}") from exc
        except ExecuteError:
            raise
        except Exception as exc:  # qemu.qmp raises its own ConnectError/StateError family
            if type(exc).__module__.startswith("qemu.qmp"):
                raise QemuError(f"QMP {what} on {self._path} failed: {exc}") from exc
            raise


def wait_qmp_ready(socket_path: Path, timeout: float, *,
                   alive: Callable[[], bool] | None = None) -> str:
    """Wait until QEMU answers QMP on `socket_path`; returns its run status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status: str = qmp_execute(socket_path, "query-status", timeout=2.0)["status"]
            return status
        except VmkitError:
            if time.monotonic() >= deadline:
                raise
            if alive is not None and not alive():
                raise QemuError(f"QEMU exited before it answered QMP on {socket_path}") from None
            time.sleep(0.01)


def qmp_execute(socket_path: Path, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = 5.0) -> Any:
    """One command on a fresh connection."""
    with QmpConnection(socket_path, timeout=timeout) as conn:
        return conn.execute(command, arguments)
