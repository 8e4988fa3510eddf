"""API keys (app.auth): with UNLEARND_API_KEYS set, every API route needs a bearer token
whose key holds the route's scope; refusals are problem documents and store nothing; the
key's name is the actor of the audit events it causes."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from app.auth import key_for_token, token_sha256
from app.cli import main as cli_main
from app.main import create_app
from worker.db import transaction
from worker.settings import ApiKey, Settings, get_settings
from worker.tables import Alias, AuditEvent, ModelVersion

from .conftest import assert_problem, counts
from .test_hardening_worker import TINY, TINY_B, tiny, tiny_v1, two_models  # noqa: F401 - fixtures

TOKENS = {"portal": "portal-token", "auditor": "auditor-token", "ops": "ops-token", "shop": "shop-token",
          "dpo": "dpo-token"}
SCOPES = {"portal": ["deletions"], "auditor": ["read"], "ops": ["admin"], "shop": ["deletions"],
          "dpo": ["deletions", "read"]}


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


@pytest.fixture
def keyed(settings):
    keys = {n: ApiKey(token_sha256=token_sha256(t), scopes=SCOPES[n]) for n, t in TOKENS.items()}
    with TestClient(create_app(settings.model_copy(update={"api_keys": keys}))) as c:
        yield c


def _last_event(settings) -> AuditEvent:
    with transaction(settings.database_url) as s:
        return s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc())).scalars().first()


def test_without_a_valid_token_every_api_route_is_a_401_and_stores_nothing(keyed, settings, model):
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    before = counts(settings)
    routes = [("POST", "/deletions", body), ("GET", "/deletions", None), ("GET", "/deletions/x", None),
              ("GET", "/deletions/x/certificate", None), ("GET", "/models", None),
              ("GET", f"/models/{model.name}/versions", None), ("GET", f"/models/{model.name}/versions/1", None),
              ("POST", f"/models/{model.name}/rollback", {"version": 1}), ("GET", "/jobs/x", None), ("GET", "/jobs", None),
              ("POST", f"/models/{model.name}/purge", {"dry_run": True}),
              ("GET", "/audit/events", None), ("GET", "/audit/verify", None)]
    for method, path, payload in routes:
        for headers, error in (({}, None), ({"Authorization": "Bearer wrong"}, "invalid_token"),
                               ({"Authorization": f"Basic {TOKENS['ops']}"}, None),
                               ({"Authorization": "Bearer"}, None)):
            r = keyed.request(method, path, json=payload, headers=headers)
            problem = assert_problem(r, 401, "unauthorized")
            challenge = r.headers["WWW-Authenticate"]
            assert challenge.startswith('Bearer realm="unlearnd"'), (path, challenge)
            assert (f'error="{error}"' in challenge) == (error is not None), (path, headers, challenge)
            assert "Bearer <token>" in problem["detail"] or "not a key" in problem["detail"]
    assert counts(settings) == before


def test_each_scope_opens_its_routes_only(keyed, settings, model):
    instance = model.train_ids[0]
    before = counts(settings)
    # the auditor reads but cannot submit or roll back; the portal submits but cannot read the audit log
    refused = [("auditor", "POST", "/deletions", {"instance_id": instance}, "deletions"),
               ("auditor", "GET", "/deletions", None, "deletions"),
               ("auditor", "POST", f"/models/{model.name}/rollback", {"version": 1}, "admin"),
               ("auditor", "POST", f"/models/{model.name}/purge", {"dry_run": True}, "admin"),
               ("portal", "POST", f"/models/{model.name}/purge", {}, "admin"),
               ("portal", "GET", "/audit/events", None, "read"),
               ("portal", "GET", "/models", None, "read"),
               ("portal", "GET", "/jobs/x", None, "read"),
               ("portal", "GET", "/jobs", None, "read"),
               ("portal", "POST", f"/models/{model.name}/rollback", {"version": 1}, "admin")]
    for name, method, path, payload, needed in refused:
        r = keyed.request(method, path, json=payload, headers=_bearer(name))
        problem = assert_problem(r, 403, "forbidden")
        assert r.headers["WWW-Authenticate"] == f'Bearer realm="unlearnd", error="insufficient_scope", scope="{needed}"'
        assert (problem["key"], problem["required_scope"], problem["scopes"]) == (name, needed, SCOPES[name])
        assert repr(needed) in problem["detail"] and repr(name) in problem["detail"]
    assert counts(settings) == before

    for name in ("auditor", "ops"):
        assert keyed.get("/models", headers=_bearer(name)).json()[0]["name"] == model.name
        assert keyed.get(f"/models/{model.name}/versions/1", headers=_bearer(name)).status_code == 200
        assert keyed.get("/audit/verify", headers=_bearer(name)).json()["ok"] is True
        assert_problem(keyed.get("/jobs/nope", headers=_bearer(name)), 404)  # let through, then not found

    r = keyed.post("/deletions", json={"instance_id": instance, "tasks": ["depth"]}, headers=_bearer("portal"))
    assert r.status_code == 202, r.text
    request_id = r.json()["id"]
    assert keyed.get(f"/deletions/{request_id}", headers=_bearer("portal")).json()["status"] == "queued"
    assert_problem(keyed.get(f"/deletions/{request_id}/certificate", headers=_bearer("portal")), 409)
    assert [d["id"] for d in keyed.get("/deletions", headers=_bearer("ops")).json()["items"]] == [request_id]


def test_the_key_is_checked_before_the_query_string_on_every_router(keyed, settings, model):
    # an unknown query parameter is a 422, but only for a caller allowed to be told so: the
    # models router checked it before the key (its scopes were per route), answering 422
    # where every other router answers 401 or 403
    routes = [("GET", "/models"), ("GET", f"/models/{model.name}/versions"),
              ("GET", f"/models/{model.name}/versions/1"), ("POST", f"/models/{model.name}/rollback"),
              ("POST", f"/models/{model.name}/purge"), ("GET", "/jobs"), ("GET", "/audit/events"),
              ("GET", "/deletions")]
    for method, path in routes:
        assert_problem(keyed.request(method, path, params={"x": "1"}, json={"version": 1}), 401, "unauthorized")
    for name, method, path in [("portal", "GET", "/models"), ("portal", "GET", f"/models/{model.name}/versions"),
                               ("auditor", "POST", f"/models/{model.name}/rollback"),
                               ("auditor", "POST", f"/models/{model.name}/purge"), ("portal", "GET", "/jobs")]:
        r = keyed.request(method, path, params={"x": "1"}, json={"version": 1}, headers=_bearer(name))
        assert_problem(r, 403, "forbidden")
    problem = assert_problem(keyed.get("/models", params={"x": "1"}, headers=_bearer("auditor")), 422)
    assert "x" in problem["detail"]


def test_the_key_is_checked_before_a_body_that_is_not_json(keyed, settings, model):
    # FastAPI parses a JSON body before the route's dependencies run: a body that is not
    # JSON (or names a field twice, or is not UTF-8, or nests too deep) was a 400 for a
    # caller without a key or without the route's scope
    json_type = {"Content-Type": "application/json"}
    bodies = [b"{not json", b'{"version": 1, "version": 2}', b"\xff\xfe", b"[" * 5000, b"1" * 5000]
    routes = [("/deletions", "auditor"), (f"/models/{model.name}/rollback", "auditor"),
              (f"/models/{model.name}/purge", "portal")]
    before = counts(settings)
    for path, outsider in routes:
        for body in bodies:
            assert_problem(keyed.post(path, content=body, headers=json_type), 401, "unauthorized")
            assert_problem(keyed.post(path, content=body, headers={**json_type, **_bearer(outsider)}), 403, "forbidden")
    # a caller who may: the body's 400, as before
    for path, allowed in (("/deletions", "portal"), (f"/models/{model.name}/rollback", "ops")):
        for body in bodies:
            assert_problem(keyed.post(path, content=body, headers={**json_type, **_bearer(allowed)}), 400,
                           "malformed-json")
    assert counts(settings) == before


def test_the_key_that_acted_is_the_audit_events_actor(keyed, settings, model, stored):
    r = keyed.post("/deletions", json={"instance_id": model.train_ids[1], "tasks": "all"}, headers=_bearer("portal"))
    assert r.status_code == 202, r.text
    event = _last_event(settings)
    assert (event.kind, event.request_id, event.payload["actor"]) == ("deletion.received", r.json()["id"], "portal")

    with transaction(settings.database_url) as s:  # v2 erases nothing more, so rolling back to v1 is safe
        s.add(ModelVersion(model_name=model.name, version=2, parent_version=1, sha256="2" * 64,
                           artifact_uri="file:///fake/v2", deletions=[], erased_cells=[], metrics={}))
        s.get(Alias, (model.name, "serving")).version = 2
    stored(model.name, 1)  # the rollback checks the store holds its target
    r = keyed.post(f"/models/{model.name}/rollback", json={"version": 1}, headers=_bearer("ops"))
    assert r.status_code == 200 and r.json()["action"] == "moved", r.text
    event = _last_event(settings)
    assert (event.kind, event.payload) == ("model.rollback", {"from_version": 2, "to_version": 1, "actor": "ops"})
    assert keyed.get("/audit/verify", headers=_bearer("auditor")).json()["ok"] is True


def test_probes_metrics_and_docs_stay_open(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert "unlearnd_http_requests" in keyed.get("/metrics").text
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # an unknown route is still a 404, whoever asks
    assert_problem(keyed.get("/nowhere"), 404)


def test_two_authorization_headers_are_a_401_whichever_comes_first(keyed, settings, model):
    # the first used to count: a proxy or a log that reads the other would see another caller
    before = counts(settings)
    for first, second in (("portal", "ops"), ("ops", "portal"), ("ops", "ops")):
        headers = [("Authorization", f"Bearer {TOKENS[first]}"), ("Authorization", f"Bearer {TOKENS[second]}")]
        for method, path, payload in (("GET", "/deletions", None), ("GET", "/audit/events", None),
                                      ("POST", "/deletions", {"instance_id": model.train_ids[0]})):
            r = keyed.request(method, path, json=payload, headers=headers)
            assert "one Authorization header" in assert_problem(r, 401, "unauthorized")["detail"]
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="unlearnd"'
    assert counts(settings) == before
    assert keyed.get("/deletions", headers=_bearer("portal")).status_code == 200


def test_without_keys_the_api_is_open_and_events_name_no_actor(client, settings, model):
    r = client.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"]})
    assert r.status_code == 202, r.text
    assert "actor" not in _last_event(settings).payload
    assert client.get("/audit/events").status_code == 200


def test_a_token_matches_only_its_own_key():
    keys = {n: ApiKey(token_sha256=token_sha256(t), scopes=SCOPES[n]) for n, t in TOKENS.items()}
    assert [key_for_token(keys, t) for t in TOKENS.values()] == list(TOKENS)
    assert key_for_token(keys, "portal-token ") is None and key_for_token(keys, "") is None


@pytest.mark.parametrize("raw, named", [
    ('{"p": {"token_sha256": "abc", "scopes": ["read"]}}', "token_sha256"),
    ('{"p": {"token_sha256": "%s", "scopes": []}}' % ("a" * 64), "scopes"),
    ('{"p": {"token_sha256": "%s", "scopes": ["root"]}}' % ("a" * 64), "scopes"),
    ('{"p": {"token": "x", "token_sha256": "%s", "scopes": ["read"]}}' % ("a" * 64), "token"),
    ('{"has space": {"token_sha256": "%s", "scopes": ["read"]}}' % ("a" * 64), "has space"),
    ('{"a": {"token_sha256": "%s", "scopes": ["read"]}, "b": {"token_sha256": "%s", "scopes": ["admin"]}}'
     % ("a" * 64, "a" * 64), "same token"),
    ("portal:secret", "JSON object"),
    ('{"p": {"token_sha256": "%s", "scopes": ["read"]}, "p": {"token_sha256": "%s", "scopes": ["admin"]}}'
     % ("a" * 64, "b" * 64), "'p' is given twice"),
])
def test_bad_key_configuration_is_refused_naming_it(monkeypatch, raw, named):
    monkeypatch.setenv("UNLEARND_API_KEYS", raw)
    with pytest.raises(ValidationError, match=named):
        Settings()


def test_blank_key_configuration_means_no_keys(monkeypatch):
    monkeypatch.setenv("UNLEARND_API_KEYS", "  ")
    assert Settings().api_keys == {}


def test_api_key_command_makes_a_token_the_service_accepts(environment, capsys, settings, model):
    environment.delenv("UNLEARND_API_KEYS", raising=False)
    assert cli_main(["api-key", "portal", "--scope", "deletions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token, entry = lines[1].strip(), json.loads(lines[3])
    assert entry["portal"]["scopes"] == ["deletions"] and entry["portal"]["token_sha256"] == token_sha256(token)

    environment.setenv("UNLEARND_API_KEYS", lines[3])
    get_settings.cache_clear()
    keyed = settings.model_copy(update={"api_keys": Settings().api_keys})
    with TestClient(create_app(keyed)) as c:
        auth = {"Authorization": f"Bearer {token}"}
        assert c.post("/deletions", json={"instance_id": model.train_ids[0]}, headers=auth).status_code == 202
        assert_problem(c.get("/audit/events", headers=auth), 403, "forbidden")

    # --merge prints every key: the environment's and the new one
    assert cli_main(["api-key", "ops", "--scope", "admin", "--scope", "read", "--merge"]) == 0
    merged = json.loads(capsys.readouterr().out.splitlines()[3])
    assert sorted(merged) == ["ops", "portal"] and merged["ops"]["scopes"] == ["admin", "read"]
    assert merged["portal"] == entry["portal"]


def test_api_key_command_refuses_bad_names_and_configuration(environment, capsys):
    environment.delenv("UNLEARND_API_KEYS", raising=False)
    assert cli_main(["api-key", "two words", "--scope", "read"]) == 2
    assert "invalid key name 'two words'" in capsys.readouterr().err
    environment.setenv("UNLEARND_API_KEYS", '{"x": 1}')
    assert cli_main(["api-key", "ops", "--scope", "read", "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unlearnd: invalid configuration") and "api_keys.x" in err
    with pytest.raises(SystemExit):
        cli_main(["api-key", "ops", "--scope", "root"])


def test_idempotency_keys_belong_to_their_submitter(keyed, settings, model):
    """Two API keys that both send Idempotency-Key "ticket-4711" get their own requests; each
    replays its own and never sees (or is refused because of) the other's."""
    headers = {n: {**_bearer(n), "Idempotency-Key": "ticket-4711"} for n in ("portal", "ops")}
    portal_body = {"instance_id": model.train_ids[0], "tasks": ["depth"]}
    ops_body = {"instance_id": model.train_ids[1], "tasks": ["normal"]}
    first = keyed.post("/deletions", json=portal_body, headers=headers["portal"])
    other = keyed.post("/deletions", json=ops_body, headers=headers["ops"])
    assert (first.status_code, other.status_code) == (202, 202), other.text
    assert first.json()["id"] != other.json()["id"] and "idempotent-replayed" not in other.headers
    again = keyed.post("/deletions", json=portal_body, headers=headers["portal"])
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    # the same key with another body is refused for its own submitter only, naming its own request
    refused = assert_problem(keyed.post("/deletions", json=ops_body, headers=headers["portal"]), 422)
    assert refused["request_id"] == first.json()["id"]
    assert counts(settings)["deletion_requests"] == 2
    seen = {r["id"]: r["submitted_by"] for r in keyed.get("/deletions", headers=_bearer("ops")).json()["items"]}
    assert seen == {first.json()["id"]: "portal", other.json()["id"]: "ops"}


