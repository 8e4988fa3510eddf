"""Downgrades that would drop compliance data, or the protection of the audit log, refuse
while the record holds something they would lose, unless the operator says so.

A downgrade past 0007 (or 0010 on SQLite, 0012 on PostgreSQL) drops the triggers (or
part of them) that keep the audit log append-only; one past 0002 drops the chain head, and the next upgrade anchors the head at
whatever event is then last, so events cut from the end in between are never noticed;
one past 0001 drops every table. With events (or requests, tombstones, versions) in the
record, such a downgrade refuses with a :class:`~alembic.util.CommandError` naming what
it holds, before any step runs (:func:`check_downgrade`, from ``env.py``: on SQLite each
step commits on its own, and a refusal at the guarded step left the steps above it
applied); each guarded step checks again (:func:`refuse_losing`: a caller that hands
``env.py`` its own connection).

    alembic -x allow_record_loss=1 downgrade <revision>

goes on (logged at WARNING); programmatically, ``config.attributes["allow_record_loss"]
= True``. An offline script (``--sql``) cannot count rows: it carries a comment saying
what the step drops.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

#: the ``-x`` argument (and config attribute) that lets such a downgrade go on
FLAG = "allow_record_loss"

#: revision -> (what its downgrade drops, the tables whose rows it loses or leaves
#: unprotected, the dialects it drops it on: None for every one)
GUARDED: dict[str, tuple[str, tuple[str, ...], frozenset[str] | None]] = {
    "0012": ("the check of the append-only triggers that keeps the audit chain head's id", ("audit_events",),
             frozenset({"postgresql"})),
    "0010": ("the SQLite triggers that keep the audit log append-only against REPLACE", ("audit_events",),
             frozenset({"sqlite"})),
    "0007": ("the triggers that keep the audit log append-only", ("audit_events",), None),
    "0002": ("the audit chain's head (what notices events cut from the end)", ("audit_events",), None),
    "0001": ("every table of the record", ("audit_events", "deletion_requests", "tombstones", "model_versions", "jobs"),
             None),
}

log = logging.getLogger("migrations.guard")


def allowed() -> bool:
    """Whether the operator asked for the downgrade to go on whatever the record holds."""
    given = context.get_x_argument(as_dictionary=True).get(FLAG)
    if given is None:
        given = context.config.attributes.get(FLAG)
    return str(given).strip().lower() in {"1", "true", "yes", "on"}


def _held(connection, tables: tuple[str, ...]) -> dict[str, int]:
    held = {}
    for table in tables:
        count = connection.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar()
        if count:
            held[table] = count
    return held


def _refuse_or_warn(connection, revision: str) -> None:
    drops, tables, dialects = GUARDED[revision]
    if dialects is not None and connection.dialect.name not in dialects:
        return
    held = _held(connection, tables)
    if not held:
        return
    holds = ", ".join(f"{n} row(s) in {t}" for t, n in held.items())
    if allowed():
        log.warning("%s downgrade drops %s; the record holds %s (%s=1 given)", revision, drops, holds, FLAG)
        return
    raise CommandError(
        f"the downgrade of {revision} drops {drops}, and the record holds {holds}. Nothing was changed. "
        f"To go on, knowing that, run it again with `alembic -x {FLAG}=1 downgrade ...`")


def check_downgrade(connection, revisions: list[str]) -> None:
    """Before any step runs (``env.py``): refuse a downgrade whose steps (``revisions``, in the
    order alembic runs them) pass a guarded revision while the record holds what it would
    lose. Nothing when allowed."""
    if allowed():
        return
    for revision in revisions:
        if revision in GUARDED:
            _refuse_or_warn(connection, revision)


def refuse_losing(revision: str) -> None:
    """In ``revision``'s downgrade: refuse unless its :data:`GUARDED` tables hold no rows or
    the operator allowed it (:data:`FLAG`); offline, a comment in the script."""
    drops, tables, dialects = GUARDED[revision]
    if context.is_offline_mode():
        if dialects is None or op.get_context().dialect.name in dialects:
            op.execute(f"-- {revision} downgrade drops {drops}. Run it only on a record whose "
                       f"{', '.join(tables)} hold no rows, or knowing what is lost")
        return
    _refuse_or_warn(op.get_bind(), revision)
