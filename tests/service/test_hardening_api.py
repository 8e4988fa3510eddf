"""Inputs and races that used to end in a 500 or a half-written record, on both
databases: PostgreSQL (the conftest's database) and the embedded SQLite."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError

import worker.requests
from app.main import create_app
from worker.audit import append_event
from worker.db import transaction
from worker.tables import DeletionRequest, Job, utcnow

from .conftest import assert_problem, counts, on_sqlite, register_model


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request, settings, tmp_path):
    """(settings, registered model, client) over PostgreSQL or a fresh SQLite file.
    Server errors come back as responses (problem documents), not raised."""
    if request.param == "sqlite":
        settings = on_sqlite(settings, tmp_path)
    model = register_model(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield settings, model, client


def _submit_concurrently(client, bodies) -> Counter:
    codes: list[int] = []

    def post(body):
        codes.append(client.post("/deletions", json=body).status_code)

    threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(codes)


# --------------------------------------------------------------------------- atomic submission


def test_a_failed_submission_leaves_nothing_stored(backend, monkeypatch):
    # On SQLite the request row used to be committed by the savepoint's RELEASE alone.
    settings, model, client = backend

    def fail(*args, **kwargs):
        raise RuntimeError("failure after the request row was flushed")

    monkeypatch.setattr(worker.requests, "append_event", fail)
    r = client.post("/deletions", json={"instance_id": model.train_ids[0]}, headers={"Idempotency-Key": "k"})
    assert_problem(r, 500, "internal-error")
    assert r.headers["cache-control"] == "no-store"  # answered outside the no-store middleware
    stored = counts(settings)
    assert (stored["deletion_requests"], stored["audit_events"], stored["outbox"]) == (0, 0, 0)


def test_concurrent_submissions_each_store_request_event_and_outbox_row(backend):
    settings, model, client = backend
    codes = _submit_concurrently(client, [{"instance_id": i} for i in model.train_ids[:12]])
    assert codes == Counter({202: 12})
    stored = counts(settings)
    assert (stored["deletion_requests"], stored["audit_events"], stored["outbox"]) == (12, 12, 12)
    assert client.get("/audit/verify").json()["ok"] is True


def test_concurrent_submissions_for_one_cell_accept_one(backend):
    settings, model, client = backend
    codes = _submit_concurrently(client, [{"instance_id": model.train_ids[0], "tasks": ["depth"]}] * 8)
    assert codes == Counter({202: 1, 409: 7})
    assert counts(settings)["deletion_requests"] == 1


# --------------------------------------------------------------------------- version numbers


@pytest.mark.parametrize("version", [0, 2**31, 10**30])
def test_a_version_number_out_of_range_is_a_validation_error(backend, version):
    _, model, client = backend
    body = assert_problem(client.get(f"/models/{model.name}/versions/{version}"), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["path", "version"]
    body = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": version}), 422,
                          "validation-error")
    assert body["errors"][0]["loc"] == ["body", "version"]


def test_the_largest_version_number_is_looked_up(backend):
    _, model, client = backend
    assert_problem(client.get(f"/models/{model.name}/versions/{2**31 - 1}"), 404, "not-found")
    assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 2**31 - 1}), 404, "not-found")


def test_rollback_refuses_a_boolean_for_a_version(backend):
    _, model, client = backend
    assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": True}), 422, "validation-error")


# --------------------------------------------------------------------------- cursors


def _cursor(*values) -> str:
    """A cursor packing ``values`` as they are: the list's tag first (``"deletions"``, ``"jobs"``,
    ``"audit"``), as the service writes them, or none, as it wrote them before cursors named their list."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


@pytest.mark.parametrize("values", [
    ("2024-01-01T00:00:00+00:00", 5),
    ("2024-01-01T00:00:00+00:00", [1]),
    ("2024-01-01T00:00:00+00:00", None),
    ("2024-01-01T00:00:00+00:00", "a\x00b"),
    (5, "some-id"),
    ("not a time", "some-id"),
    ("9999-12-31T23:59:59-01:00", "some-id"),
])
def test_a_request_cursor_of_the_wrong_types_is_malformed(backend, values):
    _, _, client = backend
    body = assert_problem(client.get("/deletions", params={"cursor": _cursor("deletions", *values)}), 422)
    assert body["detail"].startswith("malformed cursor")


@pytest.mark.parametrize("value", [2**63, 10**30, -1, -(10**20), True, 1.5, "3"])
def test_an_audit_cursor_of_the_wrong_type_or_range_is_malformed(backend, value):
    _, _, client = backend
    body = assert_problem(client.get("/audit/events", params={"cursor": _cursor("audit", value)}), 422)
    assert body["detail"].startswith("malformed cursor")


@pytest.mark.parametrize("route", ["/deletions", "/audit/events"])
def test_a_cursor_nested_past_the_parser_is_malformed_not_a_500(backend, route):
    # json.loads raised RecursionError on a few thousand '[', which no handler caught
    _, _, client = backend
    cursor = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    body = assert_problem(client.get(route, params={"cursor": cursor}), 422, "invalid-request")
    assert body["detail"].startswith("malformed cursor")


def test_a_long_cursor_or_id_comes_back_cut_short_in_the_problem(backend):
    # a problem echoes the cursor (an extra) and the id (detail, instance): a 60 KB cursor came
    # back whole, twice; now each echo is cut to problems.MAX_ECHO / MAX_DETAIL characters
    from app.problems import MAX_DETAIL, MAX_ECHO

    _, _, client = backend
    cursor = base64.urlsafe_b64encode(b"[" * 6000).decode().rstrip("=")
    body = assert_problem(client.get("/deletions", params={"cursor": cursor}), 422, "invalid-request")
    assert body["cursor"] == f"{cursor[:MAX_ECHO]}… ({len(cursor) - MAX_ECHO} more characters)"
    long_id = "x" * 5000
    body = assert_problem(client.get(f"/deletions/{long_id}"), 404, "not-found")
    assert body["request_id"] == "x" * MAX_ECHO + f"… ({5000 - MAX_ECHO} more characters)"
    for field in ("detail", "instance"):
        assert body[field].endswith(" more characters)") and len(body[field]) <= MAX_DETAIL + 30


