"""Limits on what a request may carry, checked before a route runs: the body's size, a
JSON body's names given once, its media type and encoding, the query parameters a route
knows, a web browser's state-changing request from elsewhere (:func:`browser_refusal`);
and HEAD, answered as GET without the body."""
from __future__ import annotations

import json
import sys
import types
import typing

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from unlearning.jsonio import RepeatedName, no_repeated_names
from worker.errors import ServiceError

#: the largest request body read (the largest valid one, a deletion with every field at
#: its limit, is under 3 KiB); a larger one is a 413 before it is read in full
MAX_BODY_BYTES = 64 * 1024


class BodyLimitMiddleware:
    """Refuse a request body over ``max_bytes`` with a 413 problem: at once when its
    Content-Length says so, else as soon as the chunks read exceed it."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = StarletteHTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.app(scope, _refusing(too_large), send)
            return
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, counted, send)


class HeadAsGetMiddleware:
    """Answer ``HEAD`` on every ``GET`` route (RFC 9110 §9.3.2): the route runs as ``GET``
    and its status and headers (``Content-Length`` included) go out without the body.
    FastAPI's routes take only the methods they declare, so HEAD was a 405. The scope is
    changed in place and its method put back afterwards, so the outer middleware (metrics)
    sees the route that matched and counts the request as HEAD."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


