"""The same app over an embedded SQLite database (the default deployment)."""
from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from sqlalchemy import text

from app.main import create_app
from worker.db import transaction

from .conftest import on_sqlite, register_model


def test_the_app_works_on_sqlite(settings, tmp_path):
    lite = on_sqlite(settings, tmp_path)
    model = register_model(lite)
    with TestClient(create_app(lite)) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]},
                   headers={"Idempotency-Key": "k"})
        assert r.status_code == 202, r.text
        assert c.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]},
                      headers={"Idempotency-Key": "k"}).json() == r.json()
        assert c.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]}).status_code == 409
        for i in (1, 2):
            c.post("/deletions", json={"instance_id": model.train_ids[i]})
        page = c.get("/deletions", params={"limit": 2}).json()
        rest = c.get("/deletions", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert len({i["id"] for i in page["items"] + rest["items"]}) == 3 and rest["next_cursor"] is None
        assert c.get(f"/deletions/{r.json()['id']}").json()["status"] == "queued"
        assert c.get("/audit/verify").json()["ok"] is True
        assert 'unlearnd_queue_depth{model="test-mtl"} 3.0' in c.get("/metrics").text
        assert c.post(f"/models/{model.name}/rollback", json={"version": 1}).json()["action"] == "noop"


def test_reads_do_not_wait_for_the_write_lock_on_sqlite(settings, tmp_path):
    """SQLite transactions that write begin IMMEDIATE (the write lock up front); the GET
    routes and the metrics scrape begin DEFERRED, so while a job publishes or a request is
    accepted they read a snapshot instead of waiting (up to the 30 s busy timeout)."""
    lite = on_sqlite(settings, tmp_path)
    model = register_model(lite)
    with TestClient(create_app(lite)) as c:
        rid = c.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]}).json()["id"]
        held, release = threading.Event(), threading.Event()

        def writer():
            with transaction(lite.database_url) as session:  # holds the write lock until released
                session.execute(text("UPDATE deletion_requests SET reason = reason"))
                held.set()
                release.wait(60)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert held.wait(10)
            paths = [f"/deletions/{rid}", "/deletions", "/models", f"/models/{model.name}/versions",
                     f"/models/{model.name}/versions/1", "/audit/events", "/audit/verify", "/metrics", "/readyz"]
            reads = {path: c.get(path) for path in paths}
            lock_still_held = thread.is_alive() and not release.is_set()
        finally:
            release.set()
            thread.join()
    assert lock_still_held
    assert {path: r.status_code for path, r in reads.items()} == {path: 200 for path in paths}
    assert reads[f"/deletions/{rid}"].json()["status"] == "queued"
    assert 'unlearnd_queue_depth{model="test-mtl"} 1.0' in reads["/metrics"].text
