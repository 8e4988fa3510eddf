"""Alembic environment for the compliance record.

The URL is, in order: ``config.attributes["url"]`` (set by
``worker.migrate.upgrade_database``), the config's ``sqlalchemy.url``, or
``Settings().database_url``. On PostgreSQL an advisory lock serialises
concurrent upgrades (the API and a worker may both migrate at start-up), on
a SQLite file a lock on ``<file>.migrate-lock``; SQLite gets batch mode so
later ALTERs work there too.
"""
from __future__ import annotations

from contextlib import contextmanager

from alembic import context
from sqlalchemy import text

from worker.db import make_engine
from worker.tables import Base

config = context.config
target_metadata = Base.metadata

# Any constant: the key of the advisory lock that serialises upgrades.
MIGRATION_LOCK_KEY = 727_001
# the first 16 bytes of every SQLite database file (an empty file is a new database)
SQLITE_HEADER = b"SQLite format 3\x00"


def database_url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from worker.settings import get_settings

    return get_settings().database_url


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def _sqlite_file_lock(engine):
    """On a SQLite file, an exclusive lock on ``<file>.migrate-lock`` for the whole upgrade:
    alembic runs each step in a transaction of its own there, so the write lock is released
    between steps, and a second process that read the old revision replayed steps the
    first one had run ("table audit_chain_head already exists"). PostgreSQL takes an
    advisory lock instead (below)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    _refuse_what_is_not_sqlite(path)
    import fcntl

    with open(f"{path}.migrate-lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _refuse_what_is_not_sqlite(path: str) -> None:
    """Raise what SQLite says of a file that is not a database ("file is not a database"),
    read from its header before the lock file is made: the migration failed on it only after
    taking the lock, and left ``<file>.migrate-lock`` beside, say, a ``config.json``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError:  # none yet (migrating creates it), or one SQLite itself reports it cannot open
        return
    if head and head != SQLITE_HEADER:
        import sqlite3

        from sqlalchemy.exc import DatabaseError

        raise DatabaseError(None, None, sqlite3.DatabaseError("file is not a database"))


def _check_downgrade(connection) -> None:
    """A downgrade past a guarded revision refuses before any step runs (migrations/guard.py).
    Alembic's ``downgrade`` command only (a ``stamp`` to an older revision runs no step): its
    step function, asked here as alembic asks it, names the steps (relative targets such as
    ``-3`` included)."""
    from migrations.guard import check_downgrade

    migration = context.get_context()
    steps_of = migration.opts.get("fn")  # alembic.command.downgrade's own (stamp's is do_stamp)
    if getattr(steps_of, "__name__", None) != "downgrade":
        return
    steps = steps_of(migration.get_current_heads(), migration)
    check_downgrade(connection, [step.revision.revision for step in steps])


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller handed us its connection (tests, compare_metadata)
        _configure(connection)
        _check_downgrade(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(database_url())
    try:
        with _sqlite_file_lock(engine), engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                # Session-level lock, held across the migration transaction; released below.
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
                connection.commit()
            try:
                _configure(connection)
                # what this upgrade starts from, read under the lock (upgrade_database logs it:
                # read before, a process that waited logged the other's migration as its own)
                config.attributes["revision_before"] = context.get_context().get_current_revision()
                _check_downgrade(connection)
                with context.begin_transaction():
                    context.run_migrations()
                connection.commit()
            finally:
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                    connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
