// The console's entry point: the API key gate, the navigation, and a router over the location's hash.
//
// Each page is a function `(view, signal, ...)` that fills `view` and stops every request, stream and
// timer of its own when `signal` aborts, which happens when the user goes to another page.

import { apiKey, decoded, forgetKey, getJson, onUnauthorized, rememberKey } from "./api.js";
import { showCompare } from "./compare.js";
import { showJob } from "./job.js";
import { showJobs } from "./jobs.js";
import { showModels, showPlayground } from "./models.js";
import { showNewJob } from "./newjob.js";
import { errorBox, h } from "./ui.js";

const ROUTES = [
  [/^#\/jobs\/([^/?]+)$/, (view, signal, _params, id) => showJob(view, signal, decoded(id))],
  [/^#\/compare$/, showCompare],
  [/^#\/new$/, showNewJob],
  [/^#\/models$/, showModels],
  [/^#\/playground$/, showPlayground],
  [/^#?\/?(jobs)?$/, showJobs],
];

const view = document.getElementById("view");
const banner = document.getElementById("banner");
let current = new AbortController();

function route() {
  current.abort();
  current = new AbortController();
  banner.hidden = true;
  view.replaceChildren();
  if (!apiKey()) return askForKey();
  const [path, query = ""] = location.hash.split("?");
  const params = new URLSearchParams(query);
  for (const [pattern, show] of ROUTES) {
    const match = pattern.exec(path);
    if (match) {
      markNavigation(path);
      return show(view, current.signal, params, ...match.slice(1));
    }
  }
  view.append(h("p", { class: "error" }, `No page at ${location.hash}.`), h("a", { href: "#/jobs" }, "Go to the jobs"));
}

function markNavigation(path) {
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", path.startsWith(link.getAttribute("href")));
  }
}

/** The key form: shown with no key, and with the server's message when it refuses one. */
function askForKey(message) {
  current.abort();
  view.replaceChildren();
  const errors = errorBox();
  if (message) errors.show(new Error(message));
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, placeholder: "tf-…" });
  const submit = async (event) => {
    event.preventDefault();
    rememberKey(input.value.trim());
    try {
      await getJson("/v1/models"); // a cheap request that any live key may make
      route();
    } catch (error) {
      if (error.status !== 401) errors.show(error); // a 401 has already brought the form back, with its message
    }
  };
  view.append(
    h(
      "form",
      { id: "key-form", class: "panel narrow", onsubmit: submit },
      h("h1", {}, "API key"),
      h("p", {}, "The console calls the API with your key. It stays in this tab only (sessionStorage) and is sent as a Bearer header."),
      h("p", { class: "muted" }, "Create one on the server with `tuneforge keys create`."),
      h("label", { class: "field" }, h("span", {}, "Key"), input),
      errors.element,
      h("button", { type: "submit" }, "Use this key"),
    ),
  );
  input.focus();
}

onUnauthorized((error) => {
  forgetKey();
  askForKey(error.message);
});

// Whatever a page did not catch is still shown, never dropped.
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason?.name === "AbortError") return;
  banner.textContent = event.reason?.message ?? String(event.reason);
  banner.hidden = false;
});

document.getElementById("change-key").addEventListener("click", () => {
  forgetKey();
  askForKey();
});
window.addEventListener("hashchange", route);
route();
