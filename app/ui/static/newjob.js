// The new-job form: upload the data, choose the base model, task and method, see the memory plan
// (POST /v1/fine_tuning/estimate) for exactly these settings, then create the job.

import { getJson, postJson, request } from "./api.js";
import { errorBox, h, section, span, table } from "./ui.js";

const ESTIMATE_DELAY_MS = 400; // after the last change to the form, so typing does not send a request a key

export async function showNewJob(view, signal) {
  const errors = errorBox();
  const uploadErrors = errorBox();
  const training = fileField("training-file", "Training file (JSONL)");
  const validation = fileField("validation-file", "Validation file (optional)");
  const model = h("select", { id: "base-model", required: true });
  const task = h("select", { id: "task" });
  const peft = h("select", { id: "peft" });
  const field = (id, props) => h("input", { id, ...props });
  const epochs = field("n-epochs", { type: "number", min: 1, max: 50, value: "3" });
  const batch = field("batch-size", { type: "number", min: 1, max: 256, value: "4" });
  const multiplier = field("lr-multiplier", { type: "number", min: 0.01, max: 100, step: "any", value: "1" });
  const rank = field("lora-r", { type: "number", min: 1, max: 1024, value: "8" });
  const suffix = field("suffix", { type: "text", maxlength: 64, placeholder: "my-model" });
  const device = h("select", { id: "device" }, h("option", { value: "cuda" }, "GPU"), h("option", { value: "cpu" }, "CPU"));
  const memory = field("memory-gb", { type: "number", min: 1, step: "any", value: "24" });
  const plan = h("div", { id: "estimate" }, h("p", { class: "muted" }, "Upload a training file to see the plan."));
  const submit = h("button", { id: "create-job", type: "submit", disabled: true }, "Create job");
  const files = { training: null, validation: null }; // the uploaded file objects
  let planned = null; // the estimate request whose plan is shown: a job is created only with its settings
  let idempotencyKey = null;
  let timer = null;

  const form = h(
    "form",
    { id: "new-job", onsubmit: create, oninput: planSoon, onchange: planSoon },
    section(
      "Data",
      training.label,
      validation.label,
      uploadErrors.element,
      h("p", { class: "muted" }, "Each file is checked line by line as it uploads; errors name their line."),
    ),
    section(
      "Model and method",
      h(
        "div",
        { class: "grid" },
        labelled("Base model", model),
        labelled("Task", task),
        labelled("Method", peft),
        labelled("Epochs", epochs),
        labelled("Batch size", batch),
        labelled("Learning-rate multiplier", multiplier),
        labelled("LoRA rank", rank),
        labelled("Model name suffix", suffix),
      ),
    ),
    section("Plan", h("div", { class: "grid" }, labelled("Plan for", device), labelled("Device memory (GiB)", memory)), plan),
    errors.element,
    submit,
  );
  view.append(h("div", { class: "toolbar" }, h("h1", {}, "New fine-tuning job")), form);

  training.input.addEventListener("change", () => uploadInto("training", training));
  validation.input.addEventListener("change", () => uploadInto("validation", validation));
  task.addEventListener("change", () => fillMethods());

  let options;
  try {
    [options] = await Promise.all([getJson("/ui/options.json", { signal }), fillModels()]);
  } catch (error) {
    errors.show(error);
    return;
  }
  task.append(...options.tasks.map((name) => h("option", { value: name }, name)));
  fillMethods();

  async function fillModels() {
    const models = await getJson("/v1/models", { signal });
    const bases = models.data.filter((m) => m.kind === "base");
    model.append(...bases.map((m) => h("option", { value: m.id }, m.id)));
    if (!bases.length) errors.show(new Error("No base models are registered: add one with `tuneforge models`."));
  }

  function fillMethods() {
    const chosen = peft.value || "lora";
    peft.replaceChildren(...options.methods[task.value].map((name) => h("option", { value: name }, name)));
    peft.value = options.methods[task.value].includes(chosen) ? chosen : "lora";
  }

  async function uploadInto(which, { input, status }) {
    uploadErrors.clear();
    files[which] = null;
    status.textContent = "";
    const file = input.files[0];
    if (!file) return planSoon();
    status.textContent = "uploading…";
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", file);
    try {
      files[which] = await (await request("/v1/files", { method: "POST", body: data, signal })).json();
      status.textContent = `${files[which].id}, ${files[which].bytes.toLocaleString("en")} bytes`;
    } catch (error) {
      status.textContent = "refused";
      uploadErrors.show(error); // the server's message lists the bad lines by number
    }
    planSoon();
  }

  function body() {
    const hyperparameters = {
      n_epochs: Number(epochs.value),
      batch_size: Number(batch.value),
      learning_rate_multiplier: Number(multiplier.value),
      peft: peft.value,
    };
    if (rank.value) hyperparameters.lora_r = Number(rank.value);
    return {
      model: model.value,
      training_file: files.training?.id,
      ...(files.validation ? { validation_file: files.validation.id } : {}),
      ...(suffix.value ? { suffix: suffix.value } : {}),
      method: { type: task.value, [task.value]: { hyperparameters } },
    };
  }

  const estimateBody = () => ({
    ...body(),
    device: device.value,
    ...(memory.value ? { gpu_memory_gb: Number(memory.value) } : {}),
  });

  function planSoon() {
    clearTimeout(timer);
    // A change event that changed nothing (a text field losing focus) keeps the plan already shown.
    if (planned !== null && planned === JSON.stringify(estimateBody())) return;
    submit.disabled = true;
    planned = null;
    if (!files.training) return;
    timer = setTimeout(estimate, ESTIMATE_DELAY_MS);
  }

  async function estimate() {
    const asked = JSON.stringify(estimateBody());
    errors.clear();
    plan.replaceChildren(h("p", { class: "muted" }, "Planning…"));
    try {
      const answer = await postJson("/v1/fine_tuning/estimate", JSON.parse(asked), { signal });
      if (asked !== JSON.stringify(estimateBody())) return; // the form changed meanwhile: a newer plan comes
      plan.replaceChildren(planTable(answer));
      planned = asked;
      idempotencyKey = randomKey(); // one per planned job: every retry of this submit sends the same
      submit.disabled = false;
    } catch (error) {
      plan.replaceChildren();
      errors.show(error);
    }
  }

  async function create(event) {
    event.preventDefault();
    if (planned === null || planned !== JSON.stringify(estimateBody())) return;
    submit.disabled = true;
    errors.clear();
    try {
      // A retried click or a resent request creates one job, not two: the key changes only with the plan.
      const job = await postJson("/v1/fine_tuning/jobs", body(), { signal, headers: { "Idempotency-Key": idempotencyKey } });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      errors.show(error);
      submit.disabled = false;
    }
  }
}

