"""The migrated schema is exactly the ORM's (worker/tables.py), on PostgreSQL."""
from __future__ import annotations

import time

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from worker.db import engine_for
from worker.migrate import head_revision, is_up_to_date, upgrade_database
from worker.tables import Base

from .conftest import both_records, downgrade_record, offline_script


def test_migrated_schema_matches_the_orm(database_url):
    with engine_for(database_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []
        assert is_up_to_date(conn)


def test_upgrade_is_idempotent(database_url):
    assert upgrade_database(database_url) == head_revision() == "0012"


def test_offline_sql_builds_the_same_schema():
    """`alembic upgrade head --sql` (a DBA applies the script by hand) writes every
    migration out, data steps included, and the script builds the ORM's schema."""
    import uuid

    from alembic import command

    from .conftest import create_database, drop_database

    name = f"unlearnd_test_sql_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        script = offline_script(url, command.upgrade, "head")
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
    from alembic import command
    from sqlalchemy import text

    from worker.migrate import alembic_config

    with both_records(tmp_path, "0004") as urls:
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


def test_idempotency_keys_survive_the_per_submitter_constraint(tmp_path):
    """Migration 0006 on a record with requests: each keeps its key, with no submitter;
    a key stays unique per submitter (a second request with it and no submitter is
    refused) but another submitter may use it; on PostgreSQL and SQLite (a table rebuild)."""
    import uuid

    import pytest
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from worker.migrate import alembic_config

    from .conftest import create_database, drop_database

    name = f"unlearnd_test_0006_{uuid.uuid4().hex[:8]}"
    urls = [create_database(name), f"sqlite:///{tmp_path / 'record.db'}"]
    insert = text("INSERT INTO deletion_requests (id, model_name, instance_id, tasks, status, progress, "
                  "idempotency_key, created_at, updated_at{extra}) VALUES (:id, 'm', 'i', '[]', 'queued', 0, "
                  ":key, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP{values})")
    try:
        for url in urls:
            command.upgrade(alembic_config(url), "0005")
            with engine_for(url).begin() as conn:
                conn.execute(text("INSERT INTO models (name, dataset, tasks, created_at) "
                                  "VALUES ('m', '{}', '[]', CURRENT_TIMESTAMP)"))
                conn.execute(text(str(insert).format(extra="", values="")), {"id": "r1", "key": "ticket-1"})
            upgrade_database(url)
            with engine_for(url).connect() as conn:
                rows = conn.execute(text("SELECT id, idempotency_key, submitted_by FROM deletion_requests"))
                assert [tuple(r) for r in rows] == [("r1", "ticket-1", "")], url
            with_submitter = text(str(insert).format(extra=", submitted_by", values=", :by"))
            with pytest.raises(IntegrityError), engine_for(url).begin() as conn:
                conn.execute(with_submitter, {"id": "r2", "key": "ticket-1", "by": ""})
            with engine_for(url).begin() as conn:
                conn.execute(with_submitter, {"id": "r3", "key": "ticket-1", "by": "portal"})
            # back to one key across everyone: possible once no two submitters share a key
            with engine_for(url).begin() as conn:
                conn.execute(text("DELETE FROM deletion_requests WHERE id = 'r3'"))
            command.downgrade(alembic_config(url), "0005")
            with pytest.raises(IntegrityError), engine_for(url).begin() as conn:
                conn.execute(text(str(insert).format(extra="", values="")), {"id": "r4", "key": "ticket-1"})
            assert upgrade_database(url) == head_revision()
    finally:
        drop_database(name)


def _canonical(sql: str | None) -> list[str]:
    """A CREATE statement's clauses, whitespace and quotes aside; foreign keys in any order
    (a batch rebuild writes them in whichever order its set gives)."""
    text = " ".join((sql or "").split()).replace('"', "")
    end = text.endswith(" )")  # a table's closing parenthesis, apart from its last clause
    clauses = (text[:-2] if end else text).split(", ")
    keys = sorted(c for c in clauses if "FOREIGN KEY" in c)
    return [")"] * end + [c for c in clauses if "FOREIGN KEY" not in c] + keys


def test_offline_sql_builds_the_same_schema_on_sqlite(tmp_path):
    """`alembic upgrade head --sql` for a SQLite record: 0006 rebuilds deletion_requests (a
    batch operation), which offline cannot reflect; the script it writes builds the same
    tables, indexes, constraints and triggers as migrating the database online."""
    import sqlite3

    from alembic import command

    online, offline = tmp_path / "online.db", tmp_path / "offline.db"
    upgrade_database(f"sqlite:///{online}")
    script = offline_script(f"sqlite:///{offline}", command.upgrade, "head")
    assert not offline.exists()  # offline: nothing ran against the database
    with sqlite3.connect(offline) as conn:
        conn.executescript(script)

    def schema(path):
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        return {r[:3]: _canonical(r[3]) for r in rows}, version

    assert schema(offline) == schema(online)
    assert schema(offline)[1] == [(head_revision(),)]


def test_a_migration_is_one_log_line_naming_the_revisions(tmp_path, caplog):
    import logging

    url = f"sqlite:///{tmp_path / 'record.db'}"
    with caplog.at_level(logging.INFO, logger="worker.migrate"):
        upgrade_database(url)
        upgrade_database(url)
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.migrate"]
    assert lines == [f"database migrated from revision (empty) to {head_revision()}",
                     f"database at revision {head_revision()} (up to date)"]


SLOW_UPGRADE = r'''
import sys, time
import worker.db as db

make = db.make_engine


def slow(url):  # pauses after each step's COMMIT: where SQLite's write lock is free between steps
    engine = make(url)
    commit = engine.dialect.do_commit

    def commit_then_pause(connection):
        commit(connection)
        if not committed:
            committed.append(True)
            print("committed", flush=True)
        time.sleep(0.3)

    engine.dialect.do_commit = commit_then_pause
    return engine


committed = []
db.make_engine = slow
from worker.migrate import upgrade_database
print("started", flush=True)
upgrade_database(sys.argv[1])
print(f"finished {time.time()!r}", flush=True)
'''


def test_two_processes_migrating_one_sqlite_file_wait_for_each_other(tmp_path):
    """alembic commits each step on its own on SQLite, so the write lock is free between steps:
    a second `unlearnd migrate` read the old revision and replayed steps the first had run
    ("table audit_chain_head already exists"). A lock on the file's .migrate-lock serialises them."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/record.db"
    env = {**os.environ, "UNLEARND_DATABASE_URL": url}
    cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    slow = subprocess.Popen([sys.executable, "-c", SLOW_UPGRADE, url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    assert slow.stdout.readline().strip() == "started"
    # inside the slow one's steps: it committed its first and pauses after each
    assert slow.stdout.readline().strip() == "committed"
    assert slow.poll() is None, "the slow migration must still be running when the second starts"
    launched = time.time()
    second = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=120)
    out, _ = slow.communicate(timeout=120)
    assert slow.returncode == 0, out
    finished = [line for line in out.splitlines() if line.startswith("finished ")]
    assert len(finished) == 1, out
    assert launched < float(finished[0].split()[1]), "the two migrations did not overlap"
    assert second.returncode == 0, second.stderr
    assert f"database at revision {head_revision()}" in second.stdout
    # it waited for the first and found nothing to do: the first's migration is not logged as its own
    assert f"worker.migrate: database at revision {head_revision()} (up to date)" in second.stderr
    assert "migrated from" not in second.stderr
    with engine_for(url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()


def test_offline_sql_downgrades_a_sqlite_record(tmp_path):
    """`alembic downgrade head:base --sql` for a SQLite record: the downgrades of 0004, 0005,
    0006 and 0008 rebuilt a table in batch mode, which offline cannot reflect ("requires a
    live database connection"). The script now runs, step by step down to an empty record."""
    import sqlite3

    from alembic import command

    path = tmp_path / "record.db"
    upgrade_database(f"sqlite:///{path}")
    script = offline_script(f"sqlite:///{tmp_path}/never.db", command.downgrade, f"{head_revision()}:base")
    assert not (tmp_path / "never.db").exists()
    with sqlite3.connect(path) as conn:
        conn.executescript(script)
        left = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall()
    assert left == [("alembic_version",)]
    upgrade_database(f"sqlite:///{path}")  # and up again online
    with engine_for(f"sqlite:///{path}").connect() as conn:
        assert is_up_to_date(conn)


def test_purged_at_comes_back_from_the_audit_log_after_a_downgrade_past_0008(tmp_path):
    """Downgrading past 0008 drops purged_at; upgrading again left every purged version as
    stored (NULL). The upgrade fills it from the model.version_purged events."""
    from datetime import datetime, timezone

    from alembic import command

    from worker.audit import append_event
    from worker.db import transaction
    from worker.migrate import alembic_config
    from worker.tables import AuditEvent, Model, ModelVersion
    from worker.versions import PURGED_EVENT

    with both_records(tmp_path, "0008") as urls:
        for url in urls:
            upgrade_database(url)
            with transaction(url) as session:
                session.add(Model(name="m", dataset={"name": "indoor"}, tasks=["depth"]))
                session.flush()
                for v in (1, 2, 3):
                    session.add(ModelVersion(model_name="m", version=v, sha256="x", artifact_uri="x", deletions=[],
                                             erased_cells=[]))
                session.flush()
                for v, published in ((1, True), (7, False)):  # v7: an unrecorded artifact's purge
                    append_event(session, PURGED_EVENT, model_name="m",
                                 payload={"version": v, "sha256": "x", "published": published, "held_erasures": []})
                # the first purge's events had no "published" (it purged version rows only)
                append_event(session, PURGED_EVENT, model_name="m", payload={"version": 3, "sha256": "x"})
                for v in (1, 3):
                    session.query(ModelVersion).filter_by(model_name="m", version=v).one().purged_at = \
                        datetime.now(timezone.utc)
            with transaction(url) as session:
                at = session.execute(text("SELECT at FROM audit_events WHERE kind = :k ORDER BY seq"),
                                     {"k": PURGED_EVENT}).scalars().first()
            downgrade_record(url, "0007")
            upgrade_database(url)
            with transaction(url) as session:
                purged = {v.version: v.purged_at for v in session.query(ModelVersion).order_by(ModelVersion.version)}
                assert session.query(AuditEvent).count() == 3
            assert purged[2] is None, url
            assert purged[1] is not None and purged[3] is not None, url
            assert purged[1].replace(tzinfo=None) == (at if isinstance(at, datetime) else
                                                      datetime.fromisoformat(str(at))).replace(tzinfo=None), url


def test_a_downgrade_that_drops_the_audit_logs_protection_refuses_while_it_holds_events(tmp_path):
    """Past 0010/0007 the audit log is no longer append-only, past 0002 the next upgrade
    anchors its head at whatever event is then last (a cut from the end goes unnoticed),
    past 0001 every table goes: with events in the record each refuses, changing nothing,
    unless the operator passes ``-x allow_record_loss=1``. An empty record goes down freely."""
    import argparse

    import pytest
    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from worker.audit import append_event, verify_chain
    from worker.db import transaction
    from worker.migrate import alembic_config, current_revision

    with both_records(tmp_path, "guard") as urls:
        for url in urls:
            upgrade_database(url)
            with transaction(url) as session:
                append_event(session, "a")
                append_event(session, "b")
            sqlite = url.startswith("sqlite")  # 0010's triggers are SQLite's only
            for down_to in ("0009",) * sqlite + ("0006", "0001", "base"):
                with pytest.raises(CommandError, match=r"append-only.*2 row\(s\) in audit_events.*allow_record_loss=1"):
                    command.downgrade(alembic_config(url), down_to)
            with engine_for(url).connect() as conn:
                assert current_revision(conn) == head_revision(), url  # no step ran (on SQLite each commits alone)
            with pytest.raises(DBAPIError, match="append-only"), engine_for(url).begin() as conn:
                conn.execute(text("DELETE FROM audit_events"))  # still protected
            if sqlite:  # 0009 and 0008 (not guarded) would have run before 0007 refused: none runs
                downgrade_record(url, "0009")  # (0010's triggers go, allowed)
                for relative in ("base", "-3", "0009-3"):  # the steps as alembic lays them out
                    with pytest.raises(CommandError, match="the downgrade of 0007"):
                        command.downgrade(alembic_config(url), relative)
                    with engine_for(url).connect() as conn:
                        assert current_revision(conn) == "0009", relative
            # as `alembic -x allow_record_loss=1 downgrade 0001` passes it
            cfg = alembic_config(url)
            cfg.cmd_opts = argparse.Namespace(x=["allow_record_loss=1"])
            command.downgrade(cfg, "0001")
            with engine_for(url).connect() as conn:
                assert current_revision(conn) == "0001"
                assert conn.execute(text("SELECT COUNT(*) FROM audit_events")).scalar() == 2
            with pytest.raises(CommandError, match=r"every table of the record.*2 row\(s\) in audit_events"):
                command.downgrade(alembic_config(url), "base")
            upgrade_database(url)
            with transaction(url) as session:
                assert verify_chain(session)["ok"]

            empty = f"sqlite:///{tmp_path / 'empty.db'}" if url.startswith("sqlite") else url
            if empty != url:
                upgrade_database(empty)
            else:
                downgrade_record(url, "base")
                upgrade_database(url)
            command.downgrade(alembic_config(empty), "base")  # nothing to lose: no flag needed
            with engine_for(empty).connect() as conn:
                assert current_revision(conn) is None
