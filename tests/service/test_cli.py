"""The ``unlearnd`` command's own arguments (no database): what it hands on to Celery."""
from __future__ import annotations

import os

import pytest
import torch

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


def test_no_command_is_a_usage_error(capsys):
    """`unlearnd` alone prints its usage on stderr and exits 2 (it exited 0: a script that ran
    `unlearnd $COMMAND` with an empty variable carried on as if something had run)."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: unlearnd ") and "serve" in captured.err
    assert captured.out == ""


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """serve and calibrate draw their bars only when stderr is a terminal: in a container's log
    every redraw of a bar stayed on one ever-longer line."""
    import argparse
    import io
    import sys

    from app.cli import _bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stderr, no_progress, drawn in [(Terminal(), False, True), (Terminal(), True, False),
                                       (io.StringIO(), False, False), (io.StringIO(), True, False)]:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert _bars(argparse.Namespace(no_progress=no_progress)) is drawn


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
    ({"METHOD_CONFIG": "{bad"}, "method_config (UNLEARND_METHOD_CONFIG): UNLEARND_METHOD_CONFIG must be a JSON "
                                "object of the method's parameters (Expecting property name"),
    # json.loads kept the last of the two: steps 5
    ({"METHOD_CONFIG": '{"steps":0,"steps":5}'}, "the name 'steps' is given twice in one object"),
    # uvicorn listened on every interface (0.0.0.0 and ::), while `--host ""` was refused
    ({"HOST": ""}, "host (UNLEARND_HOST): the bind address is empty"),
    # each connection got an empty database of its own: "no such table: models", a traceback
    ({"DATABASE_URL": "sqlite://"}, "database_url (UNLEARND_DATABASE_URL): an in-memory SQLite database"),
    ({"DATABASE_URL": "sqlite:///:memory:"}, "use sqlite:///PATH, a file"),
    ({"DEVICE": "tpu"}, "device (UNLEARND_DEVICE): must be auto, cpu, cuda or cuda:N (N a GPU's index)"),
    ({"SEED": "-1"}, "seed (UNLEARND_SEED): Input should be greater than or equal to 0"),
    ({"MODEL_NAME": "../x"}, "model_name (UNLEARND_MODEL_NAME): must be a model name: 1 to 100 letters"),
    ({"API_KEYS": '{"a b": {"token_sha256": "%s", "scopes": ["read"]}}' % ("0" * 64)},
     "api_keys.a b.[key] (UNLEARND_API_KEYS): must be a key name: 1 to 64 letters"),
])
@pytest.mark.parametrize("command", ["migrate", "serve", "calibrate", "purge"])
def test_settings_the_service_cannot_run_on_are_one_line_without_their_value(environment, env, says, command,
                                                                            tmp_path):
    def went_on(*args, **kwargs):  # a regression fails here, instead of migrating, calibrating or serving
        pytest.fail(f"`unlearnd {command}` went on with settings it must refuse")

    environment.setattr("worker.migrate.upgrade_database", went_on)
    environment.setattr("worker.calibration.lineage_calibration", went_on)
    environment.setattr("uvicorn.run", went_on)
    # a refusal that regressed wrote nothing into the working directory (var/ by default)
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "STORE_DIR": str(tmp_path / "models"), **env}
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
    # refused before the migration's lock file is made (notes.db.migrate-lock was left behind)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["notes.db"]
    (tmp_path / "short.db").write_bytes(b"SQLite format 3")  # one byte short of the header
    code, err = _run(environment, ["migrate"], DATABASE_URL=f"sqlite:///{tmp_path}/short.db")
    assert code == 2 and "file is not a database" in err and "Traceback" not in err
    assert not (tmp_path / "short.db.migrate-lock").exists()
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


@pytest.mark.parametrize("key, says", [("QUJD", "it decodes to 3 byte(s), and a raw Ed25519 public key is 32"),
                                       ("", "it is empty"), ("  ", "it is empty"),
                                       ("not base64!", "it is not base64")])
def test_verify_certificate_refuses_a_key_that_is_not_one_with_2_not_1(environment, tmp_path, capsys, key, says):
    """Exit 1 says the certificate does not verify; a malformed key said so too ("NOT verified:
    malformed key"), as if the certificate were forged."""
    import json

    from worker.signing import generate_key_file

    signer = generate_key_file(tmp_path / "k.pem")
    certificate = signer.sign({"request_id": "r", "certificate_sha256": "0" * 64})
    (tmp_path / "c.json").write_text(json.dumps(certificate))
    code, err = _run(environment, ["verify-certificate", str(tmp_path / "c.json"), "--public-key", key])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"unlearnd: --public-key is not an Ed25519 public key: {says}")
    assert "NOT verified" not in capsys.readouterr().out
    # a well-formed key of another signer: the certificate does not verify against it (1)
    other = generate_key_file(tmp_path / "other.pem").public_key_info()["public_key"]
    code, _ = _run(environment, ["verify-certificate", str(tmp_path / "c.json"), "--public-key", other])
    assert code == 1 and "NOT verified: signed with key" in capsys.readouterr().out


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


