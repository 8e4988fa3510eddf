"""The API process: ``create_app(settings)`` builds the FastAPI app.

Run with ``unlearnd serve`` (which migrates first) or
``uvicorn app.main:create_app --factory``.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from sqlalchemy.orm import sessionmaker

from worker.db import engine_for, read_only
from worker.settings import Settings, get_settings
from worker.signing import load_signer

from .auth import require_deletions, require_read, require_read_or_admin
from .guards import BodyLimitMiddleware, HeadAsGetMiddleware, NoStoreMiddleware, known_query_parameters
from .metrics import HttpMetricsMiddleware, build_registry
from .problems import document_problems, install_problem_handlers
from .routes import audit, certificates, deletions, health, jobs, models

log = logging.getLogger(__name__)

DESCRIPTION = """Deletion requests for multi-task vision models: accept a request,
unlearn it in the background, prove it (audit chain, certificates), manage
versions. Errors are RFC 9457 problem documents (`application/problem+json`).
With API keys configured (`UNLEARND_API_KEYS`), send `Authorization: Bearer <token>`:
the scope `deletions` submits and reads deletion requests, `read` reads models, jobs and
the audit log, `admin` does everything, rollback included."""


def _start_background(settings: Settings):
    try:
        from worker.background import start_background
    except ImportError as exc:
        log.error(
            "background work is on (settings.background) but worker.background is not importable (%s): "
            "no outbox relay and no in-process worker run in this process",
            exc,
        )
        return None
    return start_background(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over the database at ``settings.database_url`` (default: the environment's settings).

    With ``settings.background`` the outbox relay (and, without a broker, an
    in-process worker) runs in this process between startup and shutdown.
    Migrations are not run here: ``unlearnd serve`` / ``worker.migrate`` do that.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = _start_background(settings) if settings.background else None
        app.state.background = stop  # /readyz reports a background thread that ended
        try:
            yield
        finally:
            if stop is not None:
                stop()

    # redirect_slashes off: /models/ was a 307 to an absolute http URL built from the Host header
    # (wrong behind a TLS proxy, and sent before the API key was checked); now a 404 problem
    app = FastAPI(title="unlearnd", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url="/docs",
                  redirect_slashes=False)
    app.state.settings = settings
    app.state.engine = engine_for(settings.database_url)
    app.state.sessions = sessionmaker(app.state.engine, expire_on_commit=False)
    app.state.readers = sessionmaker(read_only(app.state.engine), expire_on_commit=False)  # GET routes, /metrics
    app.state.registry, http_metrics = build_registry(app.state.readers)
    # certificates are signed when a key is configured (worker.signing); a bad key file fails here
    app.state.signer = load_signer(settings.certificate_key_file) if settings.certificate_key_file else None

    install_problem_handlers(app)
    openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or document_problems(openapi())  # errors are problem documents
    app.add_middleware(HeadAsGetMiddleware)  # innermost: the routes see GET
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.add_middleware(NoStoreMiddleware)  # outermost: problem documents and 413s get it too
    # the API key's scope first (app.auth; models: reading is `read`, a rollback or a purge `admin`)
    for module, scope in ((deletions, require_deletions), (audit, require_read), (models, require_read_or_admin),
                          (jobs, require_read)):
        app.include_router(module.router, dependencies=[Depends(scope), Depends(known_query_parameters)])
    app.include_router(certificates.router, dependencies=[Depends(known_query_parameters)])  # public, no key
    # probes and scrapers may add query strings of their own (cache busting, ?name[]= filters)
    app.include_router(health.router)
    return app
