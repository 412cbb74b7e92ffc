"""Runs one job on this worker: claim it, train in a child process, heartbeat the lease, clean up.

The parent never imports torch; it starts the child (worker/launcher.py) and watches:
- The child dies with the worker, so a killed worker never leaves a run behind that could overlap the
  next attempt.
- On worker shutdown (SIGTERM) the child is told to checkpoint and stop, and the job is re-queued; the
  next attempt resumes from that checkpoint. Preemptions do not use up `max_attempts`.
- A child that dies without recording an error (killed, segfault, the OOM killer) is retried while
  attempts remain, each retry resuming from the last checkpoint; then the job fails with the last error.
- If the database cannot be reached, the child keeps training while the lease may still be valid; past
  that it is stopped, since the reconciler may by then have given the job to another worker.
"""

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import Job
from app.jobs import lifecycle
from app.queue import send_jobs
from worker.launcher import TrainingProcess, wait_until_ready
from worker.train_job import EXIT_PREEMPTED

log = logging.getLogger(__name__)
CANCEL_GRACE_SECONDS = 30
POLL_SECONDS = 0.5
# Set when the worker starts a warm shutdown (worker/tasks.py connects it to Celery's signal).
SHUTDOWN = threading.Event()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_job(job_id: str) -> None:
    """Claim and run `job_id`; a job that is not queued (a duplicate message) is left alone."""
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    wait_until_ready()  # before the claim: the lease starts running there
    with session_scope() as session:
        attempt = lifecycle.claim(session, job_id=job_id, owner=owner, lease_seconds=settings.lease_seconds)
    if attempt is None:
        log.info("job %s is not queued; nothing to do", job_id)
        return
    workdir = settings.resolved_home / "work" / job_id / f"attempt-{attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "train.log"
    returncode = _watch(TrainingProcess(job_id, attempt, log_path), job_id=job_id, attempt=attempt)
    if returncode in (0, None):
        return
    with session_scope() as session:
        if returncode == EXIT_PREEMPTED:
            requeued = lifecycle.requeue(
                session,
                job_id=job_id,
                attempt=attempt,
                counts=False,
                message="The worker shut down; the job is re-queued and resumes from its last checkpoint.",
            )
        else:
            requeued = _retry_or_fail(session, job_id, attempt, returncode, _log_tail(log_path))
        session.commit()
        if requeued:
            send_jobs(session, [job_id])  # if this send is lost, the reconciler sends it


def _retry_or_fail(session, job_id: str, attempt: int, returncode: int, tail: str) -> bool:  # type: ignore[no-untyped-def]
    """A crashed child: re-queue while attempts remain (True), else fail with its error."""
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    if returncode == -signal.SIGKILL:
        how += " (the out-of-memory killer does this: try a smaller batch_size or qlora)"
    message = f"The training process {how}. Last log lines: {tail}"
    job = session.get(Job, job_id)
    if job is not None and job.attempt == attempt and job.status == "running" and attempt < job.max_attempts:
        return lifecycle.requeue(
            session,
            job_id=job_id,
            attempt=attempt,
            counts=True,
            message=f"{message} Retrying (attempt {attempt} of {job.max_attempts} used).",
        )
    if job is not None and attempt >= job.max_attempts:
        message = f"{message} The job has used all {job.max_attempts} attempts."
    lifecycle.fail(session, job_id=job_id, attempt=attempt, code="training_crashed", message=message)
    return False


def _watch(child: TrainingProcess, *, job_id: str, attempt: int) -> int | None:
    """Heartbeat the lease until the child exits; stop it on cancel, shutdown, timeout or lost database.

    Returns the child's exit code, or None when this attempt no longer owns the job.
    """
    settings = get_settings()
    deadline = time.monotonic() + settings.job_timeout_seconds
    renewed = time.monotonic()
    preempt_deadline: float | None = None
    while True:
        returncode = _wait(child, settings.heartbeat_seconds, until_shutdown=preempt_deadline is None)
        if returncode is not None:
            return returncode
        now = time.monotonic()
        if SHUTDOWN.is_set() and preempt_deadline is None:
            log.info("worker shutting down: asking job %s to checkpoint and stop", job_id)
            child.stop()
            preempt_deadline = now + settings.shutdown_grace_seconds
        if preempt_deadline is not None and now > preempt_deadline:
            log.warning("job %s did not checkpoint within the grace period; stopping it", job_id)
            child.kill()
            return EXIT_PREEMPTED  # re-queued all the same: it resumes from its last complete checkpoint
        try:
            with session_scope() as session:
                owned = lifecycle.renew_lease(
                    session, job_id=job_id, attempt=attempt, lease_seconds=settings.lease_seconds
                )
            renewed = now
        except Exception:  # the database is away: the lease stands until it would have expired
            log.exception("could not renew the lease of job %s", job_id)
            if now - renewed > settings.lease_seconds * 0.8:
                log.error("job %s: lease about to expire without the database; stopping the run", job_id)
                child.kill()
                return None
            continue
        if not owned:  # cancelled, paused or superseded: the child stops at its next step, or is killed
            if child.wait(CANCEL_GRACE_SECONDS) is None:
                child.kill()
            return None
        if now > deadline:
            child.kill()
            with session_scope() as session:
                lifecycle.fail(
                    session,
                    job_id=job_id,
                    attempt=attempt,
                    code="timeout",
                    message=f"Training ran longer than {settings.job_timeout_seconds} s and was stopped.",
                )
            return None


def _wait(child: TrainingProcess, seconds: float, *, until_shutdown: bool) -> int | None:
    """The child's exit code if it exits within `seconds`, else None; sooner if the worker shuts down."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if (returncode := child.wait(min(left, POLL_SECONDS))) is not None:
            return returncode
        if until_shutdown and SHUTDOWN.is_set():
            return None
    return None
