"""Shadow calibration once per model lineage: computed from the first version, kept in
the model store, passed to every job (the record it reads erasures from: a migrated
SQLite file)."""
from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch

from model_store import LocalModelStore
from unlearning.job import run_unlearning_job
from unlearning.train import TrainConfig, train_model
from worker.calibration import lineage_calibration, method_config
from worker.datasets import dataset_spec, get_splits
from worker.migrate import upgrade_database
from worker.settings import Settings


@pytest.fixture
def tiny(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # a file, migrated: an in-memory SQLite database is refused (worker.settings), and the
    # calibration reads the record's tombstones (an unmigrated one is refused)
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'record.db'}", store_dir=tmp_path / "models",
                        background=False, model_name="cal-mtl", dataset="indoor", n_train=12, n_test=8,
                        image_height=16, image_width=16, seed=0, method_config={"steps": 3, "shadow_folds": 2})
    upgrade_database(settings.database_url)
    store = LocalModelStore(settings.store_dir)
    spec = dataset_spec(settings)
    train, test = get_splits(spec)
    recipe = TrainConfig(epochs=2, batch_size=6, width=8, depth=2, head_width=8, seed=0)
    model = train_model(train, recipe, progress=False)
    store.put_version(model, model_name="cal-mtl", version=1, parent=None, dataset=spec, train_config=asdict(recipe))
    yield settings, store, model, train, test
    torch.set_num_threads(threads)


def test_off_by_default(tiny):
    settings, store, *_ = tiny
    assert lineage_calibration(settings.model_copy(update={"calibrate_shadows": False}), store, "cal-mtl") is None
    assert store.calibration("cal-mtl") is None


def test_computed_once_from_the_first_version_and_stored(tiny):
    settings, store, _, train, _ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    first = lineage_calibration(on, store, "cal-mtl")
    assert first["shadows"] == 2 * (1 + len(train.tasks)) and first["recipe"]["epochs"] == 2
    for mode in ("full", "partial"):
        assert {(i, t) for i, by in first[mode].items() for t in by} == set(train.cells())
    assert store.calibration("cal-mtl") == first
    import unlearning.methods.interference_aware as ia

    trained = ia.shadow_scores
    ia.shadow_scores = lambda *a, **k: pytest.fail("the shadows were trained again")
    try:
        assert lineage_calibration(on, store, "cal-mtl") == first  # read back, not computed again
    finally:
        ia.shadow_scores = trained


