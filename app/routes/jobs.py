"""Unlearning jobs (deletion batches, rollback reapplies, propagations): list and inspect."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from worker.queries import list_jobs
from worker.versions import get_job

from ..deps import ReadSessionDep
from ..guards import StrictJSONRoute
from ..schemas import JobKind, JobOut, JobPage, JobStatus, QueryNumber, Text, UTCDateTime, job_out, job_summary

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=StrictJSONRoute)


@router.get("", response_model=JobPage)
def read_jobs(
    session: ReadSessionDep,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    model: Text | None = None,
    since: Annotated[UTCDateTime | None, Query(description="created at or after (naive = UTC)")] = None,
    until: Annotated[UTCDateTime | None, Query(description="created before (naive = UTC)")] = None,
    limit: Annotated[QueryNumber, Query(ge=1, le=500)] = 50,
    cursor: Annotated[Text | None, Query(description="next_cursor of this list's previous page (opaque; another "
                                                     "list's cursor is a 422)")] = None,
) -> JobPage:
    """Jobs, newest first, filtered (``?status=failed`` for what needs an operator); pages
    follow ``next_cursor``. Without metrics and parameters: ``GET /jobs/{id}`` has them.
    ``created_at`` is stamped when a job is written, not when it commits, so polling with
    ``since`` may miss one that committed late (as for ``GET /deletions``). A cursor of
    another list (``/deletions``, ``/audit/events``) is a 422 naming it, as is one written
    before cursors named their list (restart from the first page, without a cursor)."""
    with session.begin():
        page = list_jobs(session, status=status, kind=kind, model=model, since=since, until=until, limit=limit,
                         cursor=cursor)
        return JobPage(items=[job_summary(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def read_job(job_id: Text, session: ReadSessionDep) -> JobOut:
    with session.begin():
        return job_out(get_job(session, job_id))
