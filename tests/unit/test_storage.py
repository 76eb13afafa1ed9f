import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from vmkit.errors import LockTimeout
from vmkit.qemu.process import ProcessIdentity, describe_exit, is_alive, start_ticks
from vmkit.storage.layout import file_lock, lock_is_free, write_json_atomic


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "vm.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["vm.json"]


def _hold(path: str, seconds: float) -> None:
    with file_lock(Path(path), timeout=1, what="test"):
        time.sleep(seconds)


def test_second_locker_waits_then_fails_clearly(tmp_path: Path) -> None:
    lock = tmp_path / "vm-web.lock"
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(str(lock), 3))
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while lock_is_free(lock) and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info, file_lock(lock, timeout=0.5, what="VM 'web'"):
            pass
        assert time.monotonic() - started >= 0.5
        assert "VM 'web' is busy" in info.value.message
        assert f"pid {holder.pid}" in info.value.message
    finally:
        holder.join()
    assert lock_is_free(lock)  # released when its holder exited


def test_recycled_pid_is_not_taken_for_the_vm() -> None:
    me = os.getpid()
    ticks = start_ticks(me)
    assert ticks is not None
    # our own process is alive, but its argv has no -uuid: not a VM
    assert not is_alive(ProcessIdentity(me, ticks), "some-uuid")
    # right pid, wrong start time: a recycled pid
    assert not is_alive(ProcessIdentity(me, ticks + 1), "some-uuid")


def test_exit_descriptions() -> None:
    assert describe_exit(137) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(None) == "exit status unknown"


def test_only_the_vms_qemu_counts_not_its_waiter() -> None:
    from vmkit.qemu.process import is_vm_qemu, waiter_argv

    qemu = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web", "-uuid", "u-1", "-m", "256M"]
    assert is_vm_qemu(qemu, "u-1")
    assert not is_vm_qemu(qemu, "u-2")
    assert not is_vm_qemu(waiter_argv(Path("/run/exit"), qemu), "u-1")
    assert not is_vm_qemu(["/usr/bin/qemu-system-x86_64", "-name", "u-1"], "u-1")


@pytest.mark.parametrize("given", ["/srv/vmkit", "rel/home", "~/vk", "./a/../b/"])
def test_home_path_is_default_homes_as_a_string(given: str, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The fast `vmkit list` path's string and the engine's Path name one folder."""
    from vmkit.storage.home import default_home, home_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("VMKIT_HOME", given)
    assert Path(home_path()) == Path(given).expanduser().absolute() == default_home()


def test_a_home_that_cannot_be_expanded_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit.errors import InvalidValue
    from vmkit.storage.home import home_path

    monkeypatch.setenv("VMKIT_HOME", "~no-such-user-here/vk")
    with pytest.raises(InvalidValue, match="VMKIT_HOME"):
        home_path()
