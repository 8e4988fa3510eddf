"""The HTTP contract: request bodies and response documents."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints,
                      ValidationError, WrapValidator)
from pydantic_core import PydanticCustomError

from worker.requests import request_metrics
from worker.settings import ModelName  # noqa: F401 - re-exported: the routes' path names (a 422, not a 404)
from worker.settings import said_in_words
from worker.tables import as_utc, unstorable


def _storable(value: str) -> str:
    reason = unstorable(value)
    if reason:
        raise ValueError(reason)
    return value


#: a string the record can store (no NUL, no lone surrogate: a 422 here, not a database error)
Text = Annotated[str, AfterValidator(_storable)]



def text(min_length: int | None = None, max_length: int | None = None):
    """:data:`Text` with length limits on the string itself (its errors count characters)."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length), AfterValidator(_storable)]


def _task_names(value: Any, handler):
    """One error for ``tasks`` that says what it takes, not pydantic's union branches."""
    if isinstance(value, list) and len(value) > MAX_TASK_ITEMS:
        raise PydanticCustomError("tasks", 'must be "all" or a list of task names ({why})',
                                  {"why": f"got {len(value)} items, more than {MAX_TASK_ITEMS}"})
    try:
        return handler(value)
    except ValidationError as exc:
        if isinstance(value, list):
            why = "; ".join(f"item {e['loc'][1]}: {said_in_words(e)}" for e in exc.errors()
                            if len(e["loc"]) >= 2 and isinstance(e["loc"][1], int))
        elif isinstance(value, str):
            why = (f'got the string {value!r}; every task is "all", in lower case' if value.lower() == "all" else
                   f"got the string {value[:50]!r}; a single task is a list of one: [{value[:50]!r}]")
        else:
            why = f"got {type(value).__name__ if value is not None else 'null'}"
        raise PydanticCustomError("tasks", 'must be "all" or a list of task names ({why})', {"why": why}) from None


#: the most items a request's ``tasks`` list may hold (a model has a handful of tasks; a name given
#: twice counts once): a 64 KiB list of unknown names was echoed twice in its 422, 129 KB
MAX_TASK_ITEMS = 32

TaskNames = Annotated[Annotated[list[text(min_length=1, max_length=50)], Field(max_length=MAX_TASK_ITEMS)]
                      | Literal["all"], WrapValidator(_task_names)]


def _as_utc_in_range(at: datetime) -> datetime:
    try:
        return as_utc(at)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is past the last datetime in UTC
        raise ValueError("out of range once converted to UTC") from None


def _not_a_number(value: Any) -> Any:
    # pydantic reads a number (or a string of digits) as Unix time: ?since=-1 would be 1969
    if isinstance(value, str) and len(value) > MAX_DATETIME_LENGTH:
        raise ValueError(f"must be an ISO 8601 date-time such as 2026-12-06T10:00:00Z: this is {len(value)} "
                         f"characters long, more than {MAX_DATETIME_LENGTH}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) or (
            isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("must be an ISO 8601 date-time such as 2026-12-06T10:00:00Z, not a number")
    return value


# Each digit has one place in a match (no nested or adjacent quantifiers over digits): the
# former (\d+\.?\d*|...) split a run of digits every way before failing, time quadratic in
# its length, on the event loop: ?since=111...1x (16 k digits) held every request 15 s
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*")
#: the longest date-time a query takes (2026-12-06T10:00:00.123456+05:30 is 32 characters)
MAX_DATETIME_LENGTH = 64

#: an aware UTC time (naive = UTC), in responses and queries; a 422 when UTC cannot represent it
UTCDateTime = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(_as_utc_in_range)]


def _digits(what: str):
    """A validator of a number given as text: plain decimal digits, nothing else."""

    def check(value: Any) -> Any:
        # pydantic's lax int reads "1.0", "+1", "01" and "1_0" (as 10) too
        # "0" passes: the field's own bounds (ge=1) say what is wrong with it
        if isinstance(value, str) and not (value.isascii() and value.isdigit()
                                           and (value[:1] != "0" or value == "0")):
            raise ValueError(f"must be {what}: decimal digits, no sign, no leading zero")
        return value

    return check


#: a version number in a path: plain decimal digits
VersionNumber = Annotated[int, BeforeValidator(_digits("a version number"))]
#: a positive whole number in a query (a page's size, an audit event's seq): plain decimal
#: digits, so ?seq=1_2 is not read as the anchor 12 nor ?limit=1_0 as 10
QueryNumber = Annotated[int, BeforeValidator(_digits("a whole number"))]
#: version numbers are stored in 32-bit integer columns; a larger number names no version
MAX_VERSION = 2**31 - 1
#: the most versions one page of GET /models/{name}/versions lists
MAX_VERSIONS_PAGE = 500
RequestStatus = Literal["queued", "running", "completed", "failed", "rejected"]


