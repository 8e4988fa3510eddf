"""The local model store against damaged, hostile or concurrent state on disk: damaged
manifests, a check-then-discard race between two attempts of a job, purged versions,
weights that are not regular files, invalid architectures and version numbers, manifests
that must be strict JSON, and purging a link. No database, no training: a tiny untrained
MultiTaskNet in ``tmp_path``."""
from __future__ import annotations

import errno
import fcntl
import json
import re
import math
import os
import shutil
import threading
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from model_store import DamagedManifest, IntegrityError, LocalModelStore, PurgedVersion, StoreError, WrongArchitecture
from unlearning.model import ModelConfig, MultiTaskNet

MODEL = "m"


def _tiny(seed: int = 0) -> MultiTaskNet:
    torch.manual_seed(seed)
    return MultiTaskNet(ModelConfig(tasks={"depth": 1, "normal": 3}, width=4, depth=1, head_width=4))


def _put(store: LocalModelStore, model: MultiTaskNet, version: int = 1, **kw):
    return store.put_version(model, model_name=MODEL, version=version, parent=None if version == 1 else version - 1,
                             dataset={"name": "indoor"}, **kw)


@pytest.fixture
def stored(tmp_path):
    """A store holding v1 of MODEL; its version folder."""
    store = LocalModelStore(tmp_path / "store")
    _put(store, _tiny())
    return store, tmp_path / "store" / MODEL / "v1"


def _edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _damage_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)


# --------------------------------------------------------------------------- 1: damaged manifests


def _drop(field):
    def damage(path):
        doc = json.loads(path.read_text())
        del doc[field]
        path.write_text(json.dumps(doc))
    return damage


DAMAGED = {
    "truncated": lambda p: p.write_text(p.read_text()[:100]),
    "empty": lambda p: p.write_text(""),
    "a list": lambda p: p.write_text("[]"),
    "no sha256": _drop("sha256"),
    "no dataset": _drop("dataset"),
    "not utf-8": lambda p: p.write_bytes(b"\xff\xfe{}"),
    "nested too deep": lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
    "sha256 not a string": lambda p: p.write_text(p.read_text().replace('"sha256": "', '"sha256": 1, "x": "')),
    "model_config null": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "model_config": None})),
    # json.loads kept the last sha256, where another reader may keep the first
    "sha256 twice": lambda p: p.write_text(p.read_text().replace('"sha256": "', '"sha256": "' + "0" * 64 + '", "sha256": "')),
}


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_manifest_is_a_store_error_naming_it(stored, damage):
    store, folder = stored
    damage(folder / "manifest.json")
    with pytest.raises(DamagedManifest, match="manifest.json"):
        store.manifest(MODEL, 1)
    with pytest.raises(DamagedManifest, match="manifest.json"):
        store.load(MODEL, 1)
    assert store.verify(MODEL, 1) is False  # the weights do not match a manifest that cannot be read
    assert store.exists(MODEL, 1) and store.versions(MODEL) == [1]
    assert issubclass(DamagedManifest, StoreError)


def test_a_manifest_written_before_strict_json_still_reads(stored):
    """Older manifests carry NaN for a degenerate metric: they read as before."""
    store, folder = stored
    _edit_manifest(folder, metrics={"auc": math.nan})
    assert math.isnan(store.manifest(MODEL, 1).metrics["auc"]) and store.verify(MODEL, 1)


# --------------------------------------------------------------------------- 2: check-then-discard race, the lock


