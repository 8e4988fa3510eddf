"""The ``unlearnd`` command's own arguments (no database): what it hands on to Celery."""
from __future__ import annotations

import pytest

from app.cli import main
from worker.settings import get_settings


@pytest.fixture
def celery_argv(monkeypatch):
    """The argv ``unlearnd worker`` gives Celery, captured instead of starting a worker."""
    from worker.celery_app import app

    seen: list[list[str]] = []
    monkeypatch.setenv("UNLEARND_BROKER_URL", "redis://127.0.0.1:6379/11")
    get_settings.cache_clear()
    monkeypatch.setattr(app, "worker_main", lambda argv: seen.append(list(argv)))
    yield seen
    get_settings.cache_clear()


@pytest.mark.parametrize("extra, passed", [
    (["--", "--pool", "solo"], ["--pool", "solo"]),  # as `unlearnd worker --help` says: after --
    ([], []),
])
def test_worker_hands_the_arguments_after_the_double_dash_to_celery(celery_argv, extra, passed):
    assert main(["worker", "--concurrency", "2", *extra]) == 0
    [argv] = celery_argv
    assert argv == ["worker", "--loglevel", "info", "--prefetch-multiplier", "1", "--concurrency", "2", *passed]

