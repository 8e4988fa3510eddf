"""API tests against a real PostgreSQL: one fresh database per test session
(``unlearnd_test_<pid>``), migrated with ``upgrade_database`` and dropped at the
end; every table truncated before each test. No training: a model row, version 1
and the serving alias are written directly (fake sha/uri); accepting requests
needs only the dataset's instance ids and tasks, from the real synthetic loader at
24 + 8 images of 32x32."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from app.main import create_app
from worker.datasets import dataset_spec, get_splits
from worker.db import engine_for, transaction
from worker.migrate import upgrade_database
from worker.settings import Settings, get_settings
from worker.tables import Alias, AliasHistory, Base, Model, ModelVersion, utcnow

PG_SERVER = os.environ.get("UNLEARND_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
MODEL = "test-mtl"


def _admin() -> psycopg.Connection:
    return psycopg.connect(PG_SERVER.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True)


def create_database(name: str) -> str:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_database(name: str) -> None:
    url = f"{PG_SERVER}/{name}"
    engine_for(url).dispose()
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url():
    name = f"unlearnd_test_{os.getpid()}"
    url = create_database(name)
    upgrade_database(url)
    yield url
    drop_database(name)


@pytest.fixture(scope="session")
def settings(database_url, tmp_path_factory) -> Settings:
    return Settings(
        database_url=database_url,
        store_dir=tmp_path_factory.mktemp("models"),
        background=False,
        broker_url=None,
        model_name=MODEL,
        dataset="indoor",
        n_train=24,
        n_test=8,
        image_height=32,
        image_width=32,
        seed=0,
    )


@pytest.fixture(autouse=True)
def _serve_on_a_free_port(monkeypatch):
    """``unlearnd serve`` refuses, before anything else, a port another process listens on:
    a service left running on the default 8000 (the README's quick start) failed every
    test of serve. Each test's UNLEARND_PORT is a port free when it starts (a test may set
    its own)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("UNLEARND_PORT", str(probe.getsockname()[1]))


@pytest.fixture(autouse=True)
def _fresh_engine_cache(monkeypatch):
    """Each test its own engine cache: it is per process and keyed (model, version), which
    every test's fresh record and store reuse (a job could pick up an earlier test's tau or
    original-model evaluation, and its numbers depended on the order tests ran in)."""
    from collections import OrderedDict

    from worker import jobs

    monkeypatch.setattr(jobs, "ENGINE_CACHE", OrderedDict())


@pytest.fixture(autouse=True)
def _clean(request):
    """Empty every table before each test (only when the test uses the database)."""
    if "database_url" not in request.fixturenames:
        yield
        return
    url = request.getfixturevalue("database_url")
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with tamper(url) as conn:  # the audit tables refuse TRUNCATE otherwise
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield


@pytest.fixture
def environment(monkeypatch):
    """``monkeypatch`` for UNLEARND_* variables, with the process's settings (``get_settings()``,
    cached, which the CLI reads) re-read from them during the test and after it."""
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@contextmanager
def tamper(url: str):
    """A PostgreSQL connection that writes the audit log as its owner or a superuser could:
    with the append-only triggers (migration 0007) off for the transaction."""
    with engine_for(url).begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        yield conn


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@dataclass
class Registered:
    name: str
    spec: dict
    tasks: list[str]
    train_ids: list[str]
    test_ids: list[str]


def on_sqlite(settings: Settings, directory) -> Settings:
    """``settings`` over a fresh, migrated SQLite file in ``directory`` (the embedded default)."""
    url = f"sqlite:///{directory / 'unlearnd.db'}"
    upgrade_database(url)
    return settings.model_copy(update={"database_url": url})


