// Small DOM and formatting helpers. Text from the API only ever goes in through text nodes
// (textContent), never through innerHTML.

// h("a", {href: "#/", class: "x", dataset: {vm: name}}, "text", child, ...)
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, ...children);
  return el;
}

export function append(el, ...children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// A copy of <template id="...">'s content (static markup from index.html, no data in it).
export function fromTemplate(id) {
  return document.getElementById(id).content.cloneNode(true);
}

// -- formatting ------------------------------------------------------------------------------
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${UNITS[i]}`;
}

export const rate = (n) => `${bytes(n)}/s`;

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  let s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  s %= 86400;
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = s % 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${String(mm).padStart(2, "0")}m`;
  if (mm) return `${mm}m ${String(ss).padStart(2, "0")}s`;
  return `${ss}s`;
}

export function when(epoch) {
  return new Date(epoch * 1000).toLocaleString();
}

// A VM's addresses: what its guest agent reports, else its NICs' fixed leases, else ssh.
export function addresses(vm) {
  const found = [];
  const byNic = vm.guest && typeof vm.guest.addresses === "object" ? vm.guest.addresses : null;
  if (byNic) {
    for (const list of Object.values(byNic)) {
      for (const a of list || []) if (!a.startsWith("fe80:")) found.push(a);
    }
  }
  if (!found.length) for (const nic of vm.nics || []) if (nic.address) found.push(nic.address);
  if (!found.length && vm.ssh) found.push(`ssh ${vm.ssh}`);
  return found.join(", ");
}

// -- errors next to form fields ----------------------------------------------------------------
// The API's "field" names what was wrong; a few request fields have another name in the form.
const FORM_FIELD = { ssh_keys: "ssh_key" };

// A daemon that does not say "field" (or an operation error without it): guess from the
// message ("invalid request: memory: ...", "invalid memory '0': ...", "invalid VM name ...").
function guessField(body, known) {
  const m = /^invalid (?:request: )?(?:VM )?([a-z_]+)/i.exec(body.error || "");
  return m && known.includes(m[1]) ? m[1] : null;
}

export function clearErrors(form, general) {
  for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  if (general) general.textContent = "";
}

export function errorText(body) {
  return body.hint ? `${body.error} — ${body.hint}` : body.error;
}

// Show an error body at its field in `form` when it names one, else in `general`.
export function showError(form, general, body) {
  const known = [...form.querySelectorAll(".field-error")].map((el) => el.dataset.for);
  let field = body.field ? FORM_FIELD[body.field] || body.field : guessField(body, known);
  const slot = field && form.querySelector(`.field-error[data-for="${CSS.escape(field)}"]`);
  if (slot) {
    slot.textContent = errorText(body);
    const input = form.elements[field];
    if (input && input.setAttribute) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } else if (general) {
    general.textContent = errorText(body);
  }
}

// -- the confirmation dialog for destructive actions ------------------------------------------
export function confirmAction(text, yesLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-yes").textContent = yesLabel;
  dialog.returnValue = "";
  dialog.showModal();
  document.getElementById("confirm-no").focus(); // the safe choice has the focus
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}
