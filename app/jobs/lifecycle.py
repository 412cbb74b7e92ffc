"""Job state transitions on the worker side, each one conditional UPDATE fenced by the attempt number.

A worker owns a job only while its attempt is the job's attempt and the job is `running`: a second
delivery, a cancel, or a newer attempt makes every later write of the old attempt a no-op. Lease times
come from the database's clock (`db_now`), so hosts whose clocks disagree still agree on a lease.
"""

from collections.abc import Collection
from typing import Any

from sqlalchemy import JSON, and_, delete, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from app import webhooks
from app.db.session import after_commit, notify_event_streams
from app.db.tables import Checkpoint, Job, JobEvent
from app.db.time import db_now
from app.files import service as file_service
from app.jobs import results
from app.jobs import service as job_service
from app.models import service as model_service
from app.storage import get_store, resume_state_key


def claim(session: Session, *, job_id: str, owner: str, lease_seconds: int) -> int | None:
    """Take a queued job: bump its attempt and set a lease. Returns the attempt, or None if not claimable."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempt=Job.attempt + 1,
            lease_owner=owner,
            lease_expires_at=db_now(lease_seconds),
            estimated_finish=None,  # the new attempt estimates from its own pace
        )
        .returning(Job.attempt)
    )
    attempt = result.scalar_one_or_none()
    if attempt is None:
        return None
    webhooks.enqueue(session, job_id=job_id, type="fine_tuning.job.running")  # every attempt that starts
    session.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=db_now()))
    job_service.add_event(
        session, job_id=job_id, message=f"Fine-tuning job started (attempt {attempt}, {owner})."
    )
    return attempt


def _owned(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
    return update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def renew_lease(session: Session, *, job_id: str, attempt: int, lease_seconds: int) -> bool:
    """Extend the lease; False means this attempt no longer owns the job (cancelled or superseded)."""
    result = session.execute(_owned(job_id, attempt).values(lease_expires_at=db_now(lease_seconds)))
    return result.rowcount == 1  # type: ignore[attr-defined]


def still_owned(session: Session, *, job_id: str, attempt: int) -> bool:
    """True while this attempt may keep training."""
    return attempt_status(session, job_id=job_id, attempt=attempt) == "running"


def add_attempt_event(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    statuses: tuple[str, ...],
    message: str,
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> bool:
    """Append an event for attempt `attempt` only while it owns the job in one of `statuses`.

    The check and the write are one INSERT ... SELECT: a run frozen between a read that it owns the job
    and its write would otherwise commit the write after the reconciler's fence. No lock is held on the
    job (only the foreign key's share lock, which no status change waits for), so a run that stalls
    here never holds up a cancel or a fence. True if the event was written.
    """
    owned = select(Job.id).where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(statuses)).exists()
    row = select(literal(job_id), literal(type), literal(message), literal(data, JSON)).where(owned)
    statement = (
        insert(JobEvent).from_select(["job_id", "type", "message", "data"], row).returning(JobEvent.seq)
    )
    if session.execute(statement).scalar_one_or_none() is None:
        return False
    notify_event_streams(session.connection(), job_id)
    return True


def attempt_status(session: Session, *, job_id: str, attempt: int) -> str | None:
    """The job's status as attempt `attempt` sees it: None once a newer attempt has superseded it."""
    job = session.get(Job, job_id)
    return job.status if job is not None and job.attempt == attempt else None


def record_progress(
    session: Session, *, job_id: str, attempt: int, step: int, total_steps: int, seconds_left: float
) -> bool:
    """Record the step this attempt has reached, and that it should finish `seconds_left` from now by the
    database's clock. A no-op once the attempt no longer owns the job; a pausing run records its last step.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(("running", "paused")))
        .values(step=step, total_steps=total_steps, estimated_finish=db_now(seconds_left))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def requeue(session: Session, *, job_id: str, attempt: int, message: str, counts: bool) -> bool:
    """Put a job this attempt owns back in the queue; the next attempt resumes from its last checkpoint.

    `counts=False` (a worker shutting down, not a failure of the job) gives the attempt back, so that
    preemptions never use up `max_attempts`; the attempt number itself still grows, for fencing.
    """
    values: dict[str, Any] = {"status": "queued", "lease_owner": None, "lease_expires_at": None}
    values["sent_at"] = db_now()  # the caller sends after this commits; if that is lost, the reconciler
    if not counts:
        values["max_attempts"] = Job.max_attempts + 1
    result = session.execute(_owned(job_id, attempt).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    job_service.add_event(session, job_id=job_id, level="warn", message=message)
    return True


def fail(session: Session, *, job_id: str, attempt: int, code: str, message: str) -> bool:
    """Mark the job failed with a readable error, if this attempt still owns it."""
    result = session.execute(
        _owned(job_id, attempt).values(
            status="failed",
            error={"code": code, "message": message, "param": None},
            finished_at=db_now(),
            lease_expires_at=None,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    webhooks.enqueue(session, job_id=job_id, type="fine_tuning.job.failed")
    job_service.add_event(session, job_id=job_id, level="error", message=f"Job failed: {message}")
    return True


def record_checkpoint(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    checkpoint_id: str,
    step: int,
    metrics: dict[str, Any],
    storage_key: str,
    keep: int,
) -> bool:
    """Add a checkpoint row whose files are already in the store (a pausing job still saves its last one).

    Only the job's newest `keep` checkpoints stay: older rows go in this transaction, and their archives
    once it has committed (a rollback keeps both).
    """
    if attempt_status(session, job_id=job_id, attempt=attempt) not in ("running", "paused"):
        return False
    session.add(
        Checkpoint(id=checkpoint_id, job_id=job_id, step=step, metrics=metrics, storage_key=storage_key)
    )
    job_service.add_event(
        session,
        job_id=job_id,
        message=f"Checkpoint created at step {step}.",
        data={"step": step, "checkpoint": checkpoint_id},
    )
    session.flush()
    older = session.execute(
        select(Checkpoint.id, Checkpoint.storage_key)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        .offset(keep)
    ).all()
    if older:
        session.execute(delete(Checkpoint).where(Checkpoint.id.in_([row.id for row in older])))
        keys = [key for row in older for key in (row.storage_key, resume_state_key(row.storage_key))]
        after_commit(session, lambda: _delete_artifacts(keys))
    return True


def _delete_artifacts(keys: list[str]) -> None:
    store = get_store()
    for key in keys:
        store.delete(key)


def succeed(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    storage_key: str,
    trained_tokens: int,
    result_files: list[str],
) -> str | None:
    """Mark the job succeeded and register its model, in the caller's transaction. Returns the model id.

    One conditional UPDATE decides: a cancel or pause that committed first leaves nothing to publish, and
    one that comes later finds the job finished. The model row, and the results file (the step metrics
    as CSV, added to `result_files` as OpenAI's jobs list theirs), are written only by the winner.
    """
    job = session.get(Job, job_id)  # its model and suffix, which never change, name the model
    if job is None:
        return None
    model_id = model_service.fine_tuned_model_id(job)
    results_file_id = file_service.new_file_id()
    published = session.execute(
        _owned(job_id, attempt).values(
            status="succeeded",
            fine_tuned_model=model_id,
            finished_at=db_now(),
            trained_tokens=trained_tokens,
            result_files=[results_file_id, *result_files],  # the CSV first, then the caller's
            lease_expires_at=None,
        )
    )
    if published.rowcount != 1:  # type: ignore[attr-defined]
        return None
    webhooks.enqueue(session, job_id=job_id, type="fine_tuning.job.succeeded")
    file_service.add_results_file(
        session,
        project=job.project,
        file_id=results_file_id,
        filename=results.RESULTS_FILENAME,
        content=results.results_csv(session, job_id=job_id),
    )
    model_service.add_fine_tuned_model(
        session,
        model_id=model_id,
        project=job.project,
        base_model=job.model,
        job_id=job_id,
        storage_key=storage_key,
    )
    job_service.add_event(session, job_id=job_id, message=f"New fine-tuned model created: {model_id}")
    job_service.add_event(session, job_id=job_id, message="The job has successfully completed.")
    return model_id


def queues_of(session: Session, *, job_ids: list[str], default: str) -> list[tuple[str, str]]:
    """Each job with the queue it was created for; `default` for jobs from before queues were recorded."""
    rows = session.execute(select(Job.id, func.coalesce(Job.queue, default)).where(Job.id.in_(job_ids)))
    return [(job_id, queue) for job_id, queue in rows]


def queues_waited_on(session: Session, *, default: str) -> set[str]:
    """The queues that queued jobs were sent to."""
    queue = func.coalesce(Job.queue, default)
    return set(session.scalars(select(queue).where(Job.status == "queued").distinct()))


def mark_sent(session: Session, *, job_ids: list[str]) -> None:
    """Remember when each job's message last went out."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(sent_at=db_now()))


def reconcile(
    session: Session,
    *,
    resend_after_seconds: float,
    empty_queues: Collection[str] = (),
    default_queue: str = "",
    settle_seconds: float = 0,
) -> list[str]:
    """Re-queue jobs whose lease expired (failing those out of attempts) and pick queued jobs to re-send.

    A queued job's message is re-sent when it went out over `resend_after_seconds` ago, or, when the
    broker holds nothing on its queue (it is in `empty_queues`: its message cannot still be waiting, so a
    flushed or restarted broker lost it, or the sender died between its commit and its send), over
    `settle_seconds` ago; a job re-queued here is sent at once. Every writer that queues a job stamps
    `sent_at` in the same commit, so a reconciler never races the sender it is about to follow. Jobs
    recorded with no queue count as on `default_queue`. Returns the ids whose message should go out now,
    each to its own queue; a duplicate is harmless, since only one claim wins.

    Each expired job is changed by a conditional UPDATE that repeats the expiry test against the
    database's clock, with the attempt it was read at: a job that renewed, finished or moved on since it
    was listed is left alone.
    """
    expired = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts).where(
            Job.status == "running", Job.lease_expires_at < db_now()
        )
    ).all()
    for job_id, attempt, max_attempts in expired:
        still_expired = update(Job).where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.status == "running",
            Job.lease_expires_at < db_now(),
        )
        if attempt >= max_attempts:
            message = (
                f"The worker running attempt {attempt} stopped answering, and the job has used all "
                f"{max_attempts} attempts."
            )
            error = {"code": "max_attempts_exceeded", "param": None, "message": message}
            done = session.execute(
                still_expired.values(
                    status="failed", finished_at=db_now(), lease_expires_at=None, error=error
                )
            )
            level, message = "error", f"Job failed: {message}"
        else:
            done = session.execute(
                # sent_at NULL: this pass sends it (below), whatever the age of the job's last message
                still_expired.values(status="queued", lease_owner=None, lease_expires_at=None, sent_at=None)
            )
            level = "warn"
            message = f"The worker of attempt {attempt} stopped renewing its lease; job re-queued."
        if done.rowcount == 1:  # type: ignore[attr-defined]
            job_service.add_event(session, job_id=job_id, level=level, message=message)
            if attempt >= max_attempts:  # failed for good, rather than re-queued
                webhooks.enqueue(session, job_id=job_id, type="fine_tuning.job.failed")
    on_empty_queue = func.coalesce(Job.queue, default_queue).in_(empty_queues)
    lost = and_(on_empty_queue, Job.sent_at < db_now(-settle_seconds))
    due = list(
        session.scalars(
            select(Job.id).where(
                Job.status == "queued",
                or_(Job.sent_at.is_(None), Job.sent_at < db_now(-resend_after_seconds), lost),
            )
        )
    )
    session.flush()
    return due
