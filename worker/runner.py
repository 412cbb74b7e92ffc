"""Runs one job on this worker: claim it, train in a child process, heartbeat the lease, clean up.

The parent never imports torch; it starts the child (worker/launcher.py) and watches:
- The child dies with the worker, so a killed worker never leaves a run behind that could overlap the
  next attempt.
- On worker shutdown (SIGTERM) the child is told to checkpoint and stop, and the job is re-queued; the
  next attempt resumes from that checkpoint. Preemptions do not use up `max_attempts`.
- A child that dies without recording an error (killed, segfault, the OOM killer) is retried while
  attempts remain, each retry resuming from the last checkpoint; then the job fails with the last error.
  A child that found its disk full is retried the same way, and out of attempts fails with `disk_full`.
- A cancelled run stops at the end of its step, or is killed `stop_grace_seconds` later: it keeps
  nothing. A paused run is never killed for being slow: it is waited for until it has saved the
  checkpoint it announced at the end of its step, however long that step takes. Only the job's timeout
  and the worker's own shutdown grace bound that wait (or a resume, after which that checkpoint would
  no longer be recorded).
- If the database cannot be reached, the child keeps training while the lease may still be valid; past
  that it is stopped, since the reconciler may by then have given the job to another worker.
- The attempt's work folder (Trainer's checkpoints, the unpacked resume state) is removed when the
  attempt ends; one left by a killed worker goes when this machine next runs a job. The run's output
  goes straight into the artifact store (app/storage.py log_key), where users read and follow it.
"""

import contextlib
import logging
import shutil
import signal
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import logs
from app.config import get_settings
from app.db.session import session_scope
from app.db.tables import Job
from app.jobs import lifecycle, routing
from app.jobs import service as job_service
from app.queue import send_jobs
from app.storage import get_store, log_key
from worker import health
from worker.launcher import TrainingProcess, wait_until_ready
from worker.train_job import DISK_FULL, EXIT_DISK_FULL, EXIT_PREEMPTED

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
DISK_FULL_SEARCH_BYTES = 64 * 1024  # the end of a log that holds the disk-full line and its traceback
# Set when the worker starts a warm shutdown (worker/tasks.py connects it to Celery's signal).
SHUTDOWN = threading.Event()
PAUSE_CUT_SHORT = (
    "The paused run was still in its step when {why}, and was stopped before its checkpoint; resuming "
    "continues from the last checkpoint saved before."
)


def _log_tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-5:]
    except OSError:
        return []


def run_job(woken_for: str) -> None:
    """A job's message wakes the worker; it then runs the best queued job of its queue that it can hold
    (that job, or one that should go first: app/jobs/routing.py), and the next, until none is left or the
    worker stops. A message whose job has gone (a duplicate, or run already) finds nothing, or the next."""
    owner = health.worker_id()
    wait_until_ready()  # before the claim: the lease starts running there
    while not SHUTDOWN.is_set():
        claimed = _claim_best(owner)
        if claimed is None:
            log.info("woken for job %s: no queued job this worker can hold", woken_for)
            return
        job_id, attempt = claimed
        if job_id != woken_for:
            log.info(
                "woken for job %s, running job %s: the best queued job this worker can hold",
                woken_for,
                job_id,
            )
        with logs.bound(job_id=job_id, attempt=attempt):
            _run_attempt(job_id, attempt)


def _claim_best(owner: str) -> tuple[str, int] | None:
    """Claim the first job of `routing.claimable` that no other worker claims first."""
    settings = get_settings()
    with session_scope() as session:
        for job_id in routing.claimable(session, queue=settings.queue, offer=routing.this_worker()):
            attempt = lifecycle.claim(
                session, job_id=job_id, owner=owner, lease_seconds=settings.lease_seconds
            )
            if attempt is not None:
                return job_id, attempt
    return None


def _run_attempt(job_id: str, attempt: int) -> None:
    """Train attempt `attempt` of the claimed job in a child process, and settle how it ended."""
    settings = get_settings()
    log.info("running attempt %d of job %s", attempt, job_id)
    work = settings.resolved_home / "work"
    _remove_stale_workdirs(work)
    workdir = work / job_id / f"attempt-{attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = get_store().appendable(log_key(job_id, attempt))
    with session_scope() as session:
        job = session.get(Job, job_id)
        gpus = int(((job.resources if job else None) or {}).get("gpus", 1))
    try:
        child = TrainingProcess(job_id, attempt, log_path, gpus=gpus)
        returncode = _watch(child, job_id=job_id, attempt=attempt)
    finally:
        _remove_workdir(workdir)
        _sync_log(job_id, attempt)
    tail = _log_tail(log_path)
    cause = _disk_full_cause(log_path) if returncode == EXIT_DISK_FULL else None
    _sync_log(job_id, attempt, done=True)
    log.info("attempt %d of job %s ended (exit code %s)", attempt, job_id, returncode)
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
            code, message = _failure(returncode, tail, cause)
            requeued = _retry_or_fail(session, job_id, attempt, code=code, message=message)
        session.commit()
        if requeued:
            send_jobs(session, [job_id])  # if this send is lost, the reconciler sends it


