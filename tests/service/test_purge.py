"""Purging the weights of versions that still hold erased data (POST /models/{name}/purge,
`unlearnd purge`): the erased people's data left the serving model, but every earlier
version in the store still held it, for ever. Real store, PostgreSQL and jobs."""
from __future__ import annotations

import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.cli import main as cli_main
from app.main import create_app
from model_store import PurgedVersion
from worker import jobs
from worker.audit import verify_chain
from worker.db import transaction
from worker.tables import AuditEvent, Job, ModelVersion, utcnow

from .conftest import assert_problem, counts
from .test_hardening_worker import TINY, TINY_B, _submit, tiny, tiny_v1, two_models  # noqa: F401 - fixtures


@pytest.fixture
def erased_twice(tiny):
    """v1 (the original), v2 (erased ids[0]'s depth), v3 (erased ids[1]'s depth, serving)."""
    s, store, ids = tiny
    requests = []
    for instance in ids[:2]:
        requests.append(_submit(s, instance))
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    with TestClient(create_app(s)) as client:
        client.requests = requests
        yield s, store, ids, client


def _versions(client) -> dict[int, dict]:
    return {v["version"]: v for v in client.get(f"/models/{TINY}/versions").json()}


def test_a_dry_run_lists_the_versions_that_hold_erased_data_and_deletes_nothing(erased_twice):
    s, store, ids, client = erased_twice
    before = counts(s)
    dead = store._model_dir(TINY) / ".tmp-v9-dead-writer"  # a dead write's leftovers: a real purge tidies them
    dead.mkdir()
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    r = client.post(f"/models/{TINY}/purge", json={"dry_run": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dry_run"] is True and [v["version"] for v in body["versions"]] == [1, 2]
    assert [v["purged"] for v in body["versions"]] == [False, False]
    held = {v["version"]: [(e["instance_id"], e["tasks"]) for e in v["held_erasures"]] for v in body["versions"]}
    assert held == {1: [(ids[0], ["depth"]), (ids[1], ["depth"])], 2: [(ids[1], ["depth"])]}
    assert all(store.exists(TINY, v) for v in (1, 2, 3)) and counts(s) == before and dead.is_dir()
    assert all(v["purged_at"] is None for v in _versions(client).values())
    # versions newer than the window are kept
    assert client.post(f"/models/{TINY}/purge", json={"older_than_days": 1}).json()["versions"] == []


def test_purging_deletes_the_weights_keeps_the_record_and_refuses_rollbacks_to_them(erased_twice):
    s, store, ids, client = erased_twice

    def holding() -> list[list[int]]:  # per request, what its certificate says still holds its cells
        return [client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"][TINY]
                for rid in client.requests]

    assert holding() == [[1], [1, 2]]
    r = client.post(f"/models/{TINY}/purge", json={})
    assert [(v["version"], v["purged"], v["published"]) for v in r.json()["versions"]] == [(1, True, True),
                                                                                           (2, True, True)]
    for v in (1, 2):
        assert not store.exists(TINY, v) and store.manifest(TINY, v).version == v  # the manifest stays
        with pytest.raises(PurgedVersion, match="purged"):
            store.load(TINY, v)
    store.load(TINY, 3)  # the serving version is untouched
    assert holding() == [[], []]
    listed = _versions(client)
    assert listed[1]["purged_at"] and listed[2]["purged_at"] and listed[3]["purged_at"] is None
    assert client.get(f"/models/{TINY}/versions/1").json()["purged_at"] == listed[1]["purged_at"]
    with transaction(s.database_url) as session:
        events = session.execute(select(AuditEvent).where(AuditEvent.kind == "model.version_purged")
                                 .order_by(AuditEvent.seq)).scalars().all()
        assert [(e.payload["version"], len(e.payload["held_erasures"])) for e in events] == [(1, 2), (2, 1)]
        assert events[0].payload["sha256"] == store.manifest(TINY, 1).sha256
        assert verify_chain(session)["ok"] is True

    before = counts(s)
    for body in ({"version": 1}, {"version": 2, "reapply_erasures": True}):
        problem = assert_problem(client.post(f"/models/{TINY}/rollback", json=body), 409)
        assert "was purged" in problem["detail"] and problem["purged_at"] == listed[body["version"]]["purged_at"]
        assert problem["purged_at"].endswith("Z") and f"purged at {problem['purged_at']}:" in problem["detail"]
    assert counts(s) == before
    # a second purge finds nothing left to do
    assert client.post(f"/models/{TINY}/purge", json={}).json()["versions"] == []
    scrape = client.get("/metrics").text
    assert f'unlearnd_model_versions{{model="{TINY}",weights="stored"}} 1.0' in scrape
    assert f'unlearnd_model_versions{{model="{TINY}",weights="purged"}} 2.0' in scrape


def test_a_workers_caches_of_purged_versions_are_dropped(erased_twice):
    """A worker's engine cache of a version holds its model and numbers from its data: a
    purge drops it at once in its own process (the embedded worker), and any worker drops
    it before its next job."""
    s, store, ids, client = erased_twice
    assert {(TINY, 1), (TINY, 2)} <= set(jobs.ENGINE_CACHE)  # the two jobs' bases
    assert client.post(f"/models/{TINY}/purge", json={"dry_run": True}).status_code == 200
    assert {(TINY, 1), (TINY, 2)} <= set(jobs.ENGINE_CACHE)  # a dry run drops nothing
    assert client.post(f"/models/{TINY}/purge", json={}).status_code == 200
    assert not {(TINY, 1), (TINY, 2)} & set(jobs.ENGINE_CACHE)
    elsewhere = jobs.engine_cache(TINY, 1)  # as another worker process would still hold it
    elsewhere["eval_context"] = object()
    _submit(s, ids[2])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    assert (TINY, 1) not in jobs.ENGINE_CACHE and (TINY, 3) in jobs.ENGINE_CACHE


def test_a_purge_that_committed_is_answered_as_done_when_dropping_the_caches_fails(erased_twice, monkeypatch):
    """Dropping the embedded worker's caches runs after the purge committed. A database blip
    there answered 503 "nothing was stored" for weights that were deleted and recorded purged;
    the purge is answered, and the worker drops the caches before its next job anyway."""
    from sqlalchemy.exc import OperationalError

    s, store, ids, client = erased_twice

    def blip(settings):
        raise OperationalError("SELECT model_versions", {}, Exception("server closed the connection"))

    monkeypatch.setattr(jobs, "forget_purged_versions", blip)
    r = client.post(f"/models/{TINY}/purge", json={})
    assert r.status_code == 200, r.text
    assert [(v["version"], v["purged"]) for v in r.json()["versions"]] == [(1, True), (2, True)]
    assert not store.exists(TINY, 1) and not store.exists(TINY, 2)
    assert all(v["purged_at"] is not None for n, v in _versions(client).items() if n in (1, 2))


def test_purge_takes_the_erased_cells_scores_out_of_the_stored_calibration(erased_twice):
    """A shadow calibration scores every training cell: numbers about people's data, kept next
    to the versions. A purge takes the erased cells' out (a dry run counts them), with an
    audit event; the other cells' scores stay as they were."""
    s, store, ids, client = erased_twice
    tasks = list(store.manifest(TINY, 1).model_config["tasks"])
    table = {i: {t: 0.25 for t in tasks} for i in ids[:3]}
    store.put_calibration(TINY, {"kind": "interference_aware.shadow_scores", "version": 1,
                                 "sha256": store.manifest(TINY, 1).sha256, "measured_instances": list(ids[:3]),
                                 "full": table, "partial": table})
    before = store.calibration(TINY)
    dry = client.post(f"/models/{TINY}/purge", json={"dry_run": True}).json()
    assert dry["calibration_scores"] == 4 and store.calibration(TINY) == before  # 2 erased cells, 2 modes
    assert client.post(f"/models/{TINY}/purge", json={}).json()["calibration_scores"] == 4
    after = store.calibration(TINY)
    for mode in ("full", "partial"):
        assert after[mode] == {ids[0]: {t: 0.25 for t in tasks if t != "depth"},
                               ids[1]: {t: 0.25 for t in tasks if t != "depth"}, ids[2]: table[ids[2]]}
    assert after["redacted_cells"] == 4 and after["sha256"] == before["sha256"]
    with transaction(s.database_url) as session:
        event = session.execute(select(AuditEvent).where(AuditEvent.kind == "model.calibration_redacted")).scalar_one()
    assert event.payload["cells"] == 4
    assert client.post(f"/models/{TINY}/purge", json={}).json()["calibration_scores"] == 0
    assert client.get("/audit/verify").json()["ok"] is True


def test_a_redaction_whose_record_was_not_committed_is_recorded_by_the_next_purge(erased_twice):
    """The calibration file is rewritten before the purge's transaction commits. A commit
    that failed left the scores gone and no event saying so, and every later purge found
    nothing to take out: the redaction was never in the audit log."""
    from worker.versions import CALIBRATION_REDACTED_EVENT, redact_calibration

    s, store, ids, client = erased_twice
    tasks = list(store.manifest(TINY, 1).model_config["tasks"])
    table = {i: {t: 0.25 for t in tasks} for i in ids[:3]}
    store.put_calibration(TINY, {"sha256": store.manifest(TINY, 1).sha256, "full": table, "partial": table})
    with pytest.raises(RuntimeError, match="the commit failed"):
        with transaction(s.database_url) as session:
            assert redact_calibration(session, store, TINY) == 4
            raise RuntimeError("the commit failed")
    assert store.calibration(TINY)["redacted_cells"] == 4  # the file is redacted, its event rolled back

    def events():
        with transaction(s.database_url) as session:
            return [e.payload for e in session.execute(
                select(AuditEvent).where(AuditEvent.kind == CALIBRATION_REDACTED_EVENT)).scalars()]

    assert events() == []
    assert client.post(f"/models/{TINY}/purge", json={"dry_run": True}).json()["calibration_scores"] == 0
    assert events() == []  # a dry run records nothing
    assert client.post(f"/models/{TINY}/purge", json={}).json()["calibration_scores"] == 0
    assert events() == [{"cells": 4, "unrecorded": 4}]
    client.post(f"/models/{TINY}/purge", json={})
    assert events() == [{"cells": 4, "unrecorded": 4}]  # recorded once
    assert client.get("/audit/verify").json()["ok"] is True


def test_a_calibration_computed_again_counts_its_own_unrecorded_redactions(erased_twice):
    # the count compared the file's redactions with every redaction event of the model: after
    # the file was removed and computed again (the documented way to calibrate again), the old
    # file's events hid the new file's unrecorded ones
    from worker.versions import CALIBRATION_REDACTED_EVENT, redact_calibration

    s, store, ids, client = erased_twice
    tasks = list(store.manifest(TINY, 1).model_config["tasks"])
    table = {i: {t: 0.25 for t in tasks} for i in ids[:3]}
    store.put_calibration(TINY, {"calibration_id": "first", "full": table, "partial": table})
    assert client.post(f"/models/{TINY}/purge", json={}).json()["calibration_scores"] == 4
    (s.store_dir / TINY / "calibration.json").unlink()
    store.put_calibration(TINY, {"calibration_id": "second", "full": table, "partial": {}})
    with pytest.raises(RuntimeError, match="the commit failed"):
        with transaction(s.database_url) as session:
            assert redact_calibration(session, store, TINY) == 2
            raise RuntimeError("the commit failed")
    client.post(f"/models/{TINY}/purge", json={})
    with transaction(s.database_url) as session:
        events = [e.payload for e in session.execute(select(AuditEvent).where(
            AuditEvent.kind == CALIBRATION_REDACTED_EVENT).order_by(AuditEvent.seq)).scalars()]
    assert events == [{"cells": 4, "calibration_id": "first"}, {"cells": 2, "unrecorded": 2, "calibration_id": "second"}]


def test_a_calibration_holding_nan_scores_is_redacted_and_the_purge_completes(erased_twice):
    """shadow_scores writes NaN for a cell it could not score. A calibration file stored with
    one (before the store wrote strict JSON) made the redaction fail after the weights were
    deleted: the purge answered 500, recorded nothing, and failed again on every run. Now it
    is redacted (the NaN dropped: unscored, as the engine reads it) and the purge recorded."""
    s, store, ids, client = erased_twice
    tasks = list(store.manifest(TINY, 1).model_config["tasks"])
    table = {i: {t: 0.25 for t in tasks} for i in ids[:3]}
    table[ids[2]]["depth"] = float("nan")
    (s.store_dir / TINY / "calibration.json").write_text(json.dumps(
        {"sha256": store.manifest(TINY, 1).sha256, "full": table, "partial": {}, "seconds": float("nan")}))
    r = client.post(f"/models/{TINY}/purge", json={})
    assert r.status_code == 200, r.text
    assert r.json()["calibration_scores"] == 2 and not store.exists(TINY, 1)
    stored = (s.store_dir / TINY / "calibration.json").read_text()
    assert "NaN" not in stored
    after = json.loads(stored)
    assert after["full"][ids[2]] == {t: 0.25 for t in tasks if t != "depth"} and after["seconds"] is None
    with transaction(s.database_url) as session:
        assert session.execute(select(ModelVersion.purged_at).where(
            ModelVersion.model_name == TINY, ModelVersion.version == 1)).scalar() is not None


def test_the_store_writes_a_calibration_as_strict_json_without_non_finite_scores(tmp_path):
    from model_store import LocalModelStore

    store = LocalModelStore(tmp_path)
    stored = store.put_calibration("m", {"full": {"a": {"depth": float("nan"), "normal": 0.5}, "b": {"depth": float("inf")}},
                                         "partial": {}, "fits": {"depth": {"slope": float("nan")}}})
    assert stored == {"full": {"a": {"normal": 0.5}}, "partial": {}, "fits": {"depth": {"slope": None}}}
    assert "NaN" not in (tmp_path / "m" / "calibration.json").read_text()


def test_a_running_jobs_base_and_versions_without_erased_data_are_kept(erased_twice):
    s, store, ids, client = erased_twice
    with transaction(s.database_url) as session:
        v3 = session.execute(select(ModelVersion).where(ModelVersion.model_name == TINY,
                                                        ModelVersion.version == 3)).scalar_one()
        # a version holding every erasure (as a rollback target would) that is not serving
        session.add(ModelVersion(model_name=TINY, version=4, parent_version=3, sha256="4" * 64,
                                 artifact_uri="file:///nowhere/v4", deletions=[], erased_cells=list(v3.erased_cells),
                                 metrics={}, created_at=utcnow()))
        # a reapply queued on top of v2 (a rollback with reapply_erasures)
        session.add(Job(id="reapply-on-v2", model_name=TINY, kind="reapply", status="queued",
                        method="interference_aware", base_version=2, params={"cells": [[ids[1], "depth"]]}))
    r = client.post(f"/models/{TINY}/purge", json={})
    assert [v["version"] for v in r.json()["versions"]] == [1]
    assert store.exists(TINY, 2) and store.exists(TINY, 3)


def test_bad_purge_requests_are_refused_and_change_nothing(erased_twice):
    s, store, _, client = erased_twice
    before = counts(s)
    assert_problem(client.post("/models/nope/purge", json={}), 404)
    for body in ({"older_than_days": -1}, {"older_than_days": 1e9}, {"older_than_days": True}, {"dry_run": "yes"},
                 {"dry-run": True}):
        assert_problem(client.post(f"/models/{TINY}/purge", json=body), 422)
    assert counts(s) == before and all(store.exists(TINY, v) for v in (1, 2, 3))


def test_the_purge_command(erased_twice, environment, capsys):
    s, store, _, _ = erased_twice
    for key, value in {"DATABASE_URL": s.database_url, "STORE_DIR": str(s.store_dir),
                       "MODEL_NAME": TINY}.items():
        environment.setenv(f"UNLEARND_{key}", value)
    assert cli_main(["purge", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{TINY} v1: would purge" in out and f"{TINY}: 2 version(s) would purge" in out
    assert store.exists(TINY, 1)
    assert cli_main(["purge", "--older-than-days", "1"]) == 0
    assert "0 version(s) purged" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        cli_main(["purge", "--older-than-days", "abc"])
    assert refused.value.code == 2 and "days is a number, got 'abc'" in capsys.readouterr().err
    assert cli_main(["purge"]) == 0
    assert "2 version(s) purged" in capsys.readouterr().out and not store.exists(TINY, 1)
    assert cli_main(["purge", "--model", "nope"]) == 2
    assert capsys.readouterr().err == "unlearnd: no model named 'nope'\n"
    with transaction(s.database_url) as session:
        actors = {e.payload["actor"] for e in session.execute(
            select(AuditEvent).where(AuditEvent.kind == "model.version_purged")).scalars()}
    assert len(actors) == 1 and actors.pop().startswith("cli")


def test_a_store_that_is_not_the_services_purges_nothing(erased_twice, tmp_path, environment, capsys):
    """A relative UNLEARND_STORE_DIR read from another working directory finds no versions:
    the purge refuses (409, exit 2) instead of recording the versions as purged while their
    weights stay, for good (a later run with the right store would skip them)."""
    from model_store import LocalModelStore

    s, store, _, client = erased_twice
    before = counts(s)
    with transaction(s.database_url) as session:
        from worker.errors import Conflict
        from worker.versions import purge_versions

        with pytest.raises(Conflict, match="does not hold the versions .* Nothing was purged"):
            purge_versions(session, LocalModelStore(tmp_path / "elsewhere"), TINY)
    for key, value in {"DATABASE_URL": s.database_url, "STORE_DIR": str(tmp_path / "elsewhere"),
                       "MODEL_NAME": TINY}.items():
        environment.setenv(f"UNLEARND_{key}", value)
    assert cli_main(["purge"]) == 2
    assert "Is UNLEARND_STORE_DIR the service's?" in capsys.readouterr().err
    assert counts(s) == before and all(store.exists(TINY, v) for v in (1, 2, 3))
    assert all(v["purged_at"] is None for v in _versions(client).values())
    # also when nothing is left to purge: the serving version must be there (a cron job on the
    # wrong store said "0 version(s) purged" for ever)
    assert cli_main(["purge", "--dry-run"]) == 2
    capsys.readouterr()
    assert len(client.post(f"/models/{TINY}/purge", json={}).json()["versions"]) == 2
    assert cli_main(["purge"]) == 2
    assert "v3 (missing)" in capsys.readouterr().err


def test_a_damaged_manifest_is_named_as_such_and_purges_nothing(erased_twice):
    """It was reported as missing, with the hint that the store directory was another's (both
    paths the same), and its cause dropped."""
    from worker.errors import Conflict
    from worker.versions import purge_versions

    s, store, _, client = erased_twice
    before = counts(s)
    manifest = store.root / TINY / "v1" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with transaction(s.database_url) as session, pytest.raises(Conflict) as caught:
        purge_versions(session, store, TINY)
    said = str(caught.value)
    assert "damaged manifest of 'tiny-mtl': v1: " in said and "manifest.json" in said
    assert "missing" not in said and "UNLEARND_STORE_DIR" not in said and "nothing was purged" in said
    assert counts(s) == before and all(store.exists(TINY, v) for v in (2, 3))


def test_a_purge_the_store_refuses_part_way_is_a_409_naming_why_without_a_path(erased_twice, tmp_path,
                                                                             monkeypatch):
    """StoreError or OSError out of the store (v2's weights a link, restored from a backup so;
    a file the service may not delete) made the API's purge a 500 saying nothing, where the
    CLI prints the reason. A 409 with a rollback's store_state; nothing recorded, and the
    weights deleted before the refusal (v1's) are recorded by the next purge."""
    from model_store.local import LocalModelStore

    s, store, _, client = erased_twice
    weights = store.root / TINY / "v2" / "model.safetensors"
    backup = tmp_path / "backup.safetensors"
    os.replace(weights, backup)
    weights.symlink_to(backup)
    problem = assert_problem(client.post(f"/models/{TINY}/purge", json={}), 409, "conflict")
    assert problem["store_state"] == "damaged_weights" and problem["model"] == TINY
    assert f"refused the purge of {TINY!r}: cannot purge {TINY} v2: a file in the model store is a symbolic link" \
        in problem["detail"] and "next purge records them" in problem["detail"]
    assert str(tmp_path) not in problem["detail"] and str(store.root) not in problem["detail"]
    assert backup.is_file() and not store.exists(TINY, 1)  # v1 went first; the record does not say so yet
    assert all(v["purged_at"] is None for v in _versions(client).values())

    def refused(self, name, version):
        raise PermissionError(13, "Permission denied", str(self.root / name / f"v{version}" / "model.safetensors"))

    os.replace(backup, weights)  # weights.unlink() would leave the link's target: replaced by the file itself
    monkeypatch.setattr(LocalModelStore, "purge", refused)
    problem = assert_problem(client.post(f"/models/{TINY}/purge", json={}), 409, "conflict")
    assert problem["store_state"] == "unreadable"
    assert f"refused the purge of {TINY!r}: v1: a permission or disk error (Permission denied)" in problem["detail"]
    assert str(store.root) not in problem["detail"]
    monkeypatch.undo()
    r = client.post(f"/models/{TINY}/purge", json={})
    assert [(v["version"], v["purged"]) for v in r.json()["versions"]] == [(1, True), (2, True)]
    assert all(_versions(client)[v]["purged_at"] for v in (1, 2)) and not store.exists(TINY, 2)


def test_weights_with_a_second_name_are_refused_not_recorded_purged(erased_twice, tmp_path):
    """Purge unlinked one name of the weights file: a hard link made outside the service (a
    backup with cp -al) kept the bytes while the record said purged."""
    s, store, _, client = erased_twice
    weights = store.root / TINY / "v1" / "model.safetensors"
    backup = store.root / f".{TINY}-v1-backup.safetensors"  # a hard link must be on the same file system
    os.link(weights, backup)
    problem = assert_problem(client.post(f"/models/{TINY}/purge", json={}), 409, "conflict")
    assert problem["store_state"] == "damaged_weights"
    assert "its weights file has 2 names (hard links" in problem["detail"] and str(store.root) not in problem["detail"]
    assert weights.is_file() and all(v["purged_at"] is None for v in _versions(client).values())
    backup.unlink()
    done = client.post(f"/models/{TINY}/purge", json={})
    assert [(v["version"], v["purged"]) for v in done.json()["versions"]] == [(1, True), (2, True)]


def test_an_empty_body_purges_with_the_defaults(erased_twice):
    s, store, _, client = erased_twice
    r = client.post(f"/models/{TINY}/purge")
    assert r.status_code == 200 and [v["version"] for v in r.json()["versions"]] == [1, 2], r.text


def test_every_model_on_the_dataset_and_unpublished_artifacts(two_models):
    """Model A's job stores its artifact, then is rebased because model B published an erasure
    of the same dataset meanwhile: A's artifact (no version points at it) holds B's erased
    cell. Certificates name every model's weights that still hold a request's cells, the
    serving version of a model behind on propagation included (never purged), and purge
    deletes the unpublished artifact too."""
    s, s_b, store, ids = two_models
    mine = _submit(s, ids[1])
    claim = jobs.claim_next(s, TINY)
    theirs = _submit(s_b, ids[0])
    assert [o.status for o in jobs.drain_model(s_b, store, TINY_B)] == ["completed"]  # B v2
    assert jobs.run_job(s, store, claim.job_id, claim.attempt).status == "requeued"  # rebased, its v2 left unpublished
    with transaction(s.database_url) as session:
        assert session.execute(select(ModelVersion).where(ModelVersion.model_name == TINY)).scalars().all()[-1].version == 1
    assert store.exists(TINY, 2) and [ids[0], "depth"] not in store.manifest(TINY, 2).erased_cells

    with TestClient(create_app(s)) as client:
        held = client.get(f"/deletions/{theirs}/certificate").json()["held_by_stored_versions"]
        assert held == {TINY_B: [1], TINY: [1, 2]}  # A serves v1 (propagation pending) and holds v2 unpublished
        dry = client.post(f"/models/{TINY}/purge", json={"dry_run": True}).json()["versions"]
        assert [(v["version"], v["published"]) for v in dry] == [(2, False)]  # v1 serves: kept
        store.purge(TINY, 2)  # as a run that deleted the weights and failed before recording it
        assert [(v["version"], v["purged"]) for v in client.post(f"/models/{TINY}/purge", json={}).json()[
            "versions"]] == [(2, True)]  # recorded by the next run
        assert client.post(f"/models/{TINY}/purge", json={}).json()["versions"] == []  # and only once
        assert not store.exists(TINY, 2) and store.manifest(TINY, 2).version == 2  # the number is never reused
        # the rerun erases both cells (the rebase put the missing one in), on top of v1: v3
        assert [(o.status, o.version) for o in jobs.drain_model(s, store, TINY)] == [("completed", 3)]
        assert [v["version"] for v in client.post(f"/models/{TINY_B}/purge", json={}).json()["versions"]] == [1]
        assert [v["version"] for v in client.post(f"/models/{TINY}/purge", json={}).json()["versions"]] == [1]
        def held(rid):
            return client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"]

        assert held(theirs) == {TINY: [], TINY_B: []}
        assert held(mine) == {TINY: [], TINY_B: [2]}  # B serves v2 until its propagate job runs: not purged
        assert client.post(f"/models/{TINY_B}/purge", json={}).json()["versions"] == []
        assert [(o.status, o.version) for o in jobs.drain_model(s_b, store, TINY_B)] == [("completed", 3)]
        assert [v["version"] for v in client.post(f"/models/{TINY_B}/purge", json={}).json()["versions"]] == [2]
        assert held(mine) == {TINY: [], TINY_B: []}


def test_an_unpublished_artifact_whose_manifest_is_damaged_goes_whole(erased_twice, capsys):
    """An artifact no version points at, with a manifest that cannot be read: what it holds is
    unknown and nothing can publish it. Certificates count it as holding the request's
    cells; purge lists it (dry run) and deletes it whole, where it stopped at a parse error."""
    import shutil

    from model_store.local import MANIFEST_FILE

    s, store, ids, client = erased_twice
    folder = store._model_dir(TINY)
    shutil.copytree(folder / "v3", folder / "v4")
    (folder / "v4" / MANIFEST_FILE).write_text('{"model": "tiny')  # cut short
    for rid in client.requests:
        assert 4 in client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"][TINY]
    dry = client.post(f"/models/{TINY}/purge", json={"dry_run": True})
    assert dry.status_code == 200, dry.text
    damaged = [v for v in dry.json()["versions"] if v["version"] == 4]
    assert len(damaged) == 1 and damaged[0]["damaged"] and damaged[0]["sha256"] is None
    assert damaged[0]["published"] is False and damaged[0]["purged"] is False and (folder / "v4").is_dir()
    done = client.post(f"/models/{TINY}/purge", json={}).json()["versions"]
    assert [(v["version"], v["purged"], bool(v["damaged"])) for v in done] == [(1, True, False), (2, True, False),
                                                                               (4, True, True)]
    assert not (folder / "v4").exists() and 4 not in store.versions(TINY)
    with transaction(s.database_url) as session:
        events = session.execute(select(AuditEvent).where(AuditEvent.kind == "model.version_purged")
                                 .order_by(AuditEvent.seq)).scalars().all()
        assert events[-1].payload["version"] == 4 and events[-1].payload["damaged_manifest"]
    assert client.post(f"/models/{TINY}/purge", json={}).json()["versions"] == []


def test_a_purge_removes_a_dead_writers_fresh_temporary_copy(erased_twice):
    """A writer killed before its rename left a complete copy of the weights under .tmp-v<N>-*:
    listings remove such folders only once an hour old, and a purge answered with the copy
    still on disk. Every writer holds the lock while its folder lives, so under it none is live."""
    import shutil

    s, store, _, client = erased_twice
    folder = store._model_dir(TINY)
    dead = folder / ".tmp-v4-killed-writer"
    shutil.copytree(folder / "v2", dead)  # a fresh one: a listing leaves it
    assert store.versions(TINY) == [1, 2, 3] and dead.is_dir()
    assert client.post(f"/models/{TINY}/purge", json={"dry_run": True}).status_code == 200 and dead.is_dir()
    done = client.post(f"/models/{TINY}/purge", json={})
    assert done.status_code == 200, done.text
    assert not dead.exists() and [v["version"] for v in done.json()["versions"]] == [1, 2]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_a_damaged_artifact_that_cannot_be_deleted_whole_is_a_409_not_recorded_as_purged(erased_twice, monkeypatch):
    """Discarding it renamed it and deleted it ignoring errors: a folder left on disk was
    recorded purged (the audit event said so)."""
    import shutil

    from model_store import local
    from model_store.local import MANIFEST_FILE

    s, store, _, client = erased_twice
    folder = store._model_dir(TINY)
    shutil.copytree(folder / "v3", folder / "v4")
    (folder / "v4" / MANIFEST_FILE).write_text('{"model": "tiny')  # damaged: deleted whole

    def refused(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(local.shutil, "rmtree", refused)
    problem = assert_problem(client.post(f"/models/{TINY}/purge", json={}), 409, "conflict")
    assert "cannot delete" in problem["detail"] and "version 4" in problem["detail"]
    with transaction(s.database_url) as session:
        recorded = [e.payload["version"] for e in session.execute(
            select(AuditEvent).where(AuditEvent.kind == "model.version_purged")).scalars()]
    assert 4 not in recorded
    assert any(p.name.startswith(".tmp-discarded-v4-") for p in folder.iterdir())  # still on disk, not hidden
    monkeypatch.undo()
    done = client.post(f"/models/{TINY}/purge", json={})  # the leftover goes, v1 and v2 are recorded
    assert done.status_code == 200, done.text
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_a_store_whose_first_version_was_purged_is_not_trained_over(erased_twice, tmp_path, environment, capsys):
    """A database restored without the model (or another model name) over a store whose v1 was
    purged: `serve` says so and trains nothing (it trained, then failed to store v1)."""
    import shutil

    s, store, _, client = erased_twice
    client.post(f"/models/{TINY}/purge", json={})
    shutil.copytree(s.store_dir / TINY, tmp_path / "store" / "renamed")
    environment.setenv("UNLEARND_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    environment.setenv("UNLEARND_STORE_DIR", str(tmp_path / "store"))
    environment.setenv("UNLEARND_MODEL_NAME", "renamed")
    assert cli_main(["serve", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds version 1 of 'renamed' with its weights purged" in err and "nothing was trained" in err
    assert cli_main(["calibrate"]) == 2
    assert "version 1 of 'renamed' was purged" in capsys.readouterr().err


def test_a_store_whose_first_version_is_damaged_is_not_registered(tiny, tmp_path, environment, capsys):
    """A stored version 1 whose weights no longer match its manifest (truncated, altered) was
    registered as it was: it served, and every job on it failed. `serve` refuses it by name."""
    import shutil

    s, _, _ = tiny
    shutil.copytree(s.store_dir / TINY, tmp_path / "store" / TINY)
    weights = tmp_path / "store" / TINY / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    database = tmp_path / "fresh.db"
    environment.setenv("UNLEARND_DATABASE_URL", f"sqlite:///{database}")
    environment.setenv("UNLEARND_STORE_DIR", str(tmp_path / "store"))
    environment.setenv("UNLEARND_MODEL_NAME", TINY)
    assert cli_main(["serve", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"holds version 1 of {TINY!r}, but its weights do not match the sha256 or the architecture in its manifest" in err
    assert "nothing was registered" in err
    with transaction(f"sqlite:///{database}") as session:
        assert session.execute(select(ModelVersion)).first() is None


def test_purge_on_a_missing_sqlite_file_creates_none(environment, tmp_path, capsys):
    environment.setenv("UNLEARND_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    environment.setenv("UNLEARND_STORE_DIR", str(tmp_path / "store"))
    assert cli_main(["purge"]) == 2
    assert "no database at" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_purge_on_the_embedded_sqlite_record(tiny, tmp_path):
    """The embedded default (SQLite): the same purge, certificate and refused rollback."""
    from worker.bootstrap import ensure_model

    from .conftest import on_sqlite

    s, store, ids = tiny
    s = on_sqlite(s, tmp_path)
    ensure_model(s, store, progress=False)
    rid = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    with TestClient(create_app(s)) as client:
        assert client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"] == {TINY: [1]}
        r = client.post(f"/models/{TINY}/purge", json={})
        assert [(v["version"], v["purged"]) for v in r.json()["versions"]] == [(1, True)], r.text
        assert client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"] == {TINY: []}
        assert _versions(client)[1]["purged_at"] is not None
        assert "was purged" in assert_problem(client.post(f"/models/{TINY}/rollback", json={"version": 1}),
                                              409)["detail"]
        assert client.get("/audit/verify").json()["ok"] is True


def test_a_cell_two_models_requests_erased_is_each_requests(two_models):
    """Requests of two models on one dataset for one cell, both claimed: the first to publish
    writes the tombstone. The other request's certificate still names the weights that hold
    its cell (it said {} and a purge dry run listed them)."""
    s, s_b, store, ids = two_models
    a = _submit(s, ids[0])
    b = _submit(s_b, ids[0])
    claim_a, claim_b = jobs.claim_next(s, TINY), jobs.claim_next(s_b, TINY_B)
    assert jobs.run_job(s_b, store, claim_b.job_id, claim_b.attempt).status == "completed"
    assert jobs.run_job(s, store, claim_a.job_id, claim_a.attempt).status == "completed"
    with TestClient(create_app(s)) as client:
        for rid in (a, b):
            assert client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"] == {
                TINY: [1], TINY_B: [1]}
        client.post(f"/models/{TINY}/purge", json={})
        client.post(f"/models/{TINY_B}/purge", json={})
        for rid in (a, b):
            assert client.get(f"/deletions/{rid}/certificate").json()["held_by_stored_versions"] == {
                TINY: [], TINY_B: []}


def test_a_certificate_reads_no_lineage_of_a_version_with_a_watermark(settings, model):
    """200 versions of 5,000 erased cells each, published before the request's tombstone:
    their watermarks answer, no lineage is read (it read every one: 2.5 s, growing with the
    history). The first version, registered without a watermark, is compared cell by cell."""
    from sqlalchemy import event

    from unlearning.data import dataset_key
    from worker.db import engine_for
    from worker.requests import stored_versions_holding
    from worker.tables import DeletionRequest, Model, Tombstone

    key = dataset_key(model.spec)
    cells = [[f"x{i:06d}", "depth"] for i in range(5000)]
    with transaction(settings.database_url) as session:
        for v in range(2, 202):
            session.add(Tombstone(dataset_key=key, instance_id=f"x{v:06d}", task="depth", request_id=f"r{v}"))
        session.flush()
        first = session.execute(select(Tombstone.id).order_by(Tombstone.id)).scalars().first()
        for v in range(2, 202):
            session.add(ModelVersion(model_name=model.name, version=v, parent_version=v - 1, sha256="0" * 64,
                                     artifact_uri="file:///x", deletions=[], erased_cells=cells, metrics={},
                                     tombstone_watermark=first + v - 2, created_at=utcnow()))
        session.add(Tombstone(dataset_key=key, instance_id=model.train_ids[0], task="depth", request_id="r-1"))
    lineage_rows = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if "erased_cells" in statement.split("FROM")[0]:
            lineage_rows.append(cursor.rowcount)

    engine = engine_for(settings.database_url)
    event.listen(engine, "after_cursor_execute", count)
    try:
        with transaction(settings.database_url) as session:
            request = DeletionRequest(id="r-1", model_name=model.name, instance_id=model.train_ids[0],
                                      tasks=["depth"])
            held = stored_versions_holding(session, session.get(Model, model.name), request)
    finally:
        event.remove(engine, "after_cursor_execute", count)
    assert held == {model.name: list(range(1, 202))}
    assert lineage_rows == [1]  # the first version's, which has no watermark


def test_an_unpublished_artifact_whose_manifest_time_has_no_zone_is_purged_by_age(erased_twice):
    """A manifest written by another tool may give ``created_at`` without a zone (the store
    accepts any ISO 8601 time): read as UTC, as the record's times are. Comparing it with
    the purge's aware cut-off raised, and the purge answered 500."""
    import json
    import shutil

    from model_store.local import MANIFEST_FILE

    s, store, ids, client = erased_twice
    folder = store._model_dir(TINY)
    shutil.copytree(folder / "v1", folder / "v4")  # v1's weights: they hold both requests' cells
    manifest = json.loads((folder / "v4" / MANIFEST_FILE).read_text())
    manifest.update(version=4, created_at="2020-01-02T03:04:05")
    (folder / "v4" / MANIFEST_FILE).write_text(json.dumps(manifest))
    dry = client.post(f"/models/{TINY}/purge", json={"older_than_days": 30, "dry_run": True})
    assert dry.status_code == 200, dry.text
    (listed,) = [v for v in dry.json()["versions"] if v["version"] == 4]
    assert listed["published"] is False and not listed["damaged"] and listed["created_at"].startswith("2020-01-02T03:04:05")
    assert (folder / "v4").is_dir()


def test_a_reapply_rollback_sent_again_after_its_target_was_purged_is_still_a_noop(tiny):
    """A retry of a rollback with reapply_erasures whose job had published, after a purge deleted
    the target's weights, was refused as a rollback to a purged version: the request is done."""
    s, store, ids = tiny
    _submit(s, ids[0])
    jobs.drain_model(s, store, TINY)  # v2 erases ids[0]
    with TestClient(create_app(s)) as client:
        body = {"version": 1, "reapply_erasures": True}
        assert client.post(f"/models/{TINY}/rollback", json=body).status_code == 202
        assert [o.version for o in jobs.drain_model(s, store, TINY)] == [3]  # v1 with the erasure reapplied
        purged = client.post(f"/models/{TINY}/purge", json={}).json()["versions"]
        assert [(v["version"], v["purged"]) for v in purged] == [(1, True)]  # v2 holds no erased data
        before = counts(s)
        again = client.post(f"/models/{TINY}/rollback", json=body)
        assert again.status_code == 200, again.text
        assert (again.json()["action"], again.json()["serving_version"], again.json()["job"]) == ("noop", 3, None)
        assert counts(s) == before
        # not a repeat (no reapply asked): the purged target is refused
        assert "was purged" in assert_problem(client.post(f"/models/{TINY}/rollback", json={"version": 1}),
                                              409)["detail"]


def test_a_damaged_artifact_is_deleted_last_so_a_refused_purge_leaves_it_to_be_recorded(tiny, tmp_path):
    """A damaged unpublished artifact is deleted whole: nothing of it is left for a next run to
    find. Deleted before another artifact the store refused (its weights a link), it was never
    recorded, though the 409 says the next purge records what was deleted. It goes last now."""
    import shutil

    from model_store.local import MANIFEST_FILE

    s, store, ids = tiny
    for instance in ids[:2]:
        _submit(s, instance)
        assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    folder = store.root / TINY
    shutil.copytree(folder / "v3", folder / "v4")  # an unpublished artifact, its manifest cut short
    (folder / "v4" / MANIFEST_FILE).write_text('{"model": "tiny')
    shutil.copytree(folder / "v1", folder / "v5")  # an unpublished artifact holding erased data
    manifest = json.loads((folder / "v5" / MANIFEST_FILE).read_text())
    (folder / "v5" / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 5}))
    weights, backup = folder / "v5" / "model.safetensors", tmp_path / "backup.safetensors"
    os.replace(weights, backup)
    weights.symlink_to(backup)  # the store refuses to delete through a link
    with TestClient(create_app(s)) as client:
        refused = client.post(f"/models/{TINY}/purge", json={})
        assert refused.status_code == 409 and refused.json()["store_state"] == "damaged_weights"
        assert (folder / "v4").exists()  # not deleted: it goes last
        os.unlink(weights)
        os.replace(backup, weights)
        done = client.post(f"/models/{TINY}/purge", json={}).json()["versions"]
    assert {v["version"] for v in done if v["purged"]} >= {4, 5} and not (folder / "v4").exists()
    with transaction(s.database_url) as session:
        recorded = [e.payload["version"] for e in session.execute(
            select(AuditEvent).where(AuditEvent.kind == "model.version_purged")).scalars()]
    assert 4 in recorded and 5 in recorded


def test_a_calibration_that_cannot_be_rewritten_refuses_the_purge_before_any_version_is_deleted(
        erased_twice, monkeypatch):
    """The calibration is redacted first: its rewrite failing (a full disk) after a damaged
    artifact was deleted whole left that artifact gone and never recorded, under a 409."""
    import errno
    import shutil

    from model_store import LocalModelStore
    from model_store.local import MANIFEST_FILE

    s, store, ids, client = erased_twice
    tasks = list(store.manifest(TINY, 1).model_config["tasks"])
    table = {i: {t: 0.25 for t in tasks} for i in ids[:3]}
    store.put_calibration(TINY, {"sha256": store.manifest(TINY, 1).sha256, "full": table, "partial": table})
    folder = store.root / TINY
    shutil.copytree(folder / "v3", folder / "v4")  # an unpublished artifact, its manifest cut short
    (folder / "v4" / MANIFEST_FILE).write_text('{"model": "tiny')

    def disk_full(self, name, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / name / "calibration.json"))

    monkeypatch.setattr(LocalModelStore, "replace_calibration", disk_full)
    refused = client.post(f"/models/{TINY}/purge", json={})
    assert refused.status_code == 409 and "No space left on device" in refused.json()["detail"]
    assert (folder / "v4").exists() and store.exists(TINY, 1)  # nothing deleted
    monkeypatch.undo()
    done = client.post(f"/models/{TINY}/purge", json={}).json()
    assert done["calibration_scores"] > 0 and 4 in {v["version"] for v in done["versions"] if v["purged"]}
    with transaction(s.database_url) as session:
        recorded = [e.payload["version"] for e in session.execute(
            select(AuditEvent).where(AuditEvent.kind == "model.version_purged")).scalars()]
    assert 4 in recorded


def test_a_web_page_cannot_purge_through_the_operators_browser(erased_twice):
    """Without API keys (the default) a page the operator had open posted an empty form to
    /models/{name}/purge (no preflight: a form, or fetch in no-cors mode) and the stored weights
    were deleted for good. Browser requests from another site or origin are refused, and so is
    an empty body declared as anything but JSON; the same request from a program goes through."""
    s, store, _, client = erased_twice
    before = counts(s)
    url = f"/models/{TINY}/purge"
    for headers in ({"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
                    {"Origin": "null", "Content-Type": "text/plain"},  # a sandboxed frame, a file:// page
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},  # another port
                    {"Origin": "http://testserver.evil.example"}):
        body = assert_problem(client.post(url, headers=headers), 403, "forbidden")
        assert body["refused"] in ("cross-site-request", "cross-origin-request"), body
        assert "from programs, not from web pages" in body["detail"]
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        body = assert_problem(client.post(url, headers={"Content-Type": content_type}), 415, "unsupported-media-type")
        assert content_type.split(";")[0] in body["detail"]
    assert counts(s) == before and all(store.exists(TINY, v) for v in (1, 2, 3))
    # a program's request (no Origin), or the API docs' page on this very origin, and on a loopback name
    r = client.post(url, json={"dry_run": True}, headers={"Origin": "http://testserver", "Host": "testserver"})
    assert r.status_code == 403 and r.json()["refused"] == "browser-without-keys"  # testserver is no loopback name
    r = client.post(url, json={"dry_run": True}, headers={"Origin": "http://127.0.0.1:8000", "Host": "127.0.0.1:8000",
                                                          "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200, r.text
    assert client.post(url).status_code == 200  # no body, no Content-Type: the defaults, as before
    assert not store.exists(TINY, 1)
