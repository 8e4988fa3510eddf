"""``unlearnd``: run the service, a worker, migrations, training, unlearning or the benchmark.

Configuration comes from ``UNLEARND_*`` environment variables (see README);
with none set, ``unlearnd serve`` runs everything in one process: SQLite under
``var/``, model versions under ``var/models``, an in-process worker.
"""
from __future__ import annotations

import argparse
import errno
import logging
import re
import sys
from pathlib import Path

EPILOG = """examples:
  unlearnd serve                      # migrate, train the first model if needed, serve on 127.0.0.1:8000
  unlearnd serve --port 9000
  UNLEARND_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/unlearnd \\
  UNLEARND_BROKER_URL=redis://127.0.0.1:6379/0 unlearnd worker
  unlearnd migrate
  unlearnd calibrate                  # shadow calibration of the served model (see UNLEARND_CALIBRATE_SHADOWS)
  unlearnd purge --all-models --older-than-days 30   # delete old weights that still hold erased data
  unlearnd api-key portal --scope deletions   # a token for a privacy portal and its UNLEARND_API_KEYS entry
  unlearnd certificate-key --out var/certificate-key.pem   # sign deletion certificates
  unlearnd verify-certificate cert.json --public-key <base64>
  unlearnd train --dataset indoor --epochs 30 --out runs/indoor
  unlearnd unlearn --checkpoint runs/indoor --instance indoor-00007 --tasks depth --out runs/indoor-2
  unlearnd bench --help
"""


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # seven "setup plugin alembic.autogenerate..." lines at every start; migrate never autogenerates
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # "Running upgrade 0001 -> 0002, <the migration's whole docstring>" per step (~40 lines on a
    # first start); worker.migrate logs one line with the revisions instead
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)


def _refused_connection(exc) -> bool:
    """A connection that was never made (psycopg, SQLite), not an error of a statement."""
    reason = str(getattr(exc, "orig", None) or exc)
    return reason.startswith(("connection failed", "failed to resolve host", "unable to open database file",
                              "file is not a database"))


