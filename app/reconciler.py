"""The reconciler: one loop per deployment that keeps Postgres and the broker in agreement.

It re-sends queued jobs whose message may be lost (a crash between commit and send; a flushed or
restarted broker, found quickly as queued jobs while the broker's queue is empty), re-queues jobs whose
worker stopped renewing its lease, and fails jobs out of attempts; it also deletes expired
Idempotency-Keys, and sends webhooks from the outbox in a thread (app/webhooks/delivery.py). It runs as
its own process rather than as a Celery beat task: a task would wait behind a training job on a busy
worker, which is exactly when a dead worker's job needs re-queueing.
"""

import logging
import time

from app import idempotency
from app.config import get_settings
from app.db.session import session_scope
from app.jobs import lifecycle, routing
from app.queue import send_jobs, waiting_messages
from app.webhooks import delivery as webhook_delivery

log = logging.getLogger(__name__)


def reconcile_once() -> list[str]:
    """One pass; returns the ids whose message went out again."""
    settings = get_settings()
    with session_scope() as session:
        waited_on = lifecycle.queues_waited_on(session, default=settings.queue)
        due = lifecycle.reconcile(
            session,
            resend_after_seconds=settings.resend_after_seconds,
            empty_queues={queue for queue in waited_on if waiting_messages(queue) == 0},
            default_queue=settings.queue,
            # a message just sent may be in a worker's hands before its claim commits
            settle_seconds=max(10.0, 3 * settings.reconcile_seconds),
        )
        session.commit()
        send_jobs(session, due)
        if idempotency.purge_expired(session):
            session.commit()
        routing.forget_dead(session)
        session.commit()
    return due


def run_forever() -> None:
    """Reconcile every `reconcile_seconds` until stopped; a failed pass is logged and retried."""
    interval = get_settings().reconcile_seconds
    webhook_delivery.start_sender()
    while True:
        try:
            due = reconcile_once()
            if due:
                log.info("re-sent %d job(s): %s", len(due), ", ".join(due))
        except Exception:
            log.exception("reconcile pass failed; retrying in %s s", interval)
        time.sleep(interval)
