"""A delivery (``worker.tasks.process_model_task``, the in-process worker) for a model that
is busy. With a job of the model running it ends: that job's end announces the model
again. Every request announced during a long job used to start a retry chain of its own,
claiming every minute for up to two hours. With the model locked by another transaction
(a concurrent claim, a rollback, a purge; on SQLite the process's claim lock) it is
retried as before: the claim holding the lock may have read the queue before this
delivery's request committed, and end idle without announcing anything."""
from __future__ import annotations

import logging
import threading

import pytest
from celery.exceptions import Retry
from sqlalchemy import text

from worker import jobs
from worker.db import engine_for, transaction
from worker.requests import submit_deletion
from worker.tables import DeletionRequest

from .conftest import on_sqlite, register_model


def _submit(settings, model, instance_index: int = 0) -> str:
    with transaction(settings.database_url) as session:
        return submit_deletion(session, settings, instance_id=model.train_ids[instance_index], tasks=["depth"],
                               model=model.name).request.id


@pytest.fixture
def deliver(monkeypatch):
    """``deliver(settings, model_name)``: the Celery task, applied in this process with
    ``settings``; returns ``(result, retries, announcements)``: the countdown of each retry
    it asked for (the retry is recorded, not run) and the tasks it sent."""
    from worker import tasks

    retries, sent = [], []

    def retry(countdown=None, **_):
        retries.append(countdown)
        return Retry(when=countdown)  # no signature: apply() reports RETRY instead of running it again

    monkeypatch.setattr(tasks.process_model_task, "retry", retry)
    monkeypatch.setattr(tasks.app, "send_task", lambda name, args: sent.append((name, args)))

    def deliver_(settings, model_name):
        monkeypatch.setattr(tasks, "get_settings", lambda: settings)
        return tasks.process_model_task.apply(args=[model_name]), retries, sent

    return deliver_


def test_a_delivery_that_finds_a_job_running_ends_without_a_retry(settings, deliver, caplog):
    model = register_model(settings)
    first = _submit(settings, model, 0)
    claim = jobs.claim_next(settings, model.name)  # another worker's job, running
    assert claim.status == "claimed"
    second = _submit(settings, model, 1)  # announced while that job runs

    assert jobs.claim_next(settings, model.name) == jobs.Claim("busy", job_id=claim.job_id, reason="running")
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        result, retries, sent = deliver(settings, model.name)
    assert (result.state, retries, sent) == ("SUCCESS", [], [])  # no retry, and no announcement of its own
    assert result.get() == {"status": "busy", "model_name": model.name, "job_id": claim.job_id, "reason": "running"}
    assert f"model {model.name} is busy with job {claim.job_id}; its end announces the model again" in caplog.text
    with transaction(settings.database_url) as session:
        assert (session.get(DeletionRequest, first).job_id, session.get(DeletionRequest, second).job_id) == (
            claim.job_id, None)  # the second waits for the announcement at the running job's end


def test_a_delivery_that_finds_the_model_row_locked_is_retried(settings, deliver, caplog):
    """The row lock a rollback or a purge takes (and a concurrent claim: SKIP LOCKED)."""
    model = register_model(settings)
    request_id = _submit(settings, model)
    with engine_for(settings.database_url).connect() as other:
        other.execute(text("SELECT name FROM models WHERE name = :n FOR NO KEY UPDATE"), {"n": model.name})
        assert jobs.claim_next(settings, model.name) == jobs.Claim("busy", reason="locked")
        with caplog.at_level(logging.INFO, logger="worker.tasks"):
            result, retries, sent = deliver(settings, model.name)
        other.rollback()
    assert (result.state, retries, sent) == ("RETRY", [5], [])
    assert f"model {model.name} is busy (locked by another claim, a rollback or a purge); retrying in 5s" in caplog.text
    # the retry finds the request, which the locked delivery left alone
    with transaction(settings.database_url) as session:
        assert session.get(DeletionRequest, request_id).job_id is None
    claim = jobs.claim_next(settings, model.name)
    with transaction(settings.database_url) as session:
        assert (claim.status, session.get(DeletionRequest, request_id).job_id) == ("claimed", claim.job_id)


