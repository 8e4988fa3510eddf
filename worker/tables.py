"""The compliance record's schema. Alembic migrations (``migrations/``) are the only
way it changes in a database; keep the two in step."""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(at: datetime) -> datetime:
    """``at`` as an aware UTC datetime. SQLite hands back naive datetimes; they were written as UTC."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def iso_utc(at: datetime | None) -> str | None:
    """``at`` as the API writes times: ISO 8601 in UTC with ``Z`` (naive = UTC, see :func:`as_utc`)."""
    return None if at is None else as_utc(at).isoformat().replace("+00:00", "Z")


_SURROGATE = re.compile("[\ud800-\udfff]")


def unstorable(value: str) -> str | None:
    """Why the record cannot hold ``value`` (None when it can): PostgreSQL text refuses
    the NUL character, and a lone UTF-16 surrogate (JSON's ``"\\ud800"``) has no UTF-8
    encoding, so neither database nor a response could carry it."""
    if "\x00" in value:
        return "must not contain the NUL character (\\x00)"
    if _SURROGATE.search(value):
        return "must not contain a lone surrogate (\\ud800-\\udfff): it has no UTF-8 encoding"
    return None


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A served model: its name and the dataset (spec) it was trained on."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    dataset: Mapped[dict] = mapped_column(JSON)  # DatasetSpec as a dict
    tasks: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    __table_args__ = (
        UniqueConstraint("submitted_by", "idempotency_key", name="uq_deletion_requests_submitter_idempotency_key"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    instance_id: Mapped[str] = mapped_column(String(200), index=True)
    tasks: Mapped[list] = mapped_column(JSON)  # the resolved task names
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    subject_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # received -> queued -> running -> completed | failed; rejected never reaches the worker
    status: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)  # unique per submitter
    # the API key that submitted the request; '' when the API has no keys (app.auth)
    submitted_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    produced_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """One unlearning run on one model: coalesces the queued requests it claimed."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="deletion")  # deletion | reapply | propagate
    status: Mapped[str] = mapped_column(String(20), index=True, default="running")  # running|completed|failed
    method: Mapped[str] = mapped_column(String(50))
    base_version: Mapped[int] = mapped_column(Integer)
    produced_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    params: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # the process that claimed it (worker.runner.this_process; migration 0011): one on the same
    # machine can tell that it is gone and put the job back without waiting for a stale heartbeat
    runner: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def _count_erased_cells(context) -> int:
    return len(context.get_current_parameters().get("erased_cells") or [])


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # the job that produced it; unique, so a job that runs twice publishes one version
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    artifact_uri: Mapped[str] = mapped_column(Text)
    deletions: Mapped[list] = mapped_column(JSON, default=list)  # request ids applied in this step
    erased_cells: Mapped[list] = mapped_column(JSON, default=list)  # every cell erased in its lineage
    # len(erased_cells), for listings that should not read the cells (megabytes over a long
    # history); filled on insert from erased_cells (which never changes; migration 0004)
    erased_cell_count: Mapped[int] = mapped_column(Integer, default=_count_erased_cells, server_default="0")
    # the dataset's highest tombstone id when this version was published: publish refuses a
    # version whose lineage misses a tombstoned cell, so every tombstone up to here is in
    # erased_cells, and only later ones need comparing (None: compare all; migration 0005)
    tombstone_watermark: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # when the weights were deleted from the store because they held erased data (migration 0008)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Alias(Base):
    __tablename__ = "aliases"
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(50), primary_key=True)  # "serving"
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AliasHistory(Base):
    __tablename__ = "alias_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(100), index=True)
    alias: Mapped[str] = mapped_column(String(50))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(50))  # publish | rollback | initial
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Append-only, hash-chained: hash = sha256(prev_hash + canonical JSON of the event)."""

    __tablename__ = "audit_events"
    # each filter of the audit query with seq, the order it pages in (migration 0003)
    __table_args__ = tuple(Index(f"ix_audit_events_{c}_seq", c, "seq")
                           for c in ("kind", "instance_id", "request_id", "model_name"))
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(50))
    model_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    instance_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditChainHead(Base):
    """The chain's last event (one row, ``id`` 1), written in the same transaction as each
    event: it anchors the end of the log (worker.audit)."""

    __tablename__ = "audit_chain_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))


class Tombstone(Base):
    """An erased cell of a dataset: it never re-enters training or unlearning retain data."""

    __tablename__ = "tombstones"
    __table_args__ = (UniqueConstraint("dataset_key", "instance_id", "task"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_key: Mapped[str] = mapped_column(String(200), index=True)
    instance_id: Mapped[str] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(50))
    request_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxMessage(Base):
    """Written in the same transaction as the change it announces; a relay publishes it after commit."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(50))  # e.g. "run_model_jobs"
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
