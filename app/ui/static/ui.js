// Small DOM helpers shared by the views. Text always goes in as text (never as HTML): what the API
// returns, file names and model output included, can never become markup.

/** An element: `h("a", {href: "#/jobs", class: "x", onclick: f}, "text", child, ...)`. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
  return element;
}

/** A table with a header row and a body: `table(["a", "b"], [[1, 2], [3, 4]])`. */
export function table(headings, rows, props = {}) {
  return h(
    "table",
    props,
    h("thead", {}, h("tr", {}, headings.map((text) => h("th", {}, text)))),
    h("tbody", {}, rows.map((cells) => (cells instanceof HTMLElement ? cells : h("tr", {}, cells.map(cell))))),
  );
}

const cell = (value) => (value instanceof HTMLElement && value.tagName === "TD" ? value : h("td", {}, show(value)));

/** A value as the console shows it: numbers shortened, objects as JSON, nothing as a dash. */
export function show(value) {
  if (value instanceof Node) return value;
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** "42s", "3m 5s", "2h 10m", "4d 1h": how long `seconds` is, to the two largest units. */
export function span(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
  const parts = [];
  let left = Math.round(seconds);
  for (const [unit, size] of units) {
    if (left >= size || (unit === "s" && parts.length === 0)) {
      parts.push(`${Math.floor(left / size)}${unit}`);
      left %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

export const now = () => Date.now() / 1000;
export const ago = (unixSeconds) => `${span(now() - unixSeconds)} ago`;
const FINISHED = ["succeeded", "failed", "cancelled"];
export const isActive = (job) => !FINISHED.includes(job.status);

/** The job's task and its hyperparameters, whatever the task (`method.<type>.hyperparameters`). */
export const hyperparametersOf = (job) => job.method[job.method.type]?.hyperparameters ?? {};

export const statusBadge = (status) => h("span", { class: `status status-${status}` }, status.replace("_", " "));

/** A progress bar with "step/total" beside it; empty before the run's first step. */
export function progressBar(progress, status) {
  const fraction = progress ? progress.step / Math.max(progress.total_steps, 1) : status === "succeeded" ? 1 : 0;
  const label = progress ? `${progress.step}/${progress.total_steps}` : "";
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 1, value: fraction, "aria-label": "progress" }),
    h("span", { class: "progress-label" }, label),
  );
}

/** A place for one error message: `box.show(error)` puts the API's message there, `box.clear()` empties it. */
export function errorBox() {
  const element = h("p", { class: "error", role: "alert", hidden: true });
  return {
    element,
    show(error) {
      if (error?.name === "AbortError") return;
      element.textContent = error?.message ?? String(error);
      element.hidden = false;
    },
    clear() {
      element.textContent = "";
      element.hidden = true;
    },
  };
}

/** A titled section of a page. */
export const section = (title, ...children) => h("section", { class: "panel" }, h("h2", {}, title), ...children);
