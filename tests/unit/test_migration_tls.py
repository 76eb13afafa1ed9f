"""A move's TLS: both QEMUs are given one cipher order that puts AES-128-GCM first. GnuTLS's
default, with a pre-shared key, lands on ChaCha20-Poly1305 (AES-256-GCM-SHA384 does not go
with a SHA-256 key), which carried guest memory 2.4x slower here; and a move's stage times."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path
from typing import Any

import pytest

from vmkit.isolation.jail import RunAs
from vmkit.ops.migration import Laps
from vmkit.qemu import migrate as qm


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append((command, arguments or {}))
        return {}


@pytest.mark.parametrize("server", [True, False])
def test_both_ends_ask_for_aes_gcm_first(server: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qm, "system_tls_policy", lambda: False)
    qmp = Recorder()
    qm.add_tls(qmp, Path("/run/x/migration"), server=server)  # type: ignore[arg-type]
    [(command, arguments)] = qmp.sent
    assert command == "object-add" and arguments["qom-type"] == "tls-creds-psk"
    ciphers = [part for part in arguments["priority"].split(":") if part.startswith("+")]
    assert ciphers[0] == "+AES-128-GCM"  # what the CPU's AES instructions run
    assert "-CIPHER-ALL" in arguments["priority"].split(":")  # no other cipher before it
    assert "+CHACHA20-POLY1305" in ciphers  # a host without AES instructions still moves
    assert arguments["endpoint"] == ("server" if server else "client")


def test_a_host_with_a_system_policy_gets_qemus_default(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """With crypto-policies (or an admin's /etc/gnutls/config) vmkit names no order: QEMU's
    build default applies, which such distributions make follow the policy."""
    monkeypatch.setattr(qm, "system_tls_policy", lambda: True)
    qmp = Recorder()
    qm.add_tls(qmp, Path("/run/x/migration"), server=True)  # type: ignore[arg-type]
    assert "priority" not in qmp.sent[0][1]


@pytest.mark.skipif(ctypes.util.find_library("gnutls") is None, reason="no libgnutls here")
def test_the_policy_is_asked_of_gnutls_in_qemus_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real library answers: a policy file defines @SYSTEM, a missing one leaves it
    undefined; and QEMU's clean environment is what counts, not the caller's."""
    policy = tmp_path / "gnutls.config"
    policy.write_text("[priorities]\nSYSTEM = NORMAL:-VERS-TLS1.0\n")
    with_file = {**qm.CLEAN_ENV, "GNUTLS_SYSTEM_PRIORITY_FILE": str(policy)}
    assert qm.system_tls_policy(with_file) is True
    without = {**qm.CLEAN_ENV, "GNUTLS_SYSTEM_PRIORITY_FILE": str(tmp_path / "none")}
    assert qm.system_tls_policy(without) is False
    monkeypatch.setattr(qm, "_POLICY", {})
    monkeypatch.setenv("GNUTLS_SYSTEM_PRIORITY_FILE", str(policy))  # the caller's, not QEMU's
    assert qm.system_tls_policy() == qm.system_tls_policy(dict(qm.CLEAN_ENV))


def test_laps_add_up_per_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 10.5, 12.0, 12.25])
    monkeypatch.setattr("vmkit.ops.migration.time.monotonic", lambda: next(clock))
    lap = Laps()
    lap("files")
    lap("memory")
    lap("files")  # a stage met twice adds up
    assert lap.seconds == {"files": 0.75, "memory": 1.5}


def test_the_key_folder_carries_standard_dh_parameters(tmp_path: Path) -> None:
    """A server endpoint without dh-params.pem makes its own (0.3-1.6 s of every move's
    destination start): the folder holds RFC 7919's ffdhe2048, root's like the key."""
    import base64

    folder = tmp_path / "migration"
    qm.write_psk(folder, "ab" * 32, None)
    assert sorted(p.name for p in folder.iterdir()) == ["dh-params.pem", "keys.psk"]
    pem = (folder / "dh-params.pem").read_text()
    der = base64.b64decode("".join(pem.splitlines()[1:-1]))
    # SEQUENCE { INTEGER p (256 bytes after a 0 pad), INTEGER 2 }
    assert der[:8] == bytes.fromhex("3082010802820101") and der[8] == 0
    prime = int.from_bytes(der[9:9 + 256], "big")
    assert prime.bit_length() == 2048 and hex(prime).startswith("0xffffffffffffffffadf85458")
    assert der[9 + 256:] == bytes.fromhex("020102")  # generator 2
    assert (folder / "dh-params.pem").stat().st_mode & 0o777 == 0o600
    qm.remove_psk(folder)
    assert not folder.exists()


def test_credentials_left_by_another_vmkit_do_not_block_a_move(tmp_path: Path) -> None:
    """A folder a crash left with a file this version does not know (an older or newer
    vmkit's) is replaced, not a raw error that stops every later move of the VM."""
    folder = tmp_path / "migration"
    folder.mkdir()
    (folder / "keys.psk").write_text("old\n")
    (folder / "something-else").write_text("x")
    (folder / "nested").mkdir()
    qm.write_psk(folder, "cd" * 32, None)
    assert sorted(p.name for p in folder.iterdir()) == ["dh-params.pem", "keys.psk"]
    assert (folder / "keys.psk").read_text().endswith(":" + "cd" * 32 + "\n")
    qm.remove_psk(folder)
    qm.remove_psk(folder)  # nothing there is fine
    assert not folder.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_only_root_and_the_vms_group_read_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "migration"
    qm.write_psk(folder, "ef" * 32, RunAs(uid=2_000_123, gid=2_000_123))
    assert (folder.stat().st_uid, folder.stat().st_gid) == (0, 2_000_123)
    assert folder.stat().st_mode & 0o777 == 0o750
    for name in qm.CREDENTIAL_FILES:
        info = (folder / name).stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 2_000_123, 0o640)
