"""Deletion requests: submit, inspect, list, certify."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from worker.errors import Invalid, NotFound
from worker.queries import list_requests
from worker.requests import deletion_certificate, get_request, submit_deletion

from ..auth import DeletionsCaller, RequestOwner
from ..deps import ReadSessionDep, SessionDep, SettingsDep
from ..guards import StrictJSONRoute
from ..schemas import (
    DeletionAccepted,
    DeletionCreate,
    DeletionOut,
    DeletionPage,
    QueryNumber,
    RequestStatus,
    Text,
    text,
    UTCDateTime,
    deletion_accepted,
    deletion_out,
)

router = APIRouter(prefix="/deletions", tags=["deletions"], route_class=StrictJSONRoute)


@router.post("", status_code=202, response_model=DeletionAccepted,
             responses={202: {"headers": {
                            "Location": {"description": "the request's URL", "schema": {"type": "string"}},
                            "Idempotent-Replayed": {"description": "true when this answers an Idempotency-Key seen "
                                                                   "before (the first answer, again)",
                                                    "schema": {"type": "string", "enum": ["true"]}}}},
                        404: {"description": "no model of that name (the body's model, or the service's default)"},
                        409: {"description": "a cell is already erased or pending (the problem's cells name each)"},
                        # two 503s: the record's says when to try again; the dataset's does not (waiting does
                        # not mend it, worker.errors.DatasetUnavailable), which the shared description hid
                        503: {"description": "the record (database) is unavailable: nothing was stored; try again "
                                             "after Retry-After seconds. Or the model's dataset cannot be loaded on "
                                             "this host (dataset-unavailable, no Retry-After): nothing was stored, "
                                             "and the server log says why",
                              "headers": {"Retry-After": {"description": "seconds to wait before trying again (the "
                                                                         "record's 503 only)",
                                                          "schema": {"type": "integer"}}}}})
def create_deletion(
    body: DeletionCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    caller: DeletionsCaller,
    owner: RequestOwner,
    idempotency_key: Annotated[text(min_length=1, max_length=200) | None, Header(alias="Idempotency-Key")] = None,
) -> DeletionAccepted:
    """Accept a deletion request (202, ``Location`` = the request's URL).

    Unknown model: 404 (naming the known models to a key that may list them). Unknown task or
    instance: 422. Cells already erased or
    pending in another request: 409 naming them (a key that sees its own requests
    only is not told the ids of other submitters'). Same ``Idempotency-Key`` and
    body: the first answer again; same key, other body: 422; two such headers: 422
    (a proxy or a log keeping the other would see another key), as is a key that is not
    printable ASCII. A JSON name given twice
    in the body is a 400.
    """
    sent = len(request.headers.getlist("idempotency-key"))
    if sent > 1:
        raise Invalid(f"send one Idempotency-Key header; this request has {sent}", header="Idempotency-Key")
    if idempotency_key is not None and not (idempotency_key.isascii() and idempotency_key.isprintable()):
        # header bytes are read as Latin-1: a UTF-8 key was stored as other characters than sent
        raise Invalid("the Idempotency-Key must be printable ASCII (a UUID, say)", header="Idempotency-Key")
    try:
        with session.begin():
            submission = submit_deletion(
                session, settings, **body.model_dump(), idempotency_key=idempotency_key, actor=caller, visible_to=owner
            )
    except NotFound as exc:
        if owner is not None:  # a key that may not list the models (GET /models) is not told them here either
            exc.extras.pop("known_models", None)
        raise
    response.headers["Location"] = f"/deletions/{submission.request.id}"
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return deletion_accepted(submission.request)


@router.get("", response_model=DeletionPage)
def list_deletions(
    session: ReadSessionDep,
    owner: RequestOwner,
    instance_id: Text | None = None,
    status: RequestStatus | None = None,
    model: Text | None = None,
    since: Annotated[UTCDateTime | None, Query(description="created at or after (naive = UTC)")] = None,
    until: Annotated[UTCDateTime | None, Query(description="created before (naive = UTC)")] = None,
    limit: Annotated[QueryNumber, Query(ge=1, le=500)] = 50,
    cursor: Annotated[Text | None, Query(description="next_cursor of this list's previous page (opaque; another "
                                                     "list's cursor is a 422)")] = None,
) -> DeletionPage:
    """Deletion requests, newest first, filtered; pages follow ``next_cursor``. A key with
    the ``deletions`` scope alone lists the requests it submitted.

    A cursor is opaque and names the list that issued it: a ``/jobs`` or ``/audit/events``
    cursor here is a 422 naming that list, as is one written before cursors named their
    list (restart from the first page, without a cursor).

    ``created_at`` is read under the audit log's lock, after the request's row is written:
    on one clock, requests of every model land in commit order, so paging passes none that
    commits late (a newer one appears on a new first page). API hosts whose clocks differ can
    still stamp out of order: to follow new requests without a gap whatever the clocks, read
    ``/audit/events?kind=deletion.received`` with its cursor: ``seq`` order is commit order."""
    with session.begin():
        page = list_requests(
            session,
            instance_id=instance_id,
            status=status,
            model=model,
            since=since,
            until=until,
            submitted_by=owner,
            limit=limit,
            cursor=cursor,
        )
        return DeletionPage(items=[deletion_out(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{request_id}", response_model=DeletionOut)
def read_deletion(request_id: Text, session: ReadSessionDep, owner: RequestOwner) -> DeletionOut:
    """One request; 404 when there is none or (a key with the ``deletions`` scope alone)
    another key submitted it."""
    with session.begin():
        return deletion_out(get_request(session, request_id, owner))


@router.get("/{request_id}/certificate",
            responses={200: {"description": "the certificate: what was removed, the method, the metrics, the "
                                             "versions, the audit events, certificate_sha256 (and signature)",
                             "content": {"application/json": {"schema": {"type": "object"}}}},
                       409: {"description": "the request is not completed yet (request_status says where it is), "
                                            "or its record cannot back a certificate: no deletion.completed event, "
                                            "or rows that disagree with its audit events (audit_state says which)"}})
def read_certificate(request_id: Text, session: ReadSessionDep, request: Request, owner: RequestOwner,
                     settings: SettingsDep) -> JSONResponse:
    """The deletion certificate of a completed request (409 before that, and where its rows
    disagree with its audit events: :func:`worker.requests.deletion_certificate`).

    ``certificate_sha256`` is the sha256 of the canonical JSON (sorted keys,
    separators ``,`` and ``:``, non-ASCII escaped as ``\\uXXXX``, numbers as Python writes
    them: README, "Signed certificates") of every other field of the body. With a signing
    key configured, ``signature`` is the service's Ed25519 signature over the
    canonical JSON of every other field (``GET /certificates/public-key``).
    404 as for the request itself.
    """
    from model_store import store_for

    with session.begin():
        body = deletion_certificate(session, request_id, owner, store_for(settings.store_dir))
    signer = request.app.state.signer
    return JSONResponse(signer.sign(body) if signer is not None else body)
