"""The rules of model versions: lineage, the serving alias and rollback.

A rollback may not bring erased data back into service: the target version
must contain every erasure recorded since (every tombstone of the model's
dataset must be among the target's ``erased_cells``). Otherwise it is refused,
or, when asked to, a ``reapply`` job re-erases those cells on top of the target
and publishes a new version."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from unlearning.data import dataset_key

from model_store import (DamagedManifest, IntegrityError, ModelStore, PurgedVersion, StoreError,
                         WrongArchitecture, store_for)

from .audit import append_event, commit_ordered_now
from .datasets import erased_cells
from .errors import Conflict, NotFound
from .requests import PROCESS_MODEL_TOPIC, get_model
from .settings import PROPAGATION_RETRY_CAP_S, Settings
from .tables import (Alias, AliasHistory, AuditEvent, Job, Model, ModelVersion, OutboxMessage, Tombstone, as_utc,
                     iso_utc, new_id, utcnow)

log = logging.getLogger(__name__)

SERVING = "serving"
# A rollback refused for erasures the target misses names the first few in its detail and
# lists at most ERASURES_LISTED (with their total): after a long history, all of them made
# the problem document megabytes long
ERASURES_NAMED = 5
ERASURES_LISTED = 100
ACTIVE_JOB_STATUSES = ("queued", "running")


@dataclass
class ModelSummary:
    model: Model
    serving_version: int | None
    versions: int
    latest_version: int | None


def _reapplied_onto(session: Session, model: Model, current: int, version: int) -> bool:
    """Whether the serving ``current`` version is ``version`` with the erasures recorded
    since reapplied: a reapply job based on ``version`` published it, and it misses no
    erasure recorded since."""
    row = get_version(session, model.name, current)
    if row.parent_version != version or row.job_id is None:
        return False
    job = session.get(Job, row.job_id)
    return job is not None and job.kind == "reapply" and not missing_erasures(session, model, row)


@dataclass
class RollbackOutcome:
    """``noop``: already serving; ``moved``: the alias now points at the target;
    ``reapply``: a job was queued that will publish a new version."""

    action: Literal["noop", "moved", "reapply"]
    model_name: str
    from_version: int | None
    to_version: int
    job: Job | None = None


def as_cell(value) -> tuple[str, str]:
    """A cell as stored in JSON: ``[instance, task]`` or ``{"instance_id", "task"}``."""
    if isinstance(value, dict):
        return value["instance_id"], value["task"]
    iid, task = value
    return iid, task


def serving_version(session: Session, model_name: str, lock: bool = False) -> int | None:
    q = select(Alias).where(Alias.model_name == model_name, Alias.alias == SERVING)
    alias = session.execute(q.with_for_update() if lock else q).scalar_one_or_none()
    return alias.version if alias else None


def list_models(session: Session) -> list[ModelSummary]:
    stats = {
        name: (n, latest)
        for name, n, latest in session.execute(
            select(ModelVersion.model_name, func.count(), func.max(ModelVersion.version)).group_by(
                ModelVersion.model_name
            )
        )
    }
    serving = dict(
        session.execute(select(Alias.model_name, Alias.version).where(Alias.alias == SERVING)).all()
    )
    return [
        ModelSummary(m, serving.get(m.name), *stats.get(m.name, (0, None)))
        for m in session.execute(select(Model).order_by(Model.name)).scalars()
    ]


def version_summaries(session: Session, model_name: str, versions: list[int] | None = None) -> list[ModelVersion]:
    """The versions of ``model_name`` (all, or those numbered ``versions``) in version
    order, without their ``erased_cells`` (``erased_cell_count`` says how many): a version
    holds every cell of its lineage, and over a long history that is megabytes of JSON a
    version, read for every version of a listing."""
    query = (select(ModelVersion).options(defer(ModelVersion.erased_cells, raiseload=True))
             .where(ModelVersion.model_name == model_name).order_by(ModelVersion.version))
    if versions is not None:
        query = query.where(ModelVersion.version.in_(versions))
    return list(session.execute(query).scalars())


def list_versions(session: Session, model_name: str, after: int = 0,
                  limit: int | None = None) -> tuple[list[ModelVersion], bool]:
    """:func:`version_summaries` of the versions of ``model_name`` numbered above ``after``, at
    most ``limit`` of them (None: all), and whether more follow (NotFound for an unknown model)."""
    get_model(session, model_name)
    query = (select(ModelVersion).options(defer(ModelVersion.erased_cells, raiseload=True))
             .where(ModelVersion.model_name == model_name, ModelVersion.version > after)
             .order_by(ModelVersion.version))
    if limit is not None:
        query = query.limit(limit + 1)
    rows = list(session.execute(query).scalars())
    more = limit is not None and len(rows) > limit
    return rows[:limit] if more else rows, more


def get_version(session: Session, model_name: str, version: int) -> ModelVersion:
    get_model(session, model_name)
    row = session.execute(
        select(ModelVersion).where(ModelVersion.model_name == model_name, ModelVersion.version == version)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"model {model_name!r} has no version {version}", model=model_name, version=version)
    return row


def ancestors(session: Session, row: ModelVersion, limit: int | None = None) -> tuple[list[ModelVersion], bool]:
    """The parents of ``row``, nearest first, toward the first version, as
    :func:`version_summaries` (the walk reads only version numbers): at most ``limit`` of
    them, and whether older ones were left out (the last one listed has them as its own
    ancestors). Every deletion publishes a version, so a lineage grows with the erasures."""
    parent_of = dict(session.execute(select(ModelVersion.version, ModelVersion.parent_version)
                                     .where(ModelVersion.model_name == row.model_name)).all())
    chain, seen, parent = [], {row.version}, row.parent_version
    while parent is not None and parent in parent_of and parent not in seen:  # guard against a cycle
        if limit is not None and len(chain) == limit:
            return _summaries_of(session, row.model_name, chain), True
        seen.add(parent)
        chain.append(parent)
        parent = parent_of[parent]
    return _summaries_of(session, row.model_name, chain), False


def _summaries_of(session: Session, model_name: str, chain: list[int]) -> list[ModelVersion]:
    """:func:`version_summaries` of ``chain``'s versions, in ``chain``'s order."""
    summaries = {v.version: v for v in version_summaries(session, model_name, chain)} if chain else {}
    return [summaries[v] for v in chain]


def missing_erasures(session: Session, model: Model, target: ModelVersion,
                     instance_id: str | None = None) -> list[dict]:
    """Erasures recorded for the model's dataset (of one instance, with ``instance_id``)
    that ``target`` does not contain, grouped by request:
    ``[{"request_id", "instance_id", "tasks"}]``."""
    query = (select(Tombstone.request_id, Tombstone.instance_id, Tombstone.task)  # columns: no ORM objects
             .where(Tombstone.dataset_key == dataset_key(model.dataset)).order_by(Tombstone.id))
    if instance_id is not None:
        query = query.where(Tombstone.instance_id == instance_id)
    if target.tombstone_watermark is not None:
        # every earlier tombstone is in the target's lineage (publish refuses a version
        # that misses one): only those written since can be missing
        query = query.where(Tombstone.id > target.tombstone_watermark)
    rows = session.execute(query).all()
    have = {as_cell(c) for c in (target.erased_cells or [])} if rows else set()  # the lineage, read when needed
    return held_erasures(rows, have)


def models_sharing_dataset(session: Session, model_name: str, key: str) -> list[Model]:
    """The other models (not ``model_name``) trained on the dataset ``key`` names, by name."""
    return [m for m in session.execute(select(Model).where(Model.name != model_name).order_by(Model.name)).scalars()
            if dataset_key(m.dataset) == key]


def erasure_cells(erasures: list[dict]) -> list[list[str]]:
    """The ``[instance, task]`` cells of :func:`missing_erasures`' (or :func:`erasures_behind`') groups."""
    return [[e["instance_id"], t] for e in erasures for t in e["tasks"]]


def erasures_behind(session: Session, model: Model, instance_id: str | None = None) -> list[dict]:
    """:func:`missing_erasures` of the model's serving version: erasures of its dataset
    (of one instance, with ``instance_id``) that the version it serves still contains.
    Empty for a model whose every erasure went through its own jobs; not empty when
    another model trained on the same dataset erased cells (tombstones are per dataset:
    the data is erased, so every model trained on it must follow). ``worker.jobs`` runs
    a ``propagate`` job for them; the sweeper announces such models."""
    serving = serving_version(session, model.name)
    if serving is None:
        return []
    target = session.execute(
        select(ModelVersion).options(defer(ModelVersion.erased_cells))  # loaded only when compared
        .where(ModelVersion.model_name == model.name, ModelVersion.version == serving)
    ).scalar_one_or_none()
    return [] if target is None else missing_erasures(session, model, target, instance_id)


def _job_cells(params: dict | None) -> list[tuple]:
    """A job's cells (its ``params``), sorted: what two tries at the same erasure share."""
    return sorted(map(tuple, (params or {}).get("cells") or []))