def test_a_good_copy_another_attempt_stored_is_not_discarded(tmp_path, monkeypatch):
    """Two attempts of a job find its stored copy damaged. The first checks, then pauses
    before discarding; the second must not replace the copy in between, or the first
    discards the good copy the second has just returned (and the record would publish a
    sha256 the store no longer holds)."""
    import model_store.local

    root = tmp_path / "store"
    store = LocalModelStore(root)
    _put(store, _tiny(0), job_id="j")
    _damage_weights(root / MODEL / "v1")
    checked, blocked, other_done = threading.Event(), threading.Event(), threading.Event()
    either = threading.Condition()
    real_flock = fcntl.flock

    def flock(fd, operation):
        # the second attempt reports finding the writers' lock held, then waits for it
        if threading.current_thread().name == "current" and operation == fcntl.LOCK_EX:
            try:
                return real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with either:
                    blocked.set()
                    either.notify_all()
        return real_flock(fd, operation)

    monkeypatch.setattr(model_store.local.fcntl, "flock", flock)

    class Pausing(LocalModelStore):
        def verify(self, model_name, version):
            ok = super().verify(model_name, version)
            if threading.current_thread().name == "stale":
                checked.set()
                # the other attempt runs now: until it blocks on the lock, or (the store
                # letting it in) until it has stored its copy
                with either:
                    either.wait_for(lambda: blocked.is_set() or other_done.is_set())
            return ok

    got = {}

    def stale():
        got["stale"] = _put(Pausing(root), _tiny(2), job_id="j").sha256

    def current():
        got["current"] = _put(store, _tiny(1), job_id="j").sha256
        with either:
            other_done.set()
            either.notify_all()

    first = threading.Thread(target=stale, name="stale")
    first.start()
    assert checked.wait(30)
    second = threading.Thread(target=current, name="current")
    second.start()
    first.join(60)
    second.join(60)
    assert not first.is_alive() and not second.is_alive()
    assert blocked.is_set(), "the second attempt never waited for the lock the first held"
    assert got["stale"] == got["current"] == store.manifest(MODEL, 1).sha256
    assert store.verify(MODEL, 1)


def test_writers_wait_for_the_lock_file_held_by_another_process(stored):
    """The lock is an flock on a file in the model's folder: another process (here another
    open file description) holding it keeps the store's writers out."""
    from model_store.local import LOCK_FILE

    store, folder = stored
    _damage_weights(folder)
    done = threading.Event()
    result = {}
    with open(folder.parent / LOCK_FILE, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (result.update(ok=store.discard_if_damaged(MODEL, 1)), done.set()))
        worker.start()
        assert not done.wait(0.5) and folder.exists()  # waits for the lock
    assert done.wait(30) and result["ok"] is True and not folder.exists()
    worker.join()


def test_the_lock_file_is_no_version_and_survives_the_stale_cleanup(stored):
    from model_store.local import LOCK_FILE

    store, folder = stored
    lock = folder.parent / LOCK_FILE
    assert lock.is_file()
    os.utime(lock, (0, 0))  # older than any stale-tmp threshold
    assert store.versions(MODEL) == [1] and store.remove_stale_tmp(MODEL, older_than_s=0) == []
    assert lock.is_file()


def _stale_tmp(model_dir, name: str = ".tmp-v7-dead"):
    """A temporary folder as a writer killed two hours ago left it."""
    import time

    tmp = model_dir / name
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    os.utime(tmp, (hours_ago, hours_ago))
    return tmp


def test_a_stale_temporary_folder_that_cannot_be_removed_is_logged_and_the_listing_goes_on(stored, monkeypatch,
                                                                                           caplog):
    """An OSError removing a dead writer's folder (here EACCES; a folder of another user, EBUSY on
    NFS) came out of versions(clean=True), so latest_version and every deletion job of the model
    failed, and the API's purge answered 500."""
    import errno
    import logging

    import model_store.local as local

    store, folder = stored
    tmp = _stale_tmp(folder.parent)

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path / "model.safetensors"))

    monkeypatch.setattr(local.shutil, "rmtree", refused)
    with caplog.at_level(logging.WARNING, logger="model_store.local"):
        assert store.versions(MODEL) == [1] and store.latest_version(MODEL) == 1
        assert store.remove_stale_tmp(MODEL) == []
    assert tmp.is_dir()
    said = [r.getMessage() for r in caplog.records if r.name == "model_store.local"]
    assert said and all(f"cannot remove {MODEL}/.tmp-v7-dead" in m and "Permission denied" in m for m in said), said
    assert not any(str(store.root) in m for m in said)  # named relative to the store
    monkeypatch.undo()
    assert store.versions(MODEL) == [1] and not tmp.exists()  # removable again: removed


