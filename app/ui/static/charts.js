// Curves of a job's step metrics with plotly.js (loaded by index.html from the installed `plotly` package).

/* global Plotly */

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
export const colorOf = (index) => COLORS[index % COLORS.length];

/** The points of one metric: its steps and values, leaving out the steps that have none. */
function series(rows, column) {
  const x = [];
  const y = [];
  for (const row of rows) {
    if (row[column] !== null && row[column] !== undefined) {
      x.push(row.step);
      y.push(row[column]);
    }
  }
  return { x, y };
}

/** One line of a chart: `metric` of `rows`, named `name`. */
export function trace(rows, metric, name, { color, dash = "solid" } = {}) {
  return { ...series(rows, metric), name, type: "scatter", mode: "lines+markers", marker: { size: 4 }, line: { color, dash } };
}

/** Draw (or redraw in place: the chart keeps its zoom) `traces` in `element`. */
export function draw(element, traces, { title, yTitle, logY = false }) {
  const layout = {
    title: { text: title, font: { size: 14 }, x: 0.02, xanchor: "left" },
    margin: { l: 60, r: 16, t: 36, b: 80 },
    height: 320,
    xaxis: { title: { text: "step" }, rangemode: "tozero" },
    yaxis: { title: { text: yTitle }, type: logY ? "log" : "linear", exponentformat: "e" },
    legend: { orientation: "h", y: -0.3 },
    uirevision: "keep", // new points must not undo the user's zoom
  };
  Plotly.react(element, traces, layout, { displaylogo: false, responsive: true });
}

/** Merge metric rows into `byStep` (step -> row): a later recording of a step wins, column by column. */
export function mergeRows(byStep, rows) {
  for (const row of rows) {
    if (row.step === undefined || row.step === null) continue;
    const kept = byStep.get(row.step) ?? {};
    for (const [name, value] of Object.entries(row)) if (value !== null && value !== undefined) kept[name] = value;
    byStep.set(row.step, kept);
  }
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}
