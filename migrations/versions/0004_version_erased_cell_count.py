"""model_versions.erased_cell_count: how many cells a version's lineage erased, so
version listings need not read every version's erased_cells (the whole lineage's
cells, megabytes of JSON a version over a long history; benchmarks/README.md, "The
record at scale"). Existing rows are filled from their erased_cells.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("erased_cell_count", sa.Integer(), server_default="0", nullable=False))
    # json_array_length: PostgreSQL (json) and SQLite both have it; one statement, so
    # `alembic upgrade --sql` writes it out too
    op.execute("UPDATE model_versions SET erased_cell_count = json_array_length(erased_cells)")


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): a batch rebuild would reflect the
    # table, which `alembic downgrade --sql` cannot (no database to read)
    op.drop_column("model_versions", "erased_cell_count")
