"""agent.reseed's choice between the guest's helper and the shell version, against a scripted
guest agent on a UNIX socket: the shell runs only when the helper could not be started or is
too old to know --identity; never after the helper started, never past the caller's time.
And the agent client against a guest whose replies are of another shape (untrusted)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkit.qemu import agent


class FakeAgent:
    """Answers guest-sync and guest-exec as a guest would; `programs` says what each program
    does: ("missing",) the agent cannot start it; ("exit", code, stdout) it runs; a status
    error after the start with ("status-error",); ("runs-then-stalls", seconds) it runs, and
    after `seconds` the agent stops answering; ("says", reply) guest-exec's `return` is
    `reply`; ("outputs", status) its status is `status`; ("never-answers",) guest-exec gets
    no answer."""

    def __init__(self, path: Path, programs: dict[str, tuple[Any, ...]], *,
                 silent: bool = False, sync_delay: float = 0.0,
                 replies: dict[str, Any] | None = None) -> None:
        self.started: list[list[str]] = []
        self.programs, self.silent, self.sync_delay = programs, silent, sync_delay
        self.replies = replies or {}  # any other command: its `return`
        self._pids: dict[int, tuple[Any, ...]] = {}
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, body: dict[str, Any], *, sync: bool = False) -> None:
        conn.sendall((b"\xff" if sync else b"") + json.dumps(body).encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        for raw in conn.makefile("rb"):
            line = raw.lstrip(b"\xff").strip()
            if not line or self.silent:
                continue
            message = json.loads(line)
            command, arguments = message["execute"], message.get("arguments", {})
            if command in self.replies:
                self._reply(conn, {"return": self.replies[command]})
            elif command == "guest-sync-delimited":
                time.sleep(self.sync_delay)
                self._reply(conn, {"return": arguments["id"]}, sync=True)
            elif command == "guest-exec":
                argv = [arguments["path"], *arguments.get("arg", [])]
                self.started.append(argv)
                does = self.programs.get(arguments["path"], ("missing",))
                if does[0] == "missing":
                    self._reply(conn, {"error": {"class": "GenericError", "desc": (
                        f"Failed to execute child process “{argv[0]}” (No such file)")}})
                    continue
                if does[0] == "never-answers":
                    continue
                if does[0] == "says":
                    self._reply(conn, {"return": does[1]})
                    continue
                pid = len(self.started)
                self._pids[pid] = does if does[0] != "runs-then-stalls" else (
                    "stalls-at", time.monotonic() + does[1])
                self._reply(conn, {"return": {"pid": pid}})
            elif command == "guest-exec-status":
                does = self._pids[arguments["pid"]]
                if does[0] == "stalls-at":
                    if time.monotonic() < does[1]:
                        self._reply(conn, {"return": {"exited": False}})
                    continue  # from then on: no answer
                if does[0] == "outputs":
                    self._reply(conn, {"return": does[1]})
                    continue
                if does[0] == "status-error":
                    self._reply(conn, {"error": {"class": "GenericError",
                                                 "desc": "Invalid parameter 'pid'"}})
                    continue
                self._reply(conn, {"return": {"exited": True, "exitcode": does[1],
                                              "out-data": base64.b64encode(
                                                  does[2].encode()).decode()}})

    def close(self) -> None:
        self._server.close()


_MADE: list[FakeAgent] = []


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.sock"
    while _MADE:
        _MADE.pop().close()


def _agent(path: Path, programs: dict[str, tuple[Any, ...]], **kw: Any) -> FakeAgent:
    _MADE.append(FakeAgent(path, programs, **kw))
    return _MADE[-1]


IDENTITY = ("c1", ["52:54:00:00:00:01"])


def test_the_helper_alone_when_it_says_the_identity_is_set(sock: Path) -> None:
    fake = _agent(sock, {agent.RESEED_HELPER: ("exit", 0, agent.IDENTITY_SET + "\n")})
    done = agent.reseed(sock, 10, identity=IDENTITY)
    assert done is not None and done.ok
    assert fake.started == [[agent.RESEED_HELPER, "--identity", "c1", "52:54:00:00:00:01"]]


def test_no_helper_runs_the_shell_version(sock: Path) -> None:
    fake = _agent(sock, {"sh": ("exit", 0, "")})
    done = agent.reseed(sock, 10, identity=IDENTITY)
    assert done is not None and done.ok
    assert [argv[0] for argv in fake.started] == [agent.RESEED_HELPER, "sh"]
    assert "c1" in fake.started[1][2] and "52:54:00:00:00:01" in fake.started[1][2]


def test_an_old_helper_that_ignored_identity_is_followed_by_the_shell_version(
        sock: Path) -> None:
    fake = _agent(sock, {agent.RESEED_HELPER: ("exit", 0, ""), "sh": ("exit", 0, "")})
    done = agent.reseed(sock, 10, identity=IDENTITY)
    assert done is not None and done.ok
    assert [argv[0] for argv in fake.started] == [agent.RESEED_HELPER, "sh"]


def test_a_restore_takes_the_helpers_reseed_as_it_is(sock: Path) -> None:
    fake = _agent(sock, {agent.RESEED_HELPER: ("exit", 0, "")})
    done = agent.reseed(sock, 10)
    assert done is not None and done.ok and len(fake.started) == 1


def test_a_failed_identity_is_not_run_again(sock: Path) -> None:
    fake = _agent(sock, {agent.RESEED_HELPER: ("exit", agent.RESEED_FIRST_FAILED, "")})
    done = agent.reseed(sock, 10, identity=IDENTITY)
    assert done is not None and done.exit_code == agent.RESEED_FIRST_FAILED
    assert len(fake.started) == 1


def test_a_helper_that_started_is_never_run_twice(sock: Path) -> None:
    """An error after the start (its status) is the agent failing, not a missing helper."""
    fake = _agent(sock, {agent.RESEED_HELPER: ("status-error",), "sh": ("exit", 0, "")})
    assert agent.reseed(sock, 10, identity=IDENTITY) is None
    assert len(fake.started) == 1


def test_a_silent_agent_costs_the_callers_time_once(sock: Path) -> None:
    _agent(sock, {}, silent=True)
    started = time.monotonic()
    assert agent.reseed(sock, 1.5) is None
    assert time.monotonic() - started < 2.0  # not a second try after the first ran out


def test_an_agent_that_stops_answering_midway_costs_no_more_than_the_callers_time(
        sock: Path) -> None:
    """Each call waits for what is left, not for a whole timeout of its own (a status
    request sent at 1.2 s of 1.5 waited 1.5 s more)."""
    _agent(sock, {agent.RESEED_HELPER: ("runs-then-stalls", 1.2)})
    started = time.monotonic()
    assert agent.reseed(sock, 1.5) is None
    assert time.monotonic() - started < 1.9


def test_a_slow_sync_counts_against_the_same_time(sock: Path) -> None:
    """The sync that opens a session and the command after it share one deadline (a sync
    answered at 1.4 s of 1.5 gave guest-exec 1.5 s more)."""
    _agent(sock, {agent.RESEED_HELPER: ("never-answers",)}, sync_delay=1.2)
    started = time.monotonic()
    with pytest.raises(agent.OperationTimeout):
        agent.guest_exec(sock, [agent.RESEED_HELPER], timeout=1.5)
    assert time.monotonic() - started < 1.9


@pytest.mark.parametrize("does", [
    ("says", None), ("says", {"pid": "7"}), ("says", []),
    ("outputs", "done"), ("outputs", {"exited": True, "exitcode": "0"}),
    ("outputs", {"exited": True, "exitcode": 0, "out-data": "not base64!"}),
    ("outputs", {"exited": True, "exitcode": 0, "out-data": 12}),
])
def test_a_malformed_agent_reply_is_an_agent_error(sock: Path, does: tuple[Any, ...]) -> None:
    """The guest's replies are untrusted: a reply of another shape is the agent failing (a
    restore that succeeded is not reported as vmkit's bug), never a TypeError."""
    _agent(sock, {agent.RESEED_HELPER: does})
    with pytest.raises(agent.AgentError):
        agent.guest_exec(sock, [agent.RESEED_HELPER], timeout=5)
    assert agent.reseed(sock, 5) is None


