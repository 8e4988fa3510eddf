"""Shadow calibration once per model lineage (opt-in: ``UNLEARND_CALIBRATE_SHADOWS``).

interference_aware takes each forgotten cell to where a model retrained without it
would put it among held-out data. Without calibration that is a fixed quantile of
the held-out losses, which over-forgets partial erasures at scale (a retrained
model still sees the image through its other tasks; benchmarks/README.md). With
calibration every training cell of the first version gets an out-of-fold score
from shadow models trained with the first version's recipe
(``interference_aware.shadow_scores``: ``(1 + T) x shadow_folds`` trainings, or
``(1 + T) x shadow_trained_folds`` when the method config sets it; the scores of the
folds left out are then predicted from their cells' loss ranks, see
``shadow_extrapolate``). That
is paid once per model, not per job: the scores are kept in the model store
(``calibration.json`` next to the versions) and passed to every later job of the
lineage; scores computed for other first-version weights than the store's (a model
re-created under the same name) are refused. Later versions' training sets are the
first one's minus erased cells, so the scores of the cells still there stay valid.

Erased data is not trained on again, not even by a shadow that is thrown away: the
shadows train on the first version's data minus every cell tombstoned in the dataset
when the calibration is computed (erased through this model or another one on the
dataset: a calibration first computed after erasures, by a later job, ``unlearnd
calibrate`` or a second model's first job) or named as erased in any stored version's
manifest, and those cells get no score (nor do cells erased while the shadows trained).
A record that is not migrated is refused, never read as one without erasures. A job that forgets an unscored cell (a
propagate or reapply job erasing an erased cell from a version that still holds it)
takes its task's mean score in that mode (``interference_aware.reference_quantiles``).

The stored calibration is keyed by the model and its first version's sha256 only, not
by the tombstones: it is not recomputed when erasures follow. Reusing it trains
nothing, its shadows were trained (and discarded) while the cells erased since were
still training data, and recomputing would cost every shadow again per erasure. The
scores of cells erased since stay in it until ``unlearnd purge`` takes them out
(:func:`without_cells`; a score is a number about a person's data), as the stored
weights that hold those cells stay until a purge deletes them; until then a job uses
such a score only to erase that same cell from a version that still holds it.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

from model_store import ModelStore

from .datasets import erased_cells, get_reference, get_splits, reference_scenes
from .db import read_only_transaction
from .settings import Settings
from .tables import Tombstone

log = logging.getLogger(__name__)

ROOT_VERSION = 1
# the fields of a stored calibration that jobs read, and their JSON kinds
CALIBRATION_FIELDS = (("sha256", str), ("recipe", dict), ("full", dict), ("partial", dict))


def calibrates(settings: Settings) -> bool:
    """Whether jobs under these settings read a shadow calibration: it is on, the method is
    interference_aware, and no fixed level per task (``tau`` in its configuration) overrides
    the levels the scores would set (the shadows were trained, and their scores never read)."""
    return (settings.calibrate_shadows and settings.method == "interference_aware"
            and not (settings.method_config or {}).get("tau"))


def calibration_share(settings: Settings, store: ModelStore, model_name: str, n_train: int, n_tasks: int) -> float:
    """The share of a job's optimiser steps that :func:`lineage_calibration` will take before
    it: 0 when calibration is off or stored, else the shadows' steps against the method's.
    The worker gives the calibration that part of the job's progress."""
    if (not calibrates(settings) or store.calibration(model_name)
            or not store.exists(model_name, ROOT_VERSION)):  # purged: nothing to calibrate (lineage_calibration)
        return 0.0
    from unlearning.methods.interference_aware import DEFAULTS, shadow_training_steps

    cfg = {**DEFAULTS, **settings.method_config}
    recipe = store.manifest(model_name, ROOT_VERSION).train_config
    if not recipe:
        return 0.0  # lineage_calibration refuses it, naming the missing recipe
    shadows = shadow_training_steps(n_train, n_tasks, recipe, cfg["shadow_folds"], cfg["shadow_trained_folds"])
    return shadows / (shadows + int(cfg["steps"]) + int(cfg["repair_steps"]))


