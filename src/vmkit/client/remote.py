"""`vmkit.connect(url, token=...)`: the SDK's Host/VM methods, carried out by a vmkit daemon.

    host = vmkit.connect("unix:///run/vmkit/vmkit.sock")           # local daemon
    host = vmkit.connect("https://198.18.0.1:8443", token="vmk_...", server_cert="srv.crt")
    vm = host.create("web", start=True, wait=True)
    print(vm.exec(["uname", "-a"]).stdout)

Same return types (VmStatus, SnapshotInfo, ...), same exceptions (NotFound, InvalidState, ...):
the daemon names the error class and this client raises it. Long operations are followed
until they end (with progress callbacks where the SDK has them). `connect_async` gives the same
object with awaitable methods.

Importing this module is cheap (the fast `vmkit list` path takes its timeouts from here; it
finds the local daemon's socket through vmkit.storage.home): httpx, ssl, asyncio and the
pydantic models are imported by the methods that use them."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from vmkit.errors import (
    AuthError,
    HostError,
    InvalidValue,
    OperationTimeout,
    error_class,
)
from vmkit.model.state import VmState

if TYPE_CHECKING:
    import httpx

    from vmkit.model.hardware import HostCapabilities
    from vmkit.model.network import Nic
    from vmkit.model.resources import Allocation, HostCapacity, Policy
    from vmkit.model.restart import RestartPolicy
    from vmkit.model.spec import ExtraDisk
    from vmkit.model.views import (
        DiskInfo,
        ExecResult,
        ImageInfo,
        NetworkInfo,
        SetResult,
        SnapshotInfo,
        Usage,
        VmStatus,
    )

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 120.0
OPERATION_TIMEOUT = 3600.0
POLL = 0.3


def _without_httpx_cli() -> None:
    """Before `import httpx`: without its command-line client. `import httpx` also imports
    `httpx._main` whenever click, rich and pygments are installed (they are: typer brings
    them), and that loads pygments' lexers, ~40 ms of every CLI command that goes through a
    daemon. vmkit never runs httpx's command line, and httpx falls back to a stub `main` of its
    own when that module cannot be imported."""
    import sys

    if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]
        try:
            import httpx  # noqa: F401
        finally:
            # only for this import: a program using the SDK may still run httpx's own CLI
            sys.modules.pop("httpx._main", None)


class Connection:
    """One HTTP client on a daemon's unix socket or TLS port; errors become vmkit errors."""

    def __init__(self, url: str, *, token: str | None = None, server_cert: str | Path | None = None,
                 client_cert: tuple[str | Path, str | Path] | None = None,
                 server_pem: str | None = None):
        _without_httpx_cli()
        import httpx

        self.url = url
        headers = {"User-Agent": "vmkit-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        if url.startswith("unix://"):
            path = url[len("unix://"):]
            # plain HTTP on a local socket: no TLS context (httpx's default loads the CA
            # bundle, ~65 ms of every command through the local daemon)
            transport = httpx.HTTPTransport(uds=path, verify=False)
            self.client = httpx.Client(transport=transport, base_url="http://vmkit",
                                       headers=headers, timeout=timeout)
            self.ws_base = None
        elif url.startswith("https://"):
            import ssl

            context = ssl.create_default_context(
                cafile=str(server_cert) if server_cert else None, cadata=server_pem)
            if server_cert or server_pem:  # pinned: the daemon's own certificate is the only
                # trust anchor
                context.check_hostname = False
            if client_cert:
                context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            self.client = httpx.Client(base_url=url, headers=headers, timeout=timeout,
                                       verify=context)
            self.ws_base = url.replace("https://", "wss://", 1)
            self.ssl_context = context
        else:
            raise InvalidValue(f"invalid daemon URL {url!r}",
                               hint="use unix:///run/vmkit/vmkit.sock or https://HOST:PORT")
        self.headers = headers

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx  # imported by __init__ already

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise HostError(f"cannot reach the vmkit daemon at {self.url}: {exc}",
                            hint="is it running? (vmkit daemon --detach)") from exc
        except httpx.TimeoutException as exc:
            raise timed_out(self.url, exc) from exc
        except httpx.TransportError as exc:
            raise HostError(f"talking to the vmkit daemon at {self.url} failed: {exc}") from exc
        if response.status_code >= 400:
            raise_for(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def metadata(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.json(method, path, **kwargs)["metadata"]

    def run(self, method: str, path: str, *, progress: Callable[[dict[str, Any]], None]
            | None = None, timeout: float = OPERATION_TIMEOUT, **kwargs: Any) -> Any:
        """Start an operation and follow it to its end; its result, or its error raised."""
        body = self.json(method, path, **kwargs)
        if body.get("type") != "async":
            return body.get("metadata")
        return self.follow(body["operation"], progress=progress, timeout=timeout)

    def follow(self, location: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
               timeout: float = OPERATION_TIMEOUT) -> Any:
        """Wait for the operation's end. Interrupted (Ctrl-C), a cancellable operation is
        cancelled on the daemon, as if it had run here."""
        try:
            return self._follow(location, progress=progress, timeout=timeout)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                if self.metadata("GET", location).get("may_cancel"):
                    self.request("DELETE", location)
            raise

    def _follow(self, location: str, *,
                progress: Callable[[dict[str, Any]], None] | None = None,
                timeout: float = OPERATION_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OperationTimeout(f"operation {location} did not end within {timeout:.0f}s")
            # the daemon answers at the operation's end, or after `wait` with its progress:
            # never a sleep past the end (a 0.3 s poll added 0.15 s to every command)
            wait = min(left, 60.0 if progress is None else POLL)
            op = self.metadata("GET", f"{location}/wait", params={"timeout": wait},
                               timeout=wait + 30)
            if progress is not None and op.get("progress"):
                progress(op["progress"])
            if op["status"] in ("success", "failure", "cancelled"):
                break
        if op["status"] != "success":
            error = op.get("error") or {}
            raise error_class(error.get("error_class", "VmkitError"))(
                error.get("error", f"operation {op['kind']} {op['status']}"),
                hint=error.get("hint"), detail=error.get("detail"))
        return op.get("result")

    def close(self) -> None:
        self.client.close()


def timed_out(url: str, exc: Exception) -> OperationTimeout:
    """The error of a request to the daemon at `url` that ran out of time."""
    return OperationTimeout(f"the vmkit daemon at {url} did not answer in time: {exc}")


def raise_for(response: httpx.Response) -> None:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    name = body.get("error_class") or ("AuthError" if response.status_code in (401, 403)
                                       else "VmkitError")
    message = body.get("error") or f"HTTP {response.status_code} from the vmkit daemon"
    cls = AuthError if response.status_code in (401, 403) else error_class(name)
    raise cls(message, hint=body.get("hint"), detail=body.get("detail"))


def _bytes_progress(callback: Callable[[int, int], None] | None
                    ) -> Callable[[dict[str, Any]], None] | None:
    if callback is None:
        return None
    return lambda p: callback(int(p.get("done") or 0), int(p.get("total") or 0))


def _stage_progress(callback: Callable[[str], None] | None
                    ) -> Callable[[dict[str, Any]], None] | None:
    if callback is None:
        return None
    return lambda p: callback(str(p.get("stage") or ""))


class RemoteHost:
    """The SDK's Host, through a daemon."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.url = connection.url

    def __repr__(self) -> str:
        return f"RemoteHost({self.url!r})"

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.connection.metadata("GET", "/1.0")
        return result

    # -- VMs ---------------------------------------------------------------------------------
    def statuses(self, *, include_broken: bool = False) -> list[VmStatus]:
        """Every VM's status in one request (what `vmkit list` shows)."""
        from vmkit.model.views import VmStatus

        statuses = [VmStatus.model_validate(s)
                    for s in self.connection.metadata("GET", "/1.0/vms")]
        return [s for s in statuses if include_broken or s.state is not VmState.BROKEN]

    def vms(self, *, include_broken: bool = False) -> list[RemoteVM]:
        return [RemoteVM(self, s.name) for s in self.statuses(include_broken=include_broken)]

    def get(self, name: str) -> RemoteVM:
        from vmkit.model.views import VmStatus

        status = VmStatus.model_validate(self.connection.metadata(
            "GET", f"/1.0/vms/{quote(name, safe='')}", params={"query": "false"}))
        return RemoteVM(self, status.name)

    def create(self, name: str, *, image: str = "tiny", cpus: int | str = 1,
               memory: int | str = "256M", disk: int | str | None = None,
               full_copy: bool = False,
               accel: str = "auto", start: bool = False, wait: bool = False,
               timeout: float = 180.0, max_cpus: int | str | None = None,
               max_memory: int | str | None = None, hostname: str | None = None,
               ssh_keys: Iterable[str | Path] = (), user_data: str | None = None,
               networks: Iterable[str] = (), ports: Iterable[str] = (), restart: str = "no",
               autostart: bool = False, cpu_model: str = "qemu64", firmware: str | None = None,
               boot: str | None = None, from_disk: str | Path | None = None,
               iso: str | Path | None = None, display: str | None = None,
               os_type: str = "linux", secure_boot: bool = False,
               shared: str | Path | None = None) -> RemoteVM:
        # paths are the daemon host's: a local CLI talking to its own daemon means the same file
        paths = {key: os.path.abspath(value) for key, value in
                 (("from_disk", from_disk), ("iso", iso), ("shared", shared))
                 if value is not None}
        body = {"name": name, "image": image, "cpus": cpus, "memory": memory, "disk": disk,
                "full_copy": full_copy, "accel": accel, "start": start, "wait": wait,
                "timeout": timeout, "max_cpus": max_cpus, "max_memory": max_memory,
                "hostname": hostname, "ssh_keys": _key_lines(ssh_keys),
                "user_data": user_data, "networks": list(networks), "ports": list(ports),
                "restart": restart, "autostart": autostart, "cpu_model": cpu_model,
                "firmware": firmware, "boot": boot, "display": display, "os_type": os_type,
                "secure_boot": secure_boot, **paths}
        self.connection.run("POST", "/1.0/vms", json=body)
        return self.get(name)

    def delete_all(self) -> None:
        for vm in self.vms(include_broken=True):
            vm.delete(force=True)

    def import_bundle(self, path: str | Path, *, name: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> RemoteVM:
        size = os.path.getsize(path)
        chunks = _upload(Path(path), None if progress is None else
                         (lambda sent, total: progress(sent // 2, total)))  # the first half
        params = {"name": name} if name else {}
        result = self.connection.run(
            "POST", "/1.0/vms/import", params=params, content=chunks(),
            headers={"Content-Type": "application/octet-stream"},
            progress=None if progress is None else
            (lambda p: progress(size // 2 + int(p.get("done") or 0) // 2, size)))
        return self.get(result["name"])

    def recover(self) -> list[str]:
        result: list[str] = self.connection.run("POST", "/1.0/host/recover")
        return result

    # -- networks, images, host ------------------------------------------------------------------
    def create_network(self, name: str, *, subnet: str | None = None, mode: str = "nat",
                       parent: str | None = None) -> NetworkInfo:
        from vmkit.model.views import NetworkInfo

        return NetworkInfo.model_validate(self.connection.run(
            "POST", "/1.0/networks",
            json={"name": name, "subnet": subnet, "mode": mode, "parent": parent}))

    def networks(self) -> list[NetworkInfo]:
        from vmkit.model.views import NetworkInfo

        return [NetworkInfo.model_validate(n)
                for n in self.connection.metadata("GET", "/1.0/networks")]

    def network(self, name: str) -> NetworkInfo:
        from vmkit.model.views import NetworkInfo

        return NetworkInfo.model_validate(
            self.connection.metadata("GET", f"/1.0/networks/{quote(name, safe='')}"))

    def delete_network(self, name: str) -> None:
        self.connection.run("DELETE", f"/1.0/networks/{quote(name, safe='')}")

    def reconcile_networks(self) -> None:
        self.connection.run("POST", "/1.0/networks/reconcile")

    def doctor(self) -> dict[str, Any]:
        result: dict[str, Any] = self.connection.metadata("GET", "/1.0/host/doctor")
        return result

    def capabilities(self) -> HostCapabilities:
        from vmkit.model.hardware import HostCapabilities

        return HostCapabilities.model_validate(
            self.connection.metadata("GET", "/1.0/host/capabilities"))

    def capacity(self) -> HostCapacity:
        from vmkit.model.resources import HostCapacity

        return HostCapacity.model_validate(self.capacity_report()["capacity"])

    def policy(self) -> Policy:
        from vmkit.model.resources import Policy

        return Policy.model_validate(self.capacity_report()["policy"])

    def set_policy(self, policy: Policy) -> None:
        self.connection.metadata("PUT", "/1.0/host/policy", json=policy.model_dump(mode="json"))

    def allocated(self) -> Allocation:
        from vmkit.model.resources import Allocation

        return Allocation.model_validate(self.capacity_report()["allocated"])

    def image(self, name: str) -> ImageInfo:
        from vmkit.model.views import ImageInfo

        return ImageInfo.model_validate(
            self.connection.metadata("GET", f"/1.0/images/{quote(name, safe='')}"))

    def capacity_report(self) -> dict[str, Any]:
        result: dict[str, Any] = self.connection.metadata("GET", "/1.0/host/capacity")
        return result

    def images(self, *, check_updates: bool = False) -> list[ImageInfo]:
        from vmkit.model.views import ImageInfo

        params = {"check_updates": "true"} if check_updates else {}
        return [ImageInfo.model_validate(i)
                for i in self.connection.metadata("GET", "/1.0/images", params=params)]

    def build_image(self, name: str, *, force: bool = False,
                    progress: Callable[[str], None] | None = None,
                    packages: list[str] | None = None) -> tuple[ImageInfo, bool]:
        from vmkit.model.views import ImageInfo

        result = self.connection.run("POST", "/1.0/images", json={
            "name": name, "force": force, "packages": packages or []},
            progress=_stage_progress(progress))
        return ImageInfo.model_validate(result["image"]), bool(result["built"])


class RemoteVM:
    """The SDK's VM, through a daemon. State is asked for on every call, never cached."""

    def __init__(self, host: RemoteHost, name: str):
        self.host = host
        self.name = name
        self._path = f"/1.0/vms/{quote(name, safe='')}"

    def __repr__(self) -> str:
        return f"RemoteVM({self.name!r} on {self.host.url})"

    @property
    def _c(self) -> Connection:
        return self.host.connection

    def status(self, *, query_qemu: bool = False) -> VmStatus:
        from vmkit.model.views import VmStatus

        return VmStatus.model_validate(self._c.metadata(
            "GET", self._path, params={"query": "true" if query_qemu else "false"}))

    @property
    def state(self) -> VmState:
        return self.status().state

    def usage(self) -> Usage | None:
        return self.status(query_qemu=True).usage

    def _state(self, action: str, **extra: Any) -> RemoteVM:
        self._c.run("PUT", f"{self._path}/state", json={"action": action, **extra})
        return self

    def start(self, *, wait: bool = False, timeout: float = 180.0) -> RemoteVM:
        return self._state("start", wait=wait, timeout=timeout)

    def wait_ready(self, *, timeout: float = 180.0) -> float:
        return float(self._c.run("POST", f"{self._path}/wait-ready", params={"timeout": timeout}))

    def stop(self, *, timeout: float = 30.0) -> RemoteVM:
        return self._state("stop", timeout=timeout)

    def kill(self) -> RemoteVM:
        return self._state("kill")

    def restart(self, *, wait: bool = False, timeout: float = 30.0) -> RemoteVM:
        return self._state("restart", wait=wait, timeout=timeout)

    def pause(self) -> RemoteVM:
        return self._state("pause")

    def resume(self) -> RemoteVM:
        return self._state("resume")

    def delete(self, *, force: bool = False) -> None:
        self._c.run("DELETE", self._path, params={"force": "true" if force else "false"})

    def exec(self, argv: list[str], *, timeout: float = 60.0,
             stdin: bytes | None = None) -> ExecResult:
        from vmkit.model.views import ExecResult

        body: dict[str, Any] = {"argv": argv, "timeout": timeout}
        if stdin is not None:
            body["stdin"] = base64.b64encode(stdin).decode()
        result = self._c.metadata("POST", f"{self._path}/exec", json=body, timeout=timeout + 30)
        return ExecResult(exit_code=result["exit_code"], stdout=result["stdout"],
                          stderr=result["stderr"], signal=result.get("signal"))

    def copy_in(self, source: str | Path, dest: str, *, timeout: float = 600.0) -> int:
        mode = os.stat(source).st_mode & 0o777
        with open(source, "rb") as handle:
            result = self._c.metadata("PUT", f"{self._path}/files",
                                      params={"path": dest, "mode": mode}, content=handle,
                                      timeout=timeout)
        return int(result["bytes"])

    def copy_out(self, source: str, dest: str | Path, *, timeout: float = 600.0) -> int:
        target = Path(dest)
        if target.is_dir():
            target = target / Path(source).name
        partial = target.with_name(f".{target.name}.vmkit-part")
        size = 0
        try:
            partial.unlink(missing_ok=True)
            # streamed to a new file of the caller's (never through a symlink), then renamed
            # over the destination, as a local copy does
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out, self._c.client.stream(
                    "GET", f"{self._path}/files", params={"path": source},
                    timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for(response)
                mode = int(response.headers.get("X-Vmkit-Mode", "0o600"), 8) & 0o755
                for block in response.iter_bytes(1 << 20):
                    out.write(block)
                    size += len(block)
                os.fchmod(out.fileno(), mode)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise HostError(f"copying {self.name}:{source} to {target} failed: "
                            f"{exc.strerror or exc}") from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    def console_socket(self) -> Path:
        raise InvalidValue(f"VM {self.name!r} is on a remote host: its console socket is not "
                           "a local file", hint="vmkit console attaches through the daemon")

    def screenshot(self, dest: str | Path) -> int:
        from vmkit.storage.layout import write_bytes_atomic  # not on `vmkit list`'s path

        data = self._c.request("GET", f"{self._path}/screenshot").content
        write_bytes_atomic(Path(dest), data)
        return len(data)

    def vnc_socket(self) -> Path:
        raise InvalidValue(f"VM {self.name!r} is on a remote host: its VNC socket is not a "
                           "local file", hint="use vmkit screenshot, or the web dashboard")

    def attach_media(self, path: str | Path) -> str:
        result = self._c.run("PUT", f"{self._path}/media", json={"path": os.path.abspath(path)})
        return str(result["media"])

    def eject_media(self) -> str | None:
        ejected = self._c.run("DELETE", f"{self._path}/media").get("ejected")
        return str(ejected) if ejected is not None else None

    def read_log(self, *, follow: bool = False, poll: float = 0.5,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[bytes]:
        sent = 0
        while True:  # only what is new is asked for
            data = self._c.request("GET", f"{self._path}/log", params={"offset": sent}).content
            if data:
                yield data
                sent += len(data)
            if not follow or (should_stop is not None and should_stop()):
                return
            time.sleep(poll)

    def ssh_argv(self, command: list[str] | None = None, *, batch: bool = False) -> list[str]:
        raise InvalidValue(f"vmkit ssh reaches VM {self.name!r} through a port forward on its "
                           "own host; it does not work through --remote",
                           hint="use vmkit exec or vmkit console with --remote")

    def add_nic(self, network: str, *, ports: Iterable[str] = ()) -> Nic:
        from vmkit.model.network import Nic

        return Nic.model_validate(self._c.run("POST", f"{self._path}/nics",
                                              json={"network": network, "ports": list(ports)}))

    def remove_nic(self, network: str) -> Nic:
        from vmkit.model.network import Nic

        return Nic.model_validate(self._c.run(
            "DELETE", f"{self._path}/nics/{quote(network, safe='')}"))

    def add_disk(self, name: str, size: int | str) -> ExtraDisk:
        from vmkit.model.spec import ExtraDisk

        return ExtraDisk.model_validate(self._c.run("POST", f"{self._path}/disks",
                                                    json={"name": name, "size": size}))

    def remove_disk(self, name: str) -> ExtraDisk:
        from vmkit.model.spec import ExtraDisk

        return ExtraDisk.model_validate(self._c.run(
            "DELETE", f"{self._path}/disks/{quote(name, safe='')}"))

    def disks(self) -> list[DiskInfo]:
        from vmkit.model.views import DiskInfo

        return [DiskInfo.model_validate(d)
                for d in self._c.metadata("GET", f"{self._path}/disks")]

    def set(self, **changes: Any) -> SetResult:
        from vmkit.model.views import SetResult

        result = self._c.run("PATCH", self._path, json=changes)
        return SetResult(now=list(result["now"]), at_restart=list(result["at_restart"]))

    def set_restart_policy(self, *, mode: str | None = None, max_restarts: int | None = None,
                           autostart: bool | None = None) -> RestartPolicy:
        from vmkit.model.restart import RestartPolicy

        self._c.run("PATCH", self._path, json={k: v for k, v in (
            ("restart", mode), ("max_restarts", max_restarts), ("autostart", autostart))
            if v is not None})
        config = self._c.metadata("GET", self._path, params={"query": "false"})
        return RestartPolicy.model_validate(config.get("restart_policy") or {})

    def snapshot(self, name: str, *, disk_only: bool = False) -> SnapshotInfo:
        from vmkit.model.views import SnapshotInfo

        return SnapshotInfo.model_validate(self._c.run(
            "POST", f"{self._path}/snapshots", json={"name": name, "disk_only": disk_only}))

    def snapshots(self) -> list[SnapshotInfo]:
        from vmkit.model.views import SnapshotInfo

        return [SnapshotInfo.model_validate(s)
                for s in self._c.metadata("GET", f"{self._path}/snapshots")]

    def restore(self, name: str) -> RemoteVM:
        self._c.run("POST", f"{self._path}/snapshots/{quote(name, safe='')}/restore")
        return self

    def delete_snapshot(self, name: str) -> None:
        self._c.run("DELETE", f"{self._path}/snapshots/{quote(name, safe='')}")

    def clone(self, target: str, *, linked: bool = False, from_snapshot: str | None = None,
              live: bool = False) -> RemoteVM:
        self._c.run("POST", f"{self._path}/clone", json={
            "target": target, "linked": linked, "from_snapshot": from_snapshot, "live": live})
        return self.host.get(target)

    def check_move(self, destination: HostCapabilities, *, name: str | None = None
                   ) -> list[str]:
        reasons: list[str] = self._c.metadata(
            "POST", f"{self._path}/check-move", params={"name": name} if name else {},
            json=destination.model_dump(mode="json"))
        return reasons

    def check_move_to(self, destination: dict[str, Any], options: Any = None) -> list[str]:
        """The move's pre-flight, asked by the daemon (see Host's VM.check_move_to)."""
        from vmkit.model.migration import MigrationOptions

        body = _migrate_body(destination, options or MigrationOptions())
        reasons: list[str] = self._c.run("POST", f"/1.0/vms/{self.name}/migrate",
                                         json={**body, "check": True})
        return reasons

    def migrate(self, destination: dict[str, Any], options: Any = None, *,
                report: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Move the VM to another host; the daemon drives it (see Host's VM.migrate)."""
        from vmkit.model.migration import MigrationOptions, Progress

        body = _migrate_body(destination, options or MigrationOptions())

        def progress(p: dict[str, Any]) -> None:
            if report is not None and p.get("stage"):
                report(Progress(stage=str(p["stage"]), transferred=int(p.get("done") or 0),
                                remaining=int(p.get("remaining") or 0),
                                total=int(p.get("total") or 0),
                                dirty_rate=int(p.get("dirty_rate") or 0),
                                expected_downtime_ms=p.get("expected_downtime_ms")))

        result: dict[str, Any] = self._c.run("POST", f"/1.0/vms/{self.name}/migrate",
                                             json=body, progress=progress)
        return result

    def export(self, path: str | Path, *,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        result = self._c.run("POST", f"{self._path}/export",
                             progress=_bytes_progress(progress))
        target = Path(path)
        partial = target.with_name(f".{target.name}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, self._c.client.stream(
                    "GET", result["download"]) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for(response)
                for block in response.iter_bytes(1 << 20):
                    out.write(block)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        manifest: dict[str, Any] = result["manifest"]
        return manifest


def _upload(path: Path, progress: Callable[[int, int], None] | None
            ) -> Callable[[], Iterator[bytes]]:
    """A file as an upload body, read 1 MiB at a time, with bytes-sent progress."""
    size = os.path.getsize(path)

    def chunks() -> Iterator[bytes]:
        sent = 0
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                sent += len(block)
                if progress is not None:
                    progress(sent, size)
                yield block

    return chunks


def _key_lines(sources: Iterable[str | Path]) -> list[str]:
    """Key files are read here, on the client: the daemon accepts key lines only."""
    lines = []
    for source in sources:
        text = str(source)
        if text.startswith(("ssh-", "ecdsa-", "sk-")):
            lines.append(text)
            continue
        try:
            content = Path(text).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidValue(f"cannot read ssh key {text!r}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from exc
        lines += [line.strip() for line in content.splitlines()
                  if line.strip() and not line.startswith("#")]
    return lines


def connect(url: str, *, token: str | None = None, server_cert: str | Path | None = None,
            client_cert: tuple[str | Path, str | Path] | None = None) -> RemoteHost:
    """A Host whose every method runs on the daemon at `url` (unix:///path or https://...)."""
    return RemoteHost(Connection(url, token=token, server_cert=server_cert,
                                 client_cert=client_cert))


class _Async:
    """Awaitable twins of a sync object's methods (each call runs in a worker thread)."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        async def call(*args: Any, **kwargs: Any) -> Any:
            import asyncio

            result = await asyncio.to_thread(value, *args, **kwargs)
            if isinstance(result, RemoteVM):
                return _Async(result)
            if isinstance(result, list) and result and isinstance(result[0], RemoteVM):
                return [_Async(vm) for vm in result]
            return result

        return call


def connect_async(url: str, **kwargs: Any) -> Any:
    """Like connect, with every method awaitable: `await (await host.get("web")).start()`."""
    return _Async(connect(url, **kwargs))


def _migrate_body(destination: dict[str, Any], opts: Any) -> dict[str, Any]:
    return {"destination": destination, "storage": opts.storage, "bandwidth": opts.bandwidth,
            "downtime_ms": opts.downtime_ms, "auto_converge": opts.auto_converge,
            "postcopy": opts.postcopy, "name": opts.name}


class MovePeer:
    """The destination of a move as the source's engine sees it (ops/migration.Peer): the
    destination daemon's /1.0/migrations routes, with the credentials the user's remote
    holds (URL, pinned certificate, token)."""

    def __init__(self, credentials: dict[str, Any]):
        from urllib.parse import urlsplit

        self.credentials = credentials
        self.url = str(credentials["url"])
        self.connection = Connection(self.url, token=credentials.get("token"),
                                     server_pem=str(credentials["server_cert"]))
        self.address = urlsplit(self.url).hostname or ""

    def describe(self) -> str:
        return self.url

    def capabilities(self) -> HostCapabilities:
        from vmkit.model.hardware import HostCapabilities

        return HostCapabilities.model_validate(
            self.connection.metadata("GET", "/1.0/host/capabilities"))

    def prepare(self, bundle: Path, *, name: str, generation: int, live: bool,
                helper: str | None, progress: Callable[[int, int], None]) -> str:
        chunks = _upload(bundle, progress)
        result = self.connection.run(
            "POST", "/1.0/migrations", content=chunks(),
            params={"name": name, "generation": generation, "live": live,
                    **({"helper": helper} if helper else {})},
            headers={"Content-Type": "application/octet-stream"})
        return str(result["id"])

    def sees(self, folder: str, nonce: str) -> str | None:
        answer = self.connection.metadata("POST", "/1.0/migrations/storage",
                                          json={"folder": folder, "nonce": nonce})
        return None if answer.get("sees") else str(answer.get("reason") or "not seen")

    def prepare_shared(self, *, folder: str, nonce: str, name: str, generation: int,
                       live: bool) -> str:
        answer = self.connection.metadata(
            "POST", "/1.0/migrations/shared",
            json={"folder": folder, "nonce": nonce, "name": name, "generation": generation,
                  "live": live})
        return str(answer["id"])

    def incoming(self, migration: str, *, key: str, machine: dict[str, Any] | None,
                 paused: bool, postcopy: bool) -> dict[str, Any]:
        answer: dict[str, Any] = self.connection.metadata(
            "POST", f"/1.0/migrations/{migration}/incoming",
            json={"key": key, "machine": machine, "paused": paused, "postcopy": postcopy})
        return answer

    def finish(self, migration: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.connection.metadata(
            "POST", f"/1.0/migrations/{migration}/finish", timeout=300)
        return answer

    def settle(self, migration: str) -> str:
        """Abort there unless the guest runs there: "aborted", "finishing" or "finished"."""
        return str(self.connection.metadata("DELETE", f"/1.0/migrations/{migration}")["state"])
