// The daemon's REST API as the page uses it: the session cookie rides on every request, the
// CSRF value from /ui/session on every state change, and a 401 anywhere sends us to the login.

const LOGIN = "/ui/login";
const FINAL = new Set(["success", "failure", "cancelled"]);

// Filled by loadSession(); the token itself is never seen by this page after login.
export const session = { user: "", csrf: "" };

export class ApiError extends Error {
  // body: the daemon's error body {error, error_code, error_class, hint, detail, field}
  constructor(body, status) {
    super(body.error || `HTTP ${status}`);
    this.body = body;
    this.status = status;
  }
}

export function toLogin() {
  location.replace(LOGIN);
}

async function parse(res) {
  const text = await res.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

export async function loadSession() {
  const res = await fetch("/ui/session", { credentials: "same-origin" });
  if (res.status === 401) {
    toLogin();
    throw new ApiError({ error: "not logged in" }, 401);
  }
  if (!res.ok) throw new ApiError((await parse(res)) || { error: res.statusText }, res.status);
  Object.assign(session, await res.json());
  return session;
}

export function csrfHeaders(method) {
  return method === "GET" || method === "HEAD" ? {} : { "X-Vmkit-CSRF": session.csrf };
}

// One call: the parsed JSON answer, or an ApiError carrying the daemon's error body.
export async function api(method, path, body) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json", ...csrfHeaders(method) },
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    toLogin();
    throw new ApiError({ error: "not logged in" }, 401);
  }
  const json = await parse(res);
  if (!res.ok) {
    throw new ApiError(json && json.error ? json : { error: `${res.status} ${res.statusText}` },
                       res.status);
  }
  return json;
}

export const get = (path) => api("GET", path).then((answer) => answer.metadata);

// The operation failed or was cancelled: its error body (same shape as an HTTP error's).
export class OperationError extends ApiError {
  constructor(view) {
    super(view.error || { error: `operation ${view.status}` }, view.error?.error_code || 400);
    this.view = view;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Follow a 202 answer to its end: onProgress(view) after each short wait (so a toast can show
// the stage and percent), the final view on success, OperationError otherwise. Network errors
// are retried for a while: the daemon may be restarting.
export async function follow(answer, onProgress = () => {}) {
  let view = answer.metadata;
  let misses = 0;
  while (!FINAL.has(view.status)) {
    onProgress(view);
    try {
      view = (await api("GET", `${answer.operation}/wait?timeout=1`)).metadata;
      misses = 0;
    } catch (err) {
      if (err instanceof ApiError || ++misses > 30) throw err;
      await sleep(1000);
    }
  }
  onProgress(view);
  if (view.status !== "success") throw new OperationError(view);
  return view;
}

// Same-origin websocket URL (wss when the page came over https).
export function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

// A websocket closed with 4401 (credentials refused): find out whether the session ended.
export async function checkSession() {
  try {
    const res = await fetch("/ui/session", { credentials: "same-origin" });
    if (res.status === 401) toLogin();
  } catch {
    // daemon unreachable: the caller's reconnect loop will try again
  }
}

export const vmPath = (name) => `/1.0/vms/${encodeURIComponent(name)}`;
