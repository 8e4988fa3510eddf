"""Initial schema: exactly the tables of ``worker/tables.py``.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from migrations.guard import refuse_losing

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table("alias_history",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("model_name", sa.String(length=100), nullable=False),
    sa.Column("alias", sa.String(length=50), nullable=False),
    sa.Column("from_version", sa.Integer(), nullable=True),
    sa.Column("to_version", sa.Integer(), nullable=False),
    sa.Column("reason", sa.String(length=50), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_index(op.f("ix_alias_history_model_name"), "alias_history", ["model_name"], unique=False)
    op.create_table("audit_events",
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(length=50), nullable=False),
    sa.Column("model_name", sa.String(length=100), nullable=True),
    sa.Column("request_id", sa.String(length=36), nullable=True),
    sa.Column("instance_id", sa.String(length=200), nullable=True),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.Column("prev_hash", sa.String(length=64), nullable=False),
    sa.Column("hash", sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint("seq"),
    sa.UniqueConstraint("hash")
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"], unique=False)
    op.create_index(op.f("ix_audit_events_instance_id"), "audit_events", ["instance_id"], unique=False)
    op.create_index(op.f("ix_audit_events_kind"), "audit_events", ["kind"], unique=False)
    op.create_index(op.f("ix_audit_events_request_id"), "audit_events", ["request_id"], unique=False)
    op.create_table("models",
    sa.Column("name", sa.String(length=100), nullable=False),
    sa.Column("dataset", sa.JSON(), nullable=False),
    sa.Column("tasks", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("name")
    )
    op.create_table("outbox",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("topic", sa.String(length=50), nullable=False),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_index(op.f("ix_outbox_published_at"), "outbox", ["published_at"], unique=False)
    op.create_table("tombstones",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("dataset_key", sa.String(length=200), nullable=False),
    sa.Column("instance_id", sa.String(length=200), nullable=False),
    sa.Column("task", sa.String(length=50), nullable=False),
    sa.Column("request_id", sa.String(length=36), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("dataset_key", "instance_id", "task")
    )
    op.create_index(op.f("ix_tombstones_dataset_key"), "tombstones", ["dataset_key"], unique=False)
    op.create_table("aliases",
    sa.Column("model_name", sa.String(length=100), nullable=False),
    sa.Column("alias", sa.String(length=50), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["model_name"], ["models.name"], ),
    sa.PrimaryKeyConstraint("model_name", "alias")
    )
    op.create_table("jobs",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("model_name", sa.String(length=100), nullable=False),
    sa.Column("kind", sa.String(length=20), nullable=False),
    sa.Column("status", sa.String(length=20), nullable=False),
    sa.Column("method", sa.String(length=50), nullable=False),
    sa.Column("base_version", sa.Integer(), nullable=False),
    sa.Column("produced_version", sa.Integer(), nullable=True),
    sa.Column("progress", sa.Float(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("metrics", sa.JSON(), nullable=True),
    sa.Column("params", sa.JSON(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["model_name"], ["models.name"], ),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_index(op.f("ix_jobs_model_name"), "jobs", ["model_name"], unique=False)
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"], unique=False)
    op.create_table("deletion_requests",
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
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ),
    sa.ForeignKeyConstraint(["model_name"], ["models.name"], ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("idempotency_key")
    )
    op.create_index(op.f("ix_deletion_requests_created_at"), "deletion_requests", ["created_at"], unique=False)
    op.create_index(op.f("ix_deletion_requests_instance_id"), "deletion_requests", ["instance_id"], unique=False)
    op.create_index(op.f("ix_deletion_requests_job_id"), "deletion_requests", ["job_id"], unique=False)
    op.create_index(op.f("ix_deletion_requests_model_name"), "deletion_requests", ["model_name"], unique=False)
    op.create_index(op.f("ix_deletion_requests_status"), "deletion_requests", ["status"], unique=False)
    op.create_table("model_versions",
    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("model_name", sa.String(length=100), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("parent_version", sa.Integer(), nullable=True),
    sa.Column("job_id", sa.String(length=36), nullable=True),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("artifact_uri", sa.Text(), nullable=False),
    sa.Column("deletions", sa.JSON(), nullable=False),
    sa.Column("erased_cells", sa.JSON(), nullable=False),
    sa.Column("metrics", sa.JSON(), nullable=True),
    sa.Column("note", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ),
    sa.ForeignKeyConstraint(["model_name"], ["models.name"], ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("job_id"),
    sa.UniqueConstraint("model_name", "version")
    )
    op.create_index(op.f("ix_model_versions_model_name"), "model_versions", ["model_name"], unique=False)


def downgrade() -> None:
    refuse_losing("0001")
    op.drop_index(op.f("ix_model_versions_model_name"), table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index(op.f("ix_deletion_requests_status"), table_name="deletion_requests")
    op.drop_index(op.f("ix_deletion_requests_model_name"), table_name="deletion_requests")
    op.drop_index(op.f("ix_deletion_requests_job_id"), table_name="deletion_requests")
    op.drop_index(op.f("ix_deletion_requests_instance_id"), table_name="deletion_requests")
    op.drop_index(op.f("ix_deletion_requests_created_at"), table_name="deletion_requests")
    op.drop_table("deletion_requests")
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_model_name"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("aliases")
    op.drop_index(op.f("ix_tombstones_dataset_key"), table_name="tombstones")
    op.drop_table("tombstones")
    op.drop_index(op.f("ix_outbox_published_at"), table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("models")
    op.drop_index(op.f("ix_audit_events_request_id"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_kind"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_instance_id"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_at"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_alias_history_model_name"), table_name="alias_history")
    op.drop_table("alias_history")
