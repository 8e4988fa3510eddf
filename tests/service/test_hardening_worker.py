"""The worker under races and faults: concurrent audit appends, a log cut at its end,
attempt fencing, rollback against a claim, poison jobs, checkpoints that do not match
the record, stale temporary folders."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from datetime import timedelta

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select, text, update

from app.main import create_app
from model_store import LocalModelStore, PurgedVersion
from unlearning.train import TrainConfig, train_model
from worker import jobs, versions
from worker.audit import append_event, verify_chain
from worker.bootstrap import ensure_model
from worker.datasets import dataset_spec, get_splits
from worker.db import engine_for, transaction
from worker.migrate import upgrade_database
from worker.outbox import sweep_once
from worker.requests import deletion_certificate, submit_deletion
from worker.settings import Settings
from worker.errors import Conflict
from worker.tables import (Alias, AliasHistory, AuditChainHead, AuditEvent, DeletionRequest, Job, ModelVersion, OutboxMessage,
                           Tombstone, utcnow)

from .conftest import create_database, downgrade_record, drop_database, tamper


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
    with tamper(settings.database_url) as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    with transaction(settings.database_url) as session:
        report = verify_chain(session)
    assert (report["ok"], report["events"], report["first_bad_seq"]) == (False, 2, 3)

    with tamper(settings.database_url) as conn:  # the head removed too: still not a clean log
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
        downgrade_record(url, "0001")
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


# --------------------------------------------------------------------------- jobs on a tiny trained model

TINY = "tiny-mtl"


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    """Version 1 of a tiny model, trained once per module into a template store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny-store")
    s = _tiny_settings(Settings(_env_file=None), root)
    spec = dataset_spec(s)
    train, _ = get_splits(spec)
    recipe = TrainConfig(epochs=2, batch_size=6, width=8, depth=2, head_width=8, seed=0)
    model = train_model(train, recipe, progress=False)
    LocalModelStore(root).put_version(model, model_name=TINY, version=1, parent=None, dataset=spec,
                                      train_config=asdict(recipe), note="initial training")
    yield root
    torch.set_num_threads(threads)


def _tiny_settings(base: Settings, store_dir) -> Settings:
    return base.model_copy(update=dict(
        store_dir=store_dir, model_name=TINY, dataset="indoor", n_train=12, n_test=8, image_height=16,
        image_width=16, seed=0, device="cpu", method_config={"steps": 2}, stale_after_s=60, max_job_attempts=3))


@pytest.fixture
def tiny(settings, tiny_v1, tmp_path):
    """Settings, store and train instance ids of a registered tiny model (PostgreSQL)."""
    s = _tiny_settings(settings, tmp_path / "models")
    shutil.copytree(tiny_v1, s.store_dir)
    store = LocalModelStore(s.store_dir)
    ensure_model(s, store, progress=False)  # registers the stored version 1
    train, _ = get_splits(dataset_spec(s))
    return s, store, list(train.instance_ids)


def _submit(s: Settings, instance_id: str, tasks=("depth",)) -> str:
    with transaction(s.database_url) as session:
        return submit_deletion(session, s, instance_id=instance_id, tasks=list(tasks)).request.id


def _make_stale(s: Settings, job_id: str) -> None:
    with transaction(s.database_url) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=s.stale_after_s + 60)


def _serving(s: Settings) -> ModelVersion:
    with transaction(s.database_url) as session:
        version = session.get(Alias, (TINY, "serving")).version
        return session.execute(select(ModelVersion).where(ModelVersion.model_name == TINY,
                                                          ModelVersion.version == version)).scalar_one()


def _tombstones(s: Settings) -> set[tuple[str, str]]:
    with transaction(s.database_url) as session:
        return {(t.instance_id, t.task) for t in session.execute(select(Tombstone)).scalars()}


def _assert_serving_erases_every_tombstone(s: Settings) -> None:
    serving = _serving(s)
    assert _tombstones(s) <= {tuple(c) for c in serving.erased_cells}, (serving.version, serving.erased_cells)


def _kinds(s: Settings) -> list[str]:
    with transaction(s.database_url) as session:
        return [e.kind for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]


# --------------------------------------------------------------------------- C: attempt fencing


@pytest.mark.parametrize("worker1_ends", ["failing", "publishing"])
def test_a_superseded_attempt_neither_fails_nor_publishes_over_the_rerun(tiny, monkeypatch, worker1_ends):
    """Worker 1 goes quiet mid-job; the sweeper requeues the job, worker 2 claims it
    (attempt 2). Worker 1 then comes back: whatever it does, the record is worker 2's."""
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    first = jobs.claim_next(s, TINY)
    real_compute = jobs._compute
    second = {}

    def worker1_compute(*args, **kwargs):
        _make_stale(s, first.job_id)
        assert sweep_once(s, lambda topic, payload: None)["jobs"] == 1
        second["claim"] = jobs.claim_next(s, TINY)
        if worker1_ends == "failing":
            raise RuntimeError("worker 1: CUDA out of memory")
        return real_compute(*args, **kwargs)  # stores the artifact, then tries to publish it

    monkeypatch.setattr(jobs, "_compute", worker1_compute)
    assert jobs.run_job(s, store, first.job_id, first.attempt).status == "superseded"
    monkeypatch.setattr(jobs, "_compute", real_compute)

    claim = second["claim"]
    assert (claim.status, claim.job_id, claim.attempt) == ("claimed", first.job_id, 2)
    with transaction(s.database_url) as session:
        job, req = session.get(Job, first.job_id), session.get(DeletionRequest, request_id)
        assert (job.status, job.attempts, req.status) == ("running", 2, "running")
        assert session.execute(select(ModelVersion).where(ModelVersion.job_id == job.id)).first() is None
        beat = job.heartbeat_at
    jobs._Heartbeat(s, first.job_id, first.attempt, 1.0).write()  # worker 1's heartbeat thread: ignored
    with transaction(s.database_url) as session:
        assert session.get(Job, first.job_id).heartbeat_at == beat
    _submit(s, ids[1])
    assert jobs.claim_next(s, TINY).status == "busy"  # the model is still worker 2's

    done = jobs.run_job(s, store, claim.job_id, claim.attempt)
    assert (done.status, done.version) == ("completed", 2)
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    assert _tombstones(s) == {(ids[0], "depth"), (ids[1], "depth")}
    _assert_serving_erases_every_tombstone(s)
    assert "job.failed" not in _kinds(s)


def test_a_superseded_attempt_reserves_no_version_number(tiny):
    """Worker 1 went quiet before it asked for its version number; the job was put back
    and claimed again (and, say, rebased, which takes the number away). Worker 1 used to
    reserve a number for its old base, store its copy there, and the next attempt found
    that copy and failed publishing it (its parent not the job's base)."""
    s, store, ids = tiny
    _submit(s, ids[0])
    first = jobs.claim_next(s, TINY)
    _make_stale(s, first.job_id)
    assert sweep_once(s, lambda topic, payload: None)["jobs"] == 1
    with pytest.raises(jobs.StaleAttempt, match=f"attempt {first.attempt} no longer owns job {first.job_id}"):
        jobs._target_version(s, store, first.job_id, first.attempt)  # queued: owned by none
    second = jobs.claim_next(s, TINY)
    with pytest.raises(jobs.StaleAttempt):
        jobs._target_version(s, store, first.job_id, first.attempt)  # running, but attempt 2's
    with transaction(s.database_url) as session:
        assert "target_version" not in session.get(Job, first.job_id).params
    assert jobs._target_version(s, store, second.job_id, second.attempt) == 2


def test_a_stored_copy_of_the_job_on_another_base_is_computed_again(tiny):
    """This job's copy at its version number, stored on a base that is not the job's (by
    an attempt from before a rebase), can never be published: it is discarded and the
    version computed again, where the job used to fail on it."""
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    claim = jobs.claim_next(s, TINY)
    version = jobs._target_version(s, store, claim.job_id, claim.attempt)
    model, base = store.load(TINY, 1)
    store.put_version(model, model_name=TINY, version=version, parent=None, dataset=base.dataset,
                      job_id=claim.job_id)  # v1's weights, as if on another base
    done = jobs.run_job(s, store, claim.job_id, claim.attempt)
    assert (done.status, done.version) == ("completed", version), done.error
    assert store.manifest(TINY, version).parent == 1 and store.verify(TINY, version)
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, request_id).status == "completed"
    _assert_serving_erases_every_tombstone(s)


def test_a_heartbeat_waiting_on_a_requeue_does_not_touch_the_requeued_job(tiny):
    """The sweeper puts a job back while worker 1's heartbeat is writing: the heartbeat
    reads the job only once the requeue has committed, so it sees the job is no longer
    its attempt's and writes neither a heartbeat nor progress onto the queued job."""
    s, store, ids = tiny
    _submit(s, ids[0])
    claim = jobs.claim_next(s, TINY)
    beat = jobs._Heartbeat(s, claim.job_id, claim.attempt, 1.0)
    beat.progress(0.5)
    with transaction(s.database_url) as session:  # the sweeper's requeue, held open
        job = session.execute(select(Job).where(Job.id == claim.job_id).with_for_update()).scalar_one()
        jobs._put_back(session, job, "job.requeued", reason="test: stale heartbeat")
        session.flush()
        before = (job.heartbeat_at, job.progress)
        writer = threading.Thread(target=beat.write)
        writer.start()
        _wait_for(lambda: _lock_waiters(s.database_url) == 1, "the heartbeat to wait for the requeue's lock")
    writer.join(30)
    assert not writer.is_alive()
    with transaction(s.database_url) as session:
        job = session.get(Job, claim.job_id)
        assert job.status == "queued"
        assert (job.heartbeat_at, job.progress) == before


# --------------------------------------------------------------------------- D: rollback against a claim


def test_the_heartbeat_covers_loading_the_data(tiny, monkeypatch):
    """Loading the base version and the data comes before the engine; when it takes long
    (a large dataset rendered or read the first time) the heartbeat must already run, or
    the sweeper would requeue a live job."""
    s, store, ids = tiny
    s = s.model_copy(update=dict(stale_after_s=2))  # a heartbeat every 0.5 s
    _submit(s, ids[0])
    claim = jobs.claim_next(s, TINY)
    with transaction(s.database_url) as session:
        claimed_at = session.get(Job, claim.job_id).heartbeat_at
    seen = []
    real_job_data = jobs.job_data

    def slow_job_data(*args, **kwargs):  # loading takes until a heartbeat lands (10 s at most)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with transaction(s.database_url) as session:
                beat = session.get(Job, claim.job_id).heartbeat_at
            if beat > claimed_at:
                seen.append(beat)
                break
            time.sleep(0.1)
        return real_job_data(*args, **kwargs)

    monkeypatch.setattr(jobs, "job_data", slow_job_data)
    assert jobs.run_job(s, store, claim.job_id, claim.attempt).status == "completed"
    assert seen and seen[0] > claimed_at


def test_a_claim_that_fails_is_not_retried_in_a_tight_loop(tiny):
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    with transaction(s.database_url) as session:
        session.delete(session.get(Alias, (TINY, "serving")))
    outcomes = jobs.drain_model(s, store, TINY)
    assert [o.status for o in outcomes] == ["failed"] and "serving" in outcomes[0].error
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, request_id).status == "queued"  # nothing lost; it runs once fixed


