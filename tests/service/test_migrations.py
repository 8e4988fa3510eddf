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
    assert upgrade_database(database_url) == head_revision() == "0003"


def test_offline_sql_builds_the_same_schema():
    """`alembic upgrade head --sql` (a DBA applies the script by hand) writes every
    migration out, data steps included, and the script builds the ORM's schema."""
    import io
    import uuid

    from alembic import command

    from .conftest import create_database, drop_database
    from worker.migrate import alembic_config

    name = f"unlearnd_test_sql_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        cfg = alembic_config(url)
        cfg.output_buffer = io.StringIO()
        command.upgrade(cfg, "head", sql=True)
        script = cfg.output_buffer.getvalue()
        assert "INSERT INTO audit_chain_head" in script
        with engine_for(url).connect() as conn:
            assert conn.dialect.get_table_names(conn) == []  # offline: nothing ran against the database
            conn.exec_driver_sql(script)
            conn.commit()
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(ctx, Base.metadata) == []
            assert is_up_to_date(conn)
    finally:
        drop_database(name)