def lineage_calibration(settings: Settings, store: ModelStore, model_name: str, device=None,
                        progress: Callable[[float], None] | None = None) -> dict | None:
    """The model's stored shadow scores, computed and stored first if missing; None when
    calibration is off or the method does not use it, or when none is stored and the first
    version's weights were purged (``unlearnd purge``: calibrate before purging). ``progress`` receives the fraction
    of the shadows' training done, after every step (the worker's stop check runs there,
    so a stopping worker does not train every shadow first)."""
    if not calibrates(settings):
        return None
    stored = store.calibration(model_name)
    if stored is not None:
        problem = stored_calibration_problem(settings, store, model_name, stored)
        if problem:
            raise ValueError(problem)
        return stored
    from model_store import PurgedVersion
    from unlearning.methods import UnlearnData
    from unlearning.methods.interference_aware import DEFAULTS, shadow_plan, shadow_scores

    from .versions import load_version

    try:  # weights missing but never purged in the record: an error, not "purged" (the fixed quantile for good)
        model, manifest = load_version(settings, store, model_name, ROOT_VERSION, device or "cpu")
    except PurgedVersion:
        log.warning("%s: no calibration is stored and v%d's weights, which it is computed from, were purged; "
                    "jobs take the fixed quantile", model_name, ROOT_VERSION)
        return None
    if not manifest.train_config:
        raise ValueError(f"{model_name} v{ROOT_VERSION} has no train_config in its manifest: "
                         "shadow calibration needs the recipe it was trained with")
    cfg = {**DEFAULTS, **settings.method_config}
    train, test = get_splits(manifest.dataset)
    # every erased cell of the dataset, not only v1's lineage's (none, usually): tombstones of
    # erasures made since, through this model or another one on the dataset, and the cells
    # the model's later versions name as erased
    excluded = excluded_cells(settings, store, model_name, manifest.dataset)
    train = train.without(sorted(excluded))
    # the held-out data the scores rank each cell among: the one the lineage's jobs read
    reference = get_reference(settings, manifest.dataset)
    data = UnlearnData(train, [train.cells()[0]], train, heldout=test if reference is None else reference,
                       device=next(model.parameters()).device)
    started = time.monotonic()
    # the folds shadow_scores runs: fewer than configured where there are fewer instances
    _, trained, _ = shadow_plan(len(train), cfg["shadow_folds"], cfg["shadow_trained_folds"],
                                 cfg["shadow_extrapolate"])
    log.info("calibrating %s: %d shadow models on v%d's recipe (once per model)", model_name,
             (1 + len(train.tasks)) * trained, ROOT_VERSION)
    scores = shadow_scores(model, data, manifest.train_config, cfg["shadow_folds"], cfg["shadow_seed"],
                           trained_folds=cfg["shadow_trained_folds"], extrapolate=cfg["shadow_extrapolate"],
                           progress=progress)
    payload = {
        "kind": "interference_aware.shadow_scores",
        # this file's own name for the audit log: a calibration removed and computed again is
        # another file, whose redactions are counted apart (worker.versions.redact_calibration)
        "calibration_id": uuid.uuid4().hex,
        "version": ROOT_VERSION,
        "sha256": manifest.sha256,
        "recipe": manifest.train_config,
        "folds": scores["folds"],
        "trained_folds": scores["trained_folds"],
        "measured_instances": scores["measured_instances"],
        "extrapolate": scores["extrapolate"],
        "extrapolated": scores["extrapolated"],
        "seed": int(cfg["shadow_seed"]),
        "shadows": scores["shadows"],
        "seconds": round(time.monotonic() - started, 3),
        "full": scores["full"],
        "partial": scores["partial"],
        "excluded_erased_cells": len(excluded),  # trained on by no shadow, scored by none
        "reference_scenes": 0 if reference is None else len(reference),  # 0: the test split
    }
    late = excluded_cells(settings, store, model_name, manifest.dataset) - excluded
    if late:  # erased while the shadows trained: no score is stored for them either
        payload, _ = without_cells(payload, late)
        payload.pop("redacted_cells", None)  # never stored, so not redacted (what a purge counts)
        payload["erased_during_calibration"] = len(late)  # the shadows trained on them; no score is kept
        log.info("calibrating %s: %d cell(s) erased while the shadows trained get no score", model_name, len(late))
    kept = store.put_calibration(model_name, payload)
    if kept.get("calibration_id") != payload["calibration_id"]:
        # another process (a job of another worker, `unlearnd calibrate`) stored one first, and
        # the first stands: used only if these settings could have computed it
        problem = stored_calibration_problem(settings, store, model_name, kept)
        if problem:
            raise ValueError(problem)
        log.info("calibrating %s: another process stored its calibration first; using that one", model_name)
    return kept


