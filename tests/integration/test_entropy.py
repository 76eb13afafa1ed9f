"""Fresh entropy: a restored memory snapshot or an instant clone does not replay its origin's RNG.

Two things are checked. What a user cares about: reads of /dev/urandom after two restores of
one memory snapshot differ, and so do an instant clone's and its source's. And that vmkit is
what makes it so: it reseeds the guest's CRNG with host entropy after each restore and in each
instant clone (vmkit.qemu.agent.reseed), and the guest says the reseed succeeded.

The guest is young on purpose (seconds of uptime). With the restore's reseed removed, two
restores then read the same bytes and this test fails (checked 2026-12-02). An older guest hides
it: Debian's 6.1 kernel, with a virtio-rng feeding its input pool, gave two restores different
bytes without vmkit's reseed at 40 s and at 125 s of uptime, so waiting for an old guest proved
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import sh
from vmkit import VM, Host
from vmkit.model.views import ExecResult
from vmkit.qemu import agent

READ = "head -c 16 /dev/urandom | od -An -tx1"

Reseed = Callable[..., "ExecResult | None"]


class ReseedSpy:
    """agent.reseed as it is, remembering which guest it reseeded and what the guest said."""

    def __init__(self, real: Reseed) -> None:
        self.real = real
        self.done: list[tuple[Path, ExecResult | None]] = []

    def __call__(self, socket_path: Path, timeout: float, **options: object
                 ) -> ExecResult | None:
        result = self.real(socket_path, timeout, **options)
        self.done.append((socket_path, result))
        return result

    def succeeded_in(self, vm: VM) -> int:
        return sum(1 for path, result in self.done
                   if path == vm.folder.agent_socket and result is not None and result.ok)


def _urandom(vm: VM) -> str:
    return " ".join(sh(vm, READ).split())


def test_restores_and_instant_clones_get_fresh_entropy(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = host.create("ent", start=True, wait=True)
    vm.snapshot("s")
    spy = ReseedSpy(agent.reseed)
    monkeypatch.setattr(agent, "reseed", spy)

    reads = []
    for _ in range(2):
        vm.restore("s")
        reads.append(_urandom(vm))
    assert reads[0] != reads[1], "two restores of one memory snapshot replayed the same RNG output"
    assert spy.succeeded_in(vm) == 2, f"a restore did not reseed its guest: {spy.done}"

    # each clone taken right after a restore of "s": both start from (nearly) one RNG state
    clones, source = [], ""
    for name in ("c1", "c2"):
        vm.restore("s")
        clone = vm.clone(name, live=True)
        clones.append(_urandom(clone))
        if name == "c1":
            source = _urandom(vm)
        assert spy.succeeded_in(clone) == 1, f"clone {name} was not reseeded: {spy.done}"
        clone.kill()
    assert source != clones[0], "an instant clone replayed its source's RNG output"
    assert clones[0] != clones[1], "two instant clones of one state replayed the same RNG output"
