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
    assert upgrade_database(database_url) == head_revision() == "0005"


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


def test_the_erased_cell_count_is_filled_for_existing_versions(tmp_path):
    """Migration 0004 on a record that has versions: each gets the length of its erased_cells,
    on PostgreSQL and on SQLite (a batch table rebuild there)."""
    import uuid

    from alembic import command
    from sqlalchemy import text

    from worker.migrate import alembic_config

    from .conftest import create_database, drop_database

    name = f"unlearnd_test_0004_{uuid.uuid4().hex[:8]}"
    urls = [create_database(name), f"sqlite:///{tmp_path / 'record.db'}"]
    try:
        for url in urls:
            command.upgrade(alembic_config(url), "0003")
            with engine_for(url).begin() as conn:
                conn.execute(text("INSERT INTO models (name, dataset, tasks, created_at) "
                                  "VALUES ('m', '{}', '[]', CURRENT_TIMESTAMP)"))
                for version, cells in ((1, "[]"), (2, '[["a", "depth"], ["b", "depth"]]')):
                    conn.execute(text("INSERT INTO model_versions (model_name, version, sha256, artifact_uri, "
                                      "deletions, erased_cells, created_at) VALUES ('m', :v, 'x', 'x', '[]', "
                                      ":cells, CURRENT_TIMESTAMP)"), {"v": version, "cells": cells})
            upgrade_database(url)
            with engine_for(url).connect() as conn:
                counts = conn.execute(text("SELECT version, erased_cell_count FROM model_versions ORDER BY version"))
                assert [tuple(r) for r in counts] == [(1, 0), (2, 2)], url
    finally:
        drop_database(name)
