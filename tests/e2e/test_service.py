"""The service end to end: HTTP API -> PostgreSQL + outbox -> relay -> Redis -> Celery
worker process -> engine -> model store -> record, on a tiny model."""
from __future__ import annotations

import math
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from .conftest import wait_for

pytestmark = pytest.mark.service

JOB_TIMEOUT = 150


def _instances(settings) -> list[str]:
    from worker.datasets import dataset_spec, get_splits

    return get_splits(dataset_spec(settings))[0].instance_ids


def _post(client, instance_id: str, tasks="all"):
    key = str(uuid.uuid4())
    r = client.post("/deletions", json={"instance_id": instance_id, "tasks": tasks, "reason": "e2e"},
                    headers={"Idempotency-Key": key})
    assert r.status_code == 202, r.text
    return r.json(), key


def _wait_done(client, request_id: str) -> dict:
    def done():
        body = client.get(f"/deletions/{request_id}").json()
        return body if body["status"] in ("completed", "failed", "rejected") else None

    body = wait_for(done, JOB_TIMEOUT, 0.5, what=f"request {request_id} to finish")
    assert body["status"] == "completed", body
    return body


def _session(settings):
    from worker.db import transaction

    return transaction(settings.database_url)


def _version_count(session, settings) -> int:
    """How many versions of the service's model the record holds (not every model's: the
    last test registers a second model, whose propagate jobs publish beside it)."""
    from worker.tables import ModelVersion

    return session.execute(select(func.count()).select_from(ModelVersion)
                           .where(ModelVersion.model_name == settings.model_name)).scalar()