def test_without_keys_requests_have_no_submitter(client, model):
    r = client.post("/deletions", json={"instance_id": model.train_ids[0]}, headers={"Idempotency-Key": "k"})
    assert client.get(r.headers["location"]).json()["submitted_by"] is None
    assert client.post("/deletions", json={"instance_id": model.train_ids[0]},
                       headers={"Idempotency-Key": "k"}).headers["idempotent-replayed"] == "true"


def test_a_deletions_key_sees_only_the_requests_it_submitted(keyed, settings, model):
    """Two portals (keys with the deletions scope alone) each read and list their own
    requests only: another's is a 404 like an unknown one, and its certificate too. A key
    that also reads (read or admin) sees every request."""
    mine = keyed.post("/deletions", json={"instance_id": model.train_ids[0], "tasks": ["depth"],
                                          "subject_ref": "ticket-1"}, headers=_bearer("portal")).json()["id"]
    theirs = keyed.post("/deletions", json={"instance_id": model.train_ids[1], "tasks": ["depth"],
                                            "subject_ref": "ticket-2"}, headers=_bearer("shop")).json()["id"]
    for name, own, other in (("portal", mine, theirs), ("shop", theirs, mine)):
        assert keyed.get(f"/deletions/{own}", headers=_bearer(name)).json()["submitted_by"] == name
        assert_problem(keyed.get(f"/deletions/{own}/certificate", headers=_bearer(name)), 409)  # still queued
        unknown = assert_problem(keyed.get("/deletions/nope", headers=_bearer(name)), 404)
        for path in (f"/deletions/{other}", f"/deletions/{other}/certificate"):
            hidden = assert_problem(keyed.get(path, headers=_bearer(name)), 404)
            assert hidden["detail"] == unknown["detail"].replace("'nope'", repr(other))
            assert "ticket" not in json.dumps(hidden)
        listed = keyed.get("/deletions", headers=_bearer(name)).json()["items"]
        assert [r["id"] for r in listed] == [own]
        # a filter cannot widen what the key sees
        assert keyed.get("/deletions", params={"instance_id": model.train_ids[1] if name == "portal"
                                               else model.train_ids[0]}, headers=_bearer(name)).json()["items"] == []
    for name in ("dpo", "ops"):
        assert {r["id"] for r in keyed.get("/deletions", headers=_bearer(name)).json()["items"]} == {mine, theirs}
        assert keyed.get(f"/deletions/{theirs}", headers=_bearer(name)).json()["subject_ref"] == "ticket-2"


