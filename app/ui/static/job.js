// One job's page: its status and progress, live loss and learning-rate curves, its log followed as the run
// writes it, its hyperparameters, checkpoints and the buttons that act on it.
//
// The curves start from GET .../metrics and then follow the job's event stream (GET .../events?stream=true,
// Server-Sent Events read with fetch), which carries each step's metrics the moment they are written. The
// stream starts after the newest event seen before the metrics were read: an event in between arrives twice
// and is merged by step, and none is missed.

import { download, getJson, modelPath, poll, postJson, readEvents, request, textOf } from "./api.js";
import { colorOf, draw, mergeRows, trace } from "./charts.js";
import { ago, errorBox, h, hyperparametersOf, isActive, progressBar, section, span, statusBadge, table } from "./ui.js";

const REFRESH_SECONDS = 3;
const RECONNECT_SECONDS = 2;
const MAX_LOG_CHARS = 400_000; // the log panel keeps the end of a long run's output
const SHOWN_EVENTS = 50;
const MESSAGE_PAGES = 5; // of 100 events each

export function showJob(view, signal, jobId) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const errors = errorBox();
  const status = h("span", { id: "job-status" });
  const progress = h("span", { id: "job-progress" });
  const timing = h("span", { class: "muted" });
  const failure = h("p", { class: "error", hidden: true });
  const actions = h("div", { class: "actions" });
  const lossChart = h("div", { id: "loss-chart", class: "chart" });
  const rateChart = h("div", { id: "lr-chart", class: "chart" });
  const hyperparameters = h("div", { id: "hyperparameters" });
  const spec = h("pre", { id: "spec", class: "json" });
  const checkpoints = h("div", { id: "checkpoints" });
  const events = h("ul", { id: "events", class: "events" });
  const log = h("pre", { id: "log", class: "log" });
  const byStep = new Map();
  let job = null;
  let rows = [];
  let followedAttempt = 0;
  let redrawPending = false;

  view.append(
    h("div", { class: "toolbar" }, h("h1", {}, jobId), status, progress, timing),
    errors.element,
    failure,
    actions,
    h("div", { class: "charts" }, lossChart, rateChart),
    section("Checkpoints", checkpoints),
    h("div", { class: "columns" }, section("Hyperparameters", hyperparameters), section("Events", events)),
    section("Log", log),
    section("Spec", spec),
  );

  const act = (verb) => async () => {
    errors.clear();
    try {
      job = await postJson(`${base}/${verb}`, undefined, { signal });
      renderJob();
    } catch (error) {
      errors.show(error);
    }
  };

  const fetchFile = (path, name) => async (event) => {
    const button = event.target;
    button.disabled = true;
    errors.clear();
    try {
      await download(path, name);
    } catch (error) {
      errors.show(error);
    } finally {
      button.disabled = false;
    }
  };

  function renderJob() {
    status.replaceChildren(statusBadge(job.status));
    progress.replaceChildren(progressBar(job.progress, job.status));
    const end = job.finished_at ? `, ran ${span(job.finished_at - job.created_at)}` : "";
    const eta = job.estimated_finish ? `, done in about ${span(job.estimated_finish - Date.now() / 1000)}` : "";
    timing.textContent = `created ${ago(job.created_at)}${end}${eta} · attempt ${job.attempt}`;
    failure.hidden = !job.error;
    failure.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    renderActions();
    const hp = hyperparametersOf(job);
    hyperparameters.replaceChildren(table(["name", "value"], Object.entries(hp)));
    const { model, method, seed, suffix, training_file, validation_file, metadata, integrations, resources, priority } = job;
    spec.textContent = JSON.stringify(
      { model, training_file, validation_file, suffix, seed, method, metadata, integrations, resources, priority },
      null,
      2,
    );
    if (isActive(job) && Math.max(job.attempt, 1) > followedAttempt) followLog(Math.max(job.attempt, 1));
  }

  function renderActions() {
    const model = job.fine_tuned_model;
    const active = isActive(job);
    const buttons = [
      h("button", { id: "cancel", onclick: act("cancel"), disabled: !active }, "Cancel"),
      h("button", { id: "pause", onclick: act("pause"), disabled: !["validating_files", "queued", "running"].includes(job.status) }, "Pause"),
      h("button", { id: "resume", onclick: act("resume"), disabled: job.status !== "paused" }, "Resume"),
    ];
    if (model) {
      const file = model.replaceAll(/[:/]/g, "_");
      buttons.push(
        h("button", { id: "download-adapter", onclick: fetchFile(`/v1/models/${modelPath(model)}/adapter`, `${file}.tar.gz`) }, "Download adapter"),
        h("button", { id: "download-merged", onclick: fetchFile(`/v1/models/${modelPath(model)}/merged`, `${file}-merged.tar.gz`) }, "Download merged model"),
        h("a", { class: "button", id: "open-playground", href: `#/playground?model=${encodeURIComponent(model)}` }, "Open in playground"),
      );
    }
    actions.replaceChildren(...buttons);
  }

  function redraw() {
    if (redrawPending) return;
    redrawPending = true;
    setTimeout(() => {
      redrawPending = false;
      if (signal.aborted) return;
      const losses = [trace(rows, "train_loss", "train loss", { color: colorOf(0) })];
      if (rows.some((row) => row.valid_loss != null)) losses.push(trace(rows, "valid_loss", "validation loss", { color: colorOf(1) }));
      draw(lossChart, losses, { title: "Loss", yTitle: "loss" });
      draw(rateChart, [trace(rows, "learning_rate", "learning rate", { color: colorOf(2) })], { title: "Learning rate", yTitle: "learning rate" });
    }, 150);
  }

  function addEvent(event, { newest = true } = {}) {
    const time = new Date(event.created_at * 1000).toLocaleTimeString();
    const item = h("li", { class: `level-${event.level}` }, h("time", {}, time), " ", event.message);
    newest ? events.prepend(item) : events.append(item);
    while (events.children.length > SHOWN_EVENTS) events.lastChild.remove();
  }

  function onStreamed(message) {
    const event = JSON.parse(message.data);
    if (event.type === "metrics") {
      rows = mergeRows(byStep, [event.data]);
      if (event.data.total_steps && event.data.step !== undefined && job) {
        job.progress = { step: event.data.step, total_steps: event.data.total_steps };
        progress.replaceChildren(progressBar(job.progress, job.status));
      }
      redraw();
      return;
    }
    addEvent(event);
    refresh().catch(errors.show); // a status may have changed: show it now, not at the next poll
  }

  async function followEvents(after) {
    let last = after;
    while (!signal.aborted) {
      try {
        const response = await request(`${base}/events?stream=true`, { signal, headers: last ? { "Last-Event-ID": last } : {} });
        await readEvents(response, (message) => {
          last = message.id ?? last;
          onStreamed(message);
        });
      } catch (error) {
        if (error.name === "AbortError") return;
        errors.show(error);
      }
      await refresh().catch(errors.show);
      if (!job || !isActive(job)) return; // the stream ends after the job's final status event
      await sleep(RECONNECT_SECONDS);
    }
  }

  async function followLog(attempt) {
    followedAttempt = attempt;
    if (attempt > 1) appendLog(`\n--- attempt ${attempt} ---\n`);
    try {
      const response = await request(`${base}/logs?follow=true&attempt=${attempt}`, { signal });
      for await (const text of textOf(response)) appendLog(text);
    } catch (error) {
      if (error.name !== "AbortError") errors.show(error);
    }
  }

  function appendLog(text) {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = (log.textContent + text).slice(-MAX_LOG_CHARS);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  async function refresh() {
    job = await getJson(base, { signal });
    renderJob();
  }

  async function refreshCheckpoints() {
    const page = await getJson(`${base}/checkpoints?limit=100`, { signal });
    const metricNames = [...new Set(page.data.flatMap((c) => Object.keys(c.metrics)))].filter((name) => name !== "step");
    const rowsOf = page.data.map((c) => {
      const model = c.fine_tuned_model_checkpoint;
      return [
        c.step_number,
        ...metricNames.map((name) => c.metrics[name]),
        h("td", { class: "id" }, model),
        h(
          "td",
          { class: "actions" },
          h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(model)}` }, "Chat"),
          h("button", { onclick: fetchFile(`/v1/models/${modelPath(model)}/adapter`, `${c.id}.tar.gz`) }, "Adapter"),
        ),
      ];
    });
    checkpoints.replaceChildren(
      page.data.length ? table(["step", ...metricNames, "model", ""], rowsOf) : h("p", { class: "muted" }, "No checkpoints yet."),
    );
  }

  /**
   * Show the job's latest messages: its events are mostly metrics, one a step, so a few pages back are read
   * (the log has the rest). Returns the id of its newest event, after which the stream starts.
   */
  async function olderMessages() {
    let newest = null;
    let after = null;
    for (let page = 0; page < MESSAGE_PAGES && events.children.length < SHOWN_EVENTS; page++) {
      const older = await getJson(`${base}/events?limit=100${after ? `&after=${after}` : ""}`, { signal });
      newest ??= older.data[0]?.id ?? null;
      older.data.filter((event) => event.type !== "metrics").forEach((event) => addEvent(event, { newest: false }));
      if (!older.has_more) break;
      after = older.data.at(-1).id;
    }
    return newest;
  }

  async function start() {
    await refresh();
    const newest = await olderMessages();
    const metrics = await getJson(`${base}/metrics`, { signal });
    rows = mergeRows(byStep, metrics.data);
    redraw();
    await refreshCheckpoints();
    if (!isActive(job)) {
      followLog(Math.max(job.attempt, 1));
      return;
    }
    followEvents(newest);
    let wasActive = true;
    poll(
      signal,
      REFRESH_SECONDS,
      async () => {
        if (!wasActive) return;
        await refresh();
        await refreshCheckpoints();
        wasActive = isActive(job);
      },
      errors.show,
    );
  }

  start().catch(errors.show);
}

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));