def test_deletion_becomes_a_new_version_with_metrics_audit_and_certificate(client, settings, store, celery_worker):
    instance = _instances(settings)[0]
    accepted, key = _post(client, instance)
    # the same Idempotency-Key and body replay the first answer, not a second request
    again = client.post("/deletions", json={"instance_id": instance, "tasks": "all", "reason": "e2e"},
                        headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json()["id"] == accepted["id"]

    done = _wait_done(client, accepted["id"])
    version = done["produced_version"]
    # the Celery worker process ran it (the API process only relayed the outbox); it logs
    # "published" after the commit that completed the request, so the line may come later
    wait_for(lambda: f"job {done['job_id']} published" in celery_worker.log.read_text(), 30,
             what=f"the worker's log line for job {done['job_id']}")
    assert version >= 2 and done["base_version"] == version - 1
    assert done["progress"] == 1.0
    for key_ in ("uis", "uis_task", "uis_inst"):
        assert math.isfinite(done["metrics"][key_]) and done["metrics"][key_] >= 0, key_
    for key_ in ("mia_auc", "mia_auc_original"):
        assert 0.0 <= done["metrics"][key_] <= 1.0, key_
    # calibrated once for the lineage (the first version's recipe), kept in the store
    calibration = store.calibration(settings.model_name)
    assert calibration["recipe"] == store.manifest(settings.model_name, 1).train_config
    assert done["metrics"]["calibration"] == "shadow_scores"
    expected = [calibration["full"][instance][t] for t in accepted["tasks"]]
    assert done["metrics"]["mia_auc_expected"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)

    # the stored artifact: manifest lists the request and its cells, weights verify
    manifest = store.manifest(settings.model_name, version)
    assert manifest.deletions == [accepted["id"]]
    assert sorted(map(tuple, manifest.deleted_cells)) == sorted((instance, t) for t in accepted["tasks"])
    assert {tuple(c) for c in manifest.deleted_cells} <= {tuple(c) for c in manifest.erased_cells}
    assert manifest.parent == version - 1 and manifest.job_id == done["job_id"]
    assert manifest.metrics["uis"] == pytest.approx(done["metrics"]["uis"])
    assert store.verify(settings.model_name, version)

    # the API serves the version, now serving, with the same metrics and hash
    v = client.get(f"/models/{settings.model_name}/versions/{version}").json()
    assert v["serving"] is True and v["sha256"] == manifest.sha256 and v["deletions"] == [accepted["id"]]
    assert v["metrics"]["mia_auc"] == pytest.approx(done["metrics"]["mia_auc"])
    assert [a["version"] for a in v["ancestors"]][-1] == 1

    # audit: the request's events in order, and the chain verifies
    events = client.get("/audit/events", params={"request_id": accepted["id"]}).json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "deletion.received" and kinds[-1] == "deletion.completed", kinds
    assert events[-1]["payload"]["version"] == version
    by_instance = [e["kind"] for e in client.get("/audit/events", params={"instance_id": instance}).json()["items"]]
    assert "deletion.completed" in by_instance
    job_events = client.get("/audit/events", params={"kind": "job.completed"}).json()["items"]
    assert any(e["payload"]["job_id"] == done["job_id"] and e["payload"]["version"] == version for e in job_events)
    chain = client.get("/audit/verify").json()
    assert chain["ok"] is True and chain["events"] >= 4

    cert = client.get(f"/deletions/{accepted['id']}/certificate")
    assert cert.status_code == 200, cert.text
    body = cert.json()
    assert body["request_id"] == accepted["id"] and body["version_after"] == version
    assert body["version_after_sha256"] == manifest.sha256 and body["mia_auc"] == pytest.approx(done["metrics"]["mia_auc"])


def test_tombstoned_cells_never_reenter_retain_data(client, settings, store):
    from worker.datasets import dataset_spec, erased_cells
    from worker.jobs import job_data

    ids = _instances(settings)
    full, partial = ids[1], ids[2]
    first = _wait_done(client, _post(client, full)[0]["id"])
    second_req, _ = _post(client, partial, ["depth"])
    second = _wait_done(client, second_req["id"])
    assert second["produced_version"] == first["produced_version"] + 1

    spec = dataset_spec(settings)
    with _session(settings) as session:
        tomb = erased_cells(session, spec)
    assert tomb[(partial, "depth")] == second_req["id"]
    assert all((full, t) in tomb for t in first["tasks"])

    # the data the next job would run on: no erased cell, and a fully erased instance is gone
    latest = store.manifest(settings.model_name, second["produced_version"])
    assert {(partial, "depth"), *((full, t) for t in first["tasks"])} <= {tuple(c) for c in latest.erased_cells}
    nxt = ids[3]
    data = job_data(settings, spec, latest, [(nxt, "segmentation")])
    train_cells = set(data.train.cells())
    assert not (set(tomb) & train_cells)
    assert full not in data.train.instance_ids
    assert partial in data.train.instance_ids and (partial, "segmentation") in train_cells
    retain = set(data.train.without(data.forget_cells).cells())
    assert (nxt, "segmentation") not in retain and not (set(tomb) & retain)

    # and the API refuses to erase an erased cell again
    r = client.post("/deletions", json={"instance_id": partial, "tasks": ["depth"]})
    assert r.status_code == 409, r.text


def test_a_job_that_runs_twice_publishes_one_version(client, settings, store, monkeypatch, paused_worker):
    """Claim a job in this process (no outbox row, and the worker paused: a re-announce of
    the model left by an earlier job cannot claim it first), store its artifact, 'crash'
    before publishing, then run it twice and publish twice."""
    from worker import jobs
    from worker.tables import AuditEvent, DeletionRequest, Job, ModelVersion

    instance = _instances(settings)[4]
    with _session(settings) as session:
        req = DeletionRequest(model_name=settings.model_name, instance_id=instance, tasks=["normal"],
                              status="queued")
        session.add(req)
        session.flush()
        request_id = req.id
    claim = jobs.claim_next(settings, settings.model_name)
    status, job_id = claim.status, claim.job_id
    assert status == "claimed"
    # one active job per model
    assert jobs.claim_next(settings, settings.model_name) == jobs.Claim("busy", job_id=job_id, reason="running")

    with _session(settings) as session:
        job = session.get(Job, job_id)
        base, cells = job.base_version, job.params["cells"]
        versions_before = _version_count(session, settings)
    assert cells == [[instance, "normal"]]
    target = jobs._target_version(settings, store, job_id, claim.attempt)
    assert jobs._target_version(settings, store, job_id, claim.attempt) == target  # fixed on the job row
    stored = jobs._compute(settings, store, job_id, settings.model_name, base, target,
                           store.manifest(settings.model_name, base).dataset, [(instance, "normal")],
                           [request_id], job.method, "deletion")
    assert store.exists(settings.model_name, target) and stored.job_id == job_id

    def computed_again(*args, **kwargs):
        raise AssertionError("the stored artifact was computed again")

    monkeypatch.setattr(jobs, "_compute", computed_again)
    first = jobs.run_job(settings, store, job_id)  # finds the artifact: publishes it, no second computation
    second = jobs.run_job(settings, store, job_id)
    third = jobs.publish_version(settings, store, job_id, stored)
    assert first.status == second.status == third.status == "completed"
    assert first.version == second.version == third.version == target

    with _session(settings) as session:
        rows = session.execute(select(ModelVersion).where(ModelVersion.job_id == job_id)).scalars().all()
        total = _version_count(session, settings)
        req = session.get(DeletionRequest, request_id)
        completed_events = session.execute(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.kind == "job.completed",
                                                                AuditEvent.payload["job_id"].as_string() == job_id)
        ).scalar()
    assert len(rows) == 1 and rows[0].sha256 == stored.sha256 and rows[0].version == target
    assert total == versions_before + 1
    assert req.status == "completed" and req.produced_version == target
    served = client.get(f"/models/{settings.model_name}/versions").json()
    assert [v["version"] for v in served if v["serving"]] == [target]
    assert completed_events == 1
    # a delivery for the model now finds nothing to do
    assert jobs.process_model(settings, store, settings.model_name).status == "idle"