def test_cursors_written_by_the_service_still_page(backend):
    _, model, client = backend
    for i in range(3):
        client.post("/deletions", json={"instance_id": model.train_ids[i]})
    seen, cursor = [], None
    while True:
        page = client.get("/deletions", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["id"] for r in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(seen) == len(set(seen)) == 3  # every request once: no page repeats another's rows
    events = client.get("/audit/events", params={"limit": 2}).json()
    rest = client.get("/audit/events", params={"limit": 2, "cursor": events["next_cursor"]}).json()
    assert [e["seq"] for e in events["items"] + rest["items"]] == [1, 2, 3]


#: each paged list's route, by the tag its cursors carry
LISTS = {"deletions": "/deletions", "jobs": "/jobs", "audit": "/audit/events"}


def _three_of_each(settings, model, client) -> None:
    """Three deletion requests (with their deletion.received events) and three jobs."""
    for i in range(3):
        assert client.post("/deletions", json={"instance_id": model.train_ids[i]}).status_code == 202
    now = utcnow()
    with transaction(settings.database_url) as s:
        for i in range(3):
            s.add(Job(id=f"job-{i}", model_name=model.name, kind="deletion", status="completed",
                      method="interference_aware", base_version=1, created_at=now + timedelta(seconds=i)))


def _next_cursor(client, route: str) -> str:
    page = client.get(route, params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_cursor"], page
    return page["next_cursor"]


def _unpacked(cursor: str) -> list:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


@pytest.mark.parametrize("route,key", [("/deletions", "id"), ("/jobs", "id"), ("/audit/events", "seq")])
def test_each_list_pages_end_to_end_with_its_own_cursors(backend, route, key):
    settings, model, client = backend
    _three_of_each(settings, model, client)
    everything = client.get(route).json()
    assert everything["next_cursor"] is None
    expected = [item[key] for item in everything["items"]]
    assert len(expected) >= 3
    seen, cursors, cursor = [], [], None
    while True:
        r = client.get(route, params={"limit": 1, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) == 1
        seen += [item[key] for item in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
        cursors.append(cursor)
    assert seen == expected  # the same rows in the same order, none twice, none left out
    assert len(cursors) == len(expected) - 1
    tag = next(t for t, path in LISTS.items() if path == route)
    for c in cursors:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", c), c  # URL-safe base64 without padding: no quoting needed
        assert _unpacked(c)[0] == tag


@pytest.mark.parametrize("source,target", [
    ("/deletions", "/jobs"), ("/deletions", "/audit/events"), ("/jobs", "/deletions"), ("/audit/events", "/jobs"),
])
def test_a_cursor_of_another_list_is_a_422_naming_that_list(backend, source, target):
    # /deletions and /jobs both page by (created_at, id): untagged, one's cursor decoded
    # fine on the other and paged from an unrelated position
    settings, model, client = backend
    _three_of_each(settings, model, client)
    cursor = _next_cursor(client, source)
    assert client.get(source, params={"cursor": cursor}).status_code == 200  # a good cursor of its own list
    r = client.get(target, params={"cursor": cursor})
    body = assert_problem(r, 422, "invalid-request")
    assert body["detail"] == (f"cursor is from {source}, not {target}; "
                              "pass back the next_cursor of this list's previous page")
    assert body["cursor_list"] == source
    assert body["cursor"] == cursor
    assert body["instance"] == target
    assert "items" not in body


@pytest.mark.parametrize("route", ["/deletions", "/jobs", "/audit/events"])
def test_a_cursor_written_before_cursors_named_their_list_is_a_422(backend, route):
    settings, model, client = backend
    _three_of_each(settings, model, client)
    tagged = _unpacked(_next_cursor(client, route))
    assert tagged[0] == next(t for t, path in LISTS.items() if path == route)
    old = _cursor(*tagged[1:])  # what the code before list tags wrote for the same row
    body = assert_problem(client.get(route, params={"cursor": old}), 422, "invalid-request")
    assert body["detail"] == ("cursor was written by an earlier version of the service (it names no list); "
                              f"restart {route} from its first page, without a cursor")
    assert body["cursor"] == old
    assert "cursor_list" not in body  # untagged: /deletions' and /jobs' cannot be told apart
    for other in set(LISTS.values()) - {route}:  # nor does another list take it
        assert "earlier version" in assert_problem(client.get(other, params={"cursor": old}), 422)["detail"]


@pytest.mark.parametrize("values", [
    (),
    (None,),
    ("nope", "2024-01-01T00:00:00+00:00", "job-0"),
    (["jobs"], "2024-01-01T00:00:00+00:00", "job-0"),
    ({"jobs": 1}, "2024-01-01T00:00:00+00:00", "job-0"),
    ("jobs", "2024-01-01T00:00:00+00:00"),
    ("jobs", "2024-01-01T00:00:00+00:00", "job-0", "job-1"),
    ("not a time", "job-0"),
])
def test_a_jobs_cursor_with_a_missing_unknown_or_misplaced_tag_is_malformed(backend, values):
    _, _, client = backend
    body = assert_problem(client.get("/jobs", params={"cursor": _cursor(*values)}), 422, "invalid-request")
    assert body["detail"] == "malformed cursor; pass back the next_cursor of a previous page"


# --------------------------------------------------------------------------- NUL characters


@pytest.mark.parametrize("field", ["instance_id", "model", "reason", "subject_ref"])
def test_a_nul_character_in_the_body_is_a_validation_error(backend, field):
    settings, model, client = backend
    body = {"instance_id": model.train_ids[0], field: "a\x00b"}
    problem = assert_problem(client.post("/deletions", json=body), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["body", field]
    assert "NUL" in problem["detail"]
    assert counts(settings)["deletion_requests"] == 0


def test_a_nul_character_in_a_task_name_is_a_validation_error(backend):
    _, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["de\x00pth"]})
    problem = assert_problem(r, 422, "validation-error")
    assert problem["errors"][0]["loc"][:2] == ["body", "tasks"] and "NUL" in problem["detail"]


@pytest.mark.parametrize("path", [
    "/deletions/a%00b", "/deletions/a%00b/certificate", "/jobs/a%00b",
    "/models/a%00b/versions", "/models/a%00b/versions/1",
])
def test_a_nul_character_in_a_path_is_a_validation_error(backend, path):
    _, _, client = backend
    problem = assert_problem(client.get(path), 422, "validation-error")
    assert problem["errors"][0]["loc"][0] == "path"


def test_a_nul_character_in_a_rollback_path_is_a_validation_error(backend):
    _, _, client = backend
    assert_problem(client.post("/models/a%00b/rollback", json={"version": 1}), 422, "validation-error")


@pytest.mark.parametrize("url,param", [
    ("/deletions", "instance_id"), ("/deletions", "status"), ("/deletions", "model"), ("/deletions", "cursor"),
    ("/audit/events", "kind"), ("/audit/events", "instance_id"), ("/audit/events", "request_id"),
    ("/audit/events", "model"), ("/audit/events", "cursor"),
])
def test_a_nul_character_in_a_query_parameter_is_a_validation_error(backend, url, param):
    _, _, client = backend
    problem = assert_problem(client.get(url, params={param: "a\x00b"}), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["query", param]


@pytest.mark.parametrize("send,status,detail", [
    (lambda c: c.get("/no%00such/route"), 404, "no route matches GET /no\\x00such/route"),
    (lambda c: c.put("/deletions/a%00b"), 405, "PUT is not allowed on /deletions/a\\x00b; allowed: GET, HEAD"),
    (lambda c: c.get("/deletions", params={"a\x1b[2Jb": "1"}), 422,
     "query.a\\x1b[2Jb: unknown query parameter; this route takes: "
     "cursor, instance_id, limit, model, since, status, until"),
    (lambda c: c.post("/deletions", json={"instance_id": "x", "a\x00b": 1}), 422,
     "body.a\\x00b: Extra inputs are not permitted"),
    # the TestClient re-encodes a header's bytes as UTF-8 (0x9b: c2 9b), which the service reads as
    # Latin-1 ("\xc2\x9b"; the media type lower-cased), the C1 control escaped still
    (lambda c: c.post("/deletions", content=b"{}", headers={"content-type": b"text/\x9b2Jplain"}), 415,
     "the request body must be application/json, got text/\xe2\\x9b2jplain"),
    (lambda c: c.post("/deletions", content=b"{}", headers={"content-type": b"application/json; charset=x\x85y"}),
     400, "the request body is not valid JSON for this API: a body declared charset=x\xe2\\x85y is not JSON this "
          "API reads: send UTF-8 (charset=utf-8, or no charset)"),
])
def test_a_problem_detail_echoes_control_characters_escaped(backend, send, status, detail):
    """A detail that echoes the request (a path, a name, a header) writes a NUL, a terminal escape
    or a C1 control as ``repr`` does, as the details quoting a value with ``!r`` already did: a
    client or log printing the detail got the raw character."""
    _, _, client = backend
    problem = assert_problem(send(client), status)
    assert problem["detail"] == detail
    assert problem["detail"].isprintable() and problem["instance"].isprintable()


@pytest.mark.parametrize("path,instance", [
    ("/no%00such/route", "/no%00such/route"), ("/a%1B%5B2Jb", "/a%1B[2Jb"),
    ("/evil%E2%80%AEtxt.exe", "/evil%E2%80%AEtxt.exe"), ("/caf%C3%A9", "/café"),
])
def test_a_problem_instance_percent_encodes_what_is_not_printable(backend, path, instance):
    """The instance is a URI reference: the path's non-printable characters (a NUL, a terminal
    escape, a right-to-left override) percent-encoded again, printable ones as decoded."""
    _, _, client = backend
    assert assert_problem(client.get(path), 404)["instance"] == instance


def test_a_detail_quoting_a_value_is_not_escaped_twice(backend):
    _, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["x\x1by"]})
    problem = assert_problem(r, 422, "invalid-request")
    assert problem["detail"].startswith("unknown task(s) ['x\\x1by'] for model ")
    assert problem["unknown_tasks"] == ["x\x1by"]  # the extras name the value as sent


def test_the_word_all_in_a_list_or_in_capitals_is_answered_with_how_to_say_it(backend):
    _, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["all"]})
    assert assert_problem(r, 422, "invalid-request")["detail"].endswith(
        '; for every task send "all" as a string, not in a list')
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": "All"})
    detail = assert_problem(r, 422, "validation-error")["detail"]
    assert "got the string 'All'; every task is \"all\", in lower case" in detail and "list of one" not in detail


