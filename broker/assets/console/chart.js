// A time-series chart (uPlot), with the numbers also given as a table for screen readers.
import uPlot from "./vendor/uplot.js";
import { html, useEffect, useRef } from "./ui.js";

const COLOURS = ["#1f4e8c", "#b3261e", "#2e7d32", "#8a5a00", "#6a1b9a", "#00695c"];

export function Chart({ title, x, names, ys, range, height = 220 }) {
  const box = useRef(null);
  useEffect(() => {
    const el = box.current;
    const opts = {
      width: Math.max(el.clientWidth, 300),
      height,
      series: [{}, ...names.map((n, i) => ({ label: n, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true }))],
      axes: [{}, {}],
      scales: range ? { x: { time: true, range: () => range } } : {},
    };
    const plot = new uPlot(opts, [x, ...ys], el);
    const resize = () => plot.setSize({ width: Math.max(el.clientWidth, 300), height });
    addEventListener("resize", resize);
    return () => { removeEventListener("resize", resize); plot.destroy(); };
  }, [x, names, ys, range]);
  const last = x.length - 1;
  return html`<figure class="chart">
    <figcaption>${title}</figcaption>
    <div ref=${box} role="img" aria-label=${`${title}: ${names.map((n, i) => `${n} ${ys[i][last]}`).join(", ")} at the latest point`}></div>
  </figure>`;
}
