// Hand-written SVG line charts for the history endpoints: the last 10 minutes on the x axis
// (ending at the newest sample, so the daemon's clock is the reference), 0..peak on the y axis,
// one polyline per series. The svg carries data-points = the number of samples drawn and
// data-max = the largest value drawn.

const SVG = "http://www.w3.org/2000/svg";
const W = 320;
const H = 120;
const TOP = 18; // room for the peak label
const BOTTOM = 16; // room for the time labels
const WINDOW = 600; // seconds shown

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// series: [{key: "cpu_percent", cls: "a"}] (cls: the colour); format: value → text with its unit;
// floor: the smallest peak of the scale, so an idle series stays near the bottom.
export function drawChart(svg, all, series, { format, floor = 1 }) {
  const end = all.length ? all[all.length - 1].time : 0;
  const samples = all.filter((s) => s.time >= end - WINDOW);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("data-points", String(samples.length));
  svg.setAttribute("data-max", "0");
  const nodes = [el("line", { x1: 0, y1: H - BOTTOM, x2: W, y2: H - BOTTOM, class: "axis" })];
  if (!samples.length) {
    nodes.push(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
                  "no samples yet"));
    svg.replaceChildren(...nodes);
    return;
  }
  let peak = 0;
  for (const s of samples) for (const { key } of series) peak = Math.max(peak, s[key] || 0);
  svg.setAttribute("data-max", String(peak)); // the largest value drawn, for tests
  const top = Math.max(peak, floor) * 1.1;
  const x = (t) => (W * (t - (end - WINDOW))) / WINDOW;
  const y = (v) => H - BOTTOM - ((H - BOTTOM - TOP) * (v || 0)) / top;
  nodes.push(el("line", { x1: 0, y1: y(peak), x2: W, y2: y(peak), class: "grid" }));
  for (const { key, cls } of series) {
    const points = samples.map((s) => `${x(s.time).toFixed(1)},${y(s[key]).toFixed(1)}`);
    nodes.push(el("polyline", { points: points.join(" "), class: `line ${cls}` }));
    const last = samples[samples.length - 1];
    nodes.push(el("circle", { cx: x(last.time), cy: y(last[key]), r: 2, class: `dot ${cls}` }));
  }
  nodes.push(el("text", { x: 3, y: 13, class: "label" }, `max ${format(peak)}`));
  nodes.push(el("text", { x: 3, y: H - 3, class: "label" }, "−10 min"));
  nodes.push(el("text", { x: W - 3, y: H - 3, "text-anchor": "end", class: "label" }, "now"));
  svg.replaceChildren(...nodes);
}
