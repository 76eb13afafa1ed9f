"""The fast `vmkit list` (vmkit.cli.fast): what it imports, and that it prints byte for byte
what the full CLI (vmkit.cli.commands, typer) prints, through a daemon and in-process; the
plain tables of vmkit.cli.render against rich's."""

from __future__ import annotations

import http.server
import io
import itertools
import json
import os
import random
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from vmkit.cli import fast, render
from vmkit.errors import OperationTimeout
from vmkit.model.views import VmStatus

#: never imported by `vmkit list` through a daemon (ssl and the client: ~15 ms of a listing)
HEAVY = ("vmkit.core", "vmkit.qemu", "vmkit.host", "vmkit.ops", "vmkit.cli.commands", "typer",
         "click", "rich", "httpx", "pydantic", "asyncio", "ssl", "vmkit.client.remotes")
FULL_CLI = "import sys; from vmkit.cli.commands import app; app()"
FAST_CLI = """import sys
modules = sys.argv.pop(1)
from vmkit.cli.main import main
try:
    main()
finally:
    with open(modules, "w") as out:
        out.write("\\n".join(sorted(k for k, v in sys.modules.items() if v is not None)))
"""


def _statuses() -> list[dict[str, Any]]:
    from vmkit.model.network import Nic, PortForward
    from vmkit.model.restart import RestartPolicy
    from vmkit.model.runtime import ExitRecord
    from vmkit.model.spec import Limits
    from vmkit.model.views import Usage

    common: dict[str, Any] = {
        "cpus": 1, "memory": 256 << 20, "disk": 2 << 30, "image": "tiny",
        "uuid": "9e92d5fa-7bd6-41e2-b88f-fba0a961ae03", "mac": "52:54:00:a9:21:45",
        "pid": None, "uptime": None, "accel": None, "accel_reason": None,
        "isolation_note": None, "machine": "pc-q35-10.0", "cpu_model": "qemu64",
        "folder": "/var/lib/vmkit/vms/x", "disk_mode": "overlay", "last_exit": None,
        "max_cpus": 2, "max_memory": 1 << 30, "limits": Limits()}
    return [VmStatus.model_validate(s).model_dump(mode="json") for s in (
        {**common, "name": "a-defined", "state": "defined"},
        {**common, "name": "web", "state": "running", "cpus": 4, "memory": 3 << 29,
         "disk": 10 << 30, "pid": 4242, "uptime": 3725.25, "accel": "kvm",
         "accel_reason": "/dev/kvm usable", "limits": Limits(cpu_limit=150.0, disk_iops=900),
         "usage": Usage(cpu_seconds=1.5, cpu_percent_avg=2.0, rss=1 << 28,
                        cgroup_memory=None, vcpus=4, memory_plugged=3 << 29,
                        memory_actual=3 << 29, disk_read=1, disk_written=2),
         "nics": [Nic(network="user", mac="52:54:00:00:00:02", forwards=(
             PortForward(host_port=8080, guest_port=80),))],
         "guest": {"hostname": "web", "addresses": {"eth0": ["10.0.2.15"]}},
         "restart_policy": RestartPolicy(mode="always"),
         "restarts": {"attempts": 0, "restarts": 2, "last_reason": None}},
        {**common, "name": "crashy", "state": "crashed", "accel": "tcg",
         "last_exit": ExitRecord(at=1.5, reason="crash", status=-9, description="killed")},
        {**common, "name": "bad", "state": "broken", "broken": "vm.json cannot be read",
         "image": "", "machine": "", "cpu_model": "", "disk_mode": ""},
    )]