def failed_propagation(session: Session, model_name: str, base_version: int, cells: list) -> Job | None:
    """The model's last ``propagate`` job when it failed on the same base and cells."""
    last = session.execute(
        select(Job).where(Job.model_name == model_name, Job.kind == "propagate").order_by(Job.created_at.desc())
    ).scalars().first()
    if (last is not None and last.status == "failed" and last.base_version == base_version
            and _job_cells(last.params) == sorted(map(tuple, cells))):
        return last
    return None


def propagation_retry_at(session: Session, failed: Job, retry_s: float) -> datetime:
    """When ``failed`` (a failed ``propagate`` job, :func:`failed_propagation`) is tried
    again: ``retry_s`` after it ended, doubled for each earlier failure of the same cells on
    the same base, at most ``PROPAGATION_RETRY_CAP_S`` (a day).
    A propagation that keeps failing is tried again ever more rarely, never in a loop."""
    cells = _job_cells(failed.params)
    failures = sum(
        1 for (params,) in session.execute(
            select(Job.params).where(Job.model_name == failed.model_name, Job.kind == "propagate",
                                     Job.status == "failed", Job.base_version == failed.base_version))
        if _job_cells(params) == cells)
    delay = min(retry_s * 2.0 ** min(max(failures, 1) - 1, 60), PROPAGATION_RETRY_CAP_S)
    return as_utc(failed.finished_at or failed.created_at) + timedelta(seconds=delay)


