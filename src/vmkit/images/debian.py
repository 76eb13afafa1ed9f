"""The `debian-12` image: a Debian 12 system made with debootstrap from this machine's mirror.

systemd, udev, qemu-guest-agent, cloud-init (NoCloud only), openssh-server and Debian's cloud
kernel, plus packages the user asks for. The root file system is made without mounting
(mkfs.ext4 -d) and converted to qcow2; kernel and initramfs come from the built root. The recipe
hash covers the mirror, the candidate versions of the requested packages, the guest files and
this builder's version: the same inputs make a rebuild a no-op. Downloaded packages are kept in
VMKIT_HOME/cache/debootstrap, so a rebuild downloads nothing it already has.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from importlib import resources
from pathlib import Path

from vmkit.errors import ImageBuildError, InvalidValue
from vmkit.images import debpkg
from vmkit.images.builder import Progress, build_cached, fs_uuid_for, make_ext4, tree_bytes
from vmkit.images.catalog import sha256_file
from vmkit.images.kernel import PVH_KERNEL, offer_pvh_kernel
from vmkit.model.views import ImageInfo
from vmkit.qemu import img
from vmkit.storage.layout import HomeLayout, write_json_atomic

NAME = "debian-12"
SUITE = "bookworm"
#: the suites that keep a stable release patched; each one the host's apt uses is added
UPDATE_SUITES = ("bookworm-updates", "bookworm-security")
RECIPE_VERSION = "debian-12-4"
# python3-cffi-backend: debootstrap does not resolve the virtual package python3-cryptography
# (pulled in by cloud-init) depends on, so its provider is named here.
PACKAGES = ["systemd", "systemd-sysv", "udev", "dbus", "qemu-guest-agent", "cloud-init",
            "python3-cffi-backend", "openssh-server", "iproute2", "ca-certificates",
            "linux-image-cloud-amd64", "initramfs-tools", "e2fsprogs"]
GUEST_FILES = {
    "debian-cloud.cfg": "etc/cloud/cloud.cfg.d/90-vmkit.cfg",
    "debian-wired.network": "etc/systemd/network/20-vmkit-wired.network",
    "debian-initramfs-modules": "etc/initramfs-tools/modules",
    "debian-page-reporting.rules": "etc/udev/rules.d/60-vmkit-page-reporting.rules",
}
CMDLINE = ("root=UUID={uuid} ro console=ttyS0 quiet memhp_default_state=online "
           "swiotlb=noforce no_timer_check cryptomgr.notests")  # see tiny.CMDLINE
SSH_USER = "root"
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


def _guest_file(name: str) -> bytes:
    return resources.files("vmkit.images").joinpath("files", name).read_bytes()


def check_package_names(extra: list[str]) -> list[str]:
    bad = [p for p in extra if not _PACKAGE_NAME.match(p)]
    if bad:
        raise InvalidValue(f"invalid Debian package name(s): {', '.join(map(repr, bad))}",
                           hint="use names as apt knows them, e.g. --packages nginx,curl")
    return sorted(set(extra))


def apt_sources(sources: dict[str, str]) -> str:
    """The image's sources.list: suite -> mirror (main only, as debootstrap made it)."""
    return "".join(f"deb {mirror} {suite} main\n" for suite, mirror in sources.items())


def host_sources() -> dict[str, str]:
    """bookworm and each of its update suites the host's apt uses: suite -> mirror."""
    found = {SUITE: debpkg.host_mirror(SUITE)}
    for suite in UPDATE_SUITES:
        mirrors = debpkg.host_mirrors(suite)
        if mirrors:
            found[suite] = mirrors[0]
    return found


def recipe(sources: dict[str, str], versions: dict[str, str], extra: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": RECIPE_VERSION, "sources": sources,
                              "packages": versions, "extra": extra, "cmdline": CMDLINE},
                             sort_keys=True).encode())
    for name in sorted(GUEST_FILES):
        digest.update(name.encode() + b"\0" + _guest_file(name))
    return digest.hexdigest()