def register_model(settings: Settings, name: str = MODEL, erased_cells=()) -> Registered:
    """A model row, version 1 (fake artifact) and the serving alias, written directly."""
    spec = dataset_spec(settings)
    train, test = get_splits(spec)
    with transaction(settings.database_url) as session:
        session.add(Model(name=name, dataset=spec, tasks=list(train.tasks), created_at=utcnow()))
        session.flush()
        session.add(
            ModelVersion(
                model_name=name,
                version=1,
                parent_version=None,
                sha256="0" * 63 + "1",
                artifact_uri=f"file:///fake/{name}/v1",
                deletions=[],
                erased_cells=[list(c) for c in erased_cells],
                metrics={"note": "initial"},
                created_at=utcnow(),
            )
        )
        session.add(Alias(model_name=name, alias="serving", version=1, updated_at=utcnow()))
        session.add(AliasHistory(model_name=name, alias="serving", from_version=None, to_version=1, reason="initial"))
    return Registered(name, spec, list(train.tasks), list(train.instance_ids), list(test.instance_ids))


@pytest.fixture
def model(settings) -> Registered:
    return register_model(settings)


@pytest.fixture
def stored(settings):
    """``stored(name, *versions)``: weights for recorded versions of ``name`` (a small untrained
    net each) written into the settings' store, their rows given its sha256 and place, as a
    rollback checks; the model's folder in the store (shared by the session) goes after the test."""
    import shutil

    from model_store import store_for
    from unlearning.model import ModelConfig, MultiTaskNet

    store, names = store_for(settings.store_dir), set()

    def put(name: str, *versions: int) -> None:
        names.add(name)
        with transaction(settings.database_url) as session:
            for number in versions:
                row = session.execute(select(ModelVersion).where(ModelVersion.model_name == name,
                                                                 ModelVersion.version == number)).scalar_one()
                net = MultiTaskNet(ModelConfig(tasks={"depth": 1, "normal": 3}, width=4, depth=1, head_width=4))
                manifest = store.put_version(net, model_name=name, version=number, parent=row.parent_version,
                                             dataset=session.get(Model, name).dataset, job_id=f"fake-{number}",
                                             erased_cells=row.erased_cells or [])
                row.sha256, row.artifact_uri = manifest.sha256, store.uri(name, number)

    yield put
    for name in names:
        shutil.rmtree(settings.store_dir / name, ignore_errors=True)


def count(settings: Settings, table) -> int:
    with transaction(settings.database_url) as session:
        return session.execute(select(func.count()).select_from(table)).scalar_one()


def counts(settings: Settings) -> dict[str, int]:
    """Rows per table: what 'nothing stored' is checked against."""
    return {t.name: count(settings, t) for t in Base.metadata.sorted_tables}


def assert_problem(response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "instance"} <= set(body)
    if slug:
        assert body["type"].endswith("/" + slug), body["type"]
    return body


def offline_script(url: str, step, revisions: str) -> str:
    """The SQL script alembic's ``step`` (``command.upgrade`` or ``command.downgrade``) writes
    for ``revisions`` with ``--sql``: nothing runs against ``url``'s database."""
    import io

    from worker.migrate import alembic_config

    cfg = alembic_config(url)
    cfg.output_buffer = io.StringIO()
    step(cfg, revisions, sql=True)
    return cfg.output_buffer.getvalue()


def downgrade_record(url: str, revision: str) -> None:
    """``alembic -x allow_record_loss=1 downgrade <revision>`` on ``url``: the tests that go
    down and up again do it on a record that holds events on purpose (migrations/guard.py)."""
    from alembic import command

    from migrations.guard import FLAG
    from worker.migrate import alembic_config

    cfg = alembic_config(url)
    cfg.attributes[FLAG] = True
    command.downgrade(cfg, revision)


@contextmanager
def both_records(tmp_path, label: str):
    """The URLs of two empty records, a PostgreSQL database of the test's own (dropped after)
    and a SQLite file: what a migration test runs on each."""
    import uuid

    name = f"unlearnd_test_{label}_{uuid.uuid4().hex[:8]}"
    try:
        yield [create_database(name), f"sqlite:///{tmp_path / 'record.db'}"]
    finally:
        drop_database(name)
