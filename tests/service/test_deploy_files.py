"""The deployment files agree with the code: docker-compose.yml, Dockerfile, .dockerignore and
deploy/prometheus.yml (no Docker engine needed; the last test reads `docker compose config`
and is skipped where `docker compose` is absent).

What they caught or guard: a variable compose sets that no setting reads (a misspelt name is
silently ignored, pydantic-settings reads UNLEARND_* only), a worker started before its
migrations (it ran a job of a new image against the old schema: UndefinedColumn, the job left
'running' until the sweeper), secrets and the test suite in the build context, a Prometheus
target or path that is not the API's open /metrics."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = (ROOT / "docker-compose.yml").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _services(text: str) -> dict[str, str]:
    """The top-level services of a compose file, each as its block of text (anchors resolved:
    the x-unlearnd-env block is pasted where `<<: *unlearnd-env` merges it)."""
    anchor = re.search(r"^x-unlearnd-env: &unlearnd-env\n((?:  .*\n|\s*\n)+)", text, re.M)
    shared = anchor.group(1) if anchor else ""
    body = re.search(r"^services:\n((?:  .*\n|\s*\n|#.*\n)+)", text, re.M).group(1)
    blocks = re.split(r"^  (?=[a-z][\w-]*:\s*$)", body, flags=re.M)
    services = {}
    for block in blocks[1:]:
        name, rest = block.split(":", 1)
        services[name] = rest.replace("      <<: *unlearnd-env\n",
                                      "".join("    " + line + "\n" for line in shared.splitlines()))
    return services


def _environment(block: str) -> dict[str, str]:
    """UNLEARND_* variables of a service block as the container gets them (${X:-default} -> default)."""
    env = {}
    for name, raw in re.findall(r"^\s+(UNLEARND_\w+):[ \t]*(.*)$", block, re.M):
        value = re.sub(r"\s+#.*$", "", raw).strip()
        if value[:1] in "\"'" and value[-1:] == value[:1]:
            value = value[1:-1]
        env[name] = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)
    return env


SERVICES = _services(COMPOSE)
UNLEARND = ("migrate", "api", "worker")


def test_the_services_are_found():
    assert set(UNLEARND) | {"postgres", "redis", "prometheus"} <= set(SERVICES)


@pytest.mark.parametrize("service", UNLEARND)
def test_every_variable_compose_sets_is_a_setting_with_a_valid_value(service, monkeypatch):
    env = _environment(SERVICES[service])
    assert "UNLEARND_DATABASE_URL" in env and "UNLEARND_BROKER_URL" in env
    fields = {f"UNLEARND_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"{service}: no setting reads {sorted(set(env) - fields)}"
    for name in list(__import__("os").environ):
        if name.startswith("UNLEARND_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # raises on a value of the wrong format
    assert str(settings.store_dir) == "/data/models"


def test_dockerfile_variables_are_settings():
    names = set(re.findall(r"\b(UNLEARND_\w+)=", DOCKERFILE))
    assert names and names <= {f"UNLEARND_{n.upper()}" for n in Settings.model_fields}
    assert "UNLEARND_STORE_DIR=/data/models" in DOCKERFILE


@pytest.mark.parametrize("service", ("api", "worker"))
def test_api_and_worker_start_after_the_migration_and_share_the_store(service):
    block = SERVICES[service]
    assert re.search(r"migrate:\n\s+condition: service_completed_successfully", block), \
        f"{service} must wait for the migrate service"
    assert "- models:/data/models\n" in block
    assert re.search(r"^\s+init: true", block, re.M), f"{service}: docker stop's SIGTERM to a PID 1 without a handler"


def test_migrate_runs_the_migration_once():
    assert 'command: ["unlearnd", "migrate"]' in SERVICES["migrate"]
    assert re.search(r'restart: "?no"?', SERVICES["migrate"])


def test_the_database_is_healthy_only_once_it_takes_tcp_connections():
    # the migration runs once (above): a socket-only check passed during the image's first-start
    # setup server (no TCP), the migration was refused, and API and worker never started
    (check,) = re.findall(r"pg_isready[^\"\]]*", SERVICES["postgres"])
    assert "-h 127.0.0.1" in check


def test_the_worker_consumes_the_queue_tasks_are_sent_to():
    from worker.celery_app import app

    assert not app.conf.task_routes  # every task goes to the default queue ...
    queue = app.conf.task_default_queue
    command = re.search(r"^\s+command: (.*)$", SERVICES["worker"], re.M).group(1)
    assert json.loads(command)[:2] == ["unlearnd", "worker"]
    given = re.search(r"(?:-Q|--queues)[ =\"',]+([\w,]+)", command)
    assert given is None or queue in given.group(1).split(","), f"the worker does not consume {queue!r}"
    # ... and the health check pings this worker's own node (Celery's default name) through that app
    assert "celery -A worker.celery_app inspect ping -d celery@$$HOSTNAME" in SERVICES["worker"]
    assert app.main == "unlearnd"


def test_exec_form_and_non_root():
    assert re.search(r'^CMD \["unlearnd", "serve"\]$', DOCKERFILE, re.M)
    assert not re.search(r"^ENTRYPOINT (?!\[)", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "-c constraints.txt" in DOCKERFILE
    for service in UNLEARND:
        command = re.search(r"^\s+command: (.*)$", SERVICES[service], re.M).group(1)
        assert isinstance(json.loads(command), list), f"{service}: a shell-form command is not PID 1's child"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, as far as these patterns use it: a pattern excludes the
    path or a folder above it; * and ? stay within a name, **/ is any number of folders;
    the last matching pattern wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join("(?:.*/)?" if part == "**/" else "[^/]*" if part == "*" else "[^/]" if part == "?"
                        else re.escape(part) for part in re.split(r"(\*\*/|\*|\?)", pattern))
        if re.fullmatch(f"{regex}(?:/.*)?", path):
            ignored = not negate
    return ignored


def test_the_build_context_holds_no_secrets_tests_or_virtualenv():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv/bin/python", ".git/config", ".env", ".env.production", "app/.env", "var/unlearnd.db",
                 "var/certificate-key.pem", "certificate-key.pem", "secrets/certificate-key.pem", "deploy/x.key",
                 "tests/service/conftest.py", "benchmarks/full/cache/x", "worker/__pycache__/x.pyc"):
        assert _ignored(path, patterns), f"{path} would be in the image"
    for path in ("pyproject.toml", "constraints.txt", "README.md", "alembic.ini", "app/cli.py",
                 "worker/settings.py", "migrations/env.py", "migrations/versions/0001_initial.py",
                 "unlearning/train.py", "model_store/local.py"):
        assert not _ignored(path, patterns), f"{path} is needed in the image"


def test_prometheus_scrapes_the_open_metrics_of_the_api(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    config = (ROOT / "deploy" / "prometheus.yml").read_text()
    path = re.search(r"metrics_path: (\S+)", config)
    path = path.group(1) if path else "/metrics"
    target = re.search(r'targets: \["([\w-]+):(\d+)"\]', config)
    assert target, "one static target"
    assert target.group(1) in SERVICES
    assert target.group(2) == _environment(SERVICES[target.group(1)])["UNLEARND_PORT"]
    # published on the host's loopback only: with no API keys (the default) the API is open
    assert f'"127.0.0.1:{target.group(2)}:{target.group(2)}"' in SERVICES["api"]
    assert re.findall(r'^\s+- "([\d.:]+)"', COMPOSE, re.M) == ["127.0.0.1:8000:8000", "127.0.0.1:9090:9090"]
    assert f"127.0.0.1:{target.group(2)}/readyz" in SERVICES["api"]  # the health check, same port

    keys = {"ops": {"token_sha256": "0" * 64, "scopes": ["admin"]}}
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/record.db", store_dir=tmp_path / "models",
                        background=False, api_keys=keys)
    client = TestClient(create_app(settings))
    assert client.get(path).status_code == 200  # with API keys configured, no key: Prometheus sends none
    assert client.get("/readyz").status_code in (200, 503)  # not 401: the health check sends no key
    assert client.get("/models").status_code == 401  # (keys are on)


def _compose_config() -> dict:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode != 0:
            pytest.skip("the docker compose plugin is not installed")
        done = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("docker compose did not answer")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_docker_compose_config_agrees():
    config = _compose_config()
    fields = {f"UNLEARND_{n.upper()}" for n in Settings.model_fields}
    for service in UNLEARND:
        spec = config["services"][service]
        names = {n for n in spec.get("environment", {}) if n.startswith("UNLEARND_")}
        assert names <= fields, f"{service}: no setting reads {sorted(names - fields)}"
        assert spec["environment"]["UNLEARND_STORE_DIR"] == "/data/models"
        if service != "migrate":
            assert spec["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
            assert any(v.get("target") == "/data/models" and v.get("source") == "models" for v in spec["volumes"])


def test_the_database_password_is_one_variable_for_postgres_and_the_service():
    """Set once (POSTGRES_PASSWORD in the shell or .env): the server's password and the one in
    the service's database URL cannot drift apart, and neither is a literal to edit twice."""
    password = re.search(r"^\s+POSTGRES_PASSWORD:[ \t]*(.*)$", SERVICES["postgres"], re.M).group(1).strip()
    assert password == "${POSTGRES_PASSWORD:-unlearnd}"
    for service in UNLEARND:
        url = re.search(r"^\s+UNLEARND_DATABASE_URL:[ \t]*(.*)$", SERVICES[service], re.M).group(1).strip()
        assert url.startswith("postgresql+psycopg://unlearnd:${POSTGRES_PASSWORD:-unlearnd}@postgres:"), service


def test_docker_stop_leaves_the_api_its_stop_budget():
    """`docker stop` sends SIGKILL after the service's stop_grace_period (10 s unless set); the
    API's background (its in-process worker's job put back, the relay and the sweeper ended)
    takes up to STOP_BUDGET_S."""
    from worker.background import STOP_BUDGET_S

    grace = re.search(r"^\s+stop_grace_period: (\d+)s$", SERVICES["api"], re.M)
    assert grace and int(grace.group(1)) > STOP_BUDGET_S
