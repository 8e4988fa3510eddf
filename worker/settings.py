"""The one settings object of the service, read once from the environment (prefix ``UNLEARND_``)."""
from __future__ import annotations

import difflib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from unlearning.jsonio import no_repeated_names

#: what an API key may do (app.auth): submit and read deletion requests; read models, versions,
#: jobs and the audit log; everything, rollback included
Scope = Literal["deletions", "read", "admin"]
#: a model's name is its folder in the model store too: letters, digits and ._- (no separator, no '..');
#: model_store.local checks the same rule where it makes the folder
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
#: a key's name is written into the audit log as the actor of what it submitted
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
KeyName = Annotated[str, StringConstraints(pattern=KEY_NAME_PATTERN)]
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,3})?)$"

#: what a value matching each pattern looks like, in words: pydantic's message shows the regular
#: expression ("String should match pattern '^[0-9a-f]{64}$'"); the API's 422s and the commands'
#: configuration errors say these instead (:func:`said_in_words`)
PATTERN_WORDS = {
    SHA256_PATTERN: "must be a sha256: 64 hexadecimal digits, lowercase (0-9, a-f)",
    MODEL_NAME_PATTERN: "must be a model name: 1 to 100 letters, digits, '.', '_' or '-', "
                        "the first a letter or a digit",
    KEY_NAME_PATTERN: "must be a key name: 1 to 64 letters, digits, '.', '_', '@' or '-', "
                      "the first a letter or a digit",
    DEVICE_PATTERN: "must be auto, cpu, cuda or cuda:N (N a GPU's index)",
}


#: a model's name, as settings, the store and the API's paths take it
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]


def said_in_words(error: dict) -> str:
    """A pydantic error's message, said in words where it shows a regular expression or
    pydantic's own prefix before our validators' sentences."""
    msg = error.get("msg") or ""
    if error.get("type") == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern")
        return PATTERN_WORDS.get(pattern, f"does not have the form this field takes (the pattern {pattern})")
    if error.get("type") == "value_error":
        return msg.removeprefix("Value error, ")
    return msg


class ApiKey(BaseModel):
    """One API key: the sha256 (hex) of its bearer token, never the token itself, and its scopes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token_sha256: Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
    scopes: list[Scope] = Field(min_length=1)




def _url_parts(value: str, what: str, use: str):
    """``value`` split as a URL, its port parsed (a ValueError naming ``what``, never the
    value: it may hold a password)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsed on access: a port that is not a number raises here
    except ValueError as exc:
        raise ValueError(f"not a {what} ({exc}); {use}") from None
    return parts


def _check_redis_database(parts, what: str, use: str) -> None:
    """A Redis URL's path is a database index or nothing."""
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"{what} {db!r} is not a number; {use}")


#: the longest wait before a failed propagation is tried again (worker.versions.propagation_retry_at)
PROPAGATION_RETRY_CAP_S = 86400.0
#: the longest a job may run and a piece of work may sit untouched before the sweeper acts (a
#: week): 1e11 s overflowed ``now - timedelta(...)`` in the sweeper, which then died
MAX_JOB_SECONDS = 7 * 86400
#: the longest pause of a background loop and of a worker's warm shutdown: 1e10 s overflowed
#: the thread's wait (OverflowError), the relay died, and /readyz answered 503 naming no setting
MAX_PAUSE_S = 3600.0


