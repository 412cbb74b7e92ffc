"""The worker's liveness signal for container healthchecks: a heartbeat file, not a question to the worker.

The worker runs Celery's solo pool, so while a job trains its one consumer thread is busy in the runner
and `celery inspect ping` goes unanswered: a healthy, busy worker would look dead. Instead the worker
starts a daemon thread (`start_heartbeat()`, from its `worker_init` handler) that touches a file under
TUNEFORGE_HOME every few seconds, and the healthcheck reads the file's age:

    python -m worker.health                  # exit 0 if fresh; else 1, and why
    python -m worker.health --max-age 120 --file /data/health/worker-myhost.heartbeat

The file is named after the host, so workers sharing one volume (one container each) do not vouch for
each other. A fresh file shows the worker process is alive and its interpreter not wedged; it does not
show the broker or database are reachable (a worker that stops renewing its job leases is the
reconciler's to handle). Imports nothing heavy: the check runs every 30 s in the worker's container.
"""

import argparse
import logging
import os
import socket
import threading
import time
from pathlib import Path

from app.config import get_settings

INTERVAL_SECONDS = 10.0
# Six missed beats: a busy machine can delay a thread a few seconds, never a minute.
MAX_AGE_SECONDS = 60.0

log = logging.getLogger(__name__)


def heartbeat_path() -> Path:
    """This host's heartbeat file under TUNEFORGE_HOME."""
    return get_settings().resolved_home / "health" / f"worker-{socket.gethostname()}.heartbeat"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def start_heartbeat(path: Path | None = None, interval: float = INTERVAL_SECONDS) -> threading.Thread:
    """Touch the heartbeat file now and then every `interval` seconds, from a daemon thread."""
    target = path or heartbeat_path()
    _touch(target)  # at once, so a failure to write shows at start and the first check passes

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                _touch(target)
            except OSError:  # e.g. a full disk: the file goes stale and the check says so
                log.exception("could not touch the worker heartbeat file %s", target)

    thread = threading.Thread(target=beat, name="tuneforge-heartbeat", daemon=True)
    thread.start()
    return thread


def worker_id() -> str:
    """This worker as its heartbeat row and its job leases name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _announce() -> None:
    from app.db.session import session_scope
    from app.jobs import routing

    with session_scope() as session:
        routing.announce(
            session, worker_id=worker_id(), queue=get_settings().queue, offer=routing.this_worker()
        )


def start_announcing() -> threading.Thread:
    """Renew this worker's row in the `workers` table (what it has, for routing) every heartbeat."""

    def beat() -> None:
        while True:
            try:
                _announce()
            except Exception:  # the database is away: the row ages, and routing stops counting on it
                log.warning("could not announce this worker", exc_info=True)
            time.sleep(get_settings().heartbeat_seconds)

    thread = threading.Thread(target=beat, name="tuneforge-announce", daemon=True)
    thread.start()
    return thread


def retire() -> None:
    """Remove this worker's row as it stops (a killed worker's row ages out instead)."""
    from app.db.session import session_scope
    from app.jobs import routing

    try:
        with session_scope() as session:
            routing.retire(session, worker_id=worker_id())
    except Exception:
        log.warning("could not remove this worker's row", exc_info=True)


def check(path: Path, max_age: float = MAX_AGE_SECONDS) -> str | None:
    """None if the heartbeat file is fresh, else what is wrong."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return f"no worker heartbeat at {path}: the worker has not started yet, or runs elsewhere"
    if age > max_age:
        return f"worker heartbeat {path} is {age:.0f} s old (max {max_age:.0f}): the worker is stuck or gone"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.health", description="Exit 0 if the worker heartbeat file is fresh, else 1."
    )
    parser.add_argument("--file", type=Path, help="Heartbeat file; default: this host's, in TUNEFORGE_HOME.")
    parser.add_argument("--max-age", type=float, default=MAX_AGE_SECONDS, help="Seconds a beat stays fresh.")
    args = parser.parse_args(argv)
    path = args.file or heartbeat_path()
    problem = check(path, args.max_age)
    print(problem or f"worker heartbeat {path} is fresh")
    return 1 if problem else 0


if __name__ == "__main__":
    raise SystemExit(main())