def test_the_stale_cleanup_leaves_a_live_writers_folder_however_old_it_looks(tmp_path, monkeypatch):
    """A writer stalled past STALE_TMP_S (or a clock step) while another process listed the
    versions: the cleanup emptied its folder under it, and its rename left an empty v1 that no
    write could take again. Every writer holds the model's lock while its folder lives; the
    cleanup takes it without waiting, and cleans nothing while it is held."""
    import time

    import model_store.local as local
    from model_store.local import LOCK_FILE

    store = LocalModelStore(tmp_path / "store")
    seen = {}
    real_save = local.save_model

    def stalled(model, directory, *args, **kwargs):
        weights = real_save(model, directory, *args, **kwargs)
        hours_ago = time.time() - 2 * 3600
        os.utime(directory, (hours_ago, hours_ago))
        lister = threading.Thread(target=lambda: seen.update(listed=LocalModelStore(tmp_path / "store").versions(MODEL)))
        lister.start()
        lister.join(30)
        seen["left"] = sorted(p.name for p in directory.iterdir())
        return weights

    monkeypatch.setattr(local, "save_model", stalled)
    _put(store, _tiny(), job_id="j")
    monkeypatch.undo()
    assert seen == {"listed": [], "left": ["config.json", "model.safetensors"]}
    assert store.verify(MODEL, 1)

    tmp = _stale_tmp(tmp_path / "store" / MODEL)
    with open(tmp_path / "store" / MODEL / LOCK_FILE, "a") as held:  # another process's writer at work
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert store.versions(MODEL) == [1] and store.remove_stale_tmp(MODEL) == [] and tmp.is_dir()
    assert store.remove_stale_tmp(MODEL) == [".tmp-v7-dead"] and not tmp.exists()  # no writer: a dead one's


