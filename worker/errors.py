"""The rule functions' refusals. Each carries an HTTP-ish status, a short title,
a detail sentence and extras that name what was wrong; ``app.problems`` turns
them into RFC 9457 problem documents, other callers (CLI, jobs) just read them."""
from __future__ import annotations


class ServiceError(Exception):
    status = 400
    title = "Bad request"
    slug = "bad-request"

    def __init__(self, detail: str, **extras):
        super().__init__(detail)
        self.detail = detail
        self.extras = extras


class NotFound(ServiceError):
    status = 404
    title = "Not found"
    slug = "not-found"


class Invalid(ServiceError):
    """The request is well formed but names something that does not exist or does not fit."""

    status = 422
    title = "Invalid request"
    slug = "invalid-request"


class DatasetUnavailable(ServiceError):
    """The model's dataset cannot be loaded on this host (a folder moved, a file unreadable): the
    request was not checked against it, so nothing was stored. A server-side fault, not the
    client's: waiting does not mend it (no Retry-After); the log names the cause."""

    status = 503
    title = "Service unavailable"
    slug = "dataset-unavailable"


class Conflict(ServiceError):
    """The request clashes with the current state (erased or pending cells, unsafe rollback, not yet completed)."""

    status = 409
    title = "Conflict"
    slug = "conflict"
