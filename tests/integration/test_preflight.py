"""Hardware independence, checked before a move: a real destination daemon describes what its
QEMU offers (query-machines, query-cpu-definitions under its accelerator) and its room; the
source lists every reason its VM cannot go there, touching nothing. `vmkit cpu-baseline`
names the newest CPU model every host runs, and `create --cpu-model` pins it."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import cli, running_daemon
from vmkit import Host


def test_preflight_against_a_real_destination_lists_every_reason(image_home: Path) -> None:
    with new_home(image_home) as source_home, new_home(image_home) as target_home, \
            running_daemon(target_home) as target:
        source = Host(source_home)
        baseline = cli(source_home, "cpu-baseline", "local").stdout.strip()
        assert baseline == "Westmere"  # what TCG gives with every feature (recorded)
        vm = source.create("mover", cpu_model=baseline, start=True, wait=True)
        assert vm.exec(["grep", "-c", "^processor", "/proc/cpuinfo"]).exit_code == 0
        destination = target.local()
        caps = destination.capabilities()
        assert caps.accel == "tcg" and vm.config.hardware.machine in caps.machines
        assert caps.cpu_models[baseline] == ()
        assert vm.check_move(caps) == []  # it fits
        before = sorted(p.name for p in (target_home / "vms").iterdir())

        destination.create("mover")  # the name is taken there
        target.unix_http().put("/1.0/host/policy", json={"memory_ratio": 0.01})
        hardware = vm.config.hardware.model_copy(update={
            "cpu_model": "Skylake-Client", "machine": "pc-q35-99.0"})
        vm.save_config(vm.config.model_copy(update={"hardware": hardware}))  # as if made
        caps = destination.capabilities()                                    # on a newer host
        reasons = vm.check_move(caps)
        text = "\n".join(reasons)
        assert "a VM named 'mover' exists" in text
        assert "machine type pc-q35-99.0 is not offered" in text and "older than the VM's" \
            in text
        assert "CPU model Skylake-Client lacks features on the destination (tcg)" in text
        assert "not enough memory on the destination" in text
        assert len(reasons) == 4, reasons
        assert vm.check_move(caps, name="moved") == reasons[1:]  # --name clears the first
        # nothing was touched on either side by checking
        assert sorted(p.name for p in (target_home / "vms").iterdir()) == [*before, "mover"]
        # the same check, run by the source's own daemon for a remote caller
        with running_daemon(source_home) as source_daemon:
            remote_vm = source_daemon.local().get("mover")
            assert remote_vm.check_move(caps) == reasons


def test_create_refuses_a_cpu_model_this_host_cannot_give(image_home: Path) -> None:
    with new_home(image_home) as home:
        done = cli(home, "create", "fast", "--cpu-model", "Skylake-Client")
        assert done.returncode == 2, done
        assert "cannot give its features" in done.stderr and "xsavec" in done.stderr
        unknown = cli(home, "create", "fast", "--cpu-model", "Pentium9000")
        assert unknown.returncode == 2 and "QEMU does not know it" in unknown.stderr
        assert not (home / "vms" / "fast").exists()