def _one_line(code, err, says):
    """Exit status 2 and one line on stderr that says ``says``, no traceback."""
    assert code == 2 and "Traceback" not in err, err
    [line] = err.strip().splitlines()
    assert line.startswith("unlearnd") and says in line, line
    return line


@pytest.mark.parametrize("argv, env, says", [
    (["serve"], {"HOST": "no-such-host.invalid"},
     "UNLEARND_HOST 'no-such-host.invalid' cannot be listened on: "),
    (["serve", "--host", "no-such-host.invalid"], {}, "--host 'no-such-host.invalid' cannot be listened on: "),
    (["serve"], {"HOST": "a" * 64 + ".example"}, "cannot be listened on"),  # idna: a label over 63 characters
])
def test_a_host_that_does_not_resolve_is_refused_before_migrating(environment, tmp_path, argv, env, says):
    # uvicorn found it after the migration and the first start's training, and exited 3
    def went_on(*args, **kwargs):
        pytest.fail("`unlearnd serve` went on with a host it cannot listen on")

    environment.setattr("worker.migrate.upgrade_database", went_on)
    code, err = _run(environment, argv + ["--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                     STORE_DIR=str(tmp_path / "models"), **env)
    _one_line(code, err, says)
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("host, says", [
    ("127.0.0.1", "UNLEARND_HOST '127.0.0.1': cannot listen on 127.0.0.1:{port}: Address already in use; "
                  "another process listens there"),
    ("192.0.2.1", "UNLEARND_HOST '192.0.2.1': cannot listen on 192.0.2.1:{port}: "),  # TEST-NET-1: not this machine's
])
def test_a_port_in_use_or_an_address_elsewhere_is_refused_before_migrating(environment, tmp_path, host, says):
    # both resolved, and uvicorn found them after the migration and the first start's training (exit 3)
    import socket

    def went_on(*args, **kwargs):
        pytest.fail("`unlearnd serve` went on with an address it cannot listen on")

    environment.setattr("worker.migrate.upgrade_database", went_on)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                         STORE_DIR=str(tmp_path / "models"), HOST=host, PORT=str(port))
    _one_line(code, err, says.format(port=port))
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "models").exists()


def test_an_address_family_this_host_lacks_is_skipped_as_asyncio_skips_it(monkeypatch):
    """IPv6 off, and 'localhost' still resolves to ::1 too: uvicorn listens on 127.0.0.1, and
    the check refused it (EAFNOSUPPORT creating the socket)."""
    import errno
    import socket

    from app.cli import _host_ok

    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))])
    monkeypatch.setattr(socket, "socket", no_ipv6)
    assert _host_ok("localhost", 0, "--host")


