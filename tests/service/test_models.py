"""Models, versions, lineage, rollback rules and jobs."""
from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select

from unlearning.data import dataset_key
from worker.db import transaction
from worker.tables import Alias, AliasHistory, AuditEvent, Job, ModelVersion, OutboxMessage, Tombstone

from .conftest import assert_problem, count, counts


def _history(settings, model, erased_by):
    """v1 (nothing erased) -> v2 (erases a's depth) -> v3 (also b's cells), v3 serving, tombstones for both."""
    a, b = model.train_ids[0], model.train_ids[1]
    key = dataset_key(model.spec)
    with transaction(settings.database_url) as s:
        s.add(ModelVersion(model_name=model.name, version=2, parent_version=1, sha256="2" * 64,
                           artifact_uri="file:///fake/v2", deletions=[erased_by[0]], erased_cells=[[a, "depth"]],
                           metrics={"uis": 3.0, "mia_auc": 0.55}))
        s.add(ModelVersion(model_name=model.name, version=3, parent_version=2, sha256="3" * 64,
                           artifact_uri="file:///fake/v3", deletions=[erased_by[1]],
                           erased_cells=[[a, "depth"], [b, "depth"], [b, "normal"]],
                           metrics={"uis": 2.5, "uis_task": 0.0, "uis_inst": 2.5, "mia_auc": 0.5,
                                    "mia_auc_original": 0.9}))
        s.add(Tombstone(dataset_key=key, instance_id=a, task="depth", request_id=erased_by[0]))
        s.add(Tombstone(dataset_key=key, instance_id=b, task="depth", request_id=erased_by[1]))
        s.add(Tombstone(dataset_key=key, instance_id=b, task="normal", request_id=erased_by[1]))
        s.get(Alias, (model.name, "serving")).version = 3
    return a, b


def _serving(settings, name):
    with transaction(settings.database_url) as s:
        return s.get(Alias, (name, "serving")).version


def test_models_versions_and_lineage(client, settings, model):
    a, b = _history(settings, model, ["r-a", "r-b"])
    (m,) = client.get("/models").json()
    assert (m["name"], m["serving_version"], m["latest_version"], m["versions"]) == (model.name, 3, 3, 3)
    assert m["dataset_key"] == dataset_key(model.spec) and m["tasks"] == model.tasks

    versions = client.get(f"/models/{model.name}/versions").json()
    assert [(v["version"], v["parent_version"], v["serving"]) for v in versions] == [
        (1, None, False), (2, 1, False), (3, 2, True)]
    # a listing counts a version's cells (every cell of its lineage) rather than listing them
    assert [v["erased_cell_count"] for v in versions] == [0, 1, 3] and "erased_cells" not in versions[0]

    v3 = client.get(f"/models/{model.name}/versions/3").json()
    assert v3["deletions"] == ["r-b"] and v3["erased_cells"] == [[a, "depth"], [b, "depth"], [b, "normal"]]
    assert v3["sha256"] == "3" * 64 and v3["artifact_uri"] == "file:///fake/v3" and v3["metrics"]["uis"] == 2.5
    assert [(v["version"], v["erased_cell_count"]) for v in v3["ancestors"]] == [(2, 1), (1, 0)]
    assert v3["older_ancestors"] is False
    # every deletion publishes a version: the ancestors are bounded (?ancestors=, at most 500), the
    # older ones are the last listed one's own ancestors
    near = client.get(f"/models/{model.name}/versions/3?ancestors=1").json()
    assert [v["version"] for v in near["ancestors"]] == [2] and near["older_ancestors"] is True
    rest = client.get(f"/models/{model.name}/versions/{near['ancestors'][-1]['version']}?ancestors=1").json()
    assert [v["version"] for v in rest["ancestors"]] == [1] and rest["older_ancestors"] is False
    none = client.get(f"/models/{model.name}/versions/3?ancestors=0").json()
    assert none["ancestors"] == [] and none["older_ancestors"] is True and none["erased_cells"] == v3["erased_cells"]
    assert client.get(f"/models/{model.name}/versions/3?ancestors=2").json()["older_ancestors"] is False
    for bad in ("-1", "501", "x", "1_0"):
        assert_problem(client.get(f"/models/{model.name}/versions/3?ancestors={bad}"), 422)
    assert v3["erased_cell_count"] == 3
    assert_problem(client.get(f"/models/{model.name}/versions/9"), 404)
    assert_problem(client.get("/models/nope/versions"), 404)