def test_a_delivery_that_finds_the_sqlite_claim_lock_held_is_retried(settings, deliver, tmp_path):
    """SQLite has no row locks: one claim at a time per process (``_process_lock``)."""
    s = on_sqlite(settings, tmp_path)
    model = register_model(s)
    _submit(s, model)
    lock = jobs._process_lock(model.name)
    assert lock.acquire(blocking=False)
    try:
        assert jobs.claim_next(s, model.name) == jobs.Claim("busy", reason="locked")
        result, retries, sent = deliver(s, model.name)
    finally:
        lock.release()
    assert (result.state, retries, sent) == ("RETRY", [5], [])
    assert jobs.claim_next(s, model.name).status == "claimed"


def _outcome(name: str, what: str) -> jobs.JobOutcome:
    status, _, reason = what.partition(":")
    return jobs.JobOutcome(status, name, job_id="j-other" if reason == "running" or status == "completed" else None,
                           reason=reason or None)


@pytest.mark.parametrize("claims, max_jobs, again", [
    (["busy:running"], 100, False),  # another process's job: its runner takes the model's next work
    (["busy:locked"], 100, True),
    (["completed", "busy:locked"], 100, True),  # the lock holder may be a claim that found this drain's job running
    (["completed", "busy:running"], 100, False),  # another runner claimed after this drain's job
    (["completed", "idle"], 100, False),  # the drain's own claim after its job found nothing: no announcement
    (["completed", "completed"], 2, True),  # the drain stopped at max_jobs: the model may have work left
], ids=lambda v: "+".join(v) if isinstance(v, list) else str(v))
def test_the_in_process_worker_tries_again_only_what_nothing_else_announces(settings, monkeypatch, claims, max_jobs,
                                                                            again):
    """The real drain (``jobs.drain_until_idle``) over the claims' outcomes: the worker
    claims the model again only where nothing else will announce it."""
    from worker import background

    calls, second = [], threading.Event()
    script = iter([_outcome("m", c) for c in claims])

    def process_model(settings_, store, name, stop=None):
        calls.append(name)
        outcome = next(script, None)
        if outcome is None:  # a claim after the scripted ones: the worker tried the model again
            second.set()
            return jobs.JobOutcome("idle", name)
        return outcome

    monkeypatch.setattr(jobs, "process_model", process_model)
    real = jobs.drain_until_idle
    monkeypatch.setattr(background, "drain_until_idle",
                        lambda settings_, store, name, stop=None: real(settings_, store, name, max_jobs, stop))
    worker = background.InProcessWorker(settings, store=None, retry_s=0.01).start()
    try:
        worker.announce("m")
        assert second.wait(30 if again else 0.5) is again, calls  # a retry comes after 0.01 s
    finally:
        worker.stop()
    assert len(calls) == len(claims) + (1 if again else 0), calls


def test_an_in_process_worker_stopping_after_a_job_announces_the_model_through_the_outbox(settings, monkeypatch):
    """A drain that ends because the worker stops, after a job that finished anyway (storing
    or publishing, it finishes first): a request whose delivery elsewhere found that job
    running waited for the sweeper. The model is announced in the outbox, for the next relay."""
    from worker import background
    from worker.tables import OutboxMessage

    s, model = settings, register_model(settings)
    worker = background.InProcessWorker(s, store=None, retry_s=0.01)

    def process_model(settings_, store, name, stop=None):
        worker._stopping.set()  # stopped while this job ran
        return jobs.JobOutcome("completed", name, job_id="j-1", version=2)

    monkeypatch.setattr(jobs, "process_model", process_model)
    with transaction(s.database_url) as session:
        before = session.query(OutboxMessage).filter(OutboxMessage.published_at.is_(None)).count()
    worker._after(model.name, jobs.drain_until_idle(s, None, model.name, stop=worker._stopping))
    with transaction(s.database_url) as session:
        rows = session.query(OutboxMessage).filter(OutboxMessage.published_at.is_(None)).all()
    assert len(rows) == before + 1 and rows[-1].payload == {"model_name": model.name}
    # put back in the queue, the job is announced by its own outbox row: nothing more
    monkeypatch.setattr(jobs, "process_model",
                        lambda *a, **k: worker._stopping.set() or jobs.JobOutcome("requeued", model.name, job_id="j-2"))
    worker._after(model.name, jobs.drain_until_idle(s, None, model.name, stop=worker._stopping))
    with transaction(s.database_url) as session:
        assert session.query(OutboxMessage).filter(OutboxMessage.published_at.is_(None)).count() == before + 1