def test_a_claim_cannot_slip_into_a_rollback(tiny, monkeypatch):
    """A claim while a rollback-with-reapply is being written waits its turn (busy), so the
    rollback's active-job check is not bypassed and every erasure ends up served."""
    import worker.versions as versions

    s, store, ids = tiny
    _submit(s, ids[0])
    assert [o.version for o in jobs.drain_model(s, store, TINY)] == [2]
    _submit(s, ids[1])  # queued, not yet claimed
    during = []
    real_append = versions.append_event

    def append_and_claim(session, kind, **kw):
        if kind == "model.rollback_requested":
            during.append(jobs.claim_next(s, TINY).status)  # another worker, another connection
        return real_append(session, kind, **kw)

    monkeypatch.setattr(versions, "append_event", append_and_claim)
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s, TINY, 1, reapply_erasures=True).action == "reapply"
    assert during == ["busy"]

    outcomes = jobs.drain_model(s, store, TINY)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    assert _tombstones(s) == {(ids[0], "depth"), (ids[1], "depth")}
    _assert_serving_erases_every_tombstone(s)


def test_publish_rebases_a_deletion_whose_base_stopped_serving(tiny):
    """Defence in depth: the alias moved under a running deletion job (to a version that
    still holds an erased cell). Its artifact is not published; the job reruns on the
    serving version and erases both cells."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0]
    _submit(s, ids[1])
    claim = jobs.claim_next(s, TINY)  # based on v2
    with transaction(s.database_url) as session:  # a racing rollback to v1, behind the rules' back
        session.get(Alias, (TINY, "serving")).version = 1

    outcome = jobs.run_job(s, store, claim.job_id, claim.attempt)
    assert outcome.status == "requeued" and "no longer serving" in outcome.error
    assert _serving(s).version == 1  # nothing published
    assert "job.rebased" in _kinds(s)

    rerun = jobs.drain_model(s, store, TINY)
    assert [(o.status, o.job_id) for o in rerun] == [("completed", claim.job_id)]
    served = _serving(s)
    assert served.parent_version == 1
    assert {tuple(c) for c in served.erased_cells} == {(ids[0], "depth"), (ids[1], "depth")}
    _assert_serving_erases_every_tombstone(s)


def test_a_reapply_rollback_sent_again_after_its_job_published_is_a_noop(tiny):
    """A client retrying a rollback with reapply_erasures after its job had published got a
    new job, which published a duplicate of that version (v1 plus the same erasures)."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0]
    with transaction(s.database_url) as session:
        queued = versions.rollback(session, s, TINY, 1, reapply_erasures=True, actor="ops")
        assert queued.action == "reapply"
    assert [o.version for o in jobs.drain_model(s, store, TINY)] == [3]  # v1 with the erasure reapplied
    with transaction(s.database_url) as session:
        # the alias went back when the reapply published: recorded as the rollback it completes
        hist = session.execute(select(AliasHistory).order_by(AliasHistory.id.desc())).scalars().first()
        assert (hist.from_version, hist.to_version, hist.reason) == (2, 3, "rollback")
        (event,) = session.execute(select(AuditEvent).where(AuditEvent.kind == "model.rollback")).scalars()
        assert event.payload == {"from_version": 2, "to_version": 3, "rolled_back_to": 1,
                                 "job_id": queued.job.id, "actor": "ops"}
    with transaction(s.database_url) as session:
        jobs_before = session.execute(select(func.count()).select_from(Job)).scalar()
        again = versions.rollback(session, s, TINY, 1, reapply_erasures=True)
        assert (again.action, again.from_version, again.to_version, again.job) == ("noop", 3, 3, None)
        assert session.execute(select(func.count()).select_from(Job)).scalar() == jobs_before
    assert jobs.drain_model(s, store, TINY)[0].status == "idle" and _serving(s).version == 3
    # an erasure recorded since: the serving version is no longer that request done
    _submit(s, ids[1])
    assert [o.version for o in jobs.drain_model(s, store, TINY)] == [4]
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s, TINY, 1, reapply_erasures=True).action == "reapply"


def test_a_rollback_to_weights_damaged_outside_the_service_is_refused_and_deletions_go_on(tiny):
    """A safe target whose weights had been damaged on disk became serving (200), then the next
    deletion job failed on an IntegrityError and `serve` could not start."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0]
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s, TINY, 1, reapply_erasures=True).action == "reapply"
    assert [o.version for o in jobs.drain_model(s, store, TINY)] == [3]  # v2 holds no erased data: a safe target
    with open(store._dir(TINY, 2) / "model.safetensors", "r+b") as weights:
        weights.seek(200)
        weights.write(b"\0" * 64)
    with TestClient(create_app(s)) as client:
        r = client.post(f"/models/{TINY}/rollback", json={"version": 2})
    assert r.status_code == 409 and r.json()["store_state"] == "damaged_weights", r.text
    assert str(s.store_dir) not in r.text and _serving(s).version == 3
    _submit(s, ids[1])
    assert [(o.status, o.version) for o in jobs.drain_model(s, store, TINY)] == [("completed", 4)]


def test_a_request_records_a_failed_jobs_error_without_paths(tiny):
    """A job that failed on a store error recorded "StoreError: no version 2 of model ... in
    /abs/store" on its requests, which a key with the deletions scope reads."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0], serving
    shutil.rmtree(store._dir(TINY, 2))  # the serving version's folder, removed outside the service
    rid = _submit(s, ids[1])
    (outcome,) = jobs.drain_model(s, store, TINY)
    assert outcome.status == "failed" and str(s.store_dir) in outcome.error  # the job's error, for keys that read
    with transaction(s.database_url) as session:
        req, job = session.get(DeletionRequest, rid), session.get(Job, outcome.job_id)
        assert req.status == "failed" and str(s.store_dir) in job.error
        assert req.error == "StoreError: no version 2 of model 'tiny-mtl' in the model store", req.error
        failed = session.execute(select(AuditEvent).where(AuditEvent.kind == "deletion.failed")).scalar_one()
        assert str(s.store_dir) in failed.payload["error"]  # the audit log keeps it whole


@pytest.mark.parametrize("error, store_dir, shown", [
    ("DamagedManifest: /srv/un learnd/models/m/v2/manifest.json is not JSON", "/srv/un learnd/models",
     "DamagedManifest: a file in the model store is not JSON"),
    ("StoreError: no version 2 of model 'm' in var/models", "var/models",
     "StoreError: no version 2 of model 'm' in the model store"),
    ("JobFailed: v3 (file:///srv/m/m/v3) cannot be read: [Errno 2] No such file or directory: '/data/nyu/1.png'",
     "/srv/m", "JobFailed: v3 (a file in the model store) cannot be read: [Errno 2] No such file or directory: "
               "'a path on the worker'"),
    ("OSError: cannot open /srv/models2/m, 1/2 of depth/normal", "/srv/models",
     "OSError: cannot open a path on the worker, 1/2 of depth/normal"),
    ("ValueError: cannot read data/nyu/train/image/001.npy (../x/depth.v2.npy; 0.5/1.5 m; depth/normal.)", "/srv/m",
     "ValueError: cannot read a path on the worker (a path on the worker; 0.5/1.5 m; depth/normal.)"),
    ("OSError: cannot read data/IMG_01.PNG", "/srv/m", "OSError: cannot read a path on the worker"),
    ("ValueError: task seg/depth.mean is nan; units m/s.Ok; ratio a/b.c", "/srv/m",  # not files: kept
     "ValueError: task seg/depth.mean is nan; units m/s.Ok; ratio a/b.c"),
])
def test_path_free_takes_every_path_out_of_an_error(error, store_dir, shown):
    assert jobs.path_free(error, store_dir) == shown


def test_path_free_is_linear_in_what_it_reads():
    """`(?:\\.{1,2}/)*(?:[\\w.-]+/)+` could split a run of ../ every way: 24 KB took 1.7 s, in
    fail_job's transaction (SQLite's write lock held). A 200 KB run: a hang, and the
    suite's timeout, before."""
    for text in (" " + "../" * 70_000 + "x", " " + "a/" * 100_000 + "x.npyy", "/" * 200_000):
        assert "a path on the worker" in jobs.path_free(text + " /srv/x.npy", None)


def test_a_reapply_missing_an_erasure_is_rebased_on_its_own_base(tiny):
    """A reapply whose artifact misses an erasure published while it ran is not served: it
    runs again on the rollback's target with that erasure added, and only then moves the alias."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0]
    with transaction(s.database_url) as session:  # a reapply on v1 that misses that erasure (a raced rollback's)
        job = Job(model_name=TINY, kind="reapply", status="queued", method=s.method, base_version=1,
                  params={"cells": [[ids[2], "depth"]], "request_ids": []})
        session.add(job)
        session.flush()
        job_id = job.id
    claim = jobs.claim_next(s, TINY)
    assert claim.job_id == job_id
    outcome = jobs.run_job(s, store, claim.job_id, claim.attempt)
    assert outcome.status == "requeued" and "still contains cells erased" in outcome.error
    assert _serving(s).version == 2  # nothing published
    with transaction(s.database_url) as session:
        rebased = session.get(Job, job_id)
        assert (rebased.status, rebased.base_version, rebased.params["rebases"]) == ("queued", 1, 1)
        assert {tuple(c) for c in rebased.params["cells"]} == {(ids[2], "depth"), (ids[0], "depth")}

    rerun = jobs.drain_model(s, store, TINY)
    assert [(o.status, o.job_id) for o in rerun] == [("completed", job_id)]
    served = _serving(s)
    assert (served.parent_version, served.job_id) == (1, job_id)
    assert {tuple(c) for c in served.erased_cells} >= {(ids[0], "depth"), (ids[2], "depth")}
    _assert_serving_erases_every_tombstone(s)


# --------------------------------------------------------------------------- two models on one dataset

TINY_B = "tiny-mtl-b"


@pytest.fixture
def two_models(tiny):
    """A second model trained on the tiny model's dataset (its version 1, registered under another name)."""
    s, store, ids = tiny
    model, manifest = store.load(TINY, 1)
    store.put_version(model, model_name=TINY_B, version=1, parent=None, dataset=manifest.dataset,
                      train_config=manifest.train_config, note="initial training")
    s_b = s.model_copy(update={"model_name": TINY_B})
    ensure_model(s_b, store, progress=False)
    return s, s_b, store, ids


def _paged_while_one_waits_at_the_append_lock(monkeypatch, s, late_work, other_commits, listing):
    """Run ``late_work`` in a thread paused at the audit log's lock (its transaction open, its
    row written), let ``other_commits`` commit meanwhile, read ``listing``'s first page (2 a
    page), let the late one go, and page on to the end: the ids seen."""
    from worker import audit

    reached, go = threading.Event(), threading.Event()
    real = audit.lock_appends

    def paused(session):
        if not go.is_set() and threading.current_thread().name == "late":
            reached.set()
            assert go.wait(30)
        return real(session)

    monkeypatch.setattr(audit, "lock_appends", paused)
    late = threading.Thread(target=late_work, name="late")
    late.start()
    assert reached.wait(30)
    other_commits()
    with transaction(s.database_url) as session:
        first = listing(session, limit=2)
    go.set()
    late.join(30)
    seen, cursor = [r.id for r in first.items], first.next_cursor
    while cursor:
        with transaction(s.database_url) as session:
            page = listing(session, limit=2, cursor=cursor)
        seen, cursor = seen + [r.id for r in page.items], page.next_cursor
    return seen


