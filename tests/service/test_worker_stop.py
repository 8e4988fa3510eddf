"""A worker that is stopped in the middle of a job (Ctrl-C of `unlearnd serve`, whose
in-process worker runs the jobs) puts the job back in the queue at once: the next
start runs it, instead of the record showing it 'running' until the sweeper finds
its heartbeat STALE_AFTER_S old."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from worker import jobs
from worker.audit import verify_chain
from worker.background import InProcessWorker
from worker.db import transaction
from worker.tables import AuditEvent, DeletionRequest, Job, ModelVersion, OutboxMessage

from .test_hardening_worker import TINY, _submit, tiny, tiny_v1  # noqa: F401 - fixtures


def _stop_at_first_progress(monkeypatch, stop: threading.Event) -> threading.Event:
    """Set ``stop`` when the engine first reports progress (the job is computing); returns
    an event set at the same moment."""
    computing = threading.Event()
    real = jobs._Heartbeat.progress

    def progress(self, fraction):
        computing.set()
        stop.set()
        return real(self, fraction)

    monkeypatch.setattr(jobs._Heartbeat, "progress", progress)
    return computing


def _record(s, request_id):
    with transaction(s.database_url) as session:
        job = session.execute(select(Job)).scalar_one()
        return dict(
            job=(job.status, job.attempts), request=session.get(DeletionRequest, request_id).status,
            versions=session.execute(select(ModelVersion.version).order_by(ModelVersion.version)).scalars().all(),
            requeued=[e.payload for e in session.execute(
                select(AuditEvent).where(AuditEvent.kind == "job.requeued")).scalars()],
            announced=session.execute(select(OutboxMessage.payload).where(
                OutboxMessage.published_at.is_(None))).scalars().all(),
            chain=verify_chain(session)["ok"], job_id=job.id)


def test_a_stopped_run_puts_its_job_back_and_the_next_run_completes_it(tiny, monkeypatch):
    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    stop = threading.Event()
    computing = _stop_at_first_progress(monkeypatch, stop)

    outcomes = jobs.drain_model(s, store, TINY, stop=stop)
    assert computing.is_set()
    assert [o.status for o in outcomes] == ["requeued"]  # and the drain did not claim it again
    after = _record(s, request_id)
    assert after["job"] == ("queued", 1) and after["request"] == "queued"
    assert after["versions"] == [1] and store.versions(TINY) == [1]
    assert [p["reason"] for p in after["requeued"]] == ["the worker stopped before the job finished"]
    assert {"model_name": TINY} in after["announced"]  # the relay announces it at the next start

    monkeypatch.undo()
    done = jobs.drain_model(s, store, TINY)
    assert [(o.status, o.job_id, o.version) for o in done] == [("completed", after["job_id"], 2)]
    final = _record(s, request_id)
    assert final["job"] == ("completed", 2) and final["request"] == "completed" and final["chain"]


def test_the_in_process_worker_stops_mid_job_and_leaves_it_queued(tiny, monkeypatch):
    """The in-process worker's stop() (the API's shutdown) ends a long job within its
    timeout, the thread gone: a thread left running torch at interpreter exit aborted
    the process ('terminate called without an active exception')."""
    s, store, ids = tiny
    s = s.model_copy(update={"method": "retrain", "method_config": {"train": {"epochs": 100000}}})  # hours
    request_id = _submit(s, ids[0])
    computing = threading.Event()
    real = jobs._Heartbeat.progress

    def progress(self, fraction):
        computing.set()
        return real(self, fraction)

    monkeypatch.setattr(jobs._Heartbeat, "progress", progress)
    worker = InProcessWorker(s, store).start()
    worker.announce(TINY)
    assert computing.wait(120), "the job never started computing"
    worker.stop(timeout=60)
    assert not worker._thread.is_alive()
    after = _record(s, request_id)
    assert after["job"] == ("queued", 1) and after["request"] == "queued" and after["versions"] == [1]
    assert len(after["requeued"]) == 1 and after["chain"]


def test_a_stop_while_the_first_job_trains_its_shadow_models_requeues_it(tiny, monkeypatch):
    """With UNLEARND_CALIBRATE_SHADOWS the model's first job trains (1 + T) x folds shadow
    models before unlearning. They report progress (the bar moved only once the method
    started) and the stop check runs there: a stop ends the job within one training step,
    requeued, with no calibration stored; the next run calibrates and completes it."""
    s, store, ids = tiny
    s = s.model_copy(update={"calibrate_shadows": True, "method_config": {"steps": 2, "shadow_folds": 2}})
    request_id = _submit(s, ids[0])
    stop = threading.Event()
    reported: list[float] = []
    real = jobs._Heartbeat.progress

    def progress(self, fraction):
        reported.append(fraction)
        if store.calibration(TINY) is None and len(reported) == 3:  # the third shadow step
            stop.set()
        return real(self, fraction)

    monkeypatch.setattr(jobs._Heartbeat, "progress", progress)
    outcomes = jobs.drain_model(s, store, TINY, stop=stop)
    assert [o.status for o in outcomes] == ["requeued"]
    assert len(reported) == 3 and 0 < reported[-1] < 0.2  # three of the 8 shadows' ~28 steps, and no further
    assert store.calibration(TINY) is None
    after = _record(s, request_id)
    assert after["job"] == ("queued", 1) and after["versions"] == [1]

    reported.clear()
    done = jobs.drain_model(s, store, TINY)
    assert [o.status for o in done] == ["completed"]
    assert store.calibration(TINY)["shadows"] == 2 * 4
    # through the shadows' steps (28), then the method's (2 steps, the repair, the evaluation)
    assert reported == sorted(reported) and len(reported) >= 31 and reported[-1] == 1.0
    assert _record(s, request_id)["request"] == "completed"


def test_stops_do_not_count_as_attempts(tiny, monkeypatch):
    """A job put back because its worker was stopping (a deploy, a restart) is not a poison
    job: MAX_JOB_ATTEMPTS (3 here) stops in a row used to fail it ("gave up after 3
    attempts") at the next claim. A claim that ends otherwise still counts."""
    s, store, ids = tiny
    assert s.max_job_attempts == 3
    request_id = _submit(s, ids[0])
    for n in range(1, 4):
        stop = threading.Event()
        _stop_at_first_progress(monkeypatch, stop)
        assert [o.status for o in jobs.drain_model(s, store, TINY, stop=stop)] == ["requeued"]
        monkeypatch.undo()
        with transaction(s.database_url) as session:
            job = session.execute(select(Job)).scalar_one()
            assert (job.status, job.attempts, job.params["stops"], jobs.counted_attempts(job)) == ("queued", n, n, 0)
    done = jobs.drain_model(s, store, TINY)
    assert [o.status for o in done] == ["completed"]
    final = _record(s, request_id)
    assert final["job"] == ("completed", 4) and final["request"] == "completed" and final["chain"]


def test_the_in_process_worker_starts_with_the_queued_work_it_held_when_it_stopped(settings, tmp_path, monkeypatch):
    """Its queue is memory: announcements relayed to it (outbox rows marked published) and not
    yet run when the API stopped were gone, and their requests waited for the sweeper to find
    them stale (10 minutes) after the restart. It now starts with every model with queued work."""
    from worker import background
    from worker.outbox import relay_once

    from .conftest import on_sqlite, register_model

    s = on_sqlite(settings, tmp_path).model_copy(update={"store_dir": tmp_path / "models"})
    a, b = register_model(s, "a"), register_model(s, "b")
    from worker.requests import submit_deletion

    for m in (a, b):
        with transaction(s.database_url) as session:
            submit_deletion(session, s, instance_id=m.train_ids[0], tasks=["depth"], model=m.name)
    held = InProcessWorker(s, store=None)  # never started: what a stopped worker's queue held, lost
    assert relay_once(s, held.publish) == 2
    with transaction(s.database_url) as session:
        assert not session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).first()

    ran = []
    monkeypatch.setattr(background, "drain_until_idle",
                        lambda settings_, store, name, stop=None: ran.append(name) or jobs.Drain([], None))
    stop = background.start_background(s)
    try:
        deadline = time.monotonic() + 60  # a loaded machine: a bound, not a timing
        while sorted(ran) != ["a", "b"] and time.monotonic() < deadline:
            threading.Event().wait(0.05)
    finally:
        stop()
    assert sorted(ran) == ["a", "b"]


