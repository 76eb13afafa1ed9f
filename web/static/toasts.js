// The operations area (#toasts): one toast per long operation, showing its stage and percent,
// then its outcome. Successes go after a few seconds, failures after longer or when
// dismissed; only the newest few are kept, so the area never buries the page.

import { ApiError, follow } from "./api.js";
import { errorText, h } from "./dom.js";

const KEEP_SUCCESS_MS = 4000;
const KEEP_FAILURE_MS = 30000;
const MAX_TOASTS = 5;

function area() {
  return document.getElementById("toasts");
}

export function toast(title) {
  const stage = h("span", { class: "toast-stage" }, "starting");
  const bar = h("progress", { max: "100", hidden: true });
  const close = h("button", { type: "button", class: "toast-close", "aria-label": "Dismiss",
                              onclick: () => el.remove() }, "×");
  const el = h("div", { class: "toast running", role: "status" },
               h("strong", { class: "toast-title" }, title), close, stage, bar);
  area().append(el);
  const all = area().children;
  while (all.length > MAX_TOASTS) all[0].remove();
  return {
    progress(view) {
      const p = view.progress || {};
      stage.textContent = p.stage || view.status;
      if (typeof p.percent === "number") {
        bar.hidden = false;
        bar.value = p.percent;
        stage.textContent = `${p.stage || view.status} ${p.percent}%`;
      }
    },
    done(message = "done") {
      el.className = "toast success";
      stage.textContent = message;
      bar.hidden = true;
      setTimeout(() => el.remove(), KEEP_SUCCESS_MS);
    },
    fail(body) {
      el.className = "toast failure";
      el.setAttribute("role", "alert");
      stage.textContent = errorText(body);
      bar.hidden = true;
      setTimeout(() => el.remove(), KEEP_FAILURE_MS);
    },
  };
}

// Start a long operation (`start` returns the 202 answer) and follow it in a toast; resolves
// to the operation's final view, rejects with the ApiError/OperationError (already shown).
export async function run(title, start) {
  const t = toast(title);
  try {
    const view = await follow(await start(), (v) => t.progress(v));
    t.done();
    return view;
  } catch (err) {
    t.fail(err instanceof ApiError ? err.body : { error: String(err.message || err) });
    throw err;
  }
}
