"""End-to-end fixtures: a real PostgreSQL database, a real Redis db, a real Celery
worker process, a tiny model.

Each run creates its own database ``unlearnd_e2e_<pid>`` and uses Redis db 14;
both are removed at the end. Without PostgreSQL or Redis the tests are skipped
locally and fail under CI (``CI`` set), where ``.ci/run`` starts both.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("UNLEARND_E2E_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("UNLEARND_E2E_REDIS", "redis://127.0.0.1:6379/14")

# A model small enough that training and one unlearning job take seconds on two CPU cores.
TINY = {
    "UNLEARND_MODEL_NAME": "e2e-indoor",
    "UNLEARND_DATASET": "indoor",
    "UNLEARND_N_TRAIN": "24",
    "UNLEARND_N_TEST": "8",
    "UNLEARND_IMAGE_HEIGHT": "32",
    "UNLEARND_IMAGE_WIDTH": "32",
    "UNLEARND_TRAIN_EPOCHS": "4",
    "UNLEARND_MODEL_WIDTH": "8",
    "UNLEARND_METHOD_CONFIG": '{"steps": 5, "settle_steps": 2, "subspace_samples": 8, "shadow_folds": 2}',
    "UNLEARND_CALIBRATE_SHADOWS": "true",  # the first job trains 8 tiny shadow models, later jobs reuse them
    "UNLEARND_DEVICE": "cpu",
    "UNLEARND_TORCH_THREADS": "1",  # worker, serve and pytest share two cores
    "UNLEARND_RELAY_INTERVAL_S": "0.2",
}


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; that value, or an AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this run (SQLAlchemy URL), dropped at the end."""
    import psycopg

    name = f"unlearnd_e2e_{os.getpid()}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        _unavailable(f"PostgreSQL not reachable at {PG_ADMIN}: {exc}")
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    from worker.db import engine_for

    engine_for(f"{base}/{name}").dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        _unavailable(f"Redis not reachable at {REDIS_URL}: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def service_env(pg_url, redis_url, tmp_path_factory) -> dict[str, str]:
    """The UNLEARND_* environment of the service under test (API, worker, sweeper)."""
    store = tmp_path_factory.mktemp("store")
    return {
        **TINY,
        "UNLEARND_DATABASE_URL": pg_url,
        "UNLEARND_BROKER_URL": redis_url,
        "UNLEARND_STORE_DIR": str(store),
        "UNLEARND_STALE_AFTER_S": "600",
    }


@pytest.fixture(scope="session")
def settings(service_env):
    from worker.settings import Settings

    values = {k[len("UNLEARND_"):].lower(): v for k, v in service_env.items()}
    values["method_config"] = json.loads(values["method_config"])  # the environment's JSON, parsed
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def store(settings):
    from model_store import LocalModelStore

    return LocalModelStore(settings.store_dir)


@pytest.fixture(scope="session")
def bootstrapped(settings, store):
    """Migrated database and a registered first version of the tiny model."""
    from worker.bootstrap import ensure_model
    from worker.migrate import upgrade_database

    upgrade_database(settings.database_url)
    assert ensure_model(settings, store, progress=False) == 1
    return settings


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def celery_worker(bootstrapped, service_env, tmp_path_factory):
    """A real Celery worker process on the test database and Redis db; its log is at ``.log``."""
    log = tmp_path_factory.mktemp("worker") / "celery.log"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "-c", "1",
           "--loglevel", "info", "-n", f"e2e-{os.getpid()}@%h", "--without-gossip", "--without-mingle"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(service_env), stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    proc.nodename = f"e2e-{os.getpid()}@{socket.gethostname()}"  # what -n's %h expands to
    try:
        wait_for(lambda: proc.poll() is not None or b"ready." in log.read_bytes(), 90, what="the Celery worker")
        if proc.poll() is not None:
            raise AssertionError(f"celery worker exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        yield proc
    finally:
        stop_process(proc)
        sys.stderr.write(f"\n--- celery worker log (tail) ---\n{log.read_text()[-3000:]}\n")


@pytest.fixture(scope="session")
def client(celery_worker, settings):
    """The API in this process, its lifespan running the outbox relay (to Celery) and the sweeper."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


WORKER_QUEUE = "celery"  # the default queue: every task of the service goes there


@pytest.fixture
def paused_worker(celery_worker, settings):
    """The session's Celery worker, told to consume nothing and found holding nothing: no task
    running, none reserved, none scheduled (a retry's countdown). Until ``resume()`` (or the
    test's end) it takes no delivery, so work this process claims cannot race with it; what
    is announced meanwhile waits in Redis. ``resume()`` returns it to the queue."""
    from worker.celery_app import create_celery

    app = create_celery(settings)
    node = celery_worker.nodename

    def control(command):
        # the solo pool answers between tasks only: ask again until it does (a repeat is harmless)
        def answered():
            replies = getattr(app.control, command)(WORKER_QUEUE, destination=[node], reply=True, timeout=1)
            return any(node in r for r in replies or [])
        wait_for(answered, 300, 0, what=f"the worker to {command}")

    def holding_nothing():
        inspect = app.control.inspect(destination=[node], timeout=1)
        # in the order a task moves (scheduled -> reserved -> active): one that moves on
        # between two questions is seen by the later one
        for question in (inspect.scheduled, inspect.reserved, inspect.active):
            reply = question()
            if reply is None or reply.get(node) != []:
                return False
        return True

    paused = [True]

    def resume():
        if paused[0]:
            control("add_consumer")
            paused[0] = False

    control("cancel_consumer")
    wait_for(holding_nothing, 300, 0.25, what="the worker to finish what it held")
    try:
        yield resume
    finally:
        resume()
