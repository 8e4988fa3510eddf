"""A job whose process was killed (SIGKILL, the OOM killer) is put back in the queue as
soon as a process on the same machine looks (a claim, the sweeper, a start of `unlearnd
serve`), not once its heartbeat is ``stale_after_s`` old (``worker.runner``)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from sqlalchemy import select, update

from worker import jobs, runner
from worker.audit import verify_chain
from worker.background import models_with_queued_work
from worker.db import transaction
from worker.outbox import sweep_once
from worker.requests import submit_deletion
from worker.tables import AuditEvent, DeletionRequest, Job

from .conftest import on_sqlite, register_model

pytestmark = pytest.mark.skipif(runner.this_process() is None, reason="no /proc to tell a process by")


def _stat_start(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def ended():
    """A runner record of a process that ran on this machine and has ended (reaped)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = {**runner.this_process(), "pid": proc.pid, "start": _stat_start(proc.pid)}
    finally:
        proc.kill()
        proc.wait()
    return record


def test_this_process_names_this_process_and_is_not_gone():
    me = runner.this_process()
    assert set(me) == {"host", "boot_id", "pid_ns", "pid", "start"}
    assert me["pid"] == os.getpid() and me["start"] == _stat_start(os.getpid())
    assert runner.is_gone(me) is False
    assert runner.is_gone({**me, "pid": os.getppid(), "start": _stat_start(os.getppid())}) is False


def test_an_ended_process_a_zombie_and_a_reused_pid_are_gone(ended):
    assert runner.is_gone(ended) is True
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = {**runner.this_process(), "pid": proc.pid, "start": _stat_start(proc.pid)}
        assert runner.is_gone(record) is False
        proc.kill()
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # killed, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert runner.is_gone(record) is True
    finally:
        proc.kill()
        proc.wait()
    me = runner.this_process()
    assert runner.is_gone({**me, "start": me["start"] + 1}) is True  # this PID, another process's start


@pytest.mark.parametrize("change", [
    lambda e: None, lambda e: "x", lambda e: {}, lambda e: {"pid": e["pid"]},
    # another machine, another boot, another PID namespace: not this process's to tell
    lambda e: {**e, "host": "another-machine"}, lambda e: {**e, "boot_id": "another-boot"},
    lambda e: {**e, "pid_ns": 1},
    lambda e: {**e, "pid": str(e["pid"])}, lambda e: {**e, "pid": True}, lambda e: {**e, "pid": 0},
    lambda e: {**e, "start": None},
], ids=["none", "string", "empty", "pid-only", "host", "boot", "pid-namespace", "pid-string", "pid-bool",
        "pid-0", "start-none"])
def test_what_cannot_be_told_is_alive(ended, change):
    assert runner.is_gone(ended) is True
    assert runner.is_gone(change(ended)) is False


def _submit(settings, model, index: int) -> str:
    with transaction(settings.database_url) as session:
        return submit_deletion(session, settings, instance_id=model.train_ids[index], tasks=["depth"],
                               model=model.name).request.id


def _gone_reasons(settings) -> list[dict]:
    with transaction(settings.database_url) as session:
        return [e.payload for e in session.execute(select(AuditEvent).where(AuditEvent.kind == "job.requeued")
                                                   .order_by(AuditEvent.seq)).scalars()]


def _run_by(settings, job_id: str, record) -> None:
    with transaction(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(runner=record))


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_claim_takes_over_a_job_whose_runner_is_gone(settings, tmp_path, ended, backend):
    s = settings if backend == "postgresql" else on_sqlite(settings, tmp_path)
    model = register_model(s)
    request_id = _submit(s, model, 0)
    first = jobs.claim_next(s, model.name)
    assert first.status == "claimed"
    with transaction(s.database_url) as session:
        assert session.get(Job, first.job_id).runner == runner.this_process()
    # its runner alive (this process): busy, as ever
    assert jobs.claim_next(s, model.name) == jobs.Claim("busy", job_id=first.job_id, reason="running")
    assert models_with_queued_work(s) == []

    _run_by(s, first.job_id, ended)  # the process that claimed it was killed; its heartbeat is fresh
    assert models_with_queued_work(s) == [model.name]  # what `unlearnd serve` announces at its start
    second = jobs.claim_next(s, model.name)
    assert (second.status, second.job_id, second.attempt) == ("claimed", first.job_id, 2)
    [requeued] = _gone_reasons(s)
    assert requeued["job_id"] == first.job_id and requeued["reason"] == runner.GONE_REASON
    assert requeued["request_ids"] == [request_id] and requeued["attempts"] == 1
    with transaction(s.database_url) as session:
        job = session.get(Job, first.job_id)
        assert (job.status, job.attempts, job.runner) == ("running", 2, runner.this_process())
        assert session.get(DeletionRequest, request_id).status == "running"
        assert verify_chain(session)["ok"] is True


def test_a_job_killed_each_time_is_failed_after_max_attempts(settings, ended):
    """A poison job (killed by the OOM killer on every run) is not taken over for ever."""
    model = register_model(settings)
    request_id = _submit(settings, model, 0)
    claim = jobs.claim_next(settings, model.name)
    for attempt in range(1, settings.max_job_attempts):
        _run_by(settings, claim.job_id, ended)
        claim = jobs.claim_next(settings, model.name)
        assert (claim.status, claim.attempt) == ("claimed", attempt + 1)
    _run_by(settings, claim.job_id, ended)
    assert jobs.claim_next(settings, model.name).status == "idle"
    with transaction(settings.database_url) as session:
        job = session.get(Job, claim.job_id)
        assert (job.status, job.attempts) == ("failed", settings.max_job_attempts)
        assert "gave up after 3 attempts" in job.error
        assert session.get(DeletionRequest, request_id).status == "failed"


def test_the_sweeper_puts_back_a_job_whose_runner_is_gone_with_a_fresh_heartbeat(settings, ended):
    model = register_model(settings)
    _submit(settings, model, 0)
    claim = jobs.claim_next(settings, model.name)
    announced = []
    assert sweep_once(settings, lambda topic, payload: announced.append(payload))["jobs"] == 0  # alive
    _run_by(settings, claim.job_id, ended)
    swept = sweep_once(settings, lambda topic, payload: announced.append(payload))
    assert (swept["jobs"], swept["models"]) == (1, [model.name])
    assert {"model_name": model.name} in announced
    [requeued] = _gone_reasons(settings)
    assert (requeued["job_id"], requeued["reason"]) == (claim.job_id, runner.GONE_REASON)
    with transaction(settings.database_url) as session:
        assert session.get(Job, claim.job_id).status == "queued"
    assert jobs.claim_next(settings, model.name).attempt == 2


def test_a_job_whose_runner_is_unknown_waits_for_the_heartbeat_rule(settings):
    """A job claimed before migration 0011 (runner NULL) or on a machine without /proc."""
    model = register_model(settings)
    _submit(settings, model, 0)
    claim = jobs.claim_next(settings, model.name)
    _run_by(settings, claim.job_id, None)
    assert jobs.claim_next(settings, model.name) == jobs.Claim("busy", job_id=claim.job_id, reason="running")
    assert sweep_once(settings, lambda topic, payload: None)["jobs"] == 0
    assert _gone_reasons(settings) == []
