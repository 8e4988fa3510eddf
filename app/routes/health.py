"""Liveness, readiness and the Prometheus endpoint."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.db import read_only
from worker.migrate import current_revision, head_revision

from ..guards import StrictJSONRoute
from ..problems import problem
from ..schemas import Health

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"], route_class=StrictJSONRoute)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:  # on the event loop: answers while the threadpool waits on the database
    """The process is up (no dependency is checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "database unreachable or not migrated, or background work ended"}})
def readyz(request: Request):
    """Ready when the database answers and is at the head migration, and the process's
    background threads (the outbox relay, the sweeper, the in-process worker) still run;
    503 problem otherwise."""
    engine = read_only(request.app.state.engine)  # on SQLite: no wait for the write lock
    head = head_revision()
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    except Exception as exc:
        log.warning("readyz: database unreachable: %s", exc)
        return problem(request, 503, "Not ready", "the database is unreachable", "not-ready",
                       headers={"Retry-After": "5"}, reason="database")  # as every other route's 503
    if revision != head:
        return problem(
            request,
            503,
            "Not ready",
            f"the database is at revision {revision}, not {head}; run `unlearnd migrate`",
            "not-ready",
            headers={"Retry-After": "5"},
            reason="migrations",
            revision=revision,
            head=head,
        )
    background = getattr(request.app.state, "background", None)
    if background is None and request.app.state.settings.background and hasattr(request.app.state, "background"):
        dead = ["all (they did not start)"]  # background work is on, and worker.background did not import
    else:
        dead = background.dead() if background is not None else []
    if dead:  # nothing restarts them: the outbox would not be relayed, or no deletion run here
        log.error("readyz: background thread(s) %s ended; restart the process", ", ".join(dead))
        return problem(request, 503, "Not ready", f"background work of this process ended: {', '.join(dead)}; "
                       "restart it (its log says why)", "not-ready", reason="background", threads=dead)
    return Health(status="ready", revision=revision)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
