// The console's only way to the server: the public API, with the user's key as a Bearer header.
//
// The key lives in sessionStorage (gone when the tab closes, never sent by the browser on its own) and
// no cookie is involved. Streams are read with fetch, not EventSource, because EventSource cannot send an
// Authorization header.

const KEY_NAME = "tuneforge.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY_NAME);
export const rememberKey = (key) => sessionStorage.setItem(KEY_NAME, key);
export const forgetKey = () => sessionStorage.removeItem(KEY_NAME);

/** An API error as the server put it in OpenAI's envelope: its message is what the user is shown. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    Object.assign(this, { status, code, param, retryAfter });
  }
}

let unauthorized = () => {};

/** Call `handler(error)` whenever the server refuses the key (401), wherever the request came from. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** The response of `path`, or an ApiError carrying the server's own message. */
export async function request(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const sent = { ...headers };
  const key = apiKey();
  if (key) sent.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, signal, credentials: "omit", cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let detail = { message: `The server answered ${response.status} ${response.statusText}.` };
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) detail = body.error;
  } catch {
    // not the envelope (a proxy's page, say): the status line above is all there is
  }
  const error = new ApiError(detail.message, {
    status: response.status,
    code: detail.code ?? null,
    param: detail.param ?? null,
    retryAfter: Number(response.headers.get("Retry-After")) || null,
  });
  if (response.status === 401) unauthorized(error);
  return error;
}

export const getJson = async (path, options) => (await request(path, options)).json();
export const postJson = (path, json, options = {}) => getJson(path, { ...options, method: "POST", json });

/** Every Server-Sent Event of a streamed response, as {id, event, data}, until the stream ends. */
export async function readEvents(response, onEvent) {
  let buffer = "";
  let fields = { id: null, event: "message", data: [] };
  for await (const text of textOf(response)) {
    buffer += text;
    for (;;) {
      const end = /\r\n|\r|\n/.exec(buffer);
      // A "\r" at the very end may be the first half of a "\r\n" that the next read completes.
      if (!end || (end[0] === "\r" && end.index === buffer.length - 1)) break;
      const line = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      if (line === "") {
        if (fields.data.length) onEvent({ id: fields.id, event: fields.event, data: fields.data.join("\n") });
        fields = { id: fields.id, event: "message", data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") fields.data.push(value);
        else if (name === "id") fields.id = value;
        else if (name === "event") fields.event = value;
      }
    }
  }
}

/** The decoded text of a streamed response, piece by piece as it arrives. */
export async function* textOf(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    // A reader that stopped early closes the stream (a no-op once it has ended; an errored one rejects).
    await reader.cancel().catch(() => {});
  }
}

/** Fetch `path` with the key and hand it to the browser as a saved file (a link cannot send the header). */
export async function download(path, fallbackName) {
  const response = await request(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const named = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = named ? decoded(named[1]) : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** `text` percent-decoded, or as it is where it is not valid percent-encoding. */
export function decoded(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** A model id in a URL path: each part encoded, its slashes kept (the routes take the id as a path). */
export const modelPath = (id) => id.split("/").map(encodeURIComponent).join("/");

/**
 * Run `task` now and then every `seconds` while the tab is visible, until `signal` aborts; its errors go
 * to `report`. The API limits requests per key, so a hidden tab does not poll, and a 429 waits as long
 * as the server asks.
 */
export function poll(signal, seconds, task, report) {
  let timer = null;
  const run = async () => {
    let wait = seconds;
    if (document.visibilityState === "visible") {
      try {
        await task();
      } catch (error) {
        if (error.name === "AbortError") return;
        report(error);
        if (error.retryAfter) wait = Math.max(wait, error.retryAfter);
      }
    }
    if (!signal.aborted) timer = setTimeout(run, wait * 1000);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  run();
}
