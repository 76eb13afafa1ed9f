"""qemu-img: create overlays and copies with explicit formats (images are never probed).

Every invocation runs under resource limits set by util-linux `prlimit` in its argv (an
address-space cap and a CPU-time cap; not `preexec_fn`, which is unsafe in a threaded process):
a qcow2 header is a small file that can ask qemu-img for gigabytes (e.g. many auto-loaded dirty
bitmaps of 512 MiB each) or for long loops, and a limit turns that into a clean failure.

`untrusted=True` is for images vmkit did not create in this process (bundle members, layers of a
VM that ran): qemu-img then also runs without root, as `owner` (default: the unprivileged
`vmkit` account, `jail.run_as()`), through the same `setpriv` flags QEMU gets (`jail.drop_to`).
Single-file operations on an untrusted image (`info`, `rebase_unsafe`) open the file here
without following symlinks and hand qemu-img the descriptor (`/dev/fd/N`): it never walks a
path, so the image only needs to be readable (writable for a rebase) by `owner` — the folder
holding it can stay root's. When vmkit is not root there is no user switch, but still limits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.errors import HostError, InvalidValue, QemuError
from vmkit.isolation import jail
from vmkit.isolation.jail import RunAs

QEMU_IMG = "qemu-img"
PRLIMIT = "prlimit"

# Address space of one qemu-img process. qemu-img itself needs ~100 MiB (libraries, thread
# stacks, caches); 1 GiB is what OpenStack gives `qemu-img info` on untrusted images, and
# measured here `convert`, `rebase` (safe mode), `resize` and `create` of multi-GiB disks stay
# far below it (their buffers do not grow with the disk size). A header that asks for more gets
# an allocation failure instead of the host's memory.
ADDRESS_SPACE_LIMIT = 1 << 30
# Operations that copy data (convert, rebase, resize, create) run a pool of I/O threads whose
# stacks alone reserve up to ~0.5 GiB of address space: under 1 GiB, `convert` failed now and
# then with "qemu_thread_create: Resource temporarily unavailable" (seen in a full CI run). They
# get 4 GiB (still a bound), and every qemu-img runs with MALLOC_ARENA_MAX=2 so glibc's
# per-thread arenas (64 MiB of address space each) do not eat the budget.
COPY_ADDRESS_SPACE_LIMIT = 4 << 30
# CPU seconds for inspecting one image (`info`): reading a header and its tables takes well
# under a second; 30 s (OpenStack's value) stops a header crafted to make qemu-img loop.
INSPECT_CPU_SECONDS = 30
# Operations that copy data (convert, rebase in safe mode) get their wall-clock timeout as CPU
# seconds too (never less than the inspection limit): a backstop, not the usual bound.


def limits_argv(cpu_seconds: int, address_space: int = ADDRESS_SPACE_LIMIT) -> list[str]:
    """The prlimit prefix: soft = hard limits, inherited by the qemu-img it execs."""
    return [PRLIMIT, f"--as={address_space}", f"--cpu={cpu_seconds}", "--"]


def untrusted_owner(owner: RunAs | None = None) -> RunAs | None:
    """Who runs qemu-img on an untrusted image: `owner`, else the unprivileged `vmkit` account
    when vmkit is root, else nobody else (not root: qemu-img runs as the caller)."""
    if owner is not None:
        return owner
    account = jail.run_as()
    if account is None and os.geteuid() == 0:
        raise HostError("refusing to run qemu-img on an untrusted image as root: "
                        f"user {jail.RUN_USER!r} is missing",
                        hint="make run (or make setup) creates it")
    return account


def address_space_for(args: list[str]) -> int:
    """Inspection gets OpenStack's 1 GiB; data copies get room for their I/O threads."""
    return ADDRESS_SPACE_LIMIT if args[:1] == ["info"] else COPY_ADDRESS_SPACE_LIMIT


def command(args: list[str], *, cpu_seconds: int, owner: RunAs | None = None) -> list[str]:
    """The full argv: [setpriv as owner --] prlimit ... -- qemu-img ARGS."""
    return jail.drop_to(owner, [*limits_argv(cpu_seconds, address_space_for(args)), QEMU_IMG,
                                *args])


