"""Migration 0010: deletion_requests.submitted_by comes back from the actor of each request's
deletion.received event (0006 added it as '' with no backfill), and on SQLite the audit log
refuses INSERT OR REPLACE / REPLACE INTO, which deleted a row without firing 0007's DELETE
triggers. On PostgreSQL and SQLite."""
from __future__ import annotations

import logging
import sqlite3
import uuid
from contextlib import closing, contextmanager

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.auth import token_sha256
from app.main import create_app
from worker.db import engine_for
from worker.migrate import alembic_config, head_revision, upgrade_database
from worker.settings import ApiKey

from .conftest import create_database, downgrade_record, drop_database, offline_script, register_model

TOKENS = {"portal": "portal-token", "shop": "shop-token", "auditor": "auditor-token"}
SCOPES = {"portal": ["deletions"], "shop": ["deletions"], "auditor": ["read"]}
#: 0010's SQLite triggers, and 0007's, which stay
NO_REPLACE = {"audit_events_no_replace", "audit_chain_head_no_replace", "audit_chain_head_keep_id"}
APPEND_ONLY = {"audit_events_no_update", "audit_events_no_delete", "audit_chain_head_no_delete",
               "audit_chain_head_forward"}


def _as(name: str, key: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}", **({"Idempotency-Key": key} if key else {})}


@contextmanager
def _api(record, keys: bool = True):
    api_keys = {n: ApiKey(token_sha256=token_sha256(t), scopes=SCOPES[n]) for n, t in TOKENS.items()} if keys else {}
    with TestClient(create_app(record.model_copy(update={"api_keys": api_keys}))) as c:
        yield c


