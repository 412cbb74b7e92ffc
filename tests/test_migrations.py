"""Alembic: one head, upgrade from empty, downgrade/upgrade round trip, and tables matching the models."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, inspect, text

from app.db import migrate
from app.db.tables import Base
from tests.helpers import fresh_database


def test_single_head() -> None:
    assert len(ScriptDirectory.from_config(migrate.alembic_config()).get_heads()) == 1


def test_postgres_schema_matches_models(database: str) -> None:
    engine = create_engine(database)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_sqlite_upgrade_downgrade_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'round-trip.db'}"
    migrate.upgrade(url)
    engine = create_engine(url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    migrate.downgrade(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


@pytest.fixture
def empty_postgres(database: str) -> Iterator[str]:
    """A fresh, empty database next to the test one (`<name>_alembic`), dropped afterwards."""
    with fresh_database(database, "alembic") as fresh:
        yield fresh


def _enum_types(connection: Connection) -> set[str]:
    query = "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
    query += "WHERE t.typtype = 'e' AND n.nspname = 'public'"
    return set(connection.scalars(text(query)))


def test_postgres_upgrade_downgrade_round_trip(empty_postgres: str) -> None:
    """Empty -> head -> base -> head on Postgres: tables match the models at head, none is left at base."""
    engine = create_engine(empty_postgres)
    migrate.upgrade(empty_postgres)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    migrate.downgrade(empty_postgres)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
        assert _enum_types(connection) == set()
    migrate.upgrade(empty_postgres)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
        assert MigrationContext.configure(connection).get_current_heads() == tuple(heads)
    engine.dispose()
