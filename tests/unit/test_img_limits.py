"""Every qemu-img runs under prlimit (address space + CPU time) with an explicit format; on an
untrusted image it runs without root (setpriv, as jail.drop_to does) on a descriptor opened
without following symlinks; a header that asks for gigabytes is stopped by the limit."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vmkit.errors import HostError, QemuError
from vmkit.isolation.jail import RunAs
from vmkit.qemu import img

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                    shutil.which("prlimit") is None,
                                    reason="needs qemu-img and prlimit")


class Recorder:
    def __init__(self, stdout: str = "{}") -> None:
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.stdout = stdout

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, self.stdout, "")


def _qemu_img_args(argv: list[str]) -> list[str]:
    return argv[argv.index(img.QEMU_IMG) + 1:]


def test_every_invocation_is_limited_and_names_its_format(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    recorder = Recorder()
    monkeypatch.setattr(img.subprocess, "run", recorder)
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"")
    img.create_overlay(disk, "base.qcow2", 1 << 30)
    img.rebase(disk, "base.qcow2")
    img.rebase(disk, None)
    img.rebase_unsafe(disk, "base.qcow2")
    img.convert_flat(disk, tmp_path / "flat.qcow2")
    img.full_copy(tmp_path / "copy.qcow2", disk, 1 << 30)
    img.create_from_raw(disk, tmp_path / "raw")
    img.resize(disk, 1 << 30)
    img.info(disk)
    img.info(disk, untrusted=True, owner=RunAs(4242, 4343))
    assert len(recorder.calls) == 11
    for argv, _ in recorder.calls:
        limits = argv[argv.index("prlimit"):argv.index(img.QEMU_IMG)]
        args = _qemu_img_args(argv)
        space = 1 << 30 if args[0] == "info" else 4 << 30  # copies: room for I/O threads
        assert limits[:3] == ["prlimit", f"--as={space}", limits[2]] and limits[-1] == "--"
        assert limits[2].startswith("--cpu=") and int(limits[2][6:]) >= img.INSPECT_CPU_SECONDS
        assert "-f" in args, args  # never probed
        if args[0] in ("create", "rebase") and "-b" in args and args[args.index("-b") + 1]:
            assert "-F" in args, args
    info_argv = recorder.calls[9][0]
    assert info_argv[0] == "prlimit" and f"--cpu={img.INSPECT_CPU_SECONDS}" in info_argv


def test_untrusted_runs_as_owner_on_a_descriptor(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    recorder = Recorder()
    monkeypatch.setattr(img.subprocess, "run", recorder)
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"")
    img.info(disk, untrusted=True, owner=RunAs(4242, 4343))
    argv, kwargs = recorder.calls[0]
    assert argv[:7] == ["setpriv", "--reuid=4242", "--regid=4343", "--clear-groups",
                        "--no-new-privs", "--inh-caps=-all", "--"]
    assert argv[7] == "prlimit"
    (fd,) = kwargs["pass_fds"]
    assert argv[-1] == f"/dev/fd/{fd}" and str(disk) not in argv
    img.rebase_unsafe(disk, "base.qcow2", untrusted=True, owner=RunAs(4242, 4343))
    assert recorder.calls[1][0][-1].startswith("/dev/fd/")
    link = tmp_path / "link.qcow2"
    link.symlink_to(disk)
    with pytest.raises(QemuError, match="cannot open"):
        img.info(link, untrusted=True, owner=RunAs(4242, 4343))  # a symlink is not followed


def test_untrusted_owner_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(img.jail, "run_as", lambda: RunAs(999, 999))
    assert img.untrusted_owner() == RunAs(999, 999)
    assert img.untrusted_owner(RunAs(5, 6)) == RunAs(5, 6)
    monkeypatch.setattr(img.jail, "run_as", lambda: None)
    monkeypatch.setattr(img.os, "geteuid", lambda: 1000)
    assert img.untrusted_owner() is None  # not root: limits only, no user switch
    assert img.command(["info"], cpu_seconds=30, owner=None)[0] == "prlimit"
    monkeypatch.setattr(img.os, "geteuid", lambda: 0)
    with pytest.raises(HostError, match="as root"):  # never run untrusted input as root
        img.untrusted_owner()


def _bitmap_bomb(path: Path, bitmaps: int = 8) -> None:
    """A 1.3 MB qcow2 whose header makes qemu-img allocate 512 MiB per auto-loaded dirty bitmap
    (2 TiB virtual size, 512-byte granularity): the count, and so the memory, has no bound."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "2T"], check=True)
    for index in range(bitmaps):
        subprocess.run(["qemu-img", "bitmap", "--add", "--enable", "-g", "512", "-f", "qcow2",
                        str(path), f"b{index}"], check=True)


@needs_qemu_img
def test_a_header_that_asks_for_gigabytes_is_stopped(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.qcow2"
    _bitmap_bomb(bomb)
    assert bomb.stat().st_size < 4 << 20
    # without the limit qemu-img takes what the header asks for (4 GiB of address space)
    free = subprocess.run(["prlimit", f"--as={8 << 30}", "--", "qemu-img", "info", "-U", "-f",
                           "qcow2", str(bomb)], capture_output=True, check=False)
    assert free.returncode == 0, free.stderr
    started = time.monotonic()
    for untrusted in (False, True):
        with pytest.raises(QemuError, match="resource limits") as caught:
            img.info(bomb, untrusted=untrusted)
        assert "memory" in str(caught.value)
    assert time.monotonic() - started < 20
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1G"], check=True)
    if os.geteuid() == 0 and img.jail.run_as() is not None:
        owner = img.jail.run_as()
        assert owner is not None
        os.chown(plain, owner.uid, owner.gid)
    assert img.info(plain, untrusted=True)["virtual-size"] == 1 << 30