def test_the_listen_check_lets_the_address_go(tmp_path):
    # what it binds it closes: the port is free for uvicorn after it
    import socket

    from app.cli import _host_ok

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert _host_ok("127.0.0.1", port, "--host")
    with socket.socket() as again:  # without SO_REUSEADDR: a socket the check left bound would refuse it
        again.bind(("127.0.0.1", port))
        again.listen()
        assert again.getsockname()[1] == port


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_cuda_device_this_machine_lacks_is_refused_at_start(environment, monkeypatch, tmp_path, command, device):
    # serve migrated, rendered the first model's data, then failed with a RuntimeError traceback; a
    # worker failed every job
    import torch

    def started(*args, **kwargs):
        pytest.fail(f"`unlearnd {command}` went on with a device this machine does not have")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # serve asks in this process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker asks in a spawned one: no GPU there either
    monkeypatch.setattr("app.cli.run_celery", started)
    monkeypatch.setattr("worker.migrate.upgrade_database", started)
    code, err = _run(environment, [command], DATABASE_URL=f"sqlite:///{tmp_path}/x.db", DEVICE=device,
                     STORE_DIR=str(tmp_path / "models"), BROKER_URL="redis://127.0.0.1:6379/11")
    _one_line(code, err, f"UNLEARND_DEVICE: device {device!r} requested but CUDA is not available")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda"])
def test_the_worker_never_asks_torch_about_cuda_before_its_pool_forks(environment, monkeypatch, tmp_path,
                                                                     celery_argv, device):
    """Asking whether CUDA is there initialises it in the asking process; the prefork pool's
    children, forked after, then failed their first CUDA use ("Cannot re-initialize CUDA in
    forked subprocess"): every job. ``cuda`` is checked in a spawned process."""
    import torch

    def asked(*args, **kwargs):
        pytest.fail("the worker's main process asked torch about CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", asked)
    monkeypatch.setattr(torch.cuda, "device_count", asked)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, err = _run(environment, ["worker"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db", DEVICE=device,
                     STORE_DIR=str(tmp_path / "models"))
    if device == "cuda":  # refused by the spawned check, on a machine (or with CUDA_VISIBLE_DEVICES) without one
        _one_line(code, err, "UNLEARND_DEVICE: device 'cuda' requested but CUDA is not available")
        assert celery_argv == []
    else:
        assert code == 0 and len(celery_argv) == 1, err


def test_serve_resolves_the_device_only_where_it_trains_or_runs_jobs(tmp_path, monkeypatch):
    """An API beside workers (no background jobs, a stored version 1) neither trains nor
    unlearns: UNLEARND_DEVICE, shared with the workers in docker-compose.yml, is theirs."""
    import torch
    from model_store import LocalModelStore
    from worker.settings import Settings

    from app.cli import _serving_device

    class Stored(LocalModelStore):
        def exists(self, name, version):
            return True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    api = Settings(_env_file=None, background=False, broker_url="redis://127.0.0.1:6379/11", device="cuda")
    assert _serving_device(api, Stored(tmp_path)) is None
    assert _serving_device(api, LocalModelStore(tmp_path)) is False  # it trains the first version
    assert _serving_device(api.model_copy(update={"background": True}), Stored(tmp_path)) is False  # runs jobs
    assert _serving_device(api.model_copy(update={"device": "cpu", "background": True}),
                           Stored(tmp_path)) == torch.device("cpu")


def test_a_first_model_on_a_gpu_counts_the_training_state_against_the_gpu(monkeypatch):
    """The bound of `unlearnd train`: on a GPU the host holds the weights alone; unknown
    (``auto`` not resolved) counted so, without the GPU's check."""
    import torch
    import unlearning.resources as resources
    from worker.bootstrap import first_model_memory_problem
    from worker.settings import Settings

    wide = Settings(_env_file=None, model_width=1024)  # 4.1e8 parameters: 1.6 GiB of weights, 6.5 GiB to train
    monkeypatch.setattr(resources, "machine_memory", lambda: 4 << 30)
    monkeypatch.setattr(resources, "device_memory", lambda device: 80 << 30)
    assert "more than the 4.0 GiB this machine has" in first_model_memory_problem(wide, torch.device("cpu"))
    assert first_model_memory_problem(wide, torch.device("cuda")) is None
    assert first_model_memory_problem(wide) is None
    monkeypatch.setattr(resources, "device_memory", lambda device: 4 << 30)
    assert "more than the 4.0 GiB cuda has" in first_model_memory_problem(wide, torch.device("cuda"))


@pytest.mark.parametrize("env, names", [
    ({"IMAGE_HEIGHT": "100000", "IMAGE_WIDTH": "100000"}, "the 176 rendered scenes of 100000x100000 pixels"),
    ({"N_TRAIN": "1000000000000"}, "rendered scenes of 48x64 pixels"),
    ({"MODEL_WIDTH": "1000000"}, "the model's weights, gradients and AdamW moments"),
])
def test_a_first_model_that_cannot_fit_in_memory_is_refused_before_migrating(environment, monkeypatch, tmp_path,
                                                                              env, names):
    # the checks `unlearnd train` makes: serve migrated, then failed in torch's allocation (a
    # traceback) or was killed for memory
    import worker.migrate

    def started(*args, **kwargs):
        pytest.fail("`unlearnd serve` migrated the database for a first model it cannot train")

    monkeypatch.setattr(worker.migrate, "upgrade_database", started)
    code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                     STORE_DIR=str(tmp_path / "models"), **env)
    line = _one_line(code, err, "unlearnd: training the first version of 'indoor-mtl' needs at least ")
    assert names in line and "more than the" in line and "nothing was migrated or trained" in line
    assert all(f"UNLEARND_{name}" in line for name in ("IMAGE_HEIGHT", "IMAGE_WIDTH", "N_TRAIN", "MODEL_WIDTH"))
    assert "--" not in line  # the settings, not `unlearnd train`'s options
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "models").exists()


