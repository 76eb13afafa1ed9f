// #/vms: the VM table, live from the event stream (plus a 5 s re-read as a fallback), with a
// filter, sortable columns, and the import of a bundle (uploaded with progress).

import { ApiError, csrfHeaders, follow, get, toLogin } from "./api.js";
import { addresses, bytes, clearErrors, duration, errorText, fromTemplate, h,
         showError } from "./dom.js";
import { debounce, subscribe } from "./events.js";
import { toast } from "./toasts.js";

const REFRESH_MS = 5000;
const COLUMNS = ["name", "state", "cpus", "memory", "disk", "uptime", "addresses"];

function sortValue(vm, key) {
  if (key === "addresses") return addresses(vm);
  if (key === "uptime") return vm.uptime ?? -1;
  return vm[key];
}

export function mount(root) {
  root.append(fromTemplate("page-vms"));
  const table = root.querySelector("#vm-list");
  const tbody = table.querySelector("tbody");
  const filter = root.querySelector("#vm-filter");
  const empty = root.querySelector("#vm-empty");
  const listError = root.querySelector("#vm-list-error");
  let vms = [];
  let sort = { key: "name", dir: 1 };
  let generation = 0; // bumped by each lifecycle event: an older answer must not undo it

  function cells(vm) {
    return [
      h("a", { href: `#/vm/${encodeURIComponent(vm.name)}` }, vm.name),
      vm.state,
      String(vm.cpus),
      bytes(vm.memory),
      bytes(vm.disk),
      vm.uptime != null ? duration(vm.uptime) : "–",
      addresses(vm) || "–",
    ];
  }

  function render() {
    const words = filter.value.trim().toLowerCase();
    const sorted = [...vms].sort((a, b) => {
      const x = sortValue(a, sort.key);
      const y = sortValue(b, sort.key);
      const order = typeof x === "number" && typeof y === "number" ? x - y
        : String(x).localeCompare(String(y));
      return sort.dir * order || a.name.localeCompare(b.name);
    });
    const keep = new Set();
    let shown = 0;
    let index = 0;
    for (const vm of sorted) {
      keep.add(vm.name);
      let row = tbody.querySelector(`tr[data-vm="${CSS.escape(vm.name)}"]`);
      if (!row) {
        row = h("tr", { dataset: { vm: vm.name } },
                COLUMNS.map((c) => h("td", { class: c })));
      }
      const values = cells(vm);
      row.querySelectorAll("td").forEach((td, i) => {
        const value = values[i];
        if (value instanceof Node) {
          if (td.textContent !== value.textContent || !td.firstChild) td.replaceChildren(value);
        } else if (td.textContent !== value) {
          td.textContent = value;
        }
      });
      row.querySelector("td.state").dataset.state = vm.state;
      row.hidden = Boolean(words) && !vm.name.toLowerCase().includes(words)
        && !vm.state.toLowerCase().includes(words);
      if (!row.hidden) shown++;
      // moved only when out of place: moving a row would take the focus off its link
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
      index++;
    }
    for (const row of tbody.querySelectorAll("tr[data-vm]")) {
      if (!keep.has(row.dataset.vm)) row.remove();
    }
    empty.hidden = shown > 0;
  }

  // The state a lifecycle event announced, kept until a GET started after it answers.
  const stateOf = new Map();

  async function load() {
    const asked = generation;
    try {
      const listing = await get("/1.0/vms");
      if (asked === generation) stateOf.clear();
      vms = listing.map((vm) => ({ ...vm, state: stateOf.get(vm.name) ?? vm.state }));
      listError.textContent = "";
      render();
    } catch (err) {
      listError.textContent = err instanceof ApiError ? errorText(err.body)
        : "the daemon does not answer; retrying";
    }
  }
  const reload = debounce(load);

  const unsubscribe = subscribe((event) => {
    const meta = event.metadata || {};
    if (event.type === "lifecycle") {
      generation++;
      const vm = vms.find((v) => v.name === meta.vm);
      if (vm && meta.state) {
        vm.state = meta.state;
        stateOf.set(vm.name, meta.state);
        render();
      }
      reload();
    } else if (event.type === "reconnected" || event.type === "operation-recovered"
               || (event.type === "operation" && ["success", "failure", "cancelled"]
                 .includes(meta.operation?.status))) {
      reload();
    }
  });

  // Sorting: header buttons; aria-sort tells screen readers which column and which way.
  for (const button of table.querySelectorAll("th button[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      for (const th of table.querySelectorAll("th")) th.removeAttribute("aria-sort");
      button.parentElement.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      render();
    });
  }
  filter.addEventListener("input", render);

  const stopImport = mountImport(root);
  load();
  const timer = setInterval(load, REFRESH_MS);
  return () => {
    clearInterval(timer);
    unsubscribe();
    stopImport();
  };
}

// Import: POST /1.0/vms/import?name=NAME with the file as the body. XMLHttpRequest rather than
// fetch because only it reports upload progress.
function mountImport(root) {
  const form = root.querySelector("#import-form");
  const fileInput = root.querySelector("#import-file");
  const nameInput = root.querySelector("#import-name");
  const button = root.querySelector("#import-go");
  const bar = root.querySelector("#import-progress");
  const percent = root.querySelector("#import-percent");
  const general = root.querySelector("#import-error");
  let xhr = null;

  function upload(file, name) {
    return new Promise((resolve, reject) => {
      xhr = new XMLHttpRequest();
      const query = name ? `?name=${encodeURIComponent(name)}` : "";
      xhr.open("POST", `/1.0/vms/import${query}`);
      for (const [k, v] of Object.entries(csrfHeaders("POST"))) xhr.setRequestHeader(k, v);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (ev) => {
        if (!ev.lengthComputable) return;
        bar.value = Math.round((100 * ev.loaded) / ev.total);
        percent.textContent = `${bar.value}% of ${bytes(ev.total)}`;
      };
      xhr.onload = () => {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch {
          body = null;
        }
        if (xhr.status === 401) toLogin();
        if (xhr.status === 202 && body) resolve(body);
        else reject(new ApiError(body && body.error ? body : { error: `HTTP ${xhr.status}` },
                                 xhr.status));
      };
      xhr.onerror = () => reject(new ApiError({ error: "upload failed: the daemon closed the connection" }, 0));
      xhr.onabort = () => reject(new ApiError({ error: "upload cancelled" }, 0));
      xhr.send(file);
    });
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form, general);
    const file = fileInput.files[0];
    if (!file) {
      general.textContent = "choose a bundle file first";
      fileInput.focus();
      return;
    }
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    const t = toast(`import ${file.name}`);
    try {
      const answer = await upload(file, nameInput.value.trim());
      percent.textContent = "uploaded; importing";
      const view = await follow(answer, (v) => t.progress(v));
      t.done();
      const name = view.result && view.result.name;
      if (name) location.hash = `#/vm/${encodeURIComponent(name)}`;
    } catch (err) {
      const body = err instanceof ApiError ? err.body : { error: String(err) };
      t.fail(body);
      showError(form, general, body);
    } finally {
      button.disabled = false;
      bar.hidden = true;
      percent.textContent = "";
      xhr = null;
    }
  });
  return () => {
    if (xhr) xhr.abort();
  };
}