class _Daemon(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status, body, version = self.server.answer  # type: ignore[attr-defined]
        if version:
            self.protocol_version = version
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, _Server]]:
    """A VMKIT_HOME whose daemon.json names a fake daemon (this process) answering GET
    /1.0/vms with `server.answer` (status, body, HTTP version or None)."""
    folder = Path(tempfile.mkdtemp(prefix="vmkt-", dir="/tmp"))  # short: a socket path
    server = _Server(str(folder / "d.sock"), _Daemon)
    server.answer = (200, json.dumps(  # type: ignore[attr-defined]
        {"type": "sync", "status": "Success", "status_code": 200, "metadata": _statuses()}
    ).encode(), None)
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "daemon.json").write_text(json.dumps(
        {"pid": os.getpid(), "socket": str(folder / "d.sock")}))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield tmp_path, server
    finally:
        server.shutdown()
        server.server_close()
        (folder / "d.sock").unlink(missing_ok=True)
        folder.rmdir()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMKIT_REMOTE", "VMKIT_NO_DAEMON", "COLUMNS", "LINES", "FORCE_COLOR",
                        "TTY_COMPATIBLE")}
    return {**env, "VMKIT_HOME": str(home), **extra}


def _fast(args: list[str], env: dict[str, str], tmp_path: Path
          ) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    modules = tmp_path / "modules.txt"
    done = subprocess.run([sys.executable, "-c", FAST_CLI, str(modules), *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return done, set(modules.read_text().split())


def _full(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", FULL_CLI, *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["list"], ["list", "--format", "json"],
                                  ["--lock-timeout=3", "list", "--format=table"]])
def test_list_through_a_daemon_is_the_full_clis_without_its_imports(
        daemon: tuple[Path, _Server], tmp_path: Path, args: list[str]) -> None:
    home, _ = daemon
    quick, modules = _fast(args, _env(home), tmp_path)
    full = _full(args, _env(home))
    assert (quick.returncode, quick.stdout, quick.stderr) == (0, full.stdout, full.stderr)
    assert "1h02m" in quick.stdout or '"uptime": 3725.25' in quick.stdout
    heavy = sorted(m for m in modules if m.startswith(HEAVY))
    assert heavy == [], f"`vmkit list` through a daemon imported {heavy[:8]}"


@pytest.mark.parametrize("no_daemon", ["", "1"])
def test_a_closed_stdout_ends_list_quietly_as_typer_does(
        daemon: tuple[Path, _Server], no_daemon: str) -> None:
    home, _ = daemon
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "list"],
                            env=_env(home, VMKIT_NO_DAEMON=no_daemon), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # `vmkit list | true`
    _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (1, b"")


def test_list_of_another_shape_goes_through_the_full_client(
        daemon: tuple[Path, _Server], tmp_path: Path) -> None:
    home, server = daemon
    statuses = _statuses()
    statuses[0]["from_a_newer_daemon"] = True
    server.answer = (200, json.dumps(  # type: ignore[attr-defined]
        {"type": "sync", "metadata": statuses}).encode(), None)
    quick, modules = _fast(["list"], _env(home), tmp_path)
    assert quick.returncode == 0 and "a-defined" in quick.stdout
    assert "httpx" in modules and "vmkit.cli.commands" in modules
    # the full CLI through a daemon loads neither the engine (~0.2 s) nor httpx's own command
    # line (pygments' lexers, ~40 ms), nor asyncio and qemu.qmp (only a QMP session needs them)
    unneeded = sorted(m for m in modules if m.startswith(
        ("vmkit.core", "vmkit.host", "vmkit.ops", "vmkit.isolation", "pygments", "httpx._main",
         "asyncio", "qemu.")))
    assert unneeded == [], f"the full CLI through a daemon imported {unneeded[:8]}"


@pytest.mark.parametrize("answer", [
    (500, b'{"error": "boom", "error_class": "HostError"}', None),
    (200, b'{"metadata": []}', "HTTP/1.0"),
    (200, b'{"metadata": [{"name": "x"}]}', None),
    (200, b"[]", None),
    (200, b"not json", None),
])
def test_any_other_answer_is_left_to_the_full_client(
        daemon: tuple[Path, _Server], answer: tuple[int, bytes, str | None]) -> None:
    home, server = daemon
    server.answer = answer  # type: ignore[attr-defined]
    socket_path = json.loads((home / "daemon" / "daemon.json").read_text())["socket"]
    assert fast._from_daemon(socket_path) is None
    server.answer = (200, json.dumps({"metadata": _statuses()}).encode(), None)  # type: ignore[attr-defined]
    assert fast._from_daemon(socket_path) == _statuses()