def test_a_first_training_that_diverges_is_refused_and_nothing_is_stored_or_registered(environment, monkeypatch,
                                                                                       tmp_path):
    """A first version with non-finite weights was stored and registered as serving: every
    job on it then failed, since its weights are refused on load."""
    import uvicorn
    from sqlalchemy import create_engine, text

    import unlearning.train

    def diverges(dataset, cfg, **kwargs):
        model = unlearning.train.build_model(dataset, cfg)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return model.eval()

    monkeypatch.setattr(unlearning.train, "train_model", diverges)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a diverged first version"))
    import socket

    with socket.socket() as sock:  # a free port: the listen check comes before the training
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    code, err = _run(environment, ["serve", "--no-progress", "--port", port],
                     DATABASE_URL=f"sqlite:///{tmp_path}/x.db", STORE_DIR=str(tmp_path / "models"), N_TRAIN="4", N_TEST="2", IMAGE_HEIGHT="16",
                     IMAGE_WIDTH="16", MODEL_WIDTH="4")
    line = _one_line(code, err, "unlearnd: training the first version of 'indoor-mtl' on ")
    assert "training diverged: non-finite weights (NaN or infinity) in 1 of " in line
    assert "nothing was stored or registered" in line
    assert not (tmp_path / "models" / "indoor-mtl" / "v1").exists()
    with create_engine(f"sqlite:///{tmp_path}/x.db").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM models")).scalar() == 0


def test_a_first_version_in_the_store_is_not_checked_against_the_memory(monkeypatch):
    # a stored version 1 is registered, not trained: the sizes the settings give are not built
    from model_store import LocalModelStore
    from worker.bootstrap import first_model_memory_problem
    from worker.settings import Settings

    huge = Settings(_env_file=None, image_height=100000, image_width=100000)
    assert "needs at least" in first_model_memory_problem(huge)
    assert first_model_memory_problem(Settings(_env_file=None)) is None

    class Stored(LocalModelStore):
        def exists(self, name, version):
            return True

    from app.cli import _first_model_fits

    assert _first_model_fits(huge, Stored("/nonexistent")) is True