def test_the_in_process_worker_logs_a_models_run_of_failures_once_and_its_end(settings, monkeypatch, caplog):
    """With the database down it logged a traceback on every 2-second retry."""
    import logging

    from worker import background

    state = {"left": 5}

    def drain(settings_, store, name, stop=None):
        if state["left"]:
            state["left"] -= 1
            raise ConnectionError("database unreachable")
        return jobs.Drain([], jobs.JobOutcome("idle", name))

    monkeypatch.setattr(background, "drain_until_idle", drain)
    worker = InProcessWorker(settings, store=None, retry_s=0.01)
    with caplog.at_level(logging.WARNING, logger="worker.background"):
        worker.start()
        worker.announce("a")
        deadline = time.monotonic() + 60
        while not any("succeeds again" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        worker.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.background"]
    assert len(messages) == 2, messages
    assert "processing a failed; retried" in messages[0]
    assert "processing a succeeds again after 5 failure(s)" in messages[1]


def test_a_stop_during_the_evaluation_lets_the_job_finish(tiny, monkeypatch):
    """A stop during the evaluation (the method has returned, its work is done) used to end
    the job at the engine's last progress report: the finished work was thrown away and the
    job ran again from the start. Found at that report, the job stores and publishes."""
    import unlearning.job as engine_job

    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    stop = threading.Event()
    real = engine_job.evaluate_unlearning

    def evaluate(*args, **kwargs):
        out = real(*args, **kwargs)
        stop.set()  # the API's shutdown arrives while the engine evaluates
        return out

    monkeypatch.setattr(engine_job, "evaluate_unlearning", evaluate)
    outcomes = jobs.drain_model(s, store, TINY, stop=stop)
    assert stop.is_set()
    assert [(o.status, o.version) for o in outcomes] == [("completed", 2)]  # and no claim after it
    after = _record(s, request_id)
    assert after["job"] == ("completed", 1) and after["request"] == "completed" and after["requeued"] == []
    assert after["versions"] == [1, 2] and store.versions(TINY) == [1, 2]


class _HeldTimer:
    """A threading.Timer that starts nothing: the test fires it."""

    made: list["_HeldTimer"] = []

    def __init__(self, interval, function, args=()):
        self.function, self.args, self.daemon = function, args, False
        _HeldTimer.made.append(self)

    def start(self):
        pass

    def fire(self):
        self.function(*self.args)


def test_the_in_process_worker_keeps_one_retry_per_model_through_an_outage(settings, monkeypatch):
    """Each failed drain set a timer of its own: every announcement during an outage started
    a retry loop that never merged with the others (with the relay announcing again each
    tick the rows it could not mark published: one more loop a tick, thousands of threads
    within the hour). One retry per model is set at a time."""
    from worker import background

    drains = []
    drained = threading.Condition()

    def drain(settings_, store, name, stop=None):
        with drained:
            drains.append(name)
            drained.notify_all()
        raise ConnectionError("database unreachable")

    def wait_drains(n):
        with drained:
            assert drained.wait_for(lambda: len(drains) >= n, 60), drains

    monkeypatch.setattr(background, "drain_until_idle", drain)
    monkeypatch.setattr(background.threading, "Timer", _HeldTimer)
    _HeldTimer.made = []
    worker = InProcessWorker(settings, store=None, retry_s=0.01).start()
    try:
        for n in range(1, 6):  # five announcements, each drained (and failing) before the next
            worker.announce("a")
            wait_drains(n)
        worker.announce("b")
        wait_drains(6)
        deadline = time.monotonic() + 60
        while len(_HeldTimer.made) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [tuple(t.args) for t in _HeldTimer.made] == [("a",), ("b",)]  # one each, not one per failure
        _HeldTimer.made[0].fire()  # a's retry: drained (fails) and a new one is set
        wait_drains(7)
        while len(_HeldTimer.made) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [tuple(t.args) for t in _HeldTimer.made] == [("a",), ("b",), ("a",)]
    finally:
        worker.stop()
    assert drains == ["a"] * 5 + ["b", "a"]


def test_a_stopping_in_process_worker_refuses_the_relays_announcements(tiny, caplog):
    """The relay could still run after the worker stopped taking work: its announcements were
    marked published and lost. Refused, they stay in the outbox for the next start."""
    import logging

    from worker.outbox import NotNow, relay_once

    s, store, ids = tiny
    _submit(s, ids[0])
    worker = InProcessWorker(s, store=store)  # not started: nothing drains
    worker.begin_stop()
    with pytest.raises(NotNow, match="stopping"):
        worker.publish("process_model", {"model_name": TINY})
    with caplog.at_level(logging.WARNING, logger="worker.outbox"):
        assert relay_once(s, worker.publish) == 0
    assert not caplog.records  # not a broker outage
    with transaction(s.database_url) as session:
        assert session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).first()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, on purpose