def _assert_nothing_passed(s: Settings, table, seen: list[str]) -> list:
    """Every row at or before the first page's newest was there to be read: each was paged.
    Returns the rows."""
    with transaction(s.database_url) as session:
        stored = session.execute(select(table)).scalars().all()
    newest_seen = max(r.created_at for r in stored if r.id == seen[0])
    assert {r.id for r in stored if r.created_at <= newest_seen} <= set(seen)
    return stored


def test_paging_deletions_never_passes_a_request_that_commits_late(two_models, monkeypatch):
    """Requests of two models meet only at the audit log's lock. created_at was read before it:
    a request paused there (a descheduled thread) was older than one of the other model that
    committed first, and a client paging /deletions meanwhile passed its place and never saw it."""
    from worker import queries

    s, s_b, store, ids = two_models
    for instance in ids[:2]:
        _submit(s, instance)

    def other_commits():  # the other model's request commits first
        with transaction(s_b.database_url) as session:
            submit_deletion(session, s_b, instance_id=ids[3], tasks=["depth"])

    seen = _paged_while_one_waits_at_the_append_lock(monkeypatch, s, lambda: _submit(s, ids[2]), other_commits,
                                                     queries.list_requests)
    stored = _assert_nothing_passed(s, DeletionRequest, seen)
    assert len(stored) == 4 and len(seen) >= 3


def test_paging_jobs_never_passes_a_job_that_commits_late(two_models, monkeypatch):
    """As requests: a job's created_at was read when its claim began, before the audit log's
    lock; a claim paused there made a job older than another model's, committed first, and
    a client paging /jobs meanwhile passed its place and never saw it."""
    from worker import queries

    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]  # an older job
    _submit(s, ids[1])
    _submit(s_b, ids[2])
    claims = []

    def other_commits():  # the other model's job commits first
        assert jobs.claim_next(s_b, TINY_B).status == "claimed"

    seen = _paged_while_one_waits_at_the_append_lock(
        monkeypatch, s, lambda: claims.append(jobs.claim_next(s, TINY)), other_commits, queries.list_jobs)
    assert [c.status for c in claims] == ["claimed"]
    stored = _assert_nothing_passed(s, Job, seen)
    assert len(stored) == 3 and claims[0].job_id not in seen  # it came after the pages, as new


def _serving_of(s: Settings, name: str) -> ModelVersion:
    with transaction(s.database_url) as session:
        version = session.get(Alias, (name, "serving")).version
        return session.execute(select(ModelVersion).where(ModelVersion.model_name == name,
                                                          ModelVersion.version == version)).scalar_one()


def _tombstone_requests(s: Settings) -> dict[tuple[str, str], str]:
    with transaction(s.database_url) as session:
        return {(t.instance_id, t.task): t.request_id for t in session.execute(select(Tombstone)).scalars()}


def _erased_cells_served(s: Settings) -> dict[str, float]:
    """The ``unlearnd_model_erased_cells_served`` gauge per model, as /metrics reports it."""
    with TestClient(create_app(s)) as client:
        text_ = client.get("/metrics").text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^unlearnd_model_erased_cells_served\{model="([^"]+)"\} (\S+)$', text_, re.M)}


def test_a_stored_version_registered_after_an_erasure_is_propagated_to(tiny):
    """A model whose stored version 1 predates an erasure on its dataset (a store restored,
    a second deployment) is registered as it is, counted as serving the erased cell, and its
    first claim runs a propagate job: registering does not retrain and does not hide it."""
    s, store, ids = tiny
    rid = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    model, manifest = store.load(TINY, 1)  # weights trained with the cell erased since
    store.put_version(model, model_name=TINY_B, version=1, parent=None, dataset=manifest.dataset,
                      train_config=manifest.train_config, note="initial training")
    s_b = s.model_copy(update={"model_name": TINY_B})
    assert ensure_model(s_b, store, progress=False) == 1
    assert _serving_of(s, TINY_B).erased_cells == []
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 1}
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    with transaction(s.database_url) as session:
        job = session.get(Job, outcome.job_id)
        assert (outcome.status, job.kind, job.params["cells"], job.params["request_ids"]) == (
            "completed", "propagate", [[ids[0], "depth"]], [rid])
    assert [tuple(c) for c in _serving_of(s, TINY_B).erased_cells] == [(ids[0], "depth")]
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 0}


def _conflict(s: Settings, instance_id: str, tasks) -> Conflict:
    with transaction(s.database_url) as session, pytest.raises(Conflict) as refused:
        submit_deletion(session, s, instance_id=instance_id, tasks=list(tasks))
    return refused.value


def test_an_erasure_reaches_every_model_trained_on_the_dataset(two_models):
    """Tombstones are per dataset: an instance erased through one model is erased data, so
    a second model trained on the same dataset must stop serving it too. Its publish
    announces the other model, whose next claim runs a propagate job before its own work."""
    s, s_b, store, ids = two_models
    rid = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    with transaction(s.database_url) as session:
        announced = [m.payload for m in session.execute(select(OutboxMessage)).scalars()]
    assert {"model_name": TINY_B} in announced
    # model B still serves the cell until then, and a request for it says so
    refused = _conflict(s_b, ids[0], ["depth"])
    assert refused.extras["cells"] == [{"instance_id": ids[0], "task": "depth", "state": "erased",
                                        "request_id": rid, "propagating": True}]
    assert "still holds it until its propagate job has run" in refused.detail
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 1}
    with transaction(s.database_url) as session:
        cert = deletion_certificate(session, rid)
    assert (cert["model"], cert["also_erased_from"], cert["propagation_pending"]) == (TINY, [], [TINY_B])

    own = _submit(s_b, ids[1])
    outcomes = jobs.drain_model(s_b, store, TINY_B)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    with transaction(s.database_url) as session:
        first, second = (session.get(Job, o.job_id) for o in outcomes)
        assert (first.kind, first.base_version, first.params["cells"], first.params["request_ids"]) == (
            "propagate", 1, [[ids[0], "depth"]], [rid])
        assert (second.kind, second.base_version) == ("deletion", 2)
        events = [(e.kind, e.model_name, e.request_id) for e in session.execute(select(AuditEvent)).scalars()]
    assert ("deletion.propagated", TINY_B, rid) in events and ("deletion.completed", TINY_B, own) in events
    served = _serving_of(s, TINY_B)
    assert served.version == 3
    with transaction(s.database_url) as session:
        cert = deletion_certificate(session, rid)
        propagated_v2 = session.execute(select(ModelVersion).where(ModelVersion.model_name == TINY_B,
                                                                   ModelVersion.version == 2)).scalar_one()
    assert cert["propagation_pending"] == []
    assert [(c["model"], c["version"], c["version_sha256"], c["event"]["kind"]) for c in cert["also_erased_from"]] == [
        (TINY_B, 2, propagated_v2.sha256, "deletion.propagated")]
    assert {tuple(c) for c in served.erased_cells} == {(ids[0], "depth"), (ids[1], "depth")}
    # both models caught up: the sweeper finds none behind, and model A must follow B's erasure
    assert _tombstones(s) == {(ids[0], "depth"), (ids[1], "depth")}
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    assert {tuple(c) for c in _serving_of(s, TINY).erased_cells} == _tombstones(s)
    assert sweep_once(s, lambda topic, payload: None)["behind"] == 0
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 0}
    # an erased cell the model no longer holds is a plain 409
    assert _conflict(s_b, ids[0], ["depth"]).extras["cells"][0]["propagating"] is False
    # running the propagate job again publishes nothing new (a job publishes one version)
    assert jobs.drain_model(s_b, store, TINY_B)[0].status == "idle"


def test_two_models_publishing_the_same_cell_at_once_both_complete(two_models, monkeypatch):
    """Pending cells are per model, tombstones per dataset: both models accept a request for
    one cell. Their publishes used to read the tombstones together and insert the same one
    twice; the second failed on the unique key, its request for good."""
    s, s_b, store, ids = two_models
    ra, rb = _submit(s, ids[0]), _submit(s_b, ids[0])
    claims = jobs.claim_next(s, TINY), jobs.claim_next(s_b, TINY_B)
    together = threading.Barrier(2)
    real = jobs._unsafe_to_serve

    def after_reading_tombstones(*args, **kwargs):
        try:  # the race: both transactions past their read. Now the second waits on the lock,
            together.wait(timeout=3)  # so this times out and the first goes on alone
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "_unsafe_to_serve", after_reading_tombstones)
    outcomes = {}
    threads = [threading.Thread(target=lambda st=st, c=c: outcomes.__setitem__(st.model_name, jobs.run_job(
        st, store, c.job_id, c.attempt))) for st, c in zip((s, s_b), claims)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: o.status for name, o in outcomes.items()} == {TINY: "completed", TINY_B: "completed"}, outcomes
    assert list(_tombstone_requests(s)) == [(ids[0], "depth")]
    with transaction(s.database_url) as session:
        assert [session.get(DeletionRequest, r).status for r in (ra, rb)] == ["completed", "completed"]
    assert (ids[0], "depth") in {tuple(c) for c in _serving_of(s, TINY).erased_cells}
    assert (ids[0], "depth") in {tuple(c) for c in _serving_of(s_b, TINY_B).erased_cells}


def _request(s: Settings, rid: str) -> DeletionRequest:
    with transaction(s.database_url) as session:
        req = session.get(DeletionRequest, rid)
        session.expunge(req)
        return req


def test_a_request_whose_cell_a_rebased_job_erases_completes_with_that_version(two_models):
    """B accepts rB for cell c while B's job for another cell runs; A erases c, so B's job is
    rebased to catch up on c and erases it without carrying rB. rB was then rejected ("already
    erased by another request"), with no certificate, though B had erased c for it."""
    s, s_b, store, ids = two_models
    other = _submit(s_b, ids[1])
    running = jobs.claim_next(s_b, TINY_B)
    ra, rb = _submit(s, ids[0]), _submit(s_b, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]  # A erases c first
    assert jobs.run_job(s_b, store, running.job_id, running.attempt).status == "requeued"
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]

    served = _serving_of(s_b, TINY_B)
    req = _request(s_b, rb)
    assert (req.status, req.error, req.job_id, req.produced_version) == ("completed", None, running.job_id,
                                                                        served.version)
    assert _request(s_b, other).status == "completed" and _request(s, ra).status == "completed"
    with transaction(s.database_url) as session:
        cert = deletion_certificate(session, rb)
        completed = session.execute(select(AuditEvent).where(AuditEvent.request_id == rb,
                                                             AuditEvent.kind == "deletion.completed")).scalar_one()
    assert (cert["version_after"], cert["job_id"]) == (served.version, running.job_id)
    assert cert["audit"]["completion_event"]["seq"] == completed.seq
    assert completed.payload["erased_by_job"]["job_id"] == running.job_id
    assert "deletion.rejected" not in _kinds(s)