def test_a_tasks_list_longer_than_any_model_needs_is_refused_by_its_length(backend):
    """1,250 unknown names of 48 characters (a 65 KB body) came back twice in a 129 KB 422."""
    from app.schemas import MAX_TASK_ITEMS

    _, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["t" * 48] * 1250})
    problem = assert_problem(r, 422, "validation-error")
    assert f"got 1250 items, more than {MAX_TASK_ITEMS}" in problem["detail"] and len(r.content) < 2000
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"] * MAX_TASK_ITEMS})
    assert r.status_code == 202, r.text  # a name given twice counts once
    assert r.json()["tasks"] == ["depth"]


def test_a_value_the_database_refuses_is_a_422_without_the_statement(backend, monkeypatch):
    _, _, client = backend
    import app.routes.jobs

    def refused(session, job_id):
        raise DataError("SELECT secret FROM jobs WHERE id = %(id)s", {"id": job_id}, Exception("text cannot hold NUL"))

    monkeypatch.setattr(app.routes.jobs, "get_job", refused)
    r = client.get("/jobs/some-job")
    assert_problem(r, 422, "invalid-request")
    assert "SELECT" not in r.text and "secret" not in r.text


# --------------------------------------------------------------------------- non-finite metrics


def test_non_finite_metrics_are_served_as_null(settings, tmp_path):
    # SQLite only: PostgreSQL's json type refuses NaN, so such metrics cannot be stored there.
    lite = on_sqlite(settings, tmp_path)
    model = register_model(lite)
    with TestClient(create_app(lite)) as client:
        rid = client.post("/deletions", json={"instance_id": model.train_ids[0]}).json()["id"]
        with transaction(lite.database_url) as session:
            request = session.get(DeletionRequest, rid)
            request.status, request.produced_version, request.completed_at = "completed", 1, utcnow()
            request.metrics = {"uis": float("inf"), "mia_auc": float("nan"), "mia_auc_original": 0.61,
                               "uis_task": {"depth": float("-inf")}}
            append_event(session, "deletion.completed", model_name=request.model_name, request_id=rid,
                         instance_id=request.instance_id, payload={"version": 1, "metrics": request.metrics})
        assert client.get(f"/deletions/{rid}").json()["metrics"] == {
            "uis": None, "mia_auc": None, "mia_auc_original": 0.61, "uis_task": {"depth": None}}
        r = client.get(f"/deletions/{rid}/certificate")
        assert r.status_code == 200, r.text
        cert = r.json()
        assert (cert["uis"], cert["mia_auc"], cert["mia_auc_original"], cert["uis_task"]) == (None, None, 0.61, {"depth": None})
        rest = {k: v for k, v in cert.items() if k != "certificate_sha256"}
        canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
        assert cert["certificate_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- unparsable bodies


@pytest.mark.parametrize("content", [b'{"instance_id": "\xff\xfe"}', b"[" * 30_000 + b"]" * 30_000])
def test_a_body_that_cannot_be_decoded_is_malformed_json(backend, content):
    settings, _, client = backend
    r = client.post("/deletions", content=content, headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed-json")
    assert counts(settings)["deletion_requests"] == 0


# --------------------------------------------------------------------------- time filters


@pytest.mark.parametrize("url", ["/deletions", "/audit/events"])
@pytest.mark.parametrize("param,value", [("since", "9999-12-31T23:59:59-01:00"), ("until", "0001-01-01T00:00:00+01:00")])
def test_a_time_filter_past_the_utc_range_is_a_validation_error(backend, url, param, value):
    _, _, client = backend
    problem = assert_problem(client.get(url, params={param: value}), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["query", param]


def test_a_time_filter_with_an_offset_is_read_in_utc(backend):
    """Bounds a minute either side of the stored time, written in zones hours away: only
    reading the offset puts them on the right side."""
    from datetime import datetime, timedelta, timezone

    _, model, client = backend
    created = client.post("/deletions", json={"instance_id": model.train_ids[0]}).json()["created_at"]
    at = datetime.fromisoformat(created.replace("Z", "+00:00"))
    east, west = timezone(timedelta(hours=9)), timezone(timedelta(hours=-5))
    minute = timedelta(minutes=1)

    def count(url, **bounds):
        params = {k: v.isoformat() for k, v in bounds.items()}
        return len(client.get(url, params=params).json()["items"])

    for url in ("/deletions", "/audit/events"):
        assert count(url, since=(at - minute).astimezone(east)) == 1  # as naive UTC: 9 hours later, none
        assert count(url, until=(at + minute).astimezone(west)) == 1  # as naive UTC: 5 hours earlier, none
        assert count(url, since=(at + minute).astimezone(west)) == 0
        assert count(url, until=(at - minute).astimezone(east)) == 0
    # a window that ends before it starts is named, not an empty page (as though nothing happened in it);
    # compared in UTC: 10:00+09:00 is before 09:00+00:00
    for url in ("/deletions", "/audit/events", "/jobs"):
        r = client.get(url, params={"since": (at + minute).isoformat(), "until": (at - minute).astimezone(east).isoformat()})
        assert "is after until" in assert_problem(r, 422, "invalid-request")["detail"]
        same = client.get(url, params={"since": at.isoformat(), "until": at.astimezone(east).isoformat()})
        assert same.status_code == 200 and same.json()["items"] == []  # since == until: empty, not an error


# --------------------------------------------------------------------------- status filter


def test_an_unknown_status_filter_names_the_statuses(backend):
    _, model, client = backend
    problem = assert_problem(client.get("/deletions", params={"status": "bogus"}), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["query", "status"]
    assert all(s in problem["detail"] for s in ("queued", "running", "completed", "failed", "rejected"))
    # a request is queued in the transaction that accepts it: there is no other first status
    assert_problem(client.get("/deletions", params={"status": "received"}), 422, "validation-error")
    client.post("/deletions", json={"instance_id": model.train_ids[0]})
    assert len(client.get("/deletions", params={"status": "queued"}).json()["items"]) == 1
    assert client.get("/deletions", params={"status": "completed"}).json()["items"] == []


# --------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize("field,value", [("reason", '"\\ud800"'), ("subject_ref", '"a\\udfffb"'),
                                         ("model", '"\\ud800"'), ("tasks", '["\\ud800"]')])
def test_a_lone_surrogate_in_the_body_is_a_validation_error(backend, field, value):
    """JSON can spell a lone UTF-16 surrogate; UTF-8 (the databases, the response) cannot."""
    settings, model, client = backend
    raw = f'{{"instance_id": "{model.train_ids[0]}", "{field}": {value}}}'.encode()
    problem = assert_problem(client.post("/deletions", content=raw, headers={"content-type": "application/json"}),
                             422, "validation-error")
    assert problem["errors"][0]["loc"][:2] == ["body", field]
    assert counts(settings)["deletion_requests"] == 0


def test_a_lone_surrogate_as_a_field_name_is_a_validation_error(backend):
    settings, model, client = backend
    raw = f'{{"instance_id": "{model.train_ids[0]}", "\\ud800": 1}}'.encode()
    assert_problem(client.post("/deletions", content=raw, headers={"content-type": "application/json"}), 422,
                   "validation-error")
    assert counts(settings)["deletion_requests"] == 0


def test_a_problem_document_that_echoes_a_lone_surrogate_is_escaped_not_a_500():
    from app.problems import ProblemResponse

    r = ProblemResponse({"detail": "unknown task '\ud800'", "status": 422}, status_code=422)
    assert json.loads(r.body) == {"detail": "unknown task '\ud800'", "status": 422}
    assert r.headers["content-type"] == "application/problem+json"
    assert json.loads(ProblemResponse({"detail": "caf\u00e9"}).body.decode("utf-8")) == {"detail": "caf\u00e9"}


def test_a_request_cursor_with_a_lone_surrogate_is_malformed(backend):
    _, _, client = backend
    cursor = base64.urlsafe_b64encode(b'["deletions", "2024-01-01T00:00:00+00:00", "\\ud800"]').decode().rstrip("=")
    assert assert_problem(client.get("/deletions", params={"cursor": cursor}), 422)["detail"].startswith("malformed cursor")


# --------------------------------------------------------------------------- messages that say what is wrong


@pytest.mark.parametrize("tasks,says", [
    ("depth", "a single task is a list of one"), (None, "got null"), ({"a": 1}, "got dict"),
    ([1], "item 0: Input should be a valid string"), (["x" * 51], "item 0: String should have at most 50 characters"),
])
def test_a_tasks_value_of_the_wrong_shape_says_what_tasks_takes(backend, tasks, says):
    _, model, client = backend
    problem = assert_problem(client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": tasks}), 422,
                             "validation-error")
    assert problem["errors"] == [{"loc": ["body", "tasks"], "msg": problem["errors"][0]["msg"], "type": "tasks"}]
    assert 'must be "all" or a list of task names' in problem["detail"] and says in problem["detail"]
    assert "function-after" not in problem["detail"] and "0x" not in problem["detail"]


def test_a_string_too_long_is_counted_in_characters(backend):
    _, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "reason": "x" * 2001})
    assert "at most 2000 characters" in assert_problem(r, 422, "validation-error")["detail"]
    r = client.post("/deletions", json={"instance_id": model.train_ids[0]}, headers={"Idempotency-Key": "k" * 201})
    assert "at most 200 characters" in assert_problem(r, 422, "validation-error")["detail"]