def _sync_log(job_id: str, attempt: int, done: bool = False) -> None:
    """Put the run's log in an object store as it grows (every heartbeat, and at the end): readers on
    other hosts see it up to the last heartbeat. The local store needs nothing: the log is written there."""
    try:
        get_store().sync(log_key(job_id, attempt), done=done)
    except Exception:  # the store is away for now: the next heartbeat uploads what this one could not
        log.warning("could not upload the log of job %s", job_id, exc_info=True)


def _disk_full_cause(path: Path) -> str | None:
    """The write a run that found the disk full names in its log (before its traceback), if the log's
    disk had room for that line."""
    try:
        with path.open("rb") as log:
            log.seek(max(path.stat().st_size - DISK_FULL_SEARCH_BYTES, 0))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    said = next((line for line in reversed(lines) if DISK_FULL in line), None)
    return said.split(DISK_FULL, 1)[1] if said else None


def _failure(returncode: int, tail: list[str], disk_full_cause: str | None = None) -> tuple[str, str]:
    """The error code and message of an attempt whose training process exited with `returncode`."""
    if returncode == EXIT_DISK_FULL:
        cause = f" ({disk_full_cause})" if disk_full_cause else ""
        return "disk_full", (
            f"The disk filled up{cause}: a checkpoint or the trained model could not be written, on the "
            "worker or into the artifact store. Free some space there."
        )
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    if returncode == -signal.SIGKILL:
        how += " (the out-of-memory killer does this: try a smaller batch_size or qlora)"
    return "training_crashed", f"The training process {how}. Last log lines: {' | '.join(tail)}"


def _retry_or_fail(session: Session, job_id: str, attempt: int, *, code: str, message: str) -> bool:
    """A failed attempt: re-queue while attempts remain (True), else fail the job with `code`."""
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
    lifecycle.fail(session, job_id=job_id, attempt=attempt, code=code, message=message)
    return False


def _remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the job's folder, once no attempt of it is left here
        workdir.parent.rmdir()


def _remove_stale_workdirs(work: Path) -> None:
    """Remove the work folders of attempts that are over, such as one a killed worker left behind.

    Folders are listed before the jobs are read: a folder is made only after its attempt's claim has
    committed, so every attempt listed is seen as it is now, and a live one (running, or paused and
    saving its checkpoint) is kept.
    """
    folders = [f for f in work.glob("*/attempt-*") if f.name.removeprefix("attempt-").isdigit()]
    if not folders:
        return
    with session_scope() as session:
        live = set(
            session.execute(
                select(Job.id, Job.attempt).where(
                    Job.id.in_({f.parent.name for f in folders}), Job.status.in_(("running", "paused"))
                )
            ).tuples()
        )
    for folder in folders:
        if (folder.parent.name, int(folder.name.removeprefix("attempt-"))) not in live:
            _remove_workdir(folder)


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
        _sync_log(job_id, attempt)
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
        if not owned:  # cancelled, paused or superseded: the child stops at the end of its step
            _wind_down(
                child, job_id=job_id, attempt=attempt, deadline=deadline, shutdown_end=preempt_deadline
            )
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


def _wind_down(
    child: TrainingProcess, *, job_id: str, attempt: int, deadline: float, shutdown_end: float | None
) -> None:
    """Wait for a run this attempt no longer owns to stop on its own, or kill it.

    Paused, the run saves the checkpoint it announced at the end of its step: it is waited for as long as
    that takes, up to the job's `deadline`, or `shutdown_grace_seconds` once the worker shuts down. Any
    other way (cancelled, superseded, or resumed while it was still in its step, when its checkpoint would
    no longer be recorded) it keeps nothing, and gets `stop_grace_seconds`.
    """
    settings = get_settings()
    grace_end: float | None = None
    while True:
        now = time.monotonic()
        if grace_end is None and _status(job_id, attempt) not in ("paused", "unknown"):
            grace_end = now + settings.stop_grace_seconds
        if shutdown_end is None and SHUTDOWN.is_set():
            child.stop()  # it still saves at the end of its step, as a paused run does
            shutdown_end = now + settings.shutdown_grace_seconds
        end = min(t for t in (grace_end, shutdown_end, deadline) if t is not None)
        if now >= end:
            if grace_end is None:
                why = "the worker shut down" if end == shutdown_end else "the job's timeout came"
                _warn(job_id, PAUSE_CUT_SHORT.format(why=why))
            child.kill()
            return
        exited = _wait(child, min(end - now, settings.heartbeat_seconds), until_shutdown=shutdown_end is None)
        if exited is not None:
            return


def _status(job_id: str, attempt: int) -> str | None:
    """The job's status as `attempt` sees it (None: superseded), or 'unknown' while the database is away."""
    try:
        with session_scope() as session:
            return lifecycle.attempt_status(session, job_id=job_id, attempt=attempt)
    except Exception:
        log.warning("could not read the status of job %s", job_id, exc_info=True)
        return "unknown"


def _warn(job_id: str, message: str) -> None:
    """An event for the job's user; lost, not fatal, while the database is away."""
    try:
        with session_scope() as session:
            job_service.add_event(session, job_id=job_id, level="warn", message=message)
    except Exception:
        log.warning("could not record event %r", message, exc_info=True)


def _wait(child: TrainingProcess, seconds: float, *, until_shutdown: bool) -> int | None:
    """The child's exit code if it exits within `seconds`, else None; sooner if the worker shuts down."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if (returncode := child.wait(min(left, POLL_SECONDS))) is not None:
            return returncode
        if until_shutdown and SHUTDOWN.is_set():
            return None
    return None
