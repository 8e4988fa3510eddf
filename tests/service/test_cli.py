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
    monkeypatch.setattr("app.cli.run_celery", lambda celery_app, argv: seen.append(list(argv)) or 0)
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
    from .conftest import PG_SERVER

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


def _run(environment, argv, **env) -> tuple[int, str]:
    """``main(argv)`` with ``env`` (UNLEARND_* names without the prefix): its exit status
    (argparse's too) and what it wrote to stderr."""
    import sys

    for name, value in env.items():
        environment.setenv(f"UNLEARND_{name}", value)
    get_settings.cache_clear()
    err = __import__("io").StringIO()
    environment.setattr(sys, "stderr", err)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        get_settings.cache_clear()
    return code, err.getvalue()


@pytest.mark.parametrize("argv, says", [
    (["purge", "--model", ""], "not a model name: ''"),  # an empty $MODEL in a cron line purged the default model
    (["serve", "--port", "0"], "a port is between 1 and 65535, got 0"),  # served on 8000
    (["serve", "--port", "70000"], "a port is between 1 and 65535, got 70000"),  # a traceback after training
    (["serve", "--host", ""], "the bind address is empty"),
    (["worker", "--concurrency", "-1"], "at least 1, got -1"),
    (["worker", "--loglevel", "bogus"], "invalid choice: 'bogus'"),
])
def test_bad_arguments_are_refused_before_anything_runs(environment, argv, says, tmp_path):
    code, err = _run(environment, argv, DATABASE_URL=f"sqlite:///{tmp_path}/never.db")
    assert code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "never.db").exists()


def test_a_celery_option_celery_refuses_is_one_line(celery_argv, environment, monkeypatch):
    import click

    from worker.celery_app import app

    def refuse(celery_app, argv):
        raise click.NoSuchOption("--bogus")

    monkeypatch.setattr("app.cli.run_celery", refuse)
    code, err = _run(environment, ["worker", "--", "--bogus"])
    assert code == 2 and err.strip() == "unlearnd worker: No such option '--bogus'."


def test_a_worker_that_stops_on_an_unrecoverable_error_exits_with_its_status(tmp_path):
    # Celery's app.worker_main dropped the status: a worker that stopped on an unrecoverable
    # error exited 0, and a supervisor restarting on failure saw a clean stop. A real worker
    # process here, whose result backend cannot be loaded (a backend Celery knows, whose library,
    # pymongo, is not installed): it stops at once with EX_FAILURE
    import importlib.util
    import os
    import subprocess
    import sys

    assert importlib.util.find_spec("pymongo") is None, "this test needs a backend whose library is missing"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    env.update(UNLEARND_BROKER_URL="redis://127.0.0.1:6379/11", UNLEARND_RESULT_BACKEND="mongodb://127.0.0.1:1/x",
               UNLEARND_DATABASE_URL=f"sqlite:///{tmp_path}/x.db", UNLEARND_STORE_DIR=str(tmp_path / "models"))
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--", "-Q", f"unlearnd-never-{os.getpid()}",
                           "-n", f"exit-status-{os.getpid()}@%h"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Unrecoverable error" in done.stderr


@pytest.mark.parametrize("env, says", [
    ({"BROKER_URL": "http://127.0.0.1:6379"}, "broker_url (UNLEARND_BROKER_URL): http is not a broker the service "
                                              "runs on; use redis://HOST:PORT/DB"),
    ({"BROKER_URL": "redis://u:pw-s3cret@127.0.0.1:abc/0"}, "broker_url (UNLEARND_BROKER_URL): not a broker URL"),
    ({"BROKER_URL": "redis://127.0.0.1:6379/abc"}, "the broker URL's database 'abc' is not a number"),
    ({"RESULT_BACKEND": "no-such-backend://u:pw-s3cret@x"}, "result_backend (UNLEARND_RESULT_BACKEND): "
                                                            "no-such-backend:// is not a result backend Celery knows"),
    ({"RESULT_BACKEND": "u:pw-s3cret@127.0.0.1"}, "the value is not a result backend Celery knows"),
    ({"RESULT_BACKEND": "redis://u:pw-s3cret@127.0.0.1:abc/0"}, "result_backend (UNLEARND_RESULT_BACKEND): not a "
                                                                "result backend URL"),
    ({"RESULT_BACKEND": "redis://127.0.0.1:6379/abc"}, "the result backend's Redis database 'abc' is not a number"),
    ({"DATABASE_URL": "notaurl"}, "database_url (UNLEARND_DATABASE_URL): not a database URL"),
    ({"DATABASE_URL": "postgresql+psycopg://u:pw-s3cret@127.0.0.1:notaport/x"}, "not a database URL"),
    ({"DATABASE_URL": "postgres://u:pw-s3cret@h/x"}, "not a database URL"),
    ({"DATABASE_URL": "postgresql+psycopg2://u:pw-s3cret@h/x"}, "postgresql+psycopg2 is not a database the service"),
    ({"DATABASE_URL": "sqlite:////etc/hostname/x.db"}, "/etc/hostname, which is a file"),
    ({"METHOD_CONFIG": "{bad"}, 'error parsing value for field "method_config"'),
    ({"DEVICE": "tpu"}, "device (UNLEARND_DEVICE): must be auto, cpu, cuda or cuda:N (N a GPU's index)"),
    ({"SEED": "-1"}, "seed (UNLEARND_SEED): Input should be greater than or equal to 0"),
    ({"MODEL_NAME": "../x"}, "model_name (UNLEARND_MODEL_NAME): must be a model name: 1 to 100 letters"),
    ({"API_KEYS": '{"a b": {"token_sha256": "%s", "scopes": ["read"]}}' % ("0" * 64)},
     "api_keys.a b.[key] (UNLEARND_API_KEYS): must be a key name: 1 to 64 letters"),
])
@pytest.mark.parametrize("command", ["migrate", "serve", "calibrate", "purge"])
def test_settings_the_service_cannot_run_on_are_one_line_without_their_value(environment, env, says, command):
    code, err = _run(environment, [command], **env)
    assert code == 2 and says in err and "Traceback" not in err and "pw-s3cret" not in err
    assert len(err.strip().splitlines()) == 1


