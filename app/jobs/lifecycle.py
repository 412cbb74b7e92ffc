"""Job state transitions on the worker side, each one conditional UPDATE fenced by the attempt number.

A worker owns a job only while its attempt is the job's attempt and the job is `running`: a second
delivery, a cancel, or a newer attempt makes every later write of the old attempt a no-op.
"""

from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db.tables import Checkpoint, Job, utcnow
from app.jobs import service as job_service
from app.models import service as model_service


def claim(session: Session, *, job_id: str, owner: str, lease_seconds: int) -> int | None:
    """Take a queued job: bump its attempt and set a lease. Returns the attempt, or None if not claimable."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempt=Job.attempt + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
        )
        .returning(Job.attempt)
    )
    attempt = result.scalar_one_or_none()
    if attempt is None:
        return None
    session.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=now))
    job_service.add_event(
        session, job_id=job_id, message=f"Fine-tuning job started (attempt {attempt}, {owner})."
    )
    return attempt


def _owned(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
    return update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")


def renew_lease(session: Session, *, job_id: str, attempt: int, lease_seconds: int) -> bool:
    """Extend the lease; False means this attempt no longer owns the job (cancelled or superseded)."""
    result = session.execute(
        _owned(job_id, attempt).values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def still_owned(session: Session, *, job_id: str, attempt: int) -> bool:
    """True while this attempt may keep training."""
    return attempt_status(session, job_id=job_id, attempt=attempt) == "running"


def attempt_status(session: Session, *, job_id: str, attempt: int) -> str | None:
    """The job's status as attempt `attempt` sees it: None once a newer attempt has superseded it."""
    job = session.get(Job, job_id)
    return job.status if job is not None and job.attempt == attempt else None


def requeue(session: Session, *, job_id: str, attempt: int, message: str, counts: bool) -> bool:
    """Put a job this attempt owns back in the queue; the next attempt resumes from its last checkpoint.

    `counts=False` (a worker shutting down, not a failure of the job) gives the attempt back, so that
    preemptions never use up `max_attempts`; the attempt number itself still grows, for fencing.
    """
    values: dict[str, Any] = {"status": "queued", "lease_owner": None, "lease_expires_at": None}
    values["sent_at"] = None  # the reconciler sends it if the caller's own send is lost
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
            finished_at=utcnow(),
            lease_expires_at=None,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
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
) -> bool:
    """Add a checkpoint row whose files are already in the store (a pausing job still saves its last one)."""
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
    return True


def succeed(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    storage_key: str,
    trained_tokens: int,
    result_files: list[str],
) -> str | None:
    """Mark the job succeeded and register its model, in the caller's transaction. Returns the model id."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.attempt != attempt or job.status != "running":
        return None
    model_id = job_service.fine_tuned_model_id(job)
    model_service.add_fine_tuned_model(
        session,
        model_id=model_id,
        project=job.project,
        base_model=job.model,
        job_id=job.id,
        storage_key=storage_key,
    )
    job.status, job.fine_tuned_model, job.finished_at = "succeeded", model_id, utcnow()
    job.trained_tokens, job.result_files, job.lease_expires_at = trained_tokens, result_files, None
    job_service.add_event(session, job_id=job_id, message=f"New fine-tuned model created: {model_id}")
    job_service.add_event(session, job_id=job_id, message="The job has successfully completed.")
    session.flush()
    return model_id


def mark_sent(session: Session, *, job_ids: list[str]) -> None:
    """Remember when each job's message last went out."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(sent_at=utcnow()))


def reconcile(
    session: Session, *, resend_after_seconds: float, queue_empty: bool = False, settle_seconds: float = 0
) -> list[str]:
    """Re-queue jobs whose lease expired (failing those out of attempts) and pick queued jobs to re-send.

    A queued job's message is re-sent when it went out over `resend_after_seconds` ago, or, when the
    broker's queue is known to be empty (`queue_empty`: its message cannot still be waiting, so a flushed
    or restarted broker lost it), over `settle_seconds` ago. Returns the ids whose message should go out
    now; a duplicate is harmless, since only one claim wins.
    """
    now = utcnow()
    expired = session.scalars(
        select(Job)
        .where(Job.status == "running", Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    )
    for job in expired:
        if job.attempt >= job.max_attempts:
            job.status, job.finished_at, job.lease_expires_at = "failed", now, None
            job.error = {
                "code": "max_attempts_exceeded",
                "param": None,
                "message": f"The worker running attempt {job.attempt} stopped answering, and the job "
                f"has used all {job.max_attempts} attempts.",
            }
            job_service.add_event(
                session, job_id=job.id, level="error", message=f"Job failed: {job.error['message']}"
            )
        else:
            job.status, job.lease_owner, job.lease_expires_at = "queued", None, None
            job_service.add_event(
                session,
                job_id=job.id,
                level="warn",
                message=f"The worker of attempt {job.attempt} stopped renewing its lease; job re-queued.",
            )
    stale = now - timedelta(seconds=settle_seconds if queue_empty else resend_after_seconds)
    due = list(
        session.scalars(
            select(Job.id).where(Job.status == "queued", or_(Job.sent_at.is_(None), Job.sent_at < stale))
        )
    )
    session.flush()
    return due
