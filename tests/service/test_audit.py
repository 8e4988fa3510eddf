"""GET /audit/events and /audit/verify: queries, then tampering found at the right seq."""
from __future__ import annotations

import pytest
from sqlalchemy import text


from .conftest import assert_problem, tamper


def _post(client, model, n):
    return [
        client.post("/deletions", json={"instance_id": model.train_ids[i], "tasks": ["depth"]}).json()["id"]
        for i in range(n)
    ]


def test_events_filters_and_cursor(client, model):
    ids = _post(client, model, 3)
    page = client.get("/audit/events", params={"limit": 2}).json()
    assert [e["seq"] for e in page["items"]] == [1, 2]
    rest = client.get("/audit/events", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [e["seq"] for e in rest["items"]] == [3] and rest["next_cursor"] is None
    assert page["items"][1]["prev_hash"] == page["items"][0]["hash"]

    by_instance = client.get("/audit/events", params={"instance_id": model.train_ids[1]}).json()["items"]
    assert [(e["request_id"], e["kind"]) for e in by_instance] == [(ids[1], "deletion.received")]
    assert [e["request_id"] for e in client.get("/audit/events", params={"request_id": ids[2]}).json()["items"]] == [ids[2]]
    assert client.get("/audit/events", params={"kind": "model.rollback"}).json()["items"] == []
    assert len(client.get("/audit/events", params={"until": "2000-01-01T00:00:00"}).json()["items"]) == 0
    assert len(client.get("/audit/events", params={"since": "2000-01-01T00:00:00Z"}).json()["items"]) == 3
    assert_problem(client.get("/audit/events", params={"cursor": "WyJ4Il0"}), 422)  # ["x"]: not a seq


# Every field of an event is under its hash: rewriting any one of them is found.
REWRITES = {
    "payload": """payload = '{"tasks": ["normal"]}'""",
    "kind": "kind = 'deletion.rejected'",
    "model_name": "model_name = 'another-model'",
    "request_id": "request_id = NULL",
    "instance_id": "instance_id = 'someone-else'",
    "at": "at = at - interval '1 hour'",
}


@pytest.mark.parametrize("field", list(REWRITES))
def test_verify_ok_then_tampering_names_the_seq(client, settings, model, field):
    _post(client, model, 3)
    report = client.get("/audit/verify").json()
    assert {k: report[k] for k in ("ok", "events", "first_bad_seq", "reason")} == \
        {"ok": True, "events": 3, "first_bad_seq": None, "reason": None}
    assert report["head"]["seq"] == 3

    with tamper(settings.database_url) as conn:  # rewrite history behind the API's back
        conn.execute(text(f"UPDATE audit_events SET {REWRITES[field]} WHERE seq = 2"))
    r = client.get("/audit/verify")
    assert r.status_code == 200
    assert r.json() == {"ok": False, "events": 2, "first_bad_seq": 2, "reason": "hash does not match contents",
                        "head": None, "verified_from": 1}


def test_verify_finds_a_deleted_event(client, settings, model):
    _post(client, model, 3)
    with tamper(settings.database_url) as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    report = client.get("/audit/verify").json()
    assert (report["ok"], report["first_bad_seq"]) == (False, 3)


def _rewrite_history(url: str) -> None:
    """What whoever can write the database can do: rewrite an event and re-chain every hash
    after it, and the head, so the log verifies on its own."""
    from worker.audit import event_hash

    with tamper(url) as conn:
        conn.execute(text("""UPDATE audit_events SET payload = '{"tasks": ["normal"]}' WHERE seq = 2"""))
        prev = conn.execute(text("SELECT hash FROM audit_events WHERE seq = 1")).scalar_one()
        rows = conn.execute(text("SELECT seq, at, kind, model_name, request_id, instance_id, payload "
                                 "FROM audit_events WHERE seq >= 2 ORDER BY seq")).all()
        for seq, at, kind, model_name, request_id, instance_id, payload in rows:
            new = event_hash(prev, seq, at, kind, model_name, request_id, instance_id, payload)
            conn.execute(text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE seq = :s"),
                         {"p": prev, "h": new, "s": seq})
            prev = new
        conn.execute(text("UPDATE audit_chain_head SET hash = :h"), {"h": prev})


def test_an_anchor_kept_outside_finds_a_consistently_rewritten_log(client, settings, model):
    _post(client, model, 3)
    kept = client.get("/audit/verify").json()["head"]  # e.g. a certificate's chain_head, held by the requester
    assert client.get("/audit/verify", params=kept).json()["ok"] is True
    _rewrite_history(settings.database_url)
    assert client.get("/audit/verify").json()["ok"] is True  # on its own, the rewritten log verifies
    report = client.get("/audit/verify", params=kept).json()
    assert (report["ok"], report["first_bad_seq"], report["head"]) == (False, 3, None)
    assert "anchored hash" in report["reason"]


def test_after_an_anchor_only_the_new_events_are_recomputed(client, settings, model):
    """A monitor keeps each report's head and passes it back with after_anchor: the check reads
    the events appended since (what the anchor vouches for is trusted), and still finds a
    rewrite of the new events, of the anchored event's hash, or events removed."""
    _post(client, model, 3)
    kept = client.get("/audit/verify").json()["head"]
    quiet = client.get("/audit/verify", params={**kept, "after_anchor": "true"}).json()
    assert (quiet["ok"], quiet["events"], quiet["verified_from"], quiet["head"]) == (True, 0, 4, kept)
    for i in (3, 4):  # two more requests
        assert client.post("/deletions", json={"instance_id": model.train_ids[i], "tasks": ["depth"]}).status_code == 202
    report = client.get("/audit/verify", params={**kept, "after_anchor": "true"}).json()
    assert (report["ok"], report["events"], report["verified_from"], report["head"]["seq"]) == (True, 2, 4, 5)

    with tamper(settings.database_url) as conn:  # a new event changed: found
        conn.execute(text("""UPDATE audit_events SET payload = '{"tasks": ["normal"]}' WHERE seq = 5"""))
    report = client.get("/audit/verify", params={**kept, "after_anchor": "true"}).json()
    assert (report["ok"], report["first_bad_seq"], report["events"]) == (False, 5, 2)
    # an older event changed is trusted in this mode (the full check finds it)
    with tamper(settings.database_url) as conn:
        conn.execute(text("""UPDATE audit_events SET payload = '{"tasks": ["depth"]}' WHERE seq = 5"""))
    _rewrite_history(settings.database_url)  # seq 2 onwards rewritten consistently
    report = client.get("/audit/verify", params={**kept, "after_anchor": "true"}).json()
    assert (report["ok"], report["first_bad_seq"], report["events"]) == (False, 3, 0)
    assert "anchored hash" in report["reason"]
    gone = client.get("/audit/verify", params={"seq": 9, "hash": "a" * 64, "after_anchor": "true"}).json()
    assert (gone["ok"], gone["first_bad_seq"]) == (False, 9) and "events were removed" in gone["reason"]


def test_an_anchor_past_the_end_means_events_were_removed(client, settings, model):
    _post(client, model, 2)
    report = client.get("/audit/verify", params={"seq": 5, "hash": "a" * 64}).json()
    assert (report["ok"], report["first_bad_seq"]) == (False, 3) and "before the anchored event 5" in report["reason"]


@pytest.mark.parametrize("params", [{"seq": 1}, {"hash": "a" * 64}, {"seq": 0, "hash": "a" * 64},
                                    {"seq": 1, "hash": "XYZ"}, {"seq": "one", "hash": "a" * 64},
                                    {"after_anchor": "true"}, {"seq": 1, "hash": "a" * 64, "after_anchor": "maybe"}])
def test_a_malformed_anchor_is_a_422(client, model, params):
    assert_problem(client.get("/audit/verify", params=params), 422)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_database_refuses_to_change_or_remove_audit_history(settings, model, tmp_path, backend):
    """Migration 0007: the record itself refuses UPDATE, DELETE (and TRUNCATE on PostgreSQL) of
    events, removing the chain head and moving it back; 0010 (SQLite) and 0012 (PostgreSQL)
    a head moved to another id. Appending goes on as before."""
    from sqlalchemy.exc import DBAPIError

    from worker.audit import append_event, verify_chain
    from worker.db import engine_for, transaction

    from .conftest import on_sqlite

    url = settings.database_url if backend == "postgresql" else on_sqlite(settings, tmp_path).database_url
    with transaction(url) as session:
        for kind in ("a", "b", "c"):
            append_event(session, kind)
    refused = {
        "UPDATE audit_events SET kind = 'x' WHERE seq = 2": "append-only: UPDATE on audit_events",
        "DELETE FROM audit_events WHERE seq = 3": "append-only: DELETE on audit_events",
        "DELETE FROM audit_chain_head": "append-only: DELETE on audit_chain_head",
        "UPDATE audit_chain_head SET seq = 2": "only moves forward",
        # the head moved to another id (and forward): no head left at its id, no append after it
        "UPDATE audit_chain_head SET id = 2, seq = seq + 1": "append-only: the id of a chain head does not change",
    }
    if backend == "postgresql":
        refused["TRUNCATE audit_events CASCADE"] = "append-only: TRUNCATE on audit_events"
        refused["TRUNCATE audit_chain_head"] = "append-only: TRUNCATE on audit_chain_head"
    else:  # REPLACE deletes the row it replaces: refused before that (migration 0010; the DELETE triggers
        # fire for it too on the service's connections, which turn recursive triggers on)
        refused["INSERT OR REPLACE INTO audit_events (seq, at, kind, model_name, request_id, instance_id, payload, "
                "prev_hash, hash) SELECT seq, at, 'forged', model_name, request_id, instance_id, payload, prev_hash, "
                "hash FROM audit_events WHERE seq = 2"] = r"append-only: INSERT over an existing event \(REPLACE\)"
        refused["REPLACE INTO audit_chain_head (id, seq, hash) VALUES (1, 1, (SELECT hash FROM audit_events "
                "WHERE seq = 1))"] = r"append-only: INSERT over the chain head \(REPLACE\)"
    for statement, message in refused.items():
        with pytest.raises(DBAPIError, match=message), engine_for(url).begin() as conn:
            conn.execute(text(statement))
    with transaction(url) as session:
        assert append_event(session, "d").seq == 4
        report = verify_chain(session)
    assert (report["ok"], report["events"], report["head"]["seq"]) == (True, 4, 4)


def test_an_event_appended_while_verifying_is_not_a_broken_chain(client, settings, model, monkeypatch):
    """A verification reads every event, then the head (seconds apart at scale); an append
    committed in between moved the head past the events read: on PostgreSQL at READ COMMITTED
    a sound log was reported broken ("the log ends at seq 3 but its recorded head is seq 4").
    The events and the head are read in one snapshot."""
    from sqlalchemy.orm import Session

    from worker.audit import append_event
    from worker.db import transaction
    from worker.tables import AuditChainHead

    _post(client, model, 3)
    real_get, appended = Session.get, []

    def get(self, entity, ident, **kw):
        if entity is AuditChainHead and not appended:  # the events are read: another writer commits now
            appended.append(True)
            with transaction(settings.database_url) as other:
                append_event(other, "concurrent")
        return real_get(self, entity, ident, **kw)

    monkeypatch.setattr(Session, "get", get)
    report = client.get("/audit/verify").json()
    assert appended
    assert (report["ok"], report["events"], report["reason"], report["head"]["seq"]) == (True, 3, None, 3), report
    again = client.get("/audit/verify", params=report["head"]).json()
    assert (again["ok"], again["events"], again["head"]["seq"]) == (True, 4, 4)


def test_a_requests_event_is_not_stamped_before_the_request(client, model, monkeypatch):
    """Events carry milliseconds; rounding down put a request's deletion.received event up to
    1 ms before the request's created_at, so ?since=<created_at> missed the request's own event."""
    from datetime import datetime, timezone

    import worker.audit
    import worker.requests

    instant = datetime(2026, 12, 6, 19, 42, 4, 705014, tzinfo=timezone.utc)
    for module in (worker.audit, worker.requests):
        monkeypatch.setattr(module, "utcnow", lambda: instant)
    request = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]}).json()
    assert request["created_at"] == "2026-12-06T19:42:04.705014Z"
    events = client.get("/audit/events", params={"kind": "deletion.received", "since": request["created_at"]}).json()
    assert [(e["request_id"], e["at"]) for e in events["items"]] == [(request["id"], "2026-12-06T19:42:04.706000Z")]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_time_in_an_events_payload_is_written_as_the_api_writes_times(settings, model, tmp_path, backend):
    # the sweeper's job.requeued carries the job's heartbeat, which SQLite hands back naive:
    # str() of it had no zone and a space for the T, for good in a hash-chained log
    from datetime import datetime, timedelta, timezone

    from worker.audit import append_event, verify_chain
    from worker.db import transaction

    from .conftest import on_sqlite

    url = settings.database_url if backend == "postgresql" else on_sqlite(settings, tmp_path).database_url
    naive = datetime(2026, 12, 6, 22, 12, 18, 634836)
    elsewhere = datetime(2026, 12, 6, 23, 12, 18, tzinfo=timezone(timedelta(hours=1)))
    with transaction(url) as session:
        event = append_event(session, "job.requeued", payload={"naive": naive, "elsewhere": elsewhere, "n": 2})
    assert event.payload == {"naive": "2026-12-06T22:12:18.634836Z", "elsewhere": "2026-12-06T22:12:18Z", "n": 2}
    with transaction(url) as session:
        assert verify_chain(session)["ok"]


