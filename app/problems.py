"""Every error as an RFC 9457 problem document (``application/problem+json``):
``type``, ``title``, ``status``, ``detail``, ``instance`` and extras that name
what was wrong. Covers the rule functions' refusals, FastAPI's validation
errors, values the database refuses, unknown routes and unexpected failures."""
from __future__ import annotations

import json
import logging
from urllib.parse import quote_from_bytes

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from worker.errors import ServiceError
from worker.settings import said_in_words

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: problem types are URIs under this base (documentation pages, one per slug)
TYPE_BASE = "https://unlearnd.dev/problems/"


class ProblemResponse(JSONResponse):
    """A problem document. It echoes parts of the request (a route, a field, a task name),
    so a string UTF-8 cannot encode (a lone surrogate) is written as a JSON escape."""

    media_type = PROBLEM_JSON

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _path(request: Request) -> str:
    """The request's path as the server decoded it. ``request.url`` builds the whole URL,
    query string included, as UTF-8: a raw byte that is not (``?x=\\xff``, which some
    servers pass on) raised inside the error handler itself, and no answer went out."""
    return request.scope.get("path") or "/"


def _instance(request: Request) -> str:
    """A problem's ``instance``: the path, each character that is not printable percent-encoded
    again (``/no%00such``): it is a URI reference, and a client printing it was handed the raw
    NUL or terminal escape the ``detail`` escapes (:func:`printable`)."""
    path = _path(request)
    return path if path.isprintable() else "".join(c if c.isprintable() else _percent(c) for c in path)


def _percent(c: str) -> str:
    """``c`` percent-encoded as the bytes it was decoded from (a byte that was not UTF-8 is a
    lone surrogate from ``surrogateescape``)."""
    try:
        raw = c.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = c.encode("utf-8", "surrogatepass")
    return quote_from_bytes(raw, safe="")


def printable(text: str) -> str:
    """``text`` with each character that is not printable (NUL, another control character, a
    lone surrogate, a bidi override) written as ``repr`` writes it (``\\x00``, ``\\n``,
    ``\\u202e``), as the details that quote a value with ``!r`` already show it: a detail echoes
    the request (a path, a parameter's or a field's name, a Content-Type), and a client or log
    that prints it was handed the raw character (a NUL ending a C string, a terminal escape)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: the most characters of one echoed string (an extra) and of a detail: a problem echoes the
#: request (an id in the path, a cursor), and a 60 KB cursor came back whole, twice
MAX_ECHO = 256
MAX_DETAIL = 2000


def bounded(value, limit: int = MAX_ECHO):
    """``value`` with each string in it (in lists and dicts too) longer than ``limit`` cut to
    ``limit`` characters and marked with how many were left out."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}… ({len(value) - limit} more characters)"
    if isinstance(value, list):
        return [bounded(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: bounded(v, limit) for k, v in value.items()}
    return value


def problem(
    request: Request, status: int, title: str, detail: str, slug: str, headers: dict | None = None, **extras
) -> JSONResponse:
    body = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": bounded(printable(detail), MAX_DETAIL),
        "instance": bounded(_instance(request), MAX_DETAIL),
        **bounded(jsonable_encoder(extras)),
    }
    return ProblemResponse(body, status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return problem(request, exc.status, exc.title, exc.detail, exc.slug, headers=getattr(exc, "headers", None),
                   **exc.extras)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": said_in_words(e), "type": e.get("type")} for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        # app.guards.StrictJSONRequest's own refusals (a name given twice, NaN) say what is wrong
        strict = [e["ctx"]["error"] for e in exc.errors() if e.get("type") == "json_invalid" and any(
            says in str((e.get("ctx") or {}).get("error")) for says in ("given twice", "is not JSON"))]
        detail = f"the request body is not valid JSON for this API: {strict[0]}" if strict else \
            "the request body is not valid JSON"
        return problem(request, 400, "Malformed JSON", detail, "malformed-json", errors=errors)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not is_json_media(media) and any(e["loc"][:1] == ["body"] for e in errors):
        # FastAPI reads a body of another type, or of none (strict_content_type), as raw
        # bytes and reports it as a body of the wrong shape; the mistake is the type
        return problem(request, 415, "Unsupported media type",
                       f"the request body must be application/json, got {media or 'no Content-Type'}",
                       "unsupported-media-type")
    if any(e["loc"] == ["body"] and e["type"] == "missing" for e in errors):
        # a JSON body of no bytes at all, which FastAPI reports as a missing field "body"
        return problem(request, 400, "Malformed JSON", "the request body is empty; send a JSON object",
                       "malformed-json")
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return problem(request, 422, "Validation failed", detail, "validation-error", errors=errors)


def is_json_media(media: str) -> bool:
    """Whether ``media`` (a Content-Type without parameters) is JSON: application/json or application/*+json."""
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


_HTTP_SLUGS = {404: ("Not found", "not-found"), 405: ("Method not allowed", "method-not-allowed"),
               413: ("Request body too large", "body-too-large"), 429: ("Too many requests", "too-many-requests")}
#: FastAPI's 400 when decoding the body failed outside the JSON parser's own errors
#: (bytes that are not UTF-8, arrays nested past the recursion limit)
_UNPARSABLE_BODY = "There was an error parsing the body"


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
        return problem(
            request, 400, "Malformed JSON", "the request body is not valid JSON (UTF-8, nested too deep)",
            "malformed-json",
        )
    title, slug = _HTTP_SLUGS.get(exc.status_code, ("HTTP error", f"http-{exc.status_code}"))
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.method} {_path(request)}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allow = _allowed_methods(request, (headers or {}).get("Allow"))
        if allow:
            headers = {**(headers or {}), "Allow": allow}
            detail = f"{request.method} is not allowed on {_path(request)}; allowed: {allow}"
    return problem(request, exc.status_code, title, detail, slug, headers=headers)


