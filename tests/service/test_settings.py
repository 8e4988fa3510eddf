"""Settings the service cannot run with are refused when they are read (worker/settings.py),
not discovered as a relay looping without a pause or every job failing."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.cli import main
from worker.settings import Settings, get_settings


@pytest.mark.parametrize("field, value", [
    ("relay_interval_s", 0),  # the relay thread looped without a pause (250k passes in 0.5 s)
    ("relay_interval_s", -1.0),
    ("relay_interval_s", float("nan")),
    ("stale_after_s", 0),  # every running job looked stale: the sweeper reset it at each pass
    ("stale_after_s", -600),
    ("max_job_attempts", 0),  # a claim failed every queued job ("gave up after 0 attempts")
    ("propagation_retry_s", 0),  # a failed propagation tried again in a loop
    ("propagation_retry_s", float("inf")),
    ("propagation_retry_s", 86401),  # past the day the backoff stops at (1e12 overflowed the retry's date)
    ("job_time_limit_s", 0),
    ("job_time_limit_s", -5),
    ("job_time_limit_s", 7 * 86400 + 1),  # past a week: 1e11 s overflowed the sweeper's date arithmetic
    ("stale_after_s", 7 * 86400 + 1),
    ("relay_interval_s", 3601),  # 1e10 s overflowed the background thread's wait: it died
    ("worker_stop_grace_s", 3601),
    ("torch_threads", 0),
    ("n_train", 0),
    ("n_test", -1),
    ("image_height", 0),
    ("image_height", 1),  # no scene has one row: the first start failed rendering it
    ("image_width", 0),
    ("image_width", 1),
    ("train_epochs", 0),
    ("model_width", 0),
    ("port", 0),
    ("port", 65536),
    ("dataset", "mnist"),  # a traceback (KeyError) after the migration, when serve loaded it
    ("dataset", "nyuv2"),  # no data root in the settings: it cannot be loaded either
])
def test_a_setting_out_of_its_range_is_refused(field, value):
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, **{field: value})
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_the_defaults_and_the_smallest_valid_values_are_accepted():
    Settings(_env_file=None)
    s = Settings(_env_file=None, relay_interval_s=0.01, stale_after_s=1, max_job_attempts=1, job_time_limit_s=1,
                 torch_threads=1, n_train=1, n_test=1, image_height=2, image_width=2, train_epochs=1, model_width=1,
                 port=1, seed=0)
    assert (s.relay_interval_s, s.stale_after_s, s.max_job_attempts, s.seed) == (0.01, 1, 1, 0)
    assert Settings(_env_file=None, port=65535, torch_threads=None).torch_threads is None
    s = Settings(_env_file=None, job_time_limit_s=7 * 86400, stale_after_s=7 * 86400, relay_interval_s=3600,
                 worker_stop_grace_s=3600)
    assert (s.job_time_limit_s, s.relay_interval_s) == (7 * 86400, 3600)


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_torch_threads_is_torchs_default(blank):
    # compose's ${UNLEARND_TORCH_THREADS:-}: refused as "not a valid integer", where the other
    # optional settings read blank as unset
    assert Settings(_env_file=None, torch_threads=blank).torch_threads is None


def test_the_command_names_the_variable_and_keeps_the_database_password_out(monkeypatch, capsys):
    monkeypatch.setenv("UNLEARND_DATABASE_URL", "postgresql+psycopg://u:pw-s3cret@127.0.0.1:1/x")
    monkeypatch.setenv("UNLEARND_RELAY_INTERVAL_S", "0")
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 2  # refused before anything connects
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "relay_interval_s" in err
    assert "pw-s3cret" not in err


@pytest.mark.parametrize("value, kept", [
    ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1"),
    ("rediss://h:6380", "rediss://h:6380"),
    ("db+postgresql+psycopg://u@h/x", "db+postgresql+psycopg://u@h/x"),
    ("rpc://", "rpc://"),
    ("rpc", "rpc"),  # a bare backend name, as Celery takes it
    ("sentinel://h1:26379;sentinel://h2:26380/0", "sentinel://h1:26379;sentinel://h2:26380/0"),  # several hosts
    # a backend Celery knows whose library is not installed here: found when the worker starts
    ("azureblockblob://DefaultEndpointsProtocol=https;AccountName=x", "azureblockblob://DefaultEndpointsProtocol=https;AccountName=x"),
    ("", None), ("  ", None),  # compose's ${UNLEARND_RESULT_BACKEND:-}: results ignored
])
def test_result_backends_celery_knows_are_taken(value, kept):
    assert Settings(_env_file=None, result_backend=value).result_backend == kept


def test_an_in_process_broker_is_refused():
    """kombu's memory:// transport is read by this process alone: the relay marked every
    announcement published into it, no worker ever received one, and no request ran."""
    with pytest.raises(ValidationError, match="memory:// is a broker only this process reads"):
        Settings(_env_file=None, broker_url="memory://")
    assert Settings(_env_file=None, broker_url="redis+socket:///run/redis.sock").broker_url  # a Unix socket


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_certificate_key_file_is_no_key(blank):
    # compose passes ${UNLEARND_CERTIFICATE_KEY_FILE:-}: blank was Path("."), a key file that
    # counted as set, and serve failed reading a folder as a key
    assert Settings(_env_file=None, certificate_key_file=blank).certificate_key_file is None


def test_the_store_and_the_settings_take_the_same_model_names():
    # the rule is written twice (worker.settings must not import the store, which imports torch);
    # a name the settings take must be a folder the store makes, and the other way round
    from model_store.local import _NAME
    from worker.settings import MODEL_NAME_PATTERN

    assert _NAME.pattern == MODEL_NAME_PATTERN


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_host_is_refused(blank):
    # uvicorn took UNLEARND_HOST= as every interface (0.0.0.0 and ::), while `--host ""` was refused
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, host=blank)
    [error] = refused.value.errors()
    assert error["loc"] == ("host",) and "the bind address is empty" in error["msg"]


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_store_dir_is_the_default_one(blank):
    # Path("") is ".": the model folders went into the working directory. Blank is unset, as for
    # UNLEARND_CERTIFICATE_KEY_FILE (compose's ${UNLEARND_STORE_DIR:-})
    assert Settings(_env_file=None, store_dir=blank).store_dir == Settings(_env_file=None).store_dir == Path("var/models")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///x.db?mode=memory&uri=true"])
def test_an_in_memory_sqlite_database_is_refused(url):
    # each connection got a database of its own, empty: "no such table: models" after migrating
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, database_url=url)
    [error] = refused.value.errors()
    assert error["loc"] == ("database_url",) and "use sqlite:///PATH" in error["msg"]


def test_a_sqlite_path_with_a_name_too_long_is_left_to_the_commands(tmp_path):
    # Path.exists() raised ENAMETOOLONG out of the validator (a traceback); check_creatable names it
    url = f"sqlite:///{tmp_path / ('d' * 300) / 'x.db'}"
    assert Settings(_env_file=None, database_url=url).database_url == url


def test_the_method_config_is_json_without_a_name_given_twice(monkeypatch):
    # json.loads keeps the last of two names: '{"steps":0,"steps":5}' was read as 5
    monkeypatch.setenv("UNLEARND_METHOD_CONFIG", '{"steps": 0, "steps": 5}')
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    [error] = refused.value.errors()
    assert error["loc"] == ("method_config",) and "the name 'steps' is given twice" in error["msg"]
    monkeypatch.setenv("UNLEARND_METHOD_CONFIG", '{"steps": 5, "lr": 0.002}')
    assert Settings(_env_file=None).method_config == {"steps": 5, "lr": 0.002}
    monkeypatch.setenv("UNLEARND_METHOD_CONFIG", " ")  # compose's ${UNLEARND_METHOD_CONFIG:-}: none
    assert Settings(_env_file=None).method_config == {}
    monkeypatch.setenv("UNLEARND_METHOD_CONFIG", "[5]")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


@pytest.mark.parametrize("entry", ["import worker.celery_app",  # `celery -A worker.celery_app ...`
                                   "from app.main import create_app; create_app()"])  # uvicorn --factory
def test_an_entry_point_outside_unlearnd_names_a_refused_setting_without_its_value(entry, tmp_path):
    """pydantic's message shows every refused input: `celery -A worker.celery_app` (the compose
    worker's health check, beat) and uvicorn's factory printed the database password."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    env.update(UNLEARND_DATABASE_URL="mysql://unlearnd:S3cretPW@db:5432/unlearnd",
               UNLEARND_BROKER_URL="redis://:An0therPW@h:port/0", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", entry], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "S3cretPW" not in done.stderr and "An0therPW" not in done.stderr, done.stderr
    assert "InvalidSettings: invalid configuration" in done.stderr
    assert "(UNLEARND_DATABASE_URL): mysql+mysqldb is not a database the service runs on" in done.stderr
    assert "(UNLEARND_BROKER_URL): not a broker URL" in done.stderr
