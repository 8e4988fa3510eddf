"""API keys: who may call which route.

Off while ``settings.api_keys`` is empty (the embedded default serves 127.0.0.1
only). With keys configured (``UNLEARND_API_KEYS``), every route of the API
needs ``Authorization: Bearer <token>`` of a key that holds the route's scope:

- ``deletions``: submit deletion requests, read them and their certificates
  (what a privacy portal needs). A key that holds ``deletions`` but neither
  ``read`` nor ``admin`` sees only the requests it submitted: another
  submitter's request is a 404, as an unknown one, and lists leave them out;
- ``read``: models, versions and lineage, jobs, the audit log and its verification;
- ``admin``: everything, rollback included.

The probes (``/healthz``, ``/readyz``), the Prometheus scrape (``/metrics``) and
the API docs stay open. The service stores the sha256 of each token, never the
token; ``unlearnd api-key`` makes a token and its entry. The name of the key that
submitted a request or a rollback is written into its audit event (``actor``).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.errors import ServiceError
from worker.settings import ApiKey, Scope

log = logging.getLogger(__name__)

SCOPES: dict[str, str] = {
    "deletions": "submit deletion requests, read them and their certificates (its own only, without read or admin)",
    "read": "read models, versions, jobs and the audit log",
    "admin": "everything, rollback included",
}

_bearer = HTTPBearer(
    auto_error=False,  # a missing header is our 401 problem document, not FastAPI's 403
    description="A token made by `unlearnd api-key`; needed when UNLEARND_API_KEYS is set.",
)


class Unauthorized(ServiceError):
    status = 401
    title = "Unauthorized"
    slug = "unauthorized"

    def __init__(self, detail: str, error: str | None = None, **extras):
        super().__init__(detail, **extras)
        challenge = 'Bearer realm="unlearnd"' + (f', error="{error}"' if error else "")
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(ServiceError):
    status = 403
    title = "Forbidden"
    slug = "forbidden"


def new_token() -> str:
    """A random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def key_for_token(keys: dict[str, ApiKey], token: str) -> str | None:
    """The name of the key whose token this is, or None. Every key is compared, in constant time."""
    digest = token_sha256(token)
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(digest, key.token_sha256):
            found = name
    return found


def require(scope: Scope):
    """A dependency that lets a request through when authentication is off or its key holds
    ``scope`` (or ``admin``), and returns the key's name (None when off)."""

    def caller(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
        keys: dict[str, ApiKey] = request.app.state.settings.api_keys
        if not keys:
            return None
        sent = len(request.headers.getlist("authorization"))
        if sent > 1:  # the first was used; a proxy or a log that reads another would see another caller
            raise Unauthorized(f"send one Authorization header: Bearer <token>; this request has {sent}")
        if credentials is None:
            header = request.headers.get("authorization")
            detail = ("this API needs an API key: send Authorization: Bearer <token>" if not header
                      else "the Authorization header must be: Bearer <token>")
            raise Unauthorized(detail)
        name = key_for_token(keys, credentials.credentials)
        if name is None:
            raise Unauthorized("the bearer token is not a key of this service", error="invalid_token")
        held = keys[name].scopes
        if scope not in held and "admin" not in held:
            log.warning("API key %r (scopes %s) refused on %s %s: needs %r",
                        name, held, request.method, request.scope.get("path"), scope)
            refusal = Forbidden(f"API key {name!r} may not do this: it needs the scope {scope!r} "
                                f"({SCOPES[scope]}); it has {', '.join(held)}",
                                key=name, required_scope=scope, scopes=list(held))
            refusal.headers = {"WWW-Authenticate": f'Bearer realm="unlearnd", error="insufficient_scope", '
                                                   f'scope="{scope}"'}  # RFC 6750, section 3.1
            raise refusal
        return name

    caller.__name__ = f"require_{scope}"
    return caller


# one callable per scope, so a router's dependency and a route's parameter are the same
# dependency and FastAPI resolves it once per request
require_deletions = require("deletions")
require_read = require("read")
require_admin = require("admin")



def require_read_or_admin(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    """The models router's check, run before anything else of its routes: reading takes
    ``read``, a write (rollback, purge) ``admin``. Each route states its own scope too; this
    one only puts the key first, so that a route's other checks (an unknown query
    parameter, a 422) never answer a caller who would get a 401 or a 403."""
    check = require_read if request.method in ("GET", "HEAD") else require_admin
    return check(request, credentials)


#: the dependencies that check a caller's key (:class:`app.guards.StrictJSONRoute` runs a route's
#: first, before it answers a body that is not JSON)
KEY_CHECKS = (require_deletions, require_read, require_admin, require_read_or_admin)


async def check_key(check, request: Request) -> None:
    """Run the key check ``check`` (one of :data:`KEY_CHECKS`) on ``request`` outside
    FastAPI's dependency resolution: raises its 401 or 403."""
    check(request, await _bearer(request))


DeletionsCaller = Annotated[str | None, Depends(require_deletions)]
AdminCaller = Annotated[str | None, Depends(require_admin)]


def request_owner(request: Request, caller: DeletionsCaller) -> str | None:
    """The submitter whose requests this caller may see: None for every submitter (the API
    has no keys, or the key also holds ``read`` or ``admin``), else the key's own name. A
    portal's key then reads its own requests and certificates only: the requests of other
    submitters name other people (``subject_ref``, the instance)."""
    if caller is None:
        return None
    held = request.app.state.settings.api_keys[caller].scopes
    return None if "read" in held or "admin" in held else caller


RequestOwner = Annotated[str | None, Depends(request_owner)]
