"""POST /deletions and GET /deletions*: validation, atomic acceptance, idempotency, queries."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from worker.audit import append_event
from worker.db import transaction
from worker.tables import AuditEvent, DeletionRequest, Job, ModelVersion, OutboxMessage, Tombstone, iso_utc, utcnow
from worker.requests import certificate_hash
from unlearning.data import dataset_key

from .conftest import assert_problem, counts


def test_valid_post_writes_request_audit_event_and_outbox_row_in_one_go(client, settings, model):
    iid = model.train_ids[3]
    r = client.post("/deletions", json={"instance_id": iid, "tasks": ["depth"], "reason": "consent withdrawn"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/deletions/{body['id']}"
    assert body["status"] == "queued" and body["model"] == model.name and body["tasks"] == ["depth"]

    with transaction(settings.database_url) as s:
        (req,) = s.execute(select(DeletionRequest)).scalars().all()
        (event,) = s.execute(select(AuditEvent)).scalars().all()
        (msg,) = s.execute(select(OutboxMessage)).scalars().all()
    assert (req.id, req.status, req.instance_id, req.tasks, req.reason) == (
        body["id"], "queued", iid, ["depth"], "consent withdrawn")
    assert (event.kind, event.request_id, event.instance_id, event.model_name) == (
        "deletion.received", req.id, iid, model.name)
    assert "consent withdrawn" not in str(event.payload)  # free text stays out of the append-only log
    assert (msg.topic, msg.payload, msg.published_at) == ("process_model", {"model_name": model.name}, None)


def test_all_tasks_is_the_default_and_resolves_to_the_models_tasks(client, model):
    r = client.post("/deletions", json={"instance_id": model.train_ids[0]})
    assert r.status_code == 202, r.text
    assert r.json()["tasks"] == model.tasks


def test_malformed_json_is_a_400_problem_and_stores_nothing(client, settings, model):
    before = counts(settings)
    r = client.post("/deletions", content=b'{"instance_id": ', headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed-json")
    assert counts(settings) == before


@pytest.mark.parametrize(
    "payload, status, slug, named",
    [
        ({"tasks": ["depth"]}, 422, "validation-error", "instance_id"),  # missing field
        ({"instance_id": "X", "tasks": []}, 422, "invalid-request", "at least one task"),
        ({"instance_id": "X", "tasks": "some"}, 422, "validation-error", "tasks"),
        ({"instance_id": "X", "colour": "red"}, 422, "validation-error", "colour"),  # unknown field
        ({"instance_id": "@train0", "model": "no-such-model"}, 404, "not-found", "no-such-model"),
        ({"instance_id": "@train0", "tasks": ["depth", "smell"]}, 422, "invalid-request", "smell"),
        ({"instance_id": "nobody-0000"}, 422, "invalid-request", "nobody-0000"),
        ({"instance_id": "@test0"}, 422, "invalid-request", "not in the training data"),  # held-out instance
    ],
)
def test_bad_input_is_a_problem_and_stores_nothing(client, settings, model, payload, status, slug, named):
    payload = {k: _resolve(v, model) for k, v in payload.items()}
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json=payload), status, slug)
    assert named in str(body)
    assert counts(settings) == before


def _resolve(value, model):
    if value == "@train0":
        return model.train_ids[0]
    if value == "@test0":
        return model.test_ids[0]
    return value


def test_tombstoned_cell_is_a_409_naming_it(client, settings, model):
    iid = model.train_ids[5]
    with transaction(settings.database_url) as s:
        s.add(Tombstone(dataset_key=dataset_key(model.spec), instance_id=iid, task="depth", request_id="r-old"))
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json={"instance_id": iid, "tasks": ["segmentation", "depth"]}), 409)
    # the serving version (v1) still holds it: the dataset's erasure has yet to reach this model
    assert body["cells"] == [{"instance_id": iid, "task": "depth", "state": "erased", "request_id": "r-old",
                              "propagating": True}]
    assert "still holds it until its propagate job has run" in body["detail"]
    assert counts(settings) == before
    # "all" takes what is left: a full erasure after a partial one is accepted
    r = client.post("/deletions", json={"instance_id": iid, "tasks": "all"})
    assert r.status_code == 202, r.text
    assert r.json()["tasks"] == [t for t in model.tasks if t != "depth"]


def test_pending_cell_is_a_409_naming_the_request(client, settings, model):
    iid = model.train_ids[6]
    first = client.post("/deletions", json={"instance_id": iid, "tasks": ["normal"]}).json()
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json={"instance_id": iid, "tasks": ["normal", "depth"]}), 409)
    assert body["cells"] == [{"instance_id": iid, "task": "normal", "state": "pending", "request_id": first["id"]}]
    assert first["id"] in body["detail"]
    assert counts(settings) == before
    # once the first one fails, its cells are free again
    with transaction(settings.database_url) as s:
        s.execute(update(DeletionRequest).values(status="failed"))
    assert client.post("/deletions", json={"instance_id": iid, "tasks": ["normal"]}).status_code == 202


def test_all_when_nothing_is_left_is_a_409(client, model):
    iid = model.train_ids[7]
    assert client.post("/deletions", json={"instance_id": iid}).status_code == 202
    body = assert_problem(client.post("/deletions", json={"instance_id": iid}), 409)
    assert sorted(c["task"] for c in body["cells"]) == sorted(model.tasks)


def test_idempotency_key_replays_the_first_answer(client, settings, model):
    payload = {"instance_id": model.train_ids[1], "tasks": ["depth", "normal"], "subject_ref": "ticket-9"}
    first = client.post("/deletions", json=payload, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    # same body (task order does not matter) -> same status and body, no new rows
    again = client.post(
        "/deletions", json={**payload, "tasks": ["normal", "depth"]}, headers={"Idempotency-Key": "k-1"}
    )
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    c = counts(settings)
    assert (c["deletion_requests"], c["outbox"], c["audit_events"]) == (1, 1, 1)
    # even after the worker moved it on, the stored answer is what comes back
    with transaction(settings.database_url) as s:
        s.execute(update(DeletionRequest).values(status="running", progress=0.5))
    assert client.post("/deletions", json=payload, headers={"Idempotency-Key": "k-1"}).json() == first.json()

    body = assert_problem(
        client.post("/deletions", json={**payload, "tasks": ["depth"]}, headers={"Idempotency-Key": "k-1"}), 422
    )
    assert body["request_id"] == first.json()["id"]
    assert counts(settings)["deletion_requests"] == 1


def test_get_by_id_and_unknown_id(client, model):
    created = client.post("/deletions", json={"instance_id": model.train_ids[2], "tasks": ["depth"]}).json()
    r = client.get(f"/deletions/{created['id']}")
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["progress"], body["produced_version"], body["tasks"]) == ("queued", 0.0, None, ["depth"])
    assert body["created_at"].endswith("Z")
    assert_problem(client.get("/deletions/not-a-request"), 404, "not-found")


def test_list_filters_and_cursor_pagination(client, settings, model):
    ids = [
        client.post("/deletions", json={"instance_id": model.train_ids[i], "tasks": ["depth"]}).json()["id"]
        for i in range(5)
    ]
    base = utcnow() - timedelta(hours=1)
    with transaction(settings.database_url) as s:  # distinct, known creation times; two share one
        for n, rid in enumerate(ids):
            s.execute(
                update(DeletionRequest)
                .where(DeletionRequest.id == rid)
                .values(created_at=base + timedelta(minutes=min(n, 3)), status="completed" if n % 2 else "queued")
            )
    newest_first = sorted(ids, key=lambda rid: (min(ids.index(rid), 3), rid), reverse=True)

    seen, cursor = [], None
    while True:
        r = client.get("/deletions", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first

    def ids_for(**params):
        return [i["id"] for i in client.get("/deletions", params=params).json()["items"]]

    assert ids_for(instance_id=model.train_ids[2]) == [ids[2]]
    assert set(ids_for(status="completed")) == {ids[1], ids[3]}
    assert ids_for(model="other") == []
    assert set(ids_for(since=(base + timedelta(minutes=3)).isoformat())) == {ids[3], ids[4]}
    assert set(ids_for(until=(base + timedelta(minutes=1)).isoformat())) == {ids[0]}
    assert_problem(client.get("/deletions", params={"cursor": "bogus"}), 422)
    assert_problem(client.get("/deletions", params={"limit": 0}), 422, "validation-error")


def _complete(settings, request_id: str, metrics: dict, payload: dict | None = None) -> None:
    """What a worker does when a request completes (enough of it for a certificate), its
    ``deletion.completed`` event as worker.jobs writes it (``payload``: instead, an older record's)."""
    with transaction(settings.database_url) as s:
        req = s.get(DeletionRequest, request_id)
        job = Job(model_name=req.model_name, kind="deletion", status="completed", method="interference_aware",
                  base_version=1, produced_version=2, progress=1.0, metrics=metrics,
                  started_at=utcnow(), finished_at=utcnow())
        s.add(job)
        s.flush()
        s.add(ModelVersion(model_name=req.model_name, version=2, parent_version=1, job_id=job.id, sha256="a" * 64,
                           artifact_uri="file:///fake/v2", deletions=[req.id],
                           erased_cells=[[req.instance_id, t] for t in req.tasks], metrics=metrics))
        req.status, req.job_id, req.base_version, req.produced_version = "completed", job.id, 1, 2
        req.metrics, req.progress, req.completed_at = metrics, 1.0, utcnow()
        cells = [[req.instance_id, t] for t in req.tasks]
        append_event(s, "deletion.completed", model_name=req.model_name, request_id=req.id,
                     instance_id=req.instance_id, payload=payload if payload is not None else {
                         "job_id": job.id, "version": 2, "base_version": 1, "cells": cells,
                         "method": "interference_aware", "sha256": "a" * 64, "metrics": metrics})
        append_event(s, "job.completed", model_name=req.model_name, payload={"job_id": job.id})


def test_certificate_only_once_completed(client, settings, model):
    iid = model.train_ids[4]
    rid = client.post("/deletions", json={"instance_id": iid, "tasks": ["depth", "normal"]}).json()["id"]
    body = assert_problem(client.get(f"/deletions/{rid}/certificate"), 409)
    assert body["request_status"] == "queued"
    assert_problem(client.get("/deletions/nope/certificate"), 404)

    metrics = {"uis": 1.5, "uis_task": 2.0, "uis_inst": 1.25, "mia_auc": 0.52, "mia_auc_original": 0.81}
    _complete(settings, rid, metrics)
    r = client.get(f"/deletions/{rid}/certificate")
    assert r.status_code == 200, r.text
    cert = r.json()
    assert cert["removed"] == {"instance_id": iid, "tasks": ["depth", "normal"],
                               "cells": [[iid, "depth"], [iid, "normal"]]}
    assert (cert["model"], cert["method"], cert["version_before"], cert["version_after"]) == (
        model.name, "interference_aware", 1, 2)
    assert (cert["uis"], cert["uis_task"], cert["uis_inst"], cert["mia_auc"], cert["mia_auc_original"]) == (
        1.5, 2.0, 1.25, 0.52, 0.81)
    with transaction(settings.database_url) as s:
        received = s.execute(select(AuditEvent).where(AuditEvent.kind == "deletion.received")).scalar_one()
        done = s.execute(select(AuditEvent).where(AuditEvent.kind == "deletion.completed")).scalar_one()
        head = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()
    assert cert["version_after_sha256"] == "a" * 64 and cert["job_id"] == done.payload["job_id"]
    # the times the audit chain records, not the rows' (which a database writer could move)
    assert (cert["received_at"], cert["completed_at"]) == (iso_utc(received.at), iso_utc(done.at))
    assert cert["audit"]["completion_event"] == {"seq": done.seq, "kind": "deletion.completed", "hash": done.hash}
    assert cert["audit"]["chain_head"] == {"seq": head.seq, "hash": head.hash}
    assert head.seq == done.seq + 1
    assert cert["certificate_sha256"] == certificate_hash(cert)
    assert certificate_hash({**cert, "uis": 0.0}) != cert["certificate_sha256"]
