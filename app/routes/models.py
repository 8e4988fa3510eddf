"""Models and their versions: list, inspect with lineage, roll back, purge."""
from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from model_store import StoreError, store_for
from unlearning.data import dataset_key
from worker.versions import (ancestors, get_version, list_models, list_versions, purge_refused, purge_versions,
                             redact_calibration, check_weights_first, rollback, serving_version)

from ..auth import AdminCaller, require_read
from ..deps import ReadSessionDep, SessionDep, SettingsDep
from ..guards import StrictJSONRoute
from ..schemas import (
    MAX_VERSION,
    MAX_VERSIONS_PAGE,
    ModelName,
    ModelOut,
    PurgedVersionOut,
    PurgeIn,
    PurgeOut,
    QueryNumber,
    RollbackIn,
    RollbackOut,
    VersionNumber,
    VersionDetail,
    VersionOut,
    job_out,
    version_out,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictJSONRoute)
READ = [Depends(require_read)]  # API keys: reading takes `read`, a rollback `admin` (app.auth)


@router.get("", response_model=list[ModelOut], dependencies=READ)
def read_models(session: ReadSessionDep) -> list[ModelOut]:
    with session.begin():
        return [
            ModelOut(
                name=s.model.name,
                dataset=s.model.dataset,
                dataset_key=dataset_key(s.model.dataset),
                tasks=s.model.tasks,
                serving_version=s.serving_version,
                latest_version=s.latest_version,
                versions=s.versions,
                created_at=s.model.created_at,
            )
            for s in list_models(session)
        ]


@router.get("/{name}/versions", response_model=list[VersionOut], dependencies=READ,
            responses={200: {"headers": {"Link": {
                "description": 'when more versions follow: <the next page\'s URL>; rel="next" (RFC 8288)',
                "schema": {"type": "string"}}}}})
def read_versions(
    name: ModelName,
    session: ReadSessionDep,
    request: Request,
    response: Response,
    after: Annotated[VersionNumber, Query(ge=0, le=MAX_VERSION, description="list the versions numbered above this")] = 0,
    limit: Annotated[QueryNumber, Query(ge=1, le=MAX_VERSIONS_PAGE)] = MAX_VERSIONS_PAGE,
) -> list[VersionOut]:
    """The versions of a model in version order, at most ``limit`` (500) a page; when more
    follow, the ``Link`` header names the next page (``?after=<the last version listed>``)."""
    with session.begin():
        rows, more = list_versions(session, name, after=after, limit=limit)
        serving = serving_version(session, name)
        if more:
            # from the decoded path, not request.url, which re-reads the raw query string
            response.headers["Link"] = f'<{quote(request.scope["path"])}?after={rows[-1].version}&limit={limit}>; rel="next"'
        return [version_out(v, serving) for v in rows]


@router.get("/{name}/versions/{version}", response_model=VersionDetail, dependencies=READ)
def read_version(
    name: ModelName,
    version: Annotated[VersionNumber, Path(ge=1, le=MAX_VERSION)],
    session: ReadSessionDep,
    ancestors_limit: Annotated[QueryNumber, Query(alias="ancestors", ge=0, le=MAX_VERSIONS_PAGE)] = MAX_VERSIONS_PAGE,
) -> VersionDetail:
    """One version with its lineage: parent, deletions applied, erased cells, metrics, artifact,
    ancestors (without their cells: each ancestor's are a subset of this version's), the nearest
    ``ancestors`` (500) of them; ``older_ancestors`` says more precede the last one listed, whose
    own detail lists them."""
    with session.begin():
        row = get_version(session, name, version)
        serving = serving_version(session, name)
        parents, older = ancestors(session, row, limit=ancestors_limit)
        return VersionDetail(
            **version_out(row, serving).model_dump(),
            erased_cells=row.erased_cells or [],
            ancestors=[version_out(a, serving) for a in parents],
            older_ancestors=older,
        )


