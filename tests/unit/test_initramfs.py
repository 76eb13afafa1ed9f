import gzip
import subprocess
from pathlib import Path

from vmkit.images.initramfs import (
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    CpioEntry,
    cpio_newc,
    gzip_reproducible,
    load_order,
    module_name,
    parse_modules_dep,
)

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
""".replace("\\\n", "")


def test_dependencies_load_first_and_once() -> None:
    order = load_order(parse_modules_dep(MODULES_DEP), ["virtio_pci", "virtio_net", "virtio-rng"])
    names = [module_name(p) for p in order]
    assert names == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                     "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_rng"]


def test_unknown_module_is_an_error() -> None:
    try:
        load_order(parse_modules_dep(MODULES_DEP), ["nonexistent"])
    except KeyError as exc:
        assert "nonexistent" in str(exc)
    else:
        raise AssertionError("expected KeyError")


def test_cpio_unpacks_with_the_real_cpio(tmp_path: Path) -> None:
    archive = gzip_reproducible(cpio_newc([
        CpioEntry("bin", S_IFDIR | 0o755),
        CpioEntry("bin/tool", S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("bin/alias", S_IFLNK | 0o777, b"tool"),
        CpioEntry("odd", S_IFREG | 0o644, b"x" * 5),
    ]))
    assert archive == gzip_reproducible(gzip.decompress(archive))  # reproducible bytes
    subprocess.run(["cpio", "-i", "--quiet", "-d"], input=gzip.decompress(archive),
                   cwd=tmp_path, check=True)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/alias").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