def test_sweeper_reenqueues_a_job_whose_worker_died(client, settings, store, paused_worker):
    """A job left 'running' by a dead worker (stale heartbeat) goes back to the queue; the
    real Celery worker (paused while this process claims the job) then runs it to completion."""
    from worker import jobs
    from worker.celery_app import create_celery, publisher
    from worker.outbox import sweep_once
    from worker.tables import DeletionRequest, Job

    instance = _instances(settings)[5]
    with _session(settings) as session:
        req = DeletionRequest(model_name=settings.model_name, instance_id=instance, tasks=["segmentation"],
                              status="queued")
        session.add(req)
        session.flush()
        request_id = req.id
    claim = jobs.claim_next(settings, settings.model_name)
    status, job_id = claim.status, claim.job_id
    assert status == "claimed"
    paused_worker()  # resume: from here on the job is the worker's to run, once swept
    publish = publisher(create_celery(settings))

    # This sweep counts work stale after 60 s; the API's own sweeper (every 150 s) after the
    # service's 600: a heartbeat 120 s old is this sweep's alone, which then finds it exactly.
    sweeper = settings.model_copy(update={"stale_after_s": 60})
    # fresh heartbeat: the sweeper leaves it alone
    assert sweep_once(sweeper, publish)["jobs"] == 0
    with _session(settings) as session:
        old = session.get(Job, job_id).heartbeat_at - timedelta(seconds=120)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))
    swept = sweep_once(sweeper, publish)
    assert swept["jobs"] == 1 and swept["models"] == [settings.model_name]

    done = _wait_done(client, request_id)
    assert done["job_id"] == job_id
    with _session(settings) as session:
        job = session.get(Job, job_id)
        assert job.status == "completed" and job.attempts == 2
    requeued = client.get("/audit/events", params={"kind": "job.requeued"}).json()["items"]
    assert any(e["payload"]["job_id"] == job_id for e in requeued)


def test_sweeper_reannounces_a_request_whose_message_was_lost(client, settings, paused_worker):
    """A request queued long ago and never announced is announced by the sweeper. The worker
    is paused meanwhile (an announcement of an earlier test's model, still on its way, would
    claim the request first), and, as above, the row is stale to this sweep alone."""
    from worker.celery_app import create_celery, publisher
    from worker.outbox import sweep_once
    from worker.tables import DeletionRequest, utcnow

    instance = _instances(settings)[6]
    with _session(settings) as session:  # queued a while ago, never announced
        old = utcnow() - timedelta(seconds=120)
        req = DeletionRequest(model_name=settings.model_name, instance_id=instance, tasks=["depth"],
                              status="queued", created_at=old, updated_at=old)
        session.add(req)
        session.flush()
        request_id = req.id
    swept = sweep_once(settings.model_copy(update={"stale_after_s": 60}), publisher(create_celery(settings)))
    assert swept["requests"] == 1
    paused_worker()
    assert _wait_done(client, request_id)["produced_version"] >= 2


def test_metrics_count_the_work(client, settings):
    """After a deletion of its own (so the test stands alone), /metrics agrees with the record,
    and the serving version's gauges are that deletion's metrics."""
    done = _wait_done(client, _post(client, _instances(settings)[7], ["segmentation"])[0]["id"])
    text = client.get("/metrics").text

    def value(name: str, labels: str = "") -> float:
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name}{labels} not in /metrics"
        return float(m.group(1))

    with _session(settings) as session:
        from worker.tables import DeletionRequest, Job

        completed = session.execute(
            select(func.count()).select_from(DeletionRequest).where(DeletionRequest.status == "completed")
        ).scalar()
        jobs_done = session.execute(select(func.count()).select_from(Job).where(Job.status == "completed")).scalar()
    assert completed >= 1
    assert value("unlearnd_deletion_requests", '{status="completed"}') == completed
    assert value("unlearnd_jobs", '{status="completed"}') == jobs_done
    model = f'{{model="{settings.model_name}"}}'
    assert value("unlearnd_queue_depth", model) == 0
    assert value("unlearnd_model_serving_version", model) == done["produced_version"]
    assert value("unlearnd_model_mia_auc", model) == pytest.approx(done["metrics"]["mia_auc"])
    assert value("unlearnd_model_uis_percent", model) == pytest.approx(done["metrics"]["uis"])