def test_a_daemon_that_does_not_answer_times_out_as_the_full_client_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(tempfile.mkdtemp(prefix="vmkt-", dir="/tmp"))
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(folder / "d.sock"))
    mute.listen()
    monkeypatch.setattr("vmkit.client.remote.REQUEST_TIMEOUT", 0.2)
    try:
        with pytest.raises(OperationTimeout, match=r"^the vmkit daemon at unix://.*d\.sock did "
                                                   r"not answer in time: timed out$"):
            fast._from_daemon(str(folder / "d.sock"))
    finally:
        mute.close()
        (folder / "d.sock").unlink()
        folder.rmdir()


@pytest.mark.parametrize("args", [["list"], ["list", "--format", "json"]])
def test_list_in_process_is_the_full_clis(tmp_path: Path, args: list[str]) -> None:
    """Direct (no daemon), with VMs whose metadata cannot be read."""
    (tmp_path / "vms" / "bad").mkdir(parents=True)
    (tmp_path / "vms" / "bad" / "vm.json").write_text(json.dumps(
        {"spec": {"cpus": 2, "memory": 1 << 30, "disk": 3 << 30}, "uuid": "u-1"}))
    (tmp_path / "vms" / "worse").mkdir()
    (tmp_path / "vms" / "worse" / "vm.json").write_text("not json")
    env = _env(tmp_path / "home", VMKIT_NO_DAEMON="1")
    for home in (tmp_path / "home", tmp_path):  # no VM, then two broken ones
        env["VMKIT_HOME"] = str(home)
        quick, modules = _fast(args, env, tmp_path)
        full = _full(args, env)
        assert (quick.returncode, quick.stdout, quick.stderr) == (0, full.stdout, full.stderr)
        assert "typer" not in modules and "rich" not in modules
    assert "worse  broken" in quick.stdout or '"name": "worse"' in quick.stdout


@pytest.mark.parametrize("no_daemon", [True, False])
def test_a_remembered_listing_imports_only_what_it_reads(tmp_path: Path, no_daemon: bool
                                                        ) -> None:
    """Answered from the engine's memo (storage/statuscache.py), with VMKIT_NO_DAEMON or
    with no daemon serving the home: besides json and re, no typing, pathlib or socket
    (~10 ms of a listing of 100 VMs) and nothing of the engine."""
    (tmp_path / "vms" / "bad").mkdir(parents=True)
    (tmp_path / "vms" / "bad" / "vm.json").write_text("not json")
    env = _env(tmp_path, **({"VMKIT_NO_DAEMON": "1"} if no_daemon else {}))
    first, _ = _fast(["list"], env, tmp_path)  # the engine lists and remembers
    again, modules = _fast(["list"], env, tmp_path)
    assert (again.returncode, again.stdout) == (0, first.stdout) and "bad" in again.stdout
    loaded = sorted(m for m in modules if m.split(".")[0] in (
        "typing", "pathlib", "socket", "importlib", "urllib") or m.startswith(HEAVY))
    assert loaded == [], loaded


