"""Prometheus metrics of the API: requests per route, and the service's state read at each scrape.

Requests are counted and timed per route template by prometheus-fastapi-instrumentator. The rest is a
collector that reads the database (in one short session) and the broker when Prometheus scrapes: jobs by
status, each queue's waiting messages and the age of its oldest queued job, how long ago each busy
worker renewed its lease, and each running job's latest step time and tokens per second. Nothing is
kept in this process between scrapes, so any number of API replicas report the same figures.

Each app gets a registry of its own (tests build several apps in one process).
"""

import hmac
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import Job, JobEvent
from app.db.time import db_now
from app.errors import ApiError
from app.jobs.lifecycle import queues_waited_on
from app.queue import waiting_messages

log = logging.getLogger(__name__)
STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


class ServiceCollector(Collector):
    """Jobs, queues, workers and training runs, as the database and the broker see them now."""

    def collect(self) -> Iterator[Metric]:
        readable = GaugeMetricFamily("tuneforge_state_readable", "1 if this scrape could read the database.")
        try:
            figures = list(self._read())
        except Exception:  # the request metrics are still worth serving
            log.warning("could not read the service's state for /metrics", exc_info=True)
            figures = []
        readable.add_metric([], 1 if figures else 0)
        yield from (*figures, readable)

    def _read(self) -> Iterator[Metric]:
        settings = get_settings()
        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by status.", labels=["status"])
        depth = GaugeMetricFamily(
            "tuneforge_queue_messages",
            "Messages waiting on a job queue (-1: the broker cannot say).",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "tuneforge_queue_oldest_job_age_seconds",
            "Age of the oldest queued job, per queue.",
            labels=["queue"],
        )
        heartbeat = GaugeMetricFamily(
            "tuneforge_worker_heartbeat_age_seconds",
            "Seconds since each busy worker last renewed its job's lease.",
            labels=["worker"],
        )
        step_time = GaugeMetricFamily(
            "tuneforge_training_step_seconds", "A running job's latest seconds per step.", labels=["job_id"]
        )
        throughput = GaugeMetricFamily(
            "tuneforge_training_tokens_per_second",
            "A running job's latest training tokens per second.",
            labels=["job_id"],
        )
        with session_scope() as session:
            now = session.scalar(select(db_now()))
            assert now is not None
            by_status = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            counts = {status: count for status, count in by_status}
            for status in STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
            queue = func.coalesce(Job.queue, settings.queue)
            oldest_rows = session.execute(
                select(queue, func.min(Job.created_at)).where(Job.status == "queued").group_by(queue)
            ).all()
            first_queued = {name: created for name, created in oldest_rows}
            for name in sorted(queues_waited_on(session, default=settings.queue) | {settings.queue}):
                waiting = waiting_messages(name)
                depth.add_metric([name], -1 if waiting is None else waiting)
                created = first_queued.get(name)
                oldest.add_metric([name], _seconds_between(created, now) if created else 0)
            running = session.execute(
                select(Job.id, Job.lease_owner, Job.lease_expires_at).where(Job.status == "running")
            ).all()
            for job_id, owner, lease_expires_at in running:
                if owner and lease_expires_at:
                    renewed_ago = settings.lease_seconds - _seconds_between(now, lease_expires_at)
                    heartbeat.add_metric([owner], max(renewed_ago, 0.0))
                latest = _latest_steps(session, job_id)
                if latest:
                    throughput.add_metric([job_id], latest[0][1].get("tokens_per_second", 0.0))
                if len(latest) == 2 and latest[0][1]["step"] > latest[1][1]["step"]:
                    (then, before), (now_at, last) = latest[1], latest[0]
                    seconds = _seconds_between(then, now_at) / (last["step"] - before["step"])
                    step_time.add_metric([job_id], seconds)
        yield from (jobs, depth, oldest, heartbeat, step_time, throughput)


def _seconds_between(earlier: datetime, later: datetime) -> float:
    return (later - earlier).total_seconds()


def _latest_steps(session: Session, job_id: str) -> list[tuple[datetime, dict[str, Any]]]:
    """When the job's two latest training steps were recorded, and their figures; newest first."""
    rows = session.execute(
        select(JobEvent.created_at, JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq.desc())
        .limit(8)  # validation figures may be metrics events of their own: skip them
    ).tuples()
    return [(at, data) for at, data in rows if data and "train_loss" in data][:2]


def install_metrics(app: FastAPI) -> None:
    """Count and time every request per route, and serve `GET /metrics` for Prometheus."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector())
    Instrumentator(excluded_handlers=["/metrics"], registry=registry).instrument(
        app, metric_namespace="tuneforge"
    )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics(request: Request) -> Response:
        """Prometheus' text format. With TUNEFORGE_METRICS_TOKEN set, only `Authorization: Bearer <it>`."""
        token = get_settings().metrics_token
        if token:
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(sent.encode(), token.encode()):
                raise ApiError(401, "GET /metrics needs the metrics token.", code="invalid_metrics_token")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