def test_serve_without_background_work_or_a_broker_is_refused(environment, tmp_path):
    # requests would be accepted (202) and stay queued for ever: nothing runs jobs
    code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                     BACKGROUND="false")
    assert code == 2 and "nothing would run jobs" in err and not (tmp_path / "x.db").exists()


def test_serve_refuses_a_first_model_that_cannot_take_one_image_naming_the_settings(environment, tmp_path):
    # it was a traceback (exit 1) from the training's new check; the model it trained before failed
    # on every single image (GroupNorm)
    code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                     STORE_DIR=str(tmp_path / "models"), MODEL_WIDTH="8", IMAGE_HEIGHT="4", IMAGE_WIDTH="4")
    assert code == 2 and "Traceback" not in err
    assert "UNLEARND_IMAGE_HEIGHT, UNLEARND_IMAGE_WIDTH, UNLEARND_MODEL_WIDTH: 4x4 images shrink to 1x1" in err
    assert "nothing was trained" in err and not (tmp_path / "models" / "indoor-mtl").exists()


def test_a_store_folder_that_is_a_file_is_refused_before_migrating_or_training(environment, tmp_path):
    (tmp_path / "afile").write_text("")
    code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                     STORE_DIR=str(tmp_path / "afile"))
    assert code == 2 and f"UNLEARND_STORE_DIR {tmp_path / 'afile'} is not a folder" in err
    assert not (tmp_path / "x.db").exists()


def test_a_file_that_is_not_a_database_and_an_unknown_revision_are_one_line(environment, tmp_path):
    import sqlite3

    (tmp_path / "notes.db").write_text("not a database, but notes")
    code, err = _run(environment, ["migrate"], DATABASE_URL=f"sqlite:///{tmp_path}/notes.db")
    assert code == 2 and "file is not a database (UNLEARND_DATABASE_URL names a file that is not a SQLite" in err
    assert (tmp_path / "notes.db").read_text() == "not a database, but notes"
    url = f"sqlite:///{tmp_path}/newer.db"
    assert _run(environment, ["migrate"], DATABASE_URL=url)[0] == 0
    with sqlite3.connect(tmp_path / "newer.db") as conn:  # as a newer release would leave it
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    code, err = _run(environment, ["migrate"], DATABASE_URL=url)
    assert code == 2 and "Can't locate revision identified by '0099' (was it migrated by a newer release" in err
    assert "Traceback" not in err
    code, err = _run(environment, ["purge"], DATABASE_URL=url)  # it said "run `unlearnd migrate` first"
    assert code == 2 and "at revision 0099" in err and "a revision this code does not know" in err


def test_a_missing_role_is_not_told_to_createdb(environment):
    from .conftest import PG_SERVER

    code, err = _run(environment, ["migrate"], DATABASE_URL=PG_SERVER.replace("postgres@", "nobody_here@", 1)
                     + "/postgres")
    assert code == 2 and 'role "nobody_here" does not exist' in err and "createdb" not in err


def test_ctrl_c_is_one_line_and_status_130(environment, monkeypatch, tmp_path):
    import worker.migrate

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker.migrate, "upgrade_database", interrupted)
    code, err = _run(environment, ["migrate"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    assert code == 130 and err.strip() == "unlearnd: interrupted"


@pytest.mark.parametrize("text, says", [('{"certificate_sha256": NaN}', "NaN is not JSON"),
                                        ('{"uis": 1e999}', "1e999 is out of range"),  # a traceback, exit 1
                                        # a reader keeping the first of two names saw another certificate
                                        ('{"model": "forged", "model": "m"}', "the name 'model' is given twice"),
                                        ("[" * 100000 + "]" * 100000, "nested too deep")])
def test_verify_certificate_refuses_what_is_not_strict_json(environment, tmp_path, text, says):
    (tmp_path / "c.json").write_text(text)
    code, err = _run(environment, ["verify-certificate", str(tmp_path / "c.json"), "--public-key", "x"])
    assert code == 2 and says in err and "Traceback" not in err


def test_a_variable_that_names_no_setting_is_warned_about_at_start(celery_argv, monkeypatch, caplog, tmp_path):
    # the settings ignore unknown UNLEARND_ variables: UNLEARND_API_KEY (for _KEYS) served the
    # API without keys, and nothing said so
    from worker.settings import unknown_variables

    monkeypatch.setenv("UNLEARND_API_KEY", "{}")
    monkeypatch.setenv("UNLEARND_E2E_PG", "postgresql://x")  # the test suite's own: not a typo
    with caplog.at_level("WARNING", logger="unlearnd"):
        assert main(["worker"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "unlearnd"]
    assert warnings == ["UNLEARND_API_KEY is not a setting and is ignored; did you mean UNLEARND_API_KEYS?"]

    env_file = tmp_path / ".env"
    env_file.write_text("UNLEARND_DATABASE_URI=sqlite:///x.db\nunlearnd_store_dir=var/m\nOTHER=1\n")
    assert unknown_variables({"UNLEARND_BOGUS": "1", "UNLEARND_PORT": "1"}, env_file) == [
        "UNLEARND_BOGUS is not a setting and is ignored",
        "UNLEARND_DATABASE_URI is not a setting and is ignored; did you mean UNLEARND_DATABASE_URL?",
    ]