@pytest.mark.parametrize(("argv", "parsed"), [
    (["list"], (None, False)),
    (["list", "--format", "json"], (None, True)),
    (["list", "--format=table"], (None, False)),
    (["--lock-timeout", "2.5", "list"], (2.5, False)),
    (["--lock-timeout=1e1", "list", "--format", "json"], (10.0, True)),
    (["list", "--help"], None),
    (["list", "--format", "yaml"], None),
    (["list", "--format", "JSON"], None),
    (["list", "--format", "json", "--format", "json"], None),
    (["list", "web"], None),
    (["image", "list"], None),
    (["snapshot", "list", "web"], None),
    (["--remote", "lab", "list"], None),
    (["--lock-timeout", "soon", "list"], None),
    (["--lock-timeout", "list", "list"], None),
    (["list", "--lock-timeout", "3"], None),
    ([], None),
])
def test_only_plain_list_is_taken(argv: list[str], parsed: tuple[float | None, bool] | None
                                  ) -> None:
    assert fast._parse(argv) == parsed


def test_vmkit_remote_goes_to_the_full_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_REMOTE", "lab")
    assert fast.run(["list"]) is None


def _shape(model: type[BaseModel]) -> dict[str, Any]:
    def inner(annotation: Any) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return _shape(annotation)
        if get_origin(annotation) in (list, tuple):
            item = inner(get_args(annotation)[0])
            return [item] if item is not None else None
        if get_origin(annotation) in (Union, UnionType):
            return next((found for arg in get_args(annotation)
                         if (found := inner(arg)) is not None), None)
        return None

    return {name: inner(field.annotation) for name, field in model.model_fields.items()}


def test_the_status_shape_is_vmstatus() -> None:
    """fast.STATUS_SHAPE lists VmStatus's keys (and its nested models'): update it with the
    model, or every `vmkit list` through a daemon takes the slow path."""
    assert _shape(VmStatus) == fast.STATUS_SHAPE


