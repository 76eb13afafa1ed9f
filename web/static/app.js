// The dashboard's entry point: the session, the nav, the event stream and hash routing.
// Each page module exports mount(root, params) and returns a cleanup function (timers,
// sockets, subscriptions), called when the user leaves the page.

import { api, loadSession, session, toLogin } from "./api.js";
import { connectEvents } from "./events.js";
import { fromTemplate } from "./dom.js";
import * as overview from "./overview.js";
import * as vms from "./vms.js";
import * as create from "./create.js";
import * as vmPage from "./vm.js";

const ROUTES = [
  [/^#?\/?$/, overview, "#/"],
  [/^#\/vms$/, vms, "#/vms"],
  [/^#\/create$/, create, "#/create"],
  [/^#\/vm\/([^/]+)$/, vmPage, "#/vms"],
];

let cleanup = null;

function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  const view = document.getElementById("view");
  view.replaceChildren();
  const hash = location.hash || "#/";
  for (const [pattern, page, navHref] of ROUTES) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const a of document.querySelectorAll("header nav a")) {
      if (a.getAttribute("href") === navHref) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    const params = match.slice(1).map(decodeURIComponent);
    cleanup = page.mount(view, ...params) || null;
    // Keyboard and screen-reader users land on the new page, not on the old link.
    if (document.activeElement && document.activeElement.closest("header nav")) view.focus();
    return;
  }
  view.append(fromTemplate("page-missing"));
}

async function logout() {
  try {
    await api("DELETE", "/ui/session");
  } finally {
    toLogin();
  }
}

async function start() {
  await loadSession(); // redirects to the login page when there is no session
  // the daemon names a session's requestor "web:NAME@ADDRESS": the name is what people know
  const user = /^web:(.*)@[^@]*$/.exec(session.user || "");
  document.getElementById("user").textContent = user ? user[1] : session.user;
  document.getElementById("logout").addEventListener("click", logout);
  const badge = document.getElementById("conn-status");
  connectEvents((state) => {
    badge.textContent = state;
    badge.dataset.state = state;
  });
  window.addEventListener("hashchange", route);
  route();
}

start().catch((err) => console.error(err));