@pytest.mark.parametrize("value", ["yes", "on", 1, "true"])
def test_rollback_refuses_a_non_boolean_for_reapply_erasures(backend, value):
    settings, model, client = backend
    r = client.post(f"/models/{model.name}/rollback", json={"version": 1, "reapply_erasures": value})
    assert assert_problem(r, 422, "validation-error")["errors"][0]["loc"] == ["body", "reapply_erasures"]
    assert counts(settings)["jobs"] == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded"])
def test_a_body_of_another_media_type_is_415(backend, content_type):
    settings, model, client = backend
    raw = json.dumps({"instance_id": model.train_ids[0]}).encode()
    problem = assert_problem(client.post("/deletions", content=raw, headers={"content-type": content_type}), 415,
                             "unsupported-media-type")
    assert content_type in problem["detail"] and "application/json" in problem["detail"]
    assert counts(settings)["deletion_requests"] == 0
    # JSON under a +json type is read as JSON
    assert client.post("/deletions", content=raw, headers={"content-type": "application/merge-patch+json"}).status_code == 202


def test_a_body_without_a_media_type_is_415(backend):
    settings, model, client = backend
    raw = json.dumps({"instance_id": model.train_ids[0]}).encode()
    r = client.post("/deletions", content=raw)
    assert "content-type" not in {k.lower() for k in r.request.headers}
    assert "got no Content-Type" in assert_problem(r, 415, "unsupported-media-type")["detail"]
    assert counts(settings)["deletion_requests"] == 0