def _cpu_for(timeout: float) -> int:
    return max(INSPECT_CPU_SECONDS, math.ceil(timeout))


def _run(args: list[str], *, timeout: float, cpu_seconds: int | None = None,
         owner: RunAs | None = None, fds: tuple[int, ...] = ()) -> str:
    cpu = cpu_seconds if cpu_seconds is not None else _cpu_for(timeout)
    argv = command(args, cpu_seconds=cpu, owner=owner)
    what = f"qemu-img {args[0]}"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, pass_fds=fds, cwd="/",
                              env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    except FileNotFoundError as exc:
        raise QemuError(f"{exc.filename or argv[0]} is not installed",
                        hint="run `make run` or apt-get install qemu-utils util-linux") from exc
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{what} took longer than {timeout:g}s") from exc
    if done.returncode != 0:
        raise QemuError(_failure(what, done.returncode, done.stderr, cpu,
                                 address_space_for(args)),
                        detail=done.stderr.strip()[-2000:])
    return done.stdout


def _failure(what: str, code: int, stderr: str, cpu: int, address_space: int) -> str:
    """Name the resource limit when that is what stopped qemu-img."""
    limits = f"its resource limits ({address_space >> 20} MiB address space, {cpu} s CPU)"
    signum = -code if code < 0 else 0  # setpriv and prlimit exec: qemu-img is the child
    if signum in (signal.SIGXCPU, signal.SIGKILL):
        return f"{what} was stopped by {limits}: CPU time ran out"
    if "failed to allocate" in stderr or "Cannot allocate memory" in stderr or \
            signum in (signal.SIGTRAP, signal.SIGABRT, signal.SIGSEGV):
        return (f"{what} was stopped by {limits}: the image asks for more memory than allowed "
                f"(exit code {code})")
    return f"{what} failed (exit code {code})"


@contextlib.contextmanager
def _opened(path: Path, *, write: bool) -> Iterator[int]:
    """`path` opened here without following a symlink, for qemu-img as /dev/fd/N."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise QemuError(f"cannot open {path} for qemu-img: {exc.strerror or exc}",
                        hint="an untrusted image must be a regular file (no symlink)") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QemuError(f"cannot open {path} for qemu-img: not a regular file",
                            hint="an untrusted image must be a regular file (no device, FIFO "
                                 "or directory)")
        yield fd
    finally:
        os.close(fd)


def create_overlay(path: Path, backing: Path | str, size: int | None = None, *,
                   timeout: float = 60, untrusted: bool = False,
                   owner: RunAs | None = None, unopened: bool = False) -> None:
    """A qcow2 whose unchanged blocks are read from `backing` (a qcow2): O(1) in disk size.

    A relative `backing` is resolved from the overlay's own folder and stored relative, so the
    folder can move. Without `size` the overlay takes the backing file's size. `unopened`
    (with a size): the backing is not opened at all (an untrusted file, checked later).
    """
    args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
            "-o", "cluster_size=65536", *(["-u"] if unopened else []), str(path)]
    _run(args + ([str(size)] if size is not None else []), timeout=timeout,
         owner=untrusted_owner(owner) if untrusted else None)


def rebase(path: Path, backing: Path | str | None, *, timeout: float = 3600,
           untrusted: bool = False, owner: RunAs | None = None) -> None:
    """Give `path` a new backing file, copying whatever differs (safe mode); None flattens it."""
    target = ["-F", "qcow2", "-b", str(backing)] if backing is not None else ["-b", ""]
    _run(["rebase", "-q", "-f", "qcow2", *target, str(path)], timeout=timeout,
         owner=untrusted_owner(owner) if untrusted else None)


def rebase_unsafe(path: Path, backing: str, *, timeout: float = 60, untrusted: bool = False,
                  owner: RunAs | None = None) -> None:
    """Rewrite only the backing file name in the header (the content is known to be the same).
    The new backing file is not opened."""
    args = ["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing]
    if not untrusted:
        _run([*args, str(path)], timeout=timeout)
        return
    account = untrusted_owner(owner)
    with _opened(path, write=True) as fd:
        _run([*args, f"/dev/fd/{fd}"], timeout=timeout, cpu_seconds=INSPECT_CPU_SECONDS,
             owner=account, fds=(fd,))


def convert_flat(source: Path, dest: Path, *, timeout: float = 3600, untrusted: bool = False,
                 owner: RunAs | None = None) -> None:
    """A standalone qcow2 with the content of `source` and its whole backing chain.

    Untrusted (layers a guest wrote): the reading and converting run as `owner` (who may read
    the chain), writing into `dest` through a descriptor: vmkit creates `dest` empty (of the
    source's virtual size), lends it to `owner` for the copy, and takes it back."""
    if not untrusted:
        _run(["convert", "-q", "-f", "qcow2", "-O", "qcow2", str(source), str(dest)],
             timeout=timeout)
        return
    account = untrusted_owner(owner)
    size = int(info(source, untrusted=True, owner=account)["virtual-size"])
    _run(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(dest), str(size)],
         timeout=60)
    with _opened(dest, write=True) as fd:
        if account is not None:
            os.fchown(fd, account.uid, account.gid)
        try:
            _run(["convert", "-q", "-n", "-f", "qcow2", "-O", "qcow2", str(source),
                  f"/dev/fd/{fd}"], timeout=timeout, owner=account, fds=(fd,))
        finally:
            if account is not None:
                os.fchown(fd, os.geteuid(), os.getegid())


