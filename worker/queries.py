"""Read-side queries of the record: deletion requests, jobs and audit events, filtered,
with opaque keyset cursors (stable under concurrent inserts, no OFFSET scans), each
naming the list that issued it (another list's cursor is a 422, not a page from an
unrelated position)."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session, defer

from .errors import Invalid
from .tables import AuditEvent, DeletionRequest, Job, as_utc, unstorable

T = TypeVar("T")
MAX_LIMIT = 500


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # None on the last page


#: the lists that page with a cursor, by the tag their cursors carry: the route each came from
LISTS = {"deletions": "/deletions", "jobs": "/jobs", "audit": "/audit/events"}


def encode_cursor(listing: str, *values) -> str:
    """An opaque, URL-safe cursor of the list ``listing`` (a key of :data:`LISTS`): base64url,
    unpadded, of the JSON array ``[listing, *values]``. The tag ties a cursor to the list that
    issued it: another list's cursor is refused (422) instead of paging from an unrelated
    position (``/deletions`` and ``/jobs`` both page by ``(created_at, id)``)."""
    if listing not in LISTS:
        raise ValueError(f"no list {listing!r} pages with a cursor; one of {sorted(LISTS)}")
    packed = json.dumps([listing, *values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def _malformed(cursor: str) -> Invalid:
    return Invalid("malformed cursor; pass back the next_cursor of a previous page", cursor=cursor)


def _untagged(values: list) -> bool:
    """Whether ``values`` has the shape the code before list tags wrote: ``[created_at, id]``
    (``/deletions``, ``/jobs``) or ``[seq]`` (``/audit/events``)."""
    if len(values) == 1:
        return type(values[0]) is int
    if len(values) == 2 and all(isinstance(v, str) for v in values):
        try:
            datetime.fromisoformat(values[0])
        except ValueError:
            return False
        return True
    return False


def decode_cursor(cursor: str, listing: str, n: int) -> list:
    """The ``n`` values packed into ``cursor`` by ``encode_cursor(listing, ...)``, without the
    tag. :class:`Invalid` (422) for anything we did not write: another list's cursor (the
    problem names that list in ``cursor_list``), one written before cursors carried their
    list's name (the client restarts from the first page), anything else (malformed)."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested '['
        values = None
    if not isinstance(values, list) or not values:
        raise _malformed(cursor)
    tag = values[0]
    if isinstance(tag, str) and tag in LISTS and tag != listing:
        raise Invalid(f"cursor is from {LISTS[tag]}, not {LISTS[listing]}; "
                      "pass back the next_cursor of this list's previous page",
                      cursor=cursor, cursor_list=LISTS[tag])
    if tag != listing and _untagged(values):
        raise Invalid(f"cursor was written by an earlier version of the service (it names no list); "
                      f"restart {LISTS[listing]} from its first page, without a cursor", cursor=cursor)
    if tag != listing or len(values) != n + 1:
        raise _malformed(cursor)
    return values[1:]


def decode_request_cursor(cursor: str, listing: str) -> tuple[datetime, str]:
    """The (created_at, id) of the last row of the previous page of ``listing`` (``deletions``
    or ``jobs``). A cursor that decodes to other types is refused here (422) rather than by
    the database (a 500)."""
    at, rid = decode_cursor(cursor, listing, 2)
    if not isinstance(at, str) or not isinstance(rid, str) or unstorable(rid):
        raise _malformed(cursor)
    try:
        return as_utc(datetime.fromisoformat(at)), rid
    except (ValueError, OverflowError):
        raise _malformed(cursor) from None


def decode_event_cursor(cursor: str) -> int:
    """The seq of the last event of the previous page of ``/audit/events``: an int the BIGINT
    column can hold."""
    (after,) = decode_cursor(cursor, "audit", 1)
    if type(after) is not int or not 0 <= after < 2**63:  # type(): a bool is an int too
        raise _malformed(cursor)
    return after


def utc(at: datetime | None) -> datetime | None:
    """A naive datetime is read as UTC."""
    return None if at is None else as_utc(at)


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"limit must be between 1 and {MAX_LIMIT}", limit=limit)
    return limit