def test_operations_routes_take_query_strings_of_probes_and_scrapers(backend):
    _, _, client = backend
    assert client.get("/healthz", params={"probe": "1"}).status_code == 200
    assert client.get("/readyz", params={"_": "123"}).status_code == 200
    assert client.get("/metrics", params={"name[]": "unlearnd_outbox_unpublished"}).status_code == 200


def test_method_not_allowed_names_the_allowed_methods(backend):
    _, _, client = backend
    r = client.delete("/deletions")
    problem = assert_problem(r, 405, "method-not-allowed")
    assert problem["detail"] == "DELETE is not allowed on /deletions; allowed: GET, HEAD, POST"
    assert r.headers["allow"] == "GET, HEAD, POST"  # Starlette's own header named only the first route's


def test_head_answers_every_get_route_with_its_headers_and_no_body(backend):
    settings, model, client = backend
    for path in ("/healthz", "/deletions", f"/models/{model.name}/versions", "/metrics"):
        get, head = client.get(path), client.head(path)
        assert (head.status_code, get.status_code) == (200, 200), path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path != "/metrics":  # the scrape itself changes the request counters between the two
            assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content)), path
    missing = client.head("/deletions/00000000-0000-0000-0000-000000000000")
    assert (missing.status_code, missing.content) == (404, b"")
    assert missing.headers["content-type"].startswith("application/problem+json")
    post_only = client.head(f"/models/{model.name}/purge")
    assert (post_only.status_code, post_only.headers["allow"], post_only.content) == (405, "POST", b"")
    scrape = client.get("/metrics").text
    assert 'unlearnd_http_requests_total{method="HEAD",route="/healthz",status="200"} 1.0' in scrape


def test_answers_are_not_stored_by_caches_and_a_trailing_slash_is_no_redirect(backend):
    """Job states, the serving version, readiness and errors change between requests: no
    Cache-Control was sent, so a cache could answer for the service. /models/ was a 307 to an
    absolute http URL built from the Host header, sent before the API key was checked."""
    settings, model, client = backend
    for path in ("/jobs", "/models", "/readyz", "/healthz", "/deletions", "/jobs/nope", "/metrics"):
        assert client.get(path).headers["cache-control"] == "no-store", path
    for path in ("/models/", "/jobs/", "/healthz/", f"/models/{model.name}/versions/"):
        r = client.get(path, follow_redirects=False)
        assert_problem(r, 404, "not-found")
        assert r.headers["cache-control"] == "no-store" and "location" not in r.headers
    purge = client.post(f"/models/{model.name}/purge/", json={"dry_run": True}, follow_redirects=False)
    assert purge.status_code == 404


def test_a_body_over_the_limit_is_413_before_it_is_read(backend):
    from app.guards import MAX_BODY_BYTES

    settings, model, client = backend
    big = json.dumps({"instance_id": model.train_ids[0], "reason": "x" * MAX_BODY_BYTES}).encode()
    assert_problem(client.post("/deletions", content=big, headers={"content-type": "application/json"}), 413,
                   "body-too-large")

    def chunks():  # no Content-Length: counted as it is read
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    assert_problem(client.post("/deletions", content=chunks(), headers={"content-type": "application/json"}), 413,
                   "body-too-large")
    assert counts(settings)["deletion_requests"] == 0
    assert client.post("/deletions", json={"instance_id": model.train_ids[0]}).status_code == 202


