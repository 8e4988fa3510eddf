"""The audit chain's head: one row (last seq and hash), written with every event, so
concurrent appends serialise on it and ``verify`` notices events cut from the end.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_losing

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table("audit_chain_head",
    sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("hash", sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    # an existing log: its last event becomes the head (one statement, so `alembic upgrade --sql`
    # can write it out too)
    op.execute("INSERT INTO audit_chain_head (id, seq, hash) "
               "SELECT 1, seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")


def downgrade() -> None:
    # upgraded again, the head is anchored at whatever event is last then: a cut goes unnoticed
    refuse_losing("0002")
    op.drop_table("audit_chain_head")
