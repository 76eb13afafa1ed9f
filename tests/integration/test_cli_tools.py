"""doctor, images, console, logs, and the README's SDK snippet."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from vmkit.images.catalog import sha256_file


def test_doctor_reports_qemu_accelerator_and_capacity(home: Path) -> None:
    done = run_cli(home, "doctor", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["qemu"]["supported"]
    assert int(report["qemu"]["version"].split(".")[0]) >= 10
    assert report["capacity"]["cores"] == os.cpu_count()
    assert report["accelerator"]["chosen"] in ("tcg", "kvm")
    if Path("/sys/module/kvm_pvm").exists():
        assert report["accelerator"]["chosen"] == "tcg"
        assert "PVM" in report["accelerator"]["reason"]
    if report["accelerator"]["chosen"] == "tcg":
        assert "no hardware isolation guarantee" in report["accelerator"]["isolation_note"]
    assert report["cgroup"]["mounted"].startswith(("v1", "v2"))
    assert report["cgroup"]["used"] in ("v1", "v2")  # root: every VM gets its own cgroup
    human = run_cli(home, "doctor")
    assert "accelerator" in human.stdout and "capacity" in human.stdout


def test_doctor_without_qemu_fails_with_an_install_hint(home: Path) -> None:
    env = {**os.environ, "VMKIT_HOME": str(home), "PATH": "/nonexistent"}
    done = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "doctor"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "qemu-system-x86_64 is not installed" in done.stderr
    assert "bookworm-backports" in done.stderr


def test_image_build_is_cached_and_listed(image_home: Path) -> None:
    image_dir = image_home / "images/tiny"
    before = {p.name: p.stat().st_ino for p in image_dir.iterdir()}
    done = run_cli(image_home, "image", "build", "tiny", check=True)
    assert "up to date" in done.stderr
    assert {p.name: p.stat().st_ino for p in image_dir.iterdir()} == before
    images = json.loads(run_cli(image_home, "image", "list", "--format", "json").stdout)
    tiny = next(i for i in images if i["name"] == "tiny")
    assert tiny["kernel_version"].endswith("cloud-amd64")
    assert tiny["sha256"] == sha256_file(image_dir / tiny["root_disk"])
    assert tiny["size"] > 0 and "busybox" in tiny["os"]


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_console_talks_to_the_guest_and_ctrl_bracket_detaches(home: Path) -> None:
    assert run_cli(home, "create", "tty", "--start", "--wait").returncode == 0
    master, slave = pty.openpty()
    env = {**os.environ, "VMKIT_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "console", "tty"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    try:
        time.sleep(1.0)
        os.write(master, b"echo console-$((40+2))\r")
        assert b"console-42" in _read_until(master, b"console-42", 30)
        os.write(master, b"\x1d")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.stderr is not None and b"Ctrl-]" in proc.stderr.read()


def test_logs_and_follow(home: Path) -> None:
    assert run_cli(home, "create", "chatty", "--start", "--wait").returncode == 0
    assert "BusyBox" in run_cli(home, "logs", "chatty").stdout
    env = {**os.environ, "VMKIT_HOME": str(home)}
    follower = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "logs", "chatty",
                                 "--follow"], stdout=subprocess.PIPE, env=env)
    try:
        time.sleep(1.0)
        run_cli(home, "exec", "chatty", "--", "sh", "-c", "echo follow-marker > /dev/ttyS0",
                check=True)
        assert follower.stdout is not None
        assert b"follow-marker" in _read_until(follower.stdout.fileno(), b"follow-marker", 20)
    finally:
        follower.kill()
        follower.wait()


def test_exec_returns_the_guest_exit_code(home: Path) -> None:
    assert run_cli(home, "create", "runner", "--start", "--wait").returncode == 0
    done = run_cli(home, "exec", "runner", "--", "uname", "-a")
    assert done.returncode == 0 and done.stdout.startswith("Linux runner ")
    done = run_cli(home, "exec", "runner", "--", "sh", "-c", "echo oops >&2; exit 5")
    assert done.returncode == 5 and done.stderr == "oops\n"


def test_readme_sdk_snippet(home: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(home))
    from vmkit import Host

    host = Host()                                  # VMKIT_HOME or the default
    vm = host.create("web", image="tiny", cpus=2, memory="512M")
    vm.start(wait=True); print(vm.exec(["uname", "-a"]).stdout); vm.stop()  # noqa: E702
    assert capsys.readouterr().out.startswith("Linux web ")
    assert vm.state.value == "stopped"


def test_host_policy_is_shown_set_and_bad_values_change_nothing(home: Path) -> None:
    shown = json.loads(run_cli(home, "host", "show", "--format", "json").stdout)
    assert shown["tcg_cache"] == "auto"  # the default
    assert run_cli(home, "host", "set", "--tcg-cache", "qemu").returncode == 0
    assert json.loads(run_cli(home, "host", "show", "--format", "json").stdout
                      )["tcg_cache"] == "qemu"
    assert run_cli(home, "host", "set", "--vcpu-ratio", "8", "--memory-reserve", "2G",
                   "--tcg-cache", "48M").returncode == 0
    shown = json.loads(run_cli(home, "host", "show", "--format", "json").stdout)
    assert shown["vcpu_ratio"] == 8 and shown["memory_reserve"] == 2 << 30
    assert shown["tcg_cache"] == 48 << 20
    assert "48M of translated code" in run_cli(home, "host", "show").stdout
    for bad, said in ((["--vcpu-ratio", "0"], "--vcpu-ratio"), (["--ksm", "maybe"], "--ksm"),
                      (["--memory-reserve", "lots"], "memory reserve"), ([], "nothing to set"),
                      (["--tcg-cache", "1M"], "invalid --tcg-cache 1048576"),
                      (["--tcg-cache", "lots"], "tcg cache")):
        done = run_cli(home, "host", "set", *bad)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert json.loads(run_cli(home, "host", "show", "--format", "json").stdout) == shown
