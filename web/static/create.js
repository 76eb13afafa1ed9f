// #/create: the create form. The API is the validator (the form has novalidate): its error
// goes next to the field it names, also when the operation fails later (e.g. memory 0 is
// refused by the engine, after the 202).

import { ApiError, api, get } from "./api.js";
import { clearErrors, fromTemplate, h, showError } from "./dom.js";
import { run } from "./toasts.js";

const list = (text, sep) => text.split(sep).map((s) => s.trim()).filter(Boolean);

function requestBody(form) {
  const f = form.elements;
  const cpus = f.cpus.value.trim();
  const body = {
    name: f.name.value.trim(),
    // a plain number goes as a number; anything else as typed, for the API to judge
    cpus: /^\d+$/.test(cpus) ? Number(cpus) : cpus,
    networks: [...form.querySelectorAll('input[name="networks"]:checked')].map((c) => c.value),
    ports: list(f.ports.value, ","),
    ssh_keys: list(f.ssh_key.value, "\n"),
    start: f.start.checked,
    wait: false,
  };
  if (!cpus) delete body.cpus; // empty: the API's default
  if (f.image.value) body.image = f.image.value; // none yet (list still loading): the default
  for (const key of ["memory", "disk"]) if (f[key].value.trim()) body[key] = f[key].value.trim();
  if (f.user_data.value.trim()) body.user_data = f.user_data.value;
  return body;
}

export function mount(root) {
  root.append(fromTemplate("page-create"));
  const form = root.querySelector("#create-form");
  const general = root.querySelector("#create-error");
  const submit = root.querySelector("#create-submit");
  const imageSelect = form.elements.image;
  let gone = false;

  get("/1.0/images").then((images) => {
    imageSelect.replaceChildren(...images.map((img) => h("option", { value: img.name },
      img.os ? `${img.name} (${img.os})` : img.name)));
    if (!images.length) imageSelect.append(h("option", { value: "tiny" }, "tiny (not built yet)"));
    const preferred = images.find((img) => img.name === "tiny");
    if (preferred) imageSelect.value = "tiny";
  }).catch((err) => showError(form, general, { ...errBody(err), field: "image" }));

  get("/1.0/networks").then((networks) => {
    const box = root.querySelector("#create-networks");
    if (!networks.length) {
      box.append(h("span", { class: "muted" }, "no vmkit networks on this host"));
      return;
    }
    for (const net of networks) {
      const id = `create-net-${net.name}`;
      box.append(h("span", { class: "check" },
        h("input", { type: "checkbox", name: "networks", value: net.name, id }),
        h("label", { for: id }, `${net.name} (${net.mode}, ${net.subnet})`)));
    }
  }).catch((err) => showError(form, general, { ...errBody(err), field: "networks" }));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form, general);
    const body = requestBody(form);
    submit.disabled = true;
    try {
      await run(`create ${body.name}`, () => api("POST", "/1.0/vms", body));
      if (!gone) location.hash = `#/vm/${encodeURIComponent(body.name)}`;
    } catch (err) {
      if (!gone) showError(form, general, errBody(err));
    } finally {
      submit.disabled = false;
    }
  });

  return () => {
    gone = true;
  };
}

function errBody(err) {
  return err instanceof ApiError ? err.body : { error: String(err.message || err) };
}