def test_a_sqlite_file_that_cannot_be_created_is_refused_before_migrating(environment, tmp_path):
    # FileNotFoundError (a traceback) from the migration's lock file, <file>.migrate-lock
    for command in ("migrate", "serve"):
        code, err = _run(environment, [command, *(["--no-progress"] if command == "serve" else [])],
                         DATABASE_URL="sqlite:////proc/unlearnd-never.db", STORE_DIR=str(tmp_path / "models"))
        _one_line(code, err, "UNLEARND_DATABASE_URL's SQLite file /proc/unlearnd-never.db cannot be created")
        # a name the file system takes, whose lock file's name it does not
        name = "d" * 250 + ".db"
        code, err = _run(environment, [command], DATABASE_URL=f"sqlite:///{tmp_path / name}",
                         STORE_DIR=str(tmp_path / "models"))
        line = _one_line(code, err, f"UNLEARND_DATABASE_URL's SQLite file {tmp_path / name} cannot be created")
        assert f"{name}.migrate-lock" in line and "give a shorter name" in line
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_store_dir_whose_name_is_too_long_is_one_line(celery_argv, environment, tmp_path, command):
    # OSError ENAMETOOLONG from folder.exists(), a traceback
    store = tmp_path / ("m" * 300)
    code, err = _run(environment, [command], DATABASE_URL=f"sqlite:///{tmp_path}/x.db", STORE_DIR=str(store))
    _one_line(code, err, f"UNLEARND_STORE_DIR {store} cannot be created: the name")
    assert celery_argv == [] and list(tmp_path.iterdir()) == []


def test_serve_without_background_work_warns_that_a_worker_and_beat_must_run(environment, tmp_path, caplog):
    # with UNLEARND_BACKGROUND=false the relay runs only as a beat task, which `unlearnd worker`
    # does not start: without a beat process, requests stayed queued for ever and nothing said so
    (tmp_path / "afile").write_text("")
    with caplog.at_level("WARNING", logger="unlearnd"):
        code, _ = _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
                       BACKGROUND="false", BROKER_URL="redis://127.0.0.1:6379/11", STORE_DIR=str(tmp_path / "afile"))
    assert code == 2  # the store, refused after the warning: nothing started
    [warning] = [r.getMessage() for r in caplog.records if r.name == "unlearnd" and r.levelname == "WARNING"]
    assert "UNLEARND_BACKGROUND=false" in warning and "`unlearnd worker`" in warning
    assert "celery -A worker.celery_app beat -s var/celerybeat-schedule" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="unlearnd"):
        _run(environment, ["serve", "--no-progress"], DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
             BACKGROUND="true", BROKER_URL="redis://127.0.0.1:6379/11", STORE_DIR=str(tmp_path / "afile"))
    assert not [r for r in caplog.records if "UNLEARND_BACKGROUND" in r.getMessage()]


@pytest.fixture
def registered(tmp_path):
    """A SQLite record serving version 1 of ``cli-mtl`` (written directly) and a store holding
    that version (an untrained tiny model, its sha256 the record's): ``(settings, store)``."""
    from sqlalchemy import update

    from model_store import LocalModelStore
    from unlearning.model import ModelConfig, MultiTaskNet
    from worker.datasets import dataset_spec, get_splits
    from worker.db import transaction
    from worker.settings import Settings
    from worker.tables import ModelVersion

    from .conftest import on_sqlite, register_model

    s = on_sqlite(Settings(_env_file=None, store_dir=tmp_path / "store", model_name="cli-mtl", n_train=4, n_test=2,
                           image_height=16, image_width=16), tmp_path)
    register_model(s, name="cli-mtl")
    train, _ = get_splits(dataset_spec(s))
    store = LocalModelStore(s.store_dir)
    manifest = store.put_version(MultiTaskNet(ModelConfig.for_dataset(train, width=8, depth=2, head_width=8)),
                                 model_name="cli-mtl", version=1, parent=None, dataset=dataset_spec(s))
    with transaction(s.database_url) as session:
        session.execute(update(ModelVersion).where(ModelVersion.model_name == "cli-mtl")
                        .values(sha256=manifest.sha256))
    return s, store