def _database_unreachable(exc, url: str) -> str:
    """One line for a database that refused the connection (it does not exist, the server is
    down, a wrong password), naming the URL without its password, instead of a traceback."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL fails before it connects
        shown = "UNLEARND_DATABASE_URL"
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
    message = f"unlearnd: cannot connect to the database {shown}: {reason}"
    if re.search(r'database "[^"]*" does not exist', reason):
        message += " (the commands migrate a database but do not create it: createdb -h HOST -U USER NAME)"
    elif reason.startswith("file is not a database"):
        message += " (UNLEARND_DATABASE_URL names a file that is not a SQLite database)"
    return message


def _store_dir_ok(settings) -> bool:
    """Whether the model store's folder is one, or can be made (checked before a first start
    trains a model it could not store)."""
    from unlearning.cli import CliError, check_creatable

    folder = Path(settings.store_dir)
    try:
        found, is_dir, problem = folder.exists(), folder.is_dir(), None
    except OSError as exc:  # a name too long for the file system (ENAMETOOLONG), no permission to look
        found, is_dir, problem = False, False, exc
    if found and not is_dir:
        print(f"unlearnd: UNLEARND_STORE_DIR {folder} is not a folder", file=sys.stderr)
        return False
    if not found:
        try:
            check_creatable(folder, option="UNLEARND_STORE_DIR")  # names a name that is too long
        except CliError as exc:
            print(f"unlearnd: {exc}", file=sys.stderr)
            return False
        if problem is not None:
            print(f"unlearnd: UNLEARND_STORE_DIR {folder} cannot be used: {problem.strerror or problem}",
                  file=sys.stderr)
            return False
    return True


#: what SQLite and the migration write next to the database file (migrations/env.py's lock,
#: SQLite's journal and WAL files)
SQLITE_SIBLINGS = (".migrate-lock", "-journal", "-wal", "-shm")


def _database_file_ok(settings) -> bool:
    """Whether the SQLite file (if the database is one) and the files written next to it can
    be made: checked before migrating (``/proc/x.db`` or a name too long for the file system
    failed with a traceback from the migration's lock file)."""
    from sqlalchemy.engine import make_url

    from unlearning.cli import CliError, check_creatable

    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite":
        return True
    path = Path(url.database)
    try:
        check_creatable(path, option="UNLEARND_DATABASE_URL's SQLite file",
                        siblings=[path.name + suffix for suffix in SQLITE_SIBLINGS])
    except CliError as exc:
        print(f"unlearnd: {exc}", file=sys.stderr)
        return False
    return True


def _device_problem(value: str | None) -> str | None:
    """Why ``value`` (UNLEARND_DEVICE) names no device this machine has; ``None`` when it does."""
    from unlearning.cli import CliError, cli_device

    try:
        cli_device(value, option="UNLEARND_DEVICE")
    except CliError as exc:
        return str(exc)
    return None


def _trains_first_version(settings, store) -> bool:
    """Whether ``serve`` trains the model's first version: the store holds no version 1 (a
    registered model always has one, stored or purged)."""
    name = settings.model_name
    return not (store.exists(name, 1) or store.purged(name, 1))


def _serving_device(settings, store):
    """The device this ``serve`` process trains or unlearns on, resolved (``cuda`` without CUDA
    failed with a traceback once the first start had migrated and rendered): where it trains
    the first version (the store holds no version 1) or runs the jobs (UNLEARND_BACKGROUND).
    ``None`` where it does neither (an API beside workers; UNLEARND_DEVICE is theirs: the
    setting is shared in docker-compose.yml), ``False`` after printing why it is refused."""
    from unlearning.cli import CliError, cli_device

    if not settings.background and not _trains_first_version(settings, store):
        return None
    try:
        return cli_device(settings.device, option="UNLEARND_DEVICE")
    except CliError as exc:
        print(f"unlearnd: {exc}", file=sys.stderr)
        return False


def _worker_device_ok(settings) -> bool:
    """Whether UNLEARND_DEVICE names a device this machine has, for ``unlearnd worker``: checked
    only where it names CUDA (``auto`` and ``cpu`` always resolve), and in a spawned process.
    Asking torch whether CUDA is there initialises it in the asking process, and the prefork
    pool's children, forked after, then fail their first CUDA use ("Cannot re-initialize CUDA
    in forked subprocess"): every job would fail."""
    value = settings.device
    if value in (None, "auto") or not str(value).startswith("cuda"):
        return True
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        problem = pool.apply(_device_problem, (value,))
    if problem:
        print(f"unlearnd: {problem}", file=sys.stderr)
        return False
    return True


def _host_ok(host: str, port: int, source: str) -> bool:
    """Whether the API can listen on ``host``:``port``, bound as uvicorn binds it (asyncio's
    ``create_server``: every address the name resolves to, SO_REUSEADDR) and let go at once.
    A name that does not resolve, an address that is not this machine's, or a port another
    process holds was found by uvicorn only after the migration and the first start's
    training (exit 3). (Another process may still take the port in between.)"""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:  # socket.gaierror; UnicodeError (a label over 63 characters)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"unlearnd: {source} {host!r} cannot be listened on: {reason}; give an address of this machine "
              "(127.0.0.1, 0.0.0.0, ::) or a name that resolves to one", file=sys.stderr)
        return False
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this host lacks (IPv6 off, ::1 still resolved): asyncio skips it too
            continue
        try:
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as exc:
            shown = f"[{address[0]}]:{address[1]}" if family == getattr(socket, "AF_INET6", None) \
                else f"{address[0]}:{address[1]}"
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                hint = "another process listens there; stop it or give another UNLEARND_PORT / --port"
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = "it is not an address of this machine; give one (127.0.0.1, 0.0.0.0, ::)"
            else:
                hint = "give another address or port"
            print(f"unlearnd: {source} {host!r}: cannot listen on {shown}: {reason}; {hint}", file=sys.stderr)
            return False
    return True


def _first_model_fits(settings, store, device=None) -> bool:
    """Whether a first version, when ``serve`` will train one (:func:`_trains_first_version`),
    fits this machine's memory (and on a CUDA ``device`` the GPU's), checked before the
    database is migrated."""
    from worker.bootstrap import first_model_memory_problem

    if not _trains_first_version(settings, store):
        return True
    problem = first_model_memory_problem(settings, device)
    if problem:
        print(f"unlearnd: {problem}; nothing was migrated or trained", file=sys.stderr)
        return False
    return True


def _warn_unknown_variables() -> None:
    from worker.settings import unknown_variables

    for warning in unknown_variables():
        logging.getLogger("unlearnd").warning(warning)


def _method_settings_ok(settings) -> bool:
    """Print what is wrong with the configured method (every job would fail on it)."""
    from worker.calibration import method_settings_problems

    problems = method_settings_problems(settings)
    for problem in problems:
        print(f"unlearnd: {problem}", file=sys.stderr)
    return not problems


