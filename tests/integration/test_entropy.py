"""Fresh entropy: a restored memory snapshot or an instant clone does not replay its origin's RNG.

Why the guest must be old: Linux >= 5.18 reseeds its CRNG on its own every uptime/2 seconds
until it has been up 2 minutes, then every 60 s. A young guest would reseed between snapshot and
read anyway and hide a missing reseed. So the guest gets > 125 s of uptime and one forced reseed
right before the snapshot: for the next ~60 s of guest time (a restore resumes the guest's clock
where the snapshot stopped it) the kernel leaves its CRNG alone, and only vmkit's reseed
(vmkit.qemu.agent.reseed) can make two restores differ.

The control test (skipped; run it by hand) does the same with vmkit's reseed switched off and
shows that the outputs are then identical: the main test can fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import sh
from vmkit import VM, Host
from vmkit.model.views import ExecResult
from vmkit.qemu import agent

OLD_ENOUGH = 125.0  # seconds of guest uptime: past the kernel's early-boot reseed schedule
RESEED_TIMEOUT = 30.0
READ = "head -c 16 /dev/urandom | od -An -tx1"


def _uptime(vm: VM) -> float:
    return float(sh(vm, "cat /proc/uptime").split()[0])


def _old_guest(host: Host, name: str) -> VM:
    vm = host.create(name, start=True, wait=True)
    while (up := _uptime(vm)) < OLD_ENOUGH:
        time.sleep(max(1.0, OLD_ENOUGH - up))
    return vm


def _urandom(vm: VM) -> str:
    return " ".join(sh(vm, READ).split())


def _force_reseed(vm: VM) -> None:
    """Right before the snapshot: the kernel's own next reseed is then ~60 s of guest time away."""
    result = agent.reseed(vm.folder.agent_socket, RESEED_TIMEOUT)
    assert result is not None and result.ok, f"the guest did not reseed: {result}"


Reseed = Callable[..., "ExecResult | None"]


def _only_clones(source: VM, real: Reseed) -> Reseed:
    """agent.reseed that leaves `source` alone: the clone checks see the clone's reseed only,
    not one a restore of the source already did."""
    def reseed(socket_path: Path, timeout: float, **options: object) -> ExecResult | None:
        if socket_path == source.folder.agent_socket:
            return None
        return real(socket_path, timeout, **options)
    return reseed




def _restores(vm: VM) -> tuple[str, str]:
    reads = []
    for _ in range(2):
        vm.restore("s")
        reads.append(_urandom(vm))
    return reads[0], reads[1]


def _instant_clones(vm: VM) -> tuple[str, str, str]:
    """Two instant clones, each taken right after a restore of "s" (so both start from nearly
    the same RNG state): (source after the first clone, first clone, second clone)."""
    reads = []
    source_read = ""
    for name in ("c1", "c2"):
        vm.restore("s")
        clone = vm.clone(name, live=True)
        reads.append(_urandom(clone))
        if name == "c1":
            source_read = _urandom(vm)
        clone.kill()
    return source_read, reads[0], reads[1]


def test_restores_and_instant_clones_get_fresh_entropy(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = _old_guest(host, "ent")
    _force_reseed(vm)
    vm.snapshot("s")
    first, second = _restores(vm)
    assert first != second, "two restores of one memory snapshot replayed the same RNG output"

    monkeypatch.setattr(agent, "reseed", _only_clones(vm, agent.reseed))
    source, clone1, clone2 = _instant_clones(vm)
    assert clone1 != source, "an instant clone replayed its source's RNG output"
    assert clone1 != clone2, "two instant clones of one state replayed the same RNG output"


@pytest.mark.skip(reason="control: shows identical RNG output without a reseed; run by hand")
def test_control_without_reseed_the_outputs_repeat(
        host: Host, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The same steps with vmkit's reseed switched off (after the one before the snapshot): two
    restores read the same bytes, and so do two instant clones of one state. If this ever stops
    holding, the test above proves nothing and needs an older guest or a tighter schedule."""
    vm = _old_guest(host, "ent")
    _force_reseed(vm)
    vm.snapshot("s")
    monkeypatch.setattr(agent, "reseed", lambda socket_path, timeout: False)
    first, second = _restores(vm)
    source, clone1, clone2 = _instant_clones(vm)
    with capsys.disabled():
        print(f"\nrestore 1: {first}\nrestore 2: {second}\n"
              f"source:    {source}\nclone 1:   {clone1}\nclone 2:   {clone2}")
    assert first == second
    assert clone1 == clone2
