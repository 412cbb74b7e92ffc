"""Prometheus metrics of the inference server, served at GET /metrics (behind the shared secret).

Requests are counted and timed per route by prometheus-fastapi-instrumentator; the engine's own figures
are module-level (one engine per server process): tokens generated (Prometheus' `rate()` of the counter
is tokens per second), rows per decode step, generations stopped because their client left, the wait
from arrival to a place in the batch, and adapter loads and evictions. Tests build several apps in one
process, so each app instruments a registry of its own.
"""

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator

ENGINE_REGISTRY = CollectorRegistry()
GENERATED_TOKENS = Counter(
    "tuneforge_inference_generated_tokens", "Tokens generated, all requests.", registry=ENGINE_REGISTRY
)
BATCH_ROWS = Histogram(
    "tuneforge_inference_batch_rows",
    "Rows (generations) per decode step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=ENGINE_REGISTRY,
)
QUEUE_WAIT = Histogram(
    "tuneforge_inference_queue_wait_seconds",
    "From a generation's arrival to its place in the running batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=ENGINE_REGISTRY,
)
CANCELLED_ROWS = Counter(
    "tuneforge_inference_cancelled_rows",
    "Generations stopped before their end because their client went away.",
    registry=ENGINE_REGISTRY,
)
ADAPTER_LOADS = Counter("tuneforge_inference_adapter_loads", "Adapters loaded.", registry=ENGINE_REGISTRY)
ADAPTER_EVICTIONS = Counter(
    "tuneforge_inference_adapter_evictions", "Adapters evicted to make room.", registry=ENGINE_REGISTRY
)


def install_metrics(app: FastAPI) -> None:
    """Count and time every request per route, and serve `GET /metrics`."""
    requests = CollectorRegistry()
    Instrumentator(excluded_handlers=["/metrics", "/healthz"], registry=requests).instrument(
        app, metric_namespace="tuneforge_inference"
    )

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(
            generate_latest(requests) + generate_latest(ENGINE_REGISTRY), media_type=CONTENT_TYPE_LATEST
        )