def test_a_calibration_of_some_folds_predicts_the_other_cells_and_stores_the_fits(tiny):
    """``shadow_trained_folds`` in the method config: 1 + T shadows instead of folds x (1 + T);
    the other cells' scores are predicted from their loss ranks and stored with the fits."""
    settings, store, model, train, test = tiny
    on = settings.model_copy(update={"calibrate_shadows": True,
                                     "method_config": {"steps": 3, "shadow_folds": 3, "shadow_trained_folds": 1}})
    stored = lineage_calibration(on, store, "cal-mtl")
    assert (stored["shadows"], stored["folds"], stored["trained_folds"]) == (1 + len(train.tasks), 3, 1)
    assert stored["extrapolate"] == "loss_rank"
    for mode in ("full", "partial"):
        assert {(i, t) for i, by in stored[mode].items() for t in by} == set(train.cells())
        assert {t: (f["fitted"], f["predicted"]) for t, f in stored["extrapolated"][mode].items()} == {
            t: (len(train) // 3, len(train) - len(train) // 3) for t in train.tasks}
    assert store.calibration("cal-mtl") == stored
    # a job on a cell of a fold no shadow left out is taken to its stored, predicted score
    assert len(stored["measured_instances"]) == len(train) // 3
    outside = next(i for i in train.instance_ids if i not in stored["measured_instances"])
    job = run_unlearning_job(model, train, test, [(outside, "depth")], config=method_config(on, stored))
    assert job.metrics["mia_auc_expected"] == pytest.approx(stored["partial"][outside]["depth"], abs=1e-6)


def test_a_calibration_of_some_folds_by_task_mean_leaves_the_rest_to_the_jobs(tiny):
    """With ``shadow_extrapolate: "task_mean"`` only the trained fold's cells are stored, and
    a request for a cell outside it is taken to its task's mean score."""
    settings, store, model, train, test = tiny
    on = settings.model_copy(update={"calibrate_shadows": True, "method_config": {
        "steps": 3, "shadow_folds": 3, "shadow_trained_folds": 1, "shadow_extrapolate": "task_mean"}})
    stored = lineage_calibration(on, store, "cal-mtl")
    assert (stored["trained_folds"], stored["extrapolate"], stored["extrapolated"]) == (1, "task_mean", {})
    assert len(stored["full"]) == len(train) // 3
    outside = next(i for i in train.instance_ids if i not in stored["partial"])
    job = run_unlearning_job(model, train, test, [(outside, "depth")], config=method_config(on, stored))
    depth = [by["depth"] for by in stored["partial"].values() if "depth" in by]
    assert job.metrics["mia_auc_expected"] == pytest.approx(sum(depth) / len(depth), abs=1e-6)


def test_jobs_use_the_stored_scores(tiny):
    """What is stored is what a job uses (a made-up table here, so a recomputation would show)."""
    settings, store, model, train, test = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    made_up = {"sha256": store.manifest("cal-mtl", 1).sha256, "recipe": {"epochs": 2},
               "full": {i: {t: 0.25 for t in train.tasks} for i in train.instance_ids},
               "partial": {i: {t: 0.75 for t in train.tasks} for i in train.instance_ids}}
    store.put_calibration("cal-mtl", made_up)
    calibration = lineage_calibration(on, store, "cal-mtl")
    assert calibration == made_up
    cells = [(train.instance_ids[0], t) for t in train.tasks]
    full = run_unlearning_job(model, train, test, cells, config=method_config(on, calibration))
    assert full.metrics["mia_auc_expected"] == 0.25
    assert full.log["tau_quantiles"]["depth"] == [0.75]
    part = run_unlearning_job(model, train, test, [(train.instance_ids[1], "depth")],
                              config=method_config(on, calibration))
    assert part.metrics["mia_auc_expected"] == 0.75
    # without calibration the job has no expectation to report
    plain = run_unlearning_job(model, train, test, cells, config=method_config(on, None))
    assert "mia_auc_expected" not in plain.metrics


def test_a_calibration_of_other_weights_is_refused(tiny):
    """A model re-created under the same name (a new v1) must not inherit the scores
    computed on the old one's weights."""
    settings, store, *_ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    stored = store.put_calibration("cal-mtl", {"sha256": "0" * 64, "recipe": {"epochs": 2}, "full": {}, "partial": {}})
    with pytest.raises(ValueError, match="calibration.json"):
        lineage_calibration(on, store, "cal-mtl")
    assert store.calibration("cal-mtl") == stored  # nothing stored is lost


def test_the_stored_calibration_is_written_once(tiny):
    _, store, *_ = tiny
    assert store.put_calibration("cal-mtl", {"a": 1}) == {"a": 1}
    assert store.put_calibration("cal-mtl", {"a": 2}) == {"a": 1}
    assert store.calibration("cal-mtl") == {"a": 1}


def test_cli_calibrates_the_served_model(tiny, monkeypatch, capsys):
    from app.cli import main
    from worker.settings import get_settings

    settings, store, *_ = tiny
    # the database too under tmp_path: the default wrote var/unlearnd.db into the working directory
    for key, value in {"STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "DEVICE": "cpu",
                       "DATABASE_URL": settings.database_url, "METHOD_CONFIG": '{"shadow_folds": 2}'}.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    get_settings.cache_clear()
    try:
        assert main(["calibrate", "--no-progress"]) == 0  # as serve, train, unlearn and bench take it
        assert store.calibration("cal-mtl")["shadows"] == 8
        assert re.fullmatch(r"[0-9a-f]{32}", store.calibration("cal-mtl")["calibration_id"])  # the audit's name of it
        out, err = capsys.readouterr()
        assert "8 shadow models" in out and "shadow models:" not in err  # no bar
        # the scores are numbers about people's data: private, as the weights
        assert (settings.store_dir / "cal-mtl" / "calibration.json").stat().st_mode & 0o777 == 0o600
        # v1's weights purged: the stored calibration stays in use, and calibrate says so (it said
        # "jobs take the fixed quantile" and exited 2)
        assert store.purge("cal-mtl", 1)
        assert main(["calibrate"]) == 0
        assert "already stored" in capsys.readouterr().out
        (settings.store_dir / "cal-mtl" / "calibration.json").unlink()
        assert main(["calibrate"]) == 2  # v1 is in no record here: the store's word
        assert "was purged" in capsys.readouterr().err
        monkeypatch.setenv("UNLEARND_MODEL_NAME", "no-such-model")
        get_settings.cache_clear()
        assert main(["calibrate"]) == 2
        assert "no version 1 of 'no-such-model'" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def test_cells_erased_in_a_later_versions_manifest_are_trained_on_by_no_shadow(tiny):
    """Erasures a later version's manifest names (the record may lack them: another
    database, say) are left out as the record's tombstones are: the calibration read only
    v1's manifest, and its shadows trained on them and stored their scores."""
    settings, store, model, train, _ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    erased = [[train.instance_ids[0], "depth"], [train.instance_ids[1], "segmentation"]]
    store.put_version(model, model_name="cal-mtl", version=2, parent=1, dataset=store.manifest("cal-mtl", 1).dataset,
                      deleted_cells=erased, erased_cells=erased)
    store.purge("cal-mtl", 2)  # a purged version's manifest stays, and names its erasures still
    stored = lineage_calibration(on, store, "cal-mtl")
    assert stored["excluded_erased_cells"] == 2
    for mode in ("full", "partial"):
        scored = {(i, t) for i, by in stored[mode].items() for t in by}
        assert scored == set(train.cells()) - {tuple(c) for c in erased}


def test_a_record_that_is_not_migrated_is_refused_not_read_as_no_erasures(tiny, tmp_path):
    """A mistyped or forgotten database URL is an empty SQLite file: no tombstones table.
    That was read as "nothing erased", and the shadows trained on erased cells."""
    settings, store, *_ = tiny
    empty = settings.model_copy(update={"calibrate_shadows": True,
                                        "database_url": f"sqlite:///{tmp_path / 'typo.db'}"})
    with pytest.raises(RuntimeError, match=r"has no tombstones table: it is not the service's migrated record"):
        lineage_calibration(empty, store, "cal-mtl")
    assert store.calibration("cal-mtl") is None


def test_cli_calibrate_refuses_a_database_that_is_missing_or_not_migrated(tiny, monkeypatch, capsys, tmp_path):
    """As `unlearnd purge` does: exit 2, one line, before anything is trained; a missing
    SQLite file is not created."""
    import sqlite3

    import unlearning.methods.interference_aware as ia
    from app.cli import main
    from worker.settings import get_settings

    settings, store, *_ = tiny
    monkeypatch.setattr(ia, "shadow_scores", lambda *a, **k: pytest.fail("a shadow trained"))
    for key, value in {"STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "DEVICE": "cpu",
                       "METHOD_CONFIG": '{"shadow_folds": 2}'}.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    missing = tmp_path / "mistyped.db"
    sqlite3.connect(tmp_path / "empty.db").close()  # a database that was never migrated
    try:
        for url, says in [(f"sqlite:///{missing}", f"unlearnd: no database at {missing} (UNLEARND_DATABASE_URL): "
                           "it records which cells were erased, and the shadows must not train on them"),
                          (f"sqlite:///{tmp_path / 'empty.db'}", "unlearnd: the database is at revision (none), "
                           "the code's schema is")]:
            monkeypatch.setenv("UNLEARND_DATABASE_URL", url)
            get_settings.cache_clear()
            assert main(["calibrate", "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(says) and len(err.strip().splitlines()) == 1, err
        assert not missing.exists() and store.calibration("cal-mtl") is None
    finally:
        get_settings.cache_clear()


def test_cli_calibrate_logs_the_shadow_models_it_trains(tiny, monkeypatch, caplog, capsys):
    """Fewer instances than folds: the method trains fewer folds than configured, and the
    log said the configured count (16 where 12 trained)."""
    from app.cli import main
    from worker.settings import get_settings

    settings, store, _, train, _ = tiny
    for key, value in {"STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "DEVICE": "cpu",
                       "DATABASE_URL": settings.database_url,
                       "METHOD_CONFIG": '{"shadow_folds": %d}' % (len(train) + 4)}.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    get_settings.cache_clear()
    try:
        with caplog.at_level("INFO", logger="worker.calibration"):
            assert main(["calibrate", "--no-progress"]) == 0
    finally:
        get_settings.cache_clear()
    shadows = store.calibration("cal-mtl")["shadows"]
    assert shadows == len(train) * (1 + len(train.tasks))
    assert f"calibrating cal-mtl: {shadows} shadow models" in caplog.text
    assert f"with {shadows} shadow models" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("env,says", [
    ({"METHOD_CONFIG": '{"steps": 0}'}, "UNLEARND_METHOD_CONFIG: interference_aware parameter 'steps' must be >= 1"),
    ({"METHOD_CONFIG": '{"stpes": 5}'}, "has no parameter 'stpes'"),
    ({"METHOD": "magic"}, "UNLEARND_METHOD: unknown unlearning method 'magic'"),
    # a fixed level per task: each job checked it, and failed (a misspelt task; which tasks need
    # a level depends on each model's dataset, so that stays the job's check)
    ({"METHOD_CONFIG": '{"tau": {"segmentation": 0.5, "depht": 0.5, "normal": 0.5}}'},
     "interference_aware's 'tau' names ['depht'], no task; tasks: ['depth', 'normal', 'segmentation']"),
])
def test_the_service_does_not_start_with_a_method_configuration_every_job_would_fail_on(
        monkeypatch, capsys, tmp_path, command, env, says):
    from app.cli import main
    from worker.settings import get_settings

    database = tmp_path / "never.db"
    monkeypatch.setenv("UNLEARND_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("UNLEARND_BROKER_URL", "redis://127.0.0.1:6379/15")
    for key, value in env.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    get_settings.cache_clear()

    def started(*args, **kwargs):
        pytest.fail(f"`unlearnd {command}` went on to start with a configuration it must refuse")

    # were the check to regress, fail at once rather than run a server or a worker
    import uvicorn

    import worker.bootstrap
    import worker.migrate
    from worker.celery_app import app

    monkeypatch.setattr(app, "worker_main", started)
    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(worker.migrate, "upgrade_database", started)
    monkeypatch.setattr(worker.bootstrap, "ensure_model", started)
    try:
        assert main([command]) == 2
        assert says in capsys.readouterr().err
        assert not database.exists()  # refused before migrating or training anything
    finally:
        get_settings.cache_clear()


def test_the_calibration_reports_progress_and_a_stop_ends_it_storing_nothing(tiny):
    """The shadows' training reports its fraction done after every step (the worker's stop
    check runs there): it rises to 1, and an exception raised from it (the worker's
    JobStopped) ends the calibration without storing a partial table."""
    settings, store, _, train, _ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    from worker.calibration import calibration_share

    share = calibration_share(on, store, "cal-mtl", len(train), len(train.tasks))
    # 2 folds x (1 + 3 tasks) shadows x 2 epochs x 2 batches of 6, against 3 steps and the repair steps
    from unlearning.methods.interference_aware import DEFAULTS
    assert share == 32 / (32 + 3 + DEFAULTS["repair_steps"])

    class Stop(Exception):
        pass

    def stop_halfway(fraction: float) -> None:
        if fraction >= 0.5:
            raise Stop

    with pytest.raises(Stop):
        lineage_calibration(on, store, "cal-mtl", progress=stop_halfway)
    assert store.calibration("cal-mtl") is None
    seen: list[float] = []
    lineage_calibration(on, store, "cal-mtl", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 16
    assert calibration_share(on, store, "cal-mtl", len(train), len(train.tasks)) == 0.0  # stored: nothing to train
    assert calibration_share(settings, store, "cal-mtl", len(train), len(train.tasks)) == 0.0  # off


def test_without_the_first_versions_weights_jobs_go_on_uncalibrated(tiny):
    """`unlearnd purge` deletes v1's weights once they hold erased data: a calibration stored
    before stays in use; without one, jobs take the fixed quantile instead of failing."""
    from worker.calibration import calibration_share

    settings, store, _, train, _ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    store.purge("cal-mtl", 1)
    assert calibration_share(on, store, "cal-mtl", len(train), len(train.tasks)) == 0.0
    assert lineage_calibration(on, store, "cal-mtl") is None and store.calibration("cal-mtl") is None


def test_a_calibration_against_held_out_scenes_of_its_own_is_kept_for_that_reference(tiny):
    """With ``UNLEARND_REFERENCE_SCENES`` the shadows' scores rank each cell among rendered
    scenes beyond the test split, the ones the lineage's jobs read; a calibration scored
    against another reference is refused, naming both, and stays stored."""
    settings, store, *_ = tiny
    own = settings.model_copy(update={"calibrate_shadows": True, "reference_scenes": 4})
    stored = lineage_calibration(own, store, "cal-mtl")
    assert stored["reference_scenes"] == 4 and lineage_calibration(own, store, "cal-mtl") == stored
    test_split = own.model_copy(update={"reference_scenes": 0})
    with pytest.raises(ValueError, match="scored its cells against 4 held-out scenes of its own, but jobs now "
                                         "read the test split .*remove cal-mtl/calibration.json"):
        lineage_calibration(test_split, store, "cal-mtl")
    assert store.calibration("cal-mtl") == stored
    (store.root / "cal-mtl" / "calibration.json").unlink()
    again = lineage_calibration(test_split, store, "cal-mtl")
    assert again["reference_scenes"] == 0
    # the same shadows (same recipe and seed), ranked among other held-out losses
    assert again["full"] != stored["full"]
    with pytest.raises(ValueError, match="scored its cells against the test split, but jobs now read 4 held-out"):
        lineage_calibration(own, store, "cal-mtl")


def test_a_dataset_without_scenes_to_render_keeps_the_test_split_as_reference(tiny, caplog):
    from worker.datasets import get_reference, reference_scenes

    settings, *_ = tiny
    own = settings.model_copy(update={"reference_scenes": 4})
    assert reference_scenes(settings, {"name": "indoor"}) == 0 and get_reference(settings, dataset_spec(settings)) is None
    assert reference_scenes(own, dataset_spec(settings)) == 4
    assert get_reference(own, dataset_spec(settings)).instance_ids == [f"indoor-test-{i:05d}" for i in range(8, 12)]
    with caplog.at_level("WARNING", logger="worker.datasets"):
        assert reference_scenes(own, {"name": "nyuv2", "root": "/data/nyuv2"}) == 0
    assert "'nyuv2' dataset is not synthetic" in caplog.text and "test split" in caplog.text


def test_the_service_does_not_start_when_the_stored_calibration_is_for_another_reference(
        tiny, monkeypatch, capsys, tmp_path):
    """A stored calibration that every calibrated deletion job of the served model would refuse
    (scored against another held-out reference than UNLEARND_REFERENCE_SCENES gives): `serve`
    and `worker` say so at start, not in a failed deletion."""
    import uvicorn

    import app.cli
    import worker.migrate
    from app.cli import main
    from worker.settings import get_settings

    settings, store, *_ = tiny
    lineage_calibration(settings.model_copy(update={"calibrate_shadows": True, "reference_scenes": 4}),
                        store, "cal-mtl")

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(worker.migrate, "upgrade_database", started)
    monkeypatch.setattr(app.cli, "run_celery", started)
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'never.db'}", "BROKER_URL": "redis://127.0.0.1:6379/15",
           "STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "CALIBRATE_SHADOWS": "true",
           "METHOD_CONFIG": '{"steps": 3, "shadow_folds": 2}'}
    for key, value in env.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    try:
        for scenes in ("0", "8"):
            monkeypatch.setenv("UNLEARND_REFERENCE_SCENES", scenes)
            for command in ("serve", "worker"):
                get_settings.cache_clear()
                assert main([command]) == 2
                err = capsys.readouterr().err
                assert "stored calibration scored its cells against 4 held-out scenes of its own" in err, err
        # the reference it was scored against: the commands go on
        monkeypatch.setenv("UNLEARND_REFERENCE_SCENES", "4")
        for command in ("serve", "worker"):
            get_settings.cache_clear()
            with pytest.raises(Started):
                main([command])
    finally:
        get_settings.cache_clear()


def test_a_stored_calibration_recording_no_readable_reference_is_refused_naming_it(tiny):
    settings, store, *_ = tiny
    root = store.manifest("cal-mtl", 1).sha256
    store.put_calibration("cal-mtl", {"sha256": root, "recipe": {}, "full": {}, "partial": {}, "reference_scenes": None})
    on = settings.model_copy(update={"calibrate_shadows": True})
    with pytest.raises(ValueError, match=r"against a reference it does not record readably \(None\), but jobs now "
                                         r"read the test split"):
        lineage_calibration(on, store, "cal-mtl")


def test_an_unreadable_manifest_of_an_unrecorded_artifact_does_not_hold_up_the_calibration(tiny, caplog):
    """Every stored version's manifest is read for its erasures: a damaged one of an artifact
    the record does not have (a job's, never published) failed the calibration, and with it
    every job of the model waiting for it. It is skipped with a warning; a recorded one is
    an error still."""
    import logging

    settings, store, model, train, _ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    store.put_version(model, model_name="cal-mtl", version=2, parent=1, dataset=store.manifest("cal-mtl", 1).dataset)
    (settings.store_dir / "cal-mtl" / "v2" / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="worker.calibration"):
        stored = lineage_calibration(on, store, "cal-mtl")
    assert stored["excluded_erased_cells"] == 0
    assert any("skipping v2, an artifact the record does not have" in r.getMessage() for r in caplog.records)


def test_a_first_version_whose_weights_went_missing_is_an_error_not_taken_as_purged(tiny):
    """The store reads a manifest without weights as purged: a calibration then logged "were
    purged" and every job went on with the fixed quantile for good. The record says whether
    they were: weights it never purged are missing, said so."""
    from model_store import StoreError
    from worker.bootstrap import ensure_model

    settings, store, *_ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    ensure_model(on, store, progress=False)  # the record has the stored version 1
    (store.root / "cal-mtl" / "v1" / "model.safetensors").unlink()  # deleted by hand, never purged
    with pytest.raises(StoreError, match="its weights are missing from the model store"):
        lineage_calibration(on, store, "cal-mtl")
    assert store.calibration("cal-mtl") is None


@pytest.mark.parametrize("lacking", ["recipe", "full", "partial"])
def test_a_stored_calibration_lacking_what_jobs_read_is_refused_naming_it(tiny, lacking):
    """A damaged or hand-edited calibration.json failed every job with a bare KeyError."""
    from worker.calibration import calibration_settings_problems

    settings, store, *_ = tiny
    root = store.manifest("cal-mtl", 1).sha256
    fields = {"sha256": root, "recipe": {"epochs": 2}, "full": {}, "partial": {}}
    stored = store.put_calibration("cal-mtl", {k: v for k, v in fields.items() if k != lacking})
    on = settings.model_copy(update={"calibrate_shadows": True})
    with pytest.raises(ValueError, match=rf"cal-mtl's stored calibration lacks {lacking} .*calibration.json"):
        lineage_calibration(on, store, "cal-mtl")
    [problem] = calibration_settings_problems(on.model_copy(update={"model_name": "cal-mtl"}), store)
    assert f"lacks {lacking}" in problem
    assert store.calibration("cal-mtl") == stored  # nothing stored is lost


def test_a_calibration_another_process_stored_first_is_used_only_if_these_settings_could_use_it(tiny, monkeypatch):
    """The first calibration stored stands: one a concurrent `unlearnd calibrate` stored
    against another held-out reference was used by the job that computed its own meanwhile
    (and refused by every later one)."""
    settings, store, *_ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True})
    real = store.put_calibration
    root = store.manifest("cal-mtl", 1).sha256
    other = {"calibration_id": "other", "sha256": root, "recipe": {"epochs": 2}, "full": {}, "partial": {},
             "reference_scenes": 40}

    def raced(name, payload):
        real(name, other)  # stored by another process while these shadows trained
        return real(name, payload)

    monkeypatch.setattr(store, "put_calibration", raced)
    with pytest.raises(ValueError, match="against 40 held-out scenes of its own, but jobs now read the test split"):
        lineage_calibration(on, store, "cal-mtl")
    assert store.calibration("cal-mtl") == other  # the first stands, untouched

    (store.root / "cal-mtl" / "calibration.json").unlink()
    other["reference_scenes"] = 0  # one these settings could have computed: used
    assert lineage_calibration(on, store, "cal-mtl") == other


def test_fixed_levels_take_no_calibration(tiny, monkeypatch, capsys):
    """With ``tau`` in the method configuration the levels are fixed and the scores never read:
    a first job still trained (1 + T) x folds shadows (its time limit counting them under
    Celery), and `unlearnd calibrate` stored scores no job reads."""
    from app.cli import main
    from worker.calibration import calibration_share
    from worker.settings import get_settings

    settings, store, _, train, _ = tiny
    fixed = settings.model_copy(update={"calibrate_shadows": True, "method_config": {
        "steps": 3, "shadow_folds": 2, "tau": {t: 0.1 for t in train.tasks}}})
    assert calibration_share(fixed, store, "cal-mtl", len(train), len(train.tasks)) == 0.0
    assert lineage_calibration(fixed, store, "cal-mtl") is None and store.calibration("cal-mtl") is None
    for key, value in {"STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "DEVICE": "cpu",
                       "DATABASE_URL": settings.database_url,
                       "METHOD_CONFIG": '{"tau": {"depth": 0.1, "normal": 0.1, "segmentation": 0.1}}'}.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    get_settings.cache_clear()
    try:
        assert main(["calibrate", "--no-progress"]) == 2
        assert "fixed level per task ('tau'): jobs read no calibration" in capsys.readouterr().err
        assert store.calibration("cal-mtl") is None
    finally:
        get_settings.cache_clear()


def test_a_calibration_left_without_its_first_version_is_named_with_what_to_do(tiny):
    """v1 removed to re-create the model, calibration.json left behind: serve refused to start
    saying only "no version 1 of model ... in ...", not how to go on."""
    import shutil

    from worker.calibration import calibration_settings_problems

    settings, store, *_ = tiny
    on = settings.model_copy(update={"calibrate_shadows": True, "model_name": "cal-mtl"})
    store.put_calibration("cal-mtl", {"sha256": "0" * 64, "recipe": {}, "full": {}, "partial": {}})
    shutil.rmtree(store.root / "cal-mtl" / "v1")
    [problem] = calibration_settings_problems(on, store)
    assert problem.startswith("cal-mtl's stored calibration cannot be used: ")
    assert problem.endswith("remove cal-mtl/calibration.json from the store to calibrate again")


def test_cli_calibrate_tells_weights_purged_from_weights_gone_missing(tiny, monkeypatch, capsys):
    """The store reads a manifest without weights as purged; the record tells: weights it never
    purged are missing (restore them), where calibrate said "purged ... jobs take the fixed
    quantile" while every job failed on them."""
    from app.cli import main
    from worker.bootstrap import ensure_model
    from worker.db import transaction
    from worker.settings import get_settings
    from worker.tables import ModelVersion, utcnow

    settings, store, *_ = tiny
    ensure_model(settings.model_copy(update={"model_name": "cal-mtl"}), store, progress=False)
    (settings.store_dir / "cal-mtl" / "v1" / "model.safetensors").unlink()  # deleted by hand
    for key, value in {"STORE_DIR": str(settings.store_dir), "MODEL_NAME": "cal-mtl", "DEVICE": "cpu",
                       "DATABASE_URL": settings.database_url}.items():
        monkeypatch.setenv(f"UNLEARND_{key}", value)
    get_settings.cache_clear()
    try:
        assert main(["calibrate", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "its weights are missing from the model store" in err and "was purged" not in err
        with transaction(settings.database_url) as session:
            session.query(ModelVersion).filter_by(model_name="cal-mtl", version=1).one().purged_at = utcnow()
        assert main(["calibrate", "--no-progress"]) == 2
        assert "version 1 of 'cal-mtl' was purged" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
