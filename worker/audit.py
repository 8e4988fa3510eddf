"""The append-only, hash-chained audit log.

Each event's hash is ``sha256(prev_hash || canonical JSON of its fields)``; the
first event chains to ``GENESIS``. :func:`verify_chain` recomputes every hash,
so a changed, deleted or reordered row breaks the chain at a known ``seq``.

The chain's head (last ``seq`` and ``hash``) is also kept in a one-row table,
``audit_chain_head``, written in the same transaction as each event. It
anchors the end of the log: events deleted from the tail leave a head that no
remaining event matches. (Appends serialise on a lock: see :func:`append_event`.)
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

from sqlalchemy import Text, select, text, type_coerce
from sqlalchemy.orm import Session

from .tables import AuditChainHead, AuditEvent, as_utc, iso_utc, utcnow

GENESIS = "0" * 64
HEAD_ID = 1
# Any constant: the key of the PostgreSQL advisory lock that serialises appends.
APPEND_LOCK_KEY = 727_002


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


def _payload_value(value) -> str:
    return iso_utc(value) if isinstance(value, datetime) else str(value)


def lock_appends(session: Session) -> None:
    """Take the lock every append takes, to the end of the caller's transaction (PostgreSQL:
    a transaction-scoped advisory lock, which the same transaction may take again; SQLite:
    the database write lock serialises writers already). A time read under it is after
    every earlier append's commit: what :func:`append_event` stamps, and a row stamped so
    (a request's ``created_at``) lands in commit order."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": APPEND_LOCK_KEY})


def commit_ordered_now(session: Session) -> datetime:
    """The time to stamp a new row's ``created_at`` with (a request's, a job's), read under
    :func:`lock_appends`, which the row's audit event takes anyway: on one clock such rows
    land in commit order, and a reader paging a list newest first never passes one that
    commits late."""
    lock_appends(session)
    return utcnow()


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

    Appends serialise on a transaction-scoped advisory lock (PostgreSQL; held
    to the caller's commit), so a second writer reads the head only once the
    first has committed: locking the last event row instead hands a waiting
    writer a stale head and a duplicate ``seq``. On SQLite the database write
    lock serialises them. The head row moves with the event.
    """
    # a datetime in a payload is written as the API writes times (str() of one that SQLite
    # handed back naive had no zone and a space for the T, for good in a hash-chained log)
    payload = json.loads(json.dumps(payload or {}, default=_payload_value))
    lock_appends(session)
    head = session.get(AuditChainHead, HEAD_ID, populate_existing=True)
    prev = head.hash if head else GENESIS
    seq = (head.seq + 1) if head else 1
    now = utcnow()
    # ms precision survives every backend; rounded up, so an event is never stamped before a
    # row its transaction wrote first (a request's created_at: ?since=<created_at> finds its event)
    at = now + timedelta(microseconds=-now.microsecond % 1000)
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
    if head is None:
        session.add(AuditChainHead(id=HEAD_ID, seq=seq, hash=event.hash))
    else:
        head.seq, head.hash = seq, event.hash
    session.flush()
    return event


def _stored_form(session: Session):
    """On SQLite, ``check(at, payload, stored_at, stored_payload)``: whether an event's time
    and payload are stored as the service writes them (the text its column types make of the
    values read back). Its hash covers the values as read back, and some texts read back
    alike: a time with another UTC offset (the same instant), a payload naming a key twice
    (the last one wins). Rewritten so (the triggers dropped), an event still verified
    against an anchor kept outside, while SQL read the other text: the time-window filter
    compares the stored text, ``json_extract`` the first key. None elsewhere: PostgreSQL
    stores an instant, and reads a JSON key's last value, as Python does."""
    dialect = session.get_bind().dialect
    if dialect.name != "sqlite":
        return None
    table = AuditEvent.__table__
    write_at = table.c.at.type.dialect_impl(dialect).bind_processor(dialect)
    write_payload = table.c.payload.type.dialect_impl(dialect).bind_processor(dialect)

    def check(at, payload, stored_at, stored_payload) -> bool:
        return write_at(at) == stored_at and write_payload(payload) == stored_payload

    return check


def _broken(events: int, first_bad_seq: int, reason: str, verified_from: int = 1) -> dict:
    """:func:`verify_chain`'s report of a chain that does not verify."""
    return {"ok": False, "events": events, "first_bad_seq": first_bad_seq, "reason": reason, "head": None,
            "verified_from": verified_from}


def verify_chain(session: Session, anchor: tuple[int, str] | None = None, after_anchor: bool = False) -> dict:
    """Recompute the chain and check that it ends at the recorded head and, with an
    ``anchor`` ``(seq, hash)`` kept outside the database (a certificate's chain head, an
    earlier report's ``head``), that event ``seq`` still has that hash: whoever can
    write the database can rewrite the log and its head consistently, but not the
    copies others hold.
    Returns ``{"ok": bool, "events": n, "first_bad_seq": seq|None, "reason": str|None,
    "head": {"seq", "hash"}|None}`` (``head``: the verified end of the log, when ok).
    The events and the head must come from one snapshot: on PostgreSQL, call it in a
    REPEATABLE READ transaction (as ``GET /audit/verify`` does) while others may append.

    ``after_anchor`` (with an ``anchor``): check only the events after it, chained from
    its hash, once event ``seq`` is found with that hash; what the anchor vouches for
    (an earlier full verification's head, say) is trusted, so a periodic check reads the
    new events only. ``verified_from`` in the report is the first seq recomputed."""
    prev = GENESIS
    expected_seq = 1
    n = 0
    # streamed as plain rows, a batch at a time: the whole log as ORM objects took
    # gigabytes at a few hundred thousand events
    columns = (AuditEvent.seq, AuditEvent.prev_hash, AuditEvent.hash, AuditEvent.at, AuditEvent.kind,
               AuditEvent.model_name, AuditEvent.request_id, AuditEvent.instance_id, AuditEvent.payload)
    stored_as_written = _stored_form(session)
    if stored_as_written is not None:  # SQLite: also the text as stored
        columns += (type_coerce(AuditEvent.at, Text).label("stored_at"),
                    type_coerce(AuditEvent.payload, Text).label("stored_payload"))
    query = select(*columns).order_by(AuditEvent.seq)
    if after_anchor:
        if anchor is None:
            raise ValueError("after_anchor needs an anchor")
        kept = session.execute(select(AuditEvent.hash).where(AuditEvent.seq == anchor[0])).scalar_one_or_none()
        if kept is None:
            return _broken(0, anchor[0], f"the log has no event {anchor[0]}, the anchored one: events were removed, "
                           "or the anchor is not of this log",
                           anchor[0])
        if kept != anchor[1]:
            return _broken(0, anchor[0], f"event {anchor[0]} does not have the anchored hash: the log was rewritten "
                                         "up to it", anchor[0])
        prev, expected_seq = anchor[1], anchor[0] + 1
        query = query.where(AuditEvent.seq > anchor[0])
    verified_from = expected_seq

    def broken(events: int, seq: int, reason: str) -> dict:
        return _broken(events, seq, reason, verified_from)

    rows = session.execute(query.execution_options(yield_per=2000))
    try:  # an early return closes the server-side cursor too
        for seq, prev_hash, hash_, at, kind, model_name, request_id, instance_id, payload, *stored in rows:
            n += 1
            if seq != expected_seq:
                return broken(n, seq, f"gap before seq {seq}")
            if prev_hash != prev:
                return broken(n, seq, "prev_hash does not match")
            if event_hash(prev, seq, at, kind, model_name, request_id, instance_id, payload) != hash_:
                return broken(n, seq, "hash does not match contents")
            if stored and not stored_as_written(at, payload, *stored):
                return broken(n, seq, f"event {seq} is not stored as the service writes it: its time or payload was "
                                      "rewritten in another form that reads back as the same values")
            if anchor is not None and seq == anchor[0] and hash_ != anchor[1]:
                return broken(n, seq, f"event {seq} does not have the anchored hash: the log was rewritten up to it")
            prev = hash_
            expected_seq += 1
    finally:
        rows.close()
    head = session.get(AuditChainHead, HEAD_ID)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    if (head_seq, head_hash) != (expected_seq - 1, prev):
        # the first seq the head vouches for that is not there (or the last one, when the head
        # itself was changed or removed)
        bad = expected_seq if head_seq >= expected_seq else max(expected_seq - 1, 1)
        return broken(n, bad, f"the log ends at seq {expected_seq - 1} but its recorded head is seq {head_seq}")
    if anchor is not None and anchor[0] > expected_seq - 1:
        return broken(n, expected_seq, f"the log ends at seq {expected_seq - 1}, before the anchored event "
                                       f"{anchor[0]}: events were removed, or the anchor is not of this log")
    return {"ok": True, "events": n, "first_bad_seq": None, "reason": None,
            "head": {"seq": head_seq, "hash": head_hash} if expected_seq > 1 else None,
            "verified_from": verified_from}
