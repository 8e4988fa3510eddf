"""PostgreSQL: the audit chain head keeps its id. 0007's trigger let an UPDATE move the
head to another id as long as its seq grew (``UPDATE audit_chain_head SET id = 2, seq =
seq + 1``): the log no longer verified (no head at id 1) and every later append failed on
a duplicate event key, so the service could write nothing more. SQLite refuses this since
0010 (``audit_chain_head_keep_id``). The trigger function is replaced; the triggers that
call it stay.

Downgrade restores 0007's function; on a record that holds events it refuses (as past 0007
and 0010) unless given ``-x allow_record_loss=1`` (``migrations/guard.py``).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

from migrations.guard import refuse_losing

revision: str = "0012"
down_revision: Union[str, Sequence[str], None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# as 0007's: no percent signs and no colon before a name, so the SQL passes through any
# driver and `alembic upgrade --sql` unchanged
FUNCTION = """
CREATE OR REPLACE FUNCTION unlearnd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'audit_chain_head' AND TG_OP = 'UPDATE' THEN{keep_id}
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
KEEP_ID = """
        IF NEW.id IS DISTINCT FROM OLD.id THEN
            RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation',
                MESSAGE = 'the audit log is append-only: the id of a chain head does not change';
        END IF;"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(FUNCTION.format(keep_id=KEEP_ID))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        refuse_losing("0012")
        op.execute(FUNCTION.format(keep_id=""))
