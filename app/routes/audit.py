"""The audit log: queries and chain verification."""
from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.exceptions import HTTPException

from worker.audit import verify_chain
from worker.errors import Invalid
from worker.queries import list_events
from worker.settings import SHA256_PATTERN

from ..deps import ReadSessionDep
from ..guards import StrictJSONRoute
from ..schemas import AuditEventOut, AuditPage, ChainReport, QueryNumber, Text, UTCDateTime

router = APIRouter(prefix="/audit", tags=["audit"], route_class=StrictJSONRoute)


@router.get("/events", response_model=AuditPage)
def read_events(
    session: ReadSessionDep,
    kind: Text | None = None,
    instance_id: Text | None = None,
    request_id: Text | None = None,
    model: Text | None = None,
    since: Annotated[UTCDateTime | None, Query(description="at or after (naive = UTC)")] = None,
    until: Annotated[UTCDateTime | None, Query(description="before (naive = UTC)")] = None,
    limit: Annotated[QueryNumber, Query(ge=1, le=500)] = 100,
    cursor: Annotated[Text | None, Query(description="next_cursor of this list's previous page (opaque; another "
                                                     "list's cursor is a 422)")] = None,
) -> AuditPage:
    """Audit events in chain order (``seq`` ascending), filtered; pages follow ``next_cursor``.
    A cursor of another list (``/deletions``, ``/jobs``) is a 422 naming it, as is one written
    before cursors named their list (restart from the first page, without a cursor)."""
    with session.begin():
        page = list_events(
            session,
            kind=kind,
            instance_id=instance_id,
            request_id=request_id,
            model=model,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        return AuditPage(
            items=[AuditEventOut.model_validate(e, from_attributes=True) for e in page.items],
            next_cursor=page.next_cursor,
        )


#: one verification at a time per process: it reads the whole log (seconds at a few
#: hundred thousand events), and calls piling up would hold every worker thread
_verifying = threading.Lock()


@router.get("/verify", response_model=ChainReport,
            responses={429: {"description": "a verification is already running in this process",
                             "headers": {"Retry-After": {"description": "seconds to wait before asking again",
                                                         "schema": {"type": "integer"}}}}})
def verify(
    session: ReadSessionDep,
    seq: Annotated[QueryNumber | None, Query(ge=1, le=2**62, description="an anchor kept outside: an event's seq ...")] = None,
    hash: Annotated[str | None, Query(pattern=SHA256_PATTERN, description="... and the hash it had")] = None,
    after_anchor: Annotated[bool, Query(description="recompute only the events after the anchor: a monitor reads "
                                                    "the new events; changes at or before the anchor that kept the "
                                                    "stored hashes need a full check")] = False,
) -> ChainReport:
    """Recompute the hash chain. Always 200 when the check ran: read ``ok``; on a
    broken chain ``first_bad_seq`` names the first event that does not verify and
    ``reason`` says why (changed contents, broken link, gap). With ``seq`` and
    ``hash`` (a certificate's ``audit.chain_head``, an earlier report's ``head``),
    also that this event still has that hash: a log rewritten together with its head
    verifies on its own, not against a copy kept elsewhere. While another verification
    runs in this process: 429 with ``Retry-After`` (its answer would be the same).
    ``after_anchor=true``: recompute only the events after the anchor, chained from its
    hash (a monitor passes each report's ``head`` back: it reads the new events only).
    Event ``seq`` and those before it are not recomputed: a change there that kept the
    stored hashes is found by a full check only."""
    if (seq is None) != (hash is None):
        raise Invalid("an anchor is seq and hash together", seq=seq, hash=hash)
    if after_anchor and seq is None:
        raise Invalid("after_anchor needs an anchor: seq and hash", after_anchor=after_anchor)
    if not _verifying.acquire(blocking=False):
        raise HTTPException(429, "a verification of the audit chain is already running; ask again when it ends",
                            headers={"Retry-After": "10"})
    try:
        with session.begin():
            if session.get_bind().dialect.name == "postgresql":
                # one snapshot for the events and the head read after them: at READ COMMITTED an
                # append committed in between is a head past the log, a sound log reported broken
                # (SQLite: a deferred read transaction is one snapshot already)
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return ChainReport(**verify_chain(session, anchor=(seq, hash) if seq is not None else None,
                                              after_anchor=after_anchor))
    finally:
        _verifying.release()