def test_a_guests_malformed_interfaces_are_left_out_of_its_facts(sock: Path) -> None:
    """`vmkit info` shows what the guest reports; entries of another shape are dropped, not a
    KeyError reported as vmkit's bug."""
    _agent(sock, {"cat": ("exit", 0, "12.5 3.0\n")}, replies={
        "guest-get-osinfo": {"id": "x"}, "guest-get-host-name": {"host-name": "g"},
        "guest-network-get-interfaces": [
            {"name": "eth0", "ip-addresses": [{"ip-address": "198.18.0.5"}, {"prefix": 24},
                                              "junk"]},
            {"name": "eth1"}, {"name": "eth2", "ip-addresses": 5}, "junk", {"no": "name"},
            {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1"}]}]})
    facts = agent.guest_facts(sock, timeout=5)
    assert facts["addresses"] == {"eth0": ["198.18.0.5"], "eth1": []}
    assert facts["hostname"] == "g" and facts["uptime"] == 12.5


@pytest.mark.parametrize("chunk", [None, "x", {"buf-b64": "!!"}, {"buf-b64": 5}])
def test_a_malformed_file_chunk_is_an_agent_error(sock: Path, tmp_path: Path,
                                                  chunk: Any) -> None:
    _agent(sock, {}, replies={"guest-file-open": 7, "guest-file-read": chunk,
                              "guest-file-close": {}})
    with open(tmp_path / "out", "wb") as dest, pytest.raises(agent.AgentError):
        agent.copy_from_guest(sock, "/etc/hostname", dest, timeout=5, max_bytes=1 << 20)