def stalled_propagation(session: Session, model: Model, behind: list[dict] | None = None) -> Job | None:
    """The failed ``propagate`` job that leaves ``model`` behind its dataset's erasures with
    nothing under way to catch up, or None. Stalled: the serving version still holds the
    cells of ``behind`` (:func:`erasures_behind`, read when not given), no job of the model
    is queued or running, and its last propagate job failed on that version with exactly
    those cells, so no claim or sweep tries them again before :func:`propagation_retry_at`
    (a poison job is not retried in a loop: ``worker.jobs``). A deletion request of the
    model is a try meanwhile: its job erases those cells too, and a request naming one of them is accepted
    (:func:`worker.requests.resolve_cells`) rather than refused with a promise of a
    propagate job that will not run."""
    behind = behind_with_nothing_under_way(session, model, behind)
    if not behind:
        return None
    return failed_propagation(session, model.name, serving_version(session, model.name), erasure_cells(behind))


def behind_with_nothing_under_way(session: Session, model: Model, behind: list[dict] | None = None) -> list[dict]:
    """``model``'s erasures behind its dataset's (:func:`erasures_behind`, read when not
    given) when no job of it is queued or running to catch up; else ``[]``."""
    behind = erasures_behind(session, model) if behind is None else behind
    if behind and session.execute(select(Job.id).where(Job.model_name == model.name,
                                                       Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)).first():
        return []
    return behind