def test_readyz_reports_a_background_thread_that_ended(settings, tmp_path, monkeypatch):
    """Nothing restarts the relay, the sweeper or the in-process worker: one that ended (an
    error no handler takes) left /readyz 200 while announcements went nowhere."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from worker import background

    from .conftest import on_sqlite

    s = on_sqlite(settings, tmp_path).model_copy(update={"store_dir": tmp_path / "models", "background": True,
                                                          "relay_interval_s": 0.05})
    ended = threading.Event()

    def relay_gone(*args, **kwargs):
        ended.set()
        raise SystemExit  # what no `except Exception` takes: the thread ends

    with TestClient(create_app(s)) as client:
        assert client.get("/readyz").status_code == 200
        monkeypatch.setattr(background, "relay_once", relay_gone)
        assert ended.wait(60)
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["reason"] == "background" and body["threads"] == ["unlearnd-outbox-relay"]
        assert "restart it" in body["detail"]


def test_readyz_reports_background_work_that_did_not_start(settings, tmp_path, monkeypatch):
    """Background work on, and worker.background not importable: the API logged an error and
    answered ready, with no relay and no worker behind it."""
    import sys

    from fastapi.testclient import TestClient

    from app.main import create_app

    from .conftest import on_sqlite

    s = on_sqlite(settings, tmp_path).model_copy(update={"store_dir": tmp_path / "models", "background": True})
    monkeypatch.setitem(sys.modules, "worker.background", None)  # `import` raises ImportError
    with TestClient(create_app(s)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "background"
        assert r.json()["threads"] == ["all (they did not start)"]
    with TestClient(create_app(s.model_copy(update={"background": False}))) as client:
        assert client.get("/readyz").status_code == 200  # background work off: nothing to miss


def test_a_job_past_its_time_limit_fails_where_no_pool_enforces_it(tiny, monkeypatch):
    """UNLEARND_JOB_TIME_LIMIT_S was the prefork pool's alone: the in-process worker (and
    Celery's solo pool) ran a job for ever. Past it, the engine's next progress report ends
    the job, recorded as the pool's soft limit is: failed, nothing published."""
    s, store, ids = tiny
    s = s.model_copy(update={"job_time_limit_s": 60})
    request_id = _submit(s, ids[0])
    now = [0.0]
    monkeypatch.setattr(jobs, "_clock", lambda: now[0])
    real = jobs._Heartbeat.progress

    def progress(self, fraction):
        now[0] += 61  # the first report comes a minute and a second on
        return real(self, fraction)

    monkeypatch.setattr(jobs._Heartbeat, "progress", progress)
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "failed"
    assert "ran past its time limit (UNLEARND_JOB_TIME_LIMIT_S=60 s)" in outcome.error
    after = _record(s, request_id)
    assert after["job"] == ("failed", 1) and after["request"] == "failed" and after["versions"] == [1]


