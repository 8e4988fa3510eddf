"""`unlearnd worker` (Celery's prefork pool, as deployed) stopped in the middle of a job.

SIGTERM to every process of the worker (systemd's default KillMode; Celery's cold
shutdown sends it to its pool processes) used to end the pool process at once: the
job stayed 'running' until the sweeper found its heartbeat STALE_AFTER_S (10 minutes)
old. Now the job goes back in the queue before the process ends, and the next worker
runs it at once. Its own database, store and queue, so the session's worker and relay
never see this model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import select

from .conftest import PG_ADMIN, TINY, _child_env, stop_process, wait_for

pytestmark = pytest.mark.service

QUEUE = f"unlearnd-stop-{os.getpid()}"


@pytest.fixture
def own_service(redis_url, tmp_path):
    import psycopg

    name = f"unlearnd_e2e_{os.getpid()}_stop"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    env = {**TINY, "UNLEARND_MODEL_NAME": "e2e-stop", "UNLEARND_DATABASE_URL": url, "UNLEARND_BROKER_URL": redis_url,
           "UNLEARND_STORE_DIR": str(tmp_path / "store"), "UNLEARND_CALIBRATE_SHADOWS": "false",
           "UNLEARND_METHOD": "retrain", "UNLEARND_STALE_AFTER_S": "20"}  # a heartbeat (with progress) every 5 s
    try:
        yield env
    finally:
        import redis

        redis.Redis.from_url(redis_url).delete(QUEUE)
        from worker.db import engine_for

        engine_for(url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _settings(env: dict):
    from worker.settings import Settings

    values = {k[len("UNLEARND_"):].lower(): v for k, v in env.items()}
    values["method_config"] = json.loads(values["method_config"])
    return Settings(_env_file=None, **values)


def _worker(env: dict, log, *extra: str):
    """`unlearnd worker` (prefork, concurrency 1, unless ``extra`` says otherwise) on this test's
    queue, in a process group of its own."""
    cmd = [sys.executable, "-m", "app.cli", "worker", "--", "-Q", QUEUE, "-n", f"stop-{uuid.uuid4().hex[:8]}@%h",
           "--without-gossip", "--without-mingle", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                env=_child_env(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: proc.poll() is not None or b"ready." in log.read_bytes(), 90, what="the Celery worker")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def _endless_job(env: dict, instance_index: int):
    """The model registered, a depth erasure of one instance submitted: ``(settings, request
    id, record)``, where ``record()`` is ``(job, request, payloads of job.requeued events)``."""
    from model_store import LocalModelStore
    from worker.bootstrap import ensure_model
    from worker.datasets import dataset_spec, get_splits
    from worker.db import transaction
    from worker.migrate import upgrade_database
    from worker.requests import submit_deletion
    from worker.tables import AuditEvent, DeletionRequest, Job

    settings = _settings(env)
    upgrade_database(settings.database_url)
    ensure_model(settings, LocalModelStore(settings.store_dir), progress=False)
    instance = get_splits(dataset_spec(settings))[0].instance_ids[instance_index]
    with transaction(settings.database_url) as session:
        request_id = submit_deletion(session, settings, instance_id=instance, tasks=["depth"]).request.id

    def record():
        with transaction(settings.database_url) as session:
            job = session.execute(select(Job)).scalar_one_or_none()
            return (job, session.get(DeletionRequest, request_id),
                    [e.payload for e in session.execute(select(AuditEvent).where(
                        AuditEvent.kind == "job.requeued")).scalars()])

    return settings, request_id, record


def test_sigterm_to_the_worker_mid_job_puts_the_job_back_for_the_next_worker(own_service, tmp_path):
    from worker.celery_app import PROCESS_MODEL_TASK, create_celery

    endless = {**own_service, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 100000}})}
    settings, request_id, record = _endless_job(endless, 0)
    celery = create_celery(settings)
    log = tmp_path / "worker-1.log"

    first = _worker(endless, log)
    try:
        celery.send_task(PROCESS_MODEL_TASK, args=[settings.model_name], queue=QUEUE)
        wait_for(lambda: record()[0] is not None and record()[0].progress > 0, 120, 0.5,
                 what="the job to be computing")
        os.killpg(first.pid, signal.SIGTERM)  # every process of the worker, as systemd stops a unit
        first.wait(60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    job, request, requeued = record()
    assert (job.status, job.attempts, request.status) == ("queued", 1, "queued"), log.read_text()[-3000:]
    assert [p["reason"] for p in requeued] == ["the worker stopped before the job finished"]

    # the next worker runs it at once (no sweeper here), with a shorter recipe this time
    log = tmp_path / "worker-2.log"
    second = _worker({**own_service, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 2}})}, log)
    try:
        celery.send_task(PROCESS_MODEL_TASK, args=[settings.model_name], queue=QUEUE)  # the relay's announcement
        wait_for(lambda: record()[1].status in ("completed", "failed"), 120, 0.5, what="the rerun")
    finally:
        stop_process(second)
    job, request, _ = record()
    assert (request.status, request.produced_version, job.status, job.attempts) == ("completed", 2, "completed", 2)
    from worker.audit import verify_chain
    from worker.db import transaction

    with transaction(settings.database_url) as session:
        assert verify_chain(session)["ok"] is True


@pytest.mark.parametrize("pool", [(), ("--pool", "solo")], ids=["prefork", "solo"])
def test_a_warm_shutdown_puts_a_long_job_back_after_the_grace_period(own_service, tmp_path, pool):
    """SIGTERM to the worker's main process alone (docker stop; Ctrl-C is the same warm
    shutdown) lets the job go on for UNLEARND_WORKER_STOP_GRACE_S, then puts it back in the
    queue and the worker exits: before, it waited for the job, and docker's SIGKILL at the end
    of its 10 s left the job 'running' for the sweeper."""
    from worker.celery_app import PROCESS_MODEL_TASK, create_celery

    endless = {**own_service, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 100000}}),
               "UNLEARND_WORKER_STOP_GRACE_S": "2"}
    settings, request_id, record = _endless_job(endless, 1)

    log = tmp_path / "worker.log"
    proc = _worker(endless, log, *pool)
    try:
        create_celery(settings).send_task(PROCESS_MODEL_TASK, args=[settings.model_name], queue=QUEUE)
        wait_for(lambda: record()[0] is not None and record()[0].progress > 0, 120, 0.5,
                 what="the job to be computing")
        proc.send_signal(signal.SIGTERM)  # the main process only, as docker stop signals PID 1
        proc.wait(60)  # the job alone would take hours
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    job, request, requeued = record()
    text = log.read_text()
    assert (job.status, request.status, len(requeued)) == ("queued", "queued", 1), text[-3000:]
    assert "warm shutdown: a job is still running after 2 s" in text


def test_a_pool_process_killed_mid_job_is_taken_over_at_once(own_service, tmp_path):
    """SIGKILL to the pool process that runs the job (the OOM killer): Celery redelivers the
    task (``task_reject_on_worker_lost``), and its claim finds the job's runner gone
    (``worker.runner``) and runs the job again at once. It used to find the job 'running',
    end, and leave it to the sweeper once the heartbeat was ``stale_after_s`` old."""
    from worker.celery_app import PROCESS_MODEL_TASK, create_celery
    from worker.runner import GONE_REASON

    endless = {**own_service, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 100000}}),
               "UNLEARND_STALE_AFTER_S": "600"}  # the heartbeat rule would take 10 minutes
    settings, request_id, record = _endless_job(endless, 2)
    log = tmp_path / "worker.log"
    proc = _worker(endless, log)
    try:
        create_celery(settings).send_task(PROCESS_MODEL_TASK, args=[settings.model_name], queue=QUEUE)
        wait_for(lambda: record()[0] is not None and record()[0].progress > 0, 120, 0.5,
                 what="the job to be computing")
        killed = record()[0].runner["pid"]
        assert killed != proc.pid  # a pool process, not the worker's main process
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: record()[0].attempts == 2, 60, 0.5, what="the job to be claimed again")
        job, request, requeued = record()
        assert (job.status, request.status) == ("running", "running"), log.read_text()[-3000:]
        assert job.runner["pid"] not in (killed, proc.pid)
        assert [p["reason"] for p in requeued] == [GONE_REASON]
        assert proc.poll() is None  # the worker lives on
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    job, request, requeued = record()  # the stop put it back, as ever
    assert (job.status, job.attempts, request.status, len(requeued)) == ("queued", 2, "queued", 2)