def test_rollback_refused_while_the_target_holds_erased_data(client, settings, model):
    a, b = _history(settings, model, ["r-a", "r-b"])
    before = counts(settings)
    body = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 1}), 409)
    assert body["erasures"] == [
        {"request_id": "r-a", "instance_id": a, "tasks": ["depth"]},
        {"request_id": "r-b", "instance_id": b, "tasks": ["depth", "normal"]},
    ]
    assert "r-a" in body["detail"] and b in body["detail"] and "2 erasures" in body["detail"]
    assert body["erasures_total"] == 2
    assert counts(settings) == before and _serving(settings, model.name) == 3

    body = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 2}), 409)
    assert body["erasures"] == [{"request_id": "r-b", "instance_id": b, "tasks": ["depth", "normal"]}]


def test_a_rollback_refused_after_a_long_history_names_a_few_erasures_and_counts_them(client, settings, model):
    """The 409 named every erasure the target missed in its detail and listed them all again:
    megabytes of problem document after a long history."""
    _history(settings, model, ["r-a", "r-b"])
    with transaction(settings.database_url) as s:
        s.add_all(Tombstone(dataset_key=dataset_key(model.spec), instance_id=f"gone-{i:03d}", task="depth",
                            request_id=f"r-{i:03d}") for i in range(250))
    body = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 1}), 409)
    assert body["erasures_total"] == 252 and len(body["erasures"]) == 100
    assert body["erasures"][:2] == [{"request_id": "r-a", "instance_id": model.train_ids[0], "tasks": ["depth"]},
                                    {"request_id": "r-b", "instance_id": model.train_ids[1],
                                     "tasks": ["depth", "normal"]}]
    assert body["erasures"][-1] == {"request_id": "r-097", "instance_id": "gone-097", "tasks": ["depth"]}
    detail = body["detail"]
    assert "252 erasures (erasures lists the first 100)" in detail and "gone-002" in detail
    assert "gone-003" not in detail and "and 247 more" in detail and len(detail) < 1000
    assert _serving(settings, model.name) == 3


def test_rollback_with_reapply_queues_a_job(client, settings, model, stored):
    a, b = _history(settings, model, ["r-a", "r-b"])
    stored(model.name, 1)  # the reapply's base: the rollback checks the store holds it
    r = client.post(f"/models/{model.name}/rollback", json={"version": 1, "reapply_erasures": True})
    assert r.status_code == 202, r.text
    out = r.json()
    job = out["job"]
    assert (out["action"], out["serving_version"]) == ("reapply", 3)  # the alias moves when the job publishes
    assert (job["kind"], job["status"], job["base_version"], job["method"]) == (
        "reapply", "queued", 1, settings.method)
    assert job["params"] == {"cells": [[a, "depth"], [b, "depth"], [b, "normal"]], "request_ids": ["r-a", "r-b"]}
    assert r.headers["location"] == f"/jobs/{job['id']}"
    with transaction(settings.database_url) as s:
        (msg,) = s.execute(select(OutboxMessage)).scalars().all()
        event = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc())).scalars().first()
        assert s.get(Job, job["id"]).status == "queued"
    assert (msg.topic, msg.payload) == ("process_model", {"model_name": model.name})
    assert (event.kind, event.payload["job_id"], event.payload["to_version"]) == (
        "model.rollback_requested", job["id"], 1)

    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    assert_problem(client.get("/jobs/nope"), 404)
    # the same request again (a client retrying after a timeout) answers with that job, writing nothing
    before = counts(settings)
    repeat = client.post(f"/models/{model.name}/rollback", json={"version": 1, "reapply_erasures": True})
    assert repeat.status_code == 202, repeat.text
    assert (repeat.json()["action"], repeat.json()["job"]["id"]) == ("reapply", job["id"])
    assert repeat.headers["location"] == f"/jobs/{job['id']}" and counts(settings) == before
    # any other rollback while that job is under way is refused
    again = client.post(f"/models/{model.name}/rollback", json={"version": 2, "reapply_erasures": True})
    assert assert_problem(again, 409)["job_id"] == job["id"]
    assert assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 1}), 409)["job_id"] == job["id"]
    # also back to the serving version: the queued reapply would still move the alias off it
    before = counts(settings)
    back = client.post(f"/models/{model.name}/rollback", json={"version": 3})
    assert assert_problem(back, 409)["job_id"] == job["id"] and counts(settings) == before
    assert _serving(settings, model.name) == 3


