"""The same app over an embedded SQLite database (the default deployment)."""
from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app

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
