"""The migrated schema is exactly the ORM's (worker/tables.py), on PostgreSQL."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from worker.db import engine_for
from worker.migrate import head_revision, is_up_to_date, upgrade_database
from worker.tables import Base


def test_migrated_schema_matches_the_orm(database_url):
    with engine_for(database_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []
        assert is_up_to_date(conn)


def test_upgrade_is_idempotent(database_url):
    assert upgrade_database(database_url) == head_revision() == "0002"
