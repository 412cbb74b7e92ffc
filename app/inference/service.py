"""Forwarding chat and text completions to the inference server, streams relayed as they arrive.

The inference server (`worker/serving`, needs torch) trusts its caller: the API authenticates the key and
names the project in `PROJECT_HEADER`. The server resolves the model id itself and already answers in
OpenAI's shapes and error envelope, so the API relays its status and body unchanged; only an unreachable
or misbehaving server becomes an error of the API's own.
"""

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi.responses import Response, StreamingResponse

from app.config import get_settings
from app.errors import ApiError, envelope

# Duplicates worker.serving.app.PROJECT_HEADER: the API may not import worker (it would pull in torch).
PROJECT_HEADER = "X-Tuneforge-Project"

# Generation on a CPU can take minutes before a whole answer exists; connecting must be quick, though,
# so a stopped server is reported at once.
TIMEOUT = httpx.Timeout(600.0, connect=5.0)


def open_client() -> httpx.AsyncClient:
    """The connection pool to the inference server; the app opens one at startup and closes it at shutdown."""
    return httpx.AsyncClient(base_url=get_settings().resolved_inference_url, timeout=TIMEOUT)


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
    parse_body(raw_body)
    request = client.build_request(
        "POST",
        path,
        content=raw_body,
        headers={"Content-Type": "application/json", PROJECT_HEADER: project},
    )
    try:
        upstream = await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise unavailable(str(client.base_url).rstrip("/"), exc) from None
    except httpx.TransportError as exc:
        raise _failed(exc) from None
    content_type = upstream.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        return StreamingResponse(
            _relay(upstream), status_code=upstream.status_code, media_type="text/event-stream"
        )
    try:
        content = await upstream.aread()
    except httpx.TransportError as exc:
        raise _failed(exc) from None
    finally:
        await upstream.aclose()
    if not content_type.startswith("application/json"):
        raise ApiError(
            502,
            f"The inference server answered {upstream.status_code} without JSON: {content[:200]!r}.",
            type="server_error",
            code="inference_failed",
        )
    return Response(content, status_code=upstream.status_code, media_type="application/json")


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


def check_health(url: str) -> str:
    """'ok' if the inference server at `url` answers /healthz, else why not (for /readyz, never raises)."""
    try:
        response = httpx.get(f"{url}/healthz", timeout=1.0)
    except httpx.HTTPError as exc:
        return f"unavailable: {exc.__class__.__name__}"
    return "ok" if response.status_code == 200 else f"unavailable: HTTP {response.status_code}"