@router.post(
    "/{name}/rollback",
    response_model=RollbackOut,
    responses={202: {"model": RollbackOut, "description": "a reapply job was queued; it publishes a new version",
                     # sent with every 202 (post_rollback): undocumented, generated clients did not expose it
                     "headers": {"Location": {"description": "the reapply job's URL (/jobs/{id})",
                                              "schema": {"type": "string"}}}},
               409: {"description": "the version holds data erased since (without reapply_erasures), was purged, "
                                    "is not in the model store as recorded, or a job of the model is under way"}},
)
def post_rollback(
    name: ModelName, body: RollbackIn, session: SessionDep, settings: SettingsDep, caller: AdminCaller
) -> JSONResponse:
    """Serve an earlier version. 200 when the alias moved (or already pointed there);
    409 naming the erasures the target still contains, unless ``reapply_erasures``:
    then 202 with the queued reapply job (the same job when that request is sent again while
    it is under way). 409, nothing moved or queued, when the model store does not hold the
    target as recorded (its manifest with the recorded sha256, weights that match it)."""
    store = store_for(settings.store_dir)
    weights = check_weights_first(settings, store, name, body.version)  # hashed before any lock is taken
    with session.begin():
        outcome = rollback(session, settings, name, body.version, body.reapply_erasures, actor=caller,
                           store=store, weights=weights)
        out = RollbackOut(
            action=outcome.action,
            model=outcome.model_name,
            from_version=outcome.from_version,
            to_version=outcome.to_version,
            serving_version=serving_version(session, name),
            job=job_out(outcome.job) if outcome.job else None,
        )
    status = 202 if outcome.action == "reapply" else 200
    headers = {"Location": f"/jobs/{outcome.job.id}"} if outcome.job else None
    return JSONResponse(out.model_dump(mode="json"), status_code=status, headers=headers)


@router.post("/{name}/purge", response_model=PurgeOut,
             responses={409: {"description": "the model store does not hold the versions the record names, or "
                                             "refused to delete one (store_state)"}})
def post_purge(name: ModelName, session: SessionDep, settings: SettingsDep, caller: AdminCaller,
               body: PurgeIn | None = None) -> PurgeOut:
    """Delete from the model store the weights that still hold erased data: every
    version but the serving one, a queued or running job's base and those that hold
    none (safe rollback targets), and the artifacts no version points at; with
    ``older_than_days``, only what is older than that. The versions' records stay, with
    ``purged_at`` and a ``model.version_purged`` audit event; a purged version cannot be
    rolled back to. The stored shadow calibration loses its erased cells' scores
    (``calibration_scores``, a ``model.calibration_redacted`` event). 409, nothing deleted,
    when the store does not hold the versions the record names; 409 with ``store_state``,
    nothing recorded, when the store refuses to delete one part way (:func:`purge_refused`).
    The body may be left out. Admin scope."""
    body = body or PurgeIn()
    from datetime import timedelta

    from worker.tables import utcnow

    before = None if body.older_than_days is None else utcnow() - timedelta(days=body.older_than_days)
    try:
        with session.begin():
            store = store_for(settings.store_dir)
            # the calibration first: its file records what was taken out (a failure later is made up
            # by the next purge), while a damaged artifact purge_versions deletes leaves nothing
            scores = redact_calibration(session, store, name, dry_run=body.dry_run, actor=caller)
            found = purge_versions(session, store, name, created_before=before, dry_run=body.dry_run, actor=caller)
            out = PurgeOut(model=name, dry_run=body.dry_run, calibration_scores=scores, versions=[
                PurgedVersionOut(version=c.version, sha256=c.sha256, created_at=c.created_at, published=c.published,
                                 purged=c.purged, held_erasures=c.erasures, damaged=c.damaged) for c in found])
    except (StoreError, OSError) as exc:  # was a 500 saying nothing; the CLI prints the reason
        raise purge_refused(name, exc, settings.store_dir) from exc
    if any(c.purged for c in found):  # the embedded worker's caches live in this process
        from worker.jobs import forget_purged_versions

        try:
            forget_purged_versions(settings)
        except Exception:  # noqa: BLE001 - the purge committed: a 503 said "nothing was stored"
            log.warning("purge of %s: dropping this process's engine caches of the purged versions failed; "
                        "the worker drops them before its next job", name, exc_info=True)
    return out
