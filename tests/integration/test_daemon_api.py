"""The host service's front door: authentication on every route, TLS only on TCP, the unix
socket's peer check, revocation, the error contract, and a bounded schemathesis run."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import Daemon, cli, running_daemon

# creating VMs, images or networks, or recovering the host, is not for random data here
UNSAFE_FOR_FUZZING = (r"^/1\.0/(vms|images|networks|networks/reconcile)$|/nics$|/disks$|/clone$"
                      r"|^/1\.0/host/")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def daemon(image_home: Path) -> Iterator[Daemon]:
    with new_home(image_home) as home, running_daemon(home) as running:
        yield running


def _routes(daemon: Daemon) -> list[tuple[str, str]]:
    with daemon.unix_http() as client:
        schema = client.get("/1.0/openapi.json").json()
    routes = []
    for path, methods in schema["paths"].items():
        concrete = path.replace("{name}", "x").replace("{snapshot}", "s").replace(
            "{network}", "n").replace("{op_id}", "o").replace("{disk}", "d")
        routes += [(method.upper(), concrete) for method in methods]
    return routes


def test_every_route_refuses_a_client_without_credentials(daemon: Daemon) -> None:
    routes = _routes(daemon)
    assert len(routes) >= 30, routes
    with daemon.http() as anonymous, daemon.http(token="vmk_not-a-real-token") as forged:
        for method, path in [*routes, ("GET", "/1.0/openapi.json"), ("GET", "/nowhere")]:
            for client in (anonymous, forged):
                response = client.request(method, path)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error_class"] == "AuthError"
    context = ssl.create_default_context(cafile=str(daemon.server_cert))
    context.check_hostname = False
    for route in ("/1.0/events", "/1.0/vms/x/console", "/1.0/vms/x/exec", "/1.0/vms/x/vnc"):
        with pytest.raises(InvalidStatus):
            ws_connect(f"wss://{daemon.listen}{route}", ssl=context).close()
    # with the token, the same routes answer
    with daemon.http(token=daemon.token) as client:
        assert client.get("/1.0").json()["metadata"]["auth_method"] == "token"
        assert client.get("/1.0/vms/x").json()["error_class"] == "NotFound"


def test_a_revoked_token_is_refused_at_once(daemon: Daemon) -> None:
    token = cli(daemon.home, "token", "create", "short-lived").stdout.strip()
    assert token.startswith("vmk_")
    with daemon.http(token=token) as client:
        assert client.get("/1.0/vms").status_code == 200
        listing = cli(daemon.home, "token", "list", "--format", "json").stdout
        assert "short-lived" in listing and token not in listing  # only a hash is kept
        assert token not in (daemon.home / "daemon" / "tokens.json").read_text()
        assert cli(daemon.home, "token", "revoke", "short-lived").returncode == 0
        refused = client.get("/1.0/vms")
        assert refused.status_code == 401
        assert "revoked" in refused.json()["error"]


def test_plain_http_on_the_tls_port_is_refused(daemon: Daemon) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{daemon.listen}/1.0", timeout=10,
                  headers={"Authorization": f"Bearer {daemon.token}"})
    # and a client that does not know the pinned certificate refuses the server
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://{daemon.listen}/1.0", timeout=10)


def test_the_daemon_sends_nothing_after_the_tls_handshake_until_asked(daemon: Daemon) -> None:
    """No TLS 1.3 session ticket after the handshake: websockets' threaded client wakes for
    any readable byte and then blocks reading on the socket, and a ticket read that way while
    it writes its request left the websocket handshake hanging (seen under load in CI)."""
    import select

    context = ssl.create_default_context(cafile=str(daemon.server_cert))
    context.check_hostname = False
    host, port = daemon.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        assert tls.version() == "TLSv1.3"
        readable, _, _ = select.select([tls], [], [], 2)
        assert readable == [], "the daemon sent TLS records nobody asked for"
        tls.sendall(b"GET /1.0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 401")


def test_a_client_certificate_from_the_daemons_ca_is_let_in(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    assert cli(daemon.home, "trust", "issue", "laptop", "--out", str(tmp_path)).returncode == 0
    context = ssl.create_default_context(cafile=str(daemon.server_cert))
    context.check_hostname = False
    context.load_cert_chain(tmp_path / "laptop.crt", tmp_path / "laptop.key")
    with httpx.Client(base_url=daemon.url, verify=context) as client:
        assert client.get("/1.0").json()["metadata"]["requestor"].startswith("cert:laptop@")
        assert cli(daemon.home, "trust", "revoke", "laptop").returncode == 0
    with httpx.Client(base_url=daemon.url, verify=context) as client:
        assert client.get("/1.0").status_code == 401


def _as_nobody_connect(path: Path) -> subprocess.CompletedProcess[str]:
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('refused', e.errno); "
            "sys.exit(0)\n"
            "try:\n"
            " s.sendall(b'GET /1.0 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
            " s.settimeout(10)\n"
            " print('answer', repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            " print('closed')\n")
    return subprocess.run([*NOBODY, sys.executable, "-c", code, str(path)], text=True,
                          capture_output=True, timeout=30, check=False)


def test_the_unix_socket_refuses_a_peer_outside_its_group(daemon: Daemon) -> None:
    assert (daemon.socket.stat().st_mode & 0o777) == 0o660
    done = _as_nobody_connect(daemon.socket)
    assert done.stdout.startswith("refused 13"), done  # EACCES: the kernel's check
    # even with the file mode opened up, SO_PEERCRED turns the stranger away unanswered
    os.chmod(daemon.socket, 0o666)
    try:
        done = _as_nobody_connect(daemon.socket)
    finally:
        os.chmod(daemon.socket, 0o660)
    assert done.stdout.strip() in ("closed", "answer b''"), done
    # root (the daemon's own user) is answered on the same socket
    with daemon.unix_http() as client:
        assert client.get("/1.0").json()["metadata"]["requestor"].startswith("unix:uid=0")


def test_errors_carry_the_sdk_class_and_the_cli_split(daemon: Daemon) -> None:
    with daemon.unix_http() as client:
        missing = client.get("/1.0/vms/ghost")
        assert missing.status_code == 404 and missing.json()["error_class"] == "NotFound"
        bad = client.post("/1.0/vms", json={"name": "Bad_Name!"})
        assert bad.status_code == 400 and bad.json()["error_class"] == "InvalidValue"
        assert "name" in bad.json()["error"]
        unknown_field = client.post("/1.0/vms", json={"name": "ok", "cpu": 2})
        assert unknown_field.status_code == 400
        key_file = client.post("/1.0/vms", json={"name": "k", "ssh_keys": ["/etc/shadow"]})
        assert key_file.status_code == 400 and "not a file name" in key_file.json()["error"]
        bad_op = client.get("/1.0/operations/nope/wait", params={"timeout": 0})
        assert bad_op.status_code == 404
    # the SDK raises the same classes; the CLI through the daemon exits 2 for a wrong request
    from vmkit.errors import NotFound

    with daemon.local() as host, pytest.raises(NotFound):
        host.get("ghost")
    done = cli(daemon.home, "info", "ghost")
    assert done.returncode == 2 and "unknown VM 'ghost'" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_uploaded_garbage_bundle_is_refused_and_leaves_nothing(daemon: Daemon) -> None:
    with daemon.unix_http() as client:
        started = client.post("/1.0/vms/import", params={"name": "junk"},
                              content=os.urandom(200_000))
        assert started.status_code == 202
        op = client.get(f"{started.headers['Location']}/wait", params={"timeout": 60}).json()
        assert op["metadata"]["status"] == "failure"
        assert op["metadata"]["error"]["error_code"] == 400
        assert client.get("/1.0/vms/junk").status_code == 404
    assert not [p for p in (daemon.home / "daemon" / "spool").iterdir()]


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(daemon: Daemon) -> None:
    """Bounded: every read route, and the mutating routes that cannot create VMs, images or
    networks in the host (those are exercised by the lifecycle tests)."""
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{daemon.url}/1.0/openapi.json",
         "--url", daemon.url, "-H", f"Authorization: Bearer {daemon.token}",
         "--tls-verify", "false", "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "15", "--phases", "examples,coverage,fuzzing", "--workers", "1",
         "--request-timeout", "60",
         "--exclude-path-regex", UNSAFE_FOR_FUZZING,
         "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    tested = re.search(r"Tested: (\d+)", done.stdout)
    assert tested is not None and int(tested.group(1)) >= 25, tail
    assert "passed" in done.stdout.lower() or "no issues" in done.stdout.lower(), tail


def test_nothing_listens_on_tcp_without_tls(daemon: Daemon) -> None:
    host, port = daemon.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /1.0 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"HTTP/1.1 200" not in answer and b"vmkit" not in answer


def test_detach_writes_a_pidfile_and_stop_ends_it(image_home: Path) -> None:
    """Without systemd: --detach returns once the socket answers; --stop ends the daemon."""
    with new_home(image_home) as home:
        socket_path, pidfile, log = (Path(f"{home}.{s}") for s in ("sock", "pid", "log"))
        started = cli(home, "daemon", "--detach", "--socket", str(socket_path), "--pidfile",
                      str(pidfile), "--log", str(log))
        assert started.returncode == 0, started.stderr
        pid = int(pidfile.read_text())
        assert f"vmkit daemon {pid} listening on {socket_path}" in started.stderr
        assert Path(f"/proc/{pid}").exists() and socket_path.is_socket()
        # a second daemon for the same home is refused, with the reason
        again = cli(home, "daemon", "--detach", "--socket", f"{socket_path}2", "--pidfile",
                    f"{pidfile}2", "--log", str(log))
        assert again.returncode == 1 and "another vmkit daemon serves" in again.stderr + \
            log.read_text()
        # the local CLI finds it and goes through it
        assert cli(home, "create", "noted").returncode == 0
        assert '"path": "/1.0/vms"' in (home / "daemon" / "audit.log").read_text()
        stopped = cli(home, "daemon", "--stop", "--pidfile", str(pidfile))
        assert stopped.returncode == 0 and f"stopped daemon {pid}" in stopped.stderr
        assert not Path(f"/proc/{pid}").exists()
        assert not socket_path.exists() and not pidfile.exists()
        assert cli(home, "list").returncode == 0  # and without it, the CLI runs the engine


@pytest.mark.timeout(120)
def test_revoking_a_token_closes_its_open_websockets(daemon: Daemon) -> None:
    from websockets.exceptions import ConnectionClosed

    token = cli(daemon.home, "token", "create", "watcher").stdout.strip()
    context = ssl.create_default_context(cafile=str(daemon.server_cert))
    context.check_hostname = False
    # seen once in CI: no handshake answer in 10 s, then the client hung joining its reader
    # thread; the daemon's stacks are printed (captured output of the failure) if it is slow
    diagnose = threading.Timer(20, lambda: print(daemon.stacks(), flush=True))
    diagnose.start()
    try:
        events = ws_connect(f"wss://{daemon.listen}/1.0/events", ssl=context, open_timeout=30,
                            additional_headers={"Authorization": f"Bearer {token}"})
    finally:
        diagnose.cancel()
    with events:
        assert cli(daemon.home, "token", "revoke", "watcher").returncode == 0
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while time.monotonic() - started < 15:
                events.recv(timeout=15)
        assert time.monotonic() - started < 10
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    audit = (daemon.home / "daemon" / "audit.log").read_text()
    assert "credentials revoked: closed" in audit


def test_a_host_path_is_taken_only_from_root_on_the_unix_socket(daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    """An ISO or foreign disk named by path is opened by the daemon as root: a token client
    (another machine, or a user who cannot read the file) is refused, with the field named;
    root on the unix socket (who could read it anyway) is served."""
    from tests.integration.anyos_media import data_iso
    from vmkit.errors import AuthError

    iso = data_iso(tmp_path, "MEDIA", {"a.txt": "a\n"})
    remote = daemon.remote()
    for kwargs in ({"iso": "/etc/shadow"}, {"from_disk": "/etc/shadow"}):
        with pytest.raises(AuthError, match="only from root on its unix socket"):
            remote.create("lent", **kwargs)  # type: ignore[arg-type]
    assert "lent" not in [vm.name for vm in remote.vms()]
    local = daemon.local()
    vm = local.create("lent", iso=str(iso), firmware="uefi")
    assert vm.status().media == str(iso)
    with pytest.raises(AuthError, match="path: a path on the daemon's host"):
        remote.get("lent").attach_media("/etc/shadow")
    assert local.get("lent").eject_media() == str(iso)
    local.get("lent").delete()
