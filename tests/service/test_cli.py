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



@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_a_database_that_does_not_exist_is_one_line_naming_it_and_createdb(monkeypatch, capsys, command):
    """`unlearnd serve` against a database not created yet (the README's by-hand steps
    skipped one): a line naming it and how to create it, not a psycopg traceback."""
    from tests.service.conftest import PG_SERVER

    monkeypatch.setenv("UNLEARND_DATABASE_URL", PG_SERVER.replace("postgres@", "postgres:pw-s3cret@", 1)
                       + "/unlearnd_never_created")
    get_settings.cache_clear()
    try:
        assert main([command]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pw-s3cret" not in err
    [line] = [line for line in err.splitlines() if line.startswith("unlearnd:")]
    assert "cannot connect to the database" in line and "unlearnd_never_created" in line
    assert "does not exist" in line and "createdb" in line


def test_a_database_server_that_is_down_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("UNLEARND_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/unlearnd")
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "unlearnd: cannot connect to the database postgresql+psycopg://postgres@127.0.0.1:1/unlearnd" in err
    assert "createdb" not in err


@pytest.mark.parametrize("command", ["train", "unlearn", "bench"])
def test_delegated_commands_name_themselves_as_called(command, capsys):
    """`unlearnd train --help` shows `usage: unlearnd train`, not the module's own name
    (which `python -m unlearning.train --help` still shows)."""
    from importlib import import_module

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: unlearnd {command} ")
    with pytest.raises(SystemExit):
        import_module(f"unlearning.{command}").main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m unlearning.{command} ")