def _keyed_client(settings):
    keys = {n: ApiKey(token_sha256=token_sha256(t), scopes=SCOPES[n]) for n, t in TOKENS.items()}
    return TestClient(create_app(settings.model_copy(update={"api_keys": keys})))


def test_a_job_batching_two_portals_requests_shows_each_only_its_own_cells(tiny):
    """One job erases the requests of two portals together; each request's metrics name its own
    cells only (they held every cell of the job: the other portal's instance)."""
    from worker import jobs

    s, store, ids = tiny
    with _keyed_client(s) as c:
        mine = c.post("/deletions", json={"instance_id": ids[0], "tasks": ["depth"]}, headers=_bearer("portal"))
        theirs = c.post("/deletions", json={"instance_id": ids[1], "tasks": ["depth"]}, headers=_bearer("shop"))
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
        for name, r, own in (("portal", mine, ids[0]), ("shop", theirs, ids[1])):
            got = c.get(f"/deletions/{r.json()['id']}", headers=_bearer(name)).json()
            assert got["status"] == "completed" and got["metrics"]["forget_cells"] == [[own, "depth"]]
            listed = c.get("/deletions", headers=_bearer(name)).json()["items"]
            assert [d["metrics"]["forget_cells"] for d in listed] == [[[own, "depth"]]]
        assert mine.json()["id"] != theirs.json()["id"]
        job = c.get(f"/jobs/{got['job_id']}", headers=_bearer("ops")).json()  # the job itself: both
        assert sorted(map(tuple, job["metrics"]["forget_cells"])) == [(ids[0], "depth"), (ids[1], "depth")]


