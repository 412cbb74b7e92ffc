"""The FastAPI application: `uvicorn app.main:app`."""

import gc
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import QueuePool, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, queue
from app.config import get_settings
from app.db.session import get_engine, session_scope
from app.errors import (
    ERROR_RESPONSES,
    ApiError,
    BodyTooLarge,
    ErrorResponse,
    envelope,
    install_error_handlers,
)
from app.estimate.routes import router as estimate_router
from app.files.routes import router as files_router
from app.inference import service as inference_service
from app.inference.routes import router as inference_router
from app.jobs.results import router as job_results_router
from app.jobs.routes import router as jobs_router
from app.models.routes import router as models_router
from app.telemetry import install_metrics
from app.ui.routes import router as console_router
from app.webhooks.routes import router as webhooks_router


def create_app() -> FastAPI:
    """Build the API with its routers and error handlers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure()  # here, not at import: only a serving process sets up its logging
        # What imports and startup built lives as long as the process: out of the cyclic collector's sight,
        # a full collection (a busy API runs them often) walks only what requests made since. At 64
        # connections this took ~8% off the CPU time of a request and ~45% off its p99 (bench/api.py).
        gc.freeze()
        async with inference_service.open_client() as client:
            app.state.inference_client = client
            yield

    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning for open models.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    install_error_handlers(app)
    install_metrics(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(SafePaths)
    app.add_middleware(logs.RequestContext)  # outermost: even a refused body gets an id and a line
    # inference_router before models_router: its /v1/models/{id}/merged must win over the catch-all retrieve.
    for router in (files_router, jobs_router, inference_router, models_router, estimate_router):
        app.include_router(router)
    app.include_router(job_results_router)
    app.include_router(webhooks_router)
    app.include_router(console_router)  # /ui: the web console, outside the OpenAPI schema

    @app.get("/livez", tags=["ops"])
    def livez() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={503: {"model": ErrorResponse, "description": "The database or the broker is down."}},
    )
    def readyz() -> dict:
        pool = _pool_usage()  # before the check below takes a connection of its own
        checks = {"database": _check_database(), "broker": _check_broker()}
        if not all(v == "ok" for v in checks.values()):
            raise ApiError(503, f"Not ready: {checks}", type="server_error", code="not_ready")
        # Informational only: without an inference server, fine-tuning still works; chat answers 503.
        settings = get_settings()
        checks["inference"] = inference_service.check_health(settings.resolved_inference_url)
        if settings.inference_backend == "vllm":  # chat goes to vLLM; merged exports and classifiers do not
            checks["vllm"] = inference_service.check_health(settings.vllm_url, path="/health")
        return {"status": "ok", "checks": checks, "database_pool": pool}

    return app


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SafePaths:
    """Refuse, before routing, a path with a '.' or '..' segment or a control character (NUL included).

    Ids come from the database and never hold these; refusing them here keeps traversal attempts away from
    every route, the artifact store, Postgres (which rejects NUL) and URLs built for the inference server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, query = scope["path"], unquote(scope.get("query_string", b"").decode("latin-1"))
            if _CONTROL.search(path) or _CONTROL.search(query) or {".", ".."} & set(path.split("/")):
                message = "The URL holds a '.' or '..' segment or a control character; ids never do."
                body = envelope(message, "invalid_request_error", None, "invalid_path")
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


UPLOAD_PATH = "/v1/files"
FRAMING_BYTES = 64 << 10  # the multipart boundaries, headers and `purpose` field around the file


class BodyLimit:
    """Refuse a request body over its route's limit with 413, before anything parses it or checks its key.

    Uploads (POST /v1/files) may be up to TUNEFORGE_MAX_UPLOAD_MB; every other body is JSON and may be up
    to TUNEFORGE_MAX_JSON_BODY_KB. A declared Content-Length over the limit is refused before any of the
    body is read. A JSON body is read here, at most the limit plus one chunk, then handed to the app, so
    routes that authenticate before reading (chat) are covered too; an upload streams through, and is cut
    off at the first chunk past its limit. The file itself is checked to the byte when it is stored
    (app/files/service.py); the upload cap covers the file plus its multipart framing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        if upload:
            cap, too_large = (settings.max_upload_mb << 20) + FRAMING_BYTES, BodyTooLarge.upload
        else:
            cap, too_large = settings.max_json_body_kb << 10, BodyTooLarge.json
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await too_large().response()(scope, receive, send)
            return
        if upload:
            await self.app(scope, _counted(receive, cap, too_large), send)
            return
        body = await _read_at_most(receive, cap)
        if body is None:  # over the limit, or the client left
            await too_large().response()(scope, receive, send)
            return
        await self.app(scope, _replayed(body, receive), send)


async def _read_at_most(receive: Receive, cap: int) -> bytes | None:
    """The whole body, or None once it passes `cap` bytes (or the client disconnects)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read already, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _counted(receive: Receive, cap: int, too_large: Callable[[], BodyTooLarge]) -> Receive:
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > cap:
            raise too_large()  # FastAPI's body parser lets HTTP exceptions through
        return message

    return limited_receive


def _check_database() -> str:
    try:
        with session_scope() as session:  # the engine and pool that requests use
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # readiness reports, it does not raise
        return f"error: {exc.__class__.__name__}"


def _pool_usage() -> dict[str, int]:
    """How many of the request engine's connections are in use, and how many it keeps: a stuck pool shows."""
    pool = get_engine().pool
    if not isinstance(pool, QueuePool):
        return {}
    return {"checked_out": pool.checkedout(), "size": pool.size(), "overflow": pool.overflow()}


def _check_broker() -> str:
    try:
        with queue.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"


app = create_app()