def _check_window(since: datetime | None, until: datetime | None) -> None:
    """:class:`Invalid` for a window that ends before it starts (it answered an empty page, as
    though nothing had happened in it)."""
    if since is not None and until is not None and utc(since) > utc(until):
        raise Invalid(f"since ({utc(since).isoformat()}) is after until ({utc(until).isoformat()}): the window is "
                      "empty; since is inclusive, until exclusive", since=utc(since), until=utc(until))


def _newest_first(session: Session, table, listing: str, filters: dict, since: datetime | None,
                  until: datetime | None, limit: int, cursor: str | None, without: tuple = ()) -> Page:
    """Rows of ``table`` (a model with ``created_at`` and ``id``) whose columns equal the
    non-None values of ``filters``, newest first (``created_at``, then ``id``), from
    ``cursor`` on (a cursor of the list ``listing``, ``deletions`` or ``jobs``, which the next
    page's cursor names too); ``since`` inclusive, ``until`` exclusive; the columns
    ``without`` not read (reading one raises). ``created_at`` is the writer's clock, read
    under the audit log's lock (a request's in :func:`worker.requests.submit_deletion`, a
    job's by :func:`worker.jobs.commit_ordered_now`), so on one clock rows land in commit
    order and a reader never passes one committed late (hosts whose clocks differ can
    still stamp out of order). The audit log's ``seq`` (assigned under the chain head's
    lock) follows commit order too."""
    limit = _check_limit(limit)
    _check_window(since, until)
    q = select(table).options(*(defer(c, raiseload=True) for c in without))
    for column, value in filters.items():
        if value is not None:
            q = q.where(getattr(table, column) == value)
    if since is not None:
        q = q.where(table.created_at >= utc(since))
    if until is not None:
        q = q.where(table.created_at < utc(until))
    if cursor is not None:
        at, rid = decode_request_cursor(cursor, listing)
        # one row comparison, not an OR of two: PostgreSQL can then start the index scan
        # at the cursor instead of walking (and discarding) every newer row
        q = q.where(tuple_(table.created_at, table.id) < tuple_(at, rid))
    rows = session.execute(q.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(listing, utc(rows[-1].created_at).isoformat(), rows[-1].id) if more else None
    return Page(rows, next_cursor)


def list_requests(
    session: Session,
    *,
    instance_id: str | None = None,
    status: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    submitted_by: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[DeletionRequest]:
    """Deletion requests, newest first (``created_at``, then ``id``); ``since`` inclusive, ``until`` exclusive;
    ``submitted_by``: only those that API key submitted."""
    filters = {"submitted_by": submitted_by, "instance_id": instance_id, "status": status, "model_name": model}
    return _newest_first(session, DeletionRequest, "deletions", filters, since, until, limit, cursor)


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    kind: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Job]:
    """Jobs, newest first (``created_at``, then ``id``); ``since`` inclusive, ``until`` exclusive;
    without their metrics and parameters (a reapply's cells can be megabytes)."""
    return _newest_first(session, Job, "jobs", {"status": status, "kind": kind, "model_name": model}, since, until,
                         limit, cursor, without=(Job.metrics, Job.params))


def list_events(
    session: Session,
    *,
    kind: str | None = None,
    instance_id: str | None = None,
    request_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[AuditEvent]:
    """Audit events in chain order (``seq`` ascending); ``since`` inclusive, ``until`` exclusive."""
    limit = _check_limit(limit)
    _check_window(since, until)
    q = select(AuditEvent)
    if kind is not None:
        q = q.where(AuditEvent.kind == kind)
    if instance_id is not None:
        q = q.where(AuditEvent.instance_id == instance_id)
    if request_id is not None:
        q = q.where(AuditEvent.request_id == request_id)
    if model is not None:
        q = q.where(AuditEvent.model_name == model)
    if since is not None:
        q = q.where(AuditEvent.at >= utc(since))
    if until is not None:
        q = q.where(AuditEvent.at < utc(until))
    if cursor is not None:
        q = q.where(AuditEvent.seq > decode_event_cursor(cursor))
    rows = session.execute(q.order_by(AuditEvent.seq).limit(limit + 1)).scalars().all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor("audit", rows[-1].seq) if more else None)