def test_a_request_batched_with_other_tasks_sees_only_its_own_tasks(tiny):
    """The job's metrics name its forgotten tasks (the forget losses, the mode) and the tasks
    its forgotten instances keep (``per_task.forgotten``): a request's share names only its
    own, so a portal does not learn which tasks another portal's request erased with it."""
    from worker import jobs

    s, store, ids = tiny
    with _keyed_client(s) as c:
        mine = c.post("/deletions", json={"instance_id": ids[0], "tasks": ["depth"]}, headers=_bearer("portal"))
        theirs = c.post("/deletions", json={"instance_id": ids[1]}, headers=_bearer("shop"))  # every task
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
        job_id = c.get(f"/deletions/{mine.json()['id']}", headers=_bearer("portal")).json()["job_id"]
        job = c.get(f"/jobs/{job_id}", headers=_bearer("ops")).json()["metrics"]
        every = sorted(job["per_task"]["test"])
        assert len(every) > 1 and sorted(job["forget_tasks"]) == every and job["mode"] == "partial"
        assert sorted(job["mia_tasks"]) == every
        for name, r, tasks, mode in (("portal", mine, ["depth"], "partial"), ("shop", theirs, every, "full")):
            got = c.get(f"/deletions/{r.json()['id']}", headers=_bearer(name)).json()["metrics"]
            assert sorted(got["forget_tasks"]) == tasks and got["mode"] == mode
            assert sorted(got["mia_tasks"]) == tasks  # the attack's tasks: the forgotten ones
            kept = sorted(got["per_task"].get("forgotten", {}))  # the forgotten instances' kept cells
            assert kept == sorted(set(every) - set(tasks))
            assert all(sorted(losses) == tasks for losses in got["forget_loss"].values())
            assert got["per_task"]["test"] == job["per_task"]["test"] and got["uis"] == job["uis"]


