"""The first version of the served model: trained once, stored as version 1, registered.

``ensure_model`` is idempotent: a model that is already registered is left as
it is; a version 1 already in the store (an earlier start that died before
registering it) is registered rather than trained again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_store import ModelStore
from unlearning.data import canonical_json, data_source, dataset_key

from .audit import append_event
from .datasets import dataset_spec, erased_cells, get_splits
from .db import transaction
from .errors import Conflict
from .requests import finite_json
from .settings import Settings
from .tables import Alias, AliasHistory, Model, ModelVersion

log = logging.getLogger(__name__)


class SharedDataConflict(Conflict):
    """A new model's dataset holds another model's instances under another dataset key."""


def refuse_another_split_of(session: Session, name: str, spec: dict) -> None:
    """:class:`SharedDataConflict` when a registered model other than ``name`` was trained on
    the instances of ``spec`` (:func:`unlearning.data.data_source`) under another spec
    (other sizes, noise or ``limit``): tombstones are kept per :func:`dataset_key`, so an
    erasure through either would not reach the other, and ``name`` would be trained on the
    cells erased through it."""
    source, key = data_source(spec), dataset_key(spec)
    rows = session.execute(select(Model.name, Model.dataset).where(Model.name != name).order_by(Model.name)).all()
    same = [(other, other_spec) for other, other_spec in rows
            if isinstance(other_spec, dict) and data_source(other_spec) == source]
    elsewhere = [(other, other_spec) for other, other_spec in same if dataset_key(other_spec) != key]
    if not elsewhere:
        return
    other, other_spec = elsewhere[0]
    specs = {dataset_key(o_spec) for _, o_spec in same}
    # models on several splits of these instances, registered before this check: no spec is safe
    advice = (f"Give {name!r} the same dataset spec as {other!r}" if len(specs) == 1
              else f"Models on {len(specs)} splits of these instances were registered before this check "
                   f"({', '.join(repr(o) for o, _ in same)}), whose erasures do not reach each other: no new model "
                   "is trained on these instances until they are retired or retrained on one spec")
    raise SharedDataConflict(
        f"model {name!r} would be trained on {canonical_json(spec)}, the instances of model {other!r}'s "
        f"dataset {canonical_json(other_spec)} taken or rendered otherwise: erasures are kept per dataset "
        f"spec, so one made through either model would not reach the other, and {name!r} would be trained "
        f"on the data erased through {other!r}. {advice}; nothing was trained or registered",
        model=name, dataset=spec, other_model=other, other_dataset=other_spec)


class FirstModelTooLarge(ValueError):
    """The first version the settings describe cannot be trained in this machine's memory
    (:func:`first_model_memory_problem`)."""


class FirstModelDiverged(ValueError):
    """Training the first version left non-finite weights (:func:`unlearning.train.check_trained`):
    nothing is stored or registered."""


def first_model_memory_problem(settings: Settings, device=None) -> str | None:
    """What is wrong when training the first version the settings describe cannot fit this
    machine's memory, naming the settings to change; ``None`` when it fits. The check
    ``unlearnd train`` makes (lower bounds, :mod:`unlearning.resources`): huge
    ``UNLEARND_IMAGE_HEIGHT``, ``UNLEARND_N_TRAIN`` or ``UNLEARND_MODEL_WIDTH`` failed with a
    torch allocation traceback (or the process was killed) after the database was migrated.
    ``device``: the device it trains on, resolved; ``None`` when not known (counted as
    :func:`~unlearning.resources.training_shortfall` says)."""
    from unlearning.resources import data_needs, model_lower_bound, training_shortfall
    from unlearning.train import TrainConfig

    spec = dataset_spec(settings)
    # ensure_model's recipe: the settings set the widths only
    model = model_lower_bound(spec, settings.model_width, TrainConfig().depth, settings.model_width)
    problem = training_shortfall(data_needs(spec), model, device)
    if problem is None:
        return None
    return (f"training the first version of {settings.model_name!r} {problem}; use smaller images "
            "(UNLEARND_IMAGE_HEIGHT, UNLEARND_IMAGE_WIDTH), fewer scenes (UNLEARND_N_TRAIN, UNLEARND_N_TEST) or a "
            "smaller model (UNLEARND_MODEL_WIDTH)")


def check_store_serves(settings: Settings, store: ModelStore, session: Session, version: int) -> None:
    """:class:`~model_store.StoreError` unless ``store`` holds the serving ``version`` of
    ``settings.model_name`` that the record names (its manifest, with the record's sha256, and
    its weights; or only the manifest where the record has it purged): with a wrong or empty
    ``UNLEARND_STORE_DIR`` the service started, ``/readyz`` said ready, and every deletion
    failed. Its weights are not hashed here: every job checks them before it starts."""
    from model_store import StoreError

    name = settings.model_name
    row = session.execute(select(ModelVersion).where(ModelVersion.model_name == name,
                                                     ModelVersion.version == version)).scalar_one_or_none()
    where = f"UNLEARND_STORE_DIR {settings.store_dir}"
    advice = ("is UNLEARND_STORE_DIR the service's? " + (f"The record has it at {row.artifact_uri}; " if row else "")
              + "nothing was started")
    try:
        manifest = store.manifest(name, version)
    except StoreError as exc:  # none, or damaged (DamagedManifest names the file)
        missing = not store.exists(name, version) and not store.purged(name, version)
        raise StoreError(f"{where} does not hold version {version} of {name!r}, which the database serves"
                         + ("" if missing else f" ({exc})") + f": {advice}") from None
    if row is not None and manifest.sha256 != row.sha256:
        raise StoreError(f"{where} holds another version {version} of {name!r} than the one the database serves "
                         f"(sha256 {manifest.sha256[:12]}…, the record's is {row.sha256[:12]}…): {advice}")
    if store.exists(name, version):
        return
    if row is not None and row.purged_at is not None:  # as recorded: a rollback to a stored version is the way out
        log.warning("the serving version %s of %s was purged (its weights held erased data): its deletion jobs "
                    "fail until a rollback to a stored version", version, name)
        return
    raise StoreError(f"{where} holds the manifest of version {version} of {name!r}, which the database serves, but "
                     f"not its weights, and the record does not have them purged: {advice}")


def ensure_model(settings: Settings, store: ModelStore, progress: bool = True) -> int:
    """Make sure ``settings.model_name`` is registered with a serving version; returns that version.

    Trains a model on the dataset the settings describe (minus any cell already
    tombstoned for that dataset) when neither the record nor the store has one.
    :class:`SharedDataConflict` when another model holds that dataset's instances under
    another spec (:func:`refuse_another_split_of`); :class:`FirstModelDiverged` when that
    training leaves non-finite weights.
    """
    name = settings.model_name
    with transaction(settings.database_url) as session:
        if session.get(Model, name) is not None:
            alias = session.get(Alias, (name, "serving"))
            version = alias.version if alias else 1
            check_store_serves(settings, store, session, version)
            return version
        spec = dataset_spec(settings)
        if not store.exists(name, 1):  # a stored version 1 brings its own spec: checked at registration
            refuse_another_split_of(session, name, spec)

    if store.purged(name, 1):
        from model_store import PurgedVersion

        raise PurgedVersion(
            f"the model store holds version 1 of {name!r} with its weights purged (they held erased data), but the "
            f"database has no model {name!r}: restore the database that goes with this store, or point "
            "UNLEARND_STORE_DIR or UNLEARND_MODEL_NAME elsewhere; nothing was trained")
    if store.exists(name, 1):
        manifest = store.manifest(name, 1)  # DamagedManifest when it cannot be read
        if not store.verify(name, 1):  # registered, it would serve, and every job on it would fail
            from model_store import IntegrityError as DamagedWeights  # not sqlalchemy's, caught below

            raise DamagedWeights(
                f"the model store holds version 1 of {name!r}, but its weights do not match the sha256 or the "
                f"architecture in its manifest (damaged or altered): restore that version, or point UNLEARND_STORE_DIR or "
                f"UNLEARND_MODEL_NAME elsewhere to train a new model; nothing was registered")
        spec = manifest.dataset
        train, _ = get_splits(spec)
        log.info("registering the stored version 1 of %s", name)
    else:
        from unlearning.train import TrainConfig, TrainingDiverged, check_trained, train_model

        problem = first_model_memory_problem(settings)
        if problem:  # `serve` checks before migrating; this one is for any other caller
            raise FirstModelTooLarge(f"{problem}; nothing was trained")
        store.check_free(name, 1)  # a folder in v1's place was found only when the trained model was stored
        # trained without any cell already tombstoned for the dataset (a stored version 1 that
        # holds such cells is registered as it is, and its first claim runs a propagate job)
        with transaction(settings.database_url) as session:
            erased = sorted(erased_cells(session, spec))
        train, _ = get_splits(spec)
        train = train.without(erased)
        cfg = TrainConfig(
            epochs=settings.train_epochs,
            seed=settings.seed,
            width=settings.model_width,
            head_width=settings.model_width,
        )
        log.info("training %s on %s (%d instances, %d epochs)", name, spec["name"], len(train), cfg.epochs)
        started = time.monotonic()
        model = train_model(train, cfg, device=settings.device, progress=progress).cpu()
        log.info("trained %s in %.0f s", name, time.monotonic() - started)
        try:  # such a version would serve, and every job on it fail (its weights are refused on load)
            check_trained(model, train.images[: cfg.batch_size])
        except TrainingDiverged as exc:
            raise FirstModelDiverged(
                f"training the first version of {name!r} on {canonical_json(spec)}: {exc}; change the recipe "
                "(UNLEARND_TRAIN_EPOCHS, UNLEARND_MODEL_WIDTH, UNLEARND_SEED); nothing was stored or registered"
            ) from None
        manifest = store.put_version(
            model,
            model_name=name,
            version=1,
            parent=None,
            dataset=spec,
            erased_cells=[list(c) for c in erased],
            train_config=asdict(cfg),
            note="initial training",
        )

    try:
        with transaction(settings.database_url) as session:
            if session.get(Model, name) is not None:  # another process registered it meanwhile
                return session.get(Alias, (name, "serving")).version
            refuse_another_split_of(session, name, manifest.dataset)
            session.add(Model(name=name, dataset=manifest.dataset, tasks=list(train.tasks)))
            session.flush()
            session.add(
                ModelVersion(
                    model_name=name,
                    version=1,
                    parent_version=None,
                    job_id=None,
                    sha256=manifest.sha256,
                    artifact_uri=store.uri(name, 1),
                    deletions=[],
                    erased_cells=manifest.erased_cells,
                    metrics=finite_json(manifest.metrics) or None,  # NaN in a manifest written before strict JSON
                    note=manifest.note,
                )
            )
            session.add(Alias(model_name=name, alias="serving", version=1))
            session.add(AliasHistory(model_name=name, alias="serving", from_version=None, to_version=1, reason="initial"))
            append_event(
                session,
                "model.registered",
                model_name=name,
                payload={
                    "version": 1,
                    "sha256": manifest.sha256,
                    "dataset": manifest.dataset,
                    "tasks": list(train.tasks),
                    "model_config": manifest.model_config,
                    "train_config": manifest.train_config,
                },
            )
    except IntegrityError:  # lost a registration race: the winner's rows stand
        with transaction(settings.database_url) as session:
            if session.get(Model, name) is None:
                raise
    return 1

