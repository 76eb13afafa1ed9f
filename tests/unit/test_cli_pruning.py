"""vmkit.cli.commands.app_for: a command builds only itself, and parses, helps and fails
exactly as it does in the whole app."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from vmkit.cli import commands
from vmkit.cli.commands import _command_name, app, app_for


def _every_command() -> list[list[str]]:
    words = [[_command_name(c)] for c in app.registered_commands]
    for group in app.registered_groups:
        assert group.typer_instance is not None
        words.append([group.name])
        words += [[group.name, _command_name(c)] for c in group.typer_instance.registered_commands]
    return words  # type: ignore[return-value]


WRONG = [[], ["--help"], ["nope"], ["snapshot"], ["snapshot", "nope"], ["info"],
         ["host", "set", "--bogus"], ["list", "--format", "xml"], ["--lock-timeout", "x", "info"],
         ["--lock-timeout", "3", "info", "--help"], ["--lock-timeout=3", "snapshot", "create"],
         ["--remote"], ["--bogus", "info", "x"], ["create", "bad_name!", "--memory", "lots"]]


@pytest.mark.parametrize("argv", [[*w, "--help"] for w in _every_command()] + WRONG,
                         ids=lambda argv: " ".join(argv) or "(none)")
def test_a_pruned_app_answers_as_the_whole_one(argv: list[str], tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path))
    monkeypatch.setenv("VMKIT_NO_DAEMON", "1")
    monkeypatch.delenv("VMKIT_REMOTE", raising=False)
    runner = CliRunner()
    whole = runner.invoke(app, argv)
    pruned = runner.invoke(app_for(argv), argv)
    assert (pruned.exit_code, pruned.output) == (whole.exit_code, whole.output)
    assert type(pruned.exception) is type(whole.exception)


class _Stop(Exception):
    pass


class _Recorder:
    """Stands for the host a command asks for: records the global options in force and the
    first call the command makes on it, then stops the command."""

    def __init__(self, seen: list[Any]) -> None:
        seen.append(dict(commands._state))
        self.seen = seen

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.seen.append((method, args, kwargs))
            if method == "get":
                return self
            raise _Stop

        return call


RUNNABLE = [["--lock-timeout", "7", "start", "web", "--wait", "--timeout", "9"],
            ["--lock-timeout=3", "snapshot", "create", "web", "s1"],
            ["--remote", "r1", "exec", "web", "--", "ls", "-l", "--help"],
            ["set", "web", "--cpus", "2", "--memory", "1G"],
            ["snapshot", "restore", "web", "s1"]]


@pytest.mark.parametrize("argv", RUNNABLE, ids=" ".join)
def test_a_pruned_command_runs_with_the_same_options(argv: list[str], monkeypatch) -> None:
    calls: dict[str, list[Any]] = {}
    for label, chosen in (("whole", app), ("pruned", app_for(argv))):
        seen: list[Any] = []
        monkeypatch.setattr(commands, "_host", lambda seen=seen: _Recorder(seen))
        monkeypatch.setitem(commands._state, "lock_timeout", None)
        monkeypatch.setitem(commands._state, "remote", None)
        result = CliRunner().invoke(chosen, argv)
        assert isinstance(result.exception, _Stop), (label, result.output)
        calls[label] = seen
    assert calls["pruned"] == calls["whole"]
    assert len(calls["whole"]) >= 2  # the command reached its host
    given = {"--lock-timeout": 7.0, "--lock-timeout=3": 3.0}.get(argv[0])
    if given is not None:  # the callback's options reached the state the command reads
        assert calls["pruned"][0]["lock_timeout"] == given
    if argv[0] == "--remote":
        assert calls["pruned"][0]["remote"] == "r1"


def test_only_the_named_command_is_built() -> None:
    one = app_for(["--lock-timeout", "3", "snapshot", "create", "web", "s1"])
    assert one.registered_commands == [] and [g.name for g in one.registered_groups] == ["snapshot"]
    inner = one.registered_groups[0].typer_instance
    assert inner is not None and [_command_name(c) for c in inner.registered_commands] == ["create"]
    assert [_command_name(c) for c in app_for(["start", "web"]).registered_commands] == ["start"]
    assert [_command_name(c) for c in app_for(["--remote=r", "exec", "w", "--", "ls"])
            .registered_commands] == ["exec"]
    for whole in (["--help"], ["nope"], [], ["--bogus", "start"]):
        assert app_for(whole) is app
    # the whole app is left as it was
    snapshot = next(g for g in app.registered_groups if g.name == "snapshot").typer_instance
    assert len(app.registered_commands) > 20 and snapshot is not None
    assert [_command_name(c) for c in snapshot.registered_commands] == [
        "create", "list", "restore", "delete"]