def test_writers_read_committed_whatever_the_server_default(settings):
    """A server whose default_transaction_isolation is REPEATABLE READ (a hardening setting):
    the appends, ordered by the advisory lock, read the chain head their snapshot held, and
    most concurrent writers failed with serialisation errors. The engine pins READ COMMITTED."""
    import os
    import threading

    from worker.audit import append_event, verify_chain
    from worker.db import engine_for, read_only_transaction, transaction
    from worker.migrate import upgrade_database

    from .conftest import _admin, create_database, drop_database

    name = f"unlearnd_test_{os.getpid()}_rr"
    url = create_database(name)
    try:
        upgrade_database(url)
        with _admin() as admin:
            admin.execute(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'")
        engine_for(url).dispose()
        with transaction(url) as session:
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
        errors = []

        def write(i):
            for j in range(10):
                try:
                    with transaction(url) as session:
                        session.execute(text("SELECT 1"))  # a statement before the append: the snapshot taken
                        append_event(session, "t", payload={"writer": i, "n": j})
                except Exception as e:  # noqa: BLE001 - counted
                    errors.append(repr(e))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with read_only_transaction(url) as session:
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"  # one snapshot
            report = verify_chain(session)
        assert (report["ok"], report["events"]) == (True, 40)
    finally:
        drop_database(name)


@pytest.mark.parametrize("rewrite", ["another-offset", "key-twice"])
def test_sqlite_an_event_rewritten_in_a_form_that_reads_back_alike_does_not_verify(settings, tmp_path, rewrite):
    """The hash covers the values as read back. Rewritten (the triggers dropped: whoever can
    write the file) as a time with another UTC offset or a payload naming a key twice, an event
    read back alike and verified against an anchor kept outside, while SQL read the other text
    (the time-window filter, json_extract)."""
    import sqlite3
    from datetime import datetime, timedelta, timezone

    from worker.audit import append_event, verify_chain
    from worker.db import read_only_transaction, transaction

    from .conftest import on_sqlite

    url = on_sqlite(settings, tmp_path).database_url
    with transaction(url) as session:
        append_event(session, "deletion.received", request_id="r1", instance_id="i1",
                     payload={"actor": "portal", "tasks": ["depth"], "note": "Zoë"})
        append_event(session, "job.started", payload={"job_id": "j"})
    with read_only_transaction(url) as session:
        anchor = verify_chain(session)["head"]
        at = session.execute(text("SELECT at FROM audit_events WHERE seq = 1")).scalar_one()
    assert anchor["seq"] == 2
    db = sqlite3.connect(tmp_path / "unlearnd.db")
    try:
        if rewrite == "another-offset":
            instant = datetime.fromisoformat(at).replace(tzinfo=timezone.utc)
            values = {"at": instant.astimezone(timezone(timedelta(hours=5))).isoformat(sep=" ")}
        else:
            values = {"payload": '{"actor": "mallory", "actor": "portal", "tasks": ["depth"], "note": "Zo\\u00eb"}'}
        db.executescript("DROP TRIGGER audit_events_no_update")
        db.execute(f"UPDATE audit_events SET {', '.join(f'{k} = ?' for k in values)} WHERE seq = 1", tuple(values.values()))
        db.commit()
    finally:
        db.close()
    with read_only_transaction(url) as session:
        report = verify_chain(session, anchor=(anchor["seq"], anchor["hash"]))
    assert (report["ok"], report["first_bad_seq"]) == (False, 1)
    assert "not stored as the service writes it" in report["reason"]