def test_a_certificate_lists_a_model_once_when_its_own_request_erased_the_rest(two_models):
    """R0 (B) erases (c, depth); A reaches it at a version of a job rebased onto it; A's own
    request R for (c, depth and normal), accepted earlier, then erases only normal. R0's
    certificate listed A twice: also at R's version, whose job did not erase R0's cell."""
    s, s_b, store, ids = two_models
    _submit(s, ids[1])
    running = jobs.claim_next(s, TINY)  # A: a job in flight
    _submit(s, ids[0], ("depth", "normal"))  # A's portal
    r0 = _submit(s_b, ids[0])  # B's portal, the same person
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]  # B publishes first
    assert jobs.run_job(s, store, running.job_id, running.attempt).status == "requeued"  # rebased: + (c, depth)
    jobs.drain_model(s, store, TINY)
    jobs.drain_model(s_b, store, TINY_B)
    with transaction(s.database_url) as session:
        cert = deletion_certificate(session, r0)
    reached = [(e["model"], e["version"]) for e in cert["also_erased_from"]]
    assert [m for m, _ in reached] == [TINY], reached
    with transaction(s.database_url) as session:
        erased = session.execute(select(ModelVersion).where(ModelVersion.model_name == TINY,
                                                            ModelVersion.version == reached[0][1])).scalar_one()
        assert [ids[0], "depth"] in erased.erased_cells and erased.job_id == running.job_id


def test_reapply_to_the_serving_version_erases_what_it_misses(two_models, monkeypatch):
    """B serves v1, which misses cell c erased through A, and B's propagation failed (backing
    off): a rollback to v1 with reapply_erasures answered "noop" and left c in service until
    the retry. It is now a reapply job on v1; once that serves, the same request is a noop."""
    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]  # A erases c: a tombstone
    monkeypatch.setattr(jobs, "_compute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fails once")))
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["failed"]  # B's propagation
    monkeypatch.undo()
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s_b, TINY_B, 1).action == "noop"  # without reapply: nothing asked
        out = versions.rollback(session, s_b, TINY_B, 1, reapply_erasures=True)
        assert (out.action, out.from_version, out.to_version) == ("reapply", 1, 1)
        assert (out.job.kind, out.job.base_version, out.job.params["cells"]) == ("reapply", 1, [[ids[0], "depth"]])
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]
    served = _serving_of(s_b, TINY_B)
    assert served.parent_version == 1 and [ids[0], "depth"] in served.erased_cells
    with transaction(s.database_url) as session:
        again = versions.rollback(session, s_b, TINY_B, served.version, reapply_erasures=True)
        assert (again.action, again.job) == ("noop", None)


def test_a_second_request_for_a_cell_a_stalled_propagations_request_erases_names_that_request(
        two_models, monkeypatch):
    """B's propagation of c failed, so rB for c was accepted as its next try. A second request
    for c while rB's job ran got a 409 saying c was erased (by A's request) and held "until its
    propagate job has run": there is none, rB's job erases it, and rB went unnamed."""
    from worker.errors import Conflict
    from worker.requests import submit_deletion

    s, s_b, store, ids = two_models
    a = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]  # A erases c
    monkeypatch.setattr(jobs, "_compute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fails once")))
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["failed"]  # B's propagation
    rb = _submit(s_b, ids[0])
    assert jobs.claim_next(s_b, TINY_B) is not None  # rB's job under way: the propagation no longer stalled
    with transaction(s.database_url) as session, pytest.raises(Conflict) as refused:
        submit_deletion(session, s_b, instance_id=ids[0], tasks=["depth"])
    assert refused.value.extras["cells"] == [{"instance_id": ids[0], "task": "depth", "state": "pending",
                                              "request_id": rb}]
    assert f"depth (pending by request {rb})" in str(refused.value) and a not in str(refused.value)
    assert "propagate job" not in str(refused.value)


def _waiting_behind_a_reapply(two_models, monkeypatch) -> str:
    """B's propagation of cell c (erased through A) failed, so rB for c is accepted on B as its
    next try; then B is rolled back to v1 with reapply_erasures, whose job (queued, claimed
    before rB) erases c. Returns rB."""
    s, s_b, store, ids = two_models
    _submit(s_b, ids[2])
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]  # B v2
    _submit(s, ids[0])
    # A catches up on B's erasure, then erases c (a tombstone)
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed", "completed"]
    real = jobs._compute
    monkeypatch.setattr(jobs, "_compute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fails once")))
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["failed"]  # the propagation
    monkeypatch.setattr(jobs, "_compute", real)
    rb = _submit(s_b, ids[0])
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s_b, TINY_B, 1, reapply_erasures=True).action == "reapply"
    return rb


def test_a_request_whose_cell_a_rollbacks_reapply_erases_completes_with_that_version(two_models, monkeypatch):
    """B's propagation of c failed, so rB for c is accepted as its next try; a rollback with
    reapply runs first and erases c. rB was rejected."""
    s, s_b, store, ids = two_models
    rb = _waiting_behind_a_reapply(two_models, monkeypatch)
    outcomes = jobs.drain_model(s_b, store, TINY_B)
    assert [o.status for o in outcomes] == ["completed"]
    req = _request(s_b, rb)
    assert (req.status, req.job_id, req.produced_version) == ("completed", outcomes[0].job_id, outcomes[0].version)
    with transaction(s.database_url) as session:
        assert deletion_certificate(session, rb)["version_after"] == outcomes[0].version


def test_a_request_erased_by_two_reapplies_completes_with_the_newer(two_models, monkeypatch):
    """A rollback's reapply erases rB's cell, and a second reapply onto the same target erases
    it again before rB is claimed: rB completes with the version that serves, not the one
    rolled back. (Sent again, that rollback is now a noop once the first reapply serves: the
    second reapply job is written as a rollback raced with the first would have queued it.)"""
    s, s_b, store, ids = two_models
    rb = _waiting_behind_a_reapply(two_models, monkeypatch)
    first = jobs.claim_next(s_b, TINY_B)
    assert jobs.run_job(s_b, store, first.job_id, first.attempt).status == "completed"
    with transaction(s.database_url) as session:
        assert versions.rollback(session, s_b, TINY_B, 1, reapply_erasures=True).action == "noop"
        done = session.get(Job, first.job_id)
        session.add(Job(model_name=TINY_B, kind="reapply", status="queued", method=done.method, base_version=1,
                        params={"cells": done.params["cells"], "request_ids": done.params["request_ids"]}))
    outcomes = jobs.drain_model(s_b, store, TINY_B)
    assert [o.status for o in outcomes] == ["completed"]
    req = _request(s_b, rb)
    assert (req.status, req.job_id, req.produced_version) == ("completed", outcomes[0].job_id, outcomes[0].version)
    assert _serving_of(s_b, TINY_B).version == outcomes[0].version


def test_the_sweeper_announces_a_model_behind_its_dataset_but_not_after_a_failed_try(two_models):
    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)
    with transaction(s.database_url) as session:  # the announcement was lost
        session.execute(delete(OutboxMessage))
    swept = sweep_once(s, lambda topic, payload: None)
    assert (swept["behind"], swept["models"]) == (1, [TINY_B])

    claim = jobs.claim_next(s_b, TINY_B)
    assert claim.status == "claimed"
    jobs.mark_failed(s_b, claim.job_id, "out of memory (say)", attempt=claim.attempt)
    # the same cells on the same base failed: neither the sweeper nor a claim tries again in a loop
    assert sweep_once(s, lambda topic, payload: None)["behind"] == 0
    assert jobs.claim_next(s_b, TINY_B).status == "idle"
    # the model's next deletion job erases the cells it is behind on too (no version without them is served)
    rid_a = _tombstone_requests(s)[(ids[0], "depth")]
    own = _submit(s_b, ids[1])
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    assert outcome.status == "completed"
    with transaction(s.database_url) as session:
        job = session.get(Job, outcome.job_id)
        assert (job.kind, job.params["request_ids"]) == ("deletion", [own, rid_a])
        events = [(e.kind, e.request_id) for e in session.execute(
            select(AuditEvent).where(AuditEvent.model_name == TINY_B)).scalars()]
    assert ("deletion.completed", own) in events and ("deletion.propagated", rid_a) in events
    assert {tuple(c) for c in _serving_of(s, TINY_B).erased_cells} == {(ids[0], "depth"), (ids[1], "depth")}


def _fail_propagation(s: Settings, s_b: Settings, how: str) -> str:
    """Claim model B's propagate job and fail it: ``mark_failed`` (the engine raised) or as a
    poison job (its worker died ``max_job_attempts`` times; the next claim gives it up).
    Returns the job's id."""
    claim = jobs.claim_next(s_b, TINY_B)
    with transaction(s.database_url) as session:
        assert session.get(Job, claim.job_id).kind == "propagate"
    if how == "mark_failed":
        jobs.mark_failed(s_b, claim.job_id, "CUDA out of memory (say)", attempt=claim.attempt)
    else:
        for attempt in range(1, s.max_job_attempts + 1):
            if attempt > 1:
                assert jobs.claim_next(s_b, TINY_B).job_id == claim.job_id
            _make_stale(s, claim.job_id)
            assert sweep_once(s, lambda topic, payload: None)["jobs"] == 1
        assert jobs.claim_next(s_b, TINY_B).status == "idle"  # gives the poison job up
    with transaction(s.database_url) as session:
        assert session.get(Job, claim.job_id).status == "failed"
    return claim.job_id


@pytest.mark.parametrize("how", ["mark_failed", "poison"])
def test_after_a_failed_propagate_job_a_request_for_its_cell_is_accepted_as_the_next_try(two_models, how):
    """Nothing retries a failed propagate job on its own (no loop: claims stay idle, the sweeper
    quiet), so a request for a cell the model still holds was a 409 promising "this model
    still holds it until its propagate job has run", a job that never ran. Now it is
    accepted, and its job erases the cell from the model."""
    s, s_b, store, ids = two_models
    rid_a = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    refused = _conflict(s_b, ids[0], ["depth"])  # while the propagate job is due: a 409 that says so
    assert refused.extras["cells"][0]["propagating"] is True
    _fail_propagation(s, s_b, how)
    assert jobs.drain_model(s_b, store, TINY_B)[0].status == "idle"
    assert sweep_once(s, lambda topic, payload: None)["behind"] == 0

    mine = _submit(s_b, ids[0], ("depth", "normal"))
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, mine).tasks == ["depth", "normal"]
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    assert outcome.status == "completed", outcome.error
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, mine).status == "completed"
        assert session.get(Job, outcome.job_id).params["request_ids"] == [mine, rid_a]
    assert {(ids[0], "depth"), (ids[0], "normal")} <= {tuple(c) for c in _serving_of(s, TINY_B).erased_cells}
    assert _erased_cells_served(s) == {TINY: 1, TINY_B: 0}  # A follows B's erasure of normal now
    # erased from B too now: a plain 409
    assert _conflict(s_b, ids[0], ["depth"]).extras["cells"][0]["propagating"] is False


def _ended_ago(s: Settings, job_id: str, seconds: float) -> None:
    with transaction(s.database_url) as session:
        session.get(Job, job_id).finished_at = utcnow() - timedelta(seconds=seconds)


