// #/vm/NAME: one VM. State and facts live from the event stream (a lifecycle event's state is
// shown at once, then the status is re-read), actions, console, graphs, resources, snapshots,
// clone, export, NICs, log and migrate.

import { ApiError, api, get, toLogin, vmPath } from "./api.js";
import { addresses, append, bytes, clearErrors, confirmAction, duration, errorText, fromTemplate, h,
         rate, showError, when } from "./dom.js";
import { debounce, subscribe } from "./events.js";
import { drawChart } from "./charts.js";
import { run } from "./toasts.js";

const HISTORY_MS = 2000;
const STATUS_MS = 5000; // cached status (cheap)
const FULL_STATUS_MS = 15000; // asks QEMU and the guest agent (addresses)
const LOG_KEEP = 256 * 1024; // characters of the console log kept on the page
const LIVE = new Set(["starting", "running", "paused", "stopping"]);
const CONSOLE_STATES = new Set(["running", "paused", "stopping"]); // where the API allows one
const FINAL = new Set(["success", "failure", "cancelled"]);

// Which actions each state allows (vmkit.model.state.ALLOWED); delete is always offered:
// a live VM is deleted with force (killed first), after a confirmation that says so.
const OFF = ["start"];
const ALLOWED = {
  defined: OFF, stopped: OFF, crashed: OFF,
  starting: ["kill"],
  running: ["stop", "kill", "restart", "pause"],
  paused: ["stop", "kill", "restart", "resume"],
  stopping: ["kill"],
  broken: [],
};

const errBody = (err) => (err instanceof ApiError ? err.body : { error: String(err.message || err) });

// Strip terminal escape sequences and carriage returns from the serial log for reading.
const ESCAPES = /\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHM])|\r/g;

