"""Downgrades that would drop compliance data, or the protection of the audit log, refuse
while the record holds something they would lose, unless the operator says so.

A downgrade past 0007 (or 0010 on SQLite) drops the triggers that keep the audit log
append-only; one past 0002 drops the chain head, and the next upgrade anchors the head at
whatever event is then last, so events cut from the end in between are never noticed;
one past 0001 drops every table. With events (or requests, tombstones, versions) in the
record, each refuses with a :class:`~alembic.util.CommandError` naming what it holds,
before it changes anything:

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

log = logging.getLogger("migrations.guard")


def allowed() -> bool:
    """Whether the operator asked for the downgrade to go on whatever the record holds."""
    given = context.get_x_argument(as_dictionary=True).get(FLAG)
    if given is None:
        given = context.config.attributes.get(FLAG)
    return str(given).strip().lower() in {"1", "true", "yes", "on"}


def refuse_losing(revision: str, drops: str, tables: tuple[str, ...]) -> None:
    """In ``revision``'s downgrade, which ``drops`` (in words): refuse unless ``tables`` hold
    no rows or the operator allowed it (:data:`FLAG`)."""
    if context.is_offline_mode():
        op.execute(f"-- {revision} downgrade drops {drops}. Run it only on a record whose "
                   f"{', '.join(tables)} hold no rows, or knowing what is lost")
        return
    connection = op.get_bind()
    held = {}
    for table in tables:
        count = connection.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar()
        if count:
            held[table] = count
    if not held:
        return
    holds = ", ".join(f"{n} row(s) in {t}" for t, n in held.items())
    if allowed():
        log.warning("%s downgrade drops %s; the record holds %s (%s=1 given)", revision, drops, holds, FLAG)
        return
    raise CommandError(
        f"the downgrade of {revision} drops {drops}, and the record holds {holds}. Nothing was changed "
        f"by this step. To go on, knowing that, run it again with `alembic -x {FLAG}=1 downgrade ...`")