def test_a_failed_propagation_is_tried_again_later_and_ever_more_rarely(two_models):
    """Nothing tried a failed propagate job again: a model that got no deletion request
    served the erased cell for good (a transient failure, out of memory say, was final).
    Now it is tried again after propagation_retry_s, then after twice that, not in a loop."""
    s, s_b, store, ids = two_models
    retry = s.propagation_retry_s
    rid_a = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    first = _fail_propagation(s, s_b, "mark_failed")
    assert jobs.claim_next(s_b, TINY_B).status == "idle"  # not at once
    assert sweep_once(s, lambda topic, payload: None)["behind"] == 0
    _ended_ago(s, first, retry - 60)
    assert jobs.claim_next(s_b, TINY_B).status == "idle"
    _ended_ago(s, first, retry + 1)
    assert sweep_once(s, lambda topic, payload: None)["models"] == [TINY_B]  # due: announced
    second = _fail_propagation(s, s_b, "mark_failed")  # the retry, failing again
    assert second != first
    with transaction(s.database_url) as session:
        started = session.execute(select(AuditEvent).where(
            AuditEvent.kind == "job.started", AuditEvent.model_name == TINY_B).order_by(AuditEvent.seq.desc())
        ).scalars().first()
        assert started.payload["retries_propagation"] == {"job_id": first, "cells": [[ids[0], "depth"]]}
    _ended_ago(s, second, retry + 1)  # the second failure waits twice as long
    assert jobs.claim_next(s_b, TINY_B).status == "idle"
    assert sweep_once(s, lambda topic, payload: None)["behind"] == 0
    _ended_ago(s, second, 2 * retry + 1)
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    assert outcome.status == "completed", outcome.error
    with transaction(s.database_url) as session:
        job = session.get(Job, outcome.job_id)
        assert (job.kind, job.params["request_ids"]) == ("propagate", [rid_a])
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 0}


def test_a_due_retry_leaves_the_propagation_to_a_waiting_requests_job(two_models):
    # a request queued for the model is the propagation's next try already (its job erases the
    # held cells too); a separate retry first would leave that request "already erased"
    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    failed = _fail_propagation(s, s_b, "mark_failed")
    _ended_ago(s, failed, s.propagation_retry_s + 1)
    mine = _submit(s_b, ids[0], ("depth", "normal"))
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    assert outcome.status == "completed", outcome.error
    with transaction(s.database_url) as session:
        assert session.get(Job, outcome.job_id).kind == "deletion"
        assert session.get(DeletionRequest, mine).status == "completed"
    assert _erased_cells_served(s)[TINY_B] == 0


def test_a_request_accepted_while_a_due_retry_is_claimed_is_its_next_try(two_models):
    # the claim that found no waiting request and started the retry used to race a submission
    # for a held cell: that request was accepted (the propagation stalled), then rejected as
    # "already erased by another request" once the retry erased the cell. Submissions wait for
    # the claim's decision now, and the claim for the submission's commit
    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    _ended_ago(s, _fail_propagation(s, s_b, "mark_failed"), s.propagation_retry_s + 1)
    box = {}
    with transaction(s_b.database_url) as session:
        rid = submit_deletion(session, s_b, instance_id=ids[0], tasks=["depth"]).request.id  # accepted: stalled
        claiming = threading.Thread(target=lambda: box.update(claim=jobs.claim_next(s_b, TINY_B)))
        claiming.start()  # a sweeper-announced claim, before the submission commits
        _wait_for(lambda: _lock_waiters(s.database_url) >= 1, "the claim to wait for the submission's lock")
        assert claiming.is_alive()
    claiming.join(30)
    claim = box["claim"]
    with transaction(s.database_url) as session:
        assert session.get(Job, claim.job_id).kind == "deletion"
    assert jobs.run_job(s_b, store, claim.job_id, claim.attempt).status == "completed"
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, rid).status == "completed"
    assert _erased_cells_served(s)[TINY_B] == 0


# --------------------------------------------------------------------------- A: a database error at publish


def test_a_database_error_at_publish_requeues_and_the_rerun_publishes(tiny, monkeypatch):
    from sqlalchemy.exc import OperationalError

    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    real_publish = jobs.publish_version

    def lost_connection(*args, **kwargs):
        raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(jobs, "publish_version", lost_connection)
    first = jobs.process_model(s, store, TINY)
    assert first.status == "requeued"
    with transaction(s.database_url) as session:
        assert session.get(Job, first.job_id).status == "queued"
        assert session.get(DeletionRequest, request_id).status == "queued"
    monkeypatch.setattr(jobs, "publish_version", real_publish)
    monkeypatch.setattr(jobs, "_compute", lambda *a, **k: pytest.fail("the stored artifact is computed again"))

    again = jobs.process_model(s, store, TINY)
    assert (again.status, again.job_id, again.version) == ("completed", first.job_id, 2)
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, request_id).status == "completed"
    assert "job.failed" not in _kinds(s)


# --------------------------------------------------------------------------- E: a poison job


def test_a_job_given_up_on_keeps_its_version_number_from_the_next_job(tiny):
    """A job failed for too many attempts may still have a live worker that stores its
    artifact later; the next job used to get the same number and fail on that artifact."""
    s, store, ids = tiny
    _submit(s, ids[0])
    first = jobs.claim_next(s, TINY)
    reserved = jobs._target_version(s, store, first.job_id, first.attempt)
    with transaction(s.database_url) as session:  # as a claim gives up on a job whose worker keeps dying
        job = session.get(Job, first.job_id)
        job.status, job.error = "failed", "gave up after 1 attempts"
    _submit(s, ids[1])
    second = jobs.claim_next(s, TINY)
    assert second.status == "claimed" and second.job_id != first.job_id
    assert jobs._target_version(s, store, second.job_id, second.attempt) == reserved + 1


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(tiny, monkeypatch):
    s, store, ids = tiny
    request_id = _submit(s, ids[0])

    class Killed(BaseException):  # the worker process dies in the job (OOM killer, hard time limit)
        pass

    def die(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(jobs, "_compute", die)
    for _ in range(s.max_job_attempts):
        with pytest.raises(Killed):
            jobs.drain_model(s, store, TINY)
        with transaction(s.database_url) as session:
            job_id = session.execute(select(Job.id)).scalar_one()
        _make_stale(s, job_id)
        assert sweep_once(s, lambda topic, payload: None)["jobs"] == 1

    later = _submit(s, ids[1])
    monkeypatch.undo()
    outcomes = jobs.drain_model(s, store, TINY)  # gives the poison job up, then serves the next request
    assert [o.status for o in outcomes] == ["completed"]
    with transaction(s.database_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts) == ("failed", s.max_job_attempts)
        assert f"gave up after {s.max_job_attempts} attempts" in job.error
        assert session.get(DeletionRequest, request_id).status == "failed"
        assert session.get(DeletionRequest, later).status == "completed"
        failed = session.execute(select(AuditEvent).where(AuditEvent.kind == "job.failed")).scalar_one()
        assert failed.payload["job_id"] == job_id
        assert verify_chain(session)["ok"] is True


# --------------------------------------------------------------------------- F, G: checkpoints against the record


def test_a_base_checkpoint_that_is_not_the_recorded_one_is_refused(tiny):
    """Version 2 swapped in the store for the pre-erasure weights, its manifest made to
    match them: the store's own check passes, the record's sha256 does not."""
    s, store, ids = tiny
    _submit(s, ids[0])
    # a method that moves the weights (interference_aware leaves them where no cell is below its level)
    jobs.drain_model(s.model_copy(update={"method": "finetune", "method_config": {"steps": 2}}), store, TINY)
    v1, v2 = store.root / TINY / "v1", store.root / TINY / "v2"
    assert store.manifest(TINY, 2).sha256 != store.manifest(TINY, 1).sha256
    (v2 / "model.safetensors").write_bytes((v1 / "model.safetensors").read_bytes())
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["sha256"] = store.manifest(TINY, 1).sha256
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    assert store.verify(TINY, 2)

    _submit(s, ids[1])
    outcome = jobs.drain_model(s, store, TINY)[0]
    assert outcome.status == "failed" and "is not the one the record holds" in outcome.error
    assert _serving(s).version == 2 and store.versions(TINY) == [1, 2]


def test_a_job_that_leaves_non_finite_weights_fails_and_publishes_nothing(tiny):
    """A step size that blows the weights up: the job fails naming it, the model keeps serving v1."""
    s, store, ids = tiny
    s = s.model_copy(update={"method": "finetune", "method_config": {"steps": 3, "lr": 1e30}})
    request_id = _submit(s, ids[0])
    outcome = jobs.drain_model(s, store, TINY)[0]
    assert outcome.status == "failed" and "UnlearningDiverged" in outcome.error and "non-finite weights" in outcome.error
    assert _serving(s).version == 1 and store.versions(TINY) == [1]
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, request_id).status == "failed"
        assert verify_chain(session)["ok"]


def test_a_retrain_job_repeats_the_recipe_of_the_model(tiny, monkeypatch):
    """Not TrainConfig's library defaults: the base version's recipe, under the settings' own fields."""
    import unlearning.job

    s, store, ids = tiny
    s = s.model_copy(update={"method": "retrain", "method_config": {"train": {"epochs": 1}}})
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(unlearning.job, "run_unlearning_job", record)
    _submit(s, ids[0])
    assert jobs.drain_model(s, store, TINY)[0].status == "failed"
    recipe = store.manifest(TINY, 1).train_config
    assert seen["method"] == "retrain" and seen["config"]["train"] == {**recipe, "epochs": 1}
    assert recipe["width"] == 8 and recipe["epochs"] == 2  # the tiny model's, not the defaults (32, 80)


def test_a_celery_delivery_runs_one_job_and_announces_the_model_again(tiny, monkeypatch):
    """The task's time limit is one job's: a delivery runs one job, and the next job (a
    request that arrived meanwhile) gets a delivery, and a time limit, of its own."""
    from worker import tasks

    s, store, ids = tiny
    monkeypatch.setattr(tasks, "get_settings", lambda: s)
    sent = []
    monkeypatch.setattr(tasks.app, "send_task", lambda name, args: sent.append((name, args)))
    _submit(s, ids[0])
    first = tasks.process_model_task.apply(args=[TINY]).get()
    assert first["status"] == "completed" and sent == [(tasks.PROCESS_MODEL_TASK, [TINY])]
    assert tasks.process_model_task.apply(args=[TINY]).get()["status"] == "idle"
    assert len(sent) == 1  # nothing left: no further announcement