def test_a_job_with_a_bad_cell_fails_cleanly(client, settings, store, paused_worker):
    """The API never lets an unknown instance through; if one reaches a job anyway, the job
    and its request fail with the error, nothing is published, and the model is free again.
    The worker is paused: this process claims and runs the job."""
    from worker import jobs
    from worker.tables import DeletionRequest

    with _session(settings) as session:
        req = DeletionRequest(model_name=settings.model_name, instance_id="no-such-instance", tasks=["depth"],
                              status="queued")
        session.add(req)
        session.flush()
        request_id = req.id
        versions_before = _version_count(session, settings)
    claim = jobs.claim_next(settings, settings.model_name)
    status, job_id = claim.status, claim.job_id
    assert status == "claimed"
    outcome = jobs.run_job(settings, store, job_id)
    assert outcome.status == "failed" and "no-such-instance" in outcome.error

    body = client.get(f"/deletions/{request_id}").json()
    assert body["status"] == "failed" and "no-such-instance" in body["error"]
    assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"
    failed = client.get("/audit/events", params={"kind": "job.failed"}).json()["items"]
    assert any(e["payload"]["job_id"] == job_id for e in failed)
    with _session(settings) as session:
        assert _version_count(session, settings) == versions_before
    assert jobs.process_model(settings, store, settings.model_name).status == "idle"
    assert client.get("/audit/verify").json()["ok"] is True


def _ends_of(task_name: str, log: str) -> list[re.Match]:
    """The worker log's lines that end a delivery of ``task_name``: (task id, how, the rest)."""
    return list(re.finditer(rf"^.*Task {re.escape(task_name)}\[([0-9a-f-]+)\] (retry|succeeded|raised)(.*)$", log,
                            re.M))


def test_a_delivery_for_a_model_busy_with_a_running_job_ends_without_a_retry(
        client, settings, store, celery_worker, paused_worker):
    """worker.tasks: a delivery that finds another job of its model running neither runs
    beside it nor is retried (each request announced during a long job kept a retry chain
    going, for up to two hours): that job's end announces the model again. Here the job is
    this process's (which announces nothing): the delivery ends, busy, and the request
    stays with the job."""
    from worker import jobs
    from worker.celery_app import PROCESS_MODEL_TASK, create_celery
    from worker.tables import DeletionRequest

    with _session(settings) as session:
        req = DeletionRequest(model_name=settings.model_name, instance_id=_instances(settings)[8], tasks=["normal"],
                              status="queued")
        session.add(req)
        session.flush()
        request_id = req.id
    claim = jobs.claim_next(settings, settings.model_name)  # this process runs the model's job
    assert claim.status == "claimed"
    task_id = create_celery(settings).send_task(PROCESS_MODEL_TASK, args=[settings.model_name]).id
    paused_worker()  # resume: the worker takes the delivery while the job is still running here

    def ended():
        return [m for m in _ends_of(PROCESS_MODEL_TASK, celery_worker.log.read_text()) if m.group(1) == task_id]

    try:
        [end] = wait_for(ended, JOB_TIMEOUT, what=f"the worker to handle delivery {task_id}")
        assert end.group(2) == "succeeded", end.group(0)  # not a retry (nor a run beside the job)
        for part in ("'status': 'busy'", f"'job_id': '{claim.job_id}'", "'reason': 'running'"):
            assert part in end.group(3), end.group(0)
        line = f"model {settings.model_name} is busy with job {claim.job_id}; its end announces the model again"
        assert line in celery_worker.log.read_text()
        body = client.get(f"/deletions/{request_id}").json()
        assert (body["status"], body["job_id"]) == ("running", claim.job_id)  # not run by the worker
    finally:  # the job ends here, whatever the delivery did: the model is free for the next tests
        outcome = jobs.run_job(settings, store, claim.job_id, claim.attempt)
    assert outcome.status == "completed"
    assert _wait_done(client, request_id)["job_id"] == claim.job_id
    assert [m.group(0) for m in ended()] == [end.group(0)]  # ended once: nothing scheduled again


