"""The webhook outbox: a job's status change writes its deliveries in its own transaction.

Written with the status change, a delivery commits or rolls back with it, so no crash can lose an event
or announce one that did not happen; the sender (app/webhooks/delivery.py) sends what is committed.
"""

import json
import secrets
from typing import Literal, get_args

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.db.tables import Job, WebhookDelivery, WebhookEndpoint
from app.db.time import db_now

# OpenAI's three, plus Tuneforge's `running` (each attempt that starts) and `paused`.
EventType = Literal[
    "fine_tuning.job.running",
    "fine_tuning.job.paused",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)


def enqueue(session: Session, *, job_id: str, type: EventType) -> int:
    """Write event `type` about job `job_id`, one delivery per endpoint of its project that takes it, in
    the caller's transaction (call it only when the status really changed). Returns how many."""
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.events)
        .join(Job, Job.project == WebhookEndpoint.project)
        .where(Job.id == job_id)
    ).all()
    wanted = [endpoint_id for endpoint_id, events in endpoints if type in events]
    if not wanted:
        return 0
    now = session.execute(select(db_now())).scalar_one()  # the status change's clock: the database's
    event_id = "evt_" + secrets.token_hex(12)
    # OpenAI's webhook event (WebhookFineTuningJobSucceeded and its siblings in openai-openapi).
    body = {"id": event_id, "object": "event", "type": type, "created_at": int(now.timestamp())}
    payload = json.dumps(body | {"data": {"id": job_id}}, separators=(",", ":"))
    rows = [
        {
            "id": "wh_" + secrets.token_hex(12),
            "endpoint_id": endpoint_id,
            "event_id": event_id,
            "type": type,
            "job_id": job_id,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for endpoint_id in wanted
    ]
    session.execute(insert(WebhookDelivery), rows)
    return len(rows)