def rollback(
    session: Session,
    settings: Settings,
    model_name: str,
    version: int,
    reapply_erasures: bool = False,
    actor: str | None = None,
    store: ModelStore | None = None,
    weights: "WeightsCheck | None" = None,
) -> RollbackOutcome:
    """Point the serving alias of ``model_name`` at ``version``, in the caller's transaction.

    ``weights``: the target's weights hashed before that transaction (:func:`check_weights_first`),
    so the store's check below does not read and hash them under its locks; without it (or
    for another sha256) they are hashed here.

    - a job of the model queued or running: :class:`Conflict` (it would move the alias: also
      when the target serves already), unless it is a ``reapply`` job based on ``version`` and
      ``reapply_erasures`` is asked: a repeat of the rollback under way, answered with that
      job (``reapply``, nothing written);
    - already serving: no-op, unless ``reapply_erasures`` and it misses erasures recorded
      since (another model's on the dataset, whose propagation has not run or is backing
      off): then a reapply job on it, as below; ``reapply_erasures`` to a target whose
      reapply job has published the serving version, with no erasure recorded since, is a
      no-op too (a repeat: another job would publish its duplicate), also once a purge has
      deleted the target's weights;
    - the target was purged: :class:`Conflict`;
    - the store (``store``; the settings' when not given) does not hold the target as
      recorded, its manifest with the record's sha256 and weights that match it
      (:func:`_check_target_stored`): :class:`Conflict`, nothing moved or queued;
    - the target contains every erasure recorded since: move the alias, write
      AliasHistory (reason ``rollback``) and a ``model.rollback`` audit event;
    - erasures are missing: :class:`Conflict` naming them (``erasures``: the first
      ``ERASURES_LISTED`` in the order recorded, ``erasures_total``: how many), unless
      ``reapply_erasures``: then a ``reapply`` job (status ``queued``, based on the
      target, ``params = {"cells": [[instance, task], ...], "request_ids": [...]}``),
      a ``model.rollback_requested`` audit event and a ``process_model`` outbox row.
      The alias moves when that job publishes its version, recorded then as AliasHistory
      reason ``rollback`` and a ``model.rollback`` event (``rolled_back_to``: the target,
      ``job_id``, and the ``actor`` who asked).

    ``actor`` (the API key's name, when the API has keys) is written into the audit event.
    """
    who = {"actor": actor} if actor else {}
    model = get_model(session, model_name)
    # The lock a claim takes (worker.jobs): a claim and a rollback of one model do not interleave,
    # so the active-job check below sees every job claimed before it, and no claim slips in after.
    session.execute(select(Model).where(Model.name == model_name).with_for_update(key_share=True))
    target = get_version(session, model_name, version)
    current = serving_version(session, model_name, lock=True)
    # A job under way would publish on top of its own base and move the alias off the target;
    # checked before the no-op too, which would promise a version that a queued reapply (the
    # one way back from an earlier rollback) or a deletion job is about to replace.
    active = list(session.execute(
        select(Job).where(Job.model_name == model_name, Job.status.in_(ACTIVE_JOB_STATUSES)).order_by(Job.created_at)
    ).scalars())
    under_way = next((j for j in active if j.kind == "reapply" and j.base_version == version), None)
    if under_way is not None and reapply_erasures:
        # a repeat of the rollback whose reapply is under way (a client retrying after a
        # timeout): that job, which erases every erasure recorded since (publish rebases it on
        # its own base otherwise), rather than a refusal that reads as if it had not been taken
        return RollbackOutcome("reapply", model_name, current, version, under_way)
    if active:
        raise Conflict(
            f"job {active[0].id} of {model_name!r} is under way; roll back once it has finished",
            model=model_name,
            job_id=active[0].id,
        )
    if current == version and not (reapply_erasures and missing_erasures(session, model, target)):
        # (with reapply_erasures, a serving version that misses erasures, another model's whose
        # propagation has not run or is backing off, gets them now: a reapply job on it)
        return RollbackOutcome("noop", model_name, current, version)

    if reapply_erasures and current is not None and _reapplied_onto(session, model, current, version):
        # a repeat (a client retrying after a timeout): the serving version is this request
        # done, the target with every erasure since reapplied; another job would publish
        # its duplicate. Before the purged check: a purge since may have deleted the target's
        # weights, and the request is still done
        return RollbackOutcome("noop", model_name, current, current)

    if target.purged_at is not None:
        purged_at = iso_utc(target.purged_at)  # ...Z, as every time the API writes
        raise Conflict(
            f"version {version} of {model_name!r} was purged at {purged_at}: its weights held "
            "data erased since and were deleted, so it can be neither served nor erased again",
            model=model_name, version=version, purged_at=purged_at,
        )

    missing = missing_erasures(session, model, target)
    if not missing or reapply_erasures:  # the alias moves onto it, or a job starts from it
        _check_target_stored(store or store_for(settings.store_dir), target, weights)
    if missing and not reapply_erasures:
        named = "; ".join(f"{m['instance_id']} {m['tasks']} (request {m['request_id']})"
                          for m in missing[:ERASURES_NAMED])
        more = f"; and {len(missing) - ERASURES_NAMED} more" if len(missing) > ERASURES_NAMED else ""
        listed = "" if len(missing) <= ERASURES_LISTED else f" (erasures lists the first {ERASURES_LISTED})"
        raise Conflict(
            f"version {version} of {model_name!r} still contains data erased since, "
            f"{len(missing)} erasure{'s' if len(missing) != 1 else ''}{listed}: {named}{more}. "
            "Pass reapply_erasures=true to erase it again on top of that version.",
            model=model_name,
            version=version,
            erasures=missing[:ERASURES_LISTED],
            erasures_total=len(missing),
        )
    if missing:
        cells = erasure_cells(missing)
        request_ids = list(dict.fromkeys(m["request_id"] for m in missing))
        job = Job(
            id=new_id(),
            model_name=model_name,
            kind="reapply",
            status="queued",
            method=settings.method,
            base_version=version,
            progress=0.0,
            attempts=0,
            params={"cells": cells, "request_ids": request_ids},
            created_at=commit_ordered_now(session),
        )
        session.add(job)
        session.flush()
        append_event(
            session,
            "model.rollback_requested",
            model_name=model_name,
            payload={
                "from_version": current,
                "to_version": version,
                "job_id": job.id,
                "reapply_cells": cells,
                "request_ids": request_ids,
                **who,
            },
        )
        session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": model_name}, created_at=utcnow()))
        session.flush()
        return RollbackOutcome("reapply", model_name, current, version, job)

    alias = session.get(Alias, (model_name, SERVING))
    if alias is None:
        session.add(Alias(model_name=model_name, alias=SERVING, version=version, updated_at=utcnow()))
    else:
        alias.version = version
        alias.updated_at = utcnow()
    session.add(
        AliasHistory(
            model_name=model_name, alias=SERVING, from_version=current, to_version=version, reason="rollback", at=utcnow()
        )
    )
    append_event(
        session, "model.rollback", model_name=model_name,
        payload={"from_version": current, "to_version": version, **who},
    )
    session.flush()
    return RollbackOutcome("moved", model_name, current, version)