def test_a_job_stopped_by_its_time_limit_says_so(tiny, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    import unlearning.job

    s, store, ids = tiny

    def too_long(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(unlearning.job, "run_unlearning_job", too_long)
    request_id = _submit(s, ids[0])
    outcome = jobs.drain_model(s, store, TINY)[0]
    assert outcome.status == "failed"
    assert f"ran past its time limit (UNLEARND_JOB_TIME_LIMIT_S={s.job_time_limit_s} s)" in outcome.error
    with transaction(s.database_url) as session:
        assert "time limit" in session.get(DeletionRequest, request_id).error


def test_a_rerun_recomputes_a_stored_artifact_whose_weights_are_damaged(tiny, monkeypatch):
    s, store, ids = tiny
    _submit(s, ids[0])
    _stored_then_crashed(s, store, monkeypatch)
    weights = store.root / TINY / "v2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)

    outcome = jobs.drain_model(s, store, TINY)[0]
    assert (outcome.status, outcome.version) == ("completed", 2)
    assert store.verify(TINY, 2)
    assert _serving(s).sha256 == store.manifest(TINY, 2).sha256


def test_a_first_version_whose_manifest_holds_nan_is_registered_with_null(settings, tiny_v1, tmp_path):
    """A stored v1 whose manifest was written before strict JSON: its registration failed on
    PostgreSQL (no NaN in JSON) with a database error, and serve with a traceback."""
    s = _tiny_settings(settings, tmp_path / "models")
    shutil.copytree(tiny_v1, s.store_dir)
    path = s.store_dir / TINY / "v1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "metrics": {"mia_auc": math.nan, "loss": 0.5}}))
    assert ensure_model(s, LocalModelStore(s.store_dir), progress=False) == 1
    assert _serving(s).metrics == {"mia_auc": None, "loss": 0.5}


def test_a_claimed_job_is_not_started_before_it_was_created(two_models):
    """created_at came from the column default at flush, after started_at (the claim's time):
    GET /jobs showed jobs started before they were created."""
    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    claim = jobs.claim_next(s, TINY)
    jobs.run_job(s, store, claim.job_id, claim.attempt)  # B is behind A's erasure: its claim is a propagate job
    propagate = jobs.claim_next(s_b, TINY_B)
    with transaction(s.database_url) as session:
        for job_id, kind in ((claim.job_id, "deletion"), (propagate.job_id, "propagate")):
            job = session.get(Job, job_id)
            assert job.kind == kind and job.created_at == job.started_at


def _stored_then_crashed(s: Settings, store, monkeypatch) -> str:
    """A job that stored its artifact (v2) and died before publishing; its id, made stale and requeued."""
    class Crash(BaseException):
        pass

    def crash(*args, **kwargs):
        raise Crash()

    monkeypatch.setattr(jobs, "publish_version", crash)
    with pytest.raises(Crash):
        jobs.drain_model(s, store, TINY)
    monkeypatch.undo()
    with transaction(s.database_url) as session:
        job_id = session.execute(select(Job.id)).scalar_one()
    _make_stale(s, job_id)
    sweep_once(s, lambda topic, payload: None)
    return job_id


@pytest.mark.parametrize("edit", [
    {"deletions": []},  # would complete no request
    {"deleted_cells": [], "erased_cells": []},  # would tombstone nothing, and claim nothing erased
    {"erased_cells": []},  # a lineage without the job's own cell
])
def test_a_stored_artifact_whose_manifest_claims_other_erasures_is_not_published(tiny, monkeypatch, edit):
    """The sha256 covers the weights only: the rerun copied the manifest's requests, cells and
    lineage into the record, and a request stayed running, with no tombstone, forever."""
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    _stored_then_crashed(s, store, monkeypatch)
    path = store.root / TINY / "v2" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    assert store.verify(TINY, 2)

    outcome = jobs.drain_model(s, store, TINY)[0]
    assert outcome.status == "failed" and "the artifact's manifest does not match job" in outcome.error
    assert _serving(s).version == 1 and not _tombstones(s)
    with transaction(s.database_url) as session:
        assert session.get(DeletionRequest, request_id).status == "failed"


def test_a_base_whose_manifest_claims_another_lineage_is_refused(tiny):
    """The base's erased cells come from its manifest: edited, they would be passed on to the
    new version (and the job's data would hold what the record says is erased)."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)
    path = store.root / TINY / "v2" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "erased_cells": []}))
    assert store.verify(TINY, 2)

    _submit(s, ids[1])
    outcome = jobs.drain_model(s, store, TINY)[0]
    assert outcome.status == "failed" and "claims 0 erased cells, the record 1" in outcome.error
    assert _serving(s).version == 2


def test_a_stored_manifest_with_nan_metrics_is_recorded_with_null(tiny, monkeypatch):
    """Manifests written before strict JSON may hold NaN, which PostgreSQL's JSON refuses:
    the publish failed with a database error."""
    s, store, ids = tiny
    _submit(s, ids[0])
    _stored_then_crashed(s, store, monkeypatch)
    path = store.root / TINY / "v2" / "manifest.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "metrics": {**doc["metrics"], "mia_auc": math.nan}}))

    outcome = jobs.drain_model(s, store, TINY)[0]
    assert (outcome.status, outcome.version) == ("completed", 2)
    assert _serving(s).metrics["mia_auc"] is None


# --------------------------------------------------------------------------- H: a dead writer's temporary folders


def test_stale_temporary_folders_are_removed(tmp_path):
    store = LocalModelStore(tmp_path)
    model_dir = tmp_path / "m"
    (model_dir / "v1").mkdir(parents=True)
    (model_dir / "v1" / "manifest.json").write_text("{}")
    old, fresh = model_dir / ".tmp-v2-dead", model_dir / ".tmp-v2-writing"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    (model_dir / ".tmp-calibration-dead").write_text("{")
    hours_ago = time.time() - 2 * 3600
    for p in (old, model_dir / ".tmp-calibration-dead"):
        os.utime(p, (hours_ago, hours_ago))

    assert store.versions("m") == [1]
    # .lock: the writers' lock, which the cleanup takes (never removed)
    assert sorted(p.name for p in model_dir.iterdir()) == [".lock", ".tmp-v2-writing", "v1"]


def test_metrics_are_recorded_as_strict_json():
    """PostgreSQL's JSON has no NaN: a degenerate metric (an attack with no measurable
    forgotten cell gives NaN) is recorded as null, other numbers as floats."""
    import json

    import numpy as np
    import torch

    metrics = {"mia_auc": float("nan"), "uis": np.float32(0.25), "gap": torch.tensor(0.5),
               "per_task": {"depth": {"abs_err": float("inf")}}, "list": [float("-inf"), 1]}
    out = jobs._jsonable(metrics)
    assert out == {"mia_auc": None, "uis": 0.25, "gap": 0.5, "per_task": {"depth": {"abs_err": None}},
                   "list": [None, 1]}
    json.dumps(out, allow_nan=False)


def test_a_workers_cached_versions_give_up_their_device_data_to_the_newest(monkeypatch):
    """Only the version a job runs on keeps its data on the device; other models' caches are left alone."""
    old = jobs.engine_cache("m", 1)
    other = jobs.engine_cache("n", 1)
    host, placed = object(), object()
    old[("resident", "train")] = (host, placed)
    other[("resident", "train")] = (host, placed)
    old["engine"] = {"tau": 1}
    new = jobs.engine_cache("m", 2)
    assert new == {} and ("resident", "train") not in old and old["engine"] == {"tau": 1}
    assert ("resident", "train") in other
    assert jobs.engine_cache("m", 1) is old  # still cached, without the copy


def test_the_relay_keeps_messages_through_a_broker_outage_and_logs_it_twice(tiny, caplog):
    """While the broker is away each pass stops at the first failed publish (the rest would
    wait out their timeouts too), the messages stay, and the outage is logged when it
    starts and when it ends, not at every pass."""
    import logging

    from worker.outbox import relay_once

    s, _, ids = tiny
    for i in range(3):
        _submit(s, ids[i])
    calls = []

    def down(topic, payload):
        calls.append(payload)
        raise ConnectionError("broker unreachable")

    with caplog.at_level(logging.WARNING, logger="worker.outbox"):
        assert [relay_once(s, down) for _ in range(5)] == [0] * 5
        assert len(calls) == 5  # one try a pass, not one per message
        with transaction(s.database_url) as session:
            assert session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).all()
        sent = []
        assert relay_once(s, lambda topic, payload: sent.append(payload)) == 3
    # the three requests name one model: one message for the batch
    assert sent == [{"model_name": TINY}]
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.outbox"]
    assert len(warnings) == 2 and "failed" in warnings[0] and "answers again" in warnings[1]


def test_on_sqlite_a_publish_that_hangs_does_not_hold_the_write_lock(tiny, tmp_path):
    """SQLite's write transactions take the database's write lock: the relay published
    inside one, so a broker that accepted connections and never answered held every
    submission for its socket timeout. The rows are read, published and then marked."""
    import threading

    from worker.outbox import relay_once

    from .conftest import on_sqlite

    s, store, ids = tiny
    lite = on_sqlite(s, tmp_path)
    ensure_model(lite, store, progress=False)
    first = _submit(lite, ids[0])
    entered, released = threading.Event(), threading.Event()

    def hanging(topic, payload):
        entered.set()
        released.wait(10)  # the fallback: the old relay would otherwise hold the submission below

    relayed = []
    relay = threading.Thread(target=lambda: relayed.append(relay_once(lite, hanging)))
    relay.start()
    assert entered.wait(10)
    timer = threading.Timer(30.0, released.set)  # the bug's bound: a submission takes milliseconds
    timer.start()
    try:
        second = _submit(lite, ids[1])  # while the publish hangs
        assert not released.is_set(), "the submission waited for the publish"
    finally:
        released.set()
        timer.cancel()
        relay.join(10)
    assert relayed == [1]
    with transaction(lite.database_url) as session:
        rows = session.execute(select(OutboxMessage).order_by(OutboxMessage.id)).scalars().all()
        # the first submission's row published; the second's, committed after the read, left
        assert [(r.published_at is not None, r.attempts or 0) for r in rows] == [(True, 1), (False, 0)]
        assert session.get(DeletionRequest, first) is not None and session.get(DeletionRequest, second) is not None
    assert relay_once(lite, lambda topic, payload: None) == 1
    with transaction(lite.database_url) as session:
        assert all(r.published_at is not None for r in session.execute(select(OutboxMessage)).scalars())


def test_a_relay_of_another_record_does_not_end_this_ones_outage(tiny, caplog, tmp_path):
    """The outage state was one per process: the relay of another record in the process (the
    e2e session's API, beside the service tests) found nothing to publish, ended this relay's
    outage, and the next failed pass was logged as a new one."""
    import logging

    from worker.outbox import relay_once

    from .conftest import on_sqlite

    s, _, ids = tiny
    _submit(s, ids[0])
    other = on_sqlite(s, tmp_path)  # another record, nothing to publish

    def down(topic, payload):
        raise ConnectionError("broker unreachable")

    with caplog.at_level(logging.INFO, logger="worker.outbox"):
        assert relay_once(s, down) == 0
        assert relay_once(other, down) == 0
        assert relay_once(s, down) == 0
        assert relay_once(s, lambda topic, payload: None) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.outbox"]
    assert len(messages) == 2 and "failed" in messages[0] and "answers again" in messages[1], messages


def test_an_outage_another_relay_saw_end_does_not_hide_the_next_one(tiny, caplog):
    """Two relays (the API's thread and beat's task, or two replicas): when the broker came
    back, the other one published the backlog, this one found nothing to publish and kept
    its outage flag, so the next outage, days later, was logged at DEBUG only."""
    import logging

    from worker.outbox import relay_once

    s, _, ids = tiny

    def down(topic, payload):
        raise ConnectionError("broker unreachable")

    with caplog.at_level(logging.INFO, logger="worker.outbox"):
        _submit(s, ids[0])
        assert relay_once(s, down) == 0  # this relay sees the outage begin
        with transaction(s.database_url) as session:  # the other relay, in another process, publishes the backlog
            session.execute(update(OutboxMessage).values(published_at=utcnow()))
        assert relay_once(s, down) == 0  # nothing left: no publish tried, the outage is over here too
        _submit(s, ids[1])
        assert relay_once(s, down) == 0  # the next outage
        assert relay_once(s, lambda topic, payload: None) == 1  # and its end (the flag is the process's)
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.outbox" and r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "failed" in w]) == 2, warnings


