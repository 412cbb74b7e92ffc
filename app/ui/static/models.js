// The models page (base and fine-tuned models, checkpoints) and the playground, which sends one prompt to a
// fine-tuned model and to its base side by side, both answers streamed (chat completions, `stream: true`).

import { download, getJson, modelPath, readEvents, request } from "./api.js";
import { ago, errorBox, h, table } from "./ui.js";

export async function showModels(view, signal) {
  const errors = errorBox();
  view.append(h("div", { class: "toolbar" }, h("h1", {}, "Models")), errors.element);
  try {
    const models = await getJson("/v1/models", { signal });
    const rows = models.data.map((m) => [
      h("td", {}, h("a", { href: `#/playground?model=${encodeURIComponent(m.id)}` }, m.id)),
      m.kind,
      m.parent,
      m.owned_by,
      ago(m.created),
      h(
        "td",
        {},
        m.kind === "base"
          ? ""
          : h(
              "button",
              {
                onclick: () => download(`/v1/models/${modelPath(m.id)}/adapter`, `${m.id.replaceAll(/[:/]/g, "_")}.tar.gz`).catch(errors.show),
              },
              "Download adapter",
            ),
      ),
    ]);
    view.append(table(["model", "kind", "base", "owner", "created", ""], rows, { id: "models" }));
  } catch (error) {
    errors.show(error);
  }
}

export async function showPlayground(view, signal, params) {
  const errors = errorBox();
  const model = h("select", { id: "playground-model", onchange: () => labelPanes() });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Ask something…", required: true });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: "64" });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: "any", value: "0" });
  const send = h("button", { id: "send", type: "submit" }, "Send");
  const tuned = pane("answer-tuned");
  const base = pane("answer-base");
  let parents = new Map();

  view.append(
    h("div", { class: "toolbar" }, h("h1", {}, "Playground")),
    h(
      "form",
      { id: "playground", onsubmit: ask },
      h(
        "div",
        { class: "grid" },
        h("label", { class: "field" }, h("span", {}, "Model"), model),
        h("label", { class: "field" }, h("span", {}, "Max tokens"), maxTokens),
        h("label", { class: "field" }, h("span", {}, "Temperature"), temperature),
      ),
      h("label", { class: "field wide" }, h("span", {}, "Prompt"), prompt),
      send,
    ),
    errors.element,
    h("div", { class: "answers" }, tuned.element, base.element),
  );

  try {
    const models = await getJson("/v1/models", { signal });
    parents = new Map(models.data.map((m) => [m.id, m.parent]));
    model.append(...models.data.map((m) => h("option", { value: m.id }, m.id)));
    const wanted = params.get("model");
    if (wanted && parents.has(wanted)) model.value = wanted;
    else if (wanted) errors.show(new Error(`No model '${wanted}' is visible to this key.`));
    labelPanes();
  } catch (error) {
    errors.show(error);
  }

  function labelPanes() {
    const parent = parents.get(model.value);
    tuned.title.textContent = model.value;
    base.title.textContent = parent ? `${parent} (base)` : "(a base model: no second answer)";
  }

  async function ask(event) {
    event.preventDefault();
    errors.clear();
    send.disabled = true;
    const parent = parents.get(model.value);
    const targets = [[tuned, model.value], ...(parent ? [[base, parent]] : [])];
    base.clear();
    try {
      await Promise.all(targets.map(([where, id]) => streamAnswer(where, id)));
    } finally {
      send.disabled = false;
    }
  }

  async function streamAnswer(where, id) {
    where.clear();
    where.element.classList.add("streaming");
    const body = {
      model: id,
      messages: [{ role: "user", content: prompt.value }],
      stream: true,
      max_tokens: Number(maxTokens.value),
      temperature: Number(temperature.value),
    };
    try {
      const response = await request("/v1/chat/completions", { method: "POST", json: body, signal });
      await readEvents(response, (message) => {
        if (message.data === "[DONE]") return;
        const chunk = JSON.parse(message.data);
        if (chunk.error) throw new Error(chunk.error.message);
        where.answer.textContent += chunk.choices?.[0]?.delta?.content ?? "";
      });
    } catch (error) {
      where.errors.show(error);
    } finally {
      where.element.classList.remove("streaming");
    }
  }
}

function pane(id) {
  const title = h("h2");
  const answer = h("div", { class: "answer", "data-testid": id });
  const errors = errorBox();
  return {
    title,
    answer,
    errors,
    element: h("section", { class: "panel pane", id }, title, answer, errors.element),
    clear() {
      answer.textContent = "";
      errors.clear();
    },
  };
}
