"""Engine and transaction scope. The caller owns the transaction: services flush, this commits."""

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Column, Connection, Engine, create_engine, event, text, update
from sqlalchemy.orm import InstrumentedAttribute, Mapper, Session, sessionmaker

from app.config import get_settings
from app.db.tables import JobEvent

# Postgres NOTIFY channel: the id of a job one of whose events was just committed (app/jobs/streams.py).
EVENTS_CHANNEL = "tuneforge_job_events"

log = logging.getLogger(__name__)


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process: request sessions, /readyz and scripts all share the configured one."""
    return _engine(url or get_settings().resolved_database_url)


@lru_cache
def _engine(url: str) -> Engine:
    settings = get_settings()
    if url.startswith("sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the API read while a worker process writes events.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    session = _session_factory(get_settings().resolved_database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def statement_scope() -> Iterator[Session]:
    """A session whose every statement commits on its own (autocommit), for a write that must hold no
    lock past itself: a training process frozen (SIGSTOP, a paused VM) between an UPDATE of the job's row
    and its COMMIT would otherwise hold the row, and with it every cancel, pause and fence, until it
    thaws."""
    connection = get_engine().connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        with Session(bind=connection) as session:
            yield session
    finally:
        connection.close()


def lock_rows(session: Session, column: InstrumentedAttribute[Any], values: Iterable[Any]) -> set[Any]:
    """Write-lock the rows whose `column` is in `values` until the transaction ends; returns those found.

    A no-op UPDATE, so one code path locks on both databases: Postgres locks the rows, SQLite takes its
    database-wide write lock. Two transactions that lock the same row before checking it run one after
    the other, each seeing what the other committed.
    """
    key: Column[Any] = column.property.columns[0]  # type: ignore[attr-defined]
    # Postgres refuses NUL in text, and no stored id holds one: such a value simply matches nothing.
    wanted = [v for v in values if not (isinstance(v, str) and "\x00" in v)]
    statement = update(key.table).where(key.in_(wanted)).values({key: key}).returning(key)
    return set(session.execute(statement).scalars())


_AFTER_COMMIT = "tuneforge_after_commit"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the session's current transaction has committed; never if it rolls back.

    For what cannot be rolled back, such as deleting stored bytes: done after the commit, a failed
    commit loses nothing.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for action in session.info.pop(_AFTER_COMMIT, []):
        try:
            action()
        except Exception:  # the transaction stands; what was left behind is only logged
            log.exception("an action after commit failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@event.listens_for(JobEvent, "after_insert")
def _notify_event_streams(_mapper: Mapper[JobEvent], connection: Connection, target: JobEvent) -> None:
    notify_event_streams(connection, target.job_id)


def notify_event_streams(connection: Connection, job_id: str) -> None:
    """Wake the streams following this job: Postgres delivers the notification when the transaction
    commits, and drops it if it rolls back. SQLite has no notifications: its streams re-read instead.
    ORM inserts of events call this themselves; a Core insert must."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :job_id)"), {"channel": EVENTS_CHANNEL, "job_id": job_id}
        )
