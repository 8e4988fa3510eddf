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
from alembic import context, op

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


def _table_at(revision: str) -> sa.Table:
    """deletion_requests as 0001 created it (0002-0005 left it alone), or at ``"0006"`` as this
    migration leaves it, for `alembic upgrade --sql` and `downgrade --sql` on SQLite: a batch
    rebuild reflects the table, which offline it cannot."""
    later = [_column(), sa.UniqueConstraint("submitted_by", "idempotency_key", name=NEW)] if revision == "0006" \
        else [sa.UniqueConstraint("idempotency_key")]
    return sa.Table(
        "deletion_requests", sa.MetaData(naming_convention=CONVENTION),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("instance_id", sa.String(length=200), nullable=False),
        sa.Column("tasks", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("subject_ref", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("base_version", sa.Integer(), nullable=True),
        sa.Column("produced_version", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["model_name"], ["models.name"]),
        sa.PrimaryKeyConstraint("id"),
        *later,
        *(sa.Index(f"ix_deletion_requests_{c}", c) for c in
          ("created_at", "instance_id", "job_id", "model_name", "status")),
    )


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":  # a table rebuild
        offline = {"copy_from": _table_at("0005")} if context.is_offline_mode() else {}
        with op.batch_alter_table("deletion_requests", naming_convention=CONVENTION, **offline) as batch:
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
        offline = {"copy_from": _table_at("0006")} if context.is_offline_mode() else {}
        with op.batch_alter_table("deletion_requests", naming_convention=CONVENTION, **offline) as batch:
            batch.drop_constraint(NEW, type_="unique")
            batch.create_unique_constraint(SQLITE_OLD, ["idempotency_key"])
            batch.drop_column("submitted_by")
    else:
        op.drop_constraint(NEW, "deletion_requests", type_="unique")
        op.create_unique_constraint(PG_OLD, "deletion_requests", ["idempotency_key"])
        op.drop_column("deletion_requests", "submitted_by")
