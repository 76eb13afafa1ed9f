// The VM's screen (a VM with a display) in noVNC over /1.0/vms/NAME/vnc: the daemon pipes the
// RFB protocol to the VM's VNC unix socket. Reconnects while the VM runs; a screenshot button
// saves a PNG (GET /1.0/vms/NAME/screenshot).

import RFB from "/ui/vendor/@novnc/novnc/core/rfb.js";
import { ApiError, checkSession, toLogin, vmPath, wsUrl } from "./api.js";

const RETRY_MS = 2000;

// box: where the screen goes; status: its badge (connecting / connected / reconnecting).
export function openScreen(box, status, detail, name) {
  let rfb = null;
  let held = true; // no screen until the VM runs
  let closed = false;
  let timer = null;

  function setStatus(state) {
    status.textContent = state;
    status.dataset.state = state;
  }

  function connect() {
    timer = null;
    if (held || closed) return;
    setStatus(status.dataset.state === "connected" ? "reconnecting" : "connecting");
    rfb = new RFB(box, wsUrl(`${vmPath(name)}/vnc`), { wsProtocols: ["binary"] });
    rfb.scaleViewport = true;
    rfb.background = "#1d2330";
    rfb.addEventListener("connect", () => {
      detail.textContent = "";
      setStatus("connected");
    });
    rfb.addEventListener("disconnect", (ev) => {
      rfb = null;
      if (closed) return;
      if (!ev.detail.clean) checkSession();
      setStatus("reconnecting");
      if (!held) timer = setTimeout(connect, RETRY_MS);
    });
  }

  return {
    hold(reason) {
      held = true;
      clearTimeout(timer);
      if (rfb) rfb.disconnect();
      detail.textContent = reason;
      setStatus("off");
    },
    release() {
      if (!held) return;
      held = false;
      connect();
    },
    close() {
      closed = true;
      clearTimeout(timer);
      if (rfb) rfb.disconnect();
    },
  };
}

// A PNG of the screen, offered as a download.
export async function saveScreenshot(name) {
  const res = await fetch(`${vmPath(name)}/screenshot`, { credentials: "same-origin" });
  if (res.status === 401) toLogin();
  if (!res.ok) {
    const body = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
    throw new ApiError(body, res.status);
  }
  const blob = await res.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${name}-screen.png`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
