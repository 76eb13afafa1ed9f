"""The host service with real guests: crash detection when it happens, the restart policy,
autostart, direct CLI use noticed, the daemon killed (-9) in the middle of operations and
started again (VMs adopted, none duplicated, operations resolved, events resume), metrics,
exec and the console over websockets."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import unix_connect

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import Daemon, Events, cli, qemu_count, running_daemon
from vmkit.errors import InvalidState
from vmkit.model.state import VmState


@pytest.fixture(scope="module")
def daemon(image_home: Path) -> Iterator[Daemon]:
    with new_home(image_home) as home, running_daemon(home) as running:
        yield running


@pytest.fixture
def events(daemon: Daemon) -> Iterator[Events]:
    listener = Events(daemon)
    yield listener
    listener.close()


def _wait_state(vm: object, state: VmState, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.status().state is state:  # type: ignore[attr-defined]
            return
        time.sleep(0.1)
    raise AssertionError(f"{vm} not {state.value}: {vm.status()}")  # type: ignore[attr-defined]


def test_a_crash_is_seen_within_a_second_and_on_failure_restarts_it(daemon: Daemon,
                                                                   events: Events) -> None:
    host = daemon.local()
    vm = host.create("phoenix", restart="on-failure", start=True, wait=True)
    first = vm.status()
    assert first.state is VmState.RUNNING and first.pid
    killed_at = time.time()
    os.kill(first.pid, signal.SIGKILL)
    crashed = events.wait_for("phoenix", "crashed", timeout=10)
    assert crashed["timestamp"] - killed_at < 1.0, crashed
    assert crashed["metadata"]["reason"] == "crash"
    assert "signal" in crashed["metadata"]["description"] or "killed" in \
        crashed["metadata"]["description"], crashed
    restarted = events.wait_for("phoenix", "restarted", timeout=60)
    _wait_state(vm, VmState.RUNNING)
    second = vm.status()
    assert second.pid != first.pid and qemu_count(second.uuid) == 1
    actions = events.actions("phoenix")
    assert actions.index("crashed") < actions.index("restarted"), actions
    assert restarted["metadata"]["attempt"] == 1
    vm.delete(force=True)


def test_with_policy_no_a_crashed_vm_stays_crashed(daemon: Daemon, events: Events) -> None:
    vm = daemon.local().create("stays-down", start=True)
    _wait_state(vm, VmState.RUNNING)
    os.kill(vm.status().pid or 0, signal.SIGKILL)
    events.wait_for("stays-down", "crashed", timeout=10)
    time.sleep(4)
    assert vm.status().state is VmState.CRASHED
    assert "restarted" not in events.actions("stays-down")
    vm.delete(force=True)


def test_a_vm_stopped_by_its_user_is_never_restarted(daemon: Daemon, events: Events) -> None:
    vm = daemon.local().create("resting", restart="always", start=True, wait=True)
    done = cli(daemon.home, "stop", "resting", "--timeout", "20")  # through the daemon
    assert done.returncode == 0, done.stderr
    events.wait_for("resting", "stopped", timeout=30)
    audit = (daemon.home / "daemon" / "audit.log").read_text()  # the CLI went through the daemon
    assert '"path": "/1.0/vms/resting/state"' in audit and '"who": "unix:uid=0' in audit
    time.sleep(4)
    assert vm.status().state is VmState.STOPPED
    assert not {"restart-scheduled", "restarted"} & set(events.actions("resting"))
    vm.delete()


def test_direct_cli_use_is_noticed_by_the_daemon(daemon: Daemon, events: Events) -> None:
    direct = {"VMKIT_NO_DAEMON": "1"}
    assert cli(daemon.home, "create", "sidestep", env=direct).returncode == 0
    events.wait_for("sidestep", "created", timeout=5)
    assert cli(daemon.home, "start", "sidestep", env=direct).returncode == 0
    started = events.wait_for("sidestep", "started", timeout=5)
    assert started["metadata"]["pid"]
    # the daemon's API sees it running, and its lock is the CLI's lock
    assert daemon.local().get("sidestep").status().state is VmState.RUNNING
    assert cli(daemon.home, "delete", "sidestep", "--force", env=direct).returncode == 0
    events.wait_for("sidestep", "deleted", timeout=5)


def test_metrics_exec_and_console_over_the_api(daemon: Daemon) -> None:
    vm = daemon.local().create("shown", start=True, wait=True)
    with daemon.unix_http() as client:
        text = client.get("/1.0/metrics").text
    for needle in ('vmkit_vm_state{state="running",vm="shown"} 1.0',
                   'vmkit_vm_cpu_seconds_total{vm="shown"}',
                   'vmkit_vm_memory_bytes{kind="rss",vm="shown"}',
                   'vmkit_vm_disk_bytes_total{direction="read",vm="shown"}',
                   'vmkit_vm_restarts_total{vm="shown"}', 'vmkit_host_capacity{resource="cpus"}',
                   'vmkit_host_allocated{resource="memory_bytes"}',
                   'vmkit_api_request_seconds_bucket'):
        assert needle in text, needle
    with unix_connect(str(daemon.socket), "ws://vmkit/1.0/vms/shown/exec") as ws:
        ws.send(json.dumps({"argv": ["sh", "-c", "echo hi from $(hostname)"]}))
        answer = json.loads(ws.recv(timeout=60))
    assert answer["type"] == "result" and answer["exit_code"] == 0
    assert answer["stdout"].strip() == "hi from shown"
    with unix_connect(str(daemon.socket), "ws://vmkit/1.0/vms/shown/console") as ws:
        ws.send(b"\recho console-$((6*7))\r")
        seen = b""
        deadline = time.monotonic() + 30
        while b"console-42" not in seen and time.monotonic() < deadline:
            message = ws.recv(timeout=30)
            seen += message if isinstance(message, bytes) else message.encode()
    assert b"console-42" in seen
    vm.delete(force=True)


def test_an_export_can_be_cancelled_and_leaves_nothing(daemon: Daemon) -> None:
    vm = daemon.local().create("parcel")
    with daemon.unix_http() as client:
        started = client.post("/1.0/vms/parcel/export").json()
        op_id = started["metadata"]["id"]
        assert started["metadata"]["may_cancel"] is True
        client.delete(f"/1.0/operations/{op_id}")
        final = client.get(f"/1.0/operations/{op_id}/wait", params={"timeout": 120}).json()
    status = final["metadata"]["status"]
    if status == "cancelled":
        assert final["metadata"]["error"]["error_class"] == "Cancelled"
    else:  # it finished before the cancel arrived: then it must have succeeded
        assert status == "success", final
    spool = daemon.home / "daemon" / "spool"
    assert not [p for p in spool.iterdir() if status == "cancelled"]
    assert vm.status().state is not VmState.BROKEN
    assert not list((daemon.home / "vms" / "parcel").glob("*.partial"))
    vm.delete()


@pytest.mark.parametrize(("fault", "operation"), [
    ("snapshot:memory-saved", "snapshot"), ("clone:snapshot-taken", "clone")])
def test_the_daemon_killed_during_an_operation_comes_back_without_harm(
        image_home: Path, fault: str, operation: str) -> None:
    with new_home(image_home) as home:
        daemon = Daemon(home)
        try:
            daemon.start(env={"VMKIT_FAULT": fault})  # dies (SIGKILL) at that step
            host = daemon.local()
            vm = host.create("keeper", start=True, wait=True)
            bystander = host.create("bystander", start=True)
            _wait_state(bystander, VmState.RUNNING)
            before = {v.name: v.status() for v in host.vms()}
            with daemon.unix_http() as client:
                if operation == "snapshot":
                    client.post("/1.0/vms/keeper/snapshots", json={"name": "s1"})
                else:
                    client.post("/1.0/vms/keeper/clone", json={"target": "copy"})
            assert daemon.process is not None
            assert daemon.process.wait(timeout=120) == -signal.SIGKILL
            assert (home / "vms" / "keeper" / "journal.json").exists()  # cut mid-operation
            daemon.start()  # no fault this time: recovers, adopts
            host = daemon.local()
            listener = Events(daemon)
            for name, status in before.items():
                now = host.get(name).status()
                assert now.state is VmState.RUNNING, now
                assert now.pid == status.pid, f"{name} was restarted"
                assert qemu_count(status.uuid) == 1, f"{name} runs twice"
            assert not (home / "vms" / "keeper" / "journal.json").exists()
            assert {v.name for v in host.vms()} <= {"keeper", "bystander", "copy"}
            if operation == "snapshot":
                assert [s.name for s in vm.snapshots()] in ([], ["s1"])
            vm = host.get("keeper")
            assert vm.exec(["true"]).exit_code == 0  # the guest runs, unpaused
            vm.pause()
            listener.wait_for("keeper", "paused", timeout=10)  # events resume
            vm.resume()
            listener.wait_for("keeper", "resumed", timeout=10)
            with pytest.raises(InvalidState):
                vm.resume()
            listener.close()
        finally:
            daemon.stop()


def test_autostart_once_per_boot(image_home: Path) -> None:
    with new_home(image_home) as home:
        direct = {"VMKIT_NO_DAEMON": "1"}
        assert cli(home, "create", "early", "--autostart", env=direct).returncode == 0
        assert cli(home, "create", "late", env=direct).returncode == 0
        with running_daemon(home) as daemon:
            host = daemon.local()
            _wait_state(host.get("early"), VmState.RUNNING)
            assert host.get("late").status().state is VmState.DEFINED
            assert cli(home, "stop", "early").returncode == 0
        # the daemon restarts within the same boot: a VM its user stopped stays stopped
        with running_daemon(home) as daemon:
            time.sleep(3)
            assert daemon.local().get("early").status().state is VmState.STOPPED
        # a new boot (the marker gone) starts it again
        (home / "daemon" / "autostart.boot").unlink()
        with running_daemon(home) as daemon:
            _wait_state(daemon.local().get("early"), VmState.RUNNING)


def test_the_remote_sdk_moves_files_and_bundles_and_has_an_async_twin(
        daemon: Daemon, tmp_path: Path) -> None:
    import asyncio

    import vmkit

    host = daemon.local()
    vm = host.create("courier", start=True, wait=True)
    source = tmp_path / "script.sh"
    source.write_bytes(b"#!/bin/sh\necho carried\n")
    source.chmod(0o750)
    assert vm.copy_in(source, "/root/script.sh") == source.stat().st_size
    assert vm.exec(["/root/script.sh"]).stdout.strip() == "carried"
    back = tmp_path / "back.sh"
    assert vm.copy_out("/root/script.sh", back) == source.stat().st_size
    assert back.read_bytes() == source.read_bytes() and (back.stat().st_mode & 0o777) == 0o750
    vm.stop()
    progress: list[tuple[int, int]] = []
    bundle = tmp_path / "courier.vmkit"
    manifest = vm.export(bundle, progress=lambda done, total: progress.append((done, total)))
    assert bundle.stat().st_size > 0 and manifest and (bundle.stat().st_mode & 0o777) == 0o600
    copy = host.import_bundle(bundle, name="courier-copy")
    assert copy.status().uuid != vm.status().uuid
    assert not list((daemon.home / "daemon" / "spool").iterdir())  # nothing left in transit

    async def async_side() -> list[str]:
        remote = vmkit.connect_async(f"unix://{daemon.socket}")
        found = await remote.get("courier-copy")
        assert (await found.status()).state is VmState.DEFINED
        return [v.name for v in await remote.statuses()]

    assert {"courier", "courier-copy"} <= set(asyncio.run(async_side()))
    copy.delete()
    vm.delete()


def test_network_metrics_count_what_a_vm_sends_and_receives(image_home: Path) -> None:
    """The daemon in a network namespace of its own (bridges and taps stay there)."""
    import subprocess

    namespace = f"vmk-metrics-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        with new_home(image_home) as home:
            daemon = Daemon(home, prefix=("ip", "netns", "exec", namespace))
            try:
                daemon.start()
                host = daemon.local()
                net = host.create_network("mnet", mode="isolated")
                vm = host.create("talker", networks=["mnet"], start=True, wait=True)
                ping = vm.exec(["sh", "-c", f"ping -c 5 -W 2 {net.gateway}"], timeout=60)
                assert ping.exit_code == 0, ping.stdout + ping.stderr
                with daemon.unix_http() as client:
                    text = client.get("/1.0/metrics").text
                counters = {}
                for line in text.splitlines():
                    if line.startswith("vmkit_vm_network_") and 'vm="talker"' in line:
                        name, value = line.rsplit(" ", 1)
                        counters[name] = float(value)
                for direction in ("sent", "received"):
                    key = (f'vmkit_vm_network_bytes_total{{direction="{direction}",'
                           f'network="mnet",vm="talker"}}')
                    assert counters.get(key, 0) > 5 * 84, (key, counters)  # 5 pings at least
                    packets = key.replace("_bytes_", "_packets_")
                    assert counters.get(packets, 0) >= 5, (packets, counters)
                vm.delete(force=True)
                host.delete_network("mnet")
            finally:
                daemon.stop()
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def test_a_crash_while_the_vms_lock_is_held_is_still_restarted(daemon: Daemon,
                                                                events: Events) -> None:
    """The exit is seen (and not saved) while another command holds the VM's lock; saved
    later by that command, it is the same exit: restarted once the lock is free."""
    from vmkit import Host

    vm = daemon.local().create("held", restart="on-failure", start=True, wait=True)
    first = vm.status().pid
    engine = Host(daemon.home)
    with engine._vm_lock("held"):  # as a long snapshot or export would
        os.kill(first or 0, signal.SIGKILL)
        events.wait_for("held", "crashed", timeout=10)
        time.sleep(3)  # the restart is due while the lock is held
    events.wait_for("held", "restarted", timeout=60)
    _wait_state(vm, VmState.RUNNING)
    assert vm.status().pid != first
    vm.delete(force=True)


def test_a_restart_pending_when_the_daemon_dies_happens_when_it_is_back(
        image_home: Path) -> None:
    with new_home(image_home) as home:
        daemon = Daemon(home)
        try:
            daemon.start()
            vm = daemon.local().create("patient", restart="on-failure", start=True, wait=True)
            listener = Events(daemon)
            first = vm.status().pid
            os.kill(first or 0, signal.SIGKILL)
            listener.wait_for("patient", "restart-scheduled", timeout=10)
            daemon.kill()  # within the 1 s backoff
            listener.close()
            engine_vm = vmkit_host(home).get("patient")
            assert engine_vm.status().state is VmState.CRASHED
            daemon.start()
            _wait_state(daemon.local().get("patient"), VmState.RUNNING)
            # the supervisor counts the restart once the start has returned
            deadline = time.monotonic() + 10
            while True:
                record = json.loads((home / "daemon" / "restarts.json").read_text())["patient"]
                if record["restarts"] == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert record["restarts"] == 1 and record["pending_exit"] is None
        finally:
            daemon.stop()


def vmkit_host(home: Path) -> object:
    from vmkit import Host

    return Host(home)


def test_vmkit_console_and_logs_through_the_daemon(daemon: Daemon) -> None:
    """The CLI's console and logs when a daemon serves the home: the websocket bridge and the
    log read from an offset, with Ctrl-] detaching as locally."""
    import pty
    import subprocess
    import sys

    from tests.integration.test_cli_tools import _read_until

    daemon.local().create("remote-tty", start=True, wait=True)
    master, slave = pty.openpty()
    # websockets' connect() outside `with` (deprecated in 17.1) fails the test
    env = {**os.environ, "VMKIT_HOME": str(daemon.home), "PYTHONWARNINGS":
           "error:connect() must be used as a context manager:DeprecationWarning"}
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "console", "remote-tty"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    try:
        time.sleep(1.5)
        os.write(master, b"echo bridged-$((40+2))\r")
        assert b"bridged-42" in _read_until(master, b"bridged-42", 30)
        os.write(master, b"\x1d")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.stderr is not None and b"detached from remote-tty" in proc.stderr.read()
    audit = (daemon.home / "daemon" / "audit.log").read_text()
    assert '"path": "/1.0/vms/remote-tty/console"' in audit  # it went through the daemon
    logs = cli(daemon.home, "logs", "remote-tty")
    assert logs.returncode == 0 and "bridged-42" in logs.stdout
    daemon.local().get("remote-tty").delete(force=True)