@pytest.mark.parametrize("url,typo", [("/audit/events", "instance"), ("/deletions", "state"), ("/models", "x")])
def test_an_unknown_query_parameter_is_named_not_ignored(backend, url, typo):
    _, _, client = backend
    problem = assert_problem(client.get(url, params={typo: "a"}), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["query", typo] and "unknown query parameter" in problem["detail"]
    if url == "/audit/events":
        assert "instance_id" in problem["detail"]  # the parameters the route takes


def test_many_unknown_query_parameters_are_named_ten_and_counted(backend):
    """Each was an error of its own, route list included: 2,000 names made a 540 KB answer."""
    _, _, client = backend
    r = client.get("/deletions", params={f"p{i}": "1" for i in range(2000)})
    problem = assert_problem(r, 422, "validation-error")
    assert [e["loc"] for e in problem["errors"][:10]] == [["query", f"p{i}"] for i in range(10)]
    assert problem["errors"][10]["msg"] == "and 1990 more unknown query parameters"
    assert len(problem["errors"]) == 11 and len(r.content) < 10_000


@pytest.mark.parametrize("version", ["1.0", "+1", "01", "1_0", "1e0"])
def test_a_version_in_a_path_is_plain_digits(backend, version):
    _, model, client = backend
    problem = assert_problem(client.get(f"/models/{model.name}/versions/{version}"), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["path", "version"]
    assert client.get(f"/models/{model.name}/versions/1").status_code == 200


@pytest.mark.parametrize("value", ["1.0", "+1", "01", "1_0", "1e0", " 1"])
def test_a_number_in_a_query_is_plain_digits(backend, value):
    # pydantic's lax int read ?limit=1_0 as 10 and ?seq=1_2 as the audit anchor 12
    _, _, client = backend
    for url, name in (("/deletions", "limit"), ("/jobs", "limit"), ("/audit/events", "limit"), ("/audit/verify", "seq")):
        problem = assert_problem(client.get(url, params={name: value}), 422, "validation-error")
        assert problem["errors"][0]["loc"] == ["query", name]
        assert problem["errors"][0]["msg"] == "must be a whole number: decimal digits, no sign, no leading zero"
    assert client.get("/deletions", params={"limit": "10"}).status_code == 200
    # 0 is plain digits: its bound says what is wrong with it
    for url, name in (("/deletions", "limit"), ("/audit/verify", "seq")):
        problem = assert_problem(client.get(url, params={name: "0"}), 422, "validation-error")
        assert "greater than or equal to 1" in problem["errors"][0]["msg"]


@pytest.mark.parametrize("value", ["-1", "1700000000", "1.7e9"])
def test_a_time_filter_is_not_read_as_unix_time(backend, value):
    _, _, client = backend
    for url in ("/deletions", "/audit/events"):
        problem = assert_problem(client.get(url, params={"since": value}), 422, "validation-error")
        assert "ISO 8601" in problem["detail"]


def test_a_long_run_of_digits_as_a_time_is_refused_at_once(backend):
    """The check that a time is not a number split a run of digits every way before failing
    (time quadratic in its length, on the event loop): ?since=111...1x of 16 k digits held
    every other request 15 s. A value longer than any date-time is refused by its length,
    and the check itself is linear (a 200 k-digit run: a hang, and pytest's timeout, before)."""
    from app.schemas import _NUMBER

    _, _, client = backend
    for url in ("/deletions", "/jobs", "/audit/events"):
        problem = assert_problem(client.get(url, params={"since": "1" * 16_000 + "x"}), 422, "validation-error")
        assert "16001 characters long, more than 64" in problem["detail"]
    assert _NUMBER.fullmatch("1" * 200_000 + "x") is None
    assert _NUMBER.fullmatch("1" * 200_000) is not None


def test_a_second_chain_verification_while_one_runs_is_429(backend, monkeypatch):
    """It reads the whole log; calls piling up would hold every worker thread."""
    import app.routes.audit as audit

    _, _, client = backend
    assert client.get("/audit/verify").json()["ok"] is True
    assert audit._verifying.acquire(blocking=False)  # as a verification in progress holds it
    try:
        r = client.get("/audit/verify")
        assert "already running" in assert_problem(r, 429, "too-many-requests")["detail"]
        assert r.headers["retry-after"] == "10"
    finally:
        audit._verifying.release()
    assert client.get("/audit/verify").json()["ok"] is True


@pytest.mark.parametrize("url,param", [("/audit/events", "instance_id"), ("/deletions", "instance_id"),
                                       ("/jobs", "status"), ("/deletions", "limit")])
def test_a_query_parameter_given_twice_is_named_not_half_ignored(backend, url, param):
    # ?instance_id=a&instance_id=b used to filter by b alone: a's records looked absent
    _, model, client = backend
    values = {"instance_id": model.train_ids[:2], "status": ["queued", "failed"], "limit": ["1", "2"]}[param]
    client.post("/deletions", json={"instance_id": model.train_ids[0]})
    problem = assert_problem(client.get(url, params={param: values}), 422, "validation-error")
    assert problem["errors"] == [{"loc": ["query", param], "msg": "given 2 times; this parameter takes one value",
                                  "type": "repeated_parameter"}]
    assert client.get(url, params={param: values[0]}).status_code == 200
    # scrapers may repeat their own parameters
    assert client.get("/metrics", params={"name[]": ["a", "b"]}).status_code == 200


def test_a_value_of_the_wrong_form_is_said_in_words_not_as_a_pattern(backend):
    _, model, client = backend
    problem = assert_problem(client.get("/audit/verify", params={"seq": 1, "hash": "ABC"}), 422, "validation-error")
    assert problem["detail"] == "query.hash: must be a sha256: 64 hexadecimal digits, lowercase (0-9, a-f)"
    assert "pattern" not in problem["errors"][0]["msg"] and "^" not in problem["detail"]
    # our validators' sentences come without pydantic's "Value error, " before them
    problem = assert_problem(client.get(f"/models/{model.name}/versions/01"), 422, "validation-error")
    assert problem["errors"][0]["msg"] == "must be a version number: decimal digits, no sign, no leading zero"


def test_pattern_words_cover_model_names_and_name_a_pattern_they_do_not_know():
    from worker.settings import MODEL_NAME_PATTERN
    from worker.settings import said_in_words as _message

    def mismatch(pattern):
        return {"type": "string_pattern_mismatch", "msg": f"String should match pattern '{pattern}'",
                "ctx": {"pattern": pattern}}

    assert _message(mismatch(MODEL_NAME_PATTERN)).startswith("must be a model name: 1 to 100 letters, digits")
    said = _message(mismatch("^x+$"))
    assert said == "does not have the form this field takes (the pattern ^x+$)"


def test_an_empty_json_body_is_malformed_json(backend):
    # README: a body that is not JSON is a 400; an empty one was a 422 "body: Field required"
    settings, model, client = backend
    before = counts(settings)
    for url in ("/deletions", f"/models/{model.name}/rollback"):
        problem = assert_problem(client.post(url, content=b"", headers={"content-type": "application/json"}), 400,
                                 "malformed-json")
        assert problem["detail"] == "the request body is empty; send a JSON object"
    assert counts(settings) == before


def test_a_connection_pool_kept_busy_is_a_503_not_a_500(backend):
    # every connection in use for the pool's timeout raised sqlalchemy's TimeoutError: a 500
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from worker.db import read_only

    settings, model, client = backend
    app = client.app
    engine = create_engine(settings.database_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    app.state.sessions, app.state.readers = sessionmaker(engine), sessionmaker(read_only(engine))
    try:
        with engine.connect():  # the pool's one connection, busy
            for r in (client.get("/deletions"), client.post("/deletions", json={"instance_id": model.train_ids[0]})):
                assert_problem(r, 503, "database-unavailable")
                assert r.headers["retry-after"] == "5"
        assert client.post("/deletions", json={"instance_id": model.train_ids[0]}).status_code == 202
    finally:
        engine.dispose()


def test_a_path_name_that_no_model_may_have_is_named_as_such(backend):
    """/models/%20/versions was a 404 "no model named ' '", and a 70,000-character name came
    back three times in it (detail, instance, model)."""
    _, model, client = backend
    for name in ("%20", "a" * 101, "-lead", "a%3Ab"):
        r = client.get(f"/models/{name}/versions")
        detail = assert_problem(r, 422, "validation-error")["detail"]
        assert "path.name: must be a model name: 1 to 100 letters, digits" in detail, detail
    long = client.get(f"/models/{'a' * 5_000}/versions")  # (httpx takes no URL of 70,000)
    assert long.status_code == 422 and len(long.content) < 3 * 5_000
    assert client.get("/models/no-such-model/versions").status_code == 404  # a name a model may have


def test_the_openapi_document_states_number_limits_in_json_schema(backend):
    """The limits were written as pydantic's ge/le, which no JSON Schema client reads."""
    _, _, client = backend
    schema = client.get("/openapi.json").json()

    def parameter(path, name):
        return next(p["schema"] for p in schema["paths"][path]["get"]["parameters"] if p["name"] == name)

    assert {k: parameter("/jobs", "limit")[k] for k in ("minimum", "maximum")} == {"minimum": 1, "maximum": 500}
    version = parameter("/models/{name}/versions/{version}", "version")
    assert (version["minimum"], version["maximum"]) == (1, 2**31 - 1)
    assert parameter("/audit/verify", "seq")["anyOf"][0]["minimum"] == 1
    text = json.dumps(schema["paths"])
    assert '"ge":' not in text and '"le":' not in text


def test_the_openapi_document_describes_errors_as_problem_documents(backend):
    _, _, client = backend
    schema = client.get("/openapi.json").json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    errors = {(path, method, status): response["content"] for path, operations in schema["paths"].items()
              for method, operation in operations.items() for status, response in operation["responses"].items()
              if status[0] in "45"}
    assert errors and all(content == problem for content in errors.values()), errors
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(schema["components"]["schemas"])
    required = set(schema["components"]["schemas"]["Problem"]["required"])
    assert {"type", "title", "status", "detail", "instance"} <= required
    for status in ("400", "401", "403", "413", "415", "422"):
        assert ("/deletions", "post", status) in errors
    assert ("/deletions/{request_id}", "get", "404") in errors
    for conflict in (("/deletions", "post"), ("/deletions/{request_id}/certificate", "get"),
                     ("/models/{name}/rollback", "post"), ("/models/{name}/purge", "post")):
        assert (*conflict, "409") in errors  # the routes that answer 409 say so
    assert not any(key[0] in ("/healthz", "/certificates/public-key") and key[2] in ("401", "403") for key in errors)
    # what every route of a kind can answer: an unknown query parameter (422), the database down (503)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path not in ("/healthz", "/readyz"):
                assert (path, method, "422") in errors, (path, method)
            if not path.startswith(("/healthz", "/readyz", "/certificates/")):
                assert (path, method, "503") in errors, (path, method)
    assert ("/deletions", "post", "404") in errors  # an unknown model
    assert ("/certificates/public-key", "get", "404") in errors  # no signing key


def test_the_openapi_document_names_the_headers_clients_act_on(backend):
    """Location and Idempotent-Replayed of an accepted deletion, Retry-After of the record's
    503 and of a second audit verification's 429: sent, and undocumented, so generated clients did not expose them."""
    settings, model, client = backend
    schema = client.get("/openapi.json").json()
    accepted = schema["paths"]["/deletions"]["post"]["responses"]["202"]
    assert set(accepted["headers"]) == {"Location", "Idempotent-Replayed"}
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    sent = [client.post("/deletions", json=body, headers={"Idempotency-Key": "k-1"}) for _ in range(2)]
    assert sent[0].headers["Location"] == f"/deletions/{sent[0].json()['id']}"
    assert "Idempotent-Replayed" not in sent[0].headers and sent[1].headers["Idempotent-Replayed"] == "true"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "503" in operation["responses"] and not path.startswith("/readyz"):
                assert "Retry-After" in operation["responses"]["503"]["headers"], (path, method)
    assert "Retry-After" in schema["paths"]["/audit/verify"]["get"]["responses"]["429"]["headers"]


def test_the_openapi_document_names_the_location_of_a_rollbacks_reapply_job(backend):
    """A rollback's 202 sends Location (the reapply job) as an accepted deletion's does; only the
    deletion's was documented, so a generated client had no way to read the job's URL."""
    _, _, client = backend
    accepted = client.get("/openapi.json").json()["paths"]["/models/{name}/rollback"]["post"]["responses"]["202"]
    assert set(accepted["headers"]) == {"Location"}
    assert accepted["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RollbackOut"}


def test_the_openapi_document_says_a_submissions_dataset_503_has_no_retry_after(backend):
    """POST /deletions has two 503s: the record's (Retry-After) and a dataset that cannot be loaded
    (none: waiting does not mend it). The document described the record's alone, so a client
    retried a dataset-unavailable 503 on a Retry-After that never came."""
    _, _, client = backend
    unavailable = client.get("/openapi.json").json()["paths"]["/deletions"]["post"]["responses"]["503"]
    assert "dataset-unavailable" in unavailable["description"]
    assert "Retry-After" in unavailable["headers"]
    assert unavailable["content"] == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def test_a_json_name_given_twice_is_refused_and_nothing_is_stored(backend):
    # json.loads keeps the last value: the service would erase indoor-00002 while a gateway or
    # a log that keeps the first records indoor-00001
    settings, model, client = backend
    first, second = model.train_ids[:2]
    before = counts(settings)
    bodies = [("/deletions", f'{{"instance_id": "{first}", "tasks": ["depth"], "instance_id": "{second}"}}', "instance_id"),
              (f"/models/{model.name}/rollback", '{"version": 1, "version": 1}', "version")]
    for path, body, name in bodies:
        r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        problem = assert_problem(r, 400, "malformed-json")
        assert problem["detail"] == (f"the request body is not valid JSON for this API: the name {name!r} is given "
                                     "twice in one object; give each name once")
    nested = client.post("/deletions", content=b'{"instance_id": "x", "tasks": [{"a": 1, "a": 2}]}',
                         headers={"content-type": "application/json"})
    assert_problem(nested, 400, "malformed-json")
    assert counts(settings) == before
    once = client.post("/deletions", json={"instance_id": first, "tasks": ["depth"]})
    assert once.status_code == 202, once.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_body_in_another_encoding_than_utf8_is_refused_and_nothing_is_stored(backend, encoding):
    # json.loads(bytes) decodes UTF-16 and UTF-32 too: the service erased on a body that a
    # gateway or a log reading JSON as UTF-8 (RFC 8259) cannot read
    settings, model, client = backend
    before = counts(settings)
    body = json.dumps({"instance_id": model.train_ids[0], "tasks": ["depth"]})
    r = client.post("/deletions", content=body.encode(encoding), headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed-json")
    assert counts(settings) == before
    bom = client.post("/deletions", content=b"\xef\xbb\xbf" + body.encode(), headers={"content-type": "application/json"})
    assert bom.status_code == 202, bom.text  # UTF-8 with a byte-order mark is still UTF-8


@pytest.mark.parametrize("charset", ["utf-16", "iso-8859-1", '"latin-1"'])
def test_a_body_declared_in_another_charset_is_refused_by_name(backend, charset):
    """The charset parameter was ignored: a UTF-8 body declared utf-16 was acted on, and a
    Latin-1 one got "not valid JSON (UTF-8, nested too deep)"."""
    settings, model, client = backend
    before = counts(settings)
    body = json.dumps({"instance_id": model.train_ids[0], "tasks": ["depth"]}).encode()
    r = client.post("/deletions", content=body, headers={"content-type": f"application/json; charset={charset}"})
    detail = assert_problem(r, 400, "malformed-json")["detail"]
    assert f"a body declared charset={charset.strip(chr(34))} is not JSON this API reads: send UTF-8" in detail
    assert counts(settings) == before
    utf8 = client.post("/deletions", content=body, headers={"content-type": "application/json; charset=UTF-8"})
    assert utf8.status_code == 202, utf8.text
    ascii_body = json.dumps({"instance_id": model.train_ids[1], "tasks": ["depth"]}).encode()
    ascii_ = client.post("/deletions", content=ascii_body, headers={"content-type": "application/json; charset=us-ascii"})
    assert ascii_.status_code == 202, ascii_.text  # ASCII is UTF-8


def test_an_integer_too_long_to_parse_is_named(backend):
    """Past Python's 4300 digits the parser's ValueError became "not valid JSON (UTF-8, nested
    too deep)", which blamed the encoding or the nesting."""
    settings, model, client = backend
    r = client.post(f"/models/{model.name}/rollback", content=b'{"version": ' + b"1" * 5000 + b"}",
                    headers={"content-type": "application/json"})
    detail = assert_problem(r, 400, "malformed-json")["detail"]
    assert "a number of more than 4300 digits is not JSON this API takes" in detail
    assert "set_int_max_str_digits" not in detail  # Python's own advice is no answer to a client


def test_a_client_that_hangs_up_mid_body_is_no_server_error(backend, caplog):
    """With API keys the route reads the body before the key check; a client that closed the
    connection before its body ended raised ClientDisconnect there: a 500, an ERROR with two
    tracebacks, and a 500 counted in /metrics. It is a 400 (nobody reads it), logged at INFO."""
    import asyncio
    import logging

    from app.main import create_app
    from app.auth import new_token, token_sha256

    settings, model, _ = backend
    token = new_token()
    app = create_app(settings.model_copy(update={"api_keys": {
        "ops": {"token_sha256": token_sha256(token), "scopes": ["admin"]}}}))
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"instance_id": ', "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/deletions", "raw_path": b"/deletions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", b"100"),
                         (b"authorization", f"Bearer {token}".encode())], "client": ("127.0.0.1", 1),
             "server": ("test", 80)}
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    [start] = [m for m in sent if isinstance(m, dict) and m["type"] == "http.response.start"]
    assert start["status"] == 400
    body = json.loads(b"".join(m.get("body", b"") for m in sent if isinstance(m, dict)
                               and m["type"] == "http.response.body"))
    assert body["type"].endswith("client-disconnected") and "nothing was stored" in body["detail"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_query_string_that_is_not_utf8_is_answered(backend):
    """Some servers pass raw bytes on: ``?x=\\xff`` raised inside the error handler itself
    (building request.url), and no answer went out."""
    settings, model, client = backend
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/deletions", "raw_path": b"/deletions", "query_string": b"x=\xff", "root_path": "",
             "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(client.app(scope, receive, send))
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 422
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert body["instance"] == "/deletions" and body["status"] == 422


def test_a_task_name_holding_nul_is_said_in_words(backend):
    settings, model, client = backend
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["\u0000"]})
    detail = assert_problem(r, 422)["detail"]
    assert "must not contain the NUL character" in detail and "Value error" not in detail


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_and_nothing_is_stored(backend, constant):
    settings, model, client = backend
    before = counts(settings)
    r = client.post(f"/models/{model.name}/rollback", content=f'{{"version": {constant}}}'.encode(),
                    headers={"content-type": "application/json"})
    problem = assert_problem(r, 400, "malformed-json")
    assert problem["detail"] == f"the request body is not valid JSON for this API: {constant} is not JSON; a number is finite"
    assert counts(settings) == before


def test_two_idempotency_keys_are_refused_and_nothing_is_stored(backend):
    settings, model, client = backend
    before = counts(settings)
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]},
                    headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    problem = assert_problem(r, 422, "invalid-request")
    assert problem["detail"] == "send one Idempotency-Key header; this request has 2"
    assert counts(settings) == before