@dataclass(frozen=True)
class WeightsCheck:
    """A stored version's weights, hashed before a transaction takes its locks (a rollback's
    target, a job's artifact before its publish): ``damage``, the store's refusal when they do
    not match ``sha256`` or do not fit the manifest's architecture (:meth:`ModelStore.check_weights`)."""

    version: int
    sha256: str
    damage: StoreError | None = None

    @property
    def ok(self) -> bool:
        return self.damage is None


def check_weights_first(settings: Settings, store: ModelStore, model_name: str, version: int) -> WeightsCheck | None:
    """Read and hash the weights of the rollback target ``version`` with no lock held (a
    read-only look at the record, then the store): the rollback's transaction (the model
    row and the serving alias locked; on SQLite the write lock) then compares sha256s only.
    None where the record has no such stored version or the store no matching manifest:
    the rollback's own checks say what is wrong then."""
    from .db import read_only_transaction

    with read_only_transaction(settings.database_url) as session:
        row = session.execute(select(ModelVersion.sha256, ModelVersion.purged_at).where(
            ModelVersion.model_name == model_name, ModelVersion.version == version)).first()
    if row is None or row.purged_at is not None:
        return None
    hashed = hash_stored_weights(store, model_name, version)
    return hashed if hashed is not None and hashed.sha256 == row.sha256 else None


def hash_stored_weights(store: ModelStore, model_name: str, version: int) -> WeightsCheck | None:
    """Read and hash the stored weights of ``version`` (to do before a transaction takes its
    locks): its manifest's sha256 and what is wrong with them, if anything; None when the store
    cannot say (the check under the locks names what is wrong then)."""
    try:
        sha = store.manifest(model_name, version).sha256
        return WeightsCheck(version, sha, store.weights_damage(model_name, version))
    except (StoreError, OSError):
        return None


def _check_target_stored(store: ModelStore, row: ModelVersion, weights: WeightsCheck | None = None) -> None:
    """:class:`Conflict` unless ``store`` holds version ``row`` as the record has it: its
    manifest, with the recorded sha256, and weights that match it and fit its architecture
    (hashed: a rollback is rare, and weights damaged or removed outside the service became
    serving, then failed every deletion job and ``serve``; ``weights``, hashed before, for the
    record's sha256, is taken as it is). The detail names the version and what is wrong, never a
    path (the store's own errors name its files): ``store_state`` says which in a word."""
    name, version = row.model_name, row.version
    try:
        manifest = store.manifest(name, version)
        checked = weights is not None and (weights.version, weights.sha256) == (version, row.sha256)
        if manifest.sha256 != row.sha256:
            state, why = "other_version", (f"the store holds another version {version} (sha256 "
                                           f"{manifest.sha256[:12]}…, the record's is {row.sha256[:12]}…)")
        else:
            damage = weights.damage if checked else store.weights_damage(name, version)
            if damage is None:
                return
            state, why = _damage_said(damage)
    except DamagedManifest:
        state, why = "damaged_manifest", "its manifest in the store cannot be read"
    except PurgedVersion:  # weights gone while the record does not have them purged (checked before)
        state, why = "missing_weights", "its weights are missing from the store (the record does not have them purged)"
    except StoreError:
        state, why = "missing", "the store does not hold it"
    except OSError as exc:  # not the store's own error: permissions, the disk (it was a 500)
        log.warning("rollback of %s v%d: the store cannot read it: %s", name, version, exc)
        state, why = "unreadable", f"the store cannot read it ({exc.strerror or type(exc).__name__})"
    raise Conflict(
        f"version {version} of {name!r} cannot be served: {why}. Restore it from a backup (the record has its "
        "sha256) or roll back to another version; nothing was moved or queued",
        model=name, version=version, store_state=state,
    )


def _damage_said(damage: StoreError) -> tuple[str, str]:
    """The ``store_state`` and the words of a stored version's :meth:`ModelStore.check_weights` refusal.
    Weights of another architecture than the manifest's, with the record's sha256, are the
    weights published: its manifest's ``model_config`` is what changed, and what to restore."""
    if isinstance(damage, WrongArchitecture):
        return "damaged_manifest", ("its weights match the sha256 the record has, but not the architecture its "
                                    "manifest's model_config describes")
    if isinstance(damage, DamagedManifest):
        return "damaged_manifest", "its manifest in the store does not describe a model architecture"
    return "damaged_weights", "its weights in the store do not match the sha256 the record has"


