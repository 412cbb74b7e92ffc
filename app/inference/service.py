"""Forwarding chat and text completions to the inference server, streams relayed as they arrive.

The inference server (`worker/serving`, needs torch) trusts only callers that hold the shared secret
(`TUNEFORGE_INFERENCE_SECRET`): the API authenticates the tenant's key, then calls it with that secret and
names the project in `PROJECT_HEADER`. The server resolves the model id itself and already answers in
OpenAI's shapes and error envelope, so the API relays its status and body unchanged; only an unreachable
or misbehaving server becomes an error of the API's own. With `inference_backend = "vllm"` the same relay
targets a vLLM server instead, after `app.inference.vllm.prepare` has resolved the model, rewritten it, and
kept only the fields Tuneforge documents.
"""

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio
import httpx
from fastapi.responses import Response, StreamingResponse

from app.config import get_settings
from app.db.session import session_scope
from app.errors import ApiError, envelope
from app.inference import vllm as vllm_backend

# The inference server reads it as its `x_tuneforge_project` header parameter.
PROJECT_HEADER = "X-Tuneforge-Project"

# Generation on a CPU can take minutes before a whole answer exists; connecting must be quick, though,
# so a stopped server is reported at once.
TIMEOUT = httpx.Timeout(600.0, connect=5.0)


def open_client() -> httpx.AsyncClient:
    """The connection pool to the inference server; the app opens one at startup and closes it at shutdown."""
    settings = get_settings()
    if settings.inference_backend == "vllm":  # another service: the shared secret is not its to see
        return httpx.AsyncClient(base_url=settings.vllm_url.rstrip("/"), timeout=TIMEOUT)
    return _builtin_client()


def _builtin_client() -> httpx.AsyncClient:
    settings = get_settings()
    return httpx.AsyncClient(
        base_url=settings.resolved_inference_url,
        timeout=TIMEOUT,
        headers={"Authorization": f"Bearer {settings.inference_secret}"},
    )


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a 400 the caller can act on."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "The request body must be a JSON object, e.g. "
            '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}]}.',
            code="invalid_json",
        )
    return body


def unavailable(url: str, exc: Exception) -> ApiError:
    return ApiError(
        503,
        f"The inference server at {url} is not reachable ({exc.__class__.__name__}). `tuneforge up` starts "
        "one; otherwise run `tuneforge serve --port 8001` (needs torch) and point TUNEFORGE_INFERENCE_URL "
        "at it.",
        type="server_error",
        code="inference_unavailable",
    )


async def forward(client: httpx.AsyncClient, *, path: str, raw_body: bytes, project: str) -> Response:
    """POST `raw_body` to the inference server's `path` as `project`; relay its answer or its stream."""
    body = parse_body(raw_body)
    headers = {"Content-Type": "application/json", PROJECT_HEADER: project}
    vllm = get_settings().inference_backend == "vllm"
    if vllm:  # vLLM knows no projects: the model is resolved, and its adapter registered, here
        body = await anyio.to_thread.run_sync(_prepare_for_vllm, project, path, body)
        raw_body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    request = client.build_request("POST", path, content=raw_body, headers=headers)
    try:
        upstream = await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        if vllm:
            raise vllm_backend.unavailable(exc) from None
        raise unavailable(str(client.base_url).rstrip("/"), exc) from None
    except httpx.TransportError as exc:
        raise _failed(exc) from None
    if not vllm:
        await _refuse_if_untrusted(upstream)
    if vllm and upstream.status_code == 404:  # a restarted vLLM has forgotten the adapters it was given
        vllm_backend.forget(body["model"])
    content_type = upstream.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        return StreamingResponse(
            _relay(upstream), status_code=upstream.status_code, media_type="text/event-stream"
        )
    return await _json_answer(upstream)


async def _json_answer(upstream: httpx.Response) -> Response:
    """The upstream's whole JSON answer, status kept; closes it. Anything but JSON is the API's 502."""
    try:
        content = await upstream.aread()
    except httpx.TransportError as exc:
        raise _failed(exc) from None
    finally:
        await upstream.aclose()
    if not upstream.headers.get("content-type", "").startswith("application/json"):
        raise ApiError(
            502,
            f"The inference server answered {upstream.status_code} without JSON: {content[:200]!r}.",
            type="server_error",
            code="inference_failed",
        )
    return Response(content, status_code=upstream.status_code, media_type="application/json")