class _Stdout(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _tables() -> Iterator[tuple[list[str], list[list[str]], bool, dict[str, str]]]:
    yield render.LIST_COLUMNS, [], False, {}
    yield render.LIST_COLUMNS, [["vm000", "defined", "1", "256M", "2G", "-", "-", "-"]], True, {}
    yield ["", ""], [["name", "web"], ["uptime", "1h02m"]], False, {}
    yield ["A", "B"], [["  indented", "trailing  "], ["x", ""]], True, {"TERM": "dumb"}
    yield ["A", "B"], [["a" * 70, "b" * 20]], False, {}  # wider than 80: left to rich
    yield ["A"], [["[bold]x[/bold]"], [":smile:"]], False, {}  # markup, emoji: rich
    yield ["A", "B"], [["mac", "52:54:00:a9:21:45"], ["at", "12:30:01"]], True, {}
    yield ["A"], [["x:smile:y"], ["a :+1: b"], [":smile-text:"], [":Smile:"]], False, {}
    yield ["A"], [["::"], [":a:b:"], [": :"], ["https://198.18.0.1:8443/ui"]], False, {}
    rng = random.Random(11)
    plain, special = "abcXYZ019 -._/%()<>=,+@#!?'\"{}|~^&*$`;:[]\\", "é\t\x1b"
    emoji = [":smile:", ":+1:", ":thumbs_up:", ":red_heart-emoji:", ":x:", ":nope:"]
    for _ in range(1000):
        width = rng.randint(1, 6)

        def cell() -> str:
            text = "".join(rng.choice(special if rng.random() < 0.01 else plain)
                           for _ in range(rng.choice([0, 1, 3, 8, 30])))
            if rng.random() < 0.05:
                cut = rng.randint(0, len(text))
                text = text[:cut] + rng.choice(emoji) + text[cut:]
            return text

        env = {key: rng.choice(values) for key, values in (
            ("COLUMNS", ["0", "20", "80", "200", "x"]), ("LINES", ["10"]),
            ("TERM", ["dumb", "unknown", "xterm-256color"]), ("FORCE_COLOR", ["", "1"]),
            ("TTY_COMPATIBLE", ["0", "1", "2"]), ("NO_COLOR", ["1"]))
            if rng.random() < 0.2}
        yield ([cell() for _ in range(width)],
               [[cell() for _ in range(width)] for _ in range(rng.randint(0, 3))],
               rng.random() < 0.5, env)


def test_plain_tables_are_riches(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    plain = 0
    for columns, rows, tty, env in _tables():
        for key in ("COLUMNS", "LINES", "TERM", "FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR",
                    "COLORTERM"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "stdout", _Stdout(tty))
        fast_text = render._plain_table(columns, rows)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(Text(column))
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        Console(highlight=False, markup=False, emoji=False).print(table)
        rich_text = sys.stdout.getvalue()
        if fast_text is not None:
            plain += 1
            assert fast_text == rich_text, (columns, rows, tty, env)
        monkeypatch.setattr(sys, "stdout", _Stdout(tty))
        render.__dict__.pop("out", None)  # rich reads the environment when a console is made
        render.table(columns, rows)
        assert sys.stdout.getvalue() == rich_text, (columns, rows, tty, env)
    assert plain > 200


DATA = ["52:54:00:ab:cd:ef", "fd00::1:abcd:1234:5", ":smile:", "[/x]", "[bold]b[/bold]",
        "a\\[b]"]


@pytest.mark.parametrize("plainly", [True, False])
def test_data_is_printed_as_it_is(monkeypatch: pytest.MonkeyPatch, plainly: bool) -> None:
    """A MAC whose 4th octet reads as an emoji code (:ab:), an address, and a guest's text
    with markup: printed verbatim by the plain path and through rich (a wide character in
    the header sends the table there), never an emoji, markup applied or a MarkupError."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", _Stdout(False))
    render.__dict__.pop("out", None)
    columns = ["KEY", "VALUE" if plainly else "VALUE é"]
    rows = [[f"k{i}", value] for i, value in enumerate(DATA)]
    assert (render._plain_table(columns, rows) is not None) == plainly
    render.table(columns, rows)
    printed = sys.stdout.getvalue()
    for value in DATA:
        assert value in printed, (value, printed)
    monkeypatch.setattr(sys, "stderr", _Stdout(False))
    render.__dict__.pop("err", None)
    render.err.print(f"NIC {DATA[0]} added; {DATA[3]}")
    assert sys.stderr.getvalue() == f"NIC {DATA[0]} added; {DATA[3]}\n"


def _messages() -> Iterator[str]:
    yield "cloned web to web2 (defined)"
    yield "\ndetached from web"
    yield "problem: the disk is full\nhint: free some space"
    yield "x" * 80
    yield "x" * 81
    yield "trailing space "
    yield f"VM web: NIC {DATA[0]} on lan"
    yield "a wide é character"
    rng = random.Random(11)
    words = ["vm", "web", ":ab:", "[bold]", "é", "  ", "a" * 30, "\n", "\t", "-", "1.5s"]
    for _ in range(300):
        yield "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 12)))


def test_messages_are_printed_as_rich_prints_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """render.say writes what `err.print` would, byte for byte, in each environment; most
    messages without a rich console."""
    from rich.console import Console

    plain = 0
    envs: list[dict[str, str]] = [{}, {"COLUMNS": "40"}, {"COLUMNS": "120", "LINES": "30"},
                                  {"TERM": "dumb"}, {"FORCE_COLOR": "1"}]
    for text in _messages():
        for env, tty in itertools.product(envs, (False, True)):
            for key in ("COLUMNS", "LINES", "TERM", "FORCE_COLOR", "TTY_COMPATIBLE",
                        "NO_COLOR", "COLORTERM"):
                monkeypatch.delenv(key, raising=False)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            monkeypatch.setattr(sys, "stderr", _Stdout(tty))
            Console(stderr=True, highlight=False, markup=False, emoji=False).print(text)
            expected = sys.stderr.getvalue()
            monkeypatch.setattr(sys, "stderr", _Stdout(tty))
            render.__dict__.pop("err", None)
            render.say(text)
            assert sys.stderr.getvalue() == expected, (text, env, tty)
            plain += "err" not in render.__dict__
    assert plain > 500
