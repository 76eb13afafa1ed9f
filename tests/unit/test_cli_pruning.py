"""vmkit.cli.commands.app_for: a command builds only itself, and parses, helps and fails
exactly as it does in the whole app."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

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
    assert len(app.registered_commands) > 20 and len(app.registered_groups[0].typer_instance
                                                     .registered_commands) > 1