def _bad_publish_on_top(settings, model):
    """v4: a bad publish on top of v3 (same erasures), serving: v3 is a safe rollback target."""
    with transaction(settings.database_url) as s:
        s.add(ModelVersion(model_name=model.name, version=4, parent_version=3, sha256="4" * 64,
                           artifact_uri="file:///fake/v4", deletions=[],
                           erased_cells=s.execute(select(ModelVersion.erased_cells).where(
                               ModelVersion.version == 3)).scalar_one()))
        s.get(Alias, (model.name, "serving")).version = 4


def test_safe_rollback_moves_the_alias_and_records_it(client, settings, model, stored):
    _history(settings, model, ["r-a", "r-b"])
    _bad_publish_on_top(settings, model)
    stored(model.name, 3)
    with transaction(settings.database_url) as s:  # a deletion job under way on v4 would re-point the alias
        s.add(Job(id="j-busy", model_name=model.name, kind="deletion", status="running", method="m", base_version=4))
    before = counts(settings)
    busy = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 3}), 409)
    assert busy["job_id"] == "j-busy" and counts(settings) == before and _serving(settings, model.name) == 4
    with transaction(settings.database_url) as s:
        s.get(Job, "j-busy").status = "completed"

    r = client.post(f"/models/{model.name}/rollback", json={"version": 3})
    assert r.status_code == 200, r.text
    assert r.json() == {"action": "moved", "model": model.name, "from_version": 4, "to_version": 3,
                        "serving_version": 3, "job": None}
    assert _serving(settings, model.name) == 3
    with transaction(settings.database_url) as s:
        hist = s.execute(select(AliasHistory).order_by(AliasHistory.id.desc())).scalars().first()
        event = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc())).scalars().first()
    assert (hist.from_version, hist.to_version, hist.reason) == (4, 3, "rollback")
    assert (event.kind, event.payload) == ("model.rollback", {"from_version": 4, "to_version": 3})

    before = counts(settings)
    noop = client.post(f"/models/{model.name}/rollback", json={"version": 3})
    assert noop.status_code == 200 and noop.json()["action"] == "noop"
    assert counts(settings) == before

    assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 7}), 404)
    assert_problem(client.post("/models/nope/rollback", json={"version": 1}), 404)
    assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": "x"}), 422, "validation-error")


