"""The append-only, hash-chained audit log.

Each event's hash is ``sha256(prev_hash || canonical JSON of its fields)``; the
first event chains to ``GENESIS``. :func:`verify_chain` recomputes every hash,
so a changed, deleted or reordered row breaks the chain at a known ``seq``.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .tables import AuditEvent, as_utc, utcnow

GENESIS = "0" * 64


def _canonical_time(at: datetime) -> str:
    return as_utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(prev_hash: str, seq: int, at: datetime, kind: str, model_name, request_id, instance_id, payload) -> str:
    body = json.dumps(
        {
            "seq": seq,
            "at": _canonical_time(at),
            "kind": kind,
            "model_name": model_name,
            "request_id": request_id,
            "instance_id": instance_id,
            "payload": payload,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append_event(
    session: Session,
    kind: str,
    *,
    model_name: str | None = None,
    request_id: str | None = None,
    instance_id: str | None = None,
    payload: dict | None = None,
) -> AuditEvent:
    """Append one event in the caller's transaction.

    The chain's head row is locked (``FOR UPDATE`` on PostgreSQL) so concurrent
    writers serialise; on SQLite the database lock does the same.
    """
    payload = json.loads(json.dumps(payload or {}, default=str))
    head = session.execute(
        select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1).with_for_update()
    ).scalar_one_or_none()
    prev = head.hash if head else GENESIS
    seq = (head.seq + 1) if head else 1
    now = utcnow()
    at = now.replace(microsecond=(now.microsecond // 1000) * 1000)  # ms precision survives every backend
    event = AuditEvent(
        seq=seq,
        at=at,
        kind=kind,
        model_name=model_name,
        request_id=request_id,
        instance_id=instance_id,
        payload=payload,
        prev_hash=prev,
        hash=event_hash(prev, seq, at, kind, model_name, request_id, instance_id, payload),
    )
    session.add(event)
    session.flush()
    return event


def verify_chain(session: Session) -> dict:
    """Recompute the chain. Returns ``{"ok": bool, "events": n, "first_bad_seq": seq|None, "reason": str|None}``."""
    prev = GENESIS
    expected_seq = 1
    n = 0
    for ev in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
        n += 1
        if ev.seq != expected_seq:
            return {"ok": False, "events": n, "first_bad_seq": ev.seq, "reason": f"gap before seq {ev.seq}"}
        if ev.prev_hash != prev:
            return {"ok": False, "events": n, "first_bad_seq": ev.seq, "reason": "prev_hash does not match"}
        h = event_hash(prev, ev.seq, ev.at, ev.kind, ev.model_name, ev.request_id, ev.instance_id, ev.payload)
        if h != ev.hash:
            return {"ok": False, "events": n, "first_bad_seq": ev.seq, "reason": "hash does not match contents"}
        prev = ev.hash
        expected_seq += 1
    return {"ok": True, "events": n, "first_bad_seq": None, "reason": None}
