"""Which machine type and firmware boot the tiny guest fastest (spawn -> guest agent ready).

Compares q35 and pc, each with qboot and SeaBIOS, and microvm (virtio-mmio devices found through
its ACPI tables; needs tsc_early_khz on the guest command line or it hangs calibrating the TSC).
Every variant is vmkit's own argv with the machine-specific parts swapped, so the rest is equal.
Prints one JSON object per variant and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import bare_boot, drop, median, scratch_host

QBOOT = "/usr/share/qemu/qboot.rom"
SEABIOS = "/usr/share/seabios/bios-256k.bin"


def host_tsc_khz() -> int:
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    return int(float(match.group(1)) * 1000) if match else 2_000_000


def _set(argv: list[str], option: str, value: str | None) -> list[str]:
    """Replace (or drop, with None) the value of `option`; add it when missing."""
    out = list(argv)
    if option in out:
        index = out.index(option)
        if value is None:
            del out[index:index + 2]
        else:
            out[index + 1] = value
    elif value is not None:
        out[1:1] = [option, value]
    return out


def variant(argv: list[str], name: str) -> list[str]:
    machine = argv[argv.index("-machine") + 1]
    if name == "q35+qboot":
        return argv
    if name == "q35+seabios":
        return _set(argv, "-bios", SEABIOS)
    if name.startswith("pc+"):
        pc = machine.replace("pc-q35-", "pc-i440fx-")
        out = _set(argv, "-machine", pc)
        return _set(out, "-bios", QBOOT if name == "pc+qboot" else SEABIOS)
    if name == "microvm":
        out = _set(argv, "-machine", "microvm,acpi=on,pit=off,pic=off,rtc=on")
        out = _set(out, "-bios", None)
        out = [a.replace("-pci", "-device") if a.startswith("virtio-") else a for a in out]
        out = [re.sub(r",bootindex=\d+", "", a) for a in out]
        cmdline = out[out.index("-append") + 1]
        return _set(out, "-append", f"{cmdline} tsc_early_khz={host_tsc_khz()} tsc=reliable")
    raise ValueError(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    names = ["q35+qboot", "q35+seabios", "pc+qboot", "pc+seabios", "microvm"]
    if not Path(QBOOT).exists():
        names = [n for n in names if "qboot" not in n]
    host = scratch_host()
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    try:
        accel = host.accel().accel
        for run in range(args.runs):
            for name in names:
                if name in errors:
                    continue
                vm = host.create(f"m{run}-{names.index(name)}", memory="256M")
                try:
                    elapsed = bare_boot(host, vm.name, variant(vm.argv(accel), name),
                                        timeout=60).agent_s
                    times[name].append(elapsed)
                except Exception as exc:  # a variant that cannot boot is a result, not a crash
                    errors[name] = f"{type(exc).__name__}: {exc}"
                vm.delete(force=True)
    finally:
        drop(host)
    summary = {}
    for name in names:
        entry = {"variant": name, "runs_s": [round(t, 3) for t in times[name]],
                 "median_s": round(median(times[name]), 3) if times[name] else None,
                 "error": errors.get(name)}
        print(json.dumps(entry))
        summary[name] = entry["median_s"]
    fastest = min((n for n in names if summary[n]), key=lambda n: summary[n] or 0.0)
    print(json.dumps({"benchmark": "machine_types", "accel": accel, "median_s": summary,
                      "fastest": fastest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
