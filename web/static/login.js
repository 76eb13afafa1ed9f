// The login page: trade the API token for a session cookie (HttpOnly, set by the daemon).
// The token is cleared from the page as soon as it is sent and is never stored.

const form = document.getElementById("login-form");
const input = document.getElementById("token");
const button = document.getElementById("login");
const error = document.getElementById("login-error");

async function login(ev) {
  ev.preventDefault();
  error.textContent = "";
  const token = input.value.trim();
  input.value = "";
  if (!token) {
    error.textContent = "enter a token";
    input.focus();
    return;
  }
  button.disabled = true;
  try {
    const res = await fetch("/ui/session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ token }),
    });
    if (res.ok) {
      location.replace("/ui/");
      return;
    }
    const body = await res.json().catch(() => null);
    error.textContent = body && body.error
      ? (body.hint ? `${body.error} — ${body.hint}` : body.error)
      : `login failed (HTTP ${res.status})`;
  } catch {
    error.textContent = "the daemon does not answer";
  } finally {
    button.disabled = false;
  }
  input.focus();
}

form.addEventListener("submit", login);

// Already logged in (e.g. the back button): go straight to the dashboard.
fetch("/ui/session", { credentials: "same-origin" })
  .then((res) => { if (res.ok) location.replace("/ui/"); })
  .catch(() => {});