def test_a_failed_job_batching_two_portals_requests_shows_neither_the_others_cells(tiny, monkeypatch):
    """A job's error is free text and may name any of its cells. When the job batched two
    portals' requests, each request says the job failed and where the error is (the job, for
    keys that read) instead of copying it; a job of one submitter's requests copies it whole."""
    from worker import jobs

    s, store, ids = tiny

    def fail(*args, **kwargs):
        raise ValueError(f"cannot erase {ids[1]!r}: something about that instance")

    monkeypatch.setattr(jobs, "_compute", fail)
    with _keyed_client(s) as c:
        mine = c.post("/deletions", json={"instance_id": ids[0], "tasks": ["depth"]}, headers=_bearer("portal"))
        theirs = c.post("/deletions", json={"instance_id": ids[1], "tasks": ["depth"]}, headers=_bearer("shop"))
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["failed"]
        for name, r in (("portal", mine), ("shop", theirs)):
            got = c.get(f"/deletions/{r.json()['id']}", headers=_bearer(name)).json()
            assert got["status"] == "failed" and ids[1] not in got["error"]
            assert got["error"].startswith(f"job {got['job_id']} failed (ValueError)")
            assert f"GET /jobs/{got['job_id']}" in got["error"]
        job = c.get(f"/jobs/{got['job_id']}", headers=_bearer("ops")).json()
        assert job["status"] == "failed" and ids[1] in job["error"]  # the job keeps the whole error
        events = c.get("/audit/events", params={"kind": "deletion.failed"}, headers=_bearer("ops")).json()["items"]
        assert len(events) == 2 and all(ids[1] in e["payload"]["error"] for e in events)

        alone = c.post("/deletions", json={"instance_id": ids[2], "tasks": ["depth"]}, headers=_bearer("portal"))
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["failed"]
        got = c.get(f"/deletions/{alone.json()['id']}", headers=_bearer("portal")).json()
        assert got["error"] == f"ValueError: cannot erase {ids[1]!r}: something about that instance"


