"""GET /audit/events and /audit/verify: queries, then tampering found at the right seq."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from worker.db import engine_for

from .conftest import assert_problem


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
    assert client.get("/audit/verify").json() == {"ok": True, "events": 3, "first_bad_seq": None, "reason": None}

    with engine_for(settings.database_url).begin() as conn:  # rewrite history behind the API's back
        conn.execute(text(f"UPDATE audit_events SET {REWRITES[field]} WHERE seq = 2"))
    r = client.get("/audit/verify")
    assert r.status_code == 200
    assert r.json() == {"ok": False, "events": 2, "first_bad_seq": 2, "reason": "hash does not match contents"}


def test_verify_finds_a_deleted_event(client, settings, model):
    _post(client, model, 3)
    with engine_for(settings.database_url).begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    report = client.get("/audit/verify").json()
    assert (report["ok"], report["first_bad_seq"]) == (False, 3)