def test_a_background_task_logs_a_run_of_failures_once_and_its_end(caplog):
    """With the database down the relay logged a traceback every second."""
    import logging

    from worker.background import _Every

    state = {"down": True}

    def relay():
        if state["down"]:
            raise ConnectionError("database unreachable")

    task = _Every("unlearnd-outbox-relay", 1.0, relay, threading.Event())
    with caplog.at_level(logging.WARNING, logger="worker.background"):
        for _ in range(30):
            task.call()
        state["down"] = False
        task.call()
        task.call()
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.background"]
    assert len(messages) == 2, messages
    assert "unlearnd-outbox-relay failed; retried every 1.0s" in messages[0]
    assert "succeeds again after 30 failure(s)" in messages[1]


def test_a_database_error_right_after_the_claim_puts_the_job_back(tiny, monkeypatch):
    """The run's first read of its job failed outside the run's error handling: the job stayed
    "running" without a heartbeat, its model busy, until the sweeper (10 minutes)."""
    from sqlalchemy.exc import OperationalError

    s, store, ids = tiny
    _submit(s, ids[0])
    real_transaction, calls = jobs.transaction, []
    monkeypatch.setattr(jobs, "_pause", lambda seconds: None)

    def first_read_fails(url):
        calls.append(1)
        if len(calls) == 2:  # the claim's is the first; the run's read is the second
            raise OperationalError("SELECT jobs", {}, Exception("server closed the connection unexpectedly"))
        return real_transaction(url)

    monkeypatch.setattr(jobs, "transaction", first_read_fails)
    outcome = jobs.process_model(s, store, TINY)
    assert outcome.status == "requeued" and "server closed" in outcome.error
    with transaction(s.database_url) as session:
        assert session.get(Job, outcome.job_id).status == "queued"
    monkeypatch.setattr(jobs, "transaction", real_transaction)
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]


def test_a_requeue_that_meets_the_database_still_away_is_tried_again(tiny, monkeypatch):
    """The blip outlasts the failed publish: the requeue is retried with back-off instead
    of leaving the job "running" until the sweeper finds it stale (10 minutes by default)."""
    from sqlalchemy.exc import OperationalError

    s, store, ids = tiny
    _submit(s, ids[0])
    lost = OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
    monkeypatch.setattr(jobs, "publish_version", lambda *a, **k: (_ for _ in ()).throw(lost))
    real_requeue, tries, pauses = jobs.requeue, [], []
    monkeypatch.setattr(jobs, "_pause", pauses.append)

    def requeue_after_two_failures(*args, **kwargs):
        tries.append(1)
        if len(tries) < 3:
            raise lost
        return real_requeue(*args, **kwargs)

    monkeypatch.setattr(jobs, "requeue", requeue_after_two_failures)
    outcome = jobs.process_model(s, store, TINY)
    assert outcome.status == "requeued" and len(tries) == 3 and pauses == [0, 1, 2]
    with transaction(s.database_url) as session:
        assert session.get(Job, outcome.job_id).status == "queued"


def _claimed_and_stored(s: Settings, store, instance: str):
    """A claimed deletion job of ``instance`` whose artifact (v1's weights) is stored, not
    published: the claim, its target version, the model and v1's manifest, the artifact's."""
    request_id = _submit(s, instance)
    claim = jobs.claim_next(s, TINY)
    version = jobs._target_version(s, store, claim.job_id, claim.attempt)
    model, base = store.load(TINY, 1)
    stored = store.put_version(model, model_name=TINY, version=version, parent=1, dataset=base.dataset,
                               job_id=claim.job_id, **_erasures_of(request_id, instance))
    return claim, version, model, base, stored


def _erasures_of(request_id: str, instance: str) -> dict:
    """The erasure claims of a job of one request erasing ``instance``'s depth on v1."""
    return dict(deletions=[request_id], deleted_cells=[[instance, "depth"]], erased_cells=[[instance, "depth"]])


@pytest.mark.parametrize("field,value", [("parent", 7), ("version", 5), ("dataset", {"name": "street"})])
def test_publish_refuses_a_manifest_whose_claims_are_not_the_jobs(tiny, field, value):
    """The sha256 vouches for the weights only; a manifest that names another base, version
    or dataset than its job is refused, not copied into the record."""
    from dataclasses import replace

    s, store, ids = tiny
    claim, version, model, base, manifest = _claimed_and_stored(s, store, ids[0])
    with pytest.raises(jobs.JobFailed, match=f"manifest does not match job {claim.job_id}: {field} "):
        jobs.publish_version(s, store, claim.job_id, replace(manifest, **{field: value}), attempt=claim.attempt)
    assert _serving(s).version == 1


def test_publish_records_the_sha256_the_store_holds(tiny):
    """Another attempt of the job may have replaced the artifact since this one stored it (a
    damaged copy discarded and written again, other bytes): the record gets the store's sha256,
    never one no stored weights have; a copy that no longer matches its manifest is refused."""
    import torch

    from model_store.local import WEIGHTS_FILE

    s, store, ids = tiny
    claim, version, model, base, mine = _claimed_and_stored(s, store, ids[0])
    store.discard(TINY, version)  # the other attempt's copy, with other weights
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    theirs = store.put_version(model, model_name=TINY, version=version, parent=1, dataset=base.dataset,
                               job_id=claim.job_id, **_erasures_of(mine.deletions[0], ids[0]))
    assert theirs.sha256 != mine.sha256
    weights = store._dir(TINY, version) / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"damaged!")
    with pytest.raises(jobs.JobFailed, match=f"the store's v{version} no longer matches its manifest"):
        jobs.publish_version(s, store, claim.job_id, mine, attempt=claim.attempt)
    assert _serving(s).version == 1
    weights.unlink()  # removed outside the service: it said the weights "were purged (they held erased data)"
    with pytest.raises(jobs.JobFailed, match=f"the store's v{version} lost its weights file after this job stored it"):
        jobs.publish_version(s, store, claim.job_id, mine, attempt=claim.attempt)
    assert _serving(s).version == 1
    weights.write_bytes(good)
    outcome = jobs.publish_version(s, store, claim.job_id, mine, attempt=claim.attempt)
    assert outcome.status == "completed" and _serving(s).version == version
    with transaction(s.database_url) as session:
        row = session.execute(select(ModelVersion).where(ModelVersion.job_id == claim.job_id)).scalar_one()
    assert row.sha256 == theirs.sha256 == store.manifest(TINY, version).sha256


def test_a_published_version_carries_the_tombstone_watermark_and_behind_reads_past_it(two_models):
    """Every tombstone up to a version's watermark is in its lineage, so the erasures it
    still holds are read from the later ones only; the answer equals the full comparison."""
    from sqlalchemy import func

    from worker.tables import Model
    from worker.versions import erasures_behind

    s, s_b, store, ids = two_models
    _submit(s, ids[0], tasks=("depth", "normal"))
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]

    def behind_both_ways(name):
        with transaction(s.database_url) as session:
            model = session.get(Model, name)
            fast = erasures_behind(session, model)
            version = session.get(Alias, (name, "serving")).version
            row = session.execute(select(ModelVersion).where(ModelVersion.model_name == name,
                                                             ModelVersion.version == version)).scalar_one()
            watermark, row.tombstone_watermark = row.tombstone_watermark, None  # (rolled back below)
            full = erasures_behind(session, model)
            session.rollback()
            return fast, full, watermark

    with transaction(s.database_url) as session:
        highest = session.execute(select(func.max(Tombstone.id))).scalar()
    fast, full, watermark = behind_both_ways(TINY)
    assert watermark == highest and fast == full == []
    fast, full, watermark = behind_both_ways(TINY_B)  # v1, registered before the erasure: no watermark
    assert watermark is None and fast == full and {t for e in fast for t in e["tasks"]} == {"depth", "normal"}
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]  # the propagate job
    fast, full, watermark = behind_both_ways(TINY_B)
    assert watermark == highest and fast == full == []
    _submit(s, ids[1])  # a later erasure through A: B holds it again, read past B's watermark
    jobs.drain_model(s, store, TINY)
    fast, full, _ = behind_both_ways(TINY_B)
    assert fast == full and [(e["instance_id"], e["tasks"]) for e in fast] == [(ids[1], ["depth"])]


def test_a_request_one_of_whose_cells_another_model_erased_meanwhile_erases_the_others(two_models):
    """Pending cells are per model, tombstones per dataset: B's request for depth and normal and
    A's for depth are both accepted. A's publishes first; B's request was rejected whole, and
    its normal cell was never erased by anyone. Then a propagate job erased depth from B and
    B's request the rest (depth recorded as already erased). Now B's one job erases both from
    B, the depth it is behind on carried with its own request."""
    s, s_b, store, ids = two_models
    theirs = _submit(s_b, ids[0], ("depth", "normal"))
    rid_a = _submit(s, ids[0], ("depth",))
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    [outcome] = jobs.drain_model(s_b, store, TINY_B)
    assert outcome.status == "completed"
    with transaction(s.database_url) as session:
        request = session.get(DeletionRequest, theirs)
        assert request.status == "completed" and request.tasks == ["depth", "normal"]
        job = session.get(Job, outcome.job_id)
        assert (job.kind, job.params["request_ids"]) == ("deletion", [theirs, rid_a])
        assert sorted(job.params["cells"]) == [[ids[0], "depth"], [ids[0], "normal"]]
        assert _tombstone_requests(s) == {(ids[0], "depth"): rid_a, (ids[0], "normal"): theirs}
        assert not session.execute(select(AuditEvent).where(
            AuditEvent.kind == "deletion.cells_already_erased")).first()  # B still held depth: its job erased it
    assert {(ids[0], "depth"), (ids[0], "normal")} <= {tuple(c) for c in _serving_of(s_b, TINY_B).erased_cells}


def test_a_rebased_job_names_the_erasures_it_catches_up_on_and_rebases_are_not_attempts(two_models, monkeypatch):
    """B's job is rebased each time A publishes an erasure of the dataset meanwhile. Its rerun
    erases A's cells too, so its version names A's requests (their certificates list B: a
    deletion.propagated event), and rebases do not count towards max_job_attempts: three of them
    failed the job and its request as a poison job."""
    from worker.requests import deletion_certificate

    s, s_b, store, ids = two_models
    theirs = _submit(s_b, ids[0])
    real_publish, mine = jobs.publish_version, []

    def publish(settings, store_, job_id, manifest, **kwargs):
        if settings.model_name == TINY_B and len(mine) < 3:  # A publishes an erasure meanwhile
            mine.append(_submit(s, ids[len(mine) + 1]))
            assert [o.status for o in jobs.drain_model(s, store, TINY, max_jobs=1)] == ["completed"]
        return real_publish(settings, store_, job_id, manifest, **kwargs)

    monkeypatch.setattr(jobs, "publish_version", publish)
    outcomes = jobs.drain_model(s_b, store, TINY_B)
    assert [o.status for o in outcomes][:4] == ["requeued"] * 3 + ["completed"]
    with transaction(s.database_url) as session:
        request = session.get(DeletionRequest, theirs)
        assert request.status == "completed", request.error
        version = session.execute(select(ModelVersion).where(ModelVersion.version == request.produced_version,
                                                             ModelVersion.model_name == TINY_B)).scalar_one()
        assert set(mine) <= set(version.deletions)
        for rid in mine:
            certificate = deletion_certificate(session, rid)
            assert TINY_B in {e["model"] for e in certificate["also_erased_from"]}
            assert TINY_B not in {p["model"] for p in certificate["propagation_pending"]}