def _calibration_ok(settings) -> bool:
    """Print what is wrong with the served model's stored calibration under these settings
    (every calibrated deletion job of the model would fail on it)."""
    from model_store import store_for
    from worker.calibration import calibration_settings_problems

    if not Path(settings.store_dir).is_dir():
        return True  # a first start: nothing stored yet
    problems = calibration_settings_problems(settings, store_for(settings.store_dir))
    for problem in problems:
        print(f"unlearnd: {problem}", file=sys.stderr)
    return not problems


def cmd_serve(args) -> int:
    """Migrate the database, make sure the model has a first version, serve the API."""
    import uvicorn

    from model_store import store_for
    from unlearning.model import ImageSizeError
    from worker.bootstrap import FirstModelDiverged, FirstModelTooLarge, SharedDataConflict, ensure_model
    from worker.migrate import upgrade_database
    from worker.settings import get_settings

    settings = get_settings()
    _warn_unknown_variables()
    if not _method_settings_ok(settings):
        return 2
    host = settings.host if args.host is None else args.host
    port = settings.port if args.port is None else args.port
    if not _host_ok(host, port, "UNLEARND_HOST" if args.host is None else "--host"):
        return 2
    if settings.certificate_key_file:
        from worker.signing import SigningKeyError, load_signer

        try:
            load_signer(settings.certificate_key_file)
        except SigningKeyError as exc:
            print(f"unlearnd: UNLEARND_CERTIFICATE_KEY_FILE: {exc}", file=sys.stderr)
            return 2
    if not settings.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("unlearnd").warning(
            "serving on %s without API keys: whoever reaches the port can submit deletions and roll back "
            "models; set UNLEARND_API_KEYS (`unlearnd api-key --help`)", host)
    from model_store import StoreError

    if not settings.background and not settings.broker_url:
        print("unlearnd serve: UNLEARND_BACKGROUND=false and no UNLEARND_BROKER_URL: nothing would run jobs "
              "(requests would be accepted and stay queued). Set a broker for `unlearnd worker`, or leave "
              "UNLEARND_BACKGROUND on to run them in this process.", file=sys.stderr)
        return 2
    if not settings.background:  # this process relays nothing: requests stay queued without both
        logging.getLogger("unlearnd").warning(
            "UNLEARND_BACKGROUND=false: this process runs neither the outbox relay nor the sweeper; requests stay "
            "queued unless a worker (`unlearnd worker`) and one beat process (`celery -A worker.celery_app beat "
            "-s var/celerybeat-schedule`) run with the same settings")
    if not _database_file_ok(settings) or not _store_dir_ok(settings) or not _calibration_ok(settings):
        return 2
    store = store_for(settings.store_dir)
    device = _serving_device(settings, store)
    if device is False or not _first_model_fits(settings, store, device):
        return 2
    upgrade_database(settings.database_url)
    try:
        version = ensure_model(settings, store, progress=_bars(args))
    except (StoreError, SharedDataConflict) as exc:  # a stored version 1 purged, damaged or altered, or another
        print(f"unlearnd: {exc}", file=sys.stderr)  # model's data split otherwise, a store without the serving
        return 2  # version: nothing registered
    except (FirstModelTooLarge, FirstModelDiverged) as exc:  # the check above, should the store have changed
        print(f"unlearnd: {exc}", file=sys.stderr)  # meanwhile; a training that left non-finite weights
        return 2
    except ImageSizeError as exc:  # the first model's settings: nothing trained
        print(f"unlearnd: UNLEARND_IMAGE_HEIGHT, UNLEARND_IMAGE_WIDTH, UNLEARND_MODEL_WIDTH: {exc}; nothing was "
              "trained", file=sys.stderr)
        return 2
    logging.getLogger("unlearnd").info(
        "model %s serving version %s; API on http://%s:%s (docs at /docs)", settings.model_name, version, host, port
    )
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    return 0


def celery_args(extra: list[str]) -> list[str]:
    """The arguments after ``--`` of ``unlearnd worker -- --pool solo``: argparse keeps the
    ``--`` in them, and Celery read it as the end of its options (``--pool solo`` then failed
    as "extra configuration": not enough values to unpack)."""
    extra = list(extra)
    return extra[1:] if extra[:1] == ["--"] else extra


