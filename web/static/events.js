// One websocket on /1.0/events for the whole page; pages subscribe to it. When it closes
// (daemon restart, too slow a reader) it reconnects with backoff, and subscribers get a
// {type: "reconnected"} message: events may have been missed, so they re-read the state.

import { checkSession, wsUrl } from "./api.js";

const listeners = new Set();
let socket = null;
let delay = 500;
let opened = false;
let statusCallback = () => {};

export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function emit(event) {
  for (const fn of [...listeners]) {
    try {
      fn(event);
    } catch (err) {
      console.error("event listener failed", err);
    }
  }
}

// onStatus("live" | "reconnecting")
export function connectEvents(onStatus) {
  if (onStatus) statusCallback = onStatus;
  socket = new WebSocket(wsUrl("/1.0/events?type=lifecycle,operation,operation-recovered"));
  socket.addEventListener("open", () => {
    delay = 500;
    statusCallback("live");
    if (opened) emit({ type: "reconnected" });
    opened = true;
  });
  socket.addEventListener("message", (msg) => {
    try {
      emit(JSON.parse(msg.data));
    } catch {
      // not JSON: nothing to tell anyone
    }
  });
  socket.addEventListener("close", (ev) => {
    statusCallback("reconnecting");
    if (ev.code === 4401) checkSession();
    setTimeout(() => connectEvents(), delay);
    delay = Math.min(delay * 2, 10000);
  });
}

// Run `fn` once, `ms` after the last of a burst of calls (a burst of events → one GET).
export function debounce(fn, ms = 150) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}