class DeletionCreate(BaseModel):
    """A request to erase an instance from a model: every task (``"all"``) or the tasks named."""

    model_config = ConfigDict(extra="forbid")

    instance_id: text(min_length=1, max_length=200)
    tasks: TaskNames = Field("all", description='task names, or "all" for every task not yet erased or pending')
    model: text(min_length=1, max_length=100) | None = Field(None, description="default: the service's model")
    reason: text(max_length=2000) | None = Field(
        None, description="why (kept with the request in the compliance record: no personal data)")
    subject_ref: text(max_length=200) | None = Field(
        None, description="the requester's reference, a ticket number say; it is written into the append-only "
                          "audit log, which nothing can erase: a pseudonymous reference, not a name or an e-mail")


class Links(BaseModel):
    self: str
    certificate: str


class DeletionAccepted(BaseModel):
    """The answer to an accepted request; replayed byte for byte for the same Idempotency-Key."""

    id: str
    status: Literal["queued"] = "queued"
    model: str
    instance_id: str
    tasks: list[str]
    reason: str | None
    subject_ref: str | None
    created_at: UTCDateTime
    links: Links


class DeletionOut(BaseModel):
    id: str
    status: RequestStatus | str
    model: str
    instance_id: str
    tasks: list[str]
    reason: str | None
    subject_ref: str | None
    submitted_by: str | None = Field(None, description="the API key that submitted it (null when the API has no keys)")
    progress: float
    job_id: str | None
    base_version: int | None
    produced_version: int | None
    metrics: dict[str, Any] | None
    error: str | None
    created_at: UTCDateTime
    updated_at: UTCDateTime
    completed_at: UTCDateTime | None
    links: Links


class DeletionPage(BaseModel):
    items: list[DeletionOut]
    next_cursor: str | None


class AuditEventOut(BaseModel):
    seq: int
    at: UTCDateTime
    kind: str
    model_name: str | None
    request_id: str | None
    instance_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None


class CertificateKey(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str = Field(description="first 16 hex digits of the sha256 of the raw public key")
    public_key: str = Field(description="the raw 32-byte public key, base64")


class ChainHead(BaseModel):
    seq: int
    hash: str


class ChainReport(BaseModel):
    ok: bool
    events: int = Field(description="events recomputed (up to and including the first bad one)")
    verified_from: int = Field(1, description="where the recomputation started: 1, or the seq after the anchor "
                                             "with after_anchor (past the end when nothing was appended since)")
    first_bad_seq: int | None
    reason: str | None
    head: ChainHead | None = Field(
        None, description="the verified end of the log (when ok and not empty): keep it outside the database and "
        "pass it back as ?seq=&hash= to check later that nothing up to it was rewritten")


class ModelOut(BaseModel):
    name: str
    dataset: dict[str, Any]
    dataset_key: str
    tasks: list[str]
    serving_version: int | None
    latest_version: int | None
    versions: int
    created_at: UTCDateTime


class VersionOut(BaseModel):
    """A version in a listing: its cells only counted (they are every cell of its lineage)."""

    model: str
    version: int
    parent_version: int | None
    job_id: str | None
    sha256: str
    artifact_uri: str
    deletions: list[Any] = Field(description="ids of the requests applied in this step")
    erased_cell_count: int = Field(description="how many cells are erased in this version's lineage")
    metrics: dict[str, Any] | None
    note: str | None
    serving: bool
    created_at: UTCDateTime
    purged_at: UTCDateTime | None = Field(
        None, description="when its weights were deleted from the store (they held erased data); null: stored")


class VersionDetail(VersionOut):
    erased_cells: list[Any] = Field(description="every cell erased in this version's lineage")
    ancestors: list[VersionOut] = Field(description="parent first, back toward the first version: at most "
                                        "?ancestors= (default and most 500) of them")
    older_ancestors: bool = Field(description="true: older ancestors were left out; the last one listed "
                                  "has them as its own ancestors (GET its detail)")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=MAX_VERSION, strict=True)  # strict: true is not version 1
    reapply_erasures: bool = Field(
        False, strict=True, description="when the target lacks erasures recorded since, erase them again on top of it (a new version)"
    )


class _JobFields(BaseModel):
    id: str
    model: str
    kind: str
    status: str
    method: str
    base_version: int
    produced_version: int | None
    progress: float
    attempts: int
    error: str | None
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    heartbeat_at: UTCDateTime | None
    finished_at: UTCDateTime | None


class JobSummary(_JobFields):
    """A job in a listing: without its metrics and parameters (a reapply's cells, after a
    rollback far back, are megabytes); ``GET /jobs/{id}`` has them."""

    links: dict[str, str] = Field(description="self: the job with its metrics and parameters")


