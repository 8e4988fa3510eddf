"""The worker under races and faults: concurrent audit appends, a log cut at its end,
attempt fencing, rollback against a claim, poison jobs, checkpoints that do not match
the record, stale temporary folders."""
from __future__ import annotations

import threading
import time
import uuid

from alembic import command
from sqlalchemy import delete, select, text

from worker.audit import AuditChainHead, append_event, verify_chain
from worker.db import engine_for, transaction
from worker.migrate import alembic_config, upgrade_database
from worker.tables import AuditEvent

from .conftest import create_database, drop_database


def _wait_for(predicate, what: str, limit_s: float = 30.0) -> None:
    """Poll until ``predicate()`` (synchronisation, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def _lock_waiters(url: str) -> int:
    with engine_for(url).connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )).scalar()


# --------------------------------------------------------------------------- A, B: the audit chain


def test_concurrent_appends_chain_in_order(settings):
    """A writer that waits for another's append gets the head that one committed."""
    url = settings.database_url
    with transaction(url) as session:
        append_event(session, "seed")
    first_appended, release, errors = threading.Event(), threading.Event(), []

    def first():
        try:
            with transaction(url) as session:
                append_event(session, "A")
                first_appended.set()
                release.wait(30)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def second():
        try:
            with transaction(url) as session:
                append_event(session, "B")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    a = threading.Thread(target=first)
    a.start()
    first_appended.wait(30)
    b = threading.Thread(target=second)
    b.start()
    _wait_for(lambda: _lock_waiters(url) >= 1, "the second writer to wait for the first")
    release.set()
    a.join(30)
    b.join(30)

    assert errors == []
    with transaction(url) as session:
        kinds = [(e.seq, e.kind) for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
        assert kinds == [(1, "seed"), (2, "A"), (3, "B")]
        assert verify_chain(session)["ok"] is True


def test_verify_finds_events_cut_from_the_end(settings):
    with transaction(settings.database_url) as session:
        for kind in ("a", "b", "c"):
            append_event(session, kind)
    with engine_for(settings.database_url).begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    with transaction(settings.database_url) as session:
        report = verify_chain(session)
    assert (report["ok"], report["events"], report["first_bad_seq"]) == (False, 2, 3)

    with engine_for(settings.database_url).begin() as conn:  # the head removed too: still not a clean log
        conn.execute(delete(AuditChainHead))
    with transaction(settings.database_url) as session:
        assert verify_chain(session)["ok"] is False


def test_chain_head_migration_downgrades_and_backfills():
    name = f"unlearnd_test_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        upgrade_database(url)
        with transaction(url) as session:
            append_event(session, "a")
            last = append_event(session, "b").hash
        command.downgrade(alembic_config(url), "0001")
        with engine_for(url).connect() as conn:
            assert "audit_chain_head" not in conn.dialect.get_table_names(conn)
        upgrade_database(url)  # the existing log's last event becomes the head
        with transaction(url) as session:
            head = session.get(AuditChainHead, 1)
            assert (head.seq, head.hash) == (2, last)
            assert verify_chain(session)["ok"] is True
            assert append_event(session, "c").seq == 3
    finally:
        drop_database(name)