def test_discard_if_damaged_discards_only_a_damaged_version(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    for v in (1, 2, 3, 4):
        _put(store, _tiny(v), version=v)
    folder = tmp_path / "store" / MODEL
    assert store.discard_if_damaged(MODEL, 1) is False and store.verify(MODEL, 1)  # intact: kept
    _damage_weights(folder / "v2")
    assert store.discard_if_damaged(MODEL, 2) is True and not (folder / "v2").exists()
    (folder / "v3" / "manifest.json").write_text('{"model": "m')
    assert store.discard_if_damaged(MODEL, 3) is True and not (folder / "v3").exists()
    assert store.purge(MODEL, 4)
    assert store.discard_if_damaged(MODEL, 4) is False and store.purged(MODEL, 4)  # purged: its manifest stays
    assert store.discard_if_damaged(MODEL, 9) is False  # not stored
    assert LocalModelStore(tmp_path / "empty").discard_if_damaged(MODEL, 1) is False
    assert not (tmp_path / "empty").exists()  # nothing created for a model that is not stored
    assert store.versions(MODEL) == [1, 4]


# --------------------------------------------------------------------------- 3: purged versions are never rewritten


def test_putting_a_purged_version_again_is_refused_by_name(stored):
    store, folder = stored
    assert store.purge(MODEL, 1)
    with pytest.raises(PurgedVersion, match=r"m v1 was purged"):
        _put(store, _tiny())
    with pytest.raises(PurgedVersion):
        _put(store, _tiny(), job_id="j")
    assert store.purged(MODEL, 1) and sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_version_folder_without_a_version_is_not_overwritten(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    folder = tmp_path / "store" / MODEL / "v1"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("an operator's")
    with pytest.raises(StoreError, match=str(folder)) as caught:
        _put(store, _tiny())
    assert not isinstance(caught.value, OSError)
    assert (folder / "notes.txt").read_text() == "an operator's" and store.versions(MODEL) == []


# --------------------------------------------------------------------------- 4: weights and manifests that are not regular files


def test_weights_that_are_a_fifo_fail_verification_without_blocking(stored):
    store, folder = stored
    weights = folder / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    result = {}
    reader = threading.Thread(target=lambda: result.update(ok=store.verify(MODEL, 1)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the old store blocked reading it: unblock the reader, then fail
        os.close(os.open(weights, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("verify blocked on a FIFO")
    assert result["ok"] is False
    with pytest.raises(IntegrityError, match="FIFO"):
        store.load(MODEL, 1)


def test_weights_that_are_a_link_or_a_directory_are_not_a_version(stored, tmp_path):
    store, folder = stored
    weights = folder / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(weights, outside)
    weights.symlink_to(outside)  # the very bytes the manifest records, but outside the store
    assert store.verify(MODEL, 1) is False
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.load(MODEL, 1)
    weights.unlink()
    weights.mkdir()
    assert store.verify(MODEL, 1) is False
    with pytest.raises(IntegrityError, match=str(weights)):
        store.load(MODEL, 1)


def test_a_manifest_that_is_a_link_is_refused(stored, tmp_path):
    store, folder = stored
    manifest = folder / "manifest.json"
    outside = tmp_path / "manifest-copy.json"
    shutil.copy(manifest, outside)
    manifest.unlink()
    manifest.symlink_to(outside)
    with pytest.raises(DamagedManifest, match="symbolic link"):
        store.manifest(MODEL, 1)
    assert store.verify(MODEL, 1) is False


# --------------------------------------------------------------------------- 5: the architecture in the manifest


@pytest.mark.parametrize("change", [
    {"width": 0}, {"width": -4}, {"width": "4"}, {"tasks": ["depth", "normal"]}, {"bogus": 1}, {"tasks": {}},
], ids=["width 0", "width -4", "width str", "tasks list", "unknown key", "no tasks"])
def test_an_invalid_model_config_is_a_store_error_naming_the_manifest(stored, change):
    store, folder = stored
    config = json.loads((folder / "manifest.json").read_text())["model_config"]
    _edit_manifest(folder, model_config={**config, **change})
    with pytest.raises(DamagedManifest, match="manifest.json"):
        store.load(MODEL, 1)
    assert store.verify(MODEL, 1) is False


def test_weights_that_do_not_fit_the_manifests_architecture_are_an_integrity_error(stored):
    store, folder = stored
    config = json.loads((folder / "manifest.json").read_text())["model_config"]
    _edit_manifest(folder, model_config={**config, "tasks": {"depth": 1, "normal": 1}})
    with pytest.raises(IntegrityError, match="does not match the model configuration"):
        store.load(MODEL, 1)
    # and verify says so: it passed them (sha256 only), so a first start registered a version
    # every job failed to load, and discard_if_damaged kept it
    assert store.verify(MODEL, 1) is False
    # check_weights says which: the weights match the manifest's sha256, its model_config is what changed
    with pytest.raises(WrongArchitecture, match="does not match the model configuration"):
        store.check_weights(MODEL, 1)
    with pytest.raises(WrongArchitecture):
        store.load(MODEL, 1)
    assert store.discard_if_damaged(MODEL, 1) is True and store.versions(MODEL) == []


def test_weights_of_another_sha256_are_an_integrity_error_not_another_architecture(stored):
    store, folder = stored
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match="does not match the manifest's") as damaged:
        store.check_weights(MODEL, 1)
    assert not isinstance(damaged.value, WrongArchitecture) and store.verify(MODEL, 1) is False


# --------------------------------------------------------------------------- 6: version numbers


@pytest.mark.parametrize("version", [1.9, 1.0, True, "2", 2**31, 2**63, 10**5000, 0, -1, math.nan, None],
                         ids=lambda v: "huge" if isinstance(v, int) and v > 2**64 else repr(v))
def test_a_version_that_is_not_an_int_in_range_is_refused(tmp_path, version):
    store = LocalModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match="invalid version"):
        store.put_version(_tiny(), model_name=MODEL, version=version, parent=None, dataset={"name": "indoor"})
    for op in (store.exists, store.manifest, store.verify, store.load, store.purge, store.discard, store.uri,
               store.discard_if_damaged):
        with pytest.raises(StoreError, match="invalid version"):
            op(MODEL, version)
    assert not (tmp_path / "store" / MODEL).exists() or store.versions(MODEL) == []


def test_the_largest_version_is_accepted(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    _put(store, _tiny(), version=2**31 - 1)
    assert store.versions(MODEL) == [2**31 - 1] and store.verify(MODEL, 2**31 - 1)


def test_only_plain_version_folders_count(stored):
    store, folder = stored
    for name in ("v01", "v\u0663", "v99999999999", "v0", "v1x"):
        shutil.copytree(folder, folder.parent / name)
    assert store.versions(MODEL) == [1] and store.latest_version(MODEL) == 1


def test_a_manifest_of_another_version_or_model_is_damaged(stored):
    store, folder = stored
    shutil.copytree(folder, folder.parent / "v3")  # a copy in the wrong folder
    with pytest.raises(DamagedManifest, match="version 1.*version 3"):
        store.manifest(MODEL, 3)
    assert store.verify(MODEL, 3) is False
    _edit_manifest(folder, model="other")
    with pytest.raises(DamagedManifest, match="'other'"):
        store.manifest(MODEL, 1)


# --------------------------------------------------------------------------- 7: the manifest is strict JSON


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_the_manifest_is_strict_json(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    metrics = {"auc": math.nan, "gap": math.inf, "n": 3, "count": np.int64(7), "share": np.float32(0.5),
               "loss": torch.tensor(0.25), "per_task": {"depth": -math.inf, "normal": [1, math.nan]}}
    manifest = _put(store, _tiny(), metrics=metrics)
    on_disk = _strict((tmp_path / "store" / MODEL / "v1" / "manifest.json").read_text())["metrics"]
    expected = {"auc": None, "gap": None, "n": 3, "count": 7, "share": 0.5, "loss": 0.25,
                "per_task": {"depth": None, "normal": [1, None]}}
    assert on_disk == expected and manifest.metrics == expected and store.manifest(MODEL, 1).metrics == expected
    assert type(on_disk["n"]) is int and type(on_disk["count"]) is int


@pytest.mark.parametrize("value", [datetime.now(timezone.utc), object(), {1.5: 2}], ids=["datetime", "object",
                                                                                          "float key"])
def test_a_metric_that_is_not_json_is_refused_by_key(tmp_path, value):
    store = LocalModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match=r"metrics\['when'\]"):
        _put(store, _tiny(), metrics={"auc": 0.5, "when": value})
    assert store.versions(MODEL) == [] and not (tmp_path / "store" / MODEL / "v1").exists()


def test_metrics_that_cannot_be_stored_leave_a_damaged_copy_of_the_job_where_it_is(tmp_path):
    # the metrics were checked after the job's damaged stored copy had been discarded: the
    # write was refused and the copy gone, where a refused write should change nothing
    store = LocalModelStore(tmp_path / "store")
    _put(store, _tiny(), job_id="job-1")
    folder = tmp_path / "store" / MODEL / "v1"
    _damage_weights(folder)
    damaged = (folder / "model.safetensors").read_bytes()
    with pytest.raises(StoreError, match=r"metrics\['when'\]"):
        _put(store, _tiny(), job_id="job-1", metrics={"when": object()})
    assert (folder / "model.safetensors").read_bytes() == damaged and not store.verify(MODEL, 1)
    _put(store, _tiny(), job_id="job-1", metrics={"auc": 0.5})  # a good write still replaces it
    assert store.verify(MODEL, 1) and store.manifest(MODEL, 1).metrics == {"auc": 0.5}


def test_a_calibration_is_renamed_into_place_and_a_redaction_removes_dead_writes(tmp_path, monkeypatch):
    # put_calibration hard-linked its temporary file to calibration.json, then unlinked it: a
    # writer killed in between left a second name of the unredacted scores, which a purge's
    # redaction (replace_calibration writes a new file) did not reach
    store = LocalModelStore(tmp_path)
    linked = []
    monkeypatch.setattr(os, "link", lambda *a, **kw: linked.append(a) or pytest.fail("a calibration was hard-linked"))
    assert store.put_calibration(MODEL, {"full": {"a": {"depth": 0.25}}}) == {"full": {"a": {"depth": 0.25}}}
    assert store.put_calibration(MODEL, {"full": {}}) == {"full": {"a": {"depth": 0.25}}}  # the first one stands
    folder = tmp_path / MODEL
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "calibration.json"]
    dead = folder / ".tmp-calibration-0123abcd"  # what a writer killed before its rename leaves
    dead.write_text(json.dumps({"full": {"a": {"depth": 0.25}}}))
    other = folder / ".tmp-v2-0123abcd"  # another write's folder is not the redaction's
    other.mkdir()
    store.replace_calibration(MODEL, {"full": {}})
    assert store.calibration(MODEL) == {"full": {}} and not dead.exists() and other.is_dir()


# --------------------------------------------------------------------------- 8: purging a link


def test_purge_refuses_weights_that_are_a_link_and_leaves_its_target(stored, tmp_path):
    store, folder = stored
    weights = folder / "model.safetensors"
    target = tmp_path / "elsewhere.safetensors"
    os.replace(weights, target)
    weights.symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link") as caught:
        store.purge(MODEL, 1)
    assert str(weights) in str(caught.value) and str(target) in str(caught.value)
    assert target.is_file() and weights.is_symlink()  # nothing deleted: not claimed as purged
    assert not store.purged(MODEL, 1)


def test_discard_refuses_a_version_folder_that_is_a_link_and_leaves_its_target(stored, tmp_path):
    """A purge discards a damaged unpublished artifact whole: through a linked folder it removed
    the link only, and the target (which may hold erased data) stayed, recorded as purged."""
    store, folder = stored
    target = tmp_path / "other-disk" / "v1"
    target.parent.mkdir()
    os.replace(folder, target)
    folder.symlink_to(target)
    with pytest.raises(IntegrityError, match="symbolic link") as caught:
        store.discard(MODEL, 1)
    assert str(folder) in str(caught.value) and str(target) in str(caught.value)
    assert folder.is_symlink() and (target / "model.safetensors").is_file()  # nothing removed


def test_cells_that_are_not_instance_task_pairs_are_refused_on_writing_and_reading(tmp_path):
    # a leftover artifact with erased_cells [["indoor-00000"]] made every purge of its model
    # fail unpacking it, before anything was deleted
    store = LocalModelStore(tmp_path)
    for cells in ([["indoor-00000"]], [["a", "depth", "x"]], [["a", 3]]):
        with pytest.raises(StoreError, match="erased_cells must be \\[instance, task\\] pairs of strings"):
            _put(store, _tiny(), erased_cells=cells)
    assert not store.exists(MODEL, 1)
    _put(store, _tiny(), erased_cells=[("a", "depth")])
    path = tmp_path / MODEL / "v1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["erased_cells"] = [["indoor-00000"]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DamagedManifest, match="'erased_cells' must be a list of \\[instance, task\\] pairs of strings"):
        store.manifest(MODEL, 1)


def test_a_calibration_that_is_a_link_or_damaged_is_refused_naming_it(tmp_path):
    """A calibration.json that is a link was read through, and a purge's redaction replaced
    the link, leaving the scores in its target; a damaged one surfaced as a bare JSONDecodeError."""
    store = LocalModelStore(tmp_path / "store")
    store.put_calibration(MODEL, {"full": {}})
    final = tmp_path / "store" / MODEL / "calibration.json"
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"full": {"alice-7": {"depth": 0.9}}}))
    final.unlink()
    final.symlink_to(target)
    for attempt in (lambda: store.calibration(MODEL), lambda: store.put_calibration(MODEL, {"full": {}}),
                    lambda: store.replace_calibration(MODEL, {"full": {}})):
        with pytest.raises(StoreError, match=re.escape(f"{final} is a symbolic link to {target}, not a regular file")):
            attempt()
    assert final.is_symlink() and json.loads(target.read_text()) == {"full": {"alice-7": {"depth": 0.9}}}
    final.unlink()
    for damaged in ("{not json", "[1, 2]", "\xff", '{"full": {}, "full": {"alice-7": {"depth": 0.9}}}'):
        final.write_bytes(damaged.encode("latin-1"))
        with pytest.raises(StoreError, match=re.escape(f"{final} is damaged")):
            store.calibration(MODEL)
    final.unlink()
    assert store.calibration(MODEL) is None


def test_a_lock_file_that_is_a_link_is_a_store_error_naming_it(tmp_path):
    """The lock is opened without following links: a link there raised a bare OSError (ELOOP)."""
    store = LocalModelStore(tmp_path / "store")
    folder = tmp_path / "store" / MODEL
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match=re.escape(f"cannot take the writers' lock {folder / '.lock'}")):
        store.put_calibration(MODEL, {"full": {}})
    assert not (tmp_path / "elsewhere").exists()