def test_a_job_rebased_again_and_again_fails_after_max_job_rebases_saying_why(two_models, monkeypatch):
    """Rebases are not attempts, so a job of B that met a publish of A during every run was
    rebased without end and never finished. After MAX_JOB_REBASES the next refusal fails it:
    the job and its request failed, a job.failed event, nothing published."""
    s, s_b, store, ids = two_models
    theirs = _submit(s_b, ids[0])
    real_publish, mine = jobs.publish_version, []

    def publish(settings, store_, job_id, manifest, **kwargs):
        if settings.model_name == TINY_B:  # A publishes an erasure during every run of B's job
            mine.append(_submit(s, ids[len(mine) + 1]))
            assert [o.status for o in jobs.drain_model(s, store, TINY, max_jobs=1)] == ["completed"]
        return real_publish(settings, store_, job_id, manifest, **kwargs)

    monkeypatch.setattr(jobs, "publish_version", publish)
    outcomes = jobs.drain_model(s_b, store, TINY_B, max_jobs=jobs.MAX_JOB_REBASES + 1)
    assert [o.status for o in outcomes] == ["requeued"] * jobs.MAX_JOB_REBASES + ["failed"]
    assert f"rebased {jobs.MAX_JOB_REBASES} times already (MAX_JOB_REBASES)" in outcomes[-1].error
    with transaction(s.database_url) as session:
        job = session.get(Job, outcomes[-1].job_id)
        assert (job.status, job.params["rebases"], jobs.counted_attempts(job)) == ("failed", jobs.MAX_JOB_REBASES, 1)
        assert session.get(DeletionRequest, theirs).status == "failed"
        failed = session.execute(select(AuditEvent).where(AuditEvent.kind == "job.failed")).scalar_one()
        assert failed.payload["job_id"] == job.id and "MAX_JOB_REBASES" in failed.payload["error"]
    assert _serving_of(s, TINY_B).version == 1


def test_a_calibration_computed_after_an_erasure_never_trains_on_or_scores_erased_cells(two_models, monkeypatch):
    """The shadows trained on v1's data minus v1's own erasures only, so a calibration first
    computed after an erasure (B's first job here, after A erased a cell of their dataset; so
    too calibrate_shadows turned on later, or `unlearnd calibrate`) trained fresh models on
    the erased cell and stored its score. Now every tombstoned cell is left out and
    unscored, also one erased while the shadows train; the job forgetting such cells takes
    their task's mean score."""
    import unlearning.methods.interference_aware as ia

    s, s_b, store, ids = two_models
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]  # A: calibration off
    on = s_b.model_copy(update={"calibrate_shadows": True, "method": "interference_aware",
                                "method_config": {"steps": 2, "shadow_folds": 2}})
    real, seen = ia.shadow_scores, []

    def shadows(model, data, *args, **kwargs):
        seen.append({tuple(c) for c in data.train.cells()})
        _submit(s, ids[1])  # erased through A while B's shadows train
        assert [o.status for o in jobs.drain_model(s, store, TINY, max_jobs=1)] == ["completed"]
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(ia, "shadow_scores", shadows)
    outcomes = jobs.drain_model(on, store, TINY_B)
    assert [o.status for o in outcomes] == ["requeued", "completed"]  # rebased on A's second erasure
    assert len(seen) == 1 and (ids[0], "depth") not in seen[0] and (ids[0], "normal") in seen[0]
    stored = store.calibration(TINY_B)
    for mode in ("full", "partial"):
        scored = {(i, t) for i, by in stored[mode].items() for t in by}
        assert (ids[0], "depth") not in scored and (ids[1], "depth") not in scored
        assert (ids[0], "normal") in scored
    # the second erasure's cell was trained on by the shadows (erased while they trained): not "excluded"
    assert (stored["excluded_erased_cells"], stored["erased_during_calibration"]) == (1, 1)
    assert "redacted_cells" not in stored
    metrics = outcomes[-1].metrics
    depth = [by["depth"] for by in stored["partial"].values() if "depth" in by]
    assert metrics["calibration"] == "shadow_scores"
    assert metrics["mia_auc_expected"] == pytest.approx(sum(depth) / len(depth), abs=1e-6)
    assert {(ids[0], "depth"), (ids[1], "depth")} <= {tuple(c) for c in _serving_of(s, TINY_B).erased_cells}


def test_a_jobs_method_reads_the_held_out_reference_the_settings_give(tiny):
    """``UNLEARND_REFERENCE_SCENES``: the version's metrics say which held-out data the method
    read; the audit's membership attack takes the test split's instances either way."""
    s, store, ids = tiny
    _submit(s, ids[0])
    [first] = jobs.drain_model(s, store, TINY)
    assert first.status == "completed" and first.metrics["reference"] == {"source": "test_split", "instances": 8}
    own = s.model_copy(update={"reference_scenes": 4})
    _submit(own, ids[1])
    [second] = jobs.drain_model(own, store, TINY)
    assert second.status == "completed" and second.metrics["reference"] == {"source": "own", "instances": 4}
    assert _serving(s).metrics["reference"] == {"source": "own", "instances": 4}
    # a method that reads no held-out data is given none: nothing is rendered for it
    plain = own.model_copy(update={"method": "finetune"})
    _submit(plain, ids[2])
    [third] = jobs.drain_model(plain, store, TINY)
    assert third.status == "completed" and third.metrics["reference"] == {"source": "test_split", "instances": 8}


def test_a_request_for_a_cell_another_model_erased_first_completes_with_the_erasure(two_models):
    """Pending cells are per model: A and B both accept a request for one cell. When A
    publishes before B claims, B is behind on the cell; B's claim used to run a propagate job
    first and then reject B's own request as "erased by another request" (no certificate for
    its submitter), or, were that propagate job to fail, leave B serving the cell with the
    request rejected (an earlier fix claimed the request with the held cells then). B's
    deletion job now carries the cell from the start, and both requests complete."""
    s, s_b, store, ids = two_models
    ra, rb = _submit(s, ids[0]), _submit(s_b, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    outcomes = jobs.drain_model(s_b, store, TINY_B)
    assert [o.status for o in outcomes] == ["completed"]
    with transaction(s.database_url) as session:
        job = session.get(Job, outcomes[0].job_id)
        assert (job.kind, job.params["cells"]) == ("deletion", [[ids[0], "depth"]])
        assert [session.get(DeletionRequest, r).status for r in (ra, rb)] == ["completed", "completed"]
        events = [(e.kind, e.model_name, e.request_id) for e in session.execute(select(AuditEvent)).scalars()]
        cert_a, cert_b = deletion_certificate(session, ra), deletion_certificate(session, rb)
    assert ("deletion.completed", TINY_B, rb) in events and ("deletion.rejected", TINY_B, rb) not in events
    assert cert_b["model"] == TINY_B and cert_a["propagation_pending"] == []
    # one entry for B's version, naming this request's own event there
    assert [(c["model"], c["version"], c["event"]["kind"]) for c in cert_a["also_erased_from"]] == [
        (TINY_B, 2, "deletion.propagated")]
    assert [(c["model"], c["version"], c["event"]["kind"]) for c in cert_b["also_erased_from"]] == [
        (TINY, 2, "deletion.completed")]
    assert (ids[0], "depth") in {tuple(c) for c in _serving_of(s_b, TINY_B).erased_cells}
    assert _erased_cells_served(s) == {TINY: 0, TINY_B: 0}


def test_a_base_whose_weights_went_missing_is_not_called_purged(tiny):
    """The store has no mark of a purge: a manifest without weights reads as purged. A job
    on a base the record never purged says its weights are missing (restore them), where the
    job, its request and its submitter were told "its weights were purged (they held erased
    data)"; a base the record purged still says purged."""
    s, store, ids = tiny
    (store.root / TINY / "v1" / "model.safetensors").unlink()  # deleted by hand, never purged
    request_id = _submit(s, ids[0])
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "failed"
    assert "its weights are missing from the model store" in outcome.error and "purged (" not in outcome.error
    with transaction(s.database_url) as session:
        request = session.get(DeletionRequest, request_id)
        assert "weights are missing" in request.error and "held erased data" not in request.error
        session.execute(update(ModelVersion).where(ModelVersion.model_name == TINY, ModelVersion.version == 1)
                        .values(purged_at=utcnow()))
    with pytest.raises(PurgedVersion, match="purged"):
        versions.load_version(s, store, TINY, 1, "cpu")


def test_a_failure_recorded_while_the_database_is_away_is_tried_again(tiny, monkeypatch):
    """A job that failed, whose failure met a database blip: the error went up to Celery,
    whose retry found the job "running" under this live process and ended "busy"; the job
    stayed so until the sweeper (10 minutes). The record is tried again with back-off."""
    from sqlalchemy.exc import OperationalError

    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    lost = OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
    monkeypatch.setattr(jobs, "publish_version", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad weights")))
    real_mark, tries, pauses = jobs.mark_failed, [], []
    monkeypatch.setattr(jobs, "_pause", pauses.append)

    def mark_after_two_failures(*args, **kwargs):
        tries.append(1)
        if len(tries) < 3:
            raise lost
        return real_mark(*args, **kwargs)

    monkeypatch.setattr(jobs, "mark_failed", mark_after_two_failures)
    outcome = jobs.process_model(s, store, TINY)
    assert outcome.status == "failed" and outcome.error == "ValueError: bad weights" and pauses == [0, 1, 2]
    with transaction(s.database_url) as session:
        assert session.get(Job, outcome.job_id).status == "failed"
        assert session.get(DeletionRequest, request_id).status == "failed"
    # the database stays away: the outcome says the failure is not recorded, nothing is raised
    tries.clear()
    monkeypatch.setattr(jobs, "mark_failed", lambda *a, **k: (_ for _ in ()).throw(lost))
    request_id = _submit(s, ids[1])
    outcome = jobs.process_model(s, store, TINY)
    assert outcome.status == "failed" and "(not recorded: the database is unreachable)" in outcome.error
    with transaction(s.database_url) as session:
        assert session.get(Job, outcome.job_id).status == "running"  # the sweeper's, once its heartbeat is stale


def test_a_folder_in_the_first_versions_place_is_refused_before_training(settings, tmp_path, monkeypatch):
    """ensure_model trained the whole first model, then put_version refused the folder that
    held v1's place (a copy that lost its manifest, say): hours of training for nothing."""
    import unlearning.train
    from model_store import StoreError

    s = _tiny_settings(settings, tmp_path / "models")
    store = LocalModelStore(s.store_dir)
    occupied = s.store_dir / TINY / "v1"
    occupied.mkdir(parents=True)
    (occupied / "model.safetensors").write_bytes(b"weights without their manifest")
    monkeypatch.setattr(unlearning.train, "train_model", lambda *a, **k: pytest.fail("it trained first"))
    with pytest.raises(StoreError, match="v1 exists but holds no complete version of 'tiny-mtl'"):
        ensure_model(s, store, progress=False)
    assert (occupied / "model.safetensors").read_bytes() == b"weights without their manifest"  # nothing lost
    from worker.tables import Model

    with transaction(s.database_url) as session:
        assert session.get(Model, TINY) is None