def test_a_delivery_that_finds_the_model_row_locked_is_retried_by_celery(
        client, settings, celery_worker, paused_worker):
    """worker.tasks: a delivery whose claim finds the model row locked by another transaction
    (a claim, a rollback, a purge: reason 'locked') is retried through Celery with a
    countdown (Redis, the worker's ETA schedule, the same task id again), not dropped: the
    transaction holding the row may have read the queue before this request committed. Here
    this process holds the row until the first retry is logged; the retry then runs the job."""
    from worker.celery_app import PROCESS_MODEL_TASK, create_celery
    from worker.db import engine_for
    from worker.tables import DeletionRequest

    name = settings.model_name
    # the retry held for its countdown takes the worker's one slot (worker.celery_app): it no
    # longer raised the prefetch and let another job start ahead of it
    node = celery_worker.nodename
    confs = wait_for(lambda: create_celery(settings).control.inspect(destination=[node], timeout=2).conf(), 60,
                     what="the worker's configuration")
    assert confs[node]["worker_eta_task_limit"] == 1, confs[node].get("worker_eta_task_limit")
    held = engine_for(settings.database_url).connect()
    try:
        # what a claim, a rollback or a purge holds; a submission's key-share lock passes it
        held.execute(text("SELECT name FROM models WHERE name = :m FOR NO KEY UPDATE"), {"m": name})
        with _session(settings) as session:
            req = DeletionRequest(model_name=name, instance_id=_instances(settings)[12], tasks=["depth"],
                                  status="queued")
            session.add(req)
            session.flush()
            request_id = req.id
        task_id = create_celery(settings).send_task(PROCESS_MODEL_TASK, args=[name]).id
        paused_worker()  # resume: the worker takes the delivery while the row is held

        def ends():
            return [m for m in _ends_of(PROCESS_MODEL_TASK, celery_worker.log.read_text()) if m.group(1) == task_id]

        [first] = wait_for(ends, JOB_TIMEOUT, what=f"the worker to handle delivery {task_id}")
        assert first.group(2) == "retry" and "Retry in 5s" in first.group(3), first.group(0)
        line = f"model {name} is busy (locked by another claim, a rollback or a purge); retrying in 5s"
        assert line in celery_worker.log.read_text()
        assert client.get(f"/deletions/{request_id}").json()["status"] == "queued"
    finally:
        held.rollback()
        held.close()

    done = _wait_done(client, request_id)  # the retry, 5 s on, claims and runs it
    with _session(settings) as session:
        assert session.get(DeletionRequest, request_id).job_id == done["job_id"]
    again = wait_for(lambda: [m for m in ends() if m.group(2) != "retry"] or None, JOB_TIMEOUT,
                     what=f"delivery {task_id}'s retry to end")
    assert [m.group(2) for m in again] == ["succeeded"], [m.group(0) for m in ends()]
    assert "'status': 'completed'" in again[0].group(3) and done["job_id"] in again[0].group(3)


