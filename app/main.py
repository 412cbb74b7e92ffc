"""The FastAPI application: `uvicorn app.main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from app import queue
from app.config import get_settings
from app.db.session import get_engine
from app.errors import ApiError, install_error_handlers
from app.estimate.routes import router as estimate_router
from app.files.routes import router as files_router
from app.inference import service as inference_service
from app.inference.routes import router as inference_router
from app.jobs.routes import router as jobs_router
from app.models.routes import router as models_router


def create_app() -> FastAPI:
    """Build the API with its routers and error handlers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inference_service.open_client() as client:
            app.state.inference_client = client
            yield

    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning for open models.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # inference_router before models_router: its /v1/models/{id}/merged must win over the catch-all retrieve.
    for router in (files_router, jobs_router, inference_router, models_router, estimate_router):
        app.include_router(router)

    @app.get("/livez", tags=["ops"])
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> dict:
        checks = {"database": _check_database(), "broker": _check_broker()}
        if not all(v == "ok" for v in checks.values()):
            raise ApiError(503, f"Not ready: {checks}", type="server_error", code="not_ready")
        # Informational only: without an inference server, fine-tuning still works; chat answers 503.
        settings = get_settings()
        checks["inference"] = inference_service.check_health(settings.resolved_inference_url)
        if settings.inference_backend == "vllm":  # chat goes to vLLM; merged exports and classifiers do not
            checks["vllm"] = inference_service.check_health(settings.vllm_url, path="/health")
        return {"status": "ok", "checks": checks}

    return app


def _check_database() -> str:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # readiness reports, it does not raise
        return f"error: {exc.__class__.__name__}"


def _check_broker() -> str:
    try:
        with queue.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"


app = create_app()
