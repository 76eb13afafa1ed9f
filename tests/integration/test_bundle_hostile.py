"""Hostile bundles: each forged from a real export with one hostile field (the manifest's sizes
and checksums recomputed, so only that field trips), each refused by `vmkit import` with exit 2,
nothing registered and nothing written outside the home. And exports are owner-only (0600)."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from tests.integration.hostile_bundles import digest, forge_field_cases, forge_json
from vmkit import Host, InvalidValue


@pytest.fixture
def exported(host: Host, tmp_path: Path) -> Path:
    vm = host.create("sealed")
    bundle = tmp_path / "sealed.vmkit"
    vm.export(bundle)
    vm.delete()
    return bundle


def test_hostile_bundles_are_refused_with_nothing_left(host: Host, home: Path, tmp_path: Path,
                                                       exported: Path) -> None:
    bundle = exported
    forged = forge_field_cases(bundle, tmp_path, host.image("tiny").sha256)
    cases, data_target = forged.cases, forged.data_target
    passwd, bashrc = digest(Path("/etc/passwd")), digest(Path("/root/.bashrc"))
    for path, message in cases:
        started = time.monotonic()
        done = run_cli(home, "import", str(path), timeout=120)
        elapsed = time.monotonic() - started
        assert done.returncode == 2, (path.name, done.stderr)
        assert message in done.stderr, (path.name, done.stderr)
        assert elapsed < 60, (path.name, elapsed)  # no hang: the limits stop qemu-img
        assert os.listdir(home / "vms") == [], path.name  # nothing registered, nothing staged
        with pytest.raises(InvalidValue):
            host.import_bundle(path, name="again")
        assert os.listdir(home / "vms") == [], path.name
    assert host.vms() == []
    assert not Path("/tmp/pwned").exists()
    assert digest(Path("/etc/passwd")) == passwd and digest(Path("/root/.bashrc")) == bashrc
    assert not data_target.exists() or data_target.stat().st_size == 64 << 20
    host.import_bundle(bundle)  # the genuine bundle still imports


def test_an_imported_vm_never_uses_the_exporters_ssh_key(host: Host, tmp_path: Path,
                                                         exported: Path) -> None:
    forged = forge_json(exported, tmp_path / "key.vmkit", "vm.json", ssh_user="root",
                         ssh_identity="/root/.ssh/id_ed25519")
    vm = host.import_bundle(forged)
    assert vm.config.ssh_user == "root" and vm.config.ssh_identity is None
    copy = host.import_bundle(forged, name="copy")
    assert copy.config.ssh_identity is None


def test_exports_are_owner_only_from_the_first_byte(host: Host, home: Path,
                                                    tmp_path: Path) -> None:
    host.create("private")
    target = tmp_path / "private.vmkit"
    old = os.umask(0)  # even a permissive umask gives an owner-only bundle
    try:
        done = run_cli(home, "export", "private", str(target))
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    listing = subprocess.run(["ls", "-l", str(target)], capture_output=True, text=True,
                             check=True).stdout
    assert listing.startswith("-rw------- "), listing
    assert os.listdir(tmp_path) == ["private.vmkit"]  # no temporary file left
    result = host.get("private").export(tmp_path / "again.vmkit")
    assert result["mode"] == "0600" and result["path"] == str(tmp_path / "again.vmkit")
    seen: list[int] = []

    def watch(done_bytes: int, total: int) -> None:  # the partial file is 0600 too
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".third.vmkit.")]
        assert len(partial) == 1 and stat.S_IMODE(partial[0].stat().st_mode) == 0o600
        seen.append(done_bytes)
        if done_bytes > 1 << 20:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        host.get("private").export(tmp_path / "third.vmkit", progress=watch)
    assert seen and sorted(os.listdir(tmp_path)) == ["again.vmkit", "private.vmkit"]
    done = run_cli(home, "export", "private", str(target))  # never replaces a file
    assert done.returncode == 2 and "already exists" in done.stderr