@pytest.fixture(params=["postgresql", "sqlite"])
def record(request, settings, tmp_path):
    """``settings`` over a fresh record at the head revision, of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'record.db'}"
        upgrade_database(url)
        yield settings.model_copy(update={"database_url": url})
        engine_for(url).dispose()
        return
    name = f"unlearnd_test_0010_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        upgrade_database(url)
        yield settings.model_copy(update={"database_url": url})
    finally:
        drop_database(name)


def _migrate(url: str, down_to: str) -> None:
    downgrade_record(url, down_to)
    assert upgrade_database(url) == head_revision() == "0012"


def _submitters(url: str) -> dict[str, str]:
    with engine_for(url).connect() as conn:
        return {rid: by for rid, by in conn.execute(text("SELECT id, submitted_by FROM deletion_requests"))}


def _blank(url: str, *ids: str) -> None:
    """What a record upgraded through 0006 holds: no submitter."""
    with engine_for(url).begin() as conn:
        for rid in ids:
            conn.execute(text("UPDATE deletion_requests SET submitted_by = '' WHERE id = :id"), {"id": rid})


def _triggers(url: str) -> set[str]:
    with engine_for(url).connect() as conn:
        return set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())


def _events(url: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT seq, kind, request_id, prev_hash, hash "
                                                    "FROM audit_events ORDER BY seq"))]


def _head(url: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, seq, hash FROM audit_chain_head ORDER BY id"))]


def _owner_sees_its_request(c, rid: str, body: dict, first: dict) -> None:
    """The portal's own request, certificate, list and Idempotency-Key replay (404, 404, [] and
    a 409 while its submitter was lost)."""
    r = c.get(f"/deletions/{rid}", headers=_as("portal"))
    assert r.status_code == 200 and r.json()["submitted_by"] == "portal", r.text
    cert = c.get(f"/deletions/{rid}/certificate", headers=_as("portal"))  # queued: not certified yet, but its own
    assert cert.status_code == 409 and cert.json()["request_status"] == "queued", cert.text
    assert [i["id"] for i in c.get("/deletions", headers=_as("portal")).json()["items"]] == [rid]
    retry = c.post("/deletions", json=body, headers=_as("portal", "t-1"))
    assert retry.status_code == 202, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true" and retry.json() == first
    # and still not the shop's
    assert c.get(f"/deletions/{rid}", headers=_as("shop")).status_code == 404
    assert c.get(f"/deletions/{rid}/certificate", headers=_as("shop")).status_code == 404
    assert c.get("/audit/verify", headers=_as("auditor")).json()["ok"] is True


def test_submitters_come_back_from_the_audit_log_after_a_downgrade_past_0006(record):
    """The reviewer's case: a request submitted with the portal's key (Idempotency-Key t-1),
    then `alembic downgrade 0005` and `upgrade head`: submitted_by was '' and the portal got
    a 404 for its request and certificate, an empty list and a 409 for the retry."""
    url = record.database_url
    model = register_model(record)
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    with _api(record) as c:
        first = c.post("/deletions", json=body, headers=_as("portal", "t-1"))
        assert first.status_code == 202, first.text
        shops = c.post("/deletions", json={"instance_id": model.train_ids[1]}, headers=_as("shop")).json()["id"]
    with _api(record, keys=False) as c:  # an API without keys: no actor in its event
        open_ = c.post("/deletions", json={"instance_id": model.train_ids[2]}).json()["id"]
    rid, events = first.json()["id"], _events(url)

    _migrate(url, "0005")
    assert _submitters(url) == {rid: "portal", shops: "shop", open_: ""}, url
    assert _events(url) == events  # the chain hashes events only: nothing in it moved
    with _api(record) as c:
        _owner_sees_its_request(c, rid, body, first.json())
        assert [i["id"] for i in c.get("/deletions", headers=_as("shop")).json()["items"]] == [shops]


def test_a_submitter_whose_key_another_request_holds_stays_blank(record, caplog):
    """A request whose (actor, Idempotency-Key) another request holds already keeps '' (the
    constraint of 0006 would refuse it) and the upgrade goes on: the others are restored."""
    url = record.database_url
    model = register_model(record)
    with _api(record) as c:
        a = c.post("/deletions", json={"instance_id": model.train_ids[0]}, headers=_as("portal", "t-1")).json()["id"]
        shops = c.post("/deletions", json={"instance_id": model.train_ids[1]}, headers=_as("shop", "t-2")).json()["id"]
        unkeyed = c.post("/deletions", json={"instance_id": model.train_ids[2]}, headers=_as("portal")).json()["id"]
        _blank(url, a, shops, unkeyed)
        # the portal sent t-1 again for another instance while its first request had no submitter: a new request
        b = c.post("/deletions", json={"instance_id": model.train_ids[3]}, headers=_as("portal", "t-1"))
        assert b.status_code == 202 and "Idempotent-Replayed" not in b.headers, b.text
    b = b.json()["id"]
    with caplog.at_level(logging.WARNING):
        _migrate(url, "0009")
    assert _submitters(url) == {a: "", b: "portal", shops: "shop", unkeyed: "portal"}, url
    assert any(a in r.getMessage() and "keep no submitter" in r.getMessage() for r in caplog.records)
    with _api(record) as c:
        assert c.get("/audit/verify", headers=_as("auditor")).json()["ok"] is True


def _portal_submits(record):
    """A model registered on ``record`` and one request of its first instance submitted by the
    'portal' key with Idempotency-Key t-1: ``(body, response)``."""
    model = register_model(record)
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    with _api(record) as c:
        first = c.post("/deletions", json=body, headers=_as("portal", "t-1"))
    assert first.status_code == 202, first.text
    return body, first


def test_downgrading_below_0010_and_upgrading_again(record):
    """0010 down and up: its SQLite triggers go and come back (0007's stay); a submitter lost
    meanwhile comes back; the restored ones stay on the way down."""
    url = record.database_url
    sqlite = url.startswith("sqlite")
    body, first = _portal_submits(record)
    rid = first.json()["id"]
    downgrade_record(url, "0009")
    assert _submitters(url) == {rid: "portal"}
    if sqlite:
        assert _triggers(url) == APPEND_ONLY
    _blank(url, rid)
    assert upgrade_database(url) == head_revision()
    assert _submitters(url) == {rid: "portal"}
    if sqlite:
        assert _triggers(url) == APPEND_ONLY | NO_REPLACE
    with _api(record) as c:
        _owner_sees_its_request(c, rid, body, first.json())


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_offline_0010_writes_its_triggers_and_says_it_does_not_backfill(tmp_path, dialect):
    url = f"sqlite:///{tmp_path}/never.db" if dialect == "sqlite" else "postgresql+psycopg://u@h/never"
    for step, revisions in ((command.upgrade, "0009:0010"), (command.downgrade, "0010:0009")):
        script = offline_script(url, step, revisions)
        if step is command.upgrade:
            assert "-- 0010" in script and "NOT filled" in script and "online" in script
        assert all((name in script) == (dialect == "sqlite") for name in NO_REPLACE), script
    assert not (tmp_path / "never.db").exists()


def test_after_the_offline_script_stamp_and_upgrade_fill_the_submitters(record):
    """What the offline script's comment says: a record migrated with `upgrade 0009:0010 --sql`
    keeps its blank submitters; `alembic stamp 0009` and `upgrade 0010` online fill them (its
    SQLite triggers, already there, are left as they are)."""
    url = record.database_url
    body, first = _portal_submits(record)
    rid = first.json()["id"]
    downgrade_record(url, "0009")
    _blank(url, rid)
    script = offline_script(url, command.upgrade, "0009:0010")
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(url.split("///", 1)[1])) as conn:
            conn.executescript(script)
    else:
        with engine_for(url).begin() as conn:
            conn.exec_driver_sql(script)
    assert _submitters(url) == {rid: ""}
    if url.startswith("sqlite"):
        assert _triggers(url) == APPEND_ONLY | NO_REPLACE
    command.stamp(alembic_config(url), "0009")
    assert upgrade_database(url) == head_revision()
    assert _submitters(url) == {rid: "portal"}
    with _api(record) as c:
        _owner_sees_its_request(c, rid, body, first.json())


# over an existing event or head: seq 1 with another hash, a new seq with event 1's hash, head id 1
SQLITE_REWRITES = [
    "INSERT OR REPLACE INTO audit_events (seq, at, kind, payload, prev_hash, hash) "
    "VALUES (1, '2020-01-01 00:00:00', 'forged', '{}', :genesis, :forged)",
    "REPLACE INTO audit_events (seq, at, kind, payload, prev_hash, hash) "
    "VALUES (1, '2020-01-01 00:00:00', 'forged', '{}', :genesis, :forged)",
    "REPLACE INTO audit_events (seq, at, kind, payload, prev_hash, hash) "
    "VALUES (1000, '2020-01-01 00:00:00', 'forged', '{}', :genesis, :first)",
    "REPLACE INTO audit_events (at, kind, payload, prev_hash, hash) "
    "VALUES ('2020-01-01 00:00:00', 'forged', '{}', :genesis, :first)",
    "INSERT OR REPLACE INTO audit_chain_head (id, seq, hash) VALUES (1, 1, :first)",
    "REPLACE INTO audit_chain_head (id, seq, hash) VALUES (1, 1000, :forged)",
    # a second head row moved onto the first's id: UPDATE OR REPLACE deletes the first, no trigger fired
    "UPDATE OR REPLACE audit_chain_head SET id = 1, seq = seq + 1000 WHERE id = 2",
    "UPDATE OR REPLACE audit_events SET seq = 1 WHERE seq = 2",
]
# PostgreSQL has no REPLACE; its upsert fires 0007's UPDATE trigger
POSTGRES_REWRITES = [
    "INSERT INTO audit_events (seq, at, kind, payload, prev_hash, hash) VALUES "
    "(1, now(), 'forged', '{}', :genesis, :forged) ON CONFLICT (seq) DO UPDATE SET kind = 'forged'",
    "INSERT INTO audit_events (seq, at, kind, payload, prev_hash, hash) VALUES "
    "(1000, now(), 'forged', '{}', :genesis, :first) ON CONFLICT (hash) DO UPDATE SET kind = 'forged'",
    "INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 1, :first) "
    "ON CONFLICT (id) DO UPDATE SET seq = 1, hash = :first",
]


def test_replace_cannot_rewrite_the_audit_log(record):
    """INSERT OR REPLACE / REPLACE INTO over an event or the chain head (and UPDATE OR REPLACE
    onto another row) deleted the row it conflicted with on SQLite without firing 0007's
    DELETE triggers, from any connection with recursive triggers off (SQLite's default: the
    sqlite3 shell, a script; the service's own turn them on): they are refused now, and the
    service still appends and verifies. PostgreSQL's upserts were refused already and still are."""
    url = record.database_url
    sqlite = url.startswith("sqlite")
    model = register_model(record)
    with _api(record) as c:
        for i in (0, 1):
            assert c.post("/deletions", json={"instance_id": model.train_ids[i]},
                          headers=_as("portal")).status_code == 202
    if sqlite:  # a second head row may be added; it is what an UPDATE OR REPLACE would move onto the first
        with engine_for(url).begin() as conn:
            conn.execute(text("INSERT INTO audit_chain_head (id, seq, hash) VALUES (2, 0, 'x')"))
    events, head = _events(url), _head(url)
    values = {"genesis": "0" * 64, "forged": "f" * 64, "first": events[0][4]}
    if sqlite:  # a plain connection, as the sqlite3 shell opens one
        with closing(sqlite3.connect(url.split("///", 1)[1], isolation_level=None)) as conn:
            assert conn.execute("PRAGMA recursive_triggers").fetchone() == (0,)
            for statement in SQLITE_REWRITES:
                with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                    conn.execute(statement, values)
                assert _events(url) == events and _head(url) == head, statement
    for statement in SQLITE_REWRITES if sqlite else POSTGRES_REWRITES:  # and the service's engine
        with pytest.raises(DBAPIError) as refused, engine_for(url).begin() as conn:
            conn.execute(text(statement), values)
        message = str(refused.value.orig)
        assert "append-only" in message or "only moves forward" in message, (statement, message)
        assert _events(url) == events and _head(url) == head, statement

    with _api(record) as c:  # the service appends as before: a new event, the head moved on
        assert c.post("/deletions", json={"instance_id": model.train_ids[2]}, headers=_as("portal")).status_code == 202
        verify = c.get("/audit/verify", headers=_as("auditor")).json()
    assert verify["ok"] is True and verify["events"] == len(events) + 1, verify
    assert _events(url)[:-1] == events and _head(url)[0][1] == len(events) + 1


def test_the_first_event_inserts_the_chain_head(tmp_path, settings):
    """On a fresh SQLite record the head row does not exist until the first event: that
    INSERT is allowed (the trigger refuses only an INSERT over an existing head)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_database(url)
    record = settings.model_copy(update={"database_url": url})
    assert NO_REPLACE <= _triggers(url) and _head(url) == []
    model = register_model(record)
    with _api(record) as c:
        for i in (0, 1):
            assert c.post("/deletions", json={"instance_id": model.train_ids[i]},
                          headers=_as("portal")).status_code == 202
        assert c.get("/audit/verify", headers=_as("auditor")).json()["ok"] is True
    assert _head(url) == [(1, 2, _events(url)[-1][4])]
