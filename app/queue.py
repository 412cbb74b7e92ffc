"""The Celery app object and send helpers. Task bodies live in worker/tasks.py; the API sends by name."""

import logging

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.jobs import lifecycle

RUN_JOB = "tuneforge.run_job"
# How often an idle worker on the embedded broker (kombu's filesystem transport) looks for a message. The
# transport cannot wake a worker, so a job waits up to this long to be taken; kombu's 1 s default was
# most of the time from POST to `running` (bench/api.py). A look is one listing of the queue's folder.
FILESYSTEM_POLL_SECONDS = 0.1
log = logging.getLogger(__name__)


def job_queue(name: str) -> Queue:
    """A queue jobs travel on, declared by senders too: Redis drops messages routed to an unbound queue."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_celery(settings: Settings) -> Celery:
    """A Celery app wired to the configured broker: JSON only, late acks, one message at a time."""
    celery = Celery("tuneforge", broker=settings.resolved_broker_url, include=["worker.tasks"])
    transport_options: dict = {}
    if settings.resolved_broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "control_folder": str(folder / "control"),  # kombu's default is ./control in the working dir
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "polling_interval": FILESYSTEM_POLL_SECONDS,
        }
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_queues=[job_queue(settings.queue)],
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return celery


celery_app = make_celery(get_settings())


def send_run_job(job_id: str, queue: str) -> None:
    """Ask a worker on `queue` to try job `job_id`; the message carries nothing else."""
    jobs = job_queue(queue)
    celery_app.send_task(RUN_JOB, args=[job_id], queue=jobs, declare=[jobs])


def waiting_messages(queue: str) -> int | None:
    """Messages waiting on `queue` (not yet taken by a worker); None if the broker cannot say."""
    try:
        with celery_app.connection_for_write() as connection:
            declared = job_queue(queue)(connection.default_channel).queue_declare(passive=True)
            return int(declared.message_count)
    except Exception as exc:
        if "NOT_FOUND" in str(exc):  # no such queue: a flushed broker forgot it, and its messages
            return 0
        log.warning("could not count the job queue's messages: %r", exc)
        return None


def send_jobs(session: Session, job_ids: list[str]) -> None:
    """Send each job's message to the queue it was created for, and record it; a job whose send fails
    stays unsent for the reconciler."""
    sent = []
    for job_id, queue in lifecycle.queues_of(session, job_ids=job_ids, default=get_settings().queue):
        try:
            send_run_job(job_id, queue)
            sent.append(job_id)
        except Exception:
            log.exception("could not send job %s to the broker; the reconciler will retry", job_id)
    lifecycle.mark_sent(session, job_ids=sent)
    session.commit()