def test_jobs_are_listed_newest_first_filtered_and_paged(client, settings, model):
    from datetime import timedelta

    from worker.tables import utcnow

    now = utcnow()
    with transaction(settings.database_url) as s:
        for i, (kind, status) in enumerate([("deletion", "completed"), ("deletion", "failed"),
                                            ("reapply", "queued"), ("propagate", "running")]):
            s.add(Job(id=f"job-{i}", model_name=model.name, kind=kind, status=status, method="interference_aware",
                      base_version=1, error="boom" if status == "failed" else None,
                      created_at=now + timedelta(seconds=i)))
    everything = client.get("/jobs").json()
    assert [j["id"] for j in everything["items"]] == ["job-3", "job-2", "job-1", "job-0"]
    # a listing leaves metrics and parameters (a reapply's cells: megabytes) to the job's own route
    assert all("params" not in j and "metrics" not in j for j in everything["items"])
    assert everything["items"][0]["links"] == {"self": "/jobs/job-3"}
    assert client.get("/jobs/job-3").json()["params"] is None
    assert everything["next_cursor"] is None
    failed = client.get("/jobs", params={"status": "failed"}).json()["items"]
    assert [(j["id"], j["error"]) for j in failed] == [("job-1", "boom")]
    assert [j["id"] for j in client.get("/jobs", params={"kind": "deletion"}).json()["items"]] == ["job-1", "job-0"]
    assert client.get("/jobs", params={"model": "other"}).json()["items"] == []
    since = (now + timedelta(seconds=2)).isoformat()
    assert [j["id"] for j in client.get("/jobs", params={"since": since}).json()["items"]] == ["job-3", "job-2"]

    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["job-3", "job-2", "job-1", "job-0"]

    before = counts(settings)
    for params, loc in (({"status": "stuck"}, "status"), ({"kind": "retrain"}, "kind"),
                        ({"cursor": "not-a-cursor"}, None), ({"limit": 0}, "limit"), ({"state": "failed"}, "state")):
        problem = assert_problem(client.get("/jobs", params=params), 422)
        if loc is not None:
            assert problem["errors"][0]["loc"] == ["query", loc], params
    assert counts(settings) == before


def test_a_rollback_to_a_version_the_store_does_not_hold_as_recorded_moves_nothing(client, settings, model, stored):
    """The alias moved on the record alone: a target whose weights were damaged or removed outside
    the service became serving with a 200, then every deletion job and `serve` failed."""
    from model_store.local import LocalModelStore
    from worker.versions import Conflict, _check_target_stored

    _history(settings, model, ["r-a", "r-b"])
    _bad_publish_on_top(settings, model)
    folder = settings.store_dir / model.name / "v3"

    def refused(state: str, body=None) -> None:
        before = counts(settings)
        problem = assert_problem(client.post(f"/models/{model.name}/rollback", json=body or {"version": 3}), 409)
        assert (problem["store_state"], problem["version"]) == (state, (body or {"version": 3})["version"])
        assert "cannot be served" in problem["detail"] and "nothing was moved" in problem["detail"]
        assert "/" not in problem["detail"] and str(settings.store_dir) not in json.dumps(problem)  # no path
        assert counts(settings) == before and _serving(settings, model.name) == 4
        return problem["detail"]

    stored(model.name, 3)
    weights = folder / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-8] + b"\0" * 8)  # damaged: another sha256 than the manifest's
    assert "weights in the store do not match the sha256" in refused("damaged_weights")
    weights.unlink()  # removed by hand: not purged, as far as the record knows
    refused("missing_weights")
    weights.write_bytes(intact)
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text("{not json")
    assert "its manifest in the store cannot be read" in refused("damaged_manifest")
    # weights of another architecture than the manifest's model_config: they are the record's (its
    # sha256), the manifest is what changed; it was said to be the weights, which did match the sha256
    for config, why in (({"width": 8}, "its weights match the sha256 the record has, but not the architecture its "
                                       "manifest's model_config describes"),
                        ({"tasks": {}}, "its manifest in the store does not describe a model architecture")):
        edited = json.loads(manifest)
        edited["model_config"].update(config)
        (folder / "manifest.json").write_text(json.dumps(edited))
        assert why in refused("damaged_manifest")
        with transaction(settings.database_url) as s:  # and so says the check under the locks, not given the hash
            row = s.execute(select(ModelVersion).where(ModelVersion.version == 3)).scalar_one()
            with pytest.raises(Conflict, match=why) as under_locks:
                _check_target_stored(LocalModelStore(settings.store_dir), row)
            assert under_locks.value.extras["store_state"] == "damaged_manifest"
    (folder / "manifest.json").write_text(manifest)
    with transaction(settings.database_url) as s:  # the record names other weights than the store holds
        s.execute(select(ModelVersion).where(ModelVersion.version == 3)).scalar_one().sha256 = "e" * 64
    refused("other_version")
    shutil.rmtree(folder)
    refused("missing")
    # a reapply starts from the target's weights: refused alike, no job queued
    stored(model.name, 1)
    (settings.store_dir / model.name / "v1" / "model.safetensors").unlink()
    refused("missing_weights", {"version": 1, "reapply_erasures": True})
    assert count(settings, Job) == 0

    stored(model.name, 3)  # restored: the rollback goes through
    r = client.post(f"/models/{model.name}/rollback", json={"version": 3})
    assert (r.status_code, r.json()["action"], _serving(settings, model.name)) == (200, "moved", 3)


