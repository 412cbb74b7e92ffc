"""Runs one job on this worker: claim it, train in a child process, heartbeat the lease, clean up.

The parent never imports torch; it only watches. A child that dies without recording an error
(killed, segfault, OOM-killer) is turned into `failed` with the tail of its log.
"""

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.config import get_settings
from app.db.session import session_scope
from app.jobs import lifecycle

log = logging.getLogger(__name__)
CANCEL_GRACE_SECONDS = 30


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_job(job_id: str) -> None:
    """Claim and run `job_id`; a job that is not queued (a duplicate message) is left alone."""
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    with session_scope() as session:
        attempt = lifecycle.claim(session, job_id=job_id, owner=owner, lease_seconds=settings.lease_seconds)
    if attempt is None:
        log.info("job %s is not queued; nothing to do", job_id)
        return
    workdir = settings.resolved_home / "work" / job_id / f"attempt-{attempt}"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "train.log"
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "worker.train_job", job_id, str(attempt)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
        returncode = _watch(child, job_id=job_id, attempt=attempt)
    if returncode not in (0, None):
        with session_scope() as session:
            lifecycle.fail(
                session,
                job_id=job_id,
                attempt=attempt,
                code="training_crashed",
                message=f"The training process exited with code {returncode}. "
                f"Last log lines: {_log_tail(log_path)}",
            )


def _watch(child: subprocess.Popen, *, job_id: str, attempt: int) -> int | None:
    """Heartbeat the lease until the child exits; stop it if the job is cancelled or runs too long."""
    settings = get_settings()
    deadline = time.monotonic() + settings.job_timeout_seconds
    while True:
        try:
            return child.wait(timeout=settings.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            pass
        with session_scope() as session:
            owned = lifecycle.renew_lease(
                session, job_id=job_id, attempt=attempt, lease_seconds=settings.lease_seconds
            )
        if not owned:  # cancelled or superseded: the child stops at its next step; kill it if it lingers
            try:
                child.wait(timeout=CANCEL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return None
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            with session_scope() as session:
                lifecycle.fail(
                    session,
                    job_id=job_id,
                    attempt=attempt,
                    code="timeout",
                    message=f"Training ran longer than {settings.job_timeout_seconds} s and was stopped.",
                )
            return None
