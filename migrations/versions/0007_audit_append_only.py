"""The audit log append-only in the database too: triggers refuse UPDATE, DELETE (and,
on PostgreSQL, TRUNCATE) of audit_events, deleting or truncating the chain head, and a
head that moves back. The service never does any of these; the triggers stop a
mistaken script or a role that is not the owner. The owner or a superuser can still
switch them off (``session_replication_role = replica``, ``DROP TRIGGER``), which is
why ``GET /audit/verify`` also takes an anchor kept outside the database.

A later migration that rebuilds either table on SQLite (a batch operation) drops
its triggers and must create them again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

from migrations.guard import refuse_losing

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# no percent signs and no colon before a name (a bind parameter to text()), so the SQL passes
# through any driver and `alembic upgrade --sql` unchanged
PG_FUNCTION = """
CREATE FUNCTION unlearnd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'audit_chain_head' AND TG_OP = 'UPDATE' THEN
        IF NEW.seq > OLD.seq THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
            MESSAGE = 'the audit chain head only moves forward (seq ' || OLD.seq || ' to ' || NEW.seq || ')';
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
        MESSAGE = 'the audit log is append-only: ' || TG_OP || ' on ' || TG_TABLE_NAME || ' refused';
END
$$
"""
PG_TRIGGERS = [
    ("audit_events_append_only", "audit_events", "BEFORE UPDATE OR DELETE", "ROW"),
    ("audit_events_no_truncate", "audit_events", "BEFORE TRUNCATE", "STATEMENT"),
    ("audit_chain_head_forward", "audit_chain_head", "BEFORE UPDATE OR DELETE", "ROW"),
    ("audit_chain_head_no_truncate", "audit_chain_head", "BEFORE TRUNCATE", "STATEMENT"),
]
SQLITE_TRIGGERS = [
    ("audit_events_no_update", "BEFORE UPDATE ON audit_events", "",
     "the audit log is append-only: UPDATE on audit_events refused"),
    ("audit_events_no_delete", "BEFORE DELETE ON audit_events", "",
     "the audit log is append-only: DELETE on audit_events refused"),
    ("audit_chain_head_no_delete", "BEFORE DELETE ON audit_chain_head", "",
     "the audit log is append-only: DELETE on audit_chain_head refused"),
    ("audit_chain_head_forward", "BEFORE UPDATE ON audit_chain_head", "WHEN NEW.seq <= OLD.seq",
     "the audit chain head only moves forward"),
]


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for name, table, when, level in PG_TRIGGERS:
            op.execute(f"CREATE TRIGGER {name} {when} ON {table} FOR EACH {level} "
                       "EXECUTE FUNCTION unlearnd_audit_append_only()")
    elif op.get_context().dialect.name == "sqlite":
        for name, on, condition, message in SQLITE_TRIGGERS:
            op.execute(f"CREATE TRIGGER {name} {on} {condition} BEGIN SELECT RAISE(ABORT, '{message}'); END")


def downgrade() -> None:
    refuse_losing("0007")
    if op.get_context().dialect.name == "postgresql":
        for name, table, _, _ in PG_TRIGGERS:
            op.execute(f"DROP TRIGGER {name} ON {table}")
        op.execute("DROP FUNCTION unlearnd_audit_append_only()")
    elif op.get_context().dialect.name == "sqlite":
        for name, _, _, _ in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