def test_a_version_is_its_owners_only(stored):
    """The weights hold what they learnt of people's data and the manifest names the erased
    instances (it stays after a purge): 0600 in a 0700 folder, as calibration.json, whatever
    the umask."""
    import stat

    store, folder = stored
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
    assert store.verify(MODEL, 1)


@pytest.mark.parametrize("code, lasts", [(errno.EIO, False), (errno.ENOSPC, False),
                                         (errno.EINVAL, True), (errno.EBADF, True), (errno.ENOTSUP, True)])
def test_a_folder_that_cannot_be_synced_fails_the_write_unless_folders_cannot_be_synced_there(tmp_path, monkeypatch,
                                                                                             code, lasts):
    """Every OSError of a folder's fsync was swallowed: an EIO there (the rename or the deletion
    may not last) and put_version and purge said they were done. Only what a system or file
    system answers where folders cannot be synced at all (EINVAL on CIFS, EBADF on NetBSD) is."""
    import stat

    store = LocalModelStore(tmp_path / "store")
    _put(store, _tiny(), version=1)
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if lasts:
        _put(store, _tiny(2), version=2)
        assert store.purge(MODEL, 1)
        monkeypatch.undo()
        assert store.verify(MODEL, 2) and store.purged(MODEL, 1)
        return
    with pytest.raises(OSError, match=re.escape(f"{os.strerror(code)} (syncing the folder)")) as raised:
        _put(store, _tiny(2), version=2)
    assert raised.value.errno == code and ".tmp-v2-" in raised.value.filename
    with pytest.raises(OSError) as raised:
        store.purge(MODEL, 1)
    assert raised.value.errno == code and raised.value.filename == str(tmp_path / "store" / MODEL / "v1")
    monkeypatch.undo()
    assert store.versions(MODEL) == [1] and not store.exists(MODEL, 2)  # nothing stored, no folder left
    assert [p.name for p in (tmp_path / "store" / MODEL).iterdir() if p.name.startswith(".tmp-")] == []