def _serve(environment, monkeypatch, s, store_dir) -> tuple[int, str, list]:
    """``unlearnd serve`` on ``s``'s record and ``store_dir``, uvicorn not started: its exit status,
    stderr and the calls uvicorn.run got."""
    import uvicorn

    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))
    code, err = _run(environment, ["serve", "--no-progress"], DATABASE_URL=s.database_url, STORE_DIR=str(store_dir),
                     MODEL_NAME=s.model_name, N_TRAIN="4", N_TEST="2", IMAGE_HEIGHT="16", IMAGE_WIDTH="16")
    return code, err, served


def s_port() -> int:
    """The port serve was given (the conftest's free one)."""
    return int(os.environ["UNLEARND_PORT"])


def test_a_store_without_the_serving_version_is_refused_naming_it(registered, environment, monkeypatch, tmp_path):
    # the record's model was served from whatever UNLEARND_STORE_DIR named: /readyz said ready,
    # and every deletion failed with a StoreError
    s, store = registered
    code, err, served = _serve(environment, monkeypatch, s, s.store_dir)
    assert (code, served) == (0, [served[0]]) and served[0]["port"] == s_port(), err  # the service's store
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err, served = _serve(environment, monkeypatch, s, empty)
    line = _one_line(code, err, f"UNLEARND_STORE_DIR {empty} does not hold version 1 of 'cli-mtl', which the "
                                "database serves")
    assert "is UNLEARND_STORE_DIR the service's?" in line and "file:///fake/cli-mtl/v1" in line and served == []
    # another store's version 1 of the same name (another deployment's): another sha256
    import torch

    from model_store import LocalModelStore
    from unlearning.model import ModelConfig, MultiTaskNet

    other = LocalModelStore(tmp_path / "other")
    torch.manual_seed(1)
    other.put_version(MultiTaskNet(ModelConfig(tasks={"depth": 1}, width=8, depth=2, head_width=8)),
                      model_name="cli-mtl", version=1, parent=None, dataset={"name": "indoor"})
    code, err, served = _serve(environment, monkeypatch, s, tmp_path / "other")
    _one_line(code, err, f"UNLEARND_STORE_DIR {tmp_path / 'other'} holds another version 1 of 'cli-mtl' than the "
                         "one the database serves")
    assert served == []


def test_a_serving_version_purged_in_the_store_starts_only_where_the_record_says_so(registered, environment,
                                                                                    monkeypatch, caplog):
    from sqlalchemy import update

    from worker.db import transaction
    from worker.tables import ModelVersion, utcnow

    s, store = registered
    store.purge("cli-mtl", 1)  # its weights gone, the record not told: a store the service cannot run on
    code, err, served = _serve(environment, monkeypatch, s, s.store_dir)
    _one_line(code, err, f"UNLEARND_STORE_DIR {s.store_dir} holds the manifest of version 1 of 'cli-mtl', which the "
                         "database serves, but not its weights")
    assert served == []
    with transaction(s.database_url) as session:  # as recorded: served (a rollback is the way out), with a warning
        session.execute(update(ModelVersion).where(ModelVersion.model_name == "cli-mtl").values(purged_at=utcnow()))
    with caplog.at_level("WARNING", logger="worker.bootstrap"):
        code, err, served = _serve(environment, monkeypatch, s, s.store_dir)
    assert code == 0 and len(served) == 1, err
    assert "the serving version 1 of cli-mtl was purged" in caplog.text
