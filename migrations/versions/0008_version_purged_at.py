"""model_versions.purged_at: when a version's weights were deleted from the model store
because they still held erased data (`unlearnd purge`, POST /models/{name}/purge). The
row, its sha256 and metrics stay: the compliance record says what the version was and
when its weights went. NULL: the weights are stored.

Upgrade, online: the column is filled from the audit log's ``model.version_purged``
events of published versions (each at its event's time): a record downgraded past 0008
and upgraded again lost every purged_at, and served purged versions as stored ones. On a
record that never was at 0008 there are no such events. Offline (``--sql``) the step
cannot run (the version is inside a JSON payload, read in Python): the script carries a
comment saying so; a record downgraded past 0008 is upgraded online instead.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import context, op

revision: str = "0008"
down_revision: Union[str, Sequence[str], None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


#: the audit event of a purge (worker.versions.PURGED_EVENT, at this revision)
PURGED_EVENT = "model.version_purged"

versions = sa.table("model_versions", sa.column("model_name", sa.String), sa.column("version", sa.Integer),
                    sa.column("purged_at", sa.DateTime(timezone=True)))
events = sa.table("audit_events", sa.column("seq", sa.Integer), sa.column("at", sa.DateTime(timezone=True)),
                  sa.column("kind", sa.String), sa.column("model_name", sa.String), sa.column("payload", sa.JSON))


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    if context.is_offline_mode():
        op.execute("-- 0008 upgrade. purged_at is NOT filled from the audit log's model.version_purged events by "
                   "this script (the version is read from their JSON payload in Python). A record downgraded past "
                   "0008 before is upgraded online instead (`unlearnd migrate`)")
        return
    connection = op.get_bind()
    purged = {}
    for at, model, payload in connection.execute(sa.select(events.c.at, events.c.model_name, events.c.payload)
                                                 .where(events.c.kind == PURGED_EVENT).order_by(events.c.seq)):
        # "published" came later than the event (59590d5's purge, of version rows only, wrote none)
        if isinstance(payload, dict) and payload.get("published", True) and isinstance(payload.get("version"), int):
            purged[(model, payload["version"])] = at
    for (model, version), at in purged.items():
        connection.execute(sa.update(versions).where(versions.c.model_name == model, versions.c.version == version,
                                                     versions.c.purged_at.is_(None)).values(purged_at=at))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): a batch rebuild would reflect the
    # table, which `alembic downgrade --sql` cannot (no database to read)
    op.drop_column("model_versions", "purged_at")
