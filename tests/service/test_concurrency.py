"""Concurrency against the real PostgreSQL record: submissions racing each other and a
publish, idempotency twins, duplicate deliveries, and the worker's in-process caches
shared with the API's threads. Interleavings are forced (hooks, events, barriers whose
outcome holds under every order), never left to sleeps."""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

import worker.requests as requests_module
from app.main import create_app
from worker import jobs
from worker.db import engine_for, read_only, transaction
from worker.errors import Conflict
from worker.requests import submit_deletion
from worker.tables import DeletionRequest, Job, ModelVersion, Tombstone, utcnow

from .conftest import MODEL, register_model
from .test_hardening_worker import TINY, _submit, tiny, tiny_v1  # noqa: F401 - fixtures


def _requests(settings) -> list[DeletionRequest]:
    with transaction(settings.database_url) as session:
        return list(session.execute(select(DeletionRequest).order_by(DeletionRequest.created_at)).scalars())


# --------------------------------------------------------------------------- submission against a publish


def test_a_request_for_a_cell_erased_between_the_submissions_reads_is_refused(tiny, monkeypatch):
    """A submission reads which cells are erased (tombstones) and which are pending
    (unfinished requests) in two statements; a job's publish turns a pending cell into an
    erased one in one commit, without the submission lock. Here the publish lands right
    after the submission's first read: the cell must still be refused (409), not accepted
    as neither erased nor pending and rejected by the worker later."""
    s, store, ids = tiny
    first = _submit(s, ids[0])
    claim = jobs.claim_next(s, TINY)
    assert claim.status == "claimed"
    fired = []

    def publish_after(read):
        def wrapped(session, *args, **kwargs):
            out = read(session, *args, **kwargs)
            if not fired:  # the submission's first read is done: the job publishes now (its own connection)
                fired.append(jobs.run_job(s, store, claim.job_id, claim.attempt).status)
            return out
        return wrapped

    monkeypatch.setattr(requests_module, "erased_cells", publish_after(requests_module.erased_cells))
    monkeypatch.setattr(requests_module, "pending_cells", publish_after(requests_module.pending_cells))
    with transaction(s.database_url) as session, pytest.raises(Conflict) as refused:
        submit_deletion(session, s, instance_id=ids[0], tasks=["depth"])
    assert fired == ["completed"]
    [cell] = refused.value.extras["cells"]
    assert (cell["task"], cell["request_id"]) == ("depth", first)
    assert [r.id for r in _requests(s)] == [first]  # nothing stored for the refused request


# --------------------------------------------------------------------------- submissions racing each other (HTTP)


def _post_together(client: TestClient, calls: list[tuple[dict, dict]]) -> list:
    """POST /deletions from one thread per call, all released at once; the answers in call order."""
    start, out = threading.Barrier(len(calls)), [None] * len(calls)

    def post(i, body, headers):
        start.wait(10)
        out[i] = client.post("/deletions", json=body, headers=headers)

    threads = [threading.Thread(target=post, args=(i, b, h)) for i, (b, h) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_simultaneous_requests_for_overlapping_cells_store_each_cell_once(settings, model):
    """Same instance, same or overlapping tasks, at once: whatever the order, each cell is
    pending in one request only, and the others are 409 problems."""
    bodies = [["depth"]] * 4 + [["depth", "normal"], "all", ["normal"], "all"]
    with TestClient(create_app(settings)) as client:
        answers = _post_together(client, [({"instance_id": model.train_ids[0], "tasks": t}, {}) for t in bodies])
    assert {r.status_code for r in answers} <= {202, 409}
    for r in answers:
        if r.status_code == 409:
            assert r.headers["content-type"].startswith("application/problem+json")
    stored = _requests(settings)
    assert len(stored) == sum(r.status_code == 202 for r in answers) >= 1
    cells = [(r.instance_id, t) for r in stored for t in r.tasks]
    assert len(cells) == len(set(cells))


def test_simultaneous_twins_with_one_idempotency_key_store_one_request(settings, model):
    """Eight twins with one key and body: one request, every answer names it. A twin with the
    same key for another body (another model: another submission lock) is a 422, not a second
    request."""
    other = register_model(settings, "test-mtl-b")
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    twins = [(body, {"Idempotency-Key": "k-1"})] * 8
    twins.append(({**body, "model": other.name}, {"Idempotency-Key": "k-1"}))
    with TestClient(create_app(settings)) as client:
        answers = _post_together(client, twins)
    same, odd = answers[:8], answers[8]
    stored = _requests(settings)
    if odd.status_code == 202:  # the other body won the key: every twin is then the 422
        assert [r.model_name for r in stored] == [other.name]
        assert {r.status_code for r in same} == {422}
    else:
        assert odd.status_code == 422 and odd.headers["content-type"].startswith("application/problem+json")
        assert [r.model_name for r in stored] == [MODEL]
        assert {r.status_code for r in same} == {202}
        assert {r.json()["id"] for r in same} == {stored[0].id}
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in same) == 7