export function mount(root, name) {
  root.append(fromTemplate("page-vm"));
  const $ = (id) => root.querySelector(`#${id}`);
  const path = vmPath(name);
  const actionButtons = [...root.querySelectorAll(".actions button[data-action]")];
  const busy = new Set(); // actions in flight: their buttons stay disabled
  let vm = null;
  let generation = 0; // bumped by each lifecycle event of this VM
  let unmounted = false;
  let vanished = false;
  let memoryTouched = false;
  let terminal = null;
  let screen = null; // noVNC, for a VM with a display (loaded only then)
  const timers = [];

  $("vm-name").textContent = name;
  document.title = `${name} · vmkit`;

  // -- state and facts ------------------------------------------------------------------------
  function applyState(state) {
    $("vm-state").textContent = state;
    $("vm-state").dataset.state = state;
    const known = !vanished && Object.hasOwn(ALLOWED, state); // nothing is offered before the first status
    const allowed = known ? ALLOWED[state] : [];
    for (const b of actionButtons) {
      const action = b.dataset.action;
      b.disabled = busy.has(action) || (action === "delete" ? !known : !allowed.includes(action));
    }
    if (!memoryTouched) $("snapshot-memory").checked = state === "running";
    holdConsole(state);
  }

  // No retries while the VM cannot have a console; back at once when it can.
  function holdConsole(state) {
    if (!Object.hasOwn(ALLOWED, state)) return;
    for (const view of [terminal, screen]) {
      if (!view) continue;
      if (CONSOLE_STATES.has(state)) view.release();
      else view.hold(`the VM is ${state}: it comes back when the VM runs`);
    }
  }

  // The screen section exists for a VM with a display (firmware-booted VMs); noVNC loads then.
  function showScreen() {
    if (screen || !vm || vm.display !== "std") return;
    $("screen-section").hidden = false;
    screen = { hold() {}, release() {}, close() {} }; // until the module is there
    import("./screen.js").then((mod) => {
      if (unmounted) return;
      screen = mod.openScreen($("screen"), $("screen-status"), $("screen-detail"), name);
      $("screenshot").addEventListener("click", () => {
        $("screen-error").textContent = "";
        mod.saveScreenshot(name).catch((err) => {
          $("screen-error").textContent = errorText(errBody(err));
        });
      });
      holdConsole($("vm-state").textContent);
    }).catch((err) => {
      $("screen-detail").textContent = `noVNC did not load: ${err.message}`;
    });
  }

  function renderFacts() {
    const rows = [
      ["Image", vm.image || "none (its own disk)"],
      ["vCPUs", vm.max_cpus > vm.cpus ? `${vm.cpus} (max ${vm.max_cpus})` : String(vm.cpus)],
      ["Memory", vm.max_memory > vm.memory ? `${bytes(vm.memory)} (max ${bytes(vm.max_memory)})`
        : bytes(vm.memory)],
      ["Disk", `${bytes(vm.disk)} (${vm.disk_mode})`],
      ["Uptime", vm.uptime != null ? duration(vm.uptime) : "–"],
      ["Addresses", addresses(vm) || "–"],
      ["SSH", vm.ssh || "–"],
      ["Restart policy", vm.restart_policy ? `${vm.restart_policy.mode}, at most `
        + `${vm.restart_policy.max_restarts} in a row, autostart `
        + `${vm.restart_policy.autostart ? "on" : "off"}` : "–"],
      ["Restarts", vm.restarts ? `${vm.restarts.restarts ?? 0} in total`
        + (vm.restarts.last_reason ? `; last: ${vm.restarts.last_reason}` : "") : "–"],
      ["Accelerator", vm.accel || "–"],
      ["Machine", `${vm.machine} · CPU ${vm.cpu_model}`],
      ["Boot", vm.boot === "kernel" ? `kernel (${vm.firmware})`
        : `${vm.boot} through ${vm.firmware === "ovmf" ? "UEFI (OVMF)" : "BIOS (SeaBIOS)"}`],
      ["Media", vm.media || "–"],
      ["Last exit", vm.last_exit ? `${vm.last_exit.description} (${when(vm.last_exit.at)})` : "–"],
    ];
    if (vm.isolation_note) rows.push(["Isolation", vm.isolation_note]);
    if (vm.broken) rows.push(["Broken", vm.broken]);
    $("vm-facts").replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const f = $("set-form").elements;
    f.cpus.placeholder = `now ${vm.cpus}`;
    f.memory.placeholder = `now ${bytes(vm.memory)}`;
  }

  function markGone(message) {
    vanished = true;
    $("vm-gone").hidden = false;
    $("vm-gone").replaceChildren(message, " ", h("a", { href: "#/vms" }, "Back to the list"));
    applyState($("vm-state").textContent || "gone");
    if (terminal) terminal.close();
    terminal = null;
  }

  async function loadStatus(full = false) {
    const asked = generation;
    try {
      const next = await get(full ? path : `${path}?query=false`);
      if (unmounted) return;
      // the cached status has no guest facts: keep the last ones while the VM is live
      const guest = next.guest ?? (LIVE.has(next.state) && vm ? vm.guest : null);
      vm = { ...next, guest };
      if (asked !== generation) vm.state = $("vm-state").textContent; // an event overtook us
      vanished = false;
      $("vm-gone").hidden = true;
      renderFacts();
      showScreen();
      applyState(vm.state);
    } catch (err) {
      if (unmounted) return;
      if (err instanceof ApiError && err.status === 404) markGone(`VM ${name} does not exist.`);
    }
  }
  const reloadStatus = debounce(() => loadStatus(false));

  // -- actions ----------------------------------------------------------------------------------
  async function act(action) {
    const state = $("vm-state").textContent;
    if (action === "kill" && !await confirmAction(
      `Kill ${name}? Its QEMU is ended at once, like pulling the plug: what the guest had not `
      + "written to disk is lost.", "Kill")) return;
    const force = action === "delete" && (LIVE.has(state) || state === "broken");
    if (action === "delete" && !await confirmAction(
      `Delete ${name} with its disks and all its snapshots? This cannot be undone.`
      + (force ? ` It is ${state}: it will be killed first.` : ""), "Delete")) return;
    busy.add(action);
    applyState(state);
    try {
      if (action === "delete") {
        await run(`delete ${name}`, () => api("DELETE", `${path}${force ? "?force=true" : ""}`));
        if (!unmounted) location.hash = "#/vms";
        return;
      }
      await run(`${action} ${name}`, () => api("PUT", `${path}/state`, { action }));
    } catch {
      // the toast shows the error
    } finally {
      busy.delete(action);
      if (!unmounted) {
        applyState($("vm-state").textContent);
        loadStatus(false);
      }
    }
  }
  for (const b of actionButtons) b.addEventListener("click", () => act(b.dataset.action));

  // -- console (xterm.js loaded on this page only; the rest works if it fails to load) ---------
  import("./console.js").then((mod) => {
    if (unmounted || vanished) return;
    terminal = mod.openConsole($("console"), $("console-status"), $("console-detail"), name);
    holdConsole($("vm-state").textContent);
  }).catch((err) => {
    $("console-status").textContent = "unavailable";
    $("console-status").dataset.state = "reconnecting";
    $("console-detail").textContent = `xterm.js did not load: ${err.message}`;
  });

  // -- graphs -------------------------------------------------------------------------------------
  async function loadHistory() {
    try {
      const { samples } = await get(`${path}/history`);
      if (unmounted) return;
      drawChart($("graph-cpu"), samples, [{ key: "cpu_percent", cls: "a" }],
                { format: (v) => `${v.toFixed(1)} %`, floor: 5 });
      drawChart($("graph-memory"), samples, [{ key: "memory_bytes", cls: "a" },
                                             { key: "guest_memory_bytes", cls: "b" }],
                { format: bytes, floor: 1 << 20 });
      drawChart($("graph-disk"), samples, [{ key: "disk_read_bps", cls: "a" },
                                           { key: "disk_write_bps", cls: "b" }],
                { format: rate, floor: 1024 });
      drawChart($("graph-net"), samples, [{ key: "net_rx_bps", cls: "a" },
                                          { key: "net_tx_bps", cls: "b" }],
                { format: rate, floor: 1024 });
      $("history-error").textContent = "";
    } catch (err) {
      if (!unmounted) $("history-error").textContent = `history: ${errorText(errBody(err))}`;
    }
  }

  // -- resources (PATCH: only the fields given) --------------------------------------------------
  $("set-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    clearErrors(form, $("set-error"));
    $("set-result").textContent = "";
    const body = {};
    const cpus = form.elements.cpus.value.trim();
    if (cpus) body.cpus = /^\d+$/.test(cpus) ? Number(cpus) : cpus;
    if (form.elements.memory.value.trim()) body.memory = form.elements.memory.value.trim();
    if (form.elements.restart.value) body.restart = form.elements.restart.value;
    $("set-submit").disabled = true;
    try {
      const view = await run(`set ${name}`, () => api("PATCH", path, body));
      const { now = [], at_restart: later = [] } = view.result || {};
      $("set-result").textContent = [now.length && `Now: ${now.join("; ")}.`,
        later.length && `At the next start: ${later.join("; ")}.`].filter(Boolean).join(" ");
      form.reset();
      loadStatus(true);
    } catch (err) {
      showError(form, $("set-error"), errBody(err));
    } finally {
      $("set-submit").disabled = false;
    }
  });

  // -- snapshots ------------------------------------------------------------------------------
  // The tree is drawn as one flat list in tree order, indented by depth (data-depth), so that
  // li[data-snapshot=X] holds X's own buttons only; data-parent names its parent.
  function snapshotRow(s, depth) {
    const li = h("li", { dataset: { snapshot: s.name, parent: s.parent || "", depth: String(depth) },
                         class: s.current ? "current" : null,
                         "aria-current": s.current ? "true" : null });
    li.style.setProperty("--depth", depth);
    const meta = [when(s.created_at), s.with_memory ? "with memory" : "disk only",
                  bytes((s.disk_bytes || 0) + (s.memory_bytes || 0))].join(" · ");
    append(li,
      h("span", { class: "snap-name" }, depth ? `└ ${s.name}` : s.name),
      s.current ? h("span", { class: "badge current-badge" }, "current") : null,
      h("span", { class: "muted snap-meta" }, meta),
      h("span", { class: "snap-buttons" },
        h("button", { type: "button", dataset: { action: "restore" }, "aria-label": `Restore ${s.name}`,
                      onclick: () => restoreSnapshot(s) }, "Restore"),
        h("button", { type: "button", class: "danger", dataset: { action: "delete" },
                      "aria-label": `Delete snapshot ${s.name}`,
                      onclick: () => deleteSnapshot(s) }, "Delete")));
    return li;
  }

  async function loadSnapshots() {
    try {
      const snaps = await get(`${path}/snapshots`);
      if (unmounted) return;
      const names = new Set(snaps.map((s) => s.name));
      const children = new Map();
      for (const s of snaps) {
        const parent = s.parent && names.has(s.parent) ? s.parent : null;
        if (!children.has(parent)) children.set(parent, []);
        children.get(parent).push(s);
      }
      const rows = [];
      const walk = (parent, depth) => {
        const kids = (children.get(parent) || []).sort((a, b) => a.created_at - b.created_at);
        for (const s of kids) {
          rows.push(snapshotRow(s, depth));
          walk(s.name, depth + 1);
        }
      };
      walk(null, 0);
      $("snapshot-tree").replaceChildren(...rows);
      $("snapshot-empty").hidden = rows.length > 0;
      $("snapshot-error").textContent = "";
    } catch (err) {
      if (!unmounted && !(err instanceof ApiError && err.status === 404)) {
        $("snapshot-error").textContent = errorText(errBody(err));
      }
    }
  }
  const reloadSnapshots = debounce(loadSnapshots);

  async function restoreSnapshot(s) {
    if (!await confirmAction(`Restore ${name} to snapshot ${s.name}? What changed since `
      + `(${s.with_memory ? "disk and memory" : "disk"}) is lost unless another snapshot holds it.`,
    "Restore")) return;
    try {
      await run(`restore ${name}/${s.name}`,
                () => api("POST", `${path}/snapshots/${encodeURIComponent(s.name)}/restore`));
    } catch {
      // shown in the toast
    }
    loadSnapshots();
    loadStatus(false);
  }

  async function deleteSnapshot(s) {
    if (!await confirmAction(`Delete snapshot ${s.name} of ${name}?`, "Delete")) return;
    try {
      await run(`delete snapshot ${name}/${s.name}`,
                () => api("DELETE", `${path}/snapshots/${encodeURIComponent(s.name)}`));
    } catch {
      // shown in the toast
    }
    loadSnapshots();
  }

  $("snapshot-memory").addEventListener("change", () => { memoryTouched = true; });
  $("snapshot-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    clearErrors(form, $("snapshot-error"));
    const body = { name: $("snapshot-name").value.trim(), disk_only: !$("snapshot-memory").checked };
    $("snapshot-take").disabled = true;
    try {
      await run(`snapshot ${name}/${body.name}`, () => api("POST", `${path}/snapshots`, body));
      $("snapshot-name").value = "";
    } catch (err) {
      showError(form, $("snapshot-error"), errBody(err));
    } finally {
      $("snapshot-take").disabled = false;
      loadSnapshots();
    }
  });

  // -- clone: full = own disk copy, linked = shares a snapshot layer, instant = running copy ---
  $("clone-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    clearErrors(form, $("clone-error"));
    $("clone-result").replaceChildren();
    const kind = $("clone-kind").value;
    const target = $("clone-name").value.trim();
    const body = { target, linked: kind === "linked", live: kind === "instant" };
    $("clone-go").disabled = true;
    try {
      await run(`clone ${name} to ${target} (${kind})`, () => api("POST", `${path}/clone`, body));
      $("clone-result").replaceChildren("Cloned: ",
        h("a", { id: "clone-link", href: `#/vm/${encodeURIComponent(target)}` }, target));
      $("clone-name").value = "";
    } catch (err) {
      showError(form, $("clone-error"), errBody(err));
    } finally {
      $("clone-go").disabled = false;
      loadSnapshots(); // a linked or live clone leaves a snapshot behind
    }
  });

  // -- export: the bundle is downloaded once from the finished operation -----------------------
  $("export-go").addEventListener("click", async () => {
    $("export-go").disabled = true;
    $("export-result").replaceChildren();
    try {
      const view = await run(`export ${name}`, () => api("POST", `${path}/export`));
      const href = view.result?.download || `/1.0/operations/${view.id}/bundle`;
      $("export-result").replaceChildren(h("a", { id: "export-link", href, download: `${name}.vmkit` },
                                           `Download ${name}.vmkit`),
                                         h("span", { class: "muted" }, " (once)"));
    } catch {
      // shown in the toast
    } finally {
      $("export-go").disabled = false;
    }
  });

  // -- NICs ---------------------------------------------------------------------------------------
  async function loadNics() {
    try {
      const nics = await get(`${path}/nics`);
      if (unmounted) return;
      const rows = nics.map((nic) => h("tr", { dataset: { nic: nic.network } },
        h("td", {}, nic.network + (nic.restricted ? " (restricted)" : "")),
        h("td", {}, nic.mac),
        h("td", {}, nic.address || "–"),
        h("td", {}, (nic.forwards || []).map((f) =>
          `${f.proto} ${f.address}:${f.host_port} → ${f.guest_port}`).join(", ") || "–")));
      if (!rows.length) {
        rows.push(h("tr", {}, h("td", { colspan: "4", class: "muted" },
                                "one restricted QEMU user-mode NIC (no vmkit network)")));
      }
      $("nic-list").querySelector("tbody").replaceChildren(...rows);
      $("nic-error").textContent = "";
    } catch (err) {
      if (!unmounted) $("nic-error").textContent = errorText(errBody(err));
    }
  }

  // -- extra disks ----------------------------------------------------------------------------
  async function loadDisks() {
    try {
      const disks = await get(`${path}/disks`);
      if (unmounted) return;
      const rows = disks.map((d) => h("tr", { dataset: { disk: d.name } },
        h("td", {}, d.name), h("td", {}, bytes(d.size)), h("td", {}, bytes(d.used)),
        h("td", {}, h("button", { type: "button", class: "danger", dataset: { action: "remove" },
                                  "aria-label": `Remove disk ${d.name}`,
                                  onclick: () => removeDisk(d) }, "Remove"))));
      if (!rows.length) {
        rows.push(h("tr", {}, h("td", { colspan: "4", class: "muted" }, "none")));
      }
      $("disk-list").querySelector("tbody").replaceChildren(...rows);
    } catch (err) {
      if (!unmounted) $("disk-error").textContent = errorText(errBody(err));
    }
  }

  async function removeDisk(d) {
    if (!await confirmAction(`Remove disk ${d.name} of ${name}? Its data is deleted; a running `
      + "guest must let it go first (unmount it).", "Remove")) return;
    try {
      await run(`remove disk ${name}/${d.name}`,
                () => api("DELETE", `${path}/disks/${encodeURIComponent(d.name)}`));
    } catch {
      // shown in the toast
    } finally {
      loadDisks();
    }
  }

  $("disk-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = $("disk-form");
    clearErrors(form, $("disk-error"));
    const body = { name: $("disk-name").value.trim(), size: $("disk-size").value.trim() };
    $("disk-add").disabled = true;
    try {
      await run(`add disk ${name}/${body.name}`, () => api("POST", `${path}/disks`, body));
      $("disk-name").value = "";
    } catch (err) {
      showError(form, $("disk-error"), errBody(err));
    } finally {
      $("disk-add").disabled = false;
      loadDisks();
    }
  });

  // -- console log: read from where the last read ended ---------------------------------------
  let logOffset = 0;
  const decoder = new TextDecoder();
  async function loadLog() {
    const pre = $("vm-log");
    try {
      const res = await fetch(`${path}/log?offset=${logOffset}`, { credentials: "same-origin" });
      if (res.status === 401) toLogin();
      if (!res.ok) throw new ApiError(await res.json().catch(() => ({ error: res.statusText })),
                                      res.status);
      const data = await res.arrayBuffer();
      if (unmounted) return;
      logOffset += data.byteLength;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      const text = (pre.textContent + decoder.decode(data, { stream: true }).replace(ESCAPES, ""))
        .slice(-LOG_KEEP);
      pre.textContent = text;
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      $("log-info").textContent = `${bytes(logOffset)} read`;
    } catch (err) {
      if (!unmounted) $("log-info").textContent = errorText(errBody(err));
    }
  }
  $("log-refresh").addEventListener("click", loadLog);

  // -- migrate (the destination's credentials typed in; the token is cleared once sent) -------
  async function migrate(check) {
    const form = $("migrate-form");
    const f = form.elements;
    clearErrors(form, $("migrate-error"));
    $("migrate-reasons").replaceChildren();
    const body = {
      destination: { url: f.url.value.trim(), server_cert: f.server_cert.value.trim(),
                     token: f.token.value || null },
      storage: f.storage.value,
      name: f.name.value.trim() || null,
      check,
    };
    if (!check && !await confirmAction(`Move ${name} to ${body.destination.url}? It will no `
      + "longer be on this host.", "Migrate")) return;
    if (!check) f.token.value = "";
    try {
      const view = await run(`${check ? "check move of" : "migrate"} ${name}`,
                             () => api("POST", `${path}/migrate`, body));
      if (check) {
        const reasons = view.result || [];
        $("migrate-reasons").replaceChildren(...(reasons.length ? reasons.map((r) => h("li", {}, r))
          : [h("li", { class: "ok" }, "It can move.")]));
      } else if (!unmounted) {
        location.hash = "#/vms";
      }
    } catch (err) {
      showError(form, $("migrate-error"), errBody(err));
    }
  }
  $("migrate-check").addEventListener("click", () => migrate(true));
  $("migrate-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    migrate(false);
  });

  // -- live updates ---------------------------------------------------------------------------
  const unsubscribe = subscribe((event) => {
    const meta = event.metadata || {};
    if (event.type === "reconnected") {
      loadStatus(false);
      loadSnapshots();
      if (terminal) terminal.reconnectNow();
      return;
    }
    if (meta.vm !== name) return;
    if (event.type === "lifecycle") {
      if (meta.action === "deleted") {
        markGone(`VM ${name} was deleted.`);
        return;
      }
      generation++;
      if (meta.state) applyState(meta.state);
      if (terminal && CONSOLE_STATES.has(meta.state)) terminal.reconnectNow();
      if (String(meta.action).startsWith("snapshot-") || meta.action === "cloned") reloadSnapshots();
      if (meta.action === "set-applied") loadStatus(true);
      reloadStatus();
    } else if (event.type === "operation-recovered"
               || (event.type === "operation" && FINAL.has(meta.operation?.status))) {
      reloadStatus();
    }
  });

  applyState("…");
  loadStatus(false).then(() => loadStatus(true));
  loadHistory();
  loadSnapshots();
  loadNics();
  loadDisks();
  loadLog();
  timers.push(setInterval(loadHistory, HISTORY_MS),
              setInterval(() => loadStatus(false), STATUS_MS),
              setInterval(() => loadStatus(true), FULL_STATUS_MS));

  return () => {
    unmounted = true;
    timers.forEach(clearInterval);
    unsubscribe();
    if (terminal) terminal.close();
    if (screen) screen.close();
    document.title = "vmkit";
  };
}