def build_debian(home: HomeLayout, *, packages: list[str] | None = None, force: bool = False,
                 progress: Progress | None = None, in_use: frozenset[Path] = frozenset()
                 ) -> tuple[ImageInfo, bool]:
    """Build (or keep) images/debian-12. Returns the image and whether anything was built."""
    say = progress or (lambda _msg: None)
    if os.geteuid() != 0:
        raise ImageBuildError("building debian-12 needs root (debootstrap, chroot)",
                              hint="run it as root, or use the tiny image")
    extra = check_package_names(packages or [])
    home.ensure()
    say("resolving Debian packages")
    sources = host_sources()
    unknown = debpkg.unknown_packages(extra)
    if unknown:
        raise InvalidValue(f"unknown Debian package(s): {', '.join(unknown)}",
                           hint="check the names with apt-cache search (and run apt-get update)")
    versions = {p.name: p.version for p in debpkg.candidate_versions(sorted({*PACKAGES,
                                                                             *extra}))}
    recipe_hash = recipe(sources, versions, extra)
    return build_cached(
        home, NAME, recipe_hash,
        lambda work, out: _build(home, work, out, sources, extra, recipe_hash, say),
        force=force, in_use=in_use)


def _build(home: HomeLayout, work: Path, out: Path, sources: dict[str, str], extra: list[str],
           recipe_hash: str, say: Progress) -> ImageInfo:
    started = time.monotonic()
    root = work / "root"
    cache = home.cache / "debootstrap"
    cache.mkdir(parents=True, exist_ok=True)
    _debootstrap(root, sources[SUITE], cache, say)
    _upgrade(root, sources, say)
    if extra:
        say(f"installing {', '.join(extra)}")
        _chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *extra],
                timeout=1800)
    say("configuring the system")
    fs_uuid = fs_uuid_for(recipe_hash)
    _configure(root, fs_uuid)
    say("writing the initramfs")
    _chroot(root, ["update-initramfs", "-u", "-k", "all"], timeout=600)
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not kernels:
        raise ImageBuildError("the built system has no kernel in /boot")
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copyfile(kernels[-1], out / "vmlinuz")
    pvh = offer_pvh_kernel(out / "vmlinuz", out / PVH_KERNEL, say)
    shutil.copyfile(root / "boot" / f"initrd.img-{kver}", out / "initrd.img")
    installed = _installed_packages(root)
    _clean(root)

    say("making the root file system")
    content_mib = tree_bytes(root) // (1 << 20)
    size_mib = -(-(content_mib * 5 // 4 + 256) // 64) * 64  # room for first-boot writes
    raw = work / "root.raw"
    make_ext4(root, raw, recipe_hash, size_mib)
    shutil.rmtree(root)
    root_disk = f"root-{recipe_hash[:12]}.qcow2"
    img.create_from_raw(out / root_disk, raw)
    raw.unlink()
    disk_info = img.info(out / root_disk)
    info = ImageInfo(
        name=NAME, os="Debian GNU/Linux 12 (bookworm)", kernel_version=kver,
        cmdline=CMDLINE.format(uuid=fs_uuid), recipe_hash=recipe_hash,
        pvh_kernel=PVH_KERNEL if pvh else None,
        sha256=sha256_file(out / root_disk), root_disk=root_disk,
        size=sum(f.stat().st_size for f in out.iterdir()),
        virtual_size=int(disk_info["virtual-size"]), built_at=time.time(), packages=installed,
        cloud_init=True, ssh_user=SSH_USER, build_seconds=round(time.monotonic() - started, 1),
        suites=list(sources),
    )
    write_json_atomic(out / "image.json", info.model_dump(mode="json"))
    return info


def _debootstrap(root: Path, mirror: str, cache: Path, say: Progress) -> None:
    """debootstrap --variant=minbase with our packages; its progress lines become ours."""
    argv = ["debootstrap", "--variant=minbase", f"--cache-dir={cache}",
            f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**_CHROOT_ENV, "PATH": os.environ.get(
                                    "PATH", _CHROOT_ENV["PATH"])})
    except FileNotFoundError as exc:
        raise ImageBuildError("debootstrap is not installed",
                              hint="run make run (it installs the build tools)") from exc
    timeout = 3600.0
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-40:], line]
            if line.startswith("I: "):
                say(f"debootstrap: {line[3:]}")
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        log = root / "debootstrap" / "debootstrap.log"
        detail = "\n".join(tail)
        if log.exists():
            detail += "\n--- debootstrap.log ---\n" + log.read_text(errors="replace")[-3000:]
        raise ImageBuildError(f"debootstrap failed (exit code {code})", detail=detail)


