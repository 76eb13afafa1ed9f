"""Issue 10: a freeze that times out is still thawed. The guest's agent is restarted with an
fsfreeze hook that stalls for longer than vmkit waits for the freeze; the freeze completes in
the guest after vmkit gave up on it, and vmkit's thaw (retried) must still undo it."""

from __future__ import annotations

import time

from tests.integration.conftest import sh
from vmkit import Host, VmkitError
from vmkit.core.layers import FREEZE_TIMEOUT
from vmkit.qemu import agent

STALL = int(FREEZE_TIMEOUT) + 6


def test_a_freeze_that_times_out_leaves_the_guest_thawed(host: Host) -> None:
    vm = host.create("stall")
    vm.start(wait=True)
    sh(vm, f"printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep {STALL}\\nexit 0\\n' > /root/hook"
           " && chmod 755 /root/hook"
           " && sed -i 's|-t /run/qemu-ga|-t /run/qemu-ga -F/root/hook|' /etc/inittab")
    # restart the agent with the hook (detached: this very command runs inside the agent, and
    # init's re-read of inittab may restart it before its answer was read)
    vm.exec(["sh", "-c", "(sleep 1; kill -HUP 1; sleep 1; killall qemu-ga) >/dev/null 2>&1 "
                         "</dev/null &"])
    time.sleep(1)
    time.sleep(3)
    vm.wait_ready(timeout=60)
    assert "-F/root/hook" in sh(vm, "cat /proc/$(pidof qemu-ga)/cmdline | tr '\\0' ' '")

    started = time.monotonic()
    node = vm.snapshot("during-stall", disk_only=True)
    assert node.quiesced is False  # vmkit gave up on the freeze after FREEZE_TIMEOUT
    assert time.monotonic() - started >= FREEZE_TIMEOUT
    deadline = time.monotonic() + 60
    status = "unknown"
    while time.monotonic() < deadline:
        try:
            with agent.AgentConnection(vm.folder.agent_socket, timeout=10) as conn:
                status = conn.call("guest-fsfreeze-status", timeout=10)
            break
        except VmkitError:
            time.sleep(1)
    assert status == "thawed"
    assert sh(vm, "echo written > /root/after && sync && cat /root/after") == "written"