def purge_refused(model_name: str, exc: Exception, store_dir=None) -> Conflict:
    """The :class:`Conflict` (409) for a purge of ``model_name`` the model store refused part way:
    ``exc``, a :class:`StoreError` or ``OSError`` out of :func:`purge_versions` or
    :func:`redact_calibration` (weights that are a link, a file it may not delete, a disk error).
    ``store_state`` as a rollback's: ``damaged_weights``, ``damaged_manifest``, or ``unreadable``
    (a permission or disk error, the writers' lock included). The detail names no path
    (:func:`~worker.jobs.path_free`; the log has the whole error, and ``unlearnd purge`` prints it).
    The caller's transaction rolls back: weights deleted before the refusal stay deleted, and the
    next purge records them."""
    from .jobs import path_free  # jobs imports this module

    log.warning("purge of %s: the model store refused it: %s", model_name, exc)
    state = _damage_said(exc)[0] if isinstance(exc, (IntegrityError, DamagedManifest)) else "unreadable"
    if isinstance(exc, OSError):
        found = re.search(rf"/{re.escape(model_name)}/v([1-9][0-9]*)(?:/|$)", str(exc.filename or ""))
        why = (f"{'v' + found.group(1) + ': ' if found else ''}a permission or disk error "
               f"({exc.strerror or type(exc).__name__})")
    else:
        why = path_free(str(exc), store_dir)
    return Conflict(
        f"the model store refused the purge of {model_name!r}: {why}. Nothing was recorded: weights deleted "
        "before it stay deleted, and the next purge records them (but an unpublished artifact with a damaged "
        "manifest, deleted whole after every other version: one deleted before this refusal is named in the "
        "service's log); `unlearnd purge` names the file",
        model=model_name, store_state=state,
    )


@dataclass
class PurgeCandidate:
    """Stored weights that still hold erased data: a version (``row``), or an artifact no
    version points at (``row`` None: a job stored it, then was rebased, refused at publish
    or failed). ``erasures`` as :func:`missing_erasures` gives them; ``purged`` once the
    weights are deleted. An unpublished artifact whose manifest is ``damaged`` may hold
    anything and can never be published: it goes whole (no sha256, date or erasures)."""

    version: int
    sha256: str | None
    created_at: datetime | None
    erasures: list[dict]
    row: ModelVersion | None = None
    purged: bool = False
    damaged: str | None = None  # an artifact whose manifest cannot be read (why): deleted whole

    @property
    def published(self) -> bool:
        return self.row is not None


