"""jobs.runner: the process that claimed a running job (worker/runner.py): host, boot id,
PID namespace, PID and the PID's start time. A claim, the sweeper or a start of
`unlearnd serve` on the same machine and PID namespace that finds the process gone (a
SIGKILL, the OOM killer) puts the job back in the queue at once, instead of after its
heartbeat is ``stale_after_s`` old. NULL: not known (a job claimed before this revision, or
where ``/proc`` cannot tell), so only the heartbeat rule applies.

Downgrade drops the column: running jobs fall back to the heartbeat rule; nothing of the
compliance record is in it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: Union[str, Sequence[str], None] = "0010"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("runner", sa.JSON(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+), as 0004 and 0008
    op.drop_column("jobs", "runner")
