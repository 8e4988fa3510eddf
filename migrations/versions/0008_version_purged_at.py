"""model_versions.purged_at: when a version's weights were deleted from the model store
because they still held erased data (`unlearnd purge`, POST /models/{name}/purge). The
row, its sha256 and metrics stay: the compliance record says what the version was and
when its weights went. NULL: the weights are stored.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): a batch rebuild would reflect the
    # table, which `alembic downgrade --sql` cannot (no database to read)
    op.drop_column("model_versions", "purged_at")