def test_a_failed_job_catching_up_on_another_portals_erasure_hides_its_error(two_models, monkeypatch):
    """A model whose propagate job failed erases those cells with its next deletion job, which
    thus holds another portal's request (made through the other model) without batching it:
    that request counts too, and the portal's request does not copy the job's error."""
    from worker import jobs

    s, s_b, store, ids = two_models
    with _keyed_client(s) as c:
        c.post("/deletions", json={"instance_id": ids[1], "tasks": ["depth"], "model": TINY_B}, headers=_bearer("shop"))
        assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]

        def fail(settings, store, job_id, model_name, base_version, version, spec, cells, *args, **kwargs):
            raise ValueError(f"cannot erase cells {cells}")

        monkeypatch.setattr(jobs, "_compute", fail)
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["failed"]  # the propagate job
        mine = c.post("/deletions", json={"instance_id": ids[0], "tasks": ["depth"]}, headers=_bearer("portal"))
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["failed"]
        got = c.get(f"/deletions/{mine.json()['id']}", headers=_bearer("portal")).json()
        job = c.get(f"/jobs/{got['job_id']}", headers=_bearer("ops")).json()
        assert [ids[1], "depth"] in job["params"]["cells"] and ids[1] in job["error"]
        assert ids[1] not in got["error"] and got["error"].startswith(f"job {got['job_id']} failed (ValueError)")


