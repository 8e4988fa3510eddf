"""deletion_requests.submitted_by: the API key that submitted a request ('' when the API
has no keys), and Idempotency-Key unique per submitter instead of across every caller:
two clients that both send "ticket-4711" no longer get each other's request back.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

NEW = "uq_deletion_requests_submitter_idempotency_key"
#: the names the databases gave 0001's unnamed UNIQUE (idempotency_key): PostgreSQL's own,
#: and the one the naming convention below gives SQLite's (which keeps no name)
PG_OLD = "deletion_requests_idempotency_key_key"
SQLITE_OLD = "uq_deletion_requests_idempotency_key"
CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _column() -> sa.Column:
    return sa.Column("submitted_by", sa.String(length=64), nullable=False, server_default="")


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":  # a table rebuild
        with op.batch_alter_table("deletion_requests", naming_convention=CONVENTION) as batch:
            batch.add_column(_column())
            batch.drop_constraint(SQLITE_OLD, type_="unique")
            batch.create_unique_constraint(NEW, ["submitted_by", "idempotency_key"])
    else:
        op.add_column("deletion_requests", _column())
        op.drop_constraint(PG_OLD, "deletion_requests", type_="unique")
        op.create_unique_constraint(NEW, "deletion_requests", ["submitted_by", "idempotency_key"])


def downgrade() -> None:
    # fails while two submitters hold the same key: which request keeps it is not ours to choose
    if op.get_context().dialect.name == "sqlite":
        with op.batch_alter_table("deletion_requests") as batch:
            batch.drop_constraint(NEW, type_="unique")
            batch.create_unique_constraint(SQLITE_OLD, ["idempotency_key"])
            batch.drop_column("submitted_by")
    else:
        op.drop_constraint(NEW, "deletion_requests", type_="unique")
        op.create_unique_constraint(PG_OLD, "deletion_requests", ["idempotency_key"])
        op.drop_column("deletion_requests", "submitted_by")