def _upgrade(root: Path, sources: dict[str, str], say: Progress) -> None:
    """The system with the update and security suites: apt's sources in the image name them
    (so a VM can apt-get upgrade itself), everything is upgraded (a new kernel ABI too), and
    kernels older than the newest are purged (one kernel, the patched one)."""
    (root / "etc/apt/sources.list").write_text(apt_sources(sources))
    say(f"upgrading from {', '.join(sources)}")
    # no service starts inside the build's chroot
    blocker = root / "usr/sbin/policy-rc.d"
    blocker.write_text("#!/bin/sh\nexit 101\n")
    blocker.chmod(0o755)
    try:
        _chroot(root, ["apt-get", "update", "-q"], timeout=600)
        _chroot(root, ["apt-get", "full-upgrade", "-y", "-q", "--no-install-recommends",
                       "-o", "Dpkg::Options::=--force-confold"], timeout=1800)
        kernels = sorted((p for p in _installed_packages(root)
                          if re.fullmatch(r"linux-image-\d[\w.+-]*", p)), key=_version_key)
        if len(kernels) > 1:
            _chroot(root, ["apt-get", "purge", "-y", "-q", *kernels[:-1]], timeout=600)
    finally:
        blocker.unlink(missing_ok=True)


def _version_key(name: str) -> list[tuple[int, str]]:
    """vmlinuz-6.1.0-9-cloud-amd64 before vmlinuz-6.1.0-10-cloud-amd64 (numbers as numbers)."""
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"(\d+)", name)]


def _chroot(root: Path, argv: list[str], *, timeout: float) -> str:
    try:
        done = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                              env=_CHROOT_ENV, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{argv[0]} in the image took longer than {timeout:g}s") from exc
    if done.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv[:3])} in the image failed "
                              f"(exit code {done.returncode})",
                              detail=(done.stdout + done.stderr).strip()[-3000:])
    return done.stdout


def _configure(root: Path, fs_uuid: str) -> None:
    for source, dest in GUEST_FILES.items():
        path = root / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_guest_file(source))
    conf = root / "etc/initramfs-tools/conf.d/vmkit"
    conf.write_text("# vmkit: only the modules listed in ../modules (a small, fast initramfs)\n"
                    "MODULES=list\n")
    (root / "etc/fstab").write_text(f"UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n")
    _chroot(root, ["systemctl", "enable", "systemd-networkd.service"], timeout=60)
    # first boot must not stop at a prompt on the serial console
    _chroot(root, ["systemctl", "mask", "systemd-firstboot.service"], timeout=60)


def _clean(root: Path) -> None:
    """Drop what must differ per VM (host keys, machine id) and what a VM never needs."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init makes new host keys on each VM's first boot
    (root / "etc/machine-id").write_text("")  # systemd makes one per VM on first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists", "debootstrap", "tmp",
                   "var/tmp"):
        path = root / folder
        if path.is_dir():
            for item in path.iterdir():
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    for log in (root / "var/log").rglob("*"):
        if log.is_file():
            log.write_bytes(b"")


def _installed_packages(root: Path) -> dict[str, str]:
    """name -> version of every installed package, from the image's dpkg database."""
    status = (root / "var/lib/dpkg/status").read_text()
    installed: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status") == "install ok installed":
            installed[fields["Package"]] = fields["Version"]
    return dict(sorted(installed.items()))
