"""Snapshot, clone and bundle benchmark. Prints one JSON object per figure and a summary line.

- live snapshot (with memory) and restore: vmkit's external layers + memory file, for 256 MiB
  and 1 GiB guests, with how long the guest was paused (QEMU's downtime of the live save's last
  pass + the disk switch and `cont`), idle and while the guest rewrites RAM, next to QEMU's
  internal snapshots (snapshot-save / snapshot-load into the
  qcow2) on the same guest: the measurement behind the mechanism choice;
- linked clone of a 1 GiB and a 20 GiB disk (target: equal within noise, <= 0.2 s);
- instant clone of a running 256 MiB guest, `vmkit clone --live` until the clone answers exec,
  with the source's pause, idle and busy (targets: <= 1 s, paused <= 100 ms);
- export and import throughput against `cp` of the same files (ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import drop, median, scratch_host
from vmkit import VM, Host
from vmkit.qemu.qmp import QmpConnection


def timed(action) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    action()
    return time.monotonic() - start


def fill_ram(vm: VM, mib: int) -> None:
    """Touch guest RAM with random data (tmpfs), so the memory state is not mostly zeros."""
    vm.exec(["sh", "-c", f"dd if=/dev/urandom of=/run/fill bs=1M count={mib} 2>/dev/null"],
            timeout=300)


def internal_snapshot(vm: VM) -> tuple[float, float]:
    """QEMU's own savevm/loadvm equivalent on the VM's active layer (for comparison only)."""
    def job(qmp: QmpConnection, command: str, args: dict[str, object]) -> None:
        qmp.execute(command, {"job-id": command, **args})
        while True:
            jobs = {j["id"]: j for j in qmp.execute("query-jobs")}
            if jobs[command]["status"] == "concluded":
                if jobs[command].get("error"):
                    raise RuntimeError(jobs[command]["error"])
                qmp.execute("job-dismiss", {"id": command})
                return
            time.sleep(0.01)

    with QmpConnection(vm.folder.qmp_socket, timeout=600) as qmp:
        node = "disk0"
        args = {"tag": "internal", "vmstate": node, "devices": [node]}
        save = timed(lambda: job(qmp, "snapshot-save", args))
        load = timed(lambda: job(qmp, "snapshot-load", args))
        qmp.execute("cont")
        job(qmp, "snapshot-delete", {"tag": "internal", "devices": [node]})
    return save, load


DIRTY_LOOP = ("(while :; do dd if=/dev/urandom of=/run/dirty bs=1M count=32 2>/dev/null; "
              "done) >/dev/null 2>&1 </dev/null &")


def snapshot_figures(host: Host, memory: str, ram_fill: int, runs: int) -> dict[str, object]:
    vm = host.create(f"snap-{memory.lower()}", memory=memory)
    vm.start(wait=True)
    fill_ram(vm, ram_fill)
    takes, restores, paused, busy_paused, busy_takes = [], [], [], [], []
    for run in range(runs):
        takes.append(timed(lambda run=run: vm.snapshot(f"s{run}")))
        paused.append(vm.snapshots()[-1].paused_ms or 0.0)
        restores.append(timed(lambda run=run: vm.restore(f"s{run}")))
    # the same while the guest rewrites 32 MiB of RAM in a loop (QEMU re-sends it)
    vm.exec(["sh", "-c", DIRTY_LOOP])
    for run in range(runs):
        busy_takes.append(timed(lambda run=run: vm.snapshot(f"b{run}")))
        busy_paused.append(next(s.paused_ms for s in vm.snapshots() if s.name == f"b{run}")
                           or 0.0)
    vm.kill()
    vm.delete()
    fresh = host.create(f"int-{memory.lower()}", memory=memory)
    fresh.start(wait=True)
    fill_ram(fresh, ram_fill)
    internal = [internal_snapshot(fresh) for _ in range(runs)]
    fresh.kill()
    fresh.delete()
    return {"figure": "live_snapshot", "memory": memory, "ram_filled_mib": ram_fill,
            "external_snapshot_s": round(median(takes), 3),
            "guest_paused_ms": round(median(paused), 1),
            "busy_snapshot_s": round(median(busy_takes), 3),
            "busy_guest_paused_ms": round(median(busy_paused), 1),
            "external_restore_s": round(median(restores), 3),
            "internal_snapshot_s": round(median([s for s, _ in internal]), 3),
            "internal_restore_s": round(median([r for _, r in internal]), 3)}


def linked_clone_figures(host: Host, runs: int) -> dict[str, object]:
    result: dict[str, object] = {"figure": "linked_clone"}
    for disk in ("1G", "20G"):
        source = host.create(f"lc-{disk.lower()}", disk=disk)
        times = [timed(lambda run=run, source=source, disk=disk: source.clone(
            f"lc-{disk.lower()}-{run}", linked=True))
                 for run in range(runs)]
        result[f"disk_{disk}_s"] = round(median(times), 3)
    return result


def instant_clone_figure(host: Host, runs: int) -> dict[str, object]:
    """From `vmkit clone --live` (the CLI, as a user types it) to the clone answering exec,
    and how long the source was paused (recorded on its helper snapshot), idle and while the
    source rewrites 32 MiB of RAM in a loop. Each clone is killed before the next run."""
    source = host.create("ic-source", memory="256M")
    source.start(wait=True)
    fill_ram(source, 64)
    figures: dict[str, object] = {"figure": "instant_clone", "memory": "256M"}
    for mode in ("idle", "busy"):
        if mode == "busy":
            source.exec(["sh", "-c", DIRTY_LOOP])
        times, paused = [], []
        for run in range(runs):
            name = f"ic-{mode}-{run}"
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "vmkit.cli.main", "clone", "ic-source", name,
                            "--live"], check=True, capture_output=True,
                           env={**os.environ, "VMKIT_HOME": str(host.layout.root)})
            clone = host.get(name)
            assert clone.exec(["true"]).exit_code == 0
            times.append(time.monotonic() - start)
            paused.append(next(s.paused_ms for s in source.snapshots()
                               if s.name == f"clone-{name}") or 0.0)
            clone.kill()
        figures |= {f"{mode}_cli_to_exec_s": round(median(times), 3),
                    f"{mode}_source_paused_ms": round(median(paused), 1),
                    f"{mode}_runs_s": [round(t, 3) for t in times],
                    f"{mode}_paused_runs_ms": paused}
    return figures


def bundle_figures(host: Host) -> dict[str, object]:
    vm = host.create("bundle", memory="512M", disk="2G")
    vm.start(wait=True)
    vm.exec(["sh", "-c", "dd if=/dev/urandom of=/root/data bs=1M count=300 2>/dev/null; sync"],
            timeout=600)
    fill_ram(vm, 200)
    vm.snapshot("with-memory")
    vm.stop()
    work = host.layout.root / "bundle-work"
    work.mkdir()
    bundle = work / "bundle.vmkit"
    export_s = timed(lambda: vm.export(bundle))
    size = bundle.stat().st_size
    files = [p for p in vm.folder.path.rglob("*") if (p.is_file() and p.suffix in
             (".qcow2", ".state")) or p.parent.name == "boot"]
    copy_dir = work / "cp"
    copy_dir.mkdir()
    subprocess.run(["sync"], check=True)
    cp_s = timed(lambda: (subprocess.run(["cp", *map(str, files), str(copy_dir)], check=True),
                          subprocess.run(["sync"], check=True)))
    copied = sum(p.stat().st_size for p in files)
    other = Host(host.layout.root / "import-home")
    from vmkit.images.catalog import link_image

    link_image(host.layout, other.layout, "tiny")
    import_s = timed(lambda: other.import_bundle(bundle))
    export_mbps = size / export_s / 1e6
    import_mbps = size / import_s / 1e6
    cp_mbps = copied / cp_s / 1e6
    other.delete_all()
    shutil.rmtree(work)
    return {"figure": "bundle", "bundle_mb": round(size / 1e6, 1),
            "export_mb_s": round(export_mbps, 1), "import_mb_s": round(import_mbps, 1),
            "cp_mb_s": round(cp_mbps, 1), "export_vs_cp": round(export_mbps / cp_mbps, 2),
            "import_vs_cp": round(import_mbps / cp_mbps, 2)}


FIGURES = ("snapshot-256M", "snapshot-1G", "linked-clone", "instant-clone", "bundle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(FIGURES), choices=list(FIGURES))
    args = parser.parse_args()
    runs = args.runs
    host = scratch_host()
    figures = []
    chosen = {
        "snapshot-256M": lambda: snapshot_figures(host, "256M", 128, runs),
        "snapshot-1G": lambda: snapshot_figures(host, "1G", 512, runs),
        "linked-clone": lambda: linked_clone_figures(host, 5),
        "instant-clone": lambda: instant_clone_figure(host, runs),
        "bundle": lambda: bundle_figures(host),
    }
    try:
        for name in args.only:
            result = chosen[name]()
            print(json.dumps(result), flush=True)
            figures.append(result)
    finally:
        drop(host)
    print(json.dumps({"benchmark": "snapshot", "figures": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
