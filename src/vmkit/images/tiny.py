"""The `tiny` image: Debian's cloud kernel, a busybox initramfs, a busybox root with the agent.

Everything comes from Debian packages fetched with `apt-get download` (cached). The build is a
recipe: its hash covers the package versions, the guest files and this builder's version, and a
rebuild with the same hash is a no-op. The result is written to a temporary folder and renamed
into place, so an interrupted build never leaves a half image listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from vmkit.errors import ImageBuildError
from vmkit.images import debpkg
from vmkit.images.builder import Progress, build_cached, make_ext4, tree_bytes
from vmkit.images.catalog import sha256_file
from vmkit.images.initramfs import (
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    CpioEntry,
    cpio_newc,
    gzip_reproducible,
    load_order,
    parse_modules_dep,
)
from vmkit.images.kernel import PVH_KERNEL, offer_pvh_kernel
from vmkit.model.views import ImageInfo
from vmkit.qemu import img
from vmkit.storage.layout import HomeLayout, write_json_atomic

RECIPE_VERSION = "tiny-6"
KERNEL_META = "linux-image-cloud-amd64"
BASE_PACKAGES = ["busybox-static", "qemu-guest-agent", "e2fsprogs"]
# Loaded in this order (dependencies resolved from modules.dep); button makes ACPI power-off work.
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_balloon",
           "virtio-rng", "virtio_mem", "virtio_mmio", "button", "evdev"]
BINARIES = ["usr/sbin/qemu-ga", "sbin/resize2fs"]
# no_timer_check: on a loaded host a TCG guest's IO-APIC timer check can miss its window and
# panic the kernel ("IO-APIC + timer doesn't work!", seen with 30 guests booting on 2 cores).
# cryptomgr.notests: no boot-time self-tests of the kernel's crypto algorithms (the algorithms
# are all there), as kernels built with CRYPTO_MANAGER_DISABLE_TESTS; ~0.3 s of a TCG boot.
# What it gives up: a faulty accelerated implementation (an emulator bug in SSE4.2, PCLMUL or
# AES-NI) is no longer caught and replaced by the generic one. vmkit's default CPU model
# (qemu64) offers none of those instructions; fips=1 runs the tests anyway.
CMDLINE = ("console=ttyS0 root=/dev/vda rw quiet loglevel=3 memhp_default_state=online "
           "swiotlb=noforce no_timer_check cryptomgr.notests")
GUEST_FILES = {
    "tiny-initramfs-init": "init",
    "tiny-rcS": "etc/init.d/rcS",
    "tiny-inittab": "etc/inittab",
    "tiny-acpi-power": "etc/acpi/PWRF/00000080",
    "tiny-shutdown": "sbin/shutdown",
    "tiny-udhcpc.script": "etc/udhcpc.script",
    "tiny-hotplug": "sbin/vmkit-hotplug",
}

# Compiled from files/ with the host's gcc (static, so it needs no library in the root) and
# installed at this path: adds host entropy and reseeds the guest kernel's RNG (see
# vmkit.qemu.agent.reseed).
RESEED_SOURCE = "vmkit-reseed.c"
RESEED_BINARY = "usr/sbin/vmkit-reseed"
CC = ["gcc", "-static", "-Os", "-s", "-Wall"]


def _guest_file(name: str) -> bytes:
    return resources.files("vmkit.images").joinpath("files", name).read_bytes()


def recipe(packages: list[debpkg.Package]) -> tuple[str, dict[str, str]]:
    versions = {p.name: p.version for p in packages}
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": RECIPE_VERSION, "packages": versions, "modules": MODULES,
                              "cmdline": CMDLINE}, sort_keys=True).encode())
    for name in sorted([*GUEST_FILES, RESEED_SOURCE]):
        digest.update(name.encode() + b"\0" + _guest_file(name))
    return digest.hexdigest(), versions


def resolve_packages() -> list[debpkg.Package]:
    kernel = debpkg.resolve_kernel_package(KERNEL_META)
    libs = debpkg.library_dependencies(["qemu-guest-agent", "e2fsprogs"])
    names = sorted({kernel, *BASE_PACKAGES, *libs, "libc6", "libgcc-s1"})
    return debpkg.candidate_versions(names)


def build_tiny(home: HomeLayout, *, force: bool = False, progress: Progress | None = None,
               in_use: frozenset[Path] = frozenset()) -> tuple[ImageInfo, bool]:
    """Build (or keep) images/tiny. Returns the image and whether anything was built."""
    say = progress or (lambda _msg: None)
    home.ensure()
    say("resolving Debian packages")
    packages = resolve_packages()
    recipe_hash, versions = recipe(packages)
    return build_cached(
        home, "tiny", recipe_hash,
        lambda work, out: _build(home, work, out, packages, recipe_hash, versions, say),
        force=force, in_use=in_use)


def _build(home: HomeLayout, work: Path, out: Path, packages: list[debpkg.Package],
           recipe_hash: str, versions: dict[str, str], say: Progress) -> ImageInfo:
    debs = debpkg.download(packages, home.cache / "debs", progress=say)
    pkgroot = work / "pkgs"
    say(f"extracting {len(debs)} packages")
    for deb in debs:
        debpkg.extract(deb, pkgroot)
    kernel_dir = next((pkgroot / "lib/modules").iterdir())
    kver = kernel_dir.name
    shutil.copyfile(pkgroot / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    say("taking the kernel out of its bzImage (PVH entry)")
    pvh = offer_pvh_kernel(out / "vmlinuz", out / PVH_KERNEL, say)

    say("writing the initramfs")
    (out / "initrd.img").write_bytes(_initramfs(pkgroot, kver))

    say("assembling the root file system")
    rootfs = work / "rootfs"
    _assemble_rootfs(pkgroot, rootfs)
    _compile_static(RESEED_SOURCE, work / "src", rootfs / RESEED_BINARY)
    raw = work / "root.raw"
    make_ext4(rootfs, raw, recipe_hash, max(64, 2 * tree_bytes(rootfs) // (1 << 20) + 16))
    root_disk = f"root-{recipe_hash[:12]}.qcow2"
    img.create_from_raw(out / root_disk, raw)
    disk_info = img.info(out / root_disk)
    info = ImageInfo(
        name="tiny", os="busybox on Debian's cloud kernel", kernel_version=kver,
        cmdline=CMDLINE, recipe_hash=recipe_hash, pvh_kernel=PVH_KERNEL if pvh else None,
        sha256=sha256_file(out / root_disk),
        root_disk=root_disk, size=sum(f.stat().st_size for f in out.iterdir()),
        virtual_size=int(disk_info["virtual-size"]), built_at=time.time(), packages=versions,
    )
    write_json_atomic(out / "image.json", info.model_dump(mode="json"))
    return info


def _initramfs(pkgroot: Path, kver: str) -> bytes:
    moddir = pkgroot / "lib/modules" / kver
    subprocess.run(["depmod", "-b", str(pkgroot), kver], check=True, capture_output=True,
                   timeout=120)
    order = load_order(parse_modules_dep((moddir / "modules.dep").read_text()), MODULES)
    entries = [CpioEntry(d, S_IFDIR | 0o755) for d in
               ("bin", "etc", "lib", "lib/modules", "proc", "sys", "dev", "newroot")]
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755,
                             (pkgroot / "bin/busybox").read_bytes()))
    for applet in ("sh", "mount", "umount", "mkdir", "insmod", "cat", "switch_root", "usleep",
                   "echo", "poweroff"):
        entries.append(CpioEntry(f"bin/{applet}", S_IFLNK | 0o777, b"busybox"))
    flat = []
    for path in order:
        base = path.rsplit("/", 1)[-1]
        entries.append(CpioEntry(f"lib/modules/{base}", S_IFREG | 0o644,
                                 (moddir / path).read_bytes()))
        flat.append(base)
    entries.append(CpioEntry("etc/modules-load-order", S_IFREG | 0o644,
                             ("\n".join(flat) + "\n").encode()))
    entries.append(CpioEntry("init", S_IFREG | 0o755, _guest_file("tiny-initramfs-init")))
    return gzip_reproducible(cpio_newc(entries))


def _needed_libraries(binary: Path, pkgroot: Path) -> list[tuple[str, Path]]:
    """(soname, file in pkgroot) for each library `binary` needs, resolved against pkgroot."""
    libdirs = [pkgroot / "lib/x86_64-linux-gnu", pkgroot / "usr/lib/x86_64-linux-gnu"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env,
                         timeout=60, check=False).stdout
    found = []
    for line in out.splitlines():
        match = re.match(r"\s*(\S+) => (\S+|not found)", line)
        if not match:
            continue
        soname, where = match.groups()
        if where == "not found":
            raise ImageBuildError(f"{binary.name} needs {soname}, which no downloaded package has")
        path = Path(where)
        if not str(path).startswith(str(pkgroot)):
            raise ImageBuildError(f"{binary.name}: {soname} resolved outside the packages: {path}")
        found.append((soname, path))
    return found


def _assemble_rootfs(pkgroot: Path, rootfs: Path) -> None:
    for folder in ("bin", "sbin", "usr/bin", "usr/sbin", "lib/x86_64-linux-gnu", "lib64", "etc",
                   "proc", "sys", "dev", "run", "tmp", "root", "var/log", "var/lib", "mnt"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    (rootfs / "var/run").symlink_to("../run")
    busybox = rootfs / "bin/busybox"
    shutil.copyfile(pkgroot / "bin/busybox", busybox)
    os.chmod(busybox, 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if link.exists() or link.is_symlink() or applet == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    libs: dict[str, Path] = {}
    for binary in BINARIES:
        source = pkgroot / binary
        target = rootfs / binary
        shutil.copyfile(source, target)
        os.chmod(target, 0o755)
        libs.update(_needed_libraries(source, pkgroot))
    for soname, path in sorted(libs.items()):
        shutil.copyfile(path, rootfs / "lib/x86_64-linux-gnu" / soname)
    loader = "ld-linux-x86-64.so.2"
    shutil.copyfile(pkgroot / "lib/x86_64-linux-gnu" / loader, rootfs / "lib/x86_64-linux-gnu" /
                    loader)
    os.chmod(rootfs / "lib/x86_64-linux-gnu" / loader, 0o755)
    (rootfs / "lib64" / loader).symlink_to(f"/lib/x86_64-linux-gnu/{loader}")
    for source_name, dest in GUEST_FILES.items():
        if dest == "init":
            continue
        path = rootfs / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_guest_file(source_name))
        os.chmod(path, 0o755 if not dest.startswith("etc/inittab") else 0o644)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(rootfs / "etc/shadow", 0o600)
    (rootfs / "etc/hostname").write_text("tiny\n")
    (rootfs / "etc/profile").write_text(
        'export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nPS1="\\h:\\w# "\n')
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")


def _compile_static(source_name: str, scratch: Path, target: Path) -> None:
    """Compile one C file from files/ into a static binary at `target` (mode 0755)."""
    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / source_name
    source.write_bytes(_guest_file(source_name))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([*CC, "-o", str(target), str(source)], capture_output=True,
                              text=True, timeout=300, check=False)
    except FileNotFoundError:
        raise ImageBuildError(f"cannot compile {source_name}: gcc is not installed",
                              hint="run scripts/install-host-deps.sh (gcc, libc6-dev)") from None
    if done.returncode != 0:
        raise ImageBuildError(f"cannot compile {source_name}: gcc exited {done.returncode}",
                              detail=done.stderr[-4000:],
                              hint="run scripts/install-host-deps.sh (gcc, libc6-dev)")
    os.chmod(target, 0o755)