def _allowed_methods(request: Request, fallback: str | None = None) -> str | None:
    """Every method the API takes on this path (from its OpenAPI paths; a path left out of
    them, ``/metrics``, by Starlette's ``fallback``). Starlette's own Allow header names
    only the first route that matched the path (``/deletions``: POST, not GET)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(_path(request)):
            methods |= {m.upper() for m in operations}
    if not methods and fallback:
        methods = {m.strip().upper() for m in fallback.split(",") if m.strip()}
    if "GET" in methods:
        methods.add("HEAD")  # answered as GET without the body (guards.HeadAsGetMiddleware)
    return ", ".join(sorted(methods)) or None


async def _data_error(request: Request, exc: DataError) -> JSONResponse:
    # The database refused a value that validation let through (a NUL character, a number
    # out of range): the client's input, so a 422; the statement stays in the log only.
    log.warning("database refused a value on %s %s: %s", request.method, _path(request), exc.orig)
    return problem(
        request, 422, "Invalid request", "a value in this request cannot be stored or compared", "invalid-request"
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # the connection failed or was lost, or the database gave up (a lock timeout): nothing
    # was stored, and the same request may succeed shortly
    log.warning("database unavailable on %s %s: %s", request.method, _path(request), exc)
    return problem(request, 503, "Service unavailable", "the record (database) is unavailable; try again shortly",
                   "database-unavailable", headers={"Retry-After": "5"})


#: PostgreSQL's undefined_table and undefined_column: the record's schema is older than this
#: code (migrations not run yet, a rolling deploy), as SQLite's "no such table", an OperationalError
UNDEFINED_SCHEMA = {"42P01", "42703"}


async def _programming_error(request: Request, exc: ProgrammingError) -> JSONResponse:
    if getattr(exc.orig, "sqlstate", None) in UNDEFINED_SCHEMA:
        log.warning("the record's schema is missing or older than this code on %s %s: %s", request.method,
                    _path(request), exc.orig)
        return problem(request, 503, "Service unavailable", "the record (database) is not migrated to this "
                       "version's schema yet (`unlearnd migrate`, /readyz); try again shortly",
                       "database-unavailable", headers={"Retry-After": "5"})
    return await _unexpected(request, exc)


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # the client hung up before its body ended: nobody reads the answer; not a server error
    log.info("%s %s: the client closed the connection before its body ended; nothing was stored",
             request.method, _path(request))
    return problem(request, 400, "Bad request", "the connection closed before the request body ended; nothing "
                   "was stored", "client-disconnected")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, _path(request))
    # (answered by Starlette's outermost error middleware, outside app.guards.NoStoreMiddleware)
    return problem(request, 500, "Internal error", "the server failed to handle this request", "internal-error",
                   headers={"Cache-Control": "no-store"})


#: the errors every operation of a kind may answer, besides those it declares itself
_COMMON_PROBLEMS = {
    "security": {"401": "no API key, or not one of this service's (Authorization: Bearer <token>)",
                 "403": "the API key lacks the scope this route needs"},
    "requestBody": {"400": "the body is not JSON", "413": "the body is over the size limit",
                    "415": "the body is not application/json"},
}
#: the errors of every operation of these tags: the routers that check query strings
#: (guards.known_query_parameters) and, all but certificates, read or write the record
_TAG_PROBLEMS = {
    "query": ({"deletions", "models", "jobs", "audit", "certificates"},
              {"422": "a query parameter the route does not take, or one given twice"}),
    "record": ({"deletions", "models", "jobs", "audit"},
               {"503": "the record (database) is unavailable: nothing was stored; try again after Retry-After "
                       "seconds"}),
}


#: pydantic's constraint names, as FastAPI leaves them on parameters of a type with its own
#: schema (QueryNumber, VersionNumber), and JSON Schema's, which clients read
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(schema) -> None:
    """Rename ``ge``/``le``/``gt``/``lt`` in a parameter's schema (and its ``anyOf`` arms) to
    JSON Schema's keywords, in place: generated clients ignored them, and never saw limits."""
    if not isinstance(schema, dict):
        return
    for ours, theirs in _BOUNDS.items():
        if ours in schema:
            schema[theirs] = schema.pop(ours)
    for arm in schema.get("anyOf", ()):
        _json_schema_bounds(arm)


