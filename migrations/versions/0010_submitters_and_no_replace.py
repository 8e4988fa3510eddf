"""Two repairs.

deletion_requests.submitted_by, from the audit log: 0006 added the column as '' with no
backfill, although every request submitted with an API key had its key's name written as
``actor`` into the payload of its ``deletion.received`` event. A record upgraded through
0006 (or downgraded past it and upgraded again) had lost who submitted its older requests:
a key with the ``deletions`` scope alone then got a 404 for its own request and
certificate, an empty list, and a 409 instead of the replay of a retry with the same
Idempotency-Key. Upgrade, online: a request whose submitted_by is '' takes the actor of
its (first) ``deletion.received`` event, where that is a non-empty string that fits the
column. A request whose (actor, Idempotency-Key) another request already holds
(``uq_deletion_requests_submitter_idempotency_key``, 0006) keeps '' and is logged, so the
upgrade never fails on it. The audit chain hashes audit_events only, so this moves no
hash. Offline (``--sql``) the step cannot run (the actor is inside a JSON payload, read in
Python): the script carries a comment saying so and how to run the step online; the step
may run again. Downgrade: nothing to undo (the submitters stay; 0006's downgrade drops
the column).

SQLite, the audit log append-only against REPLACE too: ``INSERT OR REPLACE`` (``REPLACE
INTO``) over an existing event or chain head, or an ``UPDATE OR REPLACE`` that moves
another row onto the head's id, deletes the row it conflicts with and fires no DELETE
trigger for it while ``recursive_triggers`` is off: the service's own connections turn
it on (worker/db.py), but it is off by default on every other (the sqlite3 shell, a
script), which rewrote history past 0007's triggers. Triggers now refuse an INSERT of an
event whose seq or hash is already there, an INSERT of a chain head whose id is already
there, and a change of a chain head's id. The service inserts the head row once (the
first event: no row with its id yet), then updates it, and inserts each event with a new
seq and hash: it never meets them. PostgreSQL has no REPLACE (``INSERT ... ON CONFLICT DO
UPDATE`` fires 0007's UPDATE trigger): nothing changes there. Downgrade drops these
triggers. A later migration that rebuilds audit_events or audit_chain_head on SQLite (a
batch operation) drops them and must create them again, as 0007's.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""
from __future__ import annotations

import logging
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import context, op

from migrations.guard import refuse_losing

revision: str = "0010"
down_revision: Union[str, Sequence[str], None] = "0009"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

log = logging.getLogger("migrations.0010")

#: the audit event of a submission (worker.requests.submit_deletion, at this revision)
RECEIVED_EVENT = "deletion.received"
#: deletion_requests.submitted_by's length (0006): a key's name is 1 to 64 characters
SUBMITTER_LENGTH = 64

requests = sa.table("deletion_requests", sa.column("id", sa.String), sa.column("submitted_by", sa.String),
                    sa.column("idempotency_key", sa.String))
events = sa.table("audit_events", sa.column("seq", sa.Integer), sa.column("kind", sa.String),
                  sa.column("request_id", sa.String), sa.column("payload", sa.JSON))

# no single quotes (the message is quoted), no percent signs and no colon before a name
# (a bind parameter to text()): see 0007
SQLITE_TRIGGERS = [
    ("audit_events_no_replace", "BEFORE INSERT ON audit_events",
     "WHEN EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq) "
     "OR EXISTS (SELECT 1 FROM audit_events WHERE hash = NEW.hash)",
     "the audit log is append-only: INSERT over an existing event (REPLACE) on audit_events refused"),
    ("audit_chain_head_no_replace", "BEFORE INSERT ON audit_chain_head",
     "WHEN EXISTS (SELECT 1 FROM audit_chain_head WHERE id = NEW.id)",
     "the audit log is append-only: INSERT over the chain head (REPLACE) on audit_chain_head refused"),
    ("audit_chain_head_keep_id", "BEFORE UPDATE OF id ON audit_chain_head", "WHEN NEW.id IS NOT OLD.id",
     "the audit log is append-only: the id of a chain head does not change"),
]


def _restore_submitters(connection) -> None:
    blank = sa.select(requests.c.id).where(requests.c.submitted_by == "")
    actors: dict[str, str] = {}
    for request_id, payload in connection.execute(
            sa.select(events.c.request_id, events.c.payload)
            .where(events.c.kind == RECEIVED_EVENT, events.c.request_id.in_(blank)).order_by(events.c.seq)):
        actor = payload.get("actor") if isinstance(payload, dict) else None
        if isinstance(actor, str) and actor and len(actor) <= SUBMITTER_LENGTH:
            actors.setdefault(request_id, actor)  # a request has one; the first, should there be more
    if not actors:
        return
    # (submitter, key) pairs held already: unique (0006); a NULL key never collides
    taken = {(by, key) for by, key in connection.execute(sa.select(requests.c.submitted_by, requests.c.idempotency_key)
                                                         .where(requests.c.submitted_by != "",
                                                                requests.c.idempotency_key.is_not(None)))}
    updates, skipped = [], []
    for request_id, key in connection.execute(
            sa.select(requests.c.id, requests.c.idempotency_key).where(requests.c.submitted_by == "")
            .order_by(requests.c.id)):
        actor = actors.get(request_id)
        if actor is None:
            continue
        if key is not None:
            if (actor, key) in taken:
                skipped.append(request_id)
                continue
            taken.add((actor, key))
        updates.append({"request_id": request_id, "actor": actor})
    if updates:
        connection.execute(sa.update(requests).where(requests.c.id == sa.bindparam("request_id"),
                                                     requests.c.submitted_by == "")
                           .values(submitted_by=sa.bindparam("actor")), updates)
    if skipped:
        log.warning("0010: %d deletion request(s) keep no submitter: their submitter already holds their "
                    "Idempotency-Key on another request: %s%s", len(skipped), ", ".join(skipped[:20]),
                    " ..." if len(skipped) > 20 else "")


def upgrade() -> None:
    if context.is_offline_mode():
        op.execute("-- 0010 upgrade. deletion_requests.submitted_by is NOT filled from the actor of the "
                   "deletion.received events by this script (read from their JSON payload in Python). On a record "
                   "that went through 0006 from an earlier revision, fill it online after applying it, with "
                   "`alembic stamp 0009` and `alembic upgrade 0010` (0010 changes no schema; it creates its "
                   "SQLite triggers where they are missing only; stamp the script's last revision again if it "
                   "went further)")
    else:
        _restore_submitters(op.get_bind())
    if op.get_context().dialect.name == "sqlite":
        for name, on, condition, message in SQLITE_TRIGGERS:
            # IF NOT EXISTS: `stamp 0009` + `upgrade 0010` fills the submitters after the offline script
            # (SQLite keeps the statement without it, as 0007's)
            op.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {on} {condition} "
                       f"BEGIN SELECT RAISE(ABORT, '{message}'); END")


def downgrade() -> None:
    # the restored submitters stay
    if op.get_context().dialect.name == "sqlite":
        refuse_losing("0010")
        for name, _, _, _ in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
