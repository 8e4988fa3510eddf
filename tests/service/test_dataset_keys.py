"""Tombstones are keyed by the data a spec describes, not by how it is written
(``unlearning.data.canonical_spec``): two models on the same data written differently
share their erasures, and migration 0009 re-keys the tombstones a record already holds."""
from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, text

from unlearning.data import dataset_key
from worker import jobs
from worker.bootstrap import ensure_model
from worker.db import engine_for, transaction
from worker.errors import Conflict
from worker.migrate import alembic_config, head_revision, upgrade_database
from worker.requests import submit_deletion
from worker.tables import Alias, Job, Model, ModelVersion, OutboxMessage, Tombstone

from .conftest import create_database, drop_database, offline_script
from .test_hardening_worker import TINY, _submit, tiny, tiny_v1  # noqa: F401 - fixtures

MIGRATION = Path(__file__).resolve().parents[2] / "migrations" / "versions" / "0009_canonical_dataset_keys.py"

# the settings' spec and the one `unlearnd train --dataset indoor` records: the same tensors
FULL = {"name": "indoor", "n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}
BARE = {"name": "indoor"}
OTHER = {"name": "indoor", "seed": 1}  # other data: its own key


def _migration():
    spec = importlib.util.spec_from_file_location("migration_0009", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_key(spec: dict) -> str:
    """unlearning.data.dataset_key before 0009, written out here independently of the migration."""
    import hashlib

    body = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return f"{spec['name']}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


@pytest.mark.parametrize("spec", [
    BARE, FULL, OTHER, {"name": "street", "noise": "clean"}, {"name": "indoor", "noise": {"label_flip": 0.2}},
    {"name": "indoor", "noise": {"depth_sigma": 0, "image_sigma": 0.5}}, {"name": "indoor", "noise": None},
    {"name": "indoor", "noise": {"depht_sigma": 0.1}}, {"name": "indoor", "noise": {"label_flip": 2}},
    {"name": "indoor", "n_train": 12.0}, {"name": "nyuv2", "root": "/data/./nyu/"}, {"name": "nyuv2"},
    {"name": "cityscapes", "root": "/data/city", "num_classes": 7, "limit": 3}, {"name": "mnist"},
])
def test_the_migration_keys_as_the_library_does_at_0009(spec):
    """0009 freezes both key functions; at this revision they are the library's. (A later change
    of canonical_spec needs a migration of its own: this test then compares that one.)"""
    migration = _migration()
    assert migration.new_key(spec) == dataset_key(spec)
    assert migration.old_key(spec) == _old_key(spec)


def _insert(conn, table: str, **values) -> None:
    conn.execute(text(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"),
                 values)


def _tombstones(url: str) -> dict[int, tuple[str, str, str, str]]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(text("SELECT id, dataset_key, instance_id, task, request_id FROM tombstones"))
        return {r[0]: tuple(r[1:]) for r in rows}


def _watermarks(url: str) -> dict[str, int | None]:
    with engine_for(url).connect() as conn:
        return dict(conn.execute(text("SELECT model_name, tombstone_watermark FROM model_versions")).all())


def test_0009_rekeys_tombstones_and_merges_a_cell_erased_under_both_keys(tmp_path):
    """Models a (the bare name) and b (every size written out) are on the same data; c is not.
    Upgrade: a's and b's tombstones share the canonical key, a cell both erased keeps its
    earliest row, and their versions' watermarks (their own key's ids only) are cleared.
    Downgrade: each tombstone goes back to its request's model's key; the merged duplicate
    stays merged (docstring of 0009). On PostgreSQL and SQLite."""
    name = f"unlearnd_test_0009_{uuid.uuid4().hex[:8]}"
    urls = [create_database(name), f"sqlite:///{tmp_path / 'record.db'}"]
    specs = {"a": BARE, "b": FULL, "c": OTHER}
    old = {m: _old_key(s) for m, s in specs.items()}
    new = {m: dataset_key(s) for m, s in specs.items()}
    assert old["a"] != old["b"] and new["a"] == new["b"] != new["c"]
    cells = [  # id: (model, instance, task, request)
        (1, "a", "i1", "depth", "ra1"), (2, "a", "i2", "depth", "ra2"), (3, "b", "i3", "depth", "rb1"),
        (4, "b", "i1", "depth", "rb2"),  # the cell a erased as id 1
        (5, "b", "i2", "normal", "rb3"), (6, "c", "i1", "depth", "rc1")]
    try:
        for url in urls:
            command.upgrade(alembic_config(url), "0008")
            with engine_for(url).begin() as conn:
                for model, spec in specs.items():
                    _insert(conn, "models", name=model, dataset=json.dumps(spec), tasks="[]", created_at="2026-01-01")
                for id_, model, iid, task, rid in cells:
                    _insert(conn, "deletion_requests", id=rid, model_name=model, instance_id=iid, tasks='["depth"]',
                            status="completed", progress=1.0, created_at="2026-01-01", updated_at="2026-01-01")
                    _insert(conn, "tombstones", id=id_, dataset_key=old[model], instance_id=iid, task=task,
                            request_id=rid, created_at="2026-01-01")
                for model, watermark in (("a", 2), ("b", 5), ("c", 6)):
                    _insert(conn, "model_versions", model_name=model, version=1, sha256="x", artifact_uri="x",
                            deletions="[]", erased_cells="[]", tombstone_watermark=watermark, created_at="2026-01-01")
            assert upgrade_database(url) == head_revision()
            merged = {1: (new["a"], "i1", "depth", "ra1"), 2: (new["a"], "i2", "depth", "ra2"),
                      3: (new["a"], "i3", "depth", "rb1"), 5: (new["a"], "i2", "normal", "rb3"),
                      6: (new["c"], "i1", "depth", "rc1")}
            assert _tombstones(url) == merged, url
            assert _watermarks(url) == {"a": None, "b": None, "c": 6}, url
            assert upgrade_database(url) == head_revision()  # nothing more to do

            command.downgrade(alembic_config(url), "0008")
            assert _tombstones(url) == {1: (old["a"], "i1", "depth", "ra1"), 2: (old["a"], "i2", "depth", "ra2"),
                                        3: (old["b"], "i3", "depth", "rb1"), 5: (old["b"], "i2", "normal", "rb3"),
                                        6: (old["c"], "i1", "depth", "rc1")}, url
            assert _watermarks(url) == {"a": None, "b": None, "c": 6}, url  # cleared ones stay cleared
            command.upgrade(alembic_config(url), "0009")  # and up again
            assert _tombstones(url) == merged, url
    finally:
        drop_database(name)


def test_0009_moves_the_keys_of_one_model_alone_and_keeps_its_watermarks(tmp_path):
    """A model whose spec was not canonical and that shares its data with no other model:
    its tombstones change key, its watermarks stay (the same tombstones, the same ids);
    a downgrade takes back even those its requests do not name."""
    url = f"sqlite:///{tmp_path / 'record.db'}"
    command.upgrade(alembic_config(url), "0008")
    spec = {"name": "nyuv2", "root": "/data/./nyu/"}
    with engine_for(url).begin() as conn:
        _insert(conn, "models", name="n", dataset=json.dumps(spec), tasks="[]", created_at="2026-01-01")
        _insert(conn, "tombstones", id=7, dataset_key=_old_key(spec), instance_id="nyuv2-train-3", task="depth",
                request_id="gone", created_at="2026-01-01")
        _insert(conn, "model_versions", model_name="n", version=1, sha256="x", artifact_uri="x",
                deletions="[]", erased_cells="[]", tombstone_watermark=7, created_at="2026-01-01")
    upgrade_database(url)
    assert dataset_key(spec) == dataset_key({"name": "nyuv2", "root": "/data/nyu"})
    assert _tombstones(url) == {7: (dataset_key(spec), "nyuv2-train-3", "depth", "gone")}
    assert _watermarks(url) == {"n": 7}
    command.downgrade(alembic_config(url), "0008")
    assert _tombstones(url) == {7: (_old_key(spec), "nyuv2-train-3", "depth", "gone")}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_offline_0009_says_it_does_not_rekey(tmp_path, dialect):
    """`alembic upgrade --sql` cannot compute the keys (hashes of the models' specs, in
    Python): the script says so, and how to run the step online, instead of touching rows."""
    url = f"sqlite:///{tmp_path}/never.db" if dialect == "sqlite" else "postgresql+psycopg://nobody@127.0.0.1:1/never"
    for step, revisions in ((command.upgrade, "0008:0009"), (command.downgrade, "0009:0008")):
        script = offline_script(url, step, revisions)
        assert "-- 0009" in script and "NOT re-keyed" in script and "online" in script
        assert "tombstones" not in script.replace("Tombstones are NOT", "")
    assert not (tmp_path / "never.db").exists()


# --------------------------------------------------------------------------- the service


def test_an_erasure_through_one_model_is_erased_data_for_a_model_whose_spec_is_written_otherwise(tiny):
    """Model B is registered from a checkpoint whose manifest writes the same data without
    its seed and with the default noise written out (what another `unlearnd train` records).
    A's published erasure is B's too: B is announced, a request for the cell on B is the
    409 that names A's request, and B's next claim runs a propagate job."""
    s, store, ids = tiny
    with transaction(s.database_url) as session:
        spec_a = session.get(Model, TINY).dataset
    spec_b = {**{k: v for k, v in spec_a.items() if k != "seed"},
              "noise": {"depth_sigma": 0.02, "label_flip": 0.2}}
    assert spec_b != spec_a and dataset_key(spec_b) == dataset_key(spec_a)
    model, manifest = store.load(TINY, 1)
    store.put_version(model, model_name="tiny-mtl-other", version=1, parent=None, dataset=spec_b,
                      train_config=manifest.train_config, note="initial training")
    s_b = s.model_copy(update={"model_name": "tiny-mtl-other"})
    ensure_model(s_b, store, progress=False)
    with transaction(s.database_url) as session:
        assert session.get(Model, "tiny-mtl-other").dataset == spec_b  # stored as written

    rid = _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    with transaction(s.database_url) as session:
        announced = [m.payload for m in session.execute(select(OutboxMessage)).scalars()]
        assert [(t.dataset_key, t.request_id) for t in session.execute(select(Tombstone)).scalars()] == [
            (dataset_key(spec_a), rid)]
    assert {"model_name": "tiny-mtl-other"} in announced
    with transaction(s.database_url) as session, pytest.raises(Conflict) as refused:
        submit_deletion(session, s_b, instance_id=ids[0], tasks=["depth"])
    assert refused.value.extras["cells"] == [{"instance_id": ids[0], "task": "depth", "state": "erased",
                                              "request_id": rid, "propagating": True}]
    outcomes = jobs.drain_model(s_b, store, "tiny-mtl-other")
    assert [o.status for o in outcomes] == ["completed"]
    with transaction(s.database_url) as session:
        job = session.get(Job, outcomes[0].job_id)
        assert (job.kind, job.params["cells"]) == ("propagate", [[ids[0], "depth"]])
        serving = session.get(Alias, ("tiny-mtl-other", "serving")).version
        version = session.execute(select(ModelVersion).where(ModelVersion.model_name == "tiny-mtl-other",
                                                             ModelVersion.version == serving)).scalar_one()
        assert [ids[0], "depth"] in version.erased_cells


def test_specs_of_the_same_data_share_one_load():
    from worker.datasets import get_splits

    written = {"name": "indoor", "n_train": 6, "n_test": 4, "height": 8, "width": 8}
    full = {**written, "seed": 0, "noise": {}}
    assert dataset_key(written) == dataset_key(full)
    assert get_splits(written) is get_splits(full)  # one load, as one key
    assert get_splits({**written, "seed": 1}) is not get_splits(written)


@pytest.mark.parametrize("change", [{"n_train": 30}, {"n_test": 9}, {"image_height": 12}],
                         ids=["n_train", "n_test", "height"])
def test_a_model_on_another_split_of_a_models_data_is_refused_before_training(tiny, change):
    """Tombstones are kept per dataset key, and the key tells split sizes apart: a second model
    on more of A's scenes was trained on the instances erased through A (its key had no
    tombstones), and an erasure through either never reached the other."""
    from worker.bootstrap import SharedDataConflict
    from worker.datasets import dataset_spec

    s, store, ids = tiny
    _submit(s, ids[0])
    assert [o.status for o in jobs.drain_model(s, store, TINY)] == ["completed"]
    s_b = s.model_copy(update={"model_name": "tiny-mtl-more", "train_epochs": 1, **change})
    with transaction(s.database_url) as session:
        assert dataset_key(dataset_spec(s_b)) != dataset_key(session.get(Model, TINY).dataset)
    with pytest.raises(SharedDataConflict) as refused:
        ensure_model(s_b, store, progress=False)
    assert refused.value.extras["other_model"] == TINY
    assert f"the same dataset spec as {TINY!r}" in str(refused.value) and "nothing was trained" in str(refused.value)
    assert not store.exists("tiny-mtl-more", 1)
    with transaction(s.database_url) as session:
        assert session.get(Model, "tiny-mtl-more") is None

    # other scenes (another seed) are other people's data: trained and registered
    s_c = s.model_copy(update={"model_name": "tiny-mtl-seed1", "train_epochs": 1, "seed": 1, **change})
    assert ensure_model(s_c, store, progress=False) == 1


def test_a_stored_first_version_on_another_split_of_a_models_data_is_not_registered(tiny):
    """The same check for a version 1 found in the store (another `unlearnd train`, here with
    other noise): its manifest's spec is the one it would be registered with."""
    from worker.bootstrap import SharedDataConflict

    s, store, _ = tiny
    with transaction(s.database_url) as session:
        spec_a = session.get(Model, TINY).dataset
    spec_b = {**spec_a, "noise": "clean"}
    assert dataset_key(spec_b) != dataset_key(spec_a)
    model, manifest = store.load(TINY, 1)
    store.put_version(model, model_name="tiny-mtl-clean", version=1, parent=None, dataset=spec_b,
                      train_config=manifest.train_config, note="initial training")
    s_b = s.model_copy(update={"model_name": "tiny-mtl-clean"})
    with pytest.raises(SharedDataConflict, match="nothing was trained or registered"):
        ensure_model(s_b, store, progress=False)
    with transaction(s.database_url) as session:
        assert session.get(Model, "tiny-mtl-clean") is None
        assert not session.execute(select(ModelVersion).where(ModelVersion.model_name == "tiny-mtl-clean")).first()


def test_models_on_several_splits_registered_before_the_check_are_named(tmp_path):
    """Two models on two splits of one source (registered before the check): a third was
    refused with either spec, each time told to use the other model's."""
    from worker.bootstrap import SharedDataConflict, refuse_another_split_of

    url = f"sqlite:///{tmp_path}/record.db"
    upgrade_database(url)
    a = {"name": "indoor", "n_train": 12, "n_test": 8, "height": 16, "width": 16, "seed": 0}
    b = {**a, "n_train": 30}
    with transaction(url) as session:
        session.add_all([Model(name="a", dataset=a, tasks=["depth"]), Model(name="b", dataset=b, tasks=["depth"])])
    for spec in (a, b, {**a, "n_test": 4}):
        with transaction(url) as session, pytest.raises(SharedDataConflict) as refused:
            refuse_another_split_of(session, "c", spec)
        assert "Models on 2 splits of these instances were registered before this check ('a', 'b')" in str(refused.value)
        assert "same dataset spec as" not in str(refused.value)
    with transaction(url) as session:  # one model on another split: told to take its spec
        session.delete(session.get(Model, "b"))
    with transaction(url) as session, pytest.raises(SharedDataConflict, match="the same dataset spec as 'a'"):
        refuse_another_split_of(session, "c", b)
    with transaction(url) as session:
        refuse_another_split_of(session, "c", a)  # its very spec: erasures shared


def test_data_source_names_the_instances_whatever_the_split():
    from unlearning.data import data_source

    base = {"name": "indoor", "n_train": 6, "n_test": 4, "height": 8, "width": 8}
    same = [{**base, "n_train": 60}, {**base, "n_test": 1}, {**base, "height": 16}, {**base, "noise": "clean"},
            {"name": "indoor"}]
    assert all(data_source(spec) == data_source(base) == {"name": "indoor", "seed": 0} for spec in same)
    assert data_source({**base, "seed": 1}) != data_source(base)
    assert data_source({"name": "street"}) != data_source(base)
    nyu = data_source({"name": "nyuv2", "root": "/data/./nyu/", "limit": 3})
    assert nyu == data_source({"name": "nyuv2", "root": "/data/nyu", "num_classes": 40}) == {
        "name": "nyuv2", "root": "/data/nyu"}
    assert data_source({"name": "mnist", "x": 1}) == {"name": "mnist", "x": 1}