def test_a_conflict_names_only_the_callers_own_requests(keyed, settings, model):
    """A cell pending in another portal's request is a 409 that says so without that
    request's id; the caller's own request, and every request for a key that reads, is named."""
    instance = model.train_ids[0]
    shop = keyed.post("/deletions", json={"instance_id": instance, "tasks": ["depth"]}, headers=_bearer("shop"))
    before = counts(settings)
    refused = assert_problem(keyed.post("/deletions", json={"instance_id": instance, "tasks": ["depth"]},
                                        headers=_bearer("portal")), 409)
    assert shop.json()["id"] not in json.dumps(refused)
    assert refused["cells"] == [{"instance_id": instance, "task": "depth", "state": "pending", "request_id": None}]
    assert "a request of another submitter" in refused["detail"]
    own = assert_problem(keyed.post("/deletions", json={"instance_id": instance, "tasks": ["depth"]},
                                    headers=_bearer("shop")), 409)
    assert own["cells"][0]["request_id"] == shop.json()["id"]
    for name in ("dpo", "ops"):
        seen = assert_problem(keyed.post("/deletions", json={"instance_id": instance, "tasks": ["depth"]},
                                         headers=_bearer(name)), 409)
        assert seen["cells"][0]["request_id"] == shop.json()["id"]
    assert counts(settings) == before


def test_an_unknown_model_is_named_with_the_known_ones_only_to_a_key_that_may_list_them(keyed, settings, model):
    """A portal's key (deletions only) gets a 403 on GET /models; a deletion for an unknown
    model told it every model's name all the same."""
    body = {"instance_id": model.train_ids[0], "tasks": ["depth"], "model": "no-such-model"}
    before = counts(settings)
    portal = assert_problem(keyed.post("/deletions", json=body, headers=_bearer("portal")), 404)
    assert portal["detail"] == "no model named 'no-such-model'" and "known_models" not in portal
    for may_list in ("dpo", "ops"):
        named = assert_problem(keyed.post("/deletions", json=body, headers=_bearer(may_list)), 404)
        assert named["known_models"] == [model.name]
    assert counts(settings) == before