class NoStoreMiddleware:
    """``Cache-Control: no-store`` on every answer that sets none: job states, the serving
    version, readiness and problem documents change from one request to the next, and a
    cache (a browser, a proxy) must not answer for the service."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def no_store(message):
            if message["type"] == "http.response.start" and not any(
                    k.lower() == b"cache-control" for k, _ in message.get("headers", [])):
                message = {**message, "headers": [*message.get("headers", []), (b"cache-control", b"no-store")]}
            await send(message)

        await self.app(scope, receive, no_store)


def _no_constant(name: str) -> typing.NoReturn:
    # raised as the parser's own error: FastAPI's json_invalid names it (app.problems)
    raise json.JSONDecodeError(f"{name} is not JSON; a number is finite", name, 0)


class StrictJSONRequest(Request):
    """A request whose JSON body is read as a gateway or a log reading strict JSON reads it:

    - a name given twice in one object is refused. ``json.loads`` keeps the last of
      ``{"instance_id": "a", "instance_id": "b"}``, so the service would erase ``b`` while
      a reader that keeps the first records ``a`` (as for a query parameter or an
      ``Authorization`` header given twice);
    - the body is UTF-8 (RFC 8259; a leading byte-order mark is allowed). ``json.loads``
      given bytes also decodes UTF-16 and UTF-32, which such a reader cannot parse, so the
      service acted on a body nobody else could read;
    - ``NaN`` and ``Infinity`` are not JSON either;
    - a body declared in another ``charset`` than UTF-8 is refused by name (it was read as
      UTF-8 whatever it said, and acted on), and an integer too long for the parser
      (Python's 4300 digits) is named (the answer blamed the nesting or the encoding)."""

    async def json(self) -> typing.Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            charset = _charset(self.headers.get("content-type", ""))
            if charset is not None and charset not in ("utf-8", "utf8", "us-ascii", "ascii"):  # ASCII is UTF-8
                raise json.JSONDecodeError(f"a body declared charset={charset} is not JSON this API reads: send "
                                           "UTF-8 (charset=utf-8, or no charset)", "", 0)
            text = body.decode("utf-8-sig")  # UnicodeDecodeError: FastAPI's 400, "not valid JSON (UTF-8, ...)"
            try:
                self._json = json.loads(text, object_pairs_hook=no_repeated_names, parse_constant=_no_constant)
            except RepeatedName as exc:  # FastAPI turns a JSONDecodeError into its json_invalid error
                raise json.JSONDecodeError(str(exc), text, 0) from None
            except ValueError as exc:
                if isinstance(exc, json.JSONDecodeError) or "digits" not in str(exc):
                    raise
                raise json.JSONDecodeError(f"a number of more than {sys.get_int_max_str_digits()} digits is not "
                                           "JSON this API takes", text, 0) from None
        return self._json


def _charset(content_type: str) -> str | None:
    """The ``charset`` parameter of a Content-Type header, lower-cased and unquoted, or None."""
    for part in content_type.split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _key_check(dependant) -> typing.Callable | None:
    """The first key check (:data:`app.auth.KEY_CHECKS`) among a route's dependencies."""
    from .auth import KEY_CHECKS

    for dep in dependant.dependencies:
        if dep.call in KEY_CHECKS:
            return dep.call
        found = _key_check(dep)
        if found is not None:
            return found
    return None


async def _unreadable_json(request: StrictJSONRequest) -> bool:
    """Whether a JSON body of ``request`` is there and cannot be read (FastAPI answers it
    with a 400 before any dependency runs); the body read stays cached on ``request``."""
    from .problems import is_json_media

    if not is_json_media(request.headers.get("content-type", "").split(";")[0].strip().lower()):
        return False
    if not await request.body():
        return False
    try:
        await request.json()
    except Exception:  # not JSON, a name twice, not UTF-8, nested too deep, an integer too long
        return True
    return False


#: the methods that change state (the API's are POSTs)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _authority(host: str, scheme: str | None = None) -> tuple[str, int | None]:
    """``host[:port]`` as (lower-cased host, port); a URL scheme's default port is made explicit."""
    name, port = host.strip().lower(), None
    if name.startswith("["):  # [::1]:8000
        end = name.find("]")
        name, rest = name[1:end], name[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif name.count(":") == 1:
        name, _, digits = name.partition(":")
        port = int(digits) if digits.isdigit() else None
    if port is None and scheme in ("http", "https"):
        port = 80 if scheme == "http" else 443
    return name.rstrip("."), port


def is_loopback(name: str) -> bool:
    """Whether a Host header's name is this machine: localhost, a 127.x.y.z address or ::1."""
    import ipaddress

    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def browser_refusal(request: Request):
    """Why a state-changing request a web browser sent is refused (None when it is not).

    The API's callers are programs (a privacy portal's backend, ``curl``), which send no
    ``Origin`` or ``Sec-Fetch-Site``; a browser sends them with every POST. Without API keys
    (the embedded default, on the loopback) any page the operator had open could otherwise
    act on the service: a form posted to ``/models/{name}/purge`` (an empty body needs no
    preflight) deleted stored weights for good, and a page whose name was re-pointed at
    127.0.0.1 (DNS rebinding) is same-origin to the browser and could submit, roll back or
    purge. So, for POST, PUT, PATCH and DELETE:

    - ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another port of the host included) is refused;
    - an ``Origin`` that is not the request's own (its ``Host``) is refused;
    - without API keys, a browser's request (it sent an ``Origin``) to a ``Host`` that is not
      a loopback name is refused: set API keys to serve browsers under other names
      (a browser cannot send a key a page does not hold).

    An ``Origin`` the operator lists in ``UNLEARND_ALLOWED_ORIGINS`` passes all three: a
    reverse proxy that rewrites ``Host`` (nginx's default, ``$proxy_host``) made every
    browser request through it look cross-origin, the API docs' page included.
    """
    if request.method not in UNSAFE_METHODS:
        return None
    from .auth import Forbidden

    origin = request.headers.get("origin")
    if origin is not None and origin.strip().lower().rstrip("/") in request.app.state.settings.allowed_origins:
        return None  # the operator's own (UNLEARND_ALLOWED_ORIGINS): behind a proxy that rewrites Host
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return Forbidden(f"a web browser sent this request from another site (Sec-Fetch-Site: {site}); the API "
                         "takes requests that change state from programs, not from web pages",
                         refused="cross-site-request")
    if origin is None:
        return None
    from urllib.parse import urlsplit

    host = request.headers.get("host", "")
    try:
        sent = urlsplit(origin.strip())
        own = _authority(sent.netloc, sent.scheme) == _authority(host, sent.scheme) and bool(sent.netloc)
    except ValueError:
        own = False
    if not own:
        return Forbidden(f"a web browser sent this request from the origin {origin!r}, not from this service's "
                         f"({host!r}); the API takes requests that change state from programs, not from web pages",
                         refused="cross-origin-request")
    if not request.app.state.settings.api_keys and not is_loopback(_authority(host)[0]):
        return Forbidden(f"without API keys (UNLEARND_API_KEYS) a web browser's request is taken on a loopback "
                         f"name alone (localhost, 127.0.0.1, [::1]), not {host!r}: a page re-pointed at this "
                         "machine (DNS rebinding) could act on the service; set API keys",
                         refused="browser-without-keys")
    return None


class UnsupportedMedia(ServiceError):
    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


def body_refusal(request: Request, takes_body: bool):
    """Why a request's body is refused before it is read (None when it is not): a
    ``Content-Encoding`` (a gzip body was answered "not valid JSON", one labelled ``br`` but
    sent plain was taken), or, on a route that takes a JSON body, a Content-Type that is not
    JSON on a body that may be empty: an empty ``text/plain`` or form POST to
    ``/models/{name}/purge`` (whose body is optional) ran a purge."""
    from .problems import is_json_media

    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        return UnsupportedMedia(f"the request body must not be encoded (Content-Encoding: {coding}); send it as "
                                "it is", content_encoding=coding)
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    if takes_body and declared is not None and not is_json_media(media):
        return UnsupportedMedia(f"the request body must be application/json, got {media or 'an empty Content-Type'}")
    return None


class StrictJSONRoute(APIRoute):
    """The route class of every router: its handler reads the body as :class:`StrictJSONRequest`.

    FastAPI parses a JSON body before it resolves the route's dependencies, so a body that
    is not JSON was a 400 for a caller without a key (or without the route's scope) while
    any other mistake of theirs is a 401 or 403 first: the route's key check runs before
    such a body is answered."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        check = _key_check(self.dependant)
        takes_body = bool(self.dependant.body_params)

        async def strict(request: Request):
            request = StrictJSONRequest(request.scope, request.receive)
            refusal = browser_refusal(request)  # before the key: a browser holds none to check
            if refusal is not None:
                raise refusal
            refusal = body_refusal(request, takes_body)
            if check is not None and request.app.state.settings.api_keys and (
                    refusal is not None or await _unreadable_json(request)):
                from .auth import check_key

                await check_key(check, request)  # a 401 or 403; the caller may: the 415, the handler's 400
            if refusal is not None:
                raise refusal
            return await handler(request)

        return strict


def _refusing(error: Exception):
    async def receive():
        raise error

    return receive


#: the unknown query parameters a 422 names one by one (the rest are counted)
UNKNOWN_NAMED = 10


def known_query_parameters(request: Request) -> None:
    """A 422 naming a query parameter the route does not take: a misspelt filter
    (``?instance=`` for ``?instance_id=``) would otherwise be ignored and an audit
    query answer with every record. So is one that takes a single value given twice:
    ``?instance_id=a&instance_id=b`` filtered by ``b`` alone, as if ``a`` had no records."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names(dependant)
    unknown = [k for k in dict.fromkeys(request.query_params.keys()) if k not in known]
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        errors = [{"loc": ("query", k), "msg": f"unknown query parameter; this route takes: {allowed}",
                   "type": "extra_forbidden"} for k in unknown[:UNKNOWN_NAMED]]
        if len(unknown) > UNKNOWN_NAMED:  # 2,000 names made a 540 KB answer
            errors.append({"loc": ("query",), "type": "extra_forbidden",
                           "msg": f"and {len(unknown) - UNKNOWN_NAMED} more unknown query parameters"})
        raise RequestValidationError(errors)
    repeated = [k for k in dict.fromkeys(request.query_params.keys())
                if not known[k] and len(request.query_params.getlist(k)) > 1]
    if repeated:
        raise RequestValidationError([
            {"loc": ("query", k), "type": "repeated_parameter",
             "msg": f"given {len(request.query_params.getlist(k))} times; this parameter takes one value"}
            for k in repeated
        ])


def _takes_several(annotation) -> bool:
    """Whether a query parameter annotated so takes a list (``list[str]``, ``list[str] | None``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_several(a) for a in typing.get_args(annotation))
    return origin in (list, set, tuple, frozenset)


def _query_names(dependant) -> dict[str, bool]:
    """The query parameters of a route, its own and its dependencies', each with whether
    it takes several values (a list: ``?x=1&x=2``)."""
    names = {p.alias: _takes_several(p.field_info.annotation) for p in dependant.query_params}
    for sub in dependant.dependencies:
        names.update(_query_names(sub))
    return names