def stored_calibration_problem(settings: Settings, store: ModelStore, model_name: str,
                               stored: dict | None = None) -> str | None:
    """Why the jobs of ``model_name`` cannot use its stored calibration (None when they can, or
    none is stored): scores of other weights than the store's first version, or scored
    against another held-out reference than the settings give the jobs. Every calibrated job
    of the model fails on it (:func:`lineage_calibration`); ``unlearnd serve`` and ``unlearnd
    worker`` refuse to start on it (:func:`calibration_settings_problems`)."""
    stored = store.calibration(model_name) if stored is None else stored
    if stored is None:
        return None
    # what a job reads of it (method_config): a damaged or hand-edited file was a bare KeyError
    lacking = [key for key, kind in CALIBRATION_FIELDS if not isinstance(stored.get(key), kind)]
    if lacking:
        return (f"{model_name}'s stored calibration lacks {', '.join(lacking)} (or holds another kind of value "
                f"there): a damaged or hand-edited file; remove {model_name}/calibration.json from the store to "
                "calibrate again")
    root_manifest = store.manifest(model_name, ROOT_VERSION)
    root = root_manifest.sha256
    if stored.get("sha256") != root:
        return (f"{model_name}'s stored calibration was computed for v{ROOT_VERSION} with sha256 "
                f"{stored.get('sha256')}, but v{ROOT_VERSION} in the store has sha256 {root}: its scores "
                f"belong to other weights; remove {model_name}/calibration.json from the store to calibrate again")
    scenes = reference_scenes(settings, root_manifest.dataset)
    recorded = stored.get("reference_scenes", 0)  # 0: the test split (files from before the field too)
    if recorded != scenes:
        # the scores rank each cell among the reference's losses: another reference, other scores
        return (f"{model_name}'s stored calibration scored its cells against "
                f"{_reference_words(stored.get('reference_scenes', 0))}, but jobs now read "
                f"{_reference_words(scenes)} (UNLEARND_REFERENCE_SCENES); set it back, or remove "
                f"{model_name}/calibration.json from the store to calibrate again")
    return None


def calibration_settings_problems(settings: Settings, store: ModelStore) -> list[str]:
    """What is wrong with the served model's stored calibration under these settings (empty
    when nothing is, when calibration is off or the method takes none): checked when the
    service or a worker starts, since every deletion job of the model would fail on it."""
    if not calibrates(settings):
        return []
    from model_store import StoreError

    try:
        problem = stored_calibration_problem(settings, store, settings.model_name)
    except StoreError as exc:  # a calibration file that is a link or damaged, or a first version damaged or gone
        problem = (f"{settings.model_name}'s stored calibration cannot be used: {exc}; remove "
                   f"{settings.model_name}/calibration.json from the store to calibrate again")
    return [problem] if problem else []


def _reference_words(n) -> str:
    if n == 0:
        return "the test split"
    if type(n) is int and n > 0:
        return f"{n} held-out scenes of its own"
    return f"a reference it does not record readably ({n!r})"  # a hand-edited file


def excluded_cells(settings: Settings, store: ModelStore, model_name: str, spec: dict) -> set[tuple[str, str]]:
    """The cells of ``spec``'s dataset no shadow may train on: every cell tombstoned in the
    record (:func:`tombstoned_cells`) and every cell a stored version of ``model_name`` names
    as erased in its manifest (purged versions' too: the manifest stays), should the record
    lack one. A recorded version's manifest that cannot be read is an error
    (:class:`model_store.StoreError`), never a version without erasures; one the record does
    not have (an artifact a job stored and never published, one discarded meanwhile) is
    skipped with a warning: it held up every job of the model waiting for its calibration."""
    from model_store import StoreError
    from sqlalchemy import select

    from .tables import ModelVersion

    cells = tombstoned_cells(settings, spec)
    with read_only_transaction(settings.database_url) as session:
        recorded = set(session.execute(select(ModelVersion.version).where(
            ModelVersion.model_name == model_name)).scalars())
    for version in store.versions(model_name, clean=False):
        try:
            manifest = store.manifest(model_name, version)
        except StoreError as exc:
            if version in recorded:
                raise
            log.warning("calibration of %s: skipping v%d, an artifact the record does not have, whose manifest "
                        "cannot be read: %s", model_name, version, exc)
            continue
        cells |= {tuple(c) for c in manifest.erased_cells}
    return cells


