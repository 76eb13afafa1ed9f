"""The REST API /1.0 (Incus's shape): thin routes over the SDK's Host/VM, which call vmkit.ops.

Quick reads answer `sync`; anything that may take more than a moment answers 202 with an
operation (`GET /1.0/operations/{id}/wait`). Errors are JSON naming the SDK's error class; 4xx
= the request was wrong (the CLI's exit 2), 5xx = the operation failed (exit 1). Handlers that
touch the engine are plain `def`s: FastAPI runs them in worker threads, off the event loop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from vmkit.daemon import auth, web
from vmkit.daemon.consoles import ConsoleHub
from vmkit.daemon.metrics import build_registry
from vmkit.daemon.operations import Operation, error_body
from vmkit.daemon.service import Service
from vmkit.errors import (
    AuthError,
    Forbidden,
    InvalidValue,
    NotFound,
    TooLarge,
    VmkitError,
    http_status_for,
)
from vmkit.host import VM
from vmkit.model.api import (
    API_VERSION,
    Async,
    CloneRequest,
    CreateRequest,
    DiskRequest,
    ErrorBody,
    ExecRequest,
    ImageBuildRequest,
    IncomingRequest,
    LoginRequest,
    MediaRequest,
    MigrateRequest,
    NetworkRequest,
    NicRequest,
    OperationView,
    ServerInfo,
    SetRequest,
    SharedPrepareRequest,
    SharedStorageRequest,
    SnapshotRequest,
    StateRequest,
    Sync,
)
from vmkit.model.cloudinit import KEY_TYPES
from vmkit.model.hardware import HostCapabilities
from vmkit.model.migration import MigrationOptions
from vmkit.model.migration import Progress as MoveProgress
from vmkit.model.names import validate_name
from vmkit.model.network import Nic, parse_forward
from vmkit.model.resources import Policy
from vmkit.model.sizes import parse_count, parse_size
from vmkit.model.spec import parse_boot_order
from vmkit.model.state import Operation as VmOperation
from vmkit.model.state import check_transition
from vmkit.model.views import (
    DiskInfo,
    ExecResult,
    ImageInfo,
    NetworkInfo,
    SetResult,
    SnapshotInfo,
    VmStatus,
)
from vmkit.qemu import peer
from vmkit.storage import shared as shared_storage

VERSION = "0.2.0"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RESIZE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vmkit-resize")
REVALIDATE = 2.0  # seconds between two checks of an open websocket's credentials
SPOOL_RESERVE = 1 << 30  # an upload may not take the host's last GiB
WAIT_LIMIT = 3600.0
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 500, 502, 503, 504)}


def _error(exc: VmkitError) -> JSONResponse:
    return JSONResponse(ErrorBody(**error_body(exc)).model_dump(),
                        status_code=http_status_for(exc))


def _sync(metadata: Any) -> dict[str, Any]:
    return {"type": "sync", "status": "Success", "status_code": 200, "metadata": metadata}


class Gate:
    """ASGI middleware: authentication per connection and request, audit, latency."""

    def __init__(self, app: ASGIApp, service: Service, latency: Any):
        self.app = app
        self.service = service
        self.latency = latency

    def who(self, scope: Scope) -> str | None:
        """The requestor, or None when the peer has not proven who it is."""
        peer: auth.Peer | None = scope.get("state", {}).get("peer")
        if peer is None:
            return None
        if peer.transport == "unix":
            return peer.describe() if peer.allowed else None
        headers = dict(scope.get("headers") or [])
        token = auth.bearer(headers.get(b"authorization", b"").decode("latin-1"))
        if token is not None:
            name = self.service.tokens.check(token)
            return f"token:{name}@{peer.address}" if name else None
        if peer.cert_fingerprint:
            client = self.service.client_ca.name_of(peer.cert_fingerprint)
            return f"cert:{client}@{peer.address}" if client else None
        session = self.service.sessions.get(web.session_id(headers))
        if session is not None:
            # the session's token is checked again each time: revoking it logs browsers out
            name = self.service.tokens.check_digest(session.token_digest)
            return f"web:{name}@{peer.address}" if name else None
        return None

    def refused_session_use(self, scope: Scope) -> VmkitError | None:
        """No change and no websocket from another site's page; a browser session may change
        things only with its CSRF header, and open a websocket only from the daemon's own
        pages."""
        headers = dict(scope.get("headers") or [])
        changes = scope["type"] == "websocket" or scope["method"] in MUTATING
        if changes and web.foreign_origin(headers):
            return Forbidden("refused: the request comes from another site's page")
        if not str(scope.get("state", {}).get("who", "")).startswith("web:"):
            return None
        if scope["type"] == "websocket":
            if not web.same_origin(headers):
                return Forbidden("websocket refused: it must come from this daemon's pages")
            return None
        if scope["method"] not in MUTATING or (scope["method"], scope["path"]) in web.PUBLIC:
            return None
        session = self.service.sessions.get(web.session_id(headers))
        if session is None or not web.csrf_ok(session, headers):
            return Forbidden(f"missing or wrong CSRF header ({web.CSRF_HEADER})",
                             hint="the dashboard sends it; a script can use a bearer token")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        who = self.who(scope)
        if who is None and scope["type"] == "http" and \
                (scope["method"], scope["path"]) in web.PUBLIC:
            who = "anonymous"  # the login page and the login itself, with a small body only
            declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > web.PUBLIC_BODY_LIMIT:
                await _error(TooLarge(f"a request without credentials may send at most "
                                      f"{web.PUBLIC_BODY_LIMIT} bytes"))(scope, receive, send)
                return
            receive = _bounded(receive, web.PUBLIC_BODY_LIMIT)
        elif who is None and scope["type"] == "http" and scope["method"] == "GET" and \
                scope["path"] in ("/ui", "/ui/"):
            to_login = {"Location": "/ui/login", **web.SECURITY_HEADERS}
            await Response(status_code=303, headers=to_login)(scope, receive, send)
            return
        if who is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401})
                return
            has_credentials = any(k == b"authorization" for k, _ in scope.get("headers") or [])
            body = ErrorBody(error="not authenticated" if not has_credentials else
                             "credentials refused (unknown or revoked token or certificate)",
                             error_code=401, error_class="AuthError",
                             hint="vmkit remote add NAME https://HOST:PORT --token TOKEN "
                                  "(vmkit token create on the server)").model_dump()
            await JSONResponse(body, status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            self.service.audit.write(who=str(scope.get("client")), method=scope.get("method"),
                                     path=scope["path"], status=401)
            return
        scope.setdefault("state", {})["who"] = who
        refusal = self.refused_session_use(scope)
        if refusal is not None:
            self.service.audit.write(who=who, method=scope.get("method", "WEBSOCKET"),
                                     path=scope["path"], status=403, note=refusal.message)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4403})
            else:
                await _error(refusal)(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, who)
            return
        started = time.perf_counter()
        status = {"code": 0}

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if scope["type"] == "http":
                route = scope.get("route")
                template = getattr(route, "path", "unmatched")
                self.latency.labels(scope["method"], template, str(status["code"])).observe(
                    time.perf_counter() - started)
                if scope["method"] in MUTATING:
                    # no status sent here: an internal error answered 500 outside this layer
                    self.service.audit.write(who=who, method=scope["method"],
                                             path=scope["path"], status=status["code"] or 500,
                                             seconds=round(time.perf_counter() - started, 4))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, who: str) -> None:
        """Audited (a console or an exec is a mutation), and watched: credentials revoked
        while it is open close it within REVALIDATE seconds."""
        self.service.audit.write(who=who, method="WEBSOCKET", path=scope["path"],
                                 query=scope.get("query_string", b"").decode("latin-1")[:200])

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(REVALIDATE)
                if await asyncio.to_thread(self.who, scope) is None:
                    self.service.audit.write(who=who, method="WEBSOCKET", path=scope["path"],
                                             status=401, note="credentials revoked: closed")
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.close", "code": 4401})
                    return

        task = asyncio.create_task(watchdog())
        try:
            await self.app(scope, receive, send)
        finally:
            task.cancel()


def _bounded(receive: Receive, limit: int) -> Receive:
    """The request's body, cut off (as a disconnect) past `limit` bytes: a client without
    credentials never makes the daemon hold more than that."""
    seen = 0

    async def bounded() -> Any:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return bounded


def build_app(service: Service) -> FastAPI:
    host = service.host
    registry, latency = build_registry(service)
    app = FastAPI(title="vmkit", version=VERSION, openapi_url="/1.0/openapi.json",
                  docs_url="/1.0/docs", redoc_url=None,
                  description="The vmkit host service: VMs, snapshots, clones, images, "
                              "networks, operations, events and metrics.")
    app.add_middleware(Gate, service=service, latency=latency)
    consoles = ConsoleHub()

    @app.exception_handler(VmkitError)
    async def _vmkit_error(request: Request, exc: VmkitError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        field = next((str(p) for p in first.get("loc", ()) if p not in ("body", "query")),
                     None)
        return _error(InvalidValue(f"invalid request: {where or 'body'}: "
                                   f"{first.get('msg', 'not accepted')}",
                                   hint="see /1.0/openapi.json for the request's schema",
                                   field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(NotFound(f"no such API path: {request.url.path}",
                                   hint="see /1.0/openapi.json"))
        body = ErrorBody(error=str(exc.detail), error_code=exc.status_code,
                         error_class="RequestError" if exc.status_code < 500 else "VmkitError")
        return JSONResponse(body.model_dump(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _error(VmkitError(f"internal error: {exc!r}", hint="see the daemon's log"))

    def requestor(request: Request | WebSocket) -> str:
        return str(request.scope.get("state", {}).get("who", ""))

    def accepted(request: Request, kind: str, description: str,
                 work: Callable[[Operation], Any], vms: list[str] | None = None,
                 may_cancel: bool = False) -> JSONResponse:
        op = service.operations.submit(kind, description, work, vms=vms,
                                       may_cancel=may_cancel, requestor=requestor(request))
        location = f"/{API_VERSION}/operations/{op.id}"
        body = Async(operation=location, metadata=op.view()).model_dump(mode="json")
        return JSONResponse(body, status_code=202, headers={"Location": location})

    def with_restarts(status: dict[str, Any]) -> dict[str, Any]:
        """A VM's status plus what the supervisor remembers of its restarts."""
        return {**status, "restarts": service.supervisor.summary(status["name"])}

    def vm_of(name: str) -> VM:
        return host.get(name)

    # -- server --------------------------------------------------------------------------
    @app.get("/1.0", response_model=Sync[ServerInfo], responses=_ERRORS)
    def server_info(request: Request) -> dict[str, Any]:
        who = requestor(request)
        return _sync(ServerInfo(version=VERSION, home=str(host.layout.root),
                                auth_method=who.split(":", 1)[0], requestor=who,
                                listeners=service.listeners))

    # -- VMs -----------------------------------------------------------------------------
    @app.get("/1.0/vms", response_model=Sync[list[VmStatus]], responses=_ERRORS)
    async def list_vms() -> Response:
        """Served from the status cache: stats only, unless a VM's files changed."""
        stale = service.statuses.stale()
        if stale:
            await asyncio.to_thread(service.statuses.refresh, stale)
        listing = [with_restarts(vm) for vm in service.statuses.listing()]
        return Response(json.dumps(_sync(listing), separators=(",", ":")),
                        media_type="application/json")

    @app.post("/1.0/vms", status_code=202, response_model=Async, responses=_ERRORS)
    def create_vm(request: Request, body: CreateRequest) -> JSONResponse:
        _check_fields(body)
        _check_host_paths(request, body)

        def work(op: Operation) -> dict[str, Any]:
            op.report(stage="creating")
            vm = host.create(body.name, image=body.image, cpus=body.cpus, memory=body.memory,
                             disk=body.disk, full_copy=body.full_copy, accel=body.accel,
                             max_cpus=body.max_cpus, max_memory=body.max_memory,
                             hostname=body.hostname, ssh_keys=body.ssh_keys,
                             user_data=body.user_data, networks=body.networks,
                             ports=body.ports, restart=body.restart, autostart=body.autostart,
                             cpu_model=body.cpu_model, firmware=body.firmware, boot=body.boot,
                             display=body.display, from_disk=body.from_disk, iso=body.iso,
                             os_type=body.os_type, secure_boot=body.secure_boot,
                             shared=body.shared)
            if body.start:
                op.report(stage="starting")
                vm.start()
                if body.wait:
                    op.report(stage="waiting for the guest agent")
                    vm.wait_ready(timeout=body.timeout)
            return vm.status().model_dump(mode="json")

        return accepted(request, "vm.create", f"create {body.name}", work, [body.name])

    @app.get("/1.0/vms/{name}", response_model=Sync[VmStatus], responses=_ERRORS)
    async def get_vm(name: str, query: bool = True) -> Any:
        """query=false is served from the status cache; query=true asks QEMU and the agent."""
        if not query:
            stale = service.statuses.stale()
            if stale:
                await asyncio.to_thread(service.statuses.refresh, stale)
            cached = service.statuses.one(name)
            if cached is not None:
                return Response(json.dumps(_sync(with_restarts(cached)), separators=(",", ":")),
                                media_type="application/json")
        status = await asyncio.to_thread(lambda: vm_of(name).status(query_qemu=query))
        return _sync(with_restarts(status.model_dump(mode="json")))

    @app.put("/1.0/vms/{name}/state", status_code=202, response_model=Async,
             responses=_ERRORS)
    def change_state(request: Request, name: str, body: StateRequest) -> JSONResponse:
        vm = vm_of(name)

        def work(op: Operation) -> dict[str, Any]:
            op.report(stage=body.action)
            service.supervisor.user_changed(name)
            if body.action == "start":
                vm.start()
                if body.wait:
                    op.report(stage="waiting for the guest agent")
                    vm.wait_ready(timeout=body.timeout or 180.0)
            elif body.action == "stop":
                vm.stop(**({"timeout": body.timeout} if body.timeout else {}))
            elif body.action == "restart":
                vm.restart(wait=body.wait, **({"timeout": body.timeout} if body.timeout else {}))
            else:
                getattr(vm, body.action)()
            return vm.status().model_dump(mode="json")

        return accepted(request, f"vm.{body.action}", f"{body.action} {name}", work, [name])

    @app.post("/1.0/vms/{name}/wait-ready", status_code=202, response_model=Async,
              responses=_ERRORS)
    def wait_ready(request: Request, name: str,
                   timeout: Annotated[float, Query(gt=0, le=3600)] = 180.0) -> JSONResponse:
        vm = vm_of(name)
        return accepted(request, "vm.wait-ready", f"wait for {name}'s agent",
                        lambda op: vm.wait_ready(timeout=timeout), [name])

    @app.patch("/1.0/vms/{name}", status_code=202, response_model=Async, responses=_ERRORS)
    def set_vm(request: Request, name: str, body: SetRequest) -> JSONResponse:
        vm = vm_of(name)
        changes = body.model_dump(exclude_none=True,
                                  exclude={"restart", "max_restarts", "autostart"})
        policy = body.restart is not None or body.max_restarts is not None or \
            body.autostart is not None
        if not changes and not policy:
            raise InvalidValue("nothing to change: give at least one field")

        def work(op: Operation) -> dict[str, Any]:
            result = vm.set(**changes) if changes else SetResult()
            if policy:
                new = vm.set_restart_policy(mode=body.restart, max_restarts=body.max_restarts,
                                            autostart=body.autostart)
                result.now.append(f"restart policy {new.mode} (max {new.max_restarts}), "
                                  f"autostart {'on' if new.autostart else 'off'}")
            service.bus.lifecycle("set-applied", name, now=result.now,
                                  at_restart=result.at_restart)
            return {"now": result.now, "at_restart": result.at_restart}

        return accepted(request, "vm.set", f"set {name}", work, [name])

    @app.delete("/1.0/vms/{name}", status_code=202, response_model=Async, responses=_ERRORS)
    def delete_vm(request: Request, name: str, force: bool = False) -> JSONResponse:
        vm = vm_of(name)

        def work(op: Operation) -> None:
            vm.delete(force=force)
            service.supervisor.forget(name)

        return accepted(request, "vm.delete", f"delete {name}", work, [name])

    @app.post("/1.0/vms/{name}/exec", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def exec_sync(name: str, body: ExecRequest) -> dict[str, Any]:
        return _sync(_exec(vm_of(name), body))

    @app.post("/1.0/vms/{name}/check-move", response_model=Sync[list[str]], responses=_ERRORS)
    def check_move(name: str, body: HostCapabilities, target: str | None = Query(
            default=None, alias="name", max_length=63)) -> dict[str, Any]:
        """Every reason this VM cannot move to the host `body` describes (its capabilities)."""
        if target is not None:
            validate_name(target)
        return _sync(vm_of(name).check_move(body, name=target))

    @app.get("/1.0/vms/{name}/log", response_class=PlainTextResponse, responses=_ERRORS)
    def serial_log(name: str, offset: Annotated[int, Query(ge=0)] = 0) -> Response:
        """Streamed as it is read, from byte `offset` on: what a guest writes to its console
        is never held whole."""
        return StreamingResponse(vm_of(name).read_log(offset=offset),
                                 media_type="text/plain; charset=utf-8")

    @app.get("/1.0/vms/{name}/screenshot", response_class=Response, responses=_ERRORS)
    def screenshot(name: str) -> Response:
        """A PNG of the VM's screen (display std)."""
        vm = vm_of(name)
        with tempfile.TemporaryDirectory(dir=service.paths.spool) as spool:
            out = Path(spool) / "screen.png"
            vm.screenshot(out)
            return Response(out.read_bytes(), media_type="image/png",
                            headers={"Cache-Control": "no-store"})

    @app.put("/1.0/vms/{name}/media", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def attach_media(request: Request, name: str, body: MediaRequest) -> dict[str, Any]:
        """Insert an ISO (a path on this host: from root on the unix socket only)."""
        _require_local_root(request, "path")
        if not os.path.isabs(body.path):
            raise InvalidValue(f"invalid path {body.path!r}: an absolute path on the daemon's "
                               "host", field="path")
        return _sync({"media": vm_of(name).attach_media(body.path)})

    @app.delete("/1.0/vms/{name}/media", response_model=Sync[dict[str, Any]],
                responses=_ERRORS)
    def eject_media(name: str) -> dict[str, Any]:
        return _sync({"ejected": vm_of(name).eject_media()})

    @app.put("/1.0/vms/{name}/files", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    async def push_file(request: Request, name: str,
                        path: Annotated[str, Query(min_length=1, max_length=4096)],
                        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
                        ) -> dict[str, Any]:
        vm = await asyncio.to_thread(vm_of, name)
        state = await asyncio.to_thread(lambda: vm.state)
        check_transition(name, state, VmOperation.EXEC)  # before taking the upload
        spool = await _receive(request, service.paths.spool)
        try:
            os.chmod(spool, mode & 0o777)
            size = await asyncio.to_thread(vm.copy_in, spool, path)
        finally:
            spool.unlink(missing_ok=True)
        return _sync({"bytes": size, "path": path})

    @app.get("/1.0/vms/{name}/files", responses={**_ERRORS, 200: {"content": {
        "application/octet-stream": {}}}})
    def pull_file(name: str, path: Annotated[str, Query(min_length=1, max_length=4096)]
                  ) -> Response:
        vm = vm_of(name)
        folder = Path(tempfile.mkdtemp(dir=service.paths.spool))
        target = folder / "file"
        try:
            vm.copy_out(path, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        mode = target.stat().st_mode & 0o777
        return _stream_once(target, folder, headers={"X-Vmkit-Mode": oct(mode)})

    # -- snapshots, clones, bundles ------------------------------------------------------
    @app.get("/1.0/vms/{name}/snapshots", response_model=Sync[list[SnapshotInfo]],
             responses=_ERRORS)
    def list_snapshots(name: str) -> dict[str, Any]:
        return _sync(vm_of(name).snapshots())

    @app.post("/1.0/vms/{name}/snapshots", status_code=202, response_model=Async,
              responses=_ERRORS)
    def take_snapshot(request: Request, name: str, body: SnapshotRequest) -> JSONResponse:
        vm = vm_of(name)
        validate_name(body.name, kind="snapshot name")

        def work(op: Operation) -> dict[str, Any]:
            info = vm.snapshot(body.name, disk_only=body.disk_only)
            service.bus.lifecycle("snapshot-created", name, snapshot=body.name)
            return info.model_dump(mode="json")

        return accepted(request, "snapshot.create", f"snapshot {name}/{body.name}", work, [name])

    @app.post("/1.0/vms/{name}/snapshots/{snapshot}/restore", status_code=202,
              response_model=Async, responses=_ERRORS)
    def restore_snapshot(request: Request, name: str, snapshot: str) -> JSONResponse:
        vm = vm_of(name)

        def work(op: Operation) -> None:
            vm.restore(snapshot)
            service.bus.lifecycle("snapshot-restored", name, snapshot=snapshot)

        return accepted(request, "snapshot.restore", f"restore {name}/{snapshot}", work, [name])

    @app.delete("/1.0/vms/{name}/snapshots/{snapshot}", status_code=202, response_model=Async,
                responses=_ERRORS)
    def delete_snapshot(request: Request, name: str, snapshot: str) -> JSONResponse:
        vm = vm_of(name)

        def work(op: Operation) -> None:
            vm.delete_snapshot(snapshot)
            service.bus.lifecycle("snapshot-deleted", name, snapshot=snapshot)

        return accepted(request, "snapshot.delete", f"delete snapshot {name}/{snapshot}", work,
                        [name])

    @app.post("/1.0/vms/{name}/clone", status_code=202, response_model=Async,
              responses=_ERRORS)
    def clone_vm(request: Request, name: str, body: CloneRequest) -> JSONResponse:
        vm = vm_of(name)
        validate_name(body.target)

        def work(op: Operation) -> dict[str, Any]:
            clone = vm.clone(body.target, linked=body.linked, from_snapshot=body.from_snapshot,
                             live=body.live)
            service.bus.lifecycle("cloned", name, target=body.target)
            return clone.status().model_dump(mode="json")

        return accepted(request, "vm.clone", f"clone {name} to {body.target}", work,
                        [name, body.target])

    @app.post("/1.0/vms/{name}/export", status_code=202, response_model=Async,
              responses=_ERRORS)
    def export_vm(request: Request, name: str) -> JSONResponse:
        vm = vm_of(name)

        def work(op: Operation) -> dict[str, Any]:
            bundle = service.paths.spool / f"export-{op.id}.vmkit"
            manifest = vm.export(bundle, progress=op.bytes_progress("exporting"))
            service.bus.lifecycle("exported", name)
            return {"download": f"/1.0/operations/{op.id}/bundle", "manifest": manifest}

        return accepted(request, "vm.export", f"export {name}", work, [name], may_cancel=True)

    @app.get("/1.0/operations/{op_id}/bundle", responses={**_ERRORS, 200: {"content": {
        "application/octet-stream": {}}}})
    def download_bundle(op_id: str) -> Response:
        op = _operation(op_id)
        bundle = service.paths.spool / f"export-{op.id}.vmkit"
        if op.kind != "vm.export" or op.status != "success" or not bundle.exists():
            raise NotFound(f"operation {op_id} has no bundle to download (it is "
                           f"{op.kind}, {op.status}; a bundle is downloaded once)")
        return _stream_once(bundle, None)

    @app.post("/1.0/vms/import", status_code=202, response_model=Async, responses=_ERRORS)
    async def import_vm(request: Request, name: str | None = None) -> JSONResponse:
        if name is not None:
            validate_name(name)
        spool = await _receive(request, service.paths.spool)

        def work(op: Operation) -> dict[str, Any]:
            try:
                vm = host.import_bundle(spool, name=name,
                                        progress=op.bytes_progress("importing"))
            finally:
                spool.unlink(missing_ok=True)
            service.bus.lifecycle("imported", vm.name)
            return vm.status().model_dump(mode="json")

        return accepted(request, "vm.import", f"import {name or 'a bundle'}", work,
                        [name] if name else [], may_cancel=True)

    # -- moves between hosts ---------------------------------------------------------------
    @app.post("/1.0/vms/{name}/migrate", status_code=202, response_model=Async,
              responses=_ERRORS)
    def migrate_vm(request: Request, name: str, body: MigrateRequest) -> JSONResponse:
        """Move the VM to the host `destination` names (live when it runs); `check`: only
        the pre-flight's reasons (an empty list: it can move)."""
        vm = vm_of(name)
        if body.name is not None:
            validate_name(body.name)
        credentials = body.destination.model_dump()
        options = MigrationOptions(storage=body.storage, bandwidth=body.bandwidth,
                                   downtime_ms=body.downtime_ms,
                                   auto_converge=body.auto_converge, postcopy=body.postcopy,
                                   name=body.name)

        def work(op: Operation) -> Any:
            if body.check:
                return vm.check_move_to(credentials, options)

            def report(progress: MoveProgress) -> None:
                op.progress.update({"transferred": progress.transferred,
                                    "remaining": progress.remaining,
                                    "dirty_rate": progress.dirty_rate,
                                    "expected_downtime_ms": progress.expected_downtime_ms})
                op.report(stage=progress.stage, done=progress.transferred,
                          total=progress.total)

            result = vm.migrate(credentials, options, report=report)
            service.bus.lifecycle("migrated", name, destination=credentials["url"],
                                  target=result["name"])
            service.supervisor.forget(name)
            return result

        return accepted(request, "vm.migrate", f"move {name} to {body.destination.url}", work,
                        [name], may_cancel=True)

    @app.post("/1.0/migrations", status_code=202, response_model=Async, responses=_ERRORS)
    async def migration_prepare(request: Request, name: Annotated[str, Query(max_length=63)],
                                generation: Annotated[int, Query(ge=1)],
                                live: bool = False,
                                helper: Annotated[str | None, Query(max_length=63)] = None
                                ) -> JSONResponse:
        """Destination, prepare: the moving VM's files (a bundle without its active layer
        when live), imported as an incoming VM that nothing else may touch until finish."""
        validate_name(name)
        spool = await _receive(request, service.paths.spool)

        def work(op: Operation) -> dict[str, Any]:
            try:
                return service.arrivals.receive(spool, name=name, generation=generation,
                                                live=live, helper=helper,
                                                progress=op.bytes_progress("importing"))
            finally:
                spool.unlink(missing_ok=True)

        return accepted(request, "migration.prepare", f"receive {name}", work, [name])

    @app.post("/1.0/migrations/storage", response_model=Sync[dict[str, Any]],
              responses=_ERRORS)
    def migration_storage(body: SharedStorageRequest) -> dict[str, Any]:
        """Destination: whether it sees the folder on shared storage the source wrote the
        nonce into (then a move sends memory only)."""
        why = shared_storage.sees(body.folder, body.nonce)
        return _sync({"sees": why is None, "reason": why})

    @app.post("/1.0/migrations/shared", response_model=Sync[dict[str, Any]],
              responses=_ERRORS)
    def migration_prepare_shared(body: SharedPrepareRequest) -> dict[str, Any]:
        """Destination, prepare for a VM on shared storage: its folder registered as an
        incoming VM (nothing copied) that nothing else may touch until finish."""
        validate_name(body.name)
        return _sync(service.arrivals.receive_shared(
            folder=body.folder, nonce=body.nonce, name=body.name,
            generation=body.generation, live=body.live))

    @app.post("/1.0/migrations/{mid}/incoming", response_model=Sync[dict[str, Any]],
              responses=_ERRORS)
    def migration_incoming(request: Request, mid: str, body: IncomingRequest
                           ) -> dict[str, Any]:
        """Destination: start the paused QEMU that receives the memory; the ports and the
        one-time token of its stream (admitted from the caller's address only)."""
        source = request.client.host if request.client and request.client.port else None
        return _sync(service.arrivals.start(mid, key=body.key, source=source,
                                            machine=body.machine, paused=body.paused,
                                            postcopy=body.postcopy))

    @app.post("/1.0/migrations/{mid}/finish", response_model=Sync[dict[str, Any]],
              responses=_ERRORS)
    def migration_finish(mid: str) -> dict[str, Any]:
        """Destination: everything arrived and the source is paused for good: resume here."""
        status = service.arrivals.finish(mid)
        service.bus.lifecycle("arrived", status["name"])
        return _sync(status)

    @app.get("/1.0/migrations/{mid}", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def migration_outcome(mid: str) -> dict[str, Any]:
        return _sync(service.arrivals.outcome(mid))

    @app.delete("/1.0/migrations/{mid}", response_model=Sync[dict[str, Any]],
                responses=_ERRORS)
    def migration_abort(mid: str) -> dict[str, Any]:
        """Destination: drop everything the move made here, unless the guest already runs
        here; the answer says which ("aborted", "finishing", "finished")."""
        return _sync({"id": mid, "state": service.arrivals.settle(mid)})

    # -- NICs ----------------------------------------------------------------------------
    @app.post("/1.0/vms/{name}/nics", status_code=202, response_model=Async, responses=_ERRORS)
    def add_nic(request: Request, name: str, body: NicRequest) -> JSONResponse:
        vm = vm_of(name)
        return accepted(request, "nic.add", f"add a NIC on {body.network} to {name}",
                        lambda op: vm.add_nic(body.network, ports=body.ports).model_dump(
                            mode="json"), [name])

    @app.delete("/1.0/vms/{name}/nics/{network}", status_code=202, response_model=Async,
                responses=_ERRORS)
    def remove_nic(request: Request, name: str, network: str) -> JSONResponse:
        vm = vm_of(name)
        return accepted(request, "nic.remove", f"remove {name}'s NIC on {network}",
                        lambda op: vm.remove_nic(network).model_dump(mode="json"), [name])

    @app.get("/1.0/vms/{name}/nics", response_model=Sync[list[Nic]], responses=_ERRORS)
    def list_nics(name: str) -> dict[str, Any]:
        return _sync(list(vm_of(name).config.nics))

    # -- extra disks -----------------------------------------------------------------------
    @app.post("/1.0/vms/{name}/disks", status_code=202, response_model=Async,
              responses=_ERRORS)
    def add_disk(request: Request, name: str, body: DiskRequest) -> JSONResponse:
        vm = vm_of(name)
        return accepted(request, "disk.add", f"add disk {body.name} to {name}",
                        lambda op: vm.add_disk(body.name, body.size).model_dump(mode="json"),
                        [name])

    @app.delete("/1.0/vms/{name}/disks/{disk}", status_code=202, response_model=Async,
                responses=_ERRORS)
    def remove_disk(request: Request, name: str, disk: str) -> JSONResponse:
        vm = vm_of(name)
        return accepted(request, "disk.remove", f"remove disk {disk} of {name}",
                        lambda op: vm.remove_disk(disk).model_dump(mode="json"), [name])

    @app.get("/1.0/vms/{name}/disks", response_model=Sync[list[DiskInfo]], responses=_ERRORS)
    def list_disks(name: str) -> dict[str, Any]:
        return _sync([d.model_dump(mode="json") for d in vm_of(name).disks()])

    # -- images, networks, host ----------------------------------------------------------
    @app.get("/1.0/images", response_model=Sync[list[ImageInfo]], responses=_ERRORS)
    def list_images(check_updates: bool = False) -> dict[str, Any]:
        return _sync(host.images(check_updates=check_updates))

    @app.get("/1.0/images/{image}", response_model=Sync[ImageInfo], responses=_ERRORS)
    def get_image(image: str) -> dict[str, Any]:
        return _sync(host.image(image))

    @app.post("/1.0/images", status_code=202, response_model=Async, responses=_ERRORS)
    def build_image(request: Request, body: ImageBuildRequest) -> JSONResponse:
        validate_name(body.name, kind="image name")

        def work(op: Operation) -> dict[str, Any]:
            info, built = host.build_image(body.name, force=body.force,
                                           progress=op.stage_progress(),
                                           packages=body.packages)
            return {"image": info.model_dump(mode="json"), "built": built}

        return accepted(request, "image.build", f"build image {body.name}", work,
                        may_cancel=True)

    @app.get("/1.0/networks", response_model=Sync[list[NetworkInfo]], responses=_ERRORS)
    def list_networks() -> dict[str, Any]:
        return _sync(host.networks())

    @app.post("/1.0/networks", status_code=202, response_model=Async, responses=_ERRORS)
    def create_network(request: Request, body: NetworkRequest) -> JSONResponse:
        validate_name(body.name, kind="network name")
        return accepted(request, "network.create", f"create network {body.name}",
                        lambda op: host.create_network(body.name, subnet=body.subnet,
                                                       mode=body.mode, parent=body.parent
                                                       ).model_dump(mode="json"))

    @app.get("/1.0/networks/{name}", response_model=Sync[NetworkInfo], responses=_ERRORS)
    def get_network(name: str) -> dict[str, Any]:
        return _sync(host.network(name))

    @app.delete("/1.0/networks/{name}", status_code=202, response_model=Async,
                responses=_ERRORS)
    def delete_network(request: Request, name: str) -> JSONResponse:
        host.network(name)
        return accepted(request, "network.delete", f"delete network {name}",
                        lambda op: host.delete_network(name))

    @app.post("/1.0/networks/reconcile", status_code=202, response_model=Async,
              responses=_ERRORS)
    def reconcile_networks(request: Request) -> JSONResponse:
        return accepted(request, "network.reconcile", "reconcile networks",
                        lambda op: host.reconcile_networks())

    @app.get("/1.0/host/doctor", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def doctor() -> dict[str, Any]:
        return _sync(host.doctor())

    @app.get("/1.0/host/capabilities", response_model=Sync[HostCapabilities],
             responses=_ERRORS)
    def capabilities() -> dict[str, Any]:
        return _sync(host.capabilities())

    @app.get("/1.0/host/capacity", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def capacity() -> dict[str, Any]:
        return _sync({"capacity": host.capacity().model_dump(),
                      "policy": host.policy().model_dump(),
                      "allocated": host.allocated().model_dump()})

    @app.put("/1.0/host/policy", response_model=Sync[Policy], responses=_ERRORS)
    def set_policy(body: Policy) -> dict[str, Any]:
        host.set_policy(body)
        return _sync(host.policy())

    @app.post("/1.0/host/recover", status_code=202, response_model=Async, responses=_ERRORS)
    def recover(request: Request) -> JSONResponse:
        return accepted(request, "host.recover", "recover interrupted operations",
                        lambda op: host.recover())

    # -- operations ----------------------------------------------------------------------
    def _operation(op_id: str) -> Operation:
        op = service.operations.get(op_id)
        if op is None:
            raise NotFound(f"unknown operation {op_id!r}",
                           hint="operations are kept 5 minutes after they end; see "
                                "/1.0/operations")
        return op

    @app.get("/1.0/operations", response_model=Sync[list[OperationView]], responses=_ERRORS)
    async def list_operations() -> dict[str, Any]:
        return _sync([op.view() for op in service.operations.all()])

    @app.get("/1.0/operations/{op_id}", response_model=Sync[OperationView], responses=_ERRORS)
    async def get_operation(op_id: str) -> dict[str, Any]:
        return _sync(_operation(op_id).view())

    @app.get("/1.0/operations/{op_id}/wait", response_model=Sync[OperationView],
             responses=_ERRORS)
    async def wait_operation(op_id: str, timeout: Annotated[
            float, Query(ge=0, le=WAIT_LIMIT)] = 60.0) -> dict[str, Any]:
        op = _operation(op_id)
        await op.wait(timeout)
        return _sync(op.view())

    @app.delete("/1.0/operations/{op_id}", response_model=Sync[OperationView],
                responses=_ERRORS)
    def cancel_operation(op_id: str) -> dict[str, Any]:
        op = _operation(op_id)
        if not op.may_cancel or op.final:
            from vmkit.errors import InvalidState

            raise InvalidState(f"operation {op_id} cannot be cancelled ({op.kind}, {op.status})")
        service.operations.cancel(op)
        return _sync(op.view())

    # -- events, metrics ------------------------------------------------------------------
    @app.get("/1.0/events/recent", response_model=Sync[list[dict[str, Any]]],
             responses=_ERRORS)
    def recent_events(type: str = "", vm: str = "") -> dict[str, Any]:
        return _sync(service.bus.recent(_split(type), _split(vm)))

    @app.websocket("/1.0/events")
    async def events(socket_: WebSocket, type: str = "", vm: str = "") -> None:
        await socket_.accept()
        listener = service.bus.listen(_split(type), _split(vm))
        try:
            while True:
                event = await listener.queue.get()
                if event is None:
                    await socket_.close(code=4008, reason="too slow: events dropped")
                    return
                await socket_.send_json(event)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            service.bus.forget(listener)

    @app.get("/1.0/metrics", response_class=PlainTextResponse, responses=_ERRORS)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- websockets: exec and the serial console -------------------------------------------
    @app.websocket("/1.0/vms/{name}/exec")
    async def exec_ws(socket_: WebSocket, name: str) -> None:
        await socket_.accept()
        try:
            body = ExecRequest.model_validate(await socket_.receive_json())
            vm = await asyncio.to_thread(vm_of, name)
            result = await asyncio.to_thread(_exec, vm, body)
            await socket_.send_json({"type": "result", **result})
        except VmkitError as exc:
            await socket_.send_json({"type": "error", **error_body(exc)})
        except ValueError as exc:
            await socket_.send_json({"type": "error", **error_body(InvalidValue(
                f"invalid exec request: {exc}"))})
        except WebSocketDisconnect:
            return
        with contextlib.suppress(Exception):
            await socket_.close()

    @app.websocket("/1.0/vms/{name}/console")
    async def console_ws(socket_: WebSocket, name: str) -> None:
        try:
            path = await asyncio.to_thread(lambda: vm_of(name).console_socket())
        except VmkitError as exc:
            await socket_.accept()
            await socket_.send_json({"type": "error", **error_body(exc)})
            await socket_.close()
            return
        await socket_.accept()
        await _bridge(socket_, consoles, path,
                      resize=lambda cols, rows: _resize(vm_of(name), cols, rows))

    @app.websocket("/1.0/vms/{name}/vnc")
    async def vnc_ws(socket_: WebSocket, name: str) -> None:
        """The VM's screen for noVNC: binary frames carry the RFB protocol to and from the
        VM's VNC unix socket (each viewer its own VNC client; QEMU shares the screen)."""
        try:
            path = await asyncio.to_thread(lambda: vm_of(name).vnc_socket())
        except VmkitError as exc:
            await socket_.accept()
            await socket_.send_json({"type": "error", **error_body(exc)})
            await socket_.close(code=4404)
            return
        offered = socket_.scope.get("subprotocols") or []
        await socket_.accept(subprotocol="binary" if "binary" in offered else None)
        await _pipe_unix(socket_, path)

    # -- graphs ------------------------------------------------------------------------------
    @app.get("/1.0/vms/{name}/history", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def vm_history(name: str) -> dict[str, Any]:
        vm_of(name)  # 404 for a VM that is not there
        return _sync({"interval": service.history.interval,
                      "samples": service.history.vm(name)})

    @app.get("/1.0/host/history", response_model=Sync[dict[str, Any]], responses=_ERRORS)
    def host_history() -> dict[str, Any]:
        return _sync({"interval": service.history.interval,
                      "samples": service.history.totals()})

    # -- the web dashboard -------------------------------------------------------------------
    @app.post("/ui/session", include_in_schema=False)
    def login(request: Request, body: LoginRequest) -> JSONResponse:
        user = service.tokens.check(body.token)
        if user is None:
            raise AuthError("unknown or revoked token",
                            hint="create one on the host: vmkit token create NAME")
        session_id, session = service.sessions.open(user, auth.digest(body.token))
        service.audit.write(who=f"web:{user}@{_client(request)}", method="LOGIN",
                            path="/ui/session", status=200)
        return JSONResponse({"user": user, "csrf": session.csrf},
                            headers={"Set-Cookie": web.cookie_header(session_id),
                                     **web.SECURITY_HEADERS})

    @app.get("/ui/session", include_in_schema=False)
    def who_am_i(request: Request) -> JSONResponse:
        session = service.sessions.get(web.session_id(dict(request.scope["headers"])))
        return JSONResponse({"user": session.user if session else requestor(request),
                             "csrf": session.csrf if session else None},
                            headers=web.SECURITY_HEADERS)

    @app.delete("/ui/session", include_in_schema=False)
    def logout(request: Request) -> JSONResponse:
        service.sessions.close(web.session_id(dict(request.scope["headers"])))
        return JSONResponse({}, headers={"Set-Cookie": web.cookie_header("", clear=True),
                                         **web.SECURITY_HEADERS})

    root = web.web_root()

    def page(name: str) -> Response:
        if root is None:
            raise NotFound("the dashboard's files are not installed here",
                           hint="run make setup in vmkit's source tree (it installs web/), "
                                "or set VMKIT_WEB")
        return FileResponse(root / "static" / name, headers=web.SECURITY_HEADERS)

    @app.get("/ui/login", include_in_schema=False)
    def login_page() -> Response:
        return page("login.html")

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    def dashboard() -> Response:
        return page("index.html")

    if root is not None:
        app.mount("/ui/static", web.StaticPages(directory=root / "static"), name="ui-static")
        vendor = root / "node_modules" / "@xterm"
        if vendor.is_dir():
            app.mount("/ui/vendor/@xterm", web.StaticPages(directory=vendor), name="ui-vendor")
        novnc = root / "node_modules" / "@novnc" / "novnc"
        if novnc.is_dir():
            app.mount("/ui/vendor/@novnc/novnc", web.StaticPages(directory=novnc),
                      name="ui-vendor-novnc")

    return app


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _resize(vm: VM, cols: int, rows: int) -> None:
    """Tell the guest's serial terminal its new size (a serial line has no size of its own:
    the agent sets it, and the shell on it gets SIGWINCH)."""
    with contextlib.suppress(VmkitError):
        vm.exec(["stty", "-F", "/dev/ttyS0", "rows", str(rows), "cols", str(cols)], timeout=5)


def _check_fields(body: CreateRequest) -> None:
    """What a create request says, checked before anything starts; the error names the field
    (the dashboard's form shows it there)."""
    checks: list[tuple[str, Callable[[], object]]] = [
        ("name", lambda: validate_name(body.name)),
        ("image", lambda: validate_name(body.image, kind="image name")),
        ("cpus", lambda: parse_count(body.cpus, "cpus")),
        ("memory", lambda: parse_size(body.memory, field="memory", default_unit="M")),
        ("disk", lambda: body.disk is None or parse_size(body.disk, field="disk",
                                                         default_unit="G")),
        ("ports", lambda: [parse_forward(port) for port in body.ports]),
        ("networks", lambda: [validate_name(net, kind="network name") for net in body.networks]),
        ("boot", lambda: body.boot is None or parse_boot_order(body.boot)),
    ]
    for field, check in checks:
        try:
            check()
        except VmkitError as exc:
            exc.field = field
            raise
    for key in body.ssh_keys:
        if key.split(" ", 1)[0] not in KEY_TYPES:
            raise InvalidValue("invalid ssh key: send the public key line (ssh-ed25519 "
                               "AAAA...), not a file name", hint="the client reads the file",
                               field="ssh_keys")


def _check_host_paths(request: Request, body: CreateRequest) -> None:
    """A disk image or ISO named by a path on this host is read by the daemon (root): only a
    peer who could read it anyway may name one — root on the unix socket. Anyone else would
    have root lend them any file of the host (e.g. /etc/shadow as a CD)."""
    named = [field for field in ("from_disk", "iso", "shared")
             if getattr(body, field) is not None]
    if not named:
        return
    _require_local_root(request, named[0])
    for field in named:
        value = getattr(body, field)
        if not os.path.isabs(value):
            raise InvalidValue(f"invalid {field} {value!r}: an absolute path on the daemon's "
                               "host", field=field)


def _require_local_root(request: Request, field: str) -> None:
    peer: auth.Peer | None = request.scope.get("state", {}).get("peer")
    if peer is None or peer.transport != "unix" or peer.uid != 0:
        raise Forbidden(f"{field}: a path on the daemon's host is accepted only from root "
                        "on its unix socket", field=field,
                        hint="run the command as root on the host, or import a bundle")


def _split(value: str) -> list[str]:
    return [part for part in value.split(",") if part]


def _exec(vm: VM, body: ExecRequest) -> dict[str, Any]:
    try:
        stdin = base64.b64decode(body.stdin, validate=True) if body.stdin is not None else None
    except ValueError as exc:
        raise InvalidValue("invalid exec stdin: not base64") from exc
    result: ExecResult = vm.exec(body.argv, timeout=body.timeout, stdin=stdin)
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "signal": result.signal}


async def _receive(request: Request, spool: Path) -> Path:
    """The request body streamed to a private file in the spool (never held in memory)."""
    limit = shutil.disk_usage(spool).free - SPOOL_RESERVE
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"upload of {declared} bytes refused: the host has room for "
                       f"{max(0, limit)} (it keeps 1 GiB free)")
    fd, name = tempfile.mkstemp(dir=spool, prefix="upload-")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"upload refused after {size} bytes: the host has room "
                                   f"for {max(0, limit)} (it keeps 1 GiB free)")
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _resize_request(text: str) -> tuple[int, int] | None:
    if not text.startswith("{"):
        return None
    try:
        asked = json.loads(text)
        if asked.get("type") != "resize":
            return None
        cols, rows = int(asked["cols"]), int(asked["rows"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return (cols, rows) if 2 <= cols <= 1000 and 2 <= rows <= 1000 else None


def _stream_once(path: Path, folder: Path | None, headers: dict[str, str] | None = None
                 ) -> Response:
    """Send a spooled file, removing it once sent."""
    from starlette.background import BackgroundTask

    def cleanup() -> None:
        path.unlink(missing_ok=True)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    return FileResponse(path, media_type="application/octet-stream", headers=headers,
                        background=BackgroundTask(cleanup))


async def _pipe_unix(socket_: WebSocket, path: Path) -> None:
    """Bytes both ways between a websocket and a VM's unix socket (peer-checked: run/ is the
    VM's uid's, so what sits there may be planted) until either side ends."""
    try:
        sock = await asyncio.to_thread(peer.connect_unix, path, 10.0)
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
    except (OSError, VmkitError) as exc:
        reason = exc.message if isinstance(exc, VmkitError) else str(exc.strerror)
        await socket_.close(code=1011, reason=f"cannot reach the screen: {reason}"[:120])
        return

    async def to_client() -> None:
        while data := await reader.read(1 << 16):
            await socket_.send_bytes(data)

    async def to_screen() -> None:
        while True:
            message = await socket_.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(to_screen())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await socket_.close()


async def _bridge(socket_: WebSocket, hub: ConsoleHub, path: Path,
                  resize: Callable[[int, int], None] | None = None) -> None:
    """A websocket as one viewer of the VM's shared console (daemon/consoles.py). Binary
    frames are the terminal's bytes; a text frame {"type": "resize", "cols": C, "rows": R}
    resizes it (any other text frame is typed, as older clients send)."""
    try:
        viewer = await hub.join(path)
    except (VmkitError, OSError) as exc:
        await socket_.send_json({"type": "error", "error": str(exc)})
        await socket_.close()
        return

    async def to_client() -> None:
        while (data := await viewer.queue.get()) is not None:
            await socket_.send_bytes(data)

    wanted: dict[str, tuple[int, int]] = {}
    resizer: asyncio.Task[None] | None = None

    async def apply_resizes() -> None:
        """One resize at a time per console, the newest size winning (a burst of frames
        costs one or two agent calls, on a pool of their own)."""
        while wanted and resize is not None:
            cols, rows = wanted.pop("size")
            await asyncio.get_running_loop().run_in_executor(RESIZE_POOL, resize, cols, rows)

    async def to_console() -> None:
        nonlocal resizer
        while True:
            message = await socket_.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            size = _resize_request(text) if text and resize is not None else None
            if size is not None:
                wanted["size"] = size
                if resizer is None or resizer.done():
                    resizer = asyncio.create_task(apply_resizes())
                continue
            await viewer.send(message.get("bytes") or (text or "").encode())

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(to_console())]
    with contextlib.suppress(Exception):
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, resizer]:
        if task is not None:
            task.cancel()
    await hub.leave(viewer)
    with contextlib.suppress(Exception):
        await socket_.close()