def test_an_attempt_the_record_no_longer_names_stops_computing(tiny, monkeypatch):
    """A suspend (or a clock step) longer than stale_after_s: the sweeper put the job back and
    another worker claimed it, while this run went on computing to the end (its artifact was
    then refused), holding the device all along. Its heartbeat sees the record name another
    attempt, and the run stops at its next progress report, recording nothing."""
    from sqlalchemy import update

    s, store, ids = tiny
    request_id = _submit(s, ids[0])
    real = jobs._Heartbeat.progress
    taken = []

    def progress(self, fraction):
        if not taken:  # meanwhile: requeued by the sweeper and claimed again elsewhere
            with transaction(s.database_url) as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(attempts=Job.attempts + 1))
            taken.append(self.job_id)
            self.write()  # its next heartbeat
        return real(self, fraction)

    monkeypatch.setattr(jobs._Heartbeat, "progress", progress)
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "superseded" and "its computation stopped" in outcome.error
    after = _record(s, request_id)
    assert after["job"] == ("running", 2)  # the other attempt's, untouched
    assert after["versions"] == [1] and store.versions(TINY) == [1]


def test_a_first_jobs_calibration_does_not_count_against_its_time_limit(tiny, monkeypatch):
    """Where the job itself keeps its time limit, the shadow calibration's training steps are
    not timed and the clock starts after it: one past the limit was never stored, and every
    later job trained it again and failed alike. (The calibration's progress reports used to
    check the job's clock: a calibration that took longer than the limit failed every job.)"""
    s, store, ids = tiny
    s = s.model_copy(update={"job_time_limit_s": 60, "calibrate_shadows": True,
                             "method_config": {"steps": 2, "shadow_folds": 2}})
    request_id = _submit(s, ids[0])
    now = [0.0]
    monkeypatch.setattr(jobs, "_clock", lambda: now[0])
    import unlearning.methods.interference_aware as ia

    real, steps = ia.shadow_scores, []

    def slow_shadows(*args, progress=None, **kwargs):
        def each_step(fraction):
            now[0] += 30  # every shadow training step takes half the job's limit
            steps.append(fraction)
            progress(fraction)
        return real(*args, progress=each_step, **kwargs)

    monkeypatch.setattr(ia, "shadow_scores", slow_shadows)
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "completed", outcome.error
    assert len(steps) > 2  # the shadows trained, far past the limit
    assert store.calibration(TINY) is not None
    assert _record(s, request_id)["request"] == "completed"


