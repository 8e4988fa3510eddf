"""Audit filters page in seq order: composite (filter, seq) indexes, so a query for a
rare kind, instance, request or model starts at the cursor and reads only its own
events (with a single-column index, or none for model_name, PostgreSQL walked the log
by seq and discarded the rest; see benchmarks/README.md, "The record at scale").

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FILTERS = ("kind", "instance_id", "request_id")


def upgrade() -> None:
    for column in FILTERS:
        op.drop_index(f"ix_audit_events_{column}", table_name="audit_events")
    for column in (*FILTERS, "model_name"):
        op.create_index(f"ix_audit_events_{column}_seq", "audit_events", [column, "seq"], unique=False)


def downgrade() -> None:
    for column in (*FILTERS, "model_name"):
        op.drop_index(f"ix_audit_events_{column}_seq", table_name="audit_events")
    for column in FILTERS:
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column], unique=False)
