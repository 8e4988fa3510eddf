"""Run the Alembic migrations programmatically (``unlearnd migrate``, ``serve`` at
start-up, tests) and tell whether a database is at the head revision (``/readyz``)."""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for ``migrations/`` without reading alembic.ini (no
    logging reconfiguration, no '%' interpolation of the URL)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.attributes["url"] = url
    return cfg


@lru_cache
def head_revision() -> str:
    """The head revision of ``migrations/``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_database(url: str, revision: str = "head") -> str:
    """Migrate the database at ``url`` to ``revision`` (default: head); returns the head revision."""
    from .db import engine_for

    engine = engine_for(url)
    cfg = alembic_config(url)
    try:
        command.upgrade(cfg, revision)
        with engine.connect() as conn:
            after = current_revision(conn)
    finally:
        engine.dispose()
    # read by migrations/env.py under the migration lock: another process's upgrade that this
    # one waited for is not reported as this one's
    before = cfg.attributes.get("revision_before")
    if after == before:
        log.info("database at revision %s (up to date)", after)
    else:
        log.info("database migrated from revision %s to %s", before or "(empty)", after)
    return head_revision()


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database (None when never migrated). Read directly,
    not through a MigrationContext, which logs on every call (``/readyz`` is polled)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def is_up_to_date(connection: Connection) -> bool:
    """True when the database is at the head revision of ``migrations/``."""
    return current_revision(connection) == head_revision()