# --------------------------------------------------------------------------- duplicate deliveries


def test_a_delivery_arriving_during_a_claim_is_busy_and_one_version_is_published(tiny, monkeypatch):
    """The same task delivered twice at once: the second delivery's claim runs while the
    first holds the model's row lock (forced), finds the model busy and records nothing;
    after the job it finds nothing left. One version, one job."""
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    during = []
    real_start = jobs._start

    def start_and_let_the_twin_claim(job, now):
        real_start(job, now)
        if not during:
            during.append(jobs.process_model(s, store, TINY).status)  # another worker, another connection

    monkeypatch.setattr(jobs, "_start", start_and_let_the_twin_claim)
    first = jobs.process_model(s, store, TINY)
    assert (during, first.status, first.version) == (["busy"], "completed", 2)
    assert jobs.process_model(s, store, TINY).status == "idle"
    with transaction(s.database_url) as session:
        assert [v.version for v in session.execute(select(ModelVersion).order_by(ModelVersion.version)).scalars()] == [1, 2]
        assert len(session.execute(select(Job)).scalars().all()) == 1
        assert session.get(DeletionRequest, request_id).status == "completed"
        assert len(session.execute(select(Tombstone)).scalars().all()) == 1


# --------------------------------------------------------------------------- the embedded worker's caches


class _WatchedLock:
    """A re-entrant lock that says when a thread other than ``owner`` starts waiting for it."""

    def __init__(self, owner: threading.Thread):
        self.owner, self._lock, self.contended = owner, threading.RLock(), threading.Event()

    def __enter__(self):
        if threading.current_thread() is not self.owner:
            self.contended.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_a_purge_forgetting_cached_versions_while_the_worker_picks_its_cache(settings, model, monkeypatch):
    """Without a broker the worker is a thread of the API process: a purge answered by another
    thread drops purged versions from the engine cache while the worker walks it to pick a
    job's cache. The walk used to fail ('OrderedDict mutated during iteration': the job
    failed); now one waits for the other and both finish."""
    import unlearning.job

    with transaction(settings.database_url) as session:
        session.execute(select(ModelVersion)).scalar_one().purged_at = utcnow()  # v1 purged
    jobs.engine_cache(MODEL, 1)
    jobs.engine_cache(MODEL, 2)
    lock = _WatchedLock(threading.current_thread())
    monkeypatch.setattr(jobs, "_engine_cache_lock", lock, raising=False)
    forgotten, errors = [], []

    def api_thread():
        try:
            forgotten.extend(jobs.forget_purged_versions(settings))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    api = threading.Thread(target=api_thread)
    real_release = unlearning.job.release_device_data

    def release_while_the_api_purges(cache):
        if not api.is_alive() and not forgotten and not errors:
            api.start()  # in the middle of the worker's walk over the cache
            done = threading.Event()
            threading.Thread(target=lambda: (api.join(30), done.set()), daemon=True).start()
            while not (done.is_set() or lock.contended.is_set()):  # it finished, or waits for the walk
                done.wait(0.01)
        return real_release(cache)

    monkeypatch.setattr(unlearning.job, "release_device_data", release_while_the_api_purges)
    cache = jobs.engine_cache(MODEL, 3)
    api.join(30)
    assert errors == [] and forgotten == [(MODEL, 1)]
    assert cache == {} and list(jobs.ENGINE_CACHE) == [(MODEL, 2), (MODEL, 3)]


# --------------------------------------------------------------------------- readers


def test_a_read_only_transaction_reads_one_snapshot(tiny):
    """The API's GET routes read in several statements (a certificate, versions and the
    serving alias); a commit landing between two of them must not show: each reading
    transaction sees the record as it was at its first statement."""
    s, _, ids = tiny
    readers = sessionmaker(read_only(engine_for(s.database_url)))
    count = select(func.count()).select_from(DeletionRequest)
    with readers() as reader, reader.begin():
        before = reader.scalar(count)
        _submit(s, ids[1])  # commits on a connection of its own, mid-transaction
        assert reader.scalar(count) == before
    with readers() as reader, reader.begin():
        assert reader.scalar(count) == before + 1  # the next transaction sees it
    with transaction(s.database_url) as writer:  # writers keep READ COMMITTED (their locks order them)
        assert writer.connection().get_isolation_level() == "READ COMMITTED"