def test_an_idempotency_key_that_is_not_printable_ascii_is_refused(backend):
    """Header bytes are read as Latin-1: a UTF-8 key ("clé") was stored as "clÃ©", which a
    client reading its requests back, or another system keyed alike, did not find."""
    settings, model, client = backend
    before = counts(settings)
    for key in ("clé".encode(), b"a\tb"):
        r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]},
                        headers=[(b"Idempotency-Key", key)])
        problem = assert_problem(r, 422, "invalid-request")
        assert problem["detail"] == "the Idempotency-Key must be printable ASCII (a UUID, say)"
    assert counts(settings) == before
    ok = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]},
                     headers={"Idempotency-Key": "ticket-7 (retry)"})
    assert ok.status_code == 202, ok.text


def test_a_model_whose_dataset_cannot_be_loaded_is_a_503_naming_it_and_nothing_is_stored(backend, tmp_path, caplog):
    # resolve_cells loads the model's dataset on the API host: a folder moved away was a 500
    settings, _, client = backend
    gone = tmp_path / "moved-away"
    from worker.tables import Model

    with transaction(settings.database_url) as session:
        session.add(Model(name="nyu-gone", dataset={"name": "nyuv2", "root": str(gone)},
                          tasks=["segmentation", "depth", "normal"], created_at=utcnow()))
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json={"instance_id": "nyuv2-train-00000", "model": "nyu-gone"}),
                          503, "dataset-unavailable")
    assert body["model"] == "nyu-gone" and "nyu-gone" in body["detail"]
    assert str(gone) not in json.dumps(body)  # the server's paths stay in its log
    assert str(gone) in caplog.text
    assert counts(settings) == before