def _second_worker(service_env: dict, log):
    """Another Celery worker process on the session's database and queue (solo pool, as the
    session's): with one worker, a delivery waits for the job under way to end."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT, _child_env

    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "-c", "1",
           "--loglevel", "info", "-n", f"e2e-second-{os.getpid()}@%h", "--without-gossip", "--without-mingle"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(service_env), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: proc.poll() is not None or b"ready." in log.read_bytes(), 90, what="the second Celery worker")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def test_a_request_announced_while_the_model_is_busy_runs_when_that_job_ends(
        client, settings, celery_worker, paused_worker, service_env, redis_url, tmp_path):
    """Two workers. A job runs in one (its publish held back by this process's lock on the
    serving alias); a request submitted meanwhile is announced, and the other worker's
    delivery finds the job running and ends, with no retry. When the job ends, its worker
    announces the model, and the request runs: not after a retry, nor after the sweeper
    (UNLEARND_STALE_AFTER_S is 600 here)."""
    import redis

    from worker.celery_app import PROCESS_MODEL_TASK, create_celery
    from worker.db import engine_for

    from .conftest import WORKER_QUEUE, stop_process

    name, ids = settings.model_name, _instances(settings)
    session_log = celery_worker.log.read_text
    second = None
    try:
        held = engine_for(settings.database_url).connect()
        try:
            # the job's publish waits for this lock (publish_version locks the alias row): it stays 'running'
            held.execute(text("SELECT version FROM aliases WHERE model_name = :m AND alias = 'serving' FOR UPDATE"),
                         {"m": name})
            second_log = tmp_path / "second-worker.log"
            second = _second_worker(service_env, second_log)  # the session's worker is paused: this one runs the job
            first, _ = _post(client, ids[10])

            def running():
                body = client.get(f"/deletions/{first['id']}").json()
                return body if body["status"] == "running" else None

            job_id = wait_for(running, JOB_TIMEOUT, 0.5, what="the second worker to run the first request")["job_id"]
            # resume the session's worker: the next delivery is its (the second worker holds its job's, prefetch 1)
            paused_worker()
            app, node, broker = create_celery(settings), celery_worker.nodename, redis.Redis.from_url(redis_url)

            def quiet():  # whatever was announced before is handled (it found the job running too)
                if broker.llen(WORKER_QUEUE):
                    return False
                inspect = app.control.inspect(destination=[node], timeout=1)
                return all((question() or {}).get(node) == [] for question in (inspect.reserved, inspect.active))

            wait_for(quiet, JOB_TIMEOUT, 0.25, what="the session's worker to handle what was queued")
            offset = len(session_log())
            later, _ = _post(client, ids[11])

            [end] = wait_for(lambda: _ends_of(PROCESS_MODEL_TASK, session_log()[offset:]), JOB_TIMEOUT,
                             what="the session's worker to handle the second request's delivery")
            assert end.group(2) == "succeeded", end.group(0)  # ended: not retried
            for part in ("'status': 'busy'", f"'job_id': '{job_id}'", "'reason': 'running'"):
                assert part in end.group(3), end.group(0)
            line = f"model {name} is busy with job {job_id}; its end announces the model again"
            assert line in session_log()[offset:]
            assert client.get(f"/deletions/{later['id']}").json()["status"] == "queued"
        finally:
            held.rollback()  # the job publishes; its worker announces the model
            held.close()

        done = _wait_done(client, first["id"])
        assert done["job_id"] == job_id
        after = _wait_done(client, later["id"])  # taken by a delivery of that announcement
        assert after["job_id"] != job_id and after["base_version"] == done["produced_version"]
        ends = _ends_of(PROCESS_MODEL_TASK, session_log()[offset:] + second_log.read_text())
        assert [m.group(0) for m in ends if m.group(2) != "succeeded"] == []  # no retry anywhere
    finally:
        if second is not None:
            stop_process(second)


def test_an_erasure_reaches_a_second_model_on_the_dataset(client, settings, store):
    """Runs last: from here on the second model follows every erasure. A model trained on the
    same dataset is announced when the first model's job publishes; the real Celery worker
    then runs its propagate job, and the request's certificate names both versions."""
    from worker.bootstrap import ensure_model
    from worker.tables import Tombstone

    second = f"{settings.model_name}-b"
    model, manifest = store.load(settings.model_name, 1)
    store.put_version(model, model_name=second, version=1, parent=None, dataset=manifest.dataset,
                      train_config=manifest.train_config, note="a second model on the same dataset")
    ensure_model(settings.model_copy(update={"model_name": second}), store, progress=False)

    accepted, _ = _post(client, _instances(settings)[9], ["depth"])
    done = _wait_done(client, accepted["id"])
    assert done["model"] == settings.model_name

    def caught_up():
        m = next(m for m in client.get("/models").json() if m["name"] == second)
        return m if m["serving_version"] > 1 else None

    caught = wait_for(caught_up, JOB_TIMEOUT, 0.5, what=f"{second} to publish a propagated version")
    served = client.get(f"/models/{second}/versions/{caught['serving_version']}").json()
    with _session(settings) as session:
        tombstoned = {(t.instance_id, t.task) for t in session.execute(select(Tombstone)).scalars()}
    assert (_instances(settings)[9], "depth") in tombstoned
    assert tombstoned <= {tuple(c) for c in served["erased_cells"]}  # every erasure so far, not only this one
    cert = client.get(f"/deletions/{accepted['id']}/certificate").json()
    assert cert["propagation_pending"] == []
    assert [(c["model"], c["version"]) for c in cert["also_erased_from"]] == [(second, caught["serving_version"])]
    propagated = client.get("/audit/events", params={"kind": "deletion.propagated"}).json()["items"]
    assert any(e["request_id"] == accepted["id"] and e["model_name"] == second for e in propagated)
    assert client.get("/audit/verify").json()["ok"] is True
