"""A job whose process was killed (SIGKILL, the OOM killer) is put back in the queue as
soon as a process on the same machine looks (a claim, the sweeper, a start of `unlearnd
serve`), not once its heartbeat is ``stale_after_s`` old (``worker.runner``)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from sqlalchemy import select, text, update

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
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


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
    assert set(me) == {"host", "boot_id", "pid_ns", "time_ns", "pid", "start"}
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


def test_a_process_whose_stat_cannot_be_read_is_alive(monkeypatch):
    """``hidepid`` (systemd's ProtectProc=invisible) hides another user's /proc entries: a live
    runner read as gone, by the sweeper of an API running as another user, was requeued on
    every sweep while it ran."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = {**runner.this_process(), "pid": proc.pid, "start": _stat_start(proc.pid)}
        monkeypatch.setattr(runner, "_start_ticks", lambda pid: None)
        assert runner.is_gone(record) is False
    finally:
        proc.kill()
        proc.wait()
    assert runner.is_gone(record) is True  # the kernel says the PID is free


def test_a_reused_pid_with_a_name_that_is_not_utf8_is_read(ended):
    """A process name is any bytes: reading its stat as text raised out of the sweep."""
    import sys

    code = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'celery\\xff\\xfe', 0, 0, 0); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while b"\xff" not in open(f"/proc/{proc.pid}/comm", "rb").read():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        record = {**runner.this_process(), "pid": proc.pid, "start": _stat_start(proc.pid) - 1}  # the PID reused
        assert runner.is_gone(record) is True
        assert runner.is_gone({**record, "start": record["start"] + 1}) is False
    finally:
        proc.kill()
        proc.wait()


def test_a_proc_of_another_pid_namespace_tells_nothing(monkeypatch):
    """`unshare --pid --fork` without --mount-proc: /proc/<pid> names other processes."""
    real = os.readlink
    monkeypatch.setattr(runner.os, "readlink", lambda path: "1" if str(path) == "/proc/self" else real(path))
    assert runner._machine() is None


def test_a_forked_child_is_its_own_runner():
    """The cache is per PID and cleared in a forked child: a child that later got an
    ancestor's PID would have given the ancestor's start time."""
    parent = runner.this_process()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own record, and an empty cache
        try:
            os.write(write, repr((runner._cached == {}, runner.this_process())).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        empty, child = eval(pipe.read())  # noqa: S307 - our own child's repr
    os.waitpid(pid, 0)
    assert empty is True and child["pid"] == pid != parent["pid"] and child["start"] >= parent["start"]


@pytest.mark.parametrize("change", [
    lambda e: None, lambda e: "x", lambda e: {}, lambda e: {"pid": e["pid"]},
    # another machine, another boot, another PID namespace: not this process's to tell
    lambda e: {**e, "host": "another-machine"}, lambda e: {**e, "boot_id": "another-boot"},
    lambda e: {**e, "pid_ns": 1}, lambda e: {**e, "time_ns": 1},
    lambda e: {**e, "pid": str(e["pid"])}, lambda e: {**e, "pid": True}, lambda e: {**e, "pid": 0},
    lambda e: {**e, "start": None},
], ids=["none", "string", "empty", "pid-only", "host", "boot", "pid-namespace", "time-namespace", "pid-string",
        "pid-bool",
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


def test_a_takeover_and_a_submission_of_the_model_do_not_deadlock(settings, ended, monkeypatch):
    """A submission takes the model's submission lock, then the audit append lock. The takeover
    appended job.requeued (the append lock) before it took the submission lock: opposite
    orders, and PostgreSQL killed one side. It takes the submission lock first now."""
    import threading

    from worker import requests as requests_module

    model = register_model(settings)
    _submit(settings, model, 0)
    first = jobs.claim_next(settings, model.name)
    _run_by(settings, first.job_id, ended)
    holding, go_on = threading.Event(), threading.Event()
    resolve = requests_module.resolve_cells

    def resolve_then_wait(*args, **kwargs):  # called with the submission lock held
        holding.set()
        go_on.wait(30)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(requests_module, "resolve_cells", resolve_then_wait)
    outcome: dict = {}

    def run(name, call):
        try:
            outcome[name] = call()
        except Exception as e:  # noqa: BLE001 - asserted below
            outcome[name] = e

    submission = threading.Thread(target=run, args=("submitted", lambda: _submit(settings, model, 1)))
    submission.start()
    assert holding.wait(10)
    claim = threading.Thread(target=run, args=("claim", lambda: jobs.claim_next(settings, model.name)))
    claim.start()
    time.sleep(1.0)  # the claim waits for the submission lock, holding no lock the submission needs
    go_on.set()
    submission.join(30)
    claim.join(30)
    assert isinstance(outcome["submitted"], str), outcome
    assert outcome["claim"] == jobs.Claim("claimed", first.job_id, 2), outcome


def test_a_takeover_that_finds_the_job_put_back_meanwhile_claims_it(settings, ended):
    """The sweeper put the job back while the claim waited for its row: the claim claims it,
    where it answered busy ("running") for a queued job."""
    import threading

    from worker.db import engine_for

    model = register_model(settings)
    _submit(settings, model, 0)
    first = jobs.claim_next(settings, model.name)
    _run_by(settings, first.job_id, ended)
    got: dict = {}
    with engine_for(settings.database_url).connect() as conn:
        conn.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": first.job_id})
        claim = threading.Thread(target=lambda: got.setdefault("claim", jobs.claim_next(settings, model.name)))
        claim.start()
        time.sleep(1.0)
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = :i"), {"i": first.job_id})
        conn.commit()
        claim.join(10)
    assert got["claim"] == jobs.Claim("claimed", first.job_id, 2)