def test_a_time_limit_during_the_calibration_says_so_and_how_to_avoid_it(tiny, monkeypatch):
    """Celery's prefork pool limits the whole delivery, the calibration included: its soft
    limit raised inside the shadows' training is recorded as such, naming `unlearnd calibrate`."""
    from celery.exceptions import SoftTimeLimitExceeded

    s, store, ids = tiny
    s = s.model_copy(update={"job_time_limit_s": 60, "calibrate_shadows": True,
                             "method_config": {"steps": 2, "shadow_folds": 2}})
    request_id = _submit(s, ids[0])
    import unlearning.methods.interference_aware as ia

    def limited(*args, progress=None, **kwargs):
        progress(0.1)
        raise SoftTimeLimitExceeded()  # as the pool's signal handler raises it

    monkeypatch.setattr(ia, "shadow_scores", limited)
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "failed"
    assert "while training tiny-mtl's shadow calibration" in outcome.error.replace(TINY, "tiny-mtl")
    assert "`unlearnd calibrate`" in outcome.error and "UNLEARND_JOB_TIME_LIMIT_S=60 s" in outcome.error
    assert store.calibration(TINY) is None
    after = _record(s, request_id)
    assert after["request"] == "failed" and after["versions"] == [1]


def test_a_publish_hashes_the_artifacts_weights_before_taking_any_lock(tiny, monkeypatch):
    """The publish read and hashed the stored weights with the job row locked (on SQLite the
    write lock: every writer of the API waited for as long as the read took)."""
    from contextlib import contextmanager

    from model_store.local import LocalModelStore

    s, store, ids = tiny
    _submit(s, ids[0])
    inside, calls = [False], []
    real_transaction, real_check = jobs.transaction, LocalModelStore.check_weights

    @contextmanager
    def transaction(url):
        with real_transaction(url) as session:
            inside[0] = True
            try:
                yield session
            finally:
                inside[0] = False

    def check_weights(self, name, version):
        calls.append((version, inside[0]))
        return real_check(self, name, version)

    monkeypatch.setattr(jobs, "transaction", transaction)
    monkeypatch.setattr(LocalModelStore, "check_weights", check_weights)
    [outcome] = jobs.drain_model(s, store, TINY)
    assert outcome.status == "completed" and outcome.version == 2
    assert calls == [(2, False)]  # once, outside every transaction of the worker