def cmd_worker(args) -> int:
    """Run a Celery worker (needs UNLEARND_BROKER_URL). It runs no beat: where the API runs with
    UNLEARND_BACKGROUND=false, one `celery -A worker.celery_app beat -s var/celerybeat-schedule`
    must run too (it schedules the outbox relay and the sweeper as tasks)."""
    from worker.settings import get_settings

    settings = get_settings()
    _warn_unknown_variables()
    if not _method_settings_ok(settings):
        return 2
    if not settings.broker_url:
        print("unlearnd worker needs a broker: set UNLEARND_BROKER_URL (e.g. redis://127.0.0.1:6379/0).\n"
              "Without one, `unlearnd serve` runs jobs in-process.", file=sys.stderr)
        return 2
    if not _worker_device_ok(settings) or not _store_dir_ok(settings) or not _calibration_ok(settings):
        return 2
    from worker.celery_app import app

    import click

    argv = ["worker", "--loglevel", args.loglevel, "--prefetch-multiplier", "1", "--concurrency", str(args.concurrency)]
    try:
        code = run_celery(app, argv + celery_args(args.celery_args))
    except click.ClickException as exc:  # a Celery option after -- that Celery refuses
        print(f"unlearnd worker: {exc.format_message()}", file=sys.stderr)
        return 2
    return code


def run_celery(app, argv: list[str]) -> int:
    """Run the ``celery`` command on ``app`` with ``argv`` and return its exit status.
    ``app.worker_main`` and ``app.start`` drop it (click, not standalone, returns the status
    of the worker's ``ctx.exit`` instead of raising it, and they discard what it returns):
    a worker that stopped on an unrecoverable error (a result backend it cannot load, say)
    exited 0, and a supervisor restarting on failure saw a clean stop."""
    from celery.bin.celery import celery

    celery.params[0].default = app  # what app.start does: the --app option's default
    try:
        code = celery.main(args=argv, standalone_mode=False)
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def cmd_migrate(args) -> int:
    """Migrate the database at UNLEARND_DATABASE_URL to the newest schema."""
    from worker.migrate import upgrade_database
    from worker.settings import get_settings

    if not _database_file_ok(get_settings()):
        return 2
    head = upgrade_database(get_settings().database_url)
    print(f"database at revision {head}")
    return 0


