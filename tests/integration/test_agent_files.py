"""File copy both ways through the guest agent, and what the guest reports about itself."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.integration.conftest import run_cli, sh
from vmkit import Host


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cp_a_50_mib_file_in_and_out_keeps_content_and_mode(host: Host, home: Path,
                                                             tmp_path: Path) -> None:
    vm = host.create("files", memory="256M", disk="2G")
    vm.start(wait=True)
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(50 << 20))
    os.chmod(source, 0o640)
    done = run_cli(home, "cp", str(source), "files:/root/")
    assert done.returncode == 0, done.stderr
    assert sh(vm, "sha256sum /root/blob.bin").split()[0] == _sha(source)
    assert sh(vm, "stat -c %a /root/blob.bin") == "640"
    sh(vm, "chmod 600 /root/blob.bin")
    back = tmp_path / "back.bin"
    done = run_cli(home, "cp", "files:/root/blob.bin", str(back))
    assert done.returncode == 0, done.stderr
    assert _sha(back) == _sha(source)
    assert back.stat().st_mode & 0o777 == 0o600
    missing = run_cli(home, "cp", "files:/nope", str(tmp_path / "x"))
    assert missing.returncode == 2 and not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".*vmkit-part"))


def test_info_reports_what_the_guest_agent_says(host: Host, home: Path) -> None:
    vm = host.create("talker")
    vm.start(wait=True)
    info = json.loads(run_cli(home, "info", "talker", "--format", "json").stdout)
    guest = info["guest"]
    assert guest["hostname"] == "talker"
    assert guest["os"]["kernel-release"].endswith("cloud-amd64")
    assert any(a.startswith("198.18.0.") for a in guest["addresses"]["eth0"])
