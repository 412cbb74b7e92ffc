// The jobs page: every job of the key's project, newest first, refreshed in place every few seconds.

import { getJson, poll } from "./api.js";
import { ago, errorBox, h, hyperparametersOf, isActive, now, progressBar, span, statusBadge } from "./ui.js";

const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
const REFRESH_SECONDS = 3; // 20 requests a minute, far below the API's limit per key
const PAGE = 100;

export function showJobs(view, signal, params) {
  const selected = new Set();
  const rows = new Map(); // job id -> its table row, updated in place so selections and focus survive
  const errors = errorBox();
  const filter = h(
    "select",
    { id: "status-filter", "aria-label": "status", onchange: () => render() },
    h("option", { value: "" }, "every status"),
    STATUSES.map((status) => h("option", { value: status }, status.replace("_", " "))),
  );
  filter.value = params.get("status") ?? "";
  const compare = h("button", { id: "compare-selected", disabled: true, onclick: openCompare }, "Compare selected");
  const note = h("span", { class: "muted" });
  const body = h("tbody");
  let jobs = [];

  view.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Fine-tuning jobs"), h("label", {}, "Show ", filter), compare, note),
    errors.element,
    h(
      "table",
      { id: "jobs", class: "jobs" },
      h(
        "thead",
        {},
        h("tr", {}, ["", "job", "status", "progress", "base model", "method", "age", "duration", "model"].map((t) => h("th", {}, t))),
      ),
      body,
    ),
  );

  function openCompare() {
    location.hash = `#/compare?jobs=${[...selected].join(",")}`;
  }

  function render() {
    const wanted = filter.value;
    history.replaceState(null, "", wanted ? `#/jobs?status=${wanted}` : "#/jobs");
    const shown = jobs.filter((job) => !wanted || job.status === wanted);
    for (const [id, row] of rows) if (!shown.some((job) => job.id === id)) (row.remove(), rows.delete(id));
    for (const job of shown) {
      const row = rows.get(job.id) ?? newRow(job);
      rows.set(job.id, row);
      fill(row, job);
      body.append(row); // appending an attached row moves it: the table follows the list's order
    }
    note.textContent = shown.length ? "" : "No jobs here yet.";
    compare.disabled = selected.size < 2;
  }

  function newRow(job) {
    const box = h("input", {
      type: "checkbox",
      "aria-label": `select ${job.id}`,
      onchange: (event) => {
        event.target.checked ? selected.add(job.id) : selected.delete(job.id);
        compare.disabled = selected.size < 2;
      },
    });
    return h("tr", { "data-job": job.id }, h("td", {}, box), ...Array.from({ length: 8 }, () => h("td")));
  }

  function fill(row, job) {
    const hp = hyperparametersOf(job);
    const end = job.finished_at ?? now();
    const cells = [
      h("a", { href: `#/jobs/${job.id}` }, job.id),
      statusBadge(job.status),
      progressBar(job.progress, job.status),
      job.model,
      `${job.method.type} · ${hp.peft ?? "?"}`,
      ago(job.created_at),
      span(end - job.created_at) + (isActive(job) ? " so far" : ""),
      job.fine_tuned_model ?? "—",
    ];
    cells.forEach((content, index) => row.cells[index + 1].replaceChildren(content));
  }

  poll(
    signal,
    REFRESH_SECONDS,
    async () => {
      const page = await getJson(`/v1/fine_tuning/jobs?limit=${PAGE}`, { signal });
      jobs = page.data;
      errors.clear();
      render();
      if (page.has_more) note.textContent = `The newest ${PAGE} jobs.`;
    },
    errors.show,
  );
}
