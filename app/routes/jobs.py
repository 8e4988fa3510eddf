"""Unlearning jobs (deletion batches and rollback reapplies)."""
from __future__ import annotations

from fastapi import APIRouter

from worker.versions import get_job

from ..deps import ReadSessionDep
from ..schemas import JobOut, Text, job_out

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut)
def read_job(job_id: Text, session: ReadSessionDep) -> JobOut:
    with session.begin():
        return job_out(get_job(session, job_id))