def full_copy(path: Path, source: Path, size: int, *, timeout: float = 600,
              untrusted: bool = False, owner: RunAs | None = None) -> None:
    """An independent qcow2 with the content of `source`, grown to `size`."""
    convert_flat(source, path, timeout=timeout, untrusted=untrusted, owner=owner)
    resize(path, size, timeout=timeout, untrusted=untrusted, owner=owner)


def create_empty(path: Path, size: int, *, timeout: float = 60) -> None:
    """A blank qcow2 disk of `size` bytes (what an installer writes to)."""
    _run(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(size)],
         timeout=timeout)


def create_from_raw(path: Path, raw: Path, *, timeout: float = 600) -> None:
    _run(["convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], timeout=timeout)


def resize(path: Path, size: int, *, timeout: float = 60, untrusted: bool = False,
           owner: RunAs | None = None) -> None:
    _run(["resize", "-q", "-f", "qcow2", str(path), str(size)], timeout=timeout,
         owner=untrusted_owner(owner) if untrusted else None)


def info(path: Path, *, timeout: float = 30, untrusted: bool = False,
         owner: RunAs | None = None) -> dict[str, Any]:
    """`qemu-img info` of one qcow2 (backing files are not opened). Untrusted: as `owner`, on a
    descriptor opened here (no symlink followed), within INSPECT_CPU_SECONDS."""
    args = ["info", "-U", "-f", "qcow2", "--output=json"]
    if untrusted:
        account = untrusted_owner(owner)
        with _opened(path, write=False) as fd:
            out = _run([*args, f"/dev/fd/{fd}"], timeout=timeout,
                       cpu_seconds=INSPECT_CPU_SECONDS, owner=account, fds=(fd,))
    else:
        out = _run([*args, str(path)], timeout=timeout, cpu_seconds=INSPECT_CPU_SECONDS)
    result: dict[str, Any] = json.loads(out)
    return result


#: disk image formats a VM can be made from (--from-disk); anything else qemu-img detects is
#: refused (e.g. vpc, qed, dmg, parallels: formats with a history of parser bugs)
FOREIGN_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx")


@dataclass(frozen=True)
class ForeignDisk:
    """What an untrusted disk image is, found once by qemu-img: from here on, its format is
    always given (never probed again)."""

    format: str
    virtual_size: int


def foreign_problems(facts: dict[str, Any]) -> list[str]:
    """Why an image described by `qemu-img info` JSON cannot be taken as a VM's disk: an
    unsupported format, or any reference to another file (a backing file, a qcow2 data file,
    a VMDK extent elsewhere) — such a reference would make vmkit read a file the user did
    not give, with vmkit's rights."""
    problems: list[str] = []
    fmt = str(facts.get("format", "?"))
    if fmt not in FOREIGN_FORMATS:
        problems.append(f"format {fmt!r} is not accepted (accepted: "
                        f"{', '.join(FOREIGN_FORMATS)})")
    for key in ("backing-filename", "full-backing-filename"):
        if facts.get(key):
            problems.append(f"it refers to a backing file {str(facts[key])[:200]!r}")
            break
    specific = facts.get("format-specific") or {}
    data = specific.get("data") or {}
    if data.get("data-file"):
        problems.append(f"it keeps its data in another file {str(data['data-file'])[:200]!r}")
    extents = data.get("extents") or []
    own = str(facts.get("filename", ""))
    if fmt == "vmdk" and (len(extents) != 1 or str(extents[0].get("filename", "")) != own):
        problems.append("it is a VMDK whose data lies in other files (extents: "
                        + ", ".join(str(e.get("filename", "?"))[:100] for e in extents)
                        + "); give a monolithic VMDK (qemu-img convert -O vmdk)")
    if int(facts.get("virtual-size", 0) or 0) <= 0:
        problems.append("its virtual size is zero")
    return problems


@contextlib.contextmanager
def opened_foreign(path: Path) -> Iterator[int]:
    """An untrusted disk image, opened once (no symlink, a regular file): its probe and its
    conversion read this same descriptor, so the file cannot be swapped in between."""
    with _opened(path, write=False) as fd:
        yield fd


def probe_foreign(fd: int, path: Path, *, timeout: float = 30) -> ForeignDisk:
    """The format and size of an untrusted disk image (`fd`, opened by `opened_foreign`):
    qemu-img detects the format once, as the unprivileged account, under the inspection
    limits (info never opens a backing file)."""
    account = untrusted_owner()
    out = _run(["info", "-U", "--output=json", f"/dev/fd/{fd}"], timeout=timeout,
               cpu_seconds=INSPECT_CPU_SECONDS, owner=account, fds=(fd,))
    facts: dict[str, Any] = json.loads(out)
    problems = foreign_problems(facts)
    if problems:
        raise InvalidValue(f"cannot use disk image {path}: " + "; ".join(problems),
                           hint="give a self-contained qcow2, raw, vmdk, vdi or vhdx image "
                                "(qemu-img convert makes one)")
    return ForeignDisk(format=str(facts["format"]), virtual_size=int(facts["virtual-size"]))


#: formats whose driver takes a backing file: told explicitly to open none
_BACKING_CAPABLE = ("qcow2", "vmdk")


def source_spec(fd: int, fmt: str) -> str:
    """The source as a json: filename with its format given and, where the format has them,
    no backing file (even if the header was rewritten after the probe)."""
    node: dict[str, Any] = {"driver": fmt, "file": {"driver": "file",
                                                   "filename": f"/dev/fd/{fd}"}}
    if fmt in _BACKING_CAPABLE:
        node["backing"] = None
    return "json:" + json.dumps(node, separators=(",", ":"))


def convert_foreign(src: int, disk: ForeignDisk, dest: Path, *,
                    timeout: float = 3600, owner: RunAs | None = None) -> None:
    """A standalone qcow2 at `dest` with the content of the untrusted image open at `src`,
    read with its probed format given explicitly, by the unprivileged account -- or `owner`,
    who may read the file (it writes only through the descriptor of `dest` it is lent)."""
    account = untrusted_owner(owner)
    _run(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(dest),
          str(disk.virtual_size)], timeout=60)
    with _opened(dest, write=True) as out:
        if account is not None:
            os.fchown(out, account.uid, account.gid)
        try:
            _run(["convert", "-q", "-n", "-O", "qcow2", source_spec(src, disk.format),
                  f"/dev/fd/{out}"], timeout=timeout, owner=account, fds=(src, out))
        finally:
            if account is not None:
                os.fchown(out, os.geteuid(), os.getegid())


def copy_standalone(source: Path, dest: Path, *, owner: RunAs | None,
                    timeout: float = 3600) -> None:
    """A copy of a qcow2 that stands alone (an extra disk) whose header the VM's QEMU could
    have rewritten: read through one descriptor with no backing file opened, whatever the
    header says, as `owner` (the VM's uid, who owns it)."""
    size = int(info(source, untrusted=True, owner=owner)["virtual-size"])
    with _opened(source, write=False) as fd:
        convert_foreign(fd, ForeignDisk(format="qcow2", virtual_size=size), dest,
                        timeout=timeout, owner=owner)
