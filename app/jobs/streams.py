"""Live streams of a job: its events as Server-Sent Events, and its run's log as the run writes it.

A stream never holds a database connection while it waits; it re-reads the table in a short session
each time it wakes. On Postgres it wakes when one of its job's events commits: the insert sends a
NOTIFY (app/db/session.py) and one LISTEN connection per API process rings the streams of that job.
SQLite has no notifications, so there a stream re-reads every quarter second (a local file: cheap).
Either way a re-read finds whatever was committed, so a lost notification (the listening connection
dropped) delays events by at most the fallback interval and never loses one.
"""

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import psycopg
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sse_starlette import ServerSentEvent

from app.config import get_settings
from app.db.session import EVENTS_CHANNEL, session_scope
from app.db.tables import Job, JobEvent
from app.jobs import service as job_service
from app.storage import get_store

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
SQLITE_POLL_SECONDS = 0.25
# On Postgres a stream waits for a notification, re-reading after this long without one all the same.
NOTIFIED_POLL_SECONDS = 5.0
PAGE = 500  # events per read
LOG_POLL_SECONDS = 0.2
# A log follower stops once its attempt is over and the file has not grown for this long (a stopped
# run prints its last lines just after the job's status changes).
LOG_SETTLE_SECONDS = 2.0


class Bell:
    """Rings the streams of a job when its events commit: one LISTEN connection per process, lazily."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None

    def subscribe(self, job_id: str) -> asyncio.Event:
        """An asyncio event set whenever one of the job's events commits (until unsubscribed)."""
        rung = asyncio.Event()
        with self._lock:
            self._waiting[job_id].add((asyncio.get_running_loop(), rung))
            if self._listener is None and _postgres_url() is not None:
                self._listener = threading.Thread(target=self._listen_forever, name="event-bell", daemon=True)
                self._listener.start()
        return rung

    def unsubscribe(self, job_id: str, rung: asyncio.Event) -> None:
        with self._lock:
            waiting = self._waiting.get(job_id, set())
            waiting.difference_update({entry for entry in waiting if entry[1] is rung})
            if not waiting:
                self._waiting.pop(job_id, None)

    def ring(self, job_id: str) -> None:
        with self._lock:
            waiting = list(self._waiting.get(job_id, ()))
        for loop, rung in waiting:
            loop.call_soon_threadsafe(rung.set)

    def _listen_forever(self) -> None:
        url = _postgres_url()
        assert url is not None
        while True:
            try:
                with psycopg.connect(url, autocommit=True) as connection:
                    connection.execute(f"LISTEN {EVENTS_CHANNEL}")
                    for notice in connection.notifies():
                        self.ring(notice.payload)
            except Exception:  # streams fall back to re-reading on a timer meanwhile
                log.warning("lost the event notification connection; reconnecting", exc_info=True)
                time.sleep(1)


BELL = Bell()


def _postgres_url() -> str | None:
    """The database's libpq URL when it is Postgres (notifications); None for SQLite."""
    url = make_url(get_settings().resolved_database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _events_after(job_id: str, seq: int) -> tuple[str | None, list[JobEvent]]:
    """The job's status, then its events after `seq`, oldest first: read in that order, every event
    committed with (or before) a final status is among those returned."""
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > seq)
            .order_by(JobEvent.seq)
            .limit(PAGE)
        )
        return status, list(rows)


async def event_stream(job_id: str, after_seq: int) -> AsyncIterator[ServerSentEvent]:
    """The job's events after `after_seq` as they are written, each with its id; ends after the final
    status event."""
    poll = NOTIFIED_POLL_SECONDS if _postgres_url() else SQLITE_POLL_SECONDS
    rung = BELL.subscribe(job_id)
    try:
        while True:
            rung.clear()  # before reading: a commit after the read rings again
            status, rows = await run_in_threadpool(_events_after, job_id, after_seq)
            for row in rows:
                event = job_service.event_to_public(row)
                yield ServerSentEvent(data=event.model_dump_json(), id=event.id)
                after_seq = row.seq
            if len(rows) == PAGE:
                continue
            if status is None or status in FINISHED:
                return
            try:
                await asyncio.wait_for(rung.wait(), poll)
            except TimeoutError:
                pass
    finally:
        BELL.unsubscribe(job_id, rung)


def _attempt_over(job_id: str, attempt: int) -> bool:
    """Whether attempt `attempt` of the job can write no more: a later one began, or the job stopped
    without starting it."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return True
        if job.attempt == attempt:
            return job.status != "running"
        return job.attempt > attempt or job.status not in ("queued", "running", "paused")


async def follow_log(job_id: str, attempt: int, key: str) -> AsyncIterator[bytes]:
    """The attempt's log from its start, then each new line as the run writes it, until it is over."""
    offset, quiet_since, checked = 0, time.monotonic(), 0.0
    while True:
        chunk = await run_in_threadpool(get_store().read_from, key, offset)
        now = time.monotonic()
        if chunk:
            offset, quiet_since = offset + len(chunk), now
            yield chunk
            continue
        if now - checked >= 1.0:  # the database, once a second; the file, five times a second
            checked = now
            if (
                await run_in_threadpool(_attempt_over, job_id, attempt)
                and now - quiet_since >= LOG_SETTLE_SECONDS
            ):
                return
        await asyncio.sleep(LOG_POLL_SECONDS)