def held_erasures(tombstones: list[tuple[str, str, str]], erased: set[tuple[str, str]]) -> list[dict]:
    """The erasures among ``tombstones`` (``(request_id, instance_id, task)``) whose cell is not
    in ``erased`` (a lineage's cells), grouped by request: ``[{"request_id", "instance_id", "tasks"}]``."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for request_id, iid, task in tombstones:
        if (iid, task) not in erased:
            grouped.setdefault((request_id, iid), []).append(task)
    return [{"request_id": rid, "instance_id": iid, "tasks": tasks} for (rid, iid), tasks in grouped.items()]


def unpublished_artifacts(session: Session, store, model_name: str, clean: bool = True) -> list[int]:
    """Version numbers the store holds for ``model_name`` that no version row points at and
    no queued or running job has reserved (``params.target_version``); ``clean`` as in
    ``store.versions`` (a read-only caller passes False)."""
    rows = set(session.execute(select(ModelVersion.version).where(ModelVersion.model_name == model_name)).scalars())
    reserved = {int((p or {}).get("target_version")) for p in session.execute(
        select(Job.params).where(Job.model_name == model_name, Job.status.in_(ACTIVE_JOB_STATUSES))).scalars()
        if (p or {}).get("target_version") is not None}
    return [v for v in store.versions(model_name, clean=clean) if v not in rows and v not in reserved]


PURGED_EVENT = "model.version_purged"


def _check_store_holds(store, model_name: str, rows: list[ModelVersion]) -> None:
    """:class:`Conflict` unless ``store`` holds the manifest of every version in ``rows`` with
    the sha256 the record has: a store directory other than the service's (a relative
    ``UNLEARND_STORE_DIR`` read from another working directory) is refused by name."""
    wrong, damaged = [], []
    for row in rows:
        try:
            if store.manifest(model_name, row.version).sha256 != row.sha256:
                wrong.append(f"v{row.version} (another sha256)")
        except DamagedManifest as exc:  # the store is the service's; this version's manifest is not readable
            damaged.append(f"v{row.version}: {exc}")
        except StoreError:
            wrong.append(f"v{row.version} (missing)")
    if damaged and not wrong:
        raise Conflict(
            f"the model store holds a damaged manifest of {model_name!r}: {'; '.join(damaged[:3])}"
            f"{'; ...' if len(damaged) > 3 else ''}. Restore it (the record has each version's sha256) or "
            "remove that version's weights by hand; nothing was purged",
            model=model_name, versions=[r.version for r in rows])
    wrong += [d.split(":", 1)[0] + " (damaged manifest)" for d in damaged]
    if wrong:
        first = rows[0]
        raise Conflict(
            f"the model store does not hold the versions of {model_name!r} the record names: "
            f"{', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''}; the record has v{first.version} at "
            f"{first.artifact_uri}, this store looks at {store.uri(model_name, first.version)}. "
            "Is UNLEARND_STORE_DIR the service's? Nothing was purged",
            model=model_name, versions=[r.version for r in rows])


def purge_versions(
    session: Session,
    store,
    model_name: str,
    *,
    created_before: datetime | None = None,
    dry_run: bool = False,
    actor: str | None = None,
) -> list[PurgeCandidate]:
    """Delete from the model store the weights that still hold data erased since (a
    tombstone of the model's dataset is not in their lineage), in the caller's
    transaction, and return them by version number: the model's versions, and the
    artifacts no version points at (a job stored them, then was rebased, refused at
    publish or failed).

    Kept: the serving version; the base of a job queued or running (a reapply after a
    rollback, say) and the artifact such a job reserved; versions that hold no erased
    data (safe rollback targets); with ``created_before``, what was created at or after
    it (a retention window for rollbacks with ``reapply_erasures``). A version's row
    stays, with ``purged_at``, and a ``model.version_purged`` audit event names the
    erasures the weights held (``published`` false for an artifact without a row); a
    purged version can no longer be rolled back to. ``dry_run``: the candidates, nothing
    deleted.

    :class:`~worker.errors.Conflict` before anything is deleted when the store does not
    hold the serving version's or a candidate version's manifest with the recorded sha256
    (:func:`_check_store_holds`): a store directory
    other than the service's (a relative ``UNLEARND_STORE_DIR`` from another working
    directory) would otherwise be recorded as purged while the weights stay.
    The weights are deleted before the row records it: should the transaction fail, the
    weights are gone and a second run records them (never the other way round)."""
    get_model(session, model_name)
    # the lock a claim and a rollback take: no job starts on a version being purged, and no
    # rollback moves the alias onto one
    model = session.execute(select(Model).where(Model.name == model_name).with_for_update(key_share=True)).scalar_one()
    serving = serving_version(session, model_name, lock=True)
    if serving is not None:  # the store must be the service's, also when nothing is left to purge
        _check_store_holds(store, model_name, [get_version(session, model_name, serving)])
    busy = set(session.execute(select(Job.base_version).where(
        Job.model_name == model_name, Job.status.in_(ACTIVE_JOB_STATUSES))).scalars())
    query = (select(ModelVersion).options(defer(ModelVersion.erased_cells))
             .where(ModelVersion.model_name == model_name, ModelVersion.purged_at.is_(None))
             .order_by(ModelVersion.version))
    if created_before is not None:
        query = query.where(ModelVersion.created_at < created_before)
    out: list[PurgeCandidate] = []
    for row in session.execute(query).scalars():
        if row.version == serving or row.version in busy:
            continue
        held = missing_erasures(session, model, row)
        if held:
            out.append(PurgeCandidate(row.version, row.sha256, row.created_at, held, row))

    _check_store_holds(store, model_name, [c.row for c in out])

    orphans = unpublished_artifacts(session, store, model_name, clean=not dry_run)  # a dry run deletes nothing
    if orphans:
        tombstones = session.execute(
            select(Tombstone.request_id, Tombstone.instance_id, Tombstone.task)
            .where(Tombstone.dataset_key == dataset_key(model.dataset)).order_by(Tombstone.id)).all()
        recorded = {(e or {}).get("version") for e in session.execute(
            select(AuditEvent.payload).where(AuditEvent.kind == PURGED_EVENT,
                                             AuditEvent.model_name == model_name)).scalars()}
        for number in orphans:
            if not store.exists(model_name, number) and number in recorded:
                continue  # purged and recorded (weights gone, unrecorded: a run that failed after deleting them)
            try:
                manifest = store.manifest(model_name, number)
            except StoreError as exc:  # damaged: what it holds is unknown, and nothing can publish it
                out.append(PurgeCandidate(number, None, None, [], damaged=str(exc)))
                continue
            created = as_utc(datetime.fromisoformat(manifest.created_at))  # no zone: UTC, as the record
            if created_before is not None and created >= created_before:
                continue
            held = held_erasures(tombstones, {as_cell(c) for c in manifest.erased_cells})
            if held:
                out.append(PurgeCandidate(number, manifest.sha256, created, held))
        out.sort(key=lambda c: c.version)
    if dry_run:
        return out
    # what writes that died left (a temporary copy of a version's weights or of the calibration's
    # scores) is not a version, and holds what the versions held: deleted first, whatever its age
    leftovers = store.remove_leftovers(model_name)
    if leftovers:
        log.warning("purge: removed %d temporary file(s) or folder(s) of writes that died in %s's part of the "
                    "store: %s", len(leftovers), model_name, ", ".join(leftovers))
    # damaged artifacts last: one is deleted whole, so nothing of it is left for a next run to
    # find and record should a later deletion (a store that refuses) or the commit fail
    for c in sorted(out, key=lambda c: (c.damaged is not None, c.version)):
        if c.damaged:
            log.warning("purge: %s v%d is an unpublished artifact with a damaged manifest (%s): deleted whole; "
                        "its model.version_purged event records it once this purge commits (should it not, "
                        "nothing of it is left for the next purge: this line is its record)",
                        model_name, c.version, c.damaged)
            store.discard(model_name, c.version, strict=True)
        else:
            store.purge(model_name, c.version)  # False: deleted by an earlier run that failed before recording it
        c.purged = True
        if c.row is not None:
            c.row.purged_at = utcnow()
        append_event(
            session, PURGED_EVENT, model_name=model_name,
            payload={"version": c.version, "sha256": c.sha256, "published": c.published,
                     "held_erasures": [{"request_id": e["request_id"], "tasks": e["tasks"]} for e in c.erasures],
                     **({"damaged_manifest": c.damaged} if c.damaged else {}),
                     **({"actor": actor} if actor else {})},
        )
    session.flush()
    return out


CALIBRATION_REDACTED_EVENT = "model.calibration_redacted"


def redact_calibration(session: Session, store, model_name: str, *, dry_run: bool = False,
                       actor: str | None = None) -> int:
    """Take the scores of erased cells (the dataset's tombstones) out of the model's stored
    shadow calibration (``worker.calibration.without_cells``), in the caller's transaction
    (a ``model.calibration_redacted`` audit event counts them), and return how many there
    were; ``dry_run``: count them only. Part of a purge: a score is a number about a
    person's data, kept next to the versions.

    The file is replaced before the caller commits. When that commit fails, the scores are
    gone but no event says so, and the next purge finds nothing to take out. The file
    counts what was ever taken out of it (``redacted_cells``), so a purge that finds more
    there than the model's events record for that file (its ``calibration_id``; a file
    written before ids were given, by the events without one) appends an event for the
    difference too (``"unrecorded": n``, counted in ``cells``)."""
    from .calibration import without_cells

    try:
        stored = store.calibration(model_name)
    except (OSError, ValueError, StoreError) as exc:  # a link, damaged: jobs and serve refuse it too; the purge goes on
        log.warning("%s: the stored calibration cannot be read (%s); its scores are left as they are", model_name, exc)
        return 0
    if not stored:
        return 0
    redacted, removed = without_cells(stored, set(erased_cells(session, get_model(session, model_name).dataset)))
    file_id = stored.get("calibration_id")
    recorded = sum(_as_count((payload or {}).get("cells")) for payload in session.execute(
        select(AuditEvent.payload).where(AuditEvent.kind == CALIBRATION_REDACTED_EVENT,
                                         AuditEvent.model_name == model_name)).scalars()
        if (payload or {}).get("calibration_id") == file_id)
    unrecorded = max(0, _as_count(stored.get("redacted_cells")) - recorded)
    if dry_run or not (removed or unrecorded):
        return removed
    if removed:
        store.replace_calibration(model_name, redacted)
    if unrecorded:
        log.warning("%s: %d calibration score(s) were taken out by a purge whose record was not committed; "
                    "recording them now", model_name, unrecorded)
    append_event(session, CALIBRATION_REDACTED_EVENT, model_name=model_name,
                 payload={"cells": removed + unrecorded, **({"unrecorded": unrecorded} if unrecorded else {}),
                          **({"calibration_id": file_id} if file_id is not None else {}),
                          **({"actor": actor} if actor else {})})
    return removed


def _as_count(value) -> int:
    """A count read back from JSON (an event's payload, the calibration file); anything else is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", job_id=job_id)
    return job


def load_version(settings: Settings, store: ModelStore, model_name: str, version: int, device):
    """The stored version's model and manifest (its weights checked against the manifest). The
    store says :class:`PurgedVersion` for any version whose manifest it has without weights;
    one the record never purged lost its weights otherwise (:func:`weights_gone_missing`)."""
    try:
        return store.load(model_name, version, device=device)
    except PurgedVersion:
        missing = weights_gone_missing(settings, model_name, version)
        if missing is None:
            raise
        raise missing from None


def weights_gone_missing(settings: Settings, model_name: str, version: int) -> StoreError | None:
    """For a version the store holds without weights (read as purged): the error to raise when
    the record has them stored, never purged (deleted by hand, a restore that missed them),
    where "its weights were purged (they held erased data)" reached the job, its requests and
    their submitters (and a calibration took the fixed quantile for good); None when the
    record purged them, or does not have the version (the store's word stands)."""
    from .db import read_only_transaction

    with read_only_transaction(settings.database_url) as session:
        row = session.execute(select(ModelVersion.purged_at).where(
            ModelVersion.model_name == model_name, ModelVersion.version == version)).one_or_none()
    if row is None or row.purged_at is not None:
        return None
    return StoreError(f"{model_name} v{version}: its weights are missing from the model store, which holds "
                      "its manifest only; the record has them stored (never purged): restore them "
                      "(the record has their sha256)")
