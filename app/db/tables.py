"""Every table of Tuneforge in one place; Postgres (or SQLite when embedded) is the source of truth."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db.time import UtcDateTime, utcnow


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UtcDateTime()}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(100), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class TrainingFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(100), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str | None] = mapped_column(String(40))
    example_count: Mapped[int] = mapped_column(Integer, default=0)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    # When a "try job X" message last went (or, committed with the job, was about to go) to the broker;
    # the reconciler re-sends stale ones, and sends at once those with none (NULL).
    sent_at: Mapped[datetime | None]
    # The broker queue the job was created for: the reconciler re-sends it there, whatever its own queue.
    queue: Mapped[str | None] = mapped_column(String(200))
    # How far the run has trained: the last step it logged, of `total_steps`, and when it should finish at
    # the pace its current attempt measured (the database's clock). The training process writes them,
    # fenced by its attempt; `estimated_finish` means something only while the job is running.
    step: Mapped[int | None]
    total_steps: Mapped[int | None]
    estimated_finish: Mapped[datetime | None]
    # OpenAI's `integrations` as the job was created with them (experiment trackers the run reports to).
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Higher runs first among the queued jobs a worker can take (app/jobs/routing.py).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # What the job needs of a worker ({"gpus": N, "gpu_kind": ..., "min_memory_gb": ...}); NULL: one device.
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobEvent(Base):
    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(20), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    """A base model (project is NULL: visible to every project) or a fine-tuned one (owned by a project)."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    project: Mapped[str | None] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    base_model: Mapped[str | None] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(Text)
    architecture: Mapped[str | None] = mapped_column(String(100))
    # Leaf names of the base's linear layers (q_proj, ...), recorded at registration so the API can check
    # target_modules without loading the model.
    linear_modules: Mapped[list[Any] | None] = mapped_column(JSON)
    # Base models: shapes and parameter counts from a meta-device build, for memory plans without torch.
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(40))
    storage_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """An `Idempotency-Key` a project sent with a create request, and the object that request created."""

    __tablename__ = "idempotency_keys"

    project: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the canonical request; `request_fields` holds one digest per field, to say what differs.
    request_hash: Mapped[str] = mapped_column(String(64))
    request_fields: Mapped[dict[str, Any]] = mapped_column(JSON)
    object_type: Mapped[str] = mapped_column(String(40))
    object_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # the reconciler purges by age


class WebhookEndpoint(Base):
    """A URL a project registered for job status events, with the secret its deliveries are signed with."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(100), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(String(512))
    # Standard Webhooks' `whsec_<base64>`; kept as is (not hashed) because every delivery is signed with it.
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the status change it reports.

    `endpoint_id` has no foreign key on purpose: a status change must never fail because the endpoint it
    is about to write for was deleted at the same instant. The sender drops deliveries whose endpoint is
    gone.
    """

    __tablename__ = "webhook_deliveries"

    # The `webhook-id` header: the same on every attempt, so a receiver can drop a repeat.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(String(40), index=True)
    event_id: Mapped[str] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(60))
    job_id: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)  # the exact body, signed and sent as is on every attempt
    status: Mapped[str] = mapped_column(String(20))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due (the database's clock); NULL once delivered or given up.
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime]  # the event's time, by the database's clock
    delivered_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """One try at sending a delivery: when, how long it took, and the receiver's status code or the error."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """A live worker's announcement of what it has, renewed every heartbeat; jobs are routed by them."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid
    queue: Mapped[str] = mapped_column(String(200), index=True)
    gpus: Mapped[int] = mapped_column(Integer)  # devices: GPUs, or training processes on a CPU worker
    gpu_kind: Mapped[str] = mapped_column(String(100))  # the GPU's name, or "cpu"
    memory_gb: Mapped[float | None]  # per device
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime]
