// The VM's serial console in xterm.js over /1.0/vms/NAME/console: binary frames carry the
// console's bytes both ways; a text frame we send asks for a resize; a text frame we receive
// is an error. The socket reconnects by itself (backoff), e.g. across a daemon restart.

import { Terminal } from "/ui/vendor/@xterm/xterm/lib/xterm.mjs";
import { FitAddon } from "/ui/vendor/@xterm/addon-fit/lib/addon-fit.mjs";
import { checkSession, vmPath, wsUrl } from "./api.js";

const OPEN = 1; // WebSocket.OPEN
const MAX_DELAY = 10000;
const RESIZE_SETTLE_MS = 300; // each resize runs stty in the guest: only the final size goes

// box: the element the terminal fills; status: its badge (text connecting / connected /
// reconnecting); detail: where the last error goes.
export function openConsole(box, status, detail, name) {
  const term = new Terminal({
    cursorBlink: true,
    fontSize: 14,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', 'Liberation Mono', monospace",
    scrollback: 5000,
    theme: { background: "#1d2330", foreground: "#e6e9ef" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  const encoder = new TextEncoder();
  let socket = null;
  let delay = 500;
  let timer = null;
  let closed = false;
  let sentSize = "";
  let resizeTimer = null;
  let first = true;
  let held = false; // the VM cannot have a console now (stopped...): no retries until released

  function setStatus(state) {
    status.textContent = state;
    status.dataset.state = state;
  }

  // Tell the server the terminal's size, unless it already knows it.
  function sendSize() {
    const size = `${term.cols}x${term.rows}`;
    if (!socket || socket.readyState !== OPEN || size === sentSize) return;
    socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    sentSize = size;
  }

  function refit() {
    if (!box.offsetParent) return; // hidden: nothing to measure
    try {
      fit.fit();
    } catch {
      return; // not rendered yet
    }
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(sendSize, RESIZE_SETTLE_MS);
  }

  function send(bytes) {
    if (socket && socket.readyState === OPEN) socket.send(bytes);
  }

  function connect() {
    timer = null;
    socket = new WebSocket(wsUrl(`${vmPath(name)}/console`));
    socket.binaryType = "arraybuffer";
    setStatus(status.dataset.state === "reconnecting" ? "reconnecting" : "connecting");
    socket.addEventListener("open", () => {
      delay = 500;
      detail.textContent = "";
      setStatus("connected");
      sentSize = ""; // a new connection: the server knows no size yet
      refit();
      sendSize();
      // typing works at once on a fresh page, unless the user is already somewhere else
      const idle = document.activeElement === document.body || document.activeElement?.id === "view";
      if (first && idle) term.focus();
      first = false;
    });
    socket.addEventListener("message", (msg) => {
      if (typeof msg.data !== "string") {
        term.write(new Uint8Array(msg.data));
        return;
      }
      try {
        const m = JSON.parse(msg.data);
        if (m.type === "error") detail.textContent = m.hint ? `${m.error} — ${m.hint}` : m.error;
      } catch {
        // not JSON: ignore
      }
    });
    socket.addEventListener("close", (ev) => {
      if (closed) return;
      if (ev.code === 4401) checkSession();
      if (ev.code === 4403) detail.textContent = "the daemon refused this console (code 4403)";
      setStatus("reconnecting");
      if (held) return;
      timer = setTimeout(connect, delay);
      delay = Math.min(delay * 2, MAX_DELAY);
    });
  }

  // The terminal takes Tab (the guest's shell completes with it); Esc then Tab leaves it, so
  // the keyboard is never trapped.
  let escaped = false;
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== "keydown") return true;
    if (e.key === "Tab" && escaped) {
      escaped = false;
      return false; // not for the terminal: the browser moves the focus
    }
    escaped = e.key === "Escape";
    return true;
  });

  // Typed input goes as bytes (binary frames), never as text frames (those are control).
  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));

  const observer = new ResizeObserver(() => refit());
  observer.observe(box);
  window.addEventListener("resize", refit);
  connect();

  return {
    term,
    refit,
    // The VM just started (or the events came back): try now, not at the end of the backoff.
    reconnectNow() {
      const down = !socket || socket.readyState >= 2; // CLOSING or CLOSED
      if (held || closed || !down) return;
      clearTimeout(timer);
      delay = 500;
      connect();
    },
    // The VM is in a state without a console: stop retrying until release().
    hold(reason) {
      held = true;
      clearTimeout(timer);
      detail.textContent = reason;
    },
    release() {
      if (!held) return;
      held = false;
      this.reconnectNow();
    },
    close() {
      closed = true;
      clearTimeout(timer);
      clearTimeout(resizeTimer);
      if (socket) socket.close();
      observer.disconnect();
      window.removeEventListener("resize", refit);
      term.dispose();
    },
  };
}
