// Compare jobs: their curves overlaid, and a table of their settings where the rows that differ stand out.

import { getJson } from "./api.js";
import { colorOf, draw, trace } from "./charts.js";
import { errorBox, h, hyperparametersOf, section, show, statusBadge } from "./ui.js";

export async function showCompare(view, signal, params) {
  const ids = (params.get("jobs") ?? "").split(",").filter(Boolean);
  const errors = errorBox();
  const picker = h("div", { id: "compare-picker" });
  view.append(h("div", { class: "toolbar" }, h("h1", {}, "Compare jobs")), errors.element, section("Jobs", picker));
  try {
    const recent = await getJson("/v1/fine_tuning/jobs?limit=100", { signal });
    picker.append(pickerOf(recent.data, ids));
    if (ids.length < 2) {
      picker.append(h("p", { class: "muted" }, "Pick two or more jobs."));
      return;
    }
    const jobs = await Promise.all(ids.map((id) => getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal })));
    const metrics = await Promise.all(ids.map((id) => getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/metrics`, { signal })));
    const lossChart = h("div", { id: "compare-loss", class: "chart" });
    const rateChart = h("div", { id: "compare-lr", class: "chart" });
    view.append(h("div", { class: "charts" }, lossChart, rateChart), section("Differences", differences(jobs, metrics)));
    const losses = [];
    const rates = [];
    jobs.forEach((job, index) => {
      const rows = metrics[index].data;
      const color = colorOf(index);
      losses.push(trace(rows, "train_loss", `${job.id} train`, { color }));
      if (rows.some((row) => row.valid_loss != null)) losses.push(trace(rows, "valid_loss", `${job.id} validation`, { color, dash: "dash" }));
      rates.push(trace(rows, "learning_rate", job.id, { color }));
    });
    draw(lossChart, losses, { title: "Loss (validation dashed)", yTitle: "loss" });
    draw(rateChart, rates, { title: "Learning rate", yTitle: "learning rate" });
  } catch (error) {
    errors.show(error);
  }
}

function pickerOf(jobs, ids) {
  const chosen = new Set(ids);
  const go = h("button", { onclick: () => (location.hash = `#/compare?jobs=${[...chosen].join(",")}`) }, "Compare");
  const items = jobs.map((job) =>
    h(
      "label",
      { class: "pick" },
      h("input", {
        type: "checkbox",
        checked: chosen.has(job.id),
        onchange: (event) => (event.target.checked ? chosen.add(job.id) : chosen.delete(job.id)),
      }),
      ` ${job.id} `,
      statusBadge(job.status),
      ` ${job.model} · ${hyperparametersOf(job).peft ?? "?"}`,
    ),
  );
  return h("div", {}, h("div", { class: "picks" }, items), go);
}

/** The settings of each job and its last figures, one row each; rows whose values differ are marked. */
function differences(jobs, metrics) {
  const settings = jobs.map((job, index) => {
    const last = (column) => [...metrics[index].data].reverse().find((row) => row[column] != null)?.[column];
    return {
      "base model": job.model,
      task: job.method.type,
      "training file": job.training_file,
      "validation file": job.validation_file,
      seed: job.seed,
      ...hyperparametersOf(job),
      status: job.status,
      steps: metrics[index].data.at(-1)?.step,
      "final train loss": last("train_loss"),
      "final validation loss": last("valid_loss"),
    };
  });
  const names = [...new Set(settings.flatMap(Object.keys))];
  const onlyDiffering = h("input", { type: "checkbox", id: "only-differences", checked: true, onchange: () => fill() });
  const body = h("tbody");
  const fill = () => {
    body.replaceChildren();
    for (const name of names) {
      const values = settings.map((s) => JSON.stringify(s[name] ?? null));
      const differs = new Set(values).size > 1;
      if (onlyDiffering.checked && !differs) continue;
      body.append(h("tr", { class: differs ? "differs" : "" }, h("th", {}, name), settings.map((s) => h("td", {}, show(s[name])))));
    }
  };
  fill();
  return h(
    "div",
    {},
    h("label", {}, onlyDiffering, " only the rows that differ"),
    h("table", { id: "differences" }, h("thead", {}, h("tr", {}, h("th", {}, ""), jobs.map((job) => h("th", {}, job.id)))), body),
  );
}
