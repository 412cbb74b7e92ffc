"""Time in the database: one UTC column type, and the database's own clock for leases and status changes.

Every host that touches a job (API replicas, workers, reconcilers) may have a clock of its own; a lease
compared with a clock minutes ahead would look expired while its worker is alive. So lease deadlines and
the times of status changes are computed by the database (`db_now`), never by the process writing them.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, literal
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """This process's clock, in UTC; only for times no other host compares against (created_at)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (the same in Postgres and SQLite); read back as an aware UTC datetime.

    A naive value read back would be taken for local time by `.timestamp()`, shifting every `created_at`
    by the host's offset from UTC.
    """

    impl = DateTime()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if isinstance(value, datetime) and value.tzinfo is not None:
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def coerce_compared_value(self, op: Any, value: Any) -> Any:
        # `created_at - timedelta(...)` binds the timedelta as an interval, as plain DateTime does
        return self.impl_instance.coerce_compared_value(op, value) if isinstance(value, timedelta) else self

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class db_now(FunctionElement[datetime]):  # noqa: N801 - used like a SQL function
    """The database's current UTC time, `plus_seconds` later, as a naive UTC timestamp in SQL."""

    type = UtcDateTime()
    inherit_cache = True

    def __init__(self, plus_seconds: float = 0.0) -> None:
        super().__init__(literal(float(plus_seconds)))


@compiles(db_now, "postgresql")
def _now_postgres(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(timezone('utc', now()) + make_interval(secs => {seconds}))"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff'; %f gives milliseconds only, and
    # the padding keeps the text comparable with (and parsed like) the values SQLAlchemy writes.
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {seconds})) || '000')"