def tombstoned_cells(settings: Settings, spec: dict) -> set[tuple[str, str]]:
    """Every tombstoned cell of ``spec``'s dataset in the record (``settings.database_url``).
    A record without the tombstones table (a database never migrated, or a mistyped URL
    that made an empty SQLite file) is an error, as an unreachable one is: an empty
    answer would let erased cells be trained on."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    with read_only_transaction(settings.database_url) as session:  # SQLite's write lock is not needed
        if not inspect(session.connection()).has_table(Tombstone.__tablename__):
            shown = make_url(settings.database_url).render_as_string(hide_password=True)
            raise RuntimeError(f"the database {shown} (UNLEARND_DATABASE_URL) has no {Tombstone.__tablename__} "
                               "table: it is not the service's migrated record (`unlearnd migrate`), and the "
                               "erased cells it would name cannot be left out")
        return set(erased_cells(session, spec))


def method_settings_problems(settings: Settings) -> list[str]:
    """What is wrong with ``UNLEARND_METHOD`` and ``UNLEARND_METHOD_CONFIG`` (empty when
    nothing is): checked when the service or a worker starts, since every job would
    otherwise fail on them."""
    from unlearning.methods import METHOD_NAMES
    from unlearning.methods.params import config_problems

    if settings.method not in METHOD_NAMES:
        return [f"UNLEARND_METHOD: unknown unlearning method {settings.method!r}; known methods: {METHOD_NAMES}"]
    problems = [f"UNLEARND_METHOD_CONFIG: {p}" for p in config_problems(settings.method, settings.method_config)]
    tau = (settings.method_config or {}).get("tau") if settings.method == "interference_aware" else None
    if not problems and isinstance(tau, dict):
        # a fixed level per task: a name that is no task at all (misspelt) is a level of nothing,
        # and every job would fail on it. Which tasks need one depends on each model's dataset
        # (a stored version 1 may be another dataset than the settings'): the job checks that.
        from unlearning.tasks import TASKS

        unknown = [t for t in tau if t not in TASKS]
        if unknown:
            problems.append(f"UNLEARND_METHOD_CONFIG: interference_aware's 'tau' names {unknown}, no task; "
                            f"tasks: {sorted(TASKS)}")
    return problems


def method_config(settings: Settings, calibration: dict | None) -> dict:
    """The configuration a job passes to the method: the settings' ``method_config`` and,
    when the lineage is calibrated, its recipe and scores."""
    config = dict(settings.method_config)
    if calibration is not None:
        config["shadow_recipe"] = calibration["recipe"]
        config["shadow_scores"] = {"full": calibration["full"], "partial": calibration["partial"]}
    return config


def without_cells(calibration: dict, cells: set[tuple[str, str]]) -> tuple[dict, int]:
    """``calibration`` without the scores of ``cells`` (instance, task) in either mode's table,
    an instance left with none taken out of the table and of ``measured_instances``; and
    how many scores were taken out."""
    out, removed = dict(calibration), 0
    gone: set[str] = set()
    for mode in ("full", "partial"):
        table = {}
        for instance, scores in (calibration.get(mode) or {}).items():
            kept = {t: v for t, v in scores.items() if (instance, t) not in cells}
            removed += len(scores) - len(kept)
            if kept:
                table[instance] = kept
            else:
                gone.add(instance)
        if mode in calibration:
            out[mode] = table
    still = {i for mode in ("full", "partial") for i in (out.get(mode) or {})}
    if isinstance(calibration.get("measured_instances"), list):
        out["measured_instances"] = [i for i in calibration["measured_instances"] if i in still or i not in gone]
    if removed:
        out["redacted_cells"] = int(calibration.get("redacted_cells", 0)) + removed
    return out, removed
