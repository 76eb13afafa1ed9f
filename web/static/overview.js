// #/ : the host: capacity and what the VMs were given of it, the accelerator (and under TCG
// the isolation note), VM counts, and host graphs from /1.0/host/history every 2 s.

import { ApiError, get } from "./api.js";
import { bytes, errorText, fromTemplate, h } from "./dom.js";
import { debounce, subscribe } from "./events.js";
import { drawChart } from "./charts.js";

const HISTORY_MS = 2000;
const REFRESH_MS = 5000;

function setMeter(meter, value, max) {
  meter.max = Math.max(max, 1);
  meter.value = Math.min(value, meter.max);
  meter.high = meter.max * 0.9; // the browser colours it past 90%
}

export function mount(root) {
  root.append(fromTemplate("page-overview"));
  const $ = (id) => root.querySelector(`#${id}`);
  let hostDisk = null; // {free, total} from the doctor report

  async function loadAllocation() {
    try {
      const [cap, vms] = await Promise.all([get("/1.0/host/capacity"), get("/1.0/vms")]);
      const { capacity, policy, allocated } = cap;
      const vcpuLimit = Math.floor(capacity.cores * policy.vcpu_ratio);
      const memLimit = Math.max(0, (capacity.memory - policy.memory_reserve) * policy.memory_ratio);
      setMeter($("alloc-cpus-meter"), allocated.cpus, vcpuLimit);
      $("alloc-cpus").textContent = `${allocated.cpus} of ${vcpuLimit} allocated to running VMs `
        + `(${capacity.cores} cores × ${policy.vcpu_ratio})`;
      setMeter($("alloc-memory-meter"), allocated.memory, memLimit);
      $("alloc-memory").textContent = `${bytes(allocated.memory)} of ${bytes(memLimit)} allocated `
        + `(RAM ${bytes(capacity.memory)} − reserve ${bytes(policy.memory_reserve)}, `
        + `× ${policy.memory_ratio})`;
      const provisioned = vms.reduce((sum, vm) => sum + (vm.disk || 0), 0);
      if (hostDisk) {
        setMeter($("alloc-disk-meter"), hostDisk.total - hostDisk.free, hostDisk.total);
        $("alloc-disk").textContent = `${bytes(hostDisk.total - hostDisk.free)} used of `
          + `${bytes(hostDisk.total)}, ${bytes(hostDisk.free)} free; VM disks provisioned `
          + `${bytes(provisioned)} (virtual size)`;
      } else {
        $("alloc-disk").textContent = `VM disks provisioned ${bytes(provisioned)} (virtual size)`;
      }
      const count = (pred) => vms.filter(pred).length;
      const stopped = (vm) => vm.state === "stopped" || vm.state === "defined";
      $("count-running").textContent = count((vm) => vm.state === "running");
      $("count-stopped").textContent = count(stopped);
      const others = vms.filter((vm) => vm.state !== "running" && !stopped(vm));
      $("count-other").textContent = others.length;
      $("count-other").title = others.map((vm) => `${vm.name}: ${vm.state}`).join(", ");
    } catch (err) {
      $("alloc-cpus").textContent = describe(err);
    }
  }

  async function loadHost() {
    try {
      const [doctor, caps] = await Promise.all([get("/1.0/host/doctor"),
                                                get("/1.0/host/capabilities")]);
      const accel = doctor.accelerator || {};
      $("accel").textContent = (caps.accel || accel.chosen || "unknown").toUpperCase()
        + (caps.qemu_version ? ` · QEMU ${caps.qemu_version}` : "");
      $("accel-reason").textContent = accel.reason || "";
      const tcg = (caps.accel || accel.chosen) === "tcg";
      $("tcg-note").hidden = !tcg;
      $("tcg-note-detail").textContent = accel.isolation_note ? `(${accel.isolation_note})` : "";
      const iso = doctor.isolation || {};
      $("isolation").textContent = [iso.qemu_user && `QEMU runs as ${iso.qemu_user}`,
                                    iso.sandbox && `sandbox: ${iso.sandbox}`,
                                    iso.note].filter(Boolean).join("; ");
      $("doctor-problems").replaceChildren(...(doctor.problems || []).map((p) =>
        h("li", {}, p.hint ? `${p.message} — ${p.hint}` : p.message)));
      if (doctor.disk) hostDisk = doctor.disk;
      loadAllocation();
    } catch (err) {
      $("accel").textContent = describe(err);
    }
  }

  async function loadHistory() {
    try {
      const { samples } = await get("/1.0/host/history");
      drawChart($("graph-host-cpu"), samples, [{ key: "cpu_percent", cls: "a" }],
                { format: (v) => `${v.toFixed(1)} %`, floor: 5 });
      drawChart($("graph-host-memory"), samples, [{ key: "memory_bytes", cls: "a" }],
                { format: bytes, floor: 1 << 20 });
      drawChart($("graph-host-running"), samples, [{ key: "running", cls: "a" }],
                { format: (v) => `${v} VMs`, floor: 1 });
      $("host-history-error").textContent = "";
    } catch (err) {
      $("host-history-error").textContent = `history: ${describe(err)}`;
    }
  }

  const reload = debounce(loadAllocation, 300);
  const unsubscribe = subscribe((event) => {
    if (event.type === "lifecycle" || event.type === "reconnected") reload();
  });
  loadHost();
  loadAllocation();
  loadHistory();
  const timers = [setInterval(loadHistory, HISTORY_MS), setInterval(loadAllocation, REFRESH_MS)];
  return () => {
    timers.forEach(clearInterval);
    unsubscribe();
  };
}

function describe(err) {
  return err instanceof ApiError ? errorText(err.body) : "the daemon does not answer";
}
