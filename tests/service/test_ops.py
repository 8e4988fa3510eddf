"""/metrics, /healthz, /readyz and the problem documents of the framework itself."""
from __future__ import annotations

import os
from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from app.main import create_app
from worker.migrate import head_revision
from worker.db import transaction
from worker.tables import Alias, DeletionRequest, Job, ModelVersion, OutboxMessage, utcnow

from .conftest import assert_problem, create_database, drop_database


def _samples(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_read_the_record(client, settings, model):
    ids = [
        client.post("/deletions", json={"instance_id": model.train_ids[i], "tasks": ["depth"]}).json()["id"]
        for i in range(4)
    ]
    client.post("/deletions", json={"instance_id": "nobody"})  # a 422 counts as HTTP traffic only
    now = utcnow()
    with transaction(settings.database_url) as s:
        s.execute(update(DeletionRequest).where(DeletionRequest.id == ids[0]).values(status="running"))
        s.execute(update(DeletionRequest).where(DeletionRequest.id == ids[1]).values(status="completed"))
        for seconds, status in ((3, "completed"), (40, "completed"), (400, "failed")):
            s.add(Job(model_name=model.name, kind="deletion", status=status, method="m", base_version=1,
                      started_at=now - timedelta(seconds=seconds), finished_at=now))
        s.add(Job(model_name=model.name, kind="deletion", status="running", method="m", base_version=1,
                  started_at=now))
        s.add(ModelVersion(model_name=model.name, version=2, parent_version=1, sha256="2" * 64, artifact_uri="x",
                           deletions=[ids[1]], erased_cells=[], metrics={"uis": 1.75, "uis_task": 0.0,
                                                                          "uis_inst": 1.75, "mia_auc": 0.51,
                                                                          "mia_auc_original": 0.8}))
        s.get(Alias, (model.name, "serving")).version = 2
        # the oldest message the relay has not published: five minutes old
        oldest = s.execute(select(func.min(OutboxMessage.id)).where(OutboxMessage.published_at.is_(None))).scalar_one()
        s.execute(update(OutboxMessage).where(OutboxMessage.id == oldest).values(created_at=now - timedelta(seconds=300)))

    m = _samples(client)
    assert m[("unlearnd_record_up", ())] == 1
    assert m[("unlearnd_deletion_requests", (("status", "queued"),))] == 2
    assert m[("unlearnd_deletion_requests", (("status", "running"),))] == 1
    assert m[("unlearnd_deletion_requests", (("status", "completed"),))] == 1
    assert m[("unlearnd_deletion_requests", (("status", "failed"),))] == 0
    assert m[("unlearnd_deletion_requests_received_total", ())] == 4
    assert m[("unlearnd_queue_depth", (("model", model.name),))] == 2
    assert m[("unlearnd_outbox_unpublished", ())] == 4  # no relay runs here: the broker never got them
    # its age at the scrape: 300 s when the row was aged, plus the seconds the test took since
    assert 300 <= m[("unlearnd_outbox_oldest_unpublished_seconds", ())] < 300 + (utcnow() - now).total_seconds() + 1
    assert m[("unlearnd_jobs", (("status", "completed"),))] == 2
    assert m[("unlearnd_jobs", (("status", "running"),))] == 1
    assert m[("unlearnd_jobs", (("status", "failed"),))] == 1
    kind = ("kind", "deletion")
    assert m[("unlearnd_job_duration_seconds_count", (kind,))] == 3
    assert m[("unlearnd_job_duration_seconds_sum", (kind,))] == 443
    assert m[("unlearnd_job_duration_seconds_bucket", (kind, ("le", "5.0")))] == 1
    assert m[("unlearnd_job_duration_seconds_bucket", (kind, ("le", "60.0")))] == 2
    assert m[("unlearnd_job_duration_seconds_bucket", (kind, ("le", "+Inf")))] == 3
    label = (("model", model.name),)
    assert m[("unlearnd_model_serving_version", label)] == 2
    assert m[("unlearnd_model_uis_percent", label)] == 1.75
    assert m[("unlearnd_model_mia_auc", label)] == 0.51
    assert m[("unlearnd_model_mia_auc_original", label)] == 0.8
    http = "unlearnd_http_requests_total"
    assert m[(http, (("method", "POST"), ("route", "/deletions"), ("status", "202")))] == 4
    assert m[(http, (("method", "POST"), ("route", "/deletions"), ("status", "422")))] == 1
    assert m[("unlearnd_http_request_duration_seconds_count", (("method", "POST"), ("route", "/deletions")))] == 5

    client.get(f"/deletions/{ids[0]}")
    for token in ("FOO", "BAR1", "PROPFIND"):  # methods a client makes up share one label value
        client.request(token, "/healthz")
    m = _samples(client)
    assert m[(http, (("method", "GET"), ("route", "/deletions/{request_id}"), ("status", "200")))] == 1
    assert m[(http, (("method", "OTHER"), ("route", "/healthz"), ("status", "405")))] == 3
    assert not any(dict(labels).get("method") in ("FOO", "BAR1", "PROPFIND") for _, labels in m)
    assert m[("unlearnd_model_uis_task_percent", label)] == 0.0

    # the API docs are routes too (Starlette's, which do not put themselves in the scope); a
    # path no route has is <unmatched>
    client.get("/openapi.json")
    client.get("/docs")
    client.get("/no-such-path")
    m = _samples(client)
    assert m[(http, (("method", "GET"), ("route", "/openapi.json"), ("status", "200")))] == 1
    assert m[(http, (("method", "GET"), ("route", "/docs"), ("status", "200")))] == 1
    assert m[(http, (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert not any(dict(labels).get("route") == "<unmatched>" and dict(labels).get("status") == "200"
                   for name, labels in m if name == http)


def test_health_and_readiness(client):
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "revision": head_revision()}


def test_not_ready_when_unmigrated_or_unreachable(settings):
    name = f"unlearnd_test_{os.getpid()}_empty"
    url = create_database(name)
    try:
        with TestClient(create_app(settings.model_copy(update={"database_url": url}))) as c:
            ready = c.get("/readyz")
            body = assert_problem(ready, 503, "not-ready")
            assert (body["reason"], body["revision"], body["head"]) == ("migrations", None, head_revision())
            assert ready.headers["retry-after"] == "5"
            assert c.get("/healthz").status_code == 200
        with TestClient(create_app(settings.model_copy(update={"database_url": url})),
                        raise_server_exceptions=False) as c:
            # the routes that need the record: 503 (PostgreSQL's undefined table was a 500), as on SQLite
            r = c.get("/deletions")
            assert "not migrated" in assert_problem(r, 503, "database-unavailable")["detail"]
            assert r.headers["retry-after"] == "5"
    finally:
        drop_database(name)
    gone = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:5432/unlearnd_test_absent"})
    with TestClient(create_app(gone)) as c:
        ready = c.get("/readyz")
        assert assert_problem(ready, 503)["reason"] == "database"
        assert ready.headers["retry-after"] == "5"  # as every other 503 (it had none)
        assert _samples(c)[("unlearnd_record_up", ())] == 0  # a scrape still answers
        # the routes that need the record: 503 with Retry-After, not a 500
        for r in (c.get("/deletions"), c.post("/deletions", json={"instance_id": "indoor-00001"})):
            assert assert_problem(r, 503, "database-unavailable")["detail"].startswith("the record (database)")
            assert r.headers["retry-after"] == "5"


def test_framework_errors_are_problems(client):
    body = assert_problem(client.get("/no/such/route"), 404, "not-found")
    assert body["instance"] == "/no/such/route"
    assert_problem(client.delete("/deletions"), 405, "method-not-allowed")
    # a path outside the OpenAPI document names HEAD with GET too, as the documented ones do
    r = client.post("/metrics")
    assert assert_problem(r, 405, "method-not-allowed") and r.headers["allow"] == "GET, HEAD"
    assert client.head("/metrics").status_code == 200
    body = assert_problem(client.get("/deletions", params={"since": "yesterday"}), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["query", "since"]
    assert client.get("/docs").status_code == 200
    assert "/deletions" in client.get("/openapi.json").json()["paths"]


def test_the_database_counts_job_durations_as_python_would(settings, model, tmp_path):
    """The duration histogram is one grouped query on PostgreSQL; it gives what the per-row
    Python reading (SQLite's) gives, fractions of a second and a clock stepped back included."""
    from app.metrics import RecordCollector
    from prometheus_client.core import HistogramMetricFamily

    from worker.db import session_factory

    from .conftest import on_sqlite, register_model

    lite = on_sqlite(settings, tmp_path)
    register_model(lite)
    now = utcnow()
    durations = {"deletion": (0.25, 1.0, 1.5, 5.000999, 59.999, 60.0, 60.0004, 3600.5, -2.0), "reapply": (14.75,)}
    for url in (settings.database_url, lite.database_url):
        with transaction(url) as s:
            for kind, values in durations.items():
                for d in values:
                    s.add(Job(model_name=model.name, kind=kind, status="completed", method="m", base_version=1,
                              started_at=now - timedelta(seconds=d), finished_at=now))
            s.add(Job(model_name=model.name, kind="deletion", status="running", method="m", base_version=1,
                      started_at=now))
        collector = RecordCollector(session_factory(url))
        with collector.sessions() as s:
            by_sql = collector._job_durations(s)
            by_python = collector._job_durations_in_python(
                s, HistogramMetricFamily("x", "x", labels=["kind"]),
                (Job.started_at.is_not(None), Job.finished_at.is_not(None)))
        sql = {(x.labels["kind"], x.labels.get("le"), x.name.rsplit("_", 1)[1]): x.value for x in by_sql.samples}
        py = {(x.labels["kind"], x.labels.get("le"), x.name.rsplit("_", 1)[1]): x.value for x in by_python.samples}
        assert sql.keys() == py.keys() and sql, url
        for key, value in py.items():
            assert abs(sql[key] - value) < 1e-3, (url, key, sql[key], value)
        assert sql[("deletion", "1.0", "bucket")] == 3  # 0.25, 1.0 and the clock step back (0)
        assert sql[("deletion", "5.0", "bucket")] == 4  # not 5.000999
        assert sql[("deletion", "60.0", "bucket")] == 7 and sql[("deletion", "+Inf", "bucket")] == 9
        assert sql[("reapply", None, "count")] == 1
