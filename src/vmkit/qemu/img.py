"""qemu-img: create overlays and copies with explicit formats (images are never probed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from vmkit.errors import QemuError

QEMU_IMG = "qemu-img"


def _run(argv: list[str], *, timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise QemuError(f"{argv[0]} is not installed",
                        hint="run `make run` or apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{' '.join(argv[:2])} took longer than {timeout:g}s") from exc
    if done.returncode != 0:
        raise QemuError(f"{' '.join(argv[:2])} failed (exit code {done.returncode})",
                        detail=done.stderr.strip())
    return done.stdout


def create_overlay(path: Path, backing: Path | str, size: int | None = None, *,
                   timeout: float = 60) -> None:
    """A qcow2 whose unchanged blocks are read from `backing` (a qcow2): O(1) in disk size.

    A relative `backing` is resolved from the overlay's own folder and stored relative, so the
    folder can move. Without `size` the overlay takes the backing file's size.
    """
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
            "-o", "cluster_size=65536", str(path)]
    _run(argv + ([str(size)] if size is not None else []), timeout=timeout)


def rebase(path: Path, backing: Path | str | None, *, timeout: float = 3600) -> None:
    """Give `path` a new backing file, copying whatever differs (safe mode); None flattens it."""
    target = ["-F", "qcow2", "-b", str(backing)] if backing is not None else ["-b", ""]
    _run([QEMU_IMG, "rebase", "-q", "-f", "qcow2", *target, str(path)], timeout=timeout)


def rebase_unsafe(path: Path, backing: str, *, timeout: float = 60) -> None:
    """Rewrite only the backing file name in the header (the content is known to be the same)."""
    _run([QEMU_IMG, "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing,
          str(path)], timeout=timeout)


def convert_flat(source: Path, dest: Path, *, timeout: float = 3600) -> None:
    """A standalone qcow2 with the content of `source` and its whole backing chain."""
    _run([QEMU_IMG, "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(source), str(dest)],
         timeout=timeout)


def full_copy(path: Path, source: Path, size: int, *, timeout: float = 600) -> None:
    """An independent qcow2 with the content of `source`, grown to `size`."""
    convert_flat(source, path, timeout=timeout)
    resize(path, size, timeout=timeout)


def create_from_raw(path: Path, raw: Path, *, timeout: float = 600) -> None:
    _run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
         timeout=timeout)


def resize(path: Path, size: int, *, timeout: float = 60) -> None:
    _run([QEMU_IMG, "resize", "-q", "-f", "qcow2", str(path), str(size)], timeout=timeout)


def info(path: Path, *, timeout: float = 30) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        _run([QEMU_IMG, "info", "-U", "-f", "qcow2", "--output=json", str(path)], timeout=timeout))
    return result