/** 128 random bits in hex (crypto.randomUUID exists only on https pages, and a console may be served on http). */
const randomKey = () => [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

function planTable(answer) {
  const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  const rows = answer.estimates.map((e) => [
    e.peft,
    `${e.trainable_parameters.toLocaleString("en")} (${e.trainable_percent.toPrecision(3)}%)`,
    gib(e.per_gpu.total),
    e.fits === null ? "—" : e.fits ? "fits" : "does not fit",
    e.training_tokens,
    e.estimated_seconds < 1 ? "under 1s" : span(e.estimated_seconds),
  ]);
  const summary = `${answer.model}: ${answer.n_epochs} epochs, batch ${answer.batch_size}, ${answer.max_seq_length} tokens a row, on ${answer.device}`;
  return h(
    "div",
    {},
    h("p", {}, summary),
    table(["method", "trainable parameters", "memory per device", "fits", "training tokens", "time"], rows, { id: "plan" }),
    answer.auto ? h("p", {}, `auto picks ${answer.auto.chosen}: ${answer.auto.reason}`) : null,
    h("details", {}, h("summary", {}, "Assumptions"), table(["name", "value", "why"], answer.assumptions.map((a) => [a.name, a.value, a.why]))),
  );
}

function fileField(id, text) {
  const input = h("input", { id, type: "file", accept: ".jsonl,.json,.txt" });
  const status = h("span", { class: "muted", id: `${id}-status` });
  return { input, status, label: h("label", { class: "field" }, h("span", {}, text), input, status) };
}

const labelled = (text, control) => h("label", { class: "field" }, h("span", {}, text), control);