def _prepare_for_vllm(project: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with session_scope() as session:
        return vllm_backend.prepare(session, project=project, path=path, body=body)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's bytes as they arrive; closing it when the client leaves stops the generation."""
    try:
        async for chunk in upstream.aiter_bytes():
            yield chunk
    except httpx.TransportError as exc:  # headers are sent: report in the stream, as the server does
        error = envelope(f"The inference server stopped mid-stream: {exc!r}", "server_error", None, None)
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        # A disconnecting client cancels this generator; the shield lets the close itself still run.
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


def _failed(exc: Exception) -> ApiError:
    return ApiError(
        502,
        f"The inference server failed to answer: {exc.__class__.__name__}: {exc}",
        type="server_error",
        code="inference_failed",
    )


def check_health(url: str, path: str = "/healthz") -> str:
    """'ok' if the inference server at `url` answers `path`, else why not (for /readyz, never raises)."""
    try:
        response = httpx.get(f"{url}{path}", timeout=1.0)
    except httpx.HTTPError as exc:
        return f"unavailable: {exc.__class__.__name__}"
    return "ok" if response.status_code == 200 else f"unavailable: HTTP {response.status_code}"


async def classify(client: httpx.AsyncClient, *, raw_body: bytes, project: str) -> Response:
    """POST a classification request to Tuneforge's inference server as `project`; relay its JSON answer."""
    parse_body(raw_body)
    server, owned = _tuneforge_client(client)
    try:
        request = server.build_request(
            "POST",
            "/v1/classifications",
            content=raw_body,
            headers={"Content-Type": "application/json", PROJECT_HEADER: project},
        )
        return await _json_answer(await _send(server, request))
    finally:
        if owned:
            await server.aclose()


async def download_merged(client: httpx.AsyncClient, *, model_id: str, project: str) -> Response:
    """The merged export of `model_id` (a .tar.gz), streamed through from Tuneforge's inference server."""
    server, owned = _tuneforge_client(client)
    # Percent-encoded (':' kept), so an id can never name another path on the server ('/' and '..'
    # included); the server's `:path` route decodes it back.
    path = f"/internal/merged/{quote(model_id, safe=':')}"
    request = server.build_request("GET", path, headers={PROJECT_HEADER: project})
    try:
        upstream = await _send(server, request)
    except ApiError:
        if owned:
            await server.aclose()
        raise
    if upstream.status_code != 200:  # errors are small JSON envelopes: relay them whole
        try:
            content = await upstream.aread()
        except httpx.TransportError as exc:
            raise _failed(exc) from None
        finally:
            await upstream.aclose()
            if owned:
                await server.aclose()
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(content, status_code=upstream.status_code, media_type=media_type)
    # Content-Length is relayed so a client can tell an archive cut short by a failure mid-transfer.
    headers = {
        name: upstream.headers[name]
        for name in ("content-length", "content-disposition", "repr-digest")
        if name in upstream.headers
    }
    body = _relay_bytes(upstream, server if owned else None)
    return StreamingResponse(body, media_type="application/gzip", headers=headers, status_code=200)


def _tuneforge_client(client: httpx.AsyncClient) -> tuple[httpx.AsyncClient, bool]:
    """The app's client, or with the vLLM backend one of its own to INFERENCE_URL (True: close it after).

    Merged exports and classifications exist only on Tuneforge's inference server; vLLM has neither.
    """
    if get_settings().inference_backend != "vllm":
        return client, False
    return _builtin_client(), True


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    try:
        upstream = await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise unavailable(str(client.base_url).rstrip("/"), exc) from None
    except httpx.TransportError as exc:
        raise _failed(exc) from None
    await _refuse_if_untrusted(upstream)
    return upstream


async def _refuse_if_untrusted(upstream: httpx.Response) -> None:
    """A 401 from the inference server is about the API's shared secret, never the tenant's key: a 502."""
    if upstream.status_code != 401:
        return
    await upstream.aclose()
    raise ApiError(
        502,
        "The inference server refused the API's shared secret: give the API and the inference server the "
        "same TUNEFORGE_INFERENCE_SECRET.",
        type="server_error",
        code="inference_secret_refused",
    )


async def _relay_bytes(upstream: httpx.Response, owned: httpx.AsyncClient | None) -> AsyncIterator[bytes]:
    """A binary body as it arrives; a failure mid-transfer ends it short (never text inside the archive)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
            if owned is not None:
                await owned.aclose()