def test_a_rollback_hashes_its_targets_weights_once_before_taking_any_lock(client, settings, model, stored,
                                                                          monkeypatch):
    """The store's check read and hashed the whole weights file inside the rollback's
    transaction: the model row and the serving alias locked (on SQLite the write lock, every
    writer waiting) for as long as the read took. They are hashed once, before it."""
    from model_store import IntegrityError
    from model_store.local import LocalModelStore
    from worker import versions

    _history(settings, model, ["r-a", "r-b"])
    _bad_publish_on_top(settings, model)
    stored(model.name, 3)
    hashed, real = [], LocalModelStore.check_weights

    def check_weights(self, name, version):
        hashed.append(version)
        return real(self, name, version)

    monkeypatch.setattr(LocalModelStore, "check_weights", check_weights)
    r = client.post(f"/models/{model.name}/rollback", json={"version": 3})
    assert r.status_code == 200 and r.json()["serving_version"] == 3
    assert hashed == [3]  # in check_weights_first, not again under the locks
    # what check_weights_first found is what the transaction goes by
    with transaction(settings.database_url) as s:
        row = s.execute(select(ModelVersion).where(ModelVersion.version == 3)).scalar_one()
        damaged = versions.WeightsCheck(3, row.sha256, IntegrityError("weights sha256 ... does not match"))
        store = LocalModelStore(settings.store_dir)
        with pytest.raises(versions.Conflict, match="do not match") as refused:
            versions._check_target_stored(store, row, damaged)
        assert refused.value.extras["store_state"] == "damaged_weights"
        versions._check_target_stored(store, row, versions.WeightsCheck(3, row.sha256))
        assert hashed == [3]
        versions._check_target_stored(store, row, versions.WeightsCheck(3, "f" * 64))  # another sha: hashed
        assert hashed == [3, 3]
    assert versions.check_weights_first(settings, store, model.name, 99) is None  # no such version


def test_a_rollback_target_the_store_cannot_read_is_a_409_not_a_500(client, settings, model, stored, monkeypatch):
    """A permission or I/O error reading the target (not the store's own error) was a 500."""
    from model_store.local import LocalModelStore

    _history(settings, model, ["r-a", "r-b"])
    _bad_publish_on_top(settings, model)
    stored(model.name, 3)

    def unreadable(self, name, version):
        raise PermissionError(13, "Permission denied", "/srv/models/m/v3/model.safetensors")

    monkeypatch.setattr(LocalModelStore, "check_weights", unreadable)
    before = counts(settings)
    problem = assert_problem(client.post(f"/models/{model.name}/rollback", json={"version": 3}), 409)
    assert problem["store_state"] == "unreadable" and "cannot read it (Permission denied)" in problem["detail"]
    assert "/srv" not in problem["detail"] and counts(settings) == before and _serving(settings, model.name) == 4