def test_a_version_is_its_owners_only_while_it_is_written(tmp_path, monkeypatch):
    """The temporary folder was made with the umask's mode (0755) and the manifest, which names
    the erased instances, written 0644, then both chmodded: readable to every local user while
    written, and for good where the writer was killed before the chmods."""
    import stat

    store = LocalModelStore(tmp_path / "store")
    seen = {}
    real_chmod = os.chmod

    def chmod(path, mode, *args, **kwargs):
        if ".tmp-v1-" in str(path) and not seen:  # the first chmod: what was there before any
            folder = next((tmp_path / "store" / MODEL).glob(".tmp-v1-*"))
            seen.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()},
                        folder=stat.S_IMODE(folder.stat().st_mode))
        return real_chmod(path, mode, *args, **kwargs)

    old_umask = os.umask(0o022)
    try:
        monkeypatch.setattr(os, "chmod", chmod)
        _put(store, _tiny())
    finally:
        os.umask(old_umask)
    assert seen["folder"] == 0o700 and seen["manifest.json"] == 0o600, seen
    monkeypatch.undo()
    assert store.verify(MODEL, 1) and json.loads((tmp_path / "store" / MODEL / "v1" / "manifest.json").read_text())


def test_the_lock_file_is_its_owners_only(tmp_path):
    """flock takes a read-only descriptor: with .lock made 0644, any local user could open it,
    hold the lock and keep every writer of the model waiting. It is made 0600, and one an older
    store made 0644 is tightened by the next writer."""
    import stat

    from model_store.local import LOCK_FILE

    old_umask = os.umask(0o022)
    try:
        store = LocalModelStore(tmp_path / "store")
        _put(store, _tiny())
        lock = tmp_path / "store" / MODEL / LOCK_FILE
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        os.chmod(lock, 0o644)
        assert store.purge(MODEL, 1)
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_the_in_memory_weights_digest_is_the_written_files(tmp_path):
    # _state_sha serialises in memory (a copy in the system's temporary folder outlived a killed process)
    from model_store.local import _state_sha, sha256_bytes
    from unlearning.model import ModelConfig, MultiTaskNet, save_model

    model = MultiTaskNet(ModelConfig(tasks={"depth": 1, "segmentation": 3}, width=4, depth=1, head_width=4))
    assert _state_sha(model) == sha256_bytes(save_model(model, tmp_path).read_bytes())