class JobOut(_JobFields):
    metrics: dict[str, Any] | None
    params: dict[str, Any] | None


class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


JobStatus = Literal["queued", "running", "completed", "failed"]
JobKind = Literal["deletion", "reapply", "propagate"]


class PurgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    older_than_days: float | None = Field(
        None, ge=0, le=36500, allow_inf_nan=False, strict=True,
        description="only versions created more than this many days ago (a window for rollbacks with "
                    "reapply_erasures); null: every version that holds erased data")
    dry_run: bool = Field(False, strict=True, description="list what would be purged, delete nothing")


class PurgedVersionOut(BaseModel):
    version: int
    sha256: str | None = Field(description="null for a damaged artifact")
    created_at: UTCDateTime | None = Field(description="null for a damaged artifact")
    published: bool = Field(description="false: an artifact a job stored that no version points at")
    purged: bool = Field(description="false in a dry run")
    held_erasures: list[dict[str, Any]] = Field(description="the erasures its weights held: request, instance, tasks")
    damaged: str | None = Field(None, description="an unpublished artifact whose manifest cannot be read: what it "
                                                  "holds is unknown and nothing can publish it, so it goes whole")


class PurgeOut(BaseModel):
    model: str
    dry_run: bool
    versions: list[PurgedVersionOut]
    calibration_scores: int = Field(0, description="scores of erased cells the stored shadow calibration held: "
                                                   "taken out (counted only in a dry run)")


class RollbackOut(BaseModel):
    action: Literal["noop", "moved", "reapply"]
    model: str
    from_version: int | None
    to_version: int
    serving_version: int | None
    job: JobOut | None = None


class Problem(BaseModel):
    """An error: an RFC 9457 problem document (``application/problem+json``), with extras that
    name what was wrong (a validation error's ``errors``, the cells a conflict holds, ...)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="a URI naming the kind of problem, https://unlearnd.dev/problems/<slug>")
    title: str
    status: int
    detail: str = Field(description="what was wrong, in words")
    instance: str = Field(description="the path of the request")
    errors: list[dict[str, Any]] | None = Field(
        None, description="validation errors (422): each with loc (where), msg (what is expected) and type")


class Health(BaseModel):
    status: str
    revision: str | None = None


def links_for(request_id: str) -> Links:
    return Links(self=f"/deletions/{request_id}", certificate=f"/deletions/{request_id}/certificate")


def deletion_out(r) -> DeletionOut:
    return DeletionOut(
        id=r.id,
        status=r.status,
        model=r.model_name,
        instance_id=r.instance_id,
        tasks=r.tasks,
        reason=r.reason,
        subject_ref=r.subject_ref,
        submitted_by=r.submitted_by or None,
        progress=r.progress,
        job_id=r.job_id,
        base_version=r.base_version,
        produced_version=r.produced_version,
        # rows written before requests kept their own share held every cell of the job
        metrics=request_metrics(r.metrics, [[r.instance_id, t] for t in r.tasks]),
        error=r.error,
        created_at=r.created_at,
        updated_at=r.updated_at,
        completed_at=r.completed_at,
        links=links_for(r.id),
    )


def deletion_accepted(r) -> DeletionAccepted:
    """Built from fields that never change, so a replay is identical to the first answer."""
    return DeletionAccepted(
        id=r.id,
        model=r.model_name,
        instance_id=r.instance_id,
        tasks=r.tasks,
        reason=r.reason,
        subject_ref=r.subject_ref,
        created_at=r.created_at,
        links=links_for(r.id),
    )


def version_out(v, serving: int | None) -> VersionOut:
    return VersionOut(
        model=v.model_name,
        version=v.version,
        parent_version=v.parent_version,
        job_id=v.job_id,
        sha256=v.sha256,
        artifact_uri=v.artifact_uri,
        deletions=v.deletions or [],
        erased_cell_count=v.erased_cell_count,
        metrics=v.metrics,
        note=v.note,
        serving=v.version == serving,
        created_at=v.created_at,
        purged_at=v.purged_at,
    )


def _job_fields(j) -> dict:
    return dict(id=j.id, model=j.model_name, kind=j.kind, status=j.status, method=j.method,
                base_version=j.base_version, produced_version=j.produced_version, progress=j.progress,
                attempts=j.attempts, error=j.error, created_at=j.created_at, started_at=j.started_at,
                heartbeat_at=j.heartbeat_at, finished_at=j.finished_at)


def job_summary(j) -> JobSummary:
    return JobSummary(**_job_fields(j), links={"self": f"/jobs/{j.id}"})


def job_out(j) -> JobOut:
    return JobOut(**_job_fields(j), metrics=j.metrics, params=j.params)