def _record_migrated(settings, missing: str) -> bool:
    """Whether UNLEARND_DATABASE_URL names a database at this code's schema, for the commands
    that read the record without migrating it (``purge``, ``calibrate``); printing why not,
    ``missing`` saying what a SQLite file that does not exist means to the command.
    Connecting to a SQLite file that does not exist would create an empty one, and an empty
    or unmigrated record holds no erasures to go by. An unreachable database raises (the
    connection's error; :func:`main` says it in one line)."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url

    from worker.db import engine_for
    from worker.migrate import alembic_config, current_revision, head_revision, is_up_to_date

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).exists():  # connecting would create an empty file
        print(f"unlearnd: no database at {url.database} (UNLEARND_DATABASE_URL): {missing}", file=sys.stderr)
        return False
    with engine_for(settings.database_url).connect() as connection:
        if not is_up_to_date(connection):
            at, head = current_revision(connection), head_revision()
            known = at is None or at in {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
            print(f"unlearnd: the database is at revision {at or '(none)'}, the code's schema is {head}: "
                  + ("run `unlearnd migrate` first" if known else
                     "a revision this code does not know (was it migrated by a newer release of unlearnd?)"),
                  file=sys.stderr)
            return False
    return True


def cmd_calibrate(args) -> int:
    """Compute and store the served model's shadow calibration now: what
    UNLEARND_CALIBRATE_SHADOWS otherwise makes the model's first job do, inside that
    job's time limit ((1 + tasks) x shadow_folds trainings of the first version's recipe,
    4 folds by default). It reads the service's record (UNLEARND_DATABASE_URL, migrated):
    no shadow trains on a cell erased there or in any stored version's manifest."""
    from model_store import store_for
    from unlearning.train import resolve_device
    from worker.calibration import calibrates, lineage_calibration
    from worker.settings import get_settings

    settings = get_settings().model_copy(update={"calibrate_shadows": True})
    if not _method_settings_ok(settings):
        return 2
    store = store_for(settings.store_dir)
    if settings.method != "interference_aware":
        print(f"unlearnd: method {settings.method!r} takes no calibration", file=sys.stderr)
        return 2
    if not calibrates(settings):  # interference_aware, calibration on: fixed levels are what is left
        print("unlearnd: UNLEARND_METHOD_CONFIG sets a fixed level per task ('tau'): jobs read no calibration", file=sys.stderr)
        return 2
    # the record names the erased cells the shadows must not train on: a mistyped URL would
    # create an empty SQLite file, which names none
    if not _record_migrated(settings, "it records which cells were erased, and the shadows must not train on them"):
        return 2
    try:
        stored = store.calibration(settings.model_name)
    except RuntimeError as exc:  # a calibration file that is a link, or damaged (StoreError)
        print(f"unlearnd: {exc}", file=sys.stderr)
        return 2
    # a stored calibration stays in use after v1's weights were purged: only computing one needs them
    if stored is None and not store.exists(settings.model_name, 1):
        if not store.purged(settings.model_name, 1):
            print(f"unlearnd: no version 1 of {settings.model_name!r} in {settings.store_dir}: "
                  "`unlearnd serve` trains it on first start", file=sys.stderr)
            return 2
        from worker.versions import weights_gone_missing

        missing = weights_gone_missing(settings, settings.model_name, 1)  # purged, or (the record says) lost
        if missing is not None:
            print(f"unlearnd: {missing}", file=sys.stderr)
        else:
            print(f"unlearnd: version 1 of {settings.model_name!r} was purged (its weights held erased data): the "
                  "calibration is computed from them; jobs take the fixed quantile", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    try:
        device = resolve_device(settings.device)
        with tqdm(total=100, desc="shadow models", unit="%", leave=False, disable=not _bars(args)) as bar:
            calibration = lineage_calibration(settings, store, settings.model_name, device,
                                              progress=lambda f: bar.update(max(0, round(100 * f) - bar.n)))
    except (RuntimeError, ValueError) as exc:  # no CUDA; a stored calibration of other weights, or damaged
        print(f"unlearnd: {exc}", file=sys.stderr)
        return 2
    done = "already stored" if stored is not None else "stored"
    print(f"{settings.model_name}: calibration of v{calibration['version']} with {calibration['shadows']} shadow models "
          f"({calibration['seconds']} s) {done} in {settings.store_dir}")
    return 0


def cmd_purge(args) -> int:
    """Delete from the model store the weights that still hold erased data: every version
    but the serving one, a queued or running job's base and those that hold none, and
    the artifacts no version points at. The versions' records stay, with purged_at and a
    model.version_purged audit event. Run it from cron with --older-than-days to keep a
    window for rollbacks that re-apply erasures, and --all-models: an erasure through one
    model is erased data for every model trained on the dataset. Exit 0; 2 for an unknown
    model, a database that is not reachable or not migrated, or a store that does not
    hold the versions the record names (nothing is purged then)."""
    from datetime import timedelta

    from model_store import StoreError, store_for
    from worker.db import transaction
    from worker.errors import ServiceError
    from worker.settings import get_settings
    from worker.tables import Model, utcnow
    from worker.versions import purge_versions, redact_calibration

    settings = get_settings()
    if not _record_migrated(settings, "nothing to purge"):
        return 2
    before = None if args.older_than_days is None else utcnow() - timedelta(days=args.older_than_days)
    if args.all_models:
        from sqlalchemy import select

        with transaction(settings.database_url) as session:
            names = list(session.execute(select(Model.name).order_by(Model.name)).scalars())
    else:
        names = [settings.model_name if args.model is None else args.model]
    store = store_for(settings.store_dir)
    verb = "would purge" if args.dry_run else "purged"
    actor = _cli_actor()
    refused = 0
    for model_name in names:
        try:
            with transaction(settings.database_url) as session:  # one model a transaction
                # the calibration first, as the API's purge (app/routes/models.py)
                scores = redact_calibration(session, store, model_name, dry_run=args.dry_run, actor=actor)
                found = purge_versions(session, store, model_name, created_before=before, dry_run=args.dry_run,
                                       actor=actor)
        except (ServiceError, StoreError, OSError) as exc:  # an unknown model, a store that is not the
            # service's or cannot delete a file
            print(f"unlearnd: {exc}" if isinstance(exc, ServiceError) else f"unlearnd: {model_name}: {exc}",
                  file=sys.stderr)
            refused += 1
            continue
        for c in found:
            if c.damaged:
                print(f"{model_name} v{c.version} (an artifact no version points at): {verb} whole, its manifest "
                      f"cannot be read ({c.damaged})")
                continue
            held = sum(len(e["tasks"]) for e in c.erasures)
            what = "" if c.published else " (an artifact no version points at)"
            print(f"{model_name} v{c.version}{what}: {verb} (sha256 {c.sha256[:12]}…, held {held} erased "
                  f"cell(s) of {len(c.erasures)} request(s))")
        if scores:
            print(f"{model_name}: calibration: {scores} score(s) of erased cells {verb.replace('purge', 'remove')}")
        print(f"{model_name}: {len(found)} version(s) {verb}")
    return 2 if refused else 0


def _bars(args) -> bool:
    """Whether to draw progress bars: not with --no-progress, nor when stderr is not a terminal
    (a container's log kept every redraw of the bar on one ever-longer line)."""
    return not args.no_progress and sys.stderr.isatty()


def _cli_actor() -> str:
    """Who ran the command, for the audit events it writes: ``cli:<login>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (a container's uid without a passwd entry)
        return "cli"


def _whole(low: int, high: int | None, what: str):
    """An argparse type: an integer in [``low``, ``high``] (no upper bound for None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} is a number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what} is between {low} and {high}, got {value}" if high is not None
                                             else f"at least {low}, got {value}")
        return value

    return parse