def document_problems(schema: dict) -> dict:
    """Document the errors of each operation of an OpenAPI ``schema`` (in place) as what they
    are, problem documents: FastAPI describes its 422 as ``application/json`` of its own
    shape (``HTTPValidationError``), which this service never sends."""
    from .schemas import Problem

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for part, problems in _COMMON_PROBLEMS.items():
                if operation.get(part):
                    for status, description in problems.items():
                        responses.setdefault(status, {"description": description})
            for tags, problems in _TAG_PROBLEMS.values():
                if tags & set(operation.get("tags", ())):
                    for status, description in problems.items():
                        responses.setdefault(status, {"description": description})
            if responses.get("503", {}).get("description") == _TAG_PROBLEMS["record"][1]["503"]:
                # the record's 503 (problems._database_unavailable) says when to try again
                responses["503"].setdefault("headers", {})["Retry-After"] = {
                    "description": "seconds to wait before trying again", "schema": {"type": "integer"}}
            for parameter in operation.get("parameters", ()):
                _json_schema_bounds(parameter.get("schema"))
            if "{" in path:
                responses.setdefault("404", {"description": "nothing of that name"})
            if "422" in responses and responses["422"].get("description") == "Validation Error":
                responses["422"]["description"] = "a value does not validate: the problem's errors name each"
            for status, response in responses.items():
                if status[:1] in ("4", "5") or status == "default":
                    response["content"] = dict(content)

    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(schema):
            components.pop(unused, None)
    return schema


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(ProgrammingError, _programming_error)
    app.add_exception_handler(InterfaceError, _database_unavailable)
    # every connection of the pool stayed busy for its timeout (30 s): too many requests at once
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
