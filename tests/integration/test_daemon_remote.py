"""The remote CLI: a second network namespace (198.18.77.0/30) adds the daemon as a remote —
its certificate fingerprint shown and pinned — and runs create, start, exec, snapshot, stop and
delete through it. The output and exit codes are those of the local CLI running the same
commands on the same host (pids and durations aside)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import cli, free_port, running_daemon

HOST_ADDRESS = "198.18.77.1"
CLIENT_ADDRESS = "198.18.77.2"


@pytest.fixture
def client_namespace() -> Iterator[str]:
    tag = uuid.uuid4().hex[:6]
    namespace, outside, inside = f"vmk-remote-{tag}", f"vmkr{tag}a", f"vmkr{tag}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", namespace)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", namespace)
        ip("addr", "add", f"{HOST_ADDRESS}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", namespace, "addr", "add", f"{CLIENT_ADDRESS}/30", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


SCRIPT = [
    ("create", "twin", "--memory", "192M"),
    ("start", "twin", "--wait"),
    ("exec", "twin", "--", "sh", "-c", "echo hello from $(hostname); exit 3"),
    ("snapshot", "create", "twin", "first"),
    ("snapshot", "list", "twin", "--format", "json"),
    ("info", "twin", "--format", "json"),
    ("stop", "twin"),
    ("disk", "add", "twin", "data", "--size", "32M"),
    ("disk", "list", "twin", "--format", "json"),
    ("disk", "remove", "twin", "data"),
    ("disk", "remove", "twin", "data"),
    ("delete", "twin"),
    ("info", "twin"),
]


def _normal(text: str) -> str:
    """Pids, times, durations and sizes vary from run to run; the rest must not."""
    text = re.sub(r'"(created_at|uptime|pid|at|folder|uuid|mac|memory_bytes|disk_bytes|'
                  r'started_at)": [^,}\n]+', r'"\1": X', text)
    return re.sub(r"\d+(\.\d+)?", "N", text)


STABLE = ("name", "state", "cpus", "memory", "disk", "image", "machine", "cpu_model",
          "disk_mode", "hostname", "parent", "depth", "with_memory", "taken_in", "current")


def _comparable(done: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    stdout = done.stdout
    if stdout.startswith(("{", "[")):  # --format json: same keys, same stable values
        data = json.loads(stdout)
        rows = data if isinstance(data, list) else [data]
        stdout = json.dumps([{k: (row[k] if k in STABLE else type(row[k]).__name__)
                              for k in sorted(row)} for row in rows])
    return done.returncode, _normal(stdout), _normal(done.stderr)


def test_remote_cli_from_another_namespace_matches_the_local_cli(
        image_home: Path, client_namespace: str, tmp_path: Path) -> None:
    with new_home(image_home) as home, running_daemon(
            home, listen=f"{HOST_ADDRESS}:{free_port(HOST_ADDRESS)}") as daemon:
        config = tmp_path / "client-config"
        remote_env = {"VMKIT_CONFIG_DIR": str(config), "VMKIT_HOME": str(tmp_path / "none")}
        prefix = ("ip", "netns", "exec", client_namespace)
        fingerprint = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
             str(daemon.server_cert)], capture_output=True, text=True, check=True
        ).stdout.split("=", 1)[1].strip().replace(":", "").lower()
        # a wrong fingerprint is refused and nothing is added
        wrong = cli(home, "remote", "add", "lab", daemon.url, "--token", daemon.token,
                    "--accept-fingerprint", "00" * 32, env=remote_env, prefix=prefix)
        assert wrong.returncode == 2 and "refusing" in wrong.stderr
        added = cli(home, "remote", "add", "lab", daemon.url, "--token", daemon.token,
                    "--accept-fingerprint", fingerprint, env=remote_env, prefix=prefix)
        assert added.returncode == 0, added.stderr
        assert fingerprint in added.stderr and "you are token:" in added.stderr
        assert CLIENT_ADDRESS in added.stderr  # the daemon saw the namespace's address
        remote = [cli(home, "--remote", "lab", *step, env=remote_env, prefix=prefix)
                  for step in SCRIPT]
        local = [cli(home, *step, env={"VMKIT_NO_DAEMON": "1"}) for step in SCRIPT]
        for step, theirs, ours in zip(SCRIPT, remote, local, strict=True):
            assert _comparable(theirs) == _comparable(ours), (step, theirs, ours)
        assert remote[2].returncode == 3 and "hello from twin" in remote[2].stdout
        assert remote[8].returncode == 0 and json.loads(remote[8].stdout)[0]["name"] == "data"
        assert remote[10].returncode == 2 and "no disk named 'data'" in remote[10].stderr
        assert remote[-1].returncode == 2 and "Traceback" not in remote[-1].stderr
        # the remote's requests are in the daemon's audit log, with who made them
        audit = (home / "daemon" / "audit.log").read_text()
        assert f"@{CLIENT_ADDRESS}:" in audit and '"path": "/1.0/vms/twin/snapshots"' in audit


def test_a_remote_without_credentials_or_with_a_revoked_token_fails_cleanly(
        image_home: Path, tmp_path: Path) -> None:
    with new_home(image_home) as home, running_daemon(home) as daemon:
        env = {"VMKIT_CONFIG_DIR": str(tmp_path)}
        none = cli(home, "remote", "add", "lab", daemon.url, env=env)
        assert none.returncode == 2 and "--token" in none.stderr
        token = cli(home, "token", "create", "brief").stdout.strip()
        fingerprint = cli(home, "remote", "add", "lab", daemon.url, "--token", token,
                          "--accept-fingerprint", "ab" * 32, env=env).stderr
        real = re.search(r"[0-9a-f]{64}", fingerprint)
        assert real is not None
        assert cli(home, "remote", "add", "lab", daemon.url, "--token", token,
                   "--accept-fingerprint", real.group(0), env=env).returncode == 0
        assert cli(home, "--remote", "lab", "list", env=env).returncode == 0
        assert cli(home, "token", "revoke", "brief").returncode == 0
        refused = cli(home, "--remote", "lab", "list", env=env)
        assert refused.returncode == 2, refused
        assert "revoked" in refused.stderr and "Traceback" not in refused.stderr
        unknown = cli(home, "--remote", "elsewhere", "list", env=env)
        assert unknown.returncode == 2 and "unknown remote 'elsewhere'" in unknown.stderr
    assert os.path.exists(tmp_path / "remotes.json")
    assert (os.stat(tmp_path / "remotes.json").st_mode & 0o777) == 0o600
    assert sys.executable