_port = _whole(1, 65535, "a port")
_positive = _whole(1, None, "a count")


def _host(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the bind address is empty")
    return text


def _model_name(text: str) -> str:
    from worker.settings import MODEL_NAME_PATTERN

    if not re.fullmatch(MODEL_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a model name: {text!r} (letters, digits and ._-)")
    return text


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # argparse said "invalid _days value", naming this function
        raise argparse.ArgumentTypeError(f"days is a number, got {text!r}") from None
    if not 0 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"days must be between 0 and 36500, got {text}")
    return value


def cmd_api_key(args) -> int:
    """Make an API key: a random token, printed once, and the UNLEARND_API_KEYS entry that
    holds its sha256 (the service never stores the token). Give the token to the client;
    add the entry to UNLEARND_API_KEYS of the API process and restart it."""
    import json

    from pydantic import TypeAdapter, ValidationError

    from app.auth import new_token, token_sha256
    from worker.settings import ApiKey, KeyName, get_settings

    try:
        TypeAdapter(KeyName).validate_python(args.name)
    except ValidationError:
        print(f"unlearnd: invalid key name {args.name!r}: 1-64 letters, digits and _.@- , "
              "starting with a letter or digit", file=sys.stderr)
        return 2
    token = new_token()
    entry = {args.name: ApiKey(token_sha256=token_sha256(token), scopes=list(dict.fromkeys(args.scope)))}
    keys = {**get_settings().api_keys, **entry} if args.merge else entry
    if args.merge and args.name in get_settings().api_keys:
        print(f"unlearnd: replacing the key {args.name!r} of UNLEARND_API_KEYS", file=sys.stderr)
    print(f"token for {args.name!r} (shown once; the client sends Authorization: Bearer <token>):")
    print(f"  {token}")
    print("UNLEARND_API_KEYS, every key:" if args.merge else
          "its entry (UNLEARND_API_KEYS is a JSON object of such entries; --merge prints the whole value):")
    print("  " + json.dumps({n: k.model_dump() for n, k in keys.items()}, separators=(",", ":")))
    return 0


def cmd_certificate_key(args) -> int:
    """Write a new Ed25519 signing key for deletion certificates (PEM, mode 0600) and print
    its public key. Point UNLEARND_CERTIFICATE_KEY_FILE at the file and restart the API:
    certificates then carry a signature anyone can check with the public key
    (GET /certificates/public-key, `unlearnd verify-certificate`)."""
    from worker.signing import generate_key_file

    if not args.out:  # Path("") is ".": "  exists; a signing key is not overwritten"
        print("unlearnd: --out is empty; name the key file to create", file=sys.stderr)
        return 2
    try:
        signer = generate_key_file(args.out)
    except FileExistsError:
        print(f"unlearnd: {args.out} exists; a signing key is not overwritten (certificates signed with it "
              "would no longer verify against a new key)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"unlearnd: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    info = signer.public_key_info()
    print(f"signing key written to {args.out} (keep it secret; back it up)")
    print(f"public key ({info['algorithm']}, key id {info['key_id']}): {info['public_key']}")
    print(f"UNLEARND_CERTIFICATE_KEY_FILE={Path(args.out).resolve()}")
    return 0


def cmd_verify_certificate(args) -> int:
    """Check a deletion certificate (a JSON file, or - for standard input) against the
    service's public key: its certificate_sha256 and its Ed25519 signature. Exit 0 when
    it verifies, 1 when it does not (saying why), 2 for input that is not a certificate
    (unreadable, not JSON, an object with neither certificate_sha256 nor signature, an
    error answer of the API saved in its place) or a
    --public-key that is not an Ed25519 public key."""
    import json

    from unlearning.jsonio import no_repeated_names
    from worker.signing import public_key_from_base64, verify_certificate

    import math

    def strict(constant: str):
        raise ValueError(f"{constant} is not JSON (a certificate is strict JSON)")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999: a number no double holds
            raise ValueError(f"{text} is out of range (a certificate is strict JSON)")
        return value

    try:
        # bytes: JSON is UTF-8 (RFC 8259), which json.loads detects; the locale's encoding (cp1252,
        # ASCII) misread a certificate whose subject_ref is not ASCII, and it failed to verify
        text = sys.stdin.buffer.read() if args.certificate == "-" else Path(args.certificate).read_bytes()
        certificate = json.loads(text, parse_constant=strict, parse_float=finite, object_pairs_hook=no_repeated_names)
    except (OSError, ValueError) as exc:
        print(f"unlearnd: cannot read a certificate from {args.certificate}: {exc}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"unlearnd: cannot read a certificate from {args.certificate}: JSON nested too deep", file=sys.stderr)
        return 2
    if not isinstance(certificate, dict):
        print(f"unlearnd: {args.certificate} is not a certificate (a JSON object)", file=sys.stderr)
        return 2
    if "certificate_sha256" not in certificate and {"type", "title", "status"} <= set(certificate):
        # what the API answered instead (a problem document), saved by a curl without its key, say
        print(f"unlearnd: {args.certificate} is not a certificate but an error answer of the API: "
              f"{certificate.get('status')} {certificate.get('title')}: {certificate.get('detail', '')}",
              file=sys.stderr)
        return 2
    if not {"certificate_sha256", "signature"} & set(certificate):
        # neither field a certificate is checked by: another JSON object (`{}`, a job's answer), input
        # that is not a certificate (2), not one that fails to verify (1)
        print(f"unlearnd: {args.certificate} is not a certificate: it has no certificate_sha256 nor "
              "signature (GET /deletions/{id}/certificate answers one)", file=sys.stderr)
        return 2
    try:  # a malformed key is bad input (2), not a certificate that does not verify (1)
        public_key_from_base64(args.public_key)
    except ValueError as exc:
        print(f"unlearnd: --public-key is not an Ed25519 public key: {exc}; give the base64 public key "
              "GET /certificates/public-key answers", file=sys.stderr)
        return 2
    problem = verify_certificate(certificate, args.public_key)
    if problem:
        print(f"NOT verified: {problem}")
        return 1
    print(f"verified: request {certificate.get('request_id')}, {certificate.get('model')} "
          f"v{certificate.get('version_before')} -> v{certificate.get('version_after')}, "
          f"signed by key {certificate['signature']['key_id']}")
    return 0


def cmd_train(args) -> int:
    from unlearning.train import main as train_main

    return train_main(list(args.rest), prog="unlearnd train") or 0


def cmd_unlearn(args) -> int:
    from unlearning.unlearn import main as unlearn_main

    return unlearn_main(list(args.rest), prog="unlearnd unlearn") or 0


def cmd_bench(args) -> int:
    try:
        from unlearning.bench import main as bench_main
    except ImportError as exc:
        print(f"unlearnd: the benchmark is not available: {exc}", file=sys.stderr)
        return 2
    return bench_main(list(args.rest), prog="unlearnd bench") or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearnd",
        description="Deletion requests for multi-task vision models: interference-aware unlearning behind a "
        "compliance API. Configure with UNLEARND_* environment variables.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="migrate, train the first model if needed, serve the API",
                       description=cmd_serve.__doc__)
    p.add_argument("--host", type=_host, help="bind address (default: UNLEARND_HOST or 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port, 1-65535 (default: UNLEARND_PORT or 8000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while training the first model "
                   "(one is drawn only when stderr is a terminal; the log says when training starts and ends)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker (needs UNLEARND_BROKER_URL)",
                       description=cmd_worker.__doc__ + " Arguments after -- go to Celery.")
    p.add_argument("--loglevel", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error", "critical", "fatal"])
    p.add_argument("--concurrency", type=_positive, default=1, help="jobs at once (default 1: one GPU, one job)")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra celery worker arguments")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="migrate the database to the newest schema", description=cmd_migrate.__doc__)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("calibrate", help="compute and store the model's shadow calibration now",
                       description=cmd_calibrate.__doc__)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the shadow models train "
                   "(one is drawn only when stderr is a terminal)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("api-key", help="make an API key (a token and its UNLEARND_API_KEYS entry)",
                       description=cmd_api_key.__doc__)
    p.add_argument("name", help="the key's name, written into the audit log as the actor (letters, digits, _.@-)")
    p.add_argument("--scope", action="append", required=True, choices=["deletions", "read", "admin"],
                   help="deletions: submit and read deletion requests; read: models, jobs, audit log; "
                   "admin: everything, rollback included (repeat for several)")
    p.add_argument("--merge", action="store_true",
                   help="print the whole UNLEARND_API_KEYS: the current environment's keys plus this one")
    p.set_defaults(func=cmd_api_key)

    p = sub.add_parser("certificate-key", help="write a signing key for deletion certificates",
                       description=cmd_certificate_key.__doc__)
    p.add_argument("--out", required=True, help="the key file to create (PEM; not overwritten)")
    p.set_defaults(func=cmd_certificate_key)

    p = sub.add_parser("verify-certificate", help="check a certificate's sha256 and signature",
                       description=cmd_verify_certificate.__doc__)
    p.add_argument("certificate", help="the certificate's JSON file, or - for standard input")
    p.add_argument("--public-key", required=True, help="the service's public key (base64, as "
                   "GET /certificates/public-key gives it)")
    p.set_defaults(func=cmd_verify_certificate)

    p = sub.add_parser("purge", help="delete the weights of versions that still hold erased data",
                       description=cmd_purge.__doc__)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", type=_model_name, help="the model (default: UNLEARND_MODEL_NAME)")
    which.add_argument("--all-models", action="store_true", help="every registered model, one after the other")
    p.add_argument("--older-than-days", type=_days, metavar="DAYS",
                   help="only versions created more than DAYS days ago (default: every such version)")
    p.add_argument("--dry-run", action="store_true", help="list what would be purged, delete nothing")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("train", help="train a model (python -m unlearning.train)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("unlearn", help="erase cells from a checkpoint into a new one, without the service "
                       "(python -m unlearning.unlearn)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("bench", help="run the unlearning benchmark (unlearning.bench)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    delegates = {"train": cmd_train, "unlearn": cmd_unlearn, "bench": cmd_bench}
    if argv and argv[0] in delegates:  # everything after the command belongs to the delegate
        args = argparse.Namespace(func=delegates[argv[0]], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # no command: usage on stderr, exit 2 as argparse's other usage errors
        parser.print_help(sys.stderr)
        return 2
    _logging()
    from alembic.util.exc import CommandError
    from pydantic import ValidationError
    from pydantic_settings import SettingsError
    from sqlalchemy.exc import DatabaseError

    from worker.settings import InvalidSettings

    try:
        return args.func(args)
    except DatabaseError as exc:  # OperationalError, and SQLite's "file is not a database"
        if args.func not in (cmd_serve, cmd_migrate, cmd_calibrate, cmd_purge) or not _refused_connection(exc):
            raise
        from worker.settings import get_settings

        print(_database_unreachable(exc, get_settings().database_url), file=sys.stderr)
        return 2
    except (ValidationError, InvalidSettings) as exc:
        if isinstance(exc, ValidationError) and exc.title != "Settings":
            raise
        # an UNLEARND_* variable the settings refuse: name it, without a traceback (nor its value:
        # a database URL holds a password)
        from worker.settings import describe_invalid

        print(f"unlearnd: {exc if isinstance(exc, InvalidSettings) else describe_invalid(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a value that is not JSON where JSON is read (UNLEARND_METHOD_CONFIG)
        print(f"unlearnd: invalid configuration (UNLEARND_* environment variables or .env): {exc}"
              f"{f' ({exc.__cause__})' if exc.__cause__ else ''}", file=sys.stderr)
        return 2
    except CommandError as exc:  # alembic: a revision this code does not know
        if args.func not in (cmd_serve, cmd_migrate):
            raise
        print(f"unlearnd: cannot migrate the database: {exc} (was it migrated by a newer release of unlearnd?)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unlearnd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
