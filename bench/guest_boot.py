"""Guest boot benchmark: debian-12 to agent-ready and to ssh-ready, tiny for comparison.

Each debian run is a vmkit create + start (with an ssh key in its cloud-init seed), then the
same argv under bare qemu-system-x86_64 on a fresh overlay with the same seed: both measured
from the start to the guest agent answering and to `ssh ... true` succeeding. Runs alternate so
drift in the machine's speed hits both alike. Image build times come from image.json (the first
build) and from a no-op rebuild timed here. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import bare_boot, drop, median, scratch_host
from vmkit import Host
from vmkit.images.seed import write_seed
from vmkit.model.cloudinit import seed_files
from vmkit.storage.home import default_home


def wait_ssh(argv: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"ssh did not answer within {timeout:g}s")


def ssh_probe(port: int, key: Path) -> list[str]:
    return ["ssh", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1",
            "true"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    keydir = Path(tempfile.mkdtemp(prefix="vmkb-key-"))
    key = keydir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    started = time.monotonic()
    Host(default_home()).build_image("debian-12")  # a no-op when built: the recipe hash matches
    noop_rebuild_s = time.monotonic() - started
    host = scratch_host(("tiny", "debian-12"))
    debian = host.image("debian-12")
    results: dict[str, list[float]] = {k: [] for k in (
        "vmkit_agent_s", "vmkit_ssh_s", "qemu_agent_s", "qemu_ssh_s", "tiny_agent_s")}
    try:
        accel = host.accel().accel
        for run in range(args.runs):
            start = time.monotonic()
            vm = host.create(f"dv{run}", image="debian-12", cpus=args.cpus, memory=args.memory,
                             disk="4G", ssh_keys=[f"{key}.pub"])
            vm.start(wait=True, timeout=600)
            results["vmkit_agent_s"].append(time.monotonic() - start)
            port = vm.status().ssh
            assert port is not None
            wait_ssh(ssh_probe(int(port.rsplit(":", 1)[1]), key), 600)
            results["vmkit_ssh_s"].append(time.monotonic() - start)
            vm.kill()
            vm.delete()

            twin = host.create(f"dq{run}", image="debian-12", cpus=args.cpus,
                               memory=args.memory, disk="4G", ssh_keys=[f"{key}.pub"])
            twin.folder.run.mkdir(mode=0o700, exist_ok=True)
            assert twin.config.cloud_init is not None
            write_seed(twin.folder.seed_file, seed_files(twin.config.cloud_init))
            bare_port = free_port()
            bare = bare_boot(host, twin.name, twin.argv(accel, ssh_port=bare_port),
                             timeout=600, then=lambda p=bare_port: wait_ssh(ssh_probe(p, key),
                                                                            600))
            results["qemu_agent_s"].append(bare.agent_s)
            results["qemu_ssh_s"].append(bare.then_s or 0.0)
            twin.delete()

            start = time.monotonic()
            tiny = host.create(f"tv{run}", memory="256M")
            tiny.start(wait=True)
            results["tiny_agent_s"].append(time.monotonic() - start)
            tiny.kill()
            tiny.delete()
            print(f"run {run}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
                  flush=True)
    finally:
        drop(host)
    medians = {k: round(median(v), 2) for k, v in results.items()}
    print(json.dumps({
        "benchmark": "guest_boot", "accel": accel, "runs": args.runs,
        "debian": {"cpus": args.cpus, "memory": args.memory},
        **medians,
        "ratio_agent": round(medians["vmkit_agent_s"] / medians["qemu_agent_s"], 3),
        "ratio_ssh": round(medians["vmkit_ssh_s"] / medians["qemu_ssh_s"], 3),
        "runs_s": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "image": {"debian_build_s": debian.build_seconds, "debian_noop_rebuild_s":
                  round(noop_rebuild_s, 1), "debian_size_mib": round(debian.size / 2**20, 1),
                  "debian_packages": len(debian.packages)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