def _json_setting(value, refusal: str):
    """A JSON-object setting as read from the environment (a string): parsed refusing a name
    given twice (``json.loads`` keeps the last); blank (compose's ``${UNLEARND_X:-}``) is none,
    ``{}``; ``refusal`` begins the error. Other values (given in code) pass through."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return {}
    try:
        return json.loads(value, object_pairs_hook=no_repeated_names)
    except ValueError as exc:
        raise ValueError(f"{refusal} ({exc})") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", env_file=".env", extra="ignore")

    # Embedded default: SQLite, a local model store, an in-process worker.
    database_url: str = "sqlite:///var/unlearnd.db"
    store_dir: Path = Path("var/models")
    broker_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; None = in-process worker
    result_backend: str | None = None

    model_name: ModelName = "indoor-mtl"
    # the first version's dataset: only the synthetic ones are described by settings alone (no data root);
    # any other name failed with a traceback after the migration, when the first start loaded it
    dataset: Literal["indoor", "street"] = "indoor"
    n_train: int = Field(128, gt=0)
    n_test: int = Field(48, gt=0)
    image_height: int = Field(48, ge=2)  # the renderer's smallest image is 2x2 (1 failed at the first start)
    image_width: int = Field(64, ge=2)
    # 480 steps, 3-4 minutes on 2 shared CPU cores (a first start; README), and long enough that the
    # model memorises its training data (membership AUC 0.83-0.97 per task), so the audit's MIA
    # numbers mean something.
    train_epochs: int = Field(60, gt=0)
    model_width: int = Field(16, gt=0)  # encoder base width and head width of a first model (tests use a tinier one)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # the synthetic data's seed and the jobs' (torch takes 64 bits)

    method: str = "interference_aware"
    # the method's hyper-parameters over its defaults, JSON in UNLEARND_METHOD_CONFIG (a name given
    # twice is refused: json.loads kept the last, so '{"steps":0,"steps":5}' went through as 5)
    method_config: Annotated[dict, NoDecode] = {}
    # interference_aware: calibrate where forgotten cells should land with shadow models, once per
    # model (stored next to its versions; (1 + tasks) x 4 trainings of the first version's recipe;
    # '{"shadow_folds": 2}' in UNLEARND_METHOD_CONFIG trains half as many, which at 795 scenes put
    # partial erasure within 0.03 of retrained models; '{"shadow_folds": 8, "shadow_trained_folds": 1}'
    # trains 1 + tasks and left it ~0.09 low: benchmarks/README.md, "A calibration of fewer shadows")
    calibrate_shadows: bool = False
    # interference_aware's held-out reference (its levels, the calibration's scores): 0 = the test
    # split, where the audit's membership attack takes its non-members too (the design's setup);
    # N = N rendered held-out scenes of its own (synthetic datasets: unlearning.data.load_reference)
    reference_scenes: int = Field(0, ge=0, le=1_000_000)
    # auto = CUDA when present; cpu; cuda or cuda:N
    device: Annotated[str, StringConstraints(pattern=DEVICE_PATTERN)] = "auto"
    # CPU threads torch may use in a job; None = torch's default. On a small shared CPU
    # (API, relay and worker in one process) oversubscribed threads slow jobs down many times.
    torch_threads: int | None = Field(None, gt=0, le=4096)
    # Durations, counts and intervals are positive: at 0 or less the relay looped without a pause,
    # the sweeper reset every running job at each pass, or a claim failed every queued job
    # (a rollback's reapply, a job put back) before it ran.
    job_time_limit_s: int = Field(3600, gt=0, le=MAX_JOB_SECONDS)
    stale_after_s: int = Field(600, gt=0, le=MAX_JOB_SECONDS)  # the sweeper re-enqueues work untouched for this long
    # a warm shutdown of `unlearnd worker` (docker stop: SIGTERM to its main process) lets a running
    # job go on this long, then puts it back in the queue (docker kills after 10 s)
    worker_stop_grace_s: float = Field(5.0, ge=0, le=MAX_PAUSE_S, allow_inf_nan=False)
    max_job_attempts: int = Field(3, gt=0)  # claims of one job before it is failed (its worker keeps dying: a poison job)
    # a failed propagate job (a model catching up on erasures made through another model on its
    # dataset) is tried again after this long, twice as long after each further failure of the
    # same cells on the same base, at most a day (PROPAGATION_RETRY_CAP_S); its model's next
    # deletion request is a try too. Before, nothing tried it again: the model served the cells
    # until a request came. At most a day too: a year's worth overflowed the retry's date
    propagation_retry_s: float = Field(3600.0, gt=0, le=PROPAGATION_RETRY_CAP_S, allow_inf_nan=False)
    relay_interval_s: float = Field(1.0, gt=0, le=MAX_PAUSE_S, allow_inf_nan=False)

    background: bool = True  # the API process runs the outbox relay (and, without a broker, the in-process worker)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # API keys, JSON in UNLEARND_API_KEYS: {"name": {"token_sha256": "<hex>", "scopes": [...]}}
    # (`unlearnd api-key NAME --scope ...` makes one). Empty: no authentication, the embedded default.
    api_keys: Annotated[dict[KeyName, ApiKey], NoDecode] = {}
    # web origins whose browser pages may send state-changing requests though the request's Host
    # names another (app.guards.browser_refusal): a reverse proxy that rewrites Host (nginx's
    # default), /docs opened through it. Comma-separated scheme://host[:port]; empty: none
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()
    # a PEM Ed25519 private key (`unlearnd certificate-key` writes one): certificates are signed with
    # it (worker.signing); unset: certificates carry their sha256 only
    certificate_key_file: Path | None = None

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value):
        """``https://unlearnd.example, http://localhost:8080``: each a web origin as a browser
        sends it (a scheme, http or https, and a host, with a port or none; no path), kept in
        that form; blank is none."""
        from urllib.parse import urlsplit

        items = value.split(",") if isinstance(value, str) else list(value or ())
        origins = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            try:
                parts = urlsplit(item)
                parts.port  # noqa: B018 - a port that is not a number raises here
            except ValueError:
                parts = None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                    or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
                raise ValueError(f"{item!r} is not a web origin: scheme://host[:port], http or https, no path")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # lower-cased by urlsplit
            default = {"http": 80, "https": 443}[parts.scheme]
            port = f":{parts.port}" if parts.port not in (None, default) else ""  # as a browser writes it
            origins.append(f"{parts.scheme}://{host}{port}")
        return tuple(origins)

    @field_validator("torch_threads", mode="before")
    @classmethod
    def _blank_is_torchs_default(cls, value):
        """Blank (compose's ``${UNLEARND_TORCH_THREADS:-}``) is unset, torch's default, as for the
        other optional settings; it was refused as "not a valid integer"."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("certificate_key_file", mode="before")
    @classmethod
    def _blank_is_no_key(cls, value):
        """Blank (compose's ``${UNLEARND_CERTIFICATE_KEY_FILE:-}``) is no key: ``Path("")`` is
        ``.``, which counted as set, and ``serve`` failed reading a folder as a key."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("store_dir", mode="before")
    @classmethod
    def _blank_is_the_default_store(cls, value):
        """Blank (``${UNLEARND_STORE_DIR:-}``) is unset, as for the certificate key: the default
        ``var/models``. ``Path("")`` is ``.``: the store's model folders went into the working
        directory."""
        if isinstance(value, str) and not value.strip():
            return cls.model_fields["store_dir"].default
        return value

    @field_validator("host")
    @classmethod
    def _a_host(cls, value: str) -> str:
        """Not blank: uvicorn took ``UNLEARND_HOST=`` as every interface (0.0.0.0 and ::),
        while ``--host ""`` was refused. Whether the name resolves is ``serve``'s check."""
        if not value.strip():
            raise ValueError("the bind address is empty; give one, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 "
                             "(every interface)")
        return value

    @field_validator("method_config", mode="before")
    @classmethod
    def _method_config_json(cls, value):
        return _json_setting(value, "UNLEARND_METHOD_CONFIG must be a JSON object of the method's parameters")

    @field_validator("database_url")
    @classmethod
    def _a_database_url(cls, value: str) -> str:
        """SQLite (``sqlite:///PATH``) or PostgreSQL through psycopg, parsed now: a malformed
        URL, another database or driver failed with a traceback at the first connection."""
        from sqlalchemy.engine import make_url

        try:
            url = make_url(value)
            url.port  # noqa: B018 - parsed on access: a port that is not a number raises here
            kind = (url.get_backend_name(), url.get_driver_name())
        except Exception as exc:  # noqa: BLE001 - ArgumentError, ValueError, NoSuchModuleError
            raise ValueError(f"not a database URL ({exc}); use sqlite:///PATH or "
                             "postgresql+psycopg://USER@HOST:PORT/NAME") from None
        if kind not in (("sqlite", "pysqlite"), ("postgresql", "psycopg")):
            raise ValueError(f"{kind[0]}+{kind[1]} is not a database the service runs on; use sqlite:///PATH or "
                             "postgresql+psycopg://USER@HOST:PORT/NAME")
        if kind[0] == "sqlite" and (url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"):
            # every connection of the pool opened a database of its own, empty: the migration's
            # tables were not there for the next one ("no such table: models", a traceback)
            raise ValueError("an in-memory SQLite database (sqlite://, sqlite:///:memory:) is a new, empty one on "
                             "each of the service's connections; use sqlite:///PATH, a file")
        if kind[0] == "sqlite":
            for folder in Path(url.database).absolute().parents:
                try:
                    found, folder_is_dir = folder.exists(), folder.is_dir()
                except OSError:  # a name too long for the file system: the commands' check_creatable names it
                    continue
                if found:
                    if not folder_is_dir:
                        raise ValueError(f"the SQLite file {url.database} would lie under {folder}, which is a file")
                    break
        return value

    @field_validator("broker_url")
    @classmethod
    def _a_broker_url(cls, value: str | None) -> str | None:
        """Redis (``redis://HOST:PORT/DB``, ``rediss://`` with TLS), parsed now; blank is none
        (the in-process worker). A typo (another scheme, a port or a database index that is
        not a number) failed later: a traceback when the worker started, and an API that
        answered ready and accepted requests its relay could not publish."""
        if value is None or not value.strip():
            return None
        use = "use redis://HOST:PORT/DB (rediss:// for TLS)"
        parts = _url_parts(value, "broker URL", use)
        if parts.scheme == "memory":  # kombu's in-process transport: the relay published into it, unread
            raise ValueError("memory:// is a broker only this process reads: no worker would ever receive a job; "
                             "leave UNLEARND_BROKER_URL blank for the in-process worker, or " + use)
        if parts.scheme == "redis+socket":  # a Unix socket
            return value
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{parts.scheme or 'a URL without a scheme'} is not a broker the service runs on; {use}")
        _check_redis_database(parts, "the broker URL's database", use)
        return value

    @field_validator("result_backend")
    @classmethod
    def _a_result_backend(cls, value: str | None) -> str | None:
        """A result backend Celery knows (``redis://HOST:PORT/DB``, ``db+postgresql://...``,
        ``rpc://``, ...), parsed now; blank is none (results are ignored). A typo made every
        ``unlearnd worker`` stop at its start ("Unrecoverable error"), while the API answered
        ready. Whether the backend's own library is installed is still found at the start."""
        if value is None or not value.strip():
            return None
        from celery.app.backends import BACKEND_ALIASES, by_url

        use = "use a Celery result backend URL such as redis://HOST:PORT/DB, or leave it unset"
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme in ("redis", "rediss") and ";" not in value:  # one Redis server (sentinel:// lists several)
            _check_redis_database(_url_parts(value, "result backend URL", use), "the result backend's Redis "
                                  "database", use)
        try:
            by_url(value)  # the backend's class by the URL's scheme (or a bare name: rpc): an unknown one fails
        except Exception:  # noqa: BLE001 - ImportError, ImproperlyConfigured, ValueError, ...
            # a backend Celery names whose module needs a library not installed here is found when
            # the worker starts, as one whose class loads but whose client library is missing
            if scheme.split("+", 1)[0] not in BACKEND_ALIASES:
                what = f"{scheme}://" if scheme and "@" not in scheme else "the value"  # never its credentials
                raise ValueError(f"{what} is not a result backend Celery knows; {use}") from None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_json(cls, value):
        return _json_setting(value, "UNLEARND_API_KEYS must be a JSON object of keys")

    @field_validator("api_keys")
    @classmethod
    def _one_key_per_token(cls, keys: dict[str, ApiKey]) -> dict[str, ApiKey]:
        seen: dict[str, str] = {}
        for name, key in keys.items():
            if key.token_sha256 in seen:  # a caller would be one key or the other, by dict order
                raise ValueError(f"API keys {seen[key.token_sha256]!r} and {name!r} have the same token")
            seen[key.token_sha256] = name
        return keys


#: UNLEARND_ variables that are not settings: the test suite's (README, "Set up").
NOT_SETTINGS = frozenset({"UNLEARND_TEST_PG", "UNLEARND_E2E_PG", "UNLEARND_E2E_REDIS", "UNLEARND_REQUIRE_GPU"})


def unknown_variables(environ=None, env_file: str | Path | None = ".env") -> list[str]:
    """A warning for each ``UNLEARND_`` variable (in ``environ``, default the process's, or the
    ``.env`` file the settings read) that names no setting: the settings ignore it, so a typo
    went unnoticed (``UNLEARND_API_KEY`` served the API without keys)."""
    names = set(os.environ if environ is None else environ)
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

        names |= set(dotenv_values(env_file))
    known = {f"UNLEARND_{field.upper()}" for field in Settings.model_fields}
    out = []
    for name in sorted(names):
        upper = name.upper()
        if not upper.startswith("UNLEARND_") or upper in known or upper in NOT_SETTINGS:
            continue
        # compared without the prefix, which every name shares
        close = difflib.get_close_matches(upper[len("UNLEARND_"):], sorted(k[len("UNLEARND_"):] for k in known),
                                          n=1, cutoff=0.75)
        out.append(f"{name} is not a setting and is ignored" + (f"; did you mean UNLEARND_{close[0]}?" if close else ""))
    return out


class InvalidSettings(ValueError):
    """UNLEARND_* settings (environment or .env) the service refuses, said without their
    values: pydantic's own message shows each input (``input_value='postgresql://u:PASSWORD@...'``),
    which the entry points that do not go through ``unlearnd`` (``celery -A
    worker.celery_app``, ``uvicorn app.main:create_app --factory``) printed."""


def describe_invalid(exc: ValidationError) -> str:
    """What is wrong with the settings, one clause per field, naming its variable, never its value."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))} (UNLEARND_{str(e['loc'][0]).upper()}): "
                         f"{said_in_words(e)}" for e in exc.errors(include_url=False, include_input=False))
    return f"invalid configuration (UNLEARND_* environment variables or .env): {problems}"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; :class:`InvalidSettings` (no values) when refused."""
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettings(describe_invalid(exc)) from None
