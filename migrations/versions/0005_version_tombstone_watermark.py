"""model_versions.tombstone_watermark: the dataset's highest tombstone id when the
version was published. Publishing refuses a version whose lineage misses a tombstoned
cell, so every tombstone up to the watermark is in the version's erased_cells, and
"which erasures does this version still hold" reads only the later ones (it compared
the whole lineage with every tombstone: benchmarks/README.md, "The record at scale").
Existing versions get none (NULL: compared in full, as before).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("tombstone_watermark", sa.Integer(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): a batch rebuild would reflect the
    # table, which `alembic downgrade --sql` cannot (no database to read)
    op.drop_column("model_versions", "tombstone_watermark")
