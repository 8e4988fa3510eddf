"""Unlearning jobs: claim the queued work of one model, run the engine, publish a version.

Plain functions; the Celery task (``worker.tasks``) and the in-process worker
(``worker.background``) both call :func:`process_model`. The steps:

1. :func:`claim_next` (one short transaction, the model row locked): at most one
   active job per model. A queued job (a reapply written by a rollback, or a
   job the sweeper reset) is taken first; then, when the serving version still
   holds cells of its dataset erased through another model trained on the same
   dataset (tombstones are per dataset), a ``propagate`` job that erases them
   (unless that job failed on the same base and cells: it is not retried in a
   loop, and the next deletion job erases them with its own cells instead, or,
   with no request waiting, a retry once ``propagation_retry_s`` has passed,
   doubled with each failure);
   otherwise every queued deletion request of the model is coalesced into one
   new job.
2. :func:`run_job` (no transaction open while the engine runs): load the base
   version from the store, build the data (original splits minus every
   tombstoned cell), run the method, write the artifact FIRST under a version
   number fixed on the job row, so a rerun of the job finds it.
3. :func:`publish_version` (one transaction): version row (``job_id`` is
   unique: a job that runs twice publishes one version), alias move, requests
   completed, tombstones, audit events, and a ``process_model`` announcement for
   every other model on the dataset when new cells were erased.

Delivery is at least once, so every step can run again and still do the
right thing once. Each claim of a job is one attempt (``jobs.attempts``); a
run acts on the record (heartbeat, publish, fail) only while the job is
running under its own attempt, so a worker the sweeper gave up on cannot
fail or publish over the rerun that replaced it.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, or_, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from model_store import Manifest, ModelStore
from unlearning.data import dataset_key

from .audit import append_event, commit_ordered_now
from .calibration import calibration_share, lineage_calibration, method_config
from .datasets import erased_cells, get_reference, get_splits
from .db import advisory_lock, read_only_transaction, transaction
from .requests import (COMPLETED_EVENT, PROCESS_MODEL_TOPIC, PROPAGATED_EVENT, _lock_model_submissions,
                       finite_json, request_metrics)
from .runner import GONE_REASON, this_process
from .runner import is_gone as runner_gone
from .settings import Settings
from .versions import (WeightsCheck, behind_with_nothing_under_way, erasure_cells, erasures_behind,
                       failed_propagation, hash_stored_weights, load_version, models_sharing_dataset,
                       propagation_retry_at, stalled_propagation)
from .tables import (Alias, AliasHistory, AuditEvent, DeletionRequest, Job, Model, ModelVersion, OutboxMessage,
                     Tombstone, utcnow)

log = logging.getLogger(__name__)

# What the engine may reuse between jobs on one model version (tau, task subspaces,
# the original model's evaluation): (model, version) -> dict. Bounded, per process.
ENGINE_CACHE: "OrderedDict[tuple[str, int], dict]" = OrderedDict()
ENGINE_CACHE_SIZE = 4
# Guards ENGINE_CACHE: the embedded worker's thread picks a job's cache (engine_cache) while a
# purge answered by an API thread of the same process drops purged versions from it
# (forget_purged_versions); an OrderedDict changed during another thread's iteration raises
# (the job failed, or the purge answered 500 after it had committed).
_engine_cache_lock = threading.RLock()

#: pauses before each try to put a job back in the queue after a database error (~30 s in all)
REQUEUE_PAUSES_S = (0, 1, 2, 4, 8, 15)
#: rebases of one job (:func:`publish_version`: its artifact was refused because another model on
#: the dataset published an erasure while it ran, or the alias moved under it) before the next
#: refusal fails it instead (``job.failed``). Rebases are not attempts (:func:`counted_attempts`),
#: so without a bound a job whose every run meets another model's publish would never end.
MAX_JOB_REBASES = 5
_pause = time.sleep
#: the clock of a job's time limit in its own process (:func:`_compute`; tests move it on)
_clock = time.monotonic

_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


@dataclass
class JobOutcome:
    """What :func:`process_model` did: ``idle`` (nothing queued), ``busy`` (the model is
    held: ``reason`` says by what, as :class:`Claim`; with ``running``, ``job_id`` is the
    running job), ``completed``, ``failed``, ``requeued`` (put back in the
    queue to run again: a database error, or a base that stopped serving) or
    ``superseded`` (the sweeper gave this attempt up and another one owns the job)."""

    status: str
    model_name: str
    job_id: str | None = None
    version: int | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


class JobFailed(RuntimeError):
    """A job that cannot succeed as specified (bad cells, missing base version)."""


class StaleAttempt(RuntimeError):
    """This run's attempt no longer owns the job (requeued and claimed again, or finished)."""


class CalibrationTimeLimit(SoftTimeLimitExceeded):
    """The job's time limit came while it trained the model's shadow calibration (Celery's
    prefork limit covers the whole delivery): recorded with what to do about it."""


class JobStopped(RuntimeError):
    """The worker is stopping (the run's ``stop`` event is set): the job goes back to the
    queue now rather than stay 'running' until the sweeper finds its heartbeat stale."""


# Errors of the database connection or of a transaction the database aborted (deadlock,
# serialisation): the job is put back in the queue, not failed.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


@dataclass
class Claim:
    """What :func:`claim_next` got: ``claimed`` (``job_id`` and the ``attempt`` this claim
    is), ``busy`` or ``idle``.

    ``busy`` says why (``reason``):

    - ``running``: a job of the model is running (``job_id``). Its end announces the model
      again (a Celery delivery announces it after its job; the in-process worker claims
      again until idle), a job put back in the queue is announced (``job.requeued``), and
      one whose worker died is reset and announced by the sweeper: a delivery that finds
      it has nothing to wait for.
    - ``locked``: another transaction holds the model (a concurrent claim, a rollback or a
      purge: the row lock on PostgreSQL; on SQLite this process's claim lock). For a
      moment only, and a concurrent claim may have read the queue before the request
      this delivery announces committed, then ended idle without announcing anything:
      the delivery must try again."""

    status: str
    job_id: str | None = None
    attempt: int | None = None
    reason: str | None = None


def engine_cache(model_name: str, version: int) -> dict:
    """The engine's cache of ``version`` (most recently used last). The model's other
    cached versions give up their device copies of the data (:func:`release_device_data`):
    at most one version per model holds the training and test data on the GPU."""
    from unlearning.job import release_device_data

    key = (model_name, version)
    with _engine_cache_lock:
        cache = ENGINE_CACHE.pop(key, None)
        if cache is None:
            cache = {}
        for (name, _), other in ENGINE_CACHE.items():
            if name == model_name:
                release_device_data(other)
        ENGINE_CACHE[key] = cache
        while len(ENGINE_CACHE) > ENGINE_CACHE_SIZE:
            ENGINE_CACHE.popitem(last=False)
        return cache


def forget_purged_versions(settings: Settings) -> list[tuple[str, int]]:
    """Drop the engine caches of versions purged since this worker cached them, and return
    their keys. A version's cache holds its model (the evaluation context's original) and
    numbers computed from the data it saw: what a purge deletes from the store must not
    stay in a worker's memory until the cache evicts it. Run before every job."""
    with _engine_cache_lock:  # (the query runs without it: a job picking its cache does not wait on the database)
        names = sorted({name for name, _ in ENGINE_CACHE})
    if not names:
        return []
    with read_only_transaction(settings.database_url) as session:
        purged = {(name, version) for name, version in session.execute(
            select(ModelVersion.model_name, ModelVersion.version).where(
                ModelVersion.purged_at.is_not(None), ModelVersion.model_name.in_(names)))}
    with _engine_cache_lock:
        gone = [key for key in ENGINE_CACHE if key in purged]
        for key in gone:
            ENGINE_CACHE.pop(key, None)
    for key in gone:
        log.info("dropped the engine cache of %s v%d: the version was purged", *key)
    return gone


def _process_lock(model_name: str) -> threading.Lock:
    with _process_locks_guard:
        return _process_locks.setdefault(model_name, threading.Lock())


def _cells(raw) -> list[tuple[str, str]]:
    return [(str(i), str(t)) for i, t in raw or []]


def _jsonable(value) -> Any:
    """``value`` as plain JSON for the record: tensors and numpy numbers as floats; NaN and
    infinities (a degenerate evaluation, e.g. an attack with no measurable forgotten cell)
    as None (:func:`finite_json`), since PostgreSQL's JSON has no NaN and the metrics
    would not be stored."""
    return finite_json(json.loads(json.dumps(value, default=float)))


# --------------------------------------------------------------------------- claim


def claim_next(settings: Settings, model_name: str) -> Claim:
    """Claim the next job of ``model_name``. One transaction; the model row is locked with
    ``FOR NO KEY UPDATE SKIP LOCKED`` (a busy claimer skips rather than waits;
    NO KEY leaves the API free to insert requests referencing the model; a rollback
    takes the same lock)."""
    is_sqlite = settings.database_url.startswith("sqlite")
    lock = _process_lock(model_name) if is_sqlite else None
    if lock is not None and not lock.acquire(blocking=False):
        return Claim("busy", reason="locked")
    try:
        return _claim(settings, model_name)
    finally:
        if lock is not None:
            lock.release()


def _claim(settings: Settings, model_name: str) -> Claim:
    now = utcnow()
    with transaction(settings.database_url) as session:
        model = session.execute(
            select(Model).where(Model.name == model_name).with_for_update(skip_locked=True, key_share=True)
        ).scalar_one_or_none()
        if model is None:
            known = session.execute(select(Model.name).where(Model.name == model_name)).scalar_one_or_none()
            return Claim("busy", reason="locked") if known else Claim("idle")

        # One active job per model. A running job whose heartbeat went stale (its worker
        # died) still counts: the sweeper resets it to queued, and then it is claimed here.
        # One whose runner this process can see is gone (killed: the OOM killer, SIGKILL) is
        # put back in the queue now, and claimed below (an attempt that counts).
        running = session.execute(
            select(Job).where(Job.model_name == model_name, Job.status == "running").limit(1)
        ).scalar_one_or_none()
        if running is not None and runner_gone(running.runner):
            # Submissions first, as below: the lock they take before their audit event, and the
            # requeue appends one. Then the job row, only now: a live runner's publish locks it.
            _lock_model_submissions(session, model_name)
            running = session.execute(select(Job).where(Job.id == running.id).with_for_update()
                                      .execution_options(populate_existing=True)).scalar_one()
            if running.status == "running" and runner_gone(running.runner):
                log.warning("job %s: the process that ran attempt %d (pid %s) is gone (killed?); back in the "
                            "queue", running.id, running.attempts, running.runner.get("pid"))
                _put_back(session, running, "job.requeued", reason=GONE_REASON)
            if running.status != "running":  # put back now, or by the sweeper (or ended) while this waited
                running = None
        if running is not None:
            return Claim("busy", job_id=running.id, reason="running")
        # Submissions of the model wait until this claim commits (the lock they take, before any
        # audit event as here): a request accepted while this claim decided whether one is waiting
        # (_waiting_requests) was left out of that decision
        _lock_model_submissions(session, model_name)

        queued_job = None
        for candidate in session.execute(
            select(Job).where(Job.model_name == model_name, Job.status == "queued").order_by(Job.created_at)
        ).scalars():
            if counted_attempts(candidate) >= settings.max_job_attempts:
                # a poison job (its worker dies, or it keeps being put back): not again
                fail_job(session, candidate, f"gave up after {counted_attempts(candidate)} attempts; the last one "
                                             "did not finish (worker killed, out of memory, time limit, database "
                                             "errors?)", store_dir=settings.store_dir)
                continue
            queued_job = candidate
            break
        if queued_job is not None:
            _start(queued_job, now)
            for req in session.execute(
                select(DeletionRequest).where(
                    DeletionRequest.job_id == queued_job.id, DeletionRequest.status.in_(("queued", "running"))
                )
            ).scalars():
                req.status = "running"
                req.progress = 0.0
            append_event(
                session,
                "job.started",
                model_name=model_name,
                payload={"job_id": queued_job.id, "kind": queued_job.kind, "attempt": queued_job.attempts,
                         "base_version": queued_job.base_version},
            )
            return Claim("claimed", queued_job.id, queued_job.attempts)

        # Erasures of the dataset that the serving version still holds (another model on
        # the same dataset erased them): those first, as a job of their own, unless a waiting
        # request of the model names one of their cells (its job carries them, below), or
        # that very job (same base, same cells) failed: then not again in a loop, but with
        # the model's next deletion request (below), whose job is the new try, or once its
        # retry is due (versions.propagation_retry_at) when no request is waiting.
        behind = erasures_behind(session, model)
        behind_cells = erasure_cells(behind)
        failed = None
        if behind:
            serving_now = session.get(Alias, (model_name, "serving")).version
            failed = failed_propagation(session, model_name, serving_now, behind_cells)
            retry_at = None if failed is None else propagation_retry_at(session, failed, settings.propagation_retry_s)
            # A request of this model waiting for a cell it is behind on (accepted while another
            # model's request for the cell was pending; pending cells are per model) is that
            # erasure's own request here: its job erases every cell the model is behind on, and
            # it completes. A propagate job first left it to be rejected as "erased by another
            # request", with no certificate for its submitter, where the same requests claimed
            # before the first publish both complete.
            requested = bool(_waiting_cells(session, model_name) & set(map(tuple, behind_cells)))
            if (failed is None and not requested) or (
                    failed is not None and now >= retry_at and not _waiting_requests(session, model_name)):
                propagation = _propagation(session, settings, model_name, behind, retries=failed)
                return Claim("claimed", propagation.id, propagation.attempts)
            if failed is not None:
                log.warning("model %s still holds erased cells %s; its propagate job %s failed: %s; its next "
                            "deletion request erases them, or a retry at %s", model_name, behind_cells, failed.id,
                            failed.error, retry_at.isoformat())
        held = set(map(tuple, behind_cells))  # tombstoned, yet the serving version still holds them

        requests = list(
            session.execute(
                select(DeletionRequest)
                .where(
                    DeletionRequest.model_name == model_name,
                    DeletionRequest.status == "queued",
                    DeletionRequest.job_id.is_(None),
                )
                .order_by(DeletionRequest.created_at)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if not requests:
            return Claim("idle")

        tombstoned = erased_cells(session, model.dataset)
        claimed, cells = [], []
        for req in requests:
            req_cells = [(req.instance_id, t) for t in req.tasks]
            # erased by another request, and from this model too; a cell it still holds (its
            # propagate job failed) is not gone: this job erases it (the behind cells below)
            gone = [c for c in req_cells if c in tombstoned and c not in held]
            if gone and len(gone) < len(req_cells):
                # Some of its cells were erased by another request (through another model on the
                # dataset) after this one was accepted: the others are still to erase.
                append_event(session, "deletion.cells_already_erased", model_name=model_name, request_id=req.id,
                             instance_id=req.instance_id,
                             payload={"cells": [list(c) for c in gone],
                                      "erased_by": sorted({tombstoned[c] for c in gone})})
            elif gone:
                erased_by = _erased_here_since(session, model_name, req, gone)
                if erased_by is not None:
                    _complete_by(session, req, erased_by, now)
                    continue
                # Erased by another request after this one was accepted: nothing left to do for it.
                req.status = "rejected"
                req.error = f"cells already erased by another request: {[list(c) for c in gone]}"
                append_event(
                    session,
                    "deletion.rejected",
                    model_name=model_name,
                    request_id=req.id,
                    instance_id=req.instance_id,
                    payload={"reason": req.error, "erased_by": sorted({tombstoned[c] for c in gone})},
                )
                continue
            claimed.append(req)
            cells.extend(c for c in req_cells if c not in cells and c not in tombstoned)
        if not claimed:
            return Claim("idle")

        serving = session.get(Alias, (model_name, "serving"))
        if serving is None:
            raise JobFailed(f"model {model_name!r} has no serving version")
        request_ids = [r.id for r in claimed]
        # Erasures the model is behind on whose own propagate job failed: its version could
        # not be served without them anyway (publish_version), so they are erased here too
        # (this job is the propagation's next try: job.started names the failed one).
        for b in behind:
            cells.extend(c for c in map(tuple, erasure_cells([b])) if c not in cells)
            if b["request_id"] not in request_ids:
                request_ids.append(b["request_id"])
        now = commit_ordered_now(session)
        job = Job(
            model_name=model_name,
            kind="deletion",
            status="running",
            method=settings.method,
            base_version=serving.version,
            params={"cells": [list(c) for c in cells], "request_ids": request_ids},
            created_at=now,  # the claim's time, as started_at is (the column default, read at flush, came after it)
        )
        _start(job, now)
        session.add(job)
        session.flush()
        for req in claimed:
            req.status = "running"
            req.job_id = job.id
            req.base_version = serving.version
            req.progress = 0.0
        append_event(
            session,
            "job.started",
            model_name=model_name,
            payload={"job_id": job.id, "kind": "deletion", "request_ids": request_ids,
                     "cells": [list(c) for c in cells], "base_version": serving.version, "method": job.method,
                     **({"retries_propagation": {"job_id": failed.id, "cells": behind_cells}}
                        if failed is not None else {})},
        )
        return Claim("claimed", job.id, job.attempts)


def _erased_here_since(session: Session, model_name: str, req: DeletionRequest, cells: list) -> AuditEvent | None:
    """The ``job.completed`` event of the model's newest job since ``req`` was accepted that
    erased every one of ``cells`` (after a rollback and a second reapply, the second), else
    of the job that, with those before it, did; or None. A job that did not
    carry ``req`` can erase its cells: one rebased to catch up on another model's erasure of
    them while it ran, or a rollback's reapply (a waiting request joins only a new deletion
    job, :func:`_claim`)."""
    received = session.execute(select(func.min(AuditEvent.seq)).where(AuditEvent.request_id == req.id)).scalar()
    if received is None:
        return None
    events = list(session.execute(select(AuditEvent).where(
        AuditEvent.kind == "job.completed", AuditEvent.model_name == model_name,
        AuditEvent.seq > received).order_by(AuditEvent.seq)).scalars())
    wanted = set(cells)
    for event in reversed(events):  # the newest job that erased them all: after a rollback and a second
        if wanted <= {tuple(c) for c in (event.payload or {}).get("cells") or []}:  # reapply, that one's
            return event
    covered: set[tuple[str, str]] = set()
    for event in events:  # several jobs, each erasing some: the one that completed the set
        covered |= {tuple(c) for c in (event.payload or {}).get("cells") or []}
        if wanted <= covered:
            return event
    return None


def _complete_by(session: Session, req: DeletionRequest, event: AuditEvent, now: datetime) -> None:
    """Complete ``req`` with the version of ``event`` (:func:`_erased_here_since`), whose job
    erased its cells from its model without carrying it: it was rejected as "already erased
    by another request", with no certificate, though its own model had erased them for it."""
    done = event.payload or {}
    cells = [[req.instance_id, t] for t in req.tasks]
    req.status = "completed"
    req.job_id = done.get("job_id")
    req.base_version = done.get("base_version")
    req.produced_version = done.get("version")
    req.metrics = request_metrics(done.get("metrics"), cells)
    req.progress = 1.0
    req.completed_at = now
    req.error = None
    append_event(session, COMPLETED_EVENT, model_name=req.model_name, request_id=req.id,
                 instance_id=req.instance_id,
                 payload={"job_id": req.job_id, "version": req.produced_version, "base_version": req.base_version,
                          "cells": cells, "method": done.get("method"), "sha256": done.get("sha256"),
                          "metrics": done.get("metrics"),
                          "erased_by_job": {"job_id": req.job_id, "kind": done.get("kind"), "event_seq": event.seq}})
    log.info("request %s: its cells were erased from %s by job %s (v%s), which did not carry it; completed with it",
             req.id, req.model_name, req.job_id, req.produced_version)


def propagation_due(session: Session, model: Model, settings: Settings, now: datetime) -> bool:
    """Whether ``model`` is behind its dataset's erasures with no job under way that will
    catch up, and its last try at the same cells did not fail or its retry is due at ``now``
    (what the sweeper announces; after such a failure the model's next deletion request is
    a try too: :func:`worker.versions.stalled_propagation`)."""
    behind = behind_with_nothing_under_way(session, model)
    if not behind:
        return False
    stalled = stalled_propagation(session, model, behind)
    return stalled is None or now >= propagation_retry_at(session, stalled, settings.propagation_retry_s)


def _waiting_requests(session: Session, model_name: str) -> bool:
    """Whether a deletion request of the model is queued and not yet in a job (its job would
    erase the cells a failed propagation left too). The caller holds the model's submission
    lock (``_claim``): a request accepted as the propagation's next try while this looked
    would otherwise find its cells erased by the retry and be rejected ("already erased by
    another request")."""
    return session.execute(select(DeletionRequest.id).where(
        DeletionRequest.model_name == model_name, DeletionRequest.status == "queued",
        DeletionRequest.job_id.is_(None)).limit(1)).first() is not None


def _waiting_cells(session: Session, model_name: str) -> set[tuple[str, str]]:
    """The cells of the model's deletion requests that are queued and not yet in a job (the
    caller holds the model's submission lock, as for :func:`_waiting_requests`)."""
    rows = session.execute(select(DeletionRequest.instance_id, DeletionRequest.tasks).where(
        DeletionRequest.model_name == model_name, DeletionRequest.status == "queued",
        DeletionRequest.job_id.is_(None))).all()
    return {(instance_id, task) for instance_id, tasks in rows for task in tasks}


def _propagation(session: Session, settings: Settings, model_name: str, behind: list[dict],
                 retries: Job | None = None) -> Job:
    """A running ``propagate`` job on the serving version that erases ``behind``
    (:func:`worker.versions.erasures_behind`: erasures of the model's dataset, made
    through another model, that the serving version still holds), with its audit event.
    The caller checks first that the model's last propagate job did not fail on the same
    base and cells (:func:`~worker.versions.failed_propagation`): that one is not tried
    again in a loop (its failure is in the record and the audit log; a new erasure or
    version changes the cells or the base, and a new deletion request is a new try), only
    once its retry is due (:func:`~worker.versions.propagation_retry_at`): ``retries``,
    named in ``job.started``."""
    serving = session.get(Alias, (model_name, "serving")).version
    cells = erasure_cells(behind)
    request_ids = list(dict.fromkeys(b["request_id"] for b in behind))
    now = commit_ordered_now(session)
    job = Job(model_name=model_name, kind="propagate", status="running", method=settings.method,
              base_version=serving, params={"cells": cells, "request_ids": request_ids}, created_at=now)
    _start(job, now)
    session.add(job)
    session.flush()
    append_event(
        session,
        "job.started",
        model_name=model_name,
        payload={"job_id": job.id, "kind": "propagate", "request_ids": request_ids, "cells": cells,
                 "base_version": serving, "method": job.method,
                 **({"retries_propagation": {"job_id": retries.id, "cells": cells}} if retries is not None else {})},
    )
    return job


def _start(job: Job, now: datetime) -> None:
    job.status = "running"
    job.runner = this_process()
    job.attempts = (job.attempts or 0) + 1
    job.started_at = now
    job.heartbeat_at = now
    job.progress = 0.0
    job.error = None


# --------------------------------------------------------------------------- run


@dataclass
class JobData:
    """The data of one job: what the base model reflects, what to forget, held-out data."""

    train: Any  # MultiTaskDataset: the original training split minus every erased cell but the forget cells
    test: Any
    forget_cells: list[tuple[str, str]]
    erased_before: list[tuple[str, str]]  # cells erased in the base version's lineage or tombstoned


def job_data(settings: Settings, spec: dict, base_manifest: Manifest, cells: list[tuple[str, str]]) -> JobData:
    """Build the data of a job: the dataset's original splits minus every tombstoned
    cell and every cell erased in the base version's lineage, except the cells
    this job forgets (a reapply forgets cells that are tombstoned already)."""
    train_full, test = get_splits(spec)
    with read_only_transaction(settings.database_url) as session:
        tombstoned = set(erased_cells(session, spec))
    lineage = {tuple(c) for c in base_manifest.erased_cells}
    forget = list(dict.fromkeys(cells))
    erased_before = sorted((tombstoned | lineage) - set(forget))
    train = train_full.without(erased_before)
    train.check_cells(forget)  # a clear error for an unknown instance or task (the API validates first)
    return JobData(train=train, test=test, forget_cells=forget, erased_before=erased_before)


class _Heartbeat:
    """Writes the job's progress and heartbeat every ``interval`` seconds while the job loads
    its base version and data and while the engine runs, so the sweeper leaves a
    long-running job alone and clients see it move."""

    def __init__(self, settings: Settings, job_id: str, attempt: int, interval: float):
        self.settings, self.job_id, self.attempt, self.interval = settings, job_id, attempt, interval
        self.fraction = 0.0
        self._written = -1.0
        self._stop = threading.Event()
        # set when the record shows the job is no longer this attempt's (the sweeper put it back
        # after a suspend or a clock step longer than stale_after_s, another worker runs it)
        self.superseded = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, float(fraction)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except Exception:  # a missed heartbeat is not a failed job
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def write(self) -> None:
        fraction = round(0.95 * self.fraction, 4)  # the last 5% is publishing
        with transaction(self.settings.database_url) as session:
            # locked, as requeue and mark_failed do: a requeue committing between an unlocked
            # read and the write would get this attempt's heartbeat and progress
            job = session.execute(select(Job).where(Job.id == self.job_id).with_for_update()).scalar_one_or_none()
            if job is None or job.status != "running" or job.attempts != self.attempt:
                self.superseded.set()  # the job ends at its next progress report (_compute)
                return  # not this attempt's job any more: a live rerun's heartbeat is its own
            job.heartbeat_at = utcnow()
            if fraction != self._written:
                job.progress = fraction
                for req in session.execute(
                    select(DeletionRequest).where(DeletionRequest.job_id == self.job_id,
                                                  DeletionRequest.status == "running")
                ).scalars():
                    req.progress = fraction
        self._written = fraction


def _target_version(settings: Settings, store: ModelStore, job_id: str, attempt: int) -> int:
    """The version number this job publishes, fixed on the job row the first time it is
    asked for, so a rerun writes (and finds) the same artifact. Only by the attempt that
    owns the job (:class:`StaleAttempt` otherwise): a superseded attempt that got here after
    a rebase took the number away reserved one for its old base, and the next attempt found
    its copy there and failed publishing it (its parent was not the job's base)."""
    with transaction(settings.database_url) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
        if job.status != "running" or job.attempts != attempt:
            raise StaleAttempt(f"attempt {attempt} no longer owns job {job_id}")
        params = dict(job.params or {})
        if "target_version" in params:
            return int(params["target_version"])
        in_db = session.execute(
            select(func.max(ModelVersion.version)).where(ModelVersion.model_name == job.model_name)
        ).scalar() or 0
        # another job may have reserved a number: an unfinished one, or one given up on
        # (failed after too many attempts) whose worker may still be alive and store its
        # artifact under that number later; the store's latest version covers only those
        # that already did
        planned = session.execute(
            select(Job.params).where(Job.model_name == job.model_name, Job.id != job_id,
                                     Job.status != "completed")
        )
        in_jobs = max((int(p.get("target_version", 0)) for (p,) in planned if p), default=0)
        version = max(in_db, in_jobs, store.latest_version(job.model_name) or 0) + 1
        params["target_version"] = version
        job.params = params
        return version


def run_job(settings: Settings, store: ModelStore, job_id: str, attempt: int | None = None,
            stop: threading.Event | None = None) -> JobOutcome:
    """Run a claimed job to its end: compute (unless its artifact exists), store, publish.

    ``attempt`` is the claim this run belongs to (:func:`claim_next`); None takes the
    job's current one. Failures are recorded (job and requests failed, audit
    ``job.failed``) and returned; a database error puts the job back in the queue
    instead (a rerun publishes what this run stored); a run whose attempt was
    superseded records nothing. When ``stop`` is set (the worker is shutting down),
    the computation ends at its next progress report and the job is put back in the
    queue (``job.requeued``, ``requeued``): a rerun starts it again at once."""
    try:
        with transaction(settings.database_url) as session:
            job = session.get(Job, job_id)
            model_name, base_version, kind = job.model_name, job.base_version, job.kind
            cells = _cells((job.params or {}).get("cells"))
            request_ids = list((job.params or {}).get("request_ids") or [])
            method = job.method
            spec = session.get(Model, model_name).dataset
            done = session.execute(select(ModelVersion).where(ModelVersion.job_id == job_id)).scalar_one_or_none()
            if done is not None:  # published by an earlier run: nothing left to do
                return JobOutcome("completed", model_name, job_id, done.version, metrics=done.metrics or {})
            attempt = job.attempts if attempt is None else attempt
            if job.status != "running" or job.attempts != attempt:
                return JobOutcome("superseded", model_name, job_id, error=f"attempt {attempt} no longer owns the job")
    except TRANSIENT_DB_ERRORS as exc:  # right after the claim: the job would stay "running", no heartbeat
        return _requeue_after_database_error(settings, job_id, attempt, None, exc)

    started = time.monotonic()
    try:
        version = _target_version(settings, store, job_id, attempt)
        manifest = _stored_artifact(settings, store, job_id, model_name, base_version, version)
        if manifest is None:
            manifest = _compute(settings, store, job_id, model_name, base_version, version, spec, cells,
                                request_ids, method, kind, attempt=attempt, stop=stop)
        result = publish_version(settings, store, job_id, manifest, seconds=time.monotonic() - started,
                                 attempt=attempt)
        if result.status == "completed":
            log.info("job %s published %s v%d", job_id, model_name, result.version)
        return result
    except StaleAttempt as exc:
        log.warning("job %s: attempt %d was superseded (%s); recording nothing", job_id, attempt, exc)
        return JobOutcome("superseded", model_name, job_id, error=str(exc))
    except JobStopped as exc:
        log.warning("job %s: %s; putting it back in the queue", job_id, exc)
        try:
            requeue(settings, job_id, attempt, str(exc), stopped=True)
        except Exception:  # noqa: BLE001 - the sweeper requeues it once its heartbeat is stale
            log.warning("job %s: could not put it back in the queue; the sweeper will", job_id, exc_info=True)
        return JobOutcome("requeued", model_name, job_id, error=str(exc))
    except TRANSIENT_DB_ERRORS as exc:
        return _requeue_after_database_error(settings, job_id, attempt, model_name, exc)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then reported
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, CalibrationTimeLimit):
            error = (f"the job reached its time limit (UNLEARND_JOB_TIME_LIMIT_S={settings.job_time_limit_s} s) "
                     f"while training {model_name}'s shadow calibration (once per model) and was stopped; "
                     "nothing was published and no calibration stored: run `unlearnd calibrate` (no time "
                     "limit) or raise the limit, then submit again")
        elif isinstance(exc, SoftTimeLimitExceeded):
            error = (f"the job ran past its time limit (UNLEARND_JOB_TIME_LIMIT_S={settings.job_time_limit_s} s) "
                     "and was stopped; nothing was published")
        log.error("job %s failed: %s\n%s", job_id, error, traceback.format_exc())
        recorded = _record_failure(settings, job_id, error, attempt)
        if recorded is None:
            return JobOutcome("failed", model_name, job_id, error=f"{error} (not recorded: the database is unreachable)")
        if not recorded:
            return JobOutcome("superseded", model_name, job_id, error=error)
        return JobOutcome("failed", model_name, job_id, error=error)


def _as_stored(store: ModelStore, job_id: str, manifest: Manifest, checked: WeightsCheck | None = None) -> Manifest:
    """The manifest the record is about to copy, as the store holds it now, with weights that
    match it: the record's sha256 must be the store's. Another attempt of the job may have
    replaced a damaged copy with its own since this one stored (same job, other bytes):
    that copy is published. :class:`JobFailed` when the store holds no good copy of the job's.
    ``checked`` (:func:`~worker.versions.hash_stored_weights`, before the publish's locks), for
    the manifest's sha256 now, is taken as it is."""
    from model_store import PurgedVersion, StoreError

    try:
        held = store.manifest(manifest.model, manifest.version)
    except StoreError as exc:
        raise JobFailed(f"artifact v{manifest.version} cannot be read from the store: {exc}") from None
    if held.job_id != job_id:
        raise JobFailed(f"the store's v{manifest.version} is job {held.job_id}'s, not {job_id}'s")
    try:
        ok = checked.ok if checked is not None and checked.sha256 == held.sha256 else \
            store.verify(manifest.model, manifest.version)
    except PurgedVersion:  # a purge keeps a running job's artifact: they went some other way
        raise JobFailed(f"the store's v{manifest.version} lost its weights file after this job stored it (a purge "
                        "keeps a running job's artifact: removed outside the service?)") from None
    if not ok:
        raise JobFailed(f"the store's v{manifest.version} no longer matches its manifest (sha256 {held.sha256})")
    if held.sha256 != manifest.sha256:
        log.warning("job %s: v%d was stored again by another attempt (sha256 %s, not %s); publishing the store's",
                    job_id, manifest.version, held.sha256[:12], manifest.sha256[:12])
    return held


def _record_failure(settings: Settings, job_id: str, error: str, attempt: int | None) -> bool | None:
    """:func:`mark_failed`, tried again for about half a minute while the database is away (as
    a requeue is); None when it never answered. Before, the error went up to Celery, whose
    retry of the delivery found the job "running" under this live process and ended "busy":
    the job stayed so until the sweeper found its heartbeat stale (10 minutes), as it still
    does when the database stays away longer."""
    for pause in REQUEUE_PAUSES_S:
        _pause(pause)
        try:
            return mark_failed(settings, job_id, error, attempt=attempt)
        except TRANSIENT_DB_ERRORS:
            log.debug("job %s: recording its failure failed", job_id, exc_info=True)
    log.warning("job %s: its failure could not be recorded (the database is unreachable); the sweeper puts it "
                "back once its heartbeat is stale", job_id)
    return None


def _requeue_after_database_error(settings: Settings, job_id: str, attempt: int | None, model_name: str | None,
                                  exc: Exception) -> JobOutcome:
    """Put a job a database error interrupted back in the queue (a rerun publishes what this
    run stored). A blip is usually over in seconds: try for about half a minute, or the job
    stays "running" until the sweeper finds its heartbeat STALE_AFTER_S old (10 minutes).
    Without the claim's ``attempt`` nothing is put back: the sweeper does it."""
    error = f"{type(exc).__name__}: {exc}"
    log.warning("job %s: database error, putting it back in the queue: %s", job_id, error)
    for pause in REQUEUE_PAUSES_S if attempt is not None else ():
        _pause(pause)
        try:
            requeue(settings, job_id, attempt, f"database error: {error}")
            break
        except Exception:  # noqa: BLE001 - the database is still away
            log.debug("job %s: requeue failed", job_id, exc_info=True)
    else:
        log.warning("job %s: not put back in the queue; the sweeper will requeue it", job_id)
    return JobOutcome("requeued", model_name or "", job_id, error=error)


def _stored_artifact(settings, store, job_id, model_name, base_version, version) -> Manifest | None:
    """The artifact an earlier run of this job stored and died before publishing, or None.
    One whose weights do not match its manifest, or whose manifest cannot be read, is
    discarded (and computed again): the version number is this job's (``target_version``),
    so nothing else can publish it. The store checks and discards under its lock, so a
    good copy another attempt has just stored is never the one discarded."""
    if not store.exists(model_name, version):
        return None
    if store.discard_if_damaged(model_name, version):
        log.warning("job %s: stored artifact v%d was damaged (weights or manifest); discarded it", job_id, version)
        return None
    manifest = store.manifest(model_name, version)
    if manifest.job_id != job_id:
        return None
    if manifest.parent != base_version:  # stored on the job's base before a rebase: it can never be published
        log.warning("job %s: stored artifact v%d is on v%s, not on the job's base v%d; discarded it",
                    job_id, version, manifest.parent, base_version)
        store.discard(model_name, version)
        return None
    _check_base(settings, store, model_name, base_version)
    log.info("job %s: artifact v%d already stored, publishing it", job_id, version)
    return manifest


def _job_config(settings: Settings, method: str, calibration: dict | None, base_manifest: Manifest) -> dict:
    """The method's configuration for a job: the settings' (with the lineage's calibration),
    and for ``retrain`` the base version's training recipe under the settings' ``train``
    fields, so the gold standard repeats the recipe that made the model (not TrainConfig's
    library defaults)."""
    config = method_config(settings, calibration)
    if method == "retrain" and base_manifest.train_config:
        config["train"] = {**base_manifest.train_config, **dict(config.get("train") or {})}
    return config


def _check_base(settings: Settings, store: ModelStore, model_name: str, base_version: int,
                base_manifest: Manifest | None = None) -> None:
    """The base version in the store is the one the record holds (same weights' sha256):
    a checkpoint replaced behind the service's back (say, by pre-erasure weights) must not
    become the base of a new version."""
    base_manifest = base_manifest or store.manifest(model_name, base_version)  # read once: sha256 and lineage
    sha = base_manifest.sha256
    with read_only_transaction(settings.database_url) as session:
        recorded = session.execute(
            select(ModelVersion.sha256, ModelVersion.erased_cells).where(ModelVersion.model_name == model_name,
                                                                         ModelVersion.version == base_version)
        ).one_or_none()
    if recorded is None:
        raise JobFailed(f"base version {base_version} of {model_name!r} is not in the record")
    if recorded.sha256 != sha:
        raise JobFailed(f"base version {base_version} of {model_name!r} in the store (sha256 {sha}) is not the "
                        f"one the record holds (sha256 {recorded.sha256})")
    # the lineage the job builds on (what it leaves out of its data, what its version claims
    # erased) is the manifest's, which the sha256 does not cover: it must be the record's
    stored = {tuple(c) for c in base_manifest.erased_cells}
    if stored != {tuple(c) for c in recorded.erased_cells or []}:
        raise JobFailed(f"base version {base_version} of {model_name!r} in the store claims {len(stored)} erased "
                        f"cells, the record {len(recorded.erased_cells or [])}: its manifest is not the one "
                        "published")


#: the engine's last progress report, once it has evaluated the unlearned model
#: (unlearning.job.run_unlearning_job: the method covers 0-0.9, the evaluation the rest, which
#: reports nothing on its way). A stop it finds no longer ends the job, which stores and
#: publishes: a stop that came during the evaluation threw the finished work away there
ENGINE_DONE = 1.0


def _compute(settings, store, job_id, model_name, base_version, version, spec, cells, request_ids, method, kind,
             attempt=None, stop=None):
    from unlearning.job import run_unlearning_job
    from unlearning.train import resolve_device

    device = resolve_device(settings.device)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    interval = max(0.5, min(10.0, settings.stale_after_s / 4))
    if attempt is None:
        with read_only_transaction(settings.database_url) as session:
            attempt = session.get(Job, job_id).attempts

    started = _clock()

    def check_stop(timed: bool = True) -> None:
        if stop is not None and stop.is_set():
            raise JobStopped("the worker stopped before the job finished")
        if beat.superseded.is_set():  # computing on would only hold the device: what it stored is refused
            raise StaleAttempt(f"attempt {attempt} no longer owns job {job_id}; its computation stopped")
        # the time limit where nothing else enforces it (the in-process worker, Celery's solo
        # pool), at the engine's next report: recorded as the prefork pool's soft limit is
        if timed and _clock() - started > settings.job_time_limit_s:
            raise SoftTimeLimitExceeded()

    def progress(fraction: float, timed: bool = True) -> None:  # the engine reports often: a stop ends the job there
        check_stop(timed)
        beat.progress(fraction)

    # The heartbeat covers loading too: rendering or reading a large dataset the first
    # time may take longer than STALE_AFTER_S, and the sweeper must not requeue a live job.
    forget_purged_versions(settings)
    with _Heartbeat(settings, job_id, attempt, interval) as beat:
        check_stop()
        model, base_manifest = load_version(settings, store, model_name, base_version, device)
        _check_base(settings, store, model_name, base_version, base_manifest)
        data = job_data(settings, spec, base_manifest, cells)
        share = 0.0  # of the bar: shadow models to train first (once per model), in proportion to their steps
        calibration = None
        if method == settings.method:
            share = calibration_share(settings, store, model_name, len(data.train), len(data.train.tasks))
            # the time limit counts the job's own work, not the shadows' (untimed reports): a
            # first job's calibration past it was never stored, and every later job trained it
            # again and failed alike. Celery's prefork limit covers the whole delivery, though.
            try:
                calibration = lineage_calibration(settings, store, model_name, device,
                                                  progress=lambda f: progress(share * f, timed=False))
            except SoftTimeLimitExceeded as exc:
                raise CalibrationTimeLimit() from exc
            started = _clock()
        check_stop()
        result = run_unlearning_job(
            model,
            data.train,
            data.test,
            data.forget_cells,
            method=method,
            config=_job_config(settings, method, calibration, base_manifest),
            device=device,
            seed=settings.seed,
            cache=engine_cache(model_name, base_version),
            progress=lambda f: (beat.progress if f >= ENGINE_DONE else progress)(share + (1.0 - share) * f),
            # the held-out reference of UNLEARND_REFERENCE_SCENES, for the method that reads held-out data
            reference=get_reference(settings, spec) if method == "interference_aware" else None,
        )
        beat.progress(1.0)
    lineage = {tuple(c) for c in base_manifest.erased_cells} | set(data.forget_cells)
    metrics = _jsonable(dict(result.metrics))
    metrics.setdefault("seconds", round(float(getattr(result, "seconds", 0.0) or 0.0), 3))
    metrics["calibration"] = "shadow_scores" if calibration is not None else "fixed_quantile"
    return store.put_version(
        result.model.cpu(),
        model_name=model_name,
        version=version,
        parent=base_version,
        dataset=spec,
        deletions=request_ids,
        deleted_cells=[list(c) for c in data.forget_cells],
        erased_cells=[list(c) for c in sorted(lineage)],
        metrics=metrics,
        job_id=job_id,
        train_config=base_manifest.train_config,
        note=f"{kind} job {job_id} with {method}",
    )


# --------------------------------------------------------------------------- publish


def publish_version(settings: Settings, store: ModelStore, job_id: str, manifest: Manifest,
                    seconds: float | None = None, attempt: int | None = None) -> JobOutcome:
    """Record a stored artifact as the job's version, in one transaction: the version row,
    the serving alias, the requests, the tombstones, the audit events. A job whose
    version row exists already has had all of this done: calling again is a no-op.

    Only a running job publishes, and only under its current attempt when ``attempt``
    is given (else :class:`StaleAttempt`). Erased data stays out of service: when the
    artifact's lineage misses a tombstoned cell of the dataset (an erasure published
    after the job was claimed), or a deletion or propagate job's base is no longer the
    serving version (the alias moved under it), nothing is published: such a job is
    rebased (put back in the queue on the serving version; its artifact stays
    unpublished in the store) and returns ``requeued``, up to ``MAX_JOB_REBASES`` times,
    after which it fails (:class:`JobFailed`, so the job and its requests are failed with
    ``job.failed``: a bounded end where other models' erasures keep landing during each
    run). A reapply is rebased on its own base, the rollback's target, with the erasures
    published since added to its cells (the alias stays where it was until it publishes).

    New tombstones are announced (``process_model``) to every other model whose
    dataset is this one: the data is erased, so each must follow (``propagate``)."""
    # read and hashed before any lock is taken (on SQLite the write lock every API writer waits for)
    checked = hash_stored_weights(store, manifest.model, manifest.version)
    with transaction(settings.database_url) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
        existing = session.execute(select(ModelVersion).where(ModelVersion.job_id == job_id)).scalar_one_or_none()
        if existing is not None:
            return JobOutcome("completed", job.model_name, job_id, existing.version, metrics=existing.metrics or {})
        if manifest.job_id != job_id:
            raise JobFailed(f"artifact v{manifest.version} belongs to job {manifest.job_id}, not {job_id}")
        if job.status != "running" or (attempt is not None and job.attempts != attempt):
            raise StaleAttempt(f"job {job_id} is {job.status} at attempt {job.attempts}, not running attempt {attempt}")
        # The sha256 covers the weights only: the manifest's own claims, which the record is
        # about to copy (version, base, dataset), must be this job's.
        claimed = {"model": manifest.model, "version": manifest.version, "parent": manifest.parent,
                   "dataset": dataset_key(manifest.dataset)}
        expected = {"model": job.model_name, "version": (job.params or {}).get("target_version", manifest.version),
                    "parent": job.base_version, "dataset": dataset_key(session.get(Model, job.model_name).dataset)}
        wrong = {k: (claimed[k], expected[k]) for k in claimed if claimed[k] != expected[k]}
        if wrong:
            raise JobFailed(f"the artifact's manifest does not match job {job_id}: "
                            + ", ".join(f"{k} {got!r}, expected {want!r}" for k, (got, want) in wrong.items()))
        manifest = _as_stored(store, job_id, manifest, checked)
        _check_erasures(session, job, manifest)

        # NaN in a stored manifest (one written before strict JSON) is None, as the job's own metrics are
        model_name, version, metrics = job.model_name, manifest.version, finite_json(manifest.metrics or {})
        alias = session.execute(
            select(Alias).where(Alias.model_name == model_name, Alias.alias == "serving").with_for_update()
        ).scalar_one_or_none()
        previous = alias.version if alias else None
        key = dataset_key(manifest.dataset)
        # Tombstones are per dataset and the alias lock per model: a publish of another model
        # on the dataset may be writing some right now. Under this lock every earlier
        # publish on the dataset is in (and none of the same cells is inserted twice).
        advisory_lock(session, f"unlearnd-tombstones:{key}")
        have = erased_cells(session, manifest.dataset)  # cell -> the request that erased it
        unsafe = _unsafe_to_serve(job, previous, manifest, have.keys())
        if unsafe is not None:
            rebases = int((job.params or {}).get("rebases", 0))
            if rebases >= MAX_JOB_REBASES:
                raise JobFailed(f"not published: {unsafe}; rebased {rebases} times already (MAX_JOB_REBASES), "
                                "each time another model on the dataset published an erasure, or the serving "
                                "alias moved, while it ran")
            # A reapply stays on its rollback's target (the alias moves when it publishes);
            # a deletion or propagate job moves to the serving version.
            _rebase(session, job, job.base_version if job.kind == "reapply" else previous, have, unsafe, version)
            return JobOutcome("requeued", model_name, job_id, error=f"rebased: {unsafe}")

        now = utcnow()
        requests = list(
            session.execute(
                select(DeletionRequest).where(DeletionRequest.id.in_(list(manifest.deletions)))
            ).scalars()
        ) if manifest.deletions else []
        by_cell = {(r.instance_id, t): r.id for r in requests for t in r.tasks}
        erased_now = [(iid, task) for iid, task in manifest.deleted_cells if (iid, task) not in have]
        for iid, task in erased_now:
            session.add(Tombstone(dataset_key=key, instance_id=iid, task=task,
                                  request_id=by_cell.get((iid, task), job_id)))
        session.flush()
        session.add(ModelVersion(
            model_name=model_name,
            version=version,
            parent_version=manifest.parent,
            job_id=job_id,
            sha256=manifest.sha256,
            artifact_uri=store.uri(model_name, version),
            deletions=list(manifest.deletions),
            erased_cells=list(manifest.erased_cells),
            metrics=metrics,
            note=manifest.note,
            # every tombstone of the dataset so far is in this version's lineage (checked above,
            # under the dataset's lock): later questions of what it still holds start after it
            tombstone_watermark=session.execute(
                select(func.max(Tombstone.id)).where(Tombstone.dataset_key == key)).scalar(),
        ))
        if alias is None:
            session.add(Alias(model_name=model_name, alias="serving", version=version))
        else:
            alias.version = version
        # A reapply is the second half of a rollback (versions.rollback queued it): the alias
        # moves back now, and is recorded as the rollback it is.
        session.add(AliasHistory(model_name=model_name, alias="serving", from_version=previous, to_version=version,
                                 reason="rollback" if job.kind == "reapply" else "publish"))
        if job.kind == "reapply":
            append_event(session, "model.rollback", model_name=model_name,
                         payload={"from_version": previous, "to_version": version,
                                  "rolled_back_to": job.base_version, "job_id": job_id,
                                  **_rollback_actor(session, model_name, job_id)})
        if erased_now:
            # The data is erased, not only this model's copy: every other model trained on
            # the dataset is told, and its next claim runs a propagate job (erasures_behind).
            for other in models_sharing_dataset(session, model_name, key):
                session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": other.name},
                                          created_at=now))

        job.status = "completed"
        job.produced_version = version
        job.metrics = metrics
        job.progress = 1.0
        job.finished_at = now
        job.heartbeat_at = now
        job.error = None
        session.flush()
        append_event(
            session,
            "job.completed",
            model_name=model_name,
            payload={"job_id": job_id, "kind": job.kind, "method": job.method, "base_version": job.base_version,
                     "version": version, "sha256": manifest.sha256, "request_ids": list(manifest.deletions),
                     "cells": manifest.deleted_cells, "metrics": metrics, "seconds": seconds},
        )
        for req in requests:
            req_cells = [[req.instance_id, t] for t in req.tasks]
            if job.kind == "deletion" and req.job_id == job_id:
                req.status = "completed"
                req.progress = 1.0
                req.produced_version = version
                req.metrics = request_metrics(metrics, req_cells)
                req.completed_at = now
                req.error = None
                kind = "deletion.completed"
            elif req.model_name != model_name:  # a request made of another model on the same dataset
                kind = PROPAGATED_EVENT
            else:  # a reapply after a rollback: the request was completed before, its erasure is applied again
                kind = "deletion.reapplied"
            append_event(
                session,
                kind,
                model_name=model_name,
                request_id=req.id,
                instance_id=req.instance_id,
                payload={"job_id": job_id, "version": version, "base_version": job.base_version,
                         "cells": req_cells, "method": job.method, "sha256": manifest.sha256, "metrics": metrics},
            )
        return JobOutcome("completed", model_name, job_id, version, metrics=metrics)


def _rollback_actor(session: Session, model_name: str, job_id: str) -> dict:
    """``{"actor": ...}`` of the ``model.rollback_requested`` event that queued reapply
    ``job_id``, where it named one (the API had keys), else ``{}``."""
    events = session.execute(
        select(AuditEvent.payload).where(AuditEvent.model_name == model_name,
                                         AuditEvent.kind == "model.rollback_requested")
        .order_by(AuditEvent.seq.desc())
    ).scalars()
    for payload in events:
        if (payload or {}).get("job_id") == job_id:
            return {"actor": payload["actor"]} if payload.get("actor") else {}
    return {}


def _check_erasures(session: Session, job: Job, manifest: Manifest) -> None:
    """:class:`JobFailed` unless the artifact's erasure claims, which the record is about to
    copy (the requests it completes, the cells it tombstones, the version's lineage), are
    this job's: its requests and cells, on top of its base version's recorded lineage. The
    sha256 covers the weights only: an edited manifest would complete requests it did not
    erase, or leave erased cells out of the lineage that rollbacks and other models read."""
    params = job.params or {}
    cells = list(dict.fromkeys(_cells(params.get("cells"))))
    base = session.execute(select(ModelVersion.erased_cells).where(
        ModelVersion.model_name == job.model_name, ModelVersion.version == job.base_version)).scalar_one_or_none()
    lineage = {tuple(c) for c in base or []} | set(cells)
    wrong = [what for what, ok in (
        (f"requests {list(manifest.deletions)}, expected {list(params.get('request_ids') or [])}",
         list(manifest.deletions) == list(params.get("request_ids") or [])),
        (f"erased cells {[list(c) for c in manifest.deleted_cells]}, expected {[list(c) for c in cells]}",
         [tuple(c) for c in manifest.deleted_cells] == cells),
        (f"lineage of {len(manifest.erased_cells)} erased cells, expected the base's and this job's "
         f"({len(lineage)})", {tuple(c) for c in manifest.erased_cells} == lineage),
    ) if not ok]
    if wrong:
        raise JobFailed(f"the artifact's manifest does not match job {job.id}: " + "; ".join(wrong))


def _unsafe_to_serve(job: Job, serving: int | None, manifest: Manifest, tombstoned) -> str | None:
    """Why ``manifest`` must not become the serving version, or None (``tombstoned``: a set of cells)."""
    missing = tombstoned - {tuple(c) for c in manifest.erased_cells}
    if missing:
        return f"v{manifest.version} still contains cells erased since the job was claimed: " \
               f"{[list(c) for c in sorted(missing)]}"
    if job.kind in ("deletion", "propagate") and serving != job.base_version:
        return f"its base v{job.base_version} is no longer serving (v{serving} is)"
    return None


def _rebase(session: Session, job: Job, serving: int | None, tombstoned: dict, unsafe: str,
            unpublished_version: int) -> None:
    """Put a job whose artifact must not be served back in the queue on the ``serving``
    version (a reapply: its own base), with every tombstoned cell that version still holds
    added to its cells (the new base may itself lack erasures: a rollback's target). ``tombstoned``:
    :func:`~worker.datasets.erased_cells`, cell -> the request that erased it."""
    _put_back(session, job, "job.rebased", reason=f"not published: {unsafe}", from_base=job.base_version,
              to_base=serving, unpublished_version=unpublished_version)
    new_base = session.execute(select(ModelVersion.erased_cells).where(
        ModelVersion.model_name == job.model_name, ModelVersion.version == serving)).scalar_one_or_none()
    params = dict(job.params or {})
    cells = [list(c) for c in params.get("cells") or []]
    missing = tombstoned.keys() - {tuple(c) for c in new_base or []}
    params["cells"] = cells + [list(c) for c in sorted(missing) if list(c) not in cells]
    # the requests whose erasures it now catches up on (through another model on the dataset,
    # say): its version names them, so their certificates list this model (as claim_next does)
    owners = {tombstoned[c] for c in missing} - {None}
    known = set(session.execute(select(DeletionRequest.id).where(DeletionRequest.id.in_(sorted(owners)))).scalars())
    request_ids = list(params.get("request_ids") or [])
    params["request_ids"] = request_ids + sorted(known - set(request_ids))
    params["rebases"] = int(params.get("rebases", 0)) + 1  # not the job's fault: not an attempt that counts
    params.pop("target_version", None)  # the rebased run computes a new version
    job.params = params
    job.base_version = serving
    log.warning("job %s: %s; rebased on v%s", job.id, unsafe, serving)


def _put_back(session: Session, job: Job, event: str, **details) -> None:
    """Put a running job back in the queue with its running requests, and announce it."""
    requests = list(session.execute(
        select(DeletionRequest).where(DeletionRequest.job_id == job.id, DeletionRequest.status == "running")
    ).scalars())
    for req in requests:
        req.status = "queued"
        req.progress = 0.0
        if details.get("to_base") is not None:
            req.base_version = details["to_base"]
    job.status = "queued"
    job.progress = 0.0
    job.heartbeat_at = utcnow()
    append_event(session, event, model_name=job.model_name,
                 payload={"job_id": job.id, "attempts": job.attempts, "request_ids": [r.id for r in requests],
                          **details})
    session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": job.model_name}, created_at=utcnow()))


def counted_attempts(job: Job) -> int:
    """The claims of ``job`` that count towards ``MAX_JOB_ATTEMPTS``: every claim but those
    its worker gave back because it was stopping (a deploy, a restart) and those whose
    artifact was rebased (another erasure published meanwhile): neither is the job's fault."""
    params = job.params or {}
    return (job.attempts or 0) - int(params.get("stops", 0)) - int(params.get("rebases", 0))


def requeue(settings: Settings, job_id: str, attempt: int, reason: str, stopped: bool = False) -> bool:
    """Put the job back in the queue if it is still running under ``attempt`` (a rerun
    publishes the artifact this attempt stored, if any). Returns whether it did.
    ``stopped``: the worker was stopping, so this attempt does not count towards
    ``MAX_JOB_ATTEMPTS`` (:func:`counted_attempts`)."""
    with transaction(settings.database_url) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
        if job.status != "running" or job.attempts != attempt:
            return False
        if stopped:
            params = dict(job.params or {})
            params["stops"] = int(params.get("stops", 0)) + 1
            job.params = params
        _put_back(session, job, "job.requeued", reason=reason)
        return True


def mark_failed(settings: Settings, job_id: str, error: str, attempt: int | None = None) -> bool:
    """Record a failed job: the job and its unfinished requests failed, with the error.
    With ``attempt``, only while the job is running under that attempt (a worker the
    sweeper gave up on does not fail the rerun that replaced it). Returns whether it did."""
    with transaction(settings.database_url) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
        if job.status == "completed":
            return False
        if attempt is not None and (job.status != "running" or job.attempts != attempt):
            log.warning("job %s: attempt %d no longer owns it (%s, attempt %d); not failing it",
                        job_id, attempt, job.status, job.attempts)
            return False
        fail_job(session, job, error, store_dir=settings.store_dir)
        return True


def fail_job(session: Session, job: Job, error: str, store_dir: str | Path | None = None) -> None:
    """Fail ``job`` and its unfinished requests in the caller's transaction, with audit events.
    The requests record the error without filesystem paths (:func:`path_free`; ``store_dir``,
    the settings' store, is named as "the model store"): a key with the ``deletions`` scope
    reads them. The job and the audit events keep it whole, for keys that read."""
    now = utcnow()
    job.status = "failed"
    job.error = error
    job.finished_at = now
    requests = list(session.execute(
        select(DeletionRequest).where(DeletionRequest.job_id == job.id,
                                      DeletionRequest.status.in_(("queued", "running")))
    ).scalars())
    append_event(session, "job.failed", model_name=job.model_name,
                 payload={"job_id": job.id, "kind": job.kind, "error": error, "attempts": job.attempts,
                          "request_ids": [r.id for r in requests]})
    shown = request_error(session, job, path_free(error, store_dir))
    for req in requests:
        req.status = "failed"
        req.error = shown
        append_event(session, "deletion.failed", model_name=job.model_name, request_id=req.id,
                     instance_id=req.instance_id, payload={"job_id": job.id, "error": error})


def request_error(session: Session, job: Job, error: str) -> str:
    """What a failed job's requests say of its ``error``: the error itself, unless the job's
    cells belong to the requests of more than one submitter (those it batched, and those
    of the erasures it caught up on, made through another model: ``params.request_ids``).
    An error is free text and may name any cell of the job (another portal's instance),
    so those requests get its kind and where to read it instead: the job, for keys that
    read. The audit events keep it whole."""
    named = list((job.params or {}).get("request_ids") or [])  # with the erasures it caught up on (claim_next)
    rows = session.execute(select(DeletionRequest.id, DeletionRequest.submitted_by).where(
        or_(DeletionRequest.job_id == job.id, DeletionRequest.id.in_([i for i in named if i])))).all()
    found = {r.id for r in rows}
    unknown = any(i not in found for i in named)
    if len({r.submitted_by for r in rows}) <= 1 and not unknown:
        return error
    kind = error.split(":", 1)[0] if ":" in error and " " not in error.split(":", 1)[0] else "error"
    return (f"job {job.id} failed ({kind}). It batched other submitters' requests too, so its error "
            f"is on the job (GET /jobs/{job.id}) and in the audit log, for keys that read.")


# A path as errors name them: absolute (not the "/" of "a/b" or "1/2"), up to a space or
# quote, without trailing punctuation; and file: URIs (the record's artifact_uri)
_FILE_URI = re.compile(r"file:[^\s'\"]*[^\s'\".,;:)\]]")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"]*[^\s'\".,;:)\]]")
# a relative path to a file (an npy dataset's ``data/nyu/train/image/001.npy``): folders, then a
# name with an extension of the files the service reads or writes; not "1/2", "depth/normal"
# nor "seg/depth.mean" (each character has one place in a match: linear time)
_FILE_EXTENSIONS = "npy|npz|json|safetensors|png|jpe?g|tiff?|pt|pth|bin|h5|csv|txt|lock|log|pem|db|sqlite3?"
_RELATIVE_FILE = re.compile(rf"(?<![\w.~/:-])(?:[\w.-]+/)+[\w.-]*\.(?:{_FILE_EXTENSIONS})(?![\w/.-])",
                            re.IGNORECASE)  # IMG_01.PNG too


def path_free(error: str, store_dir: str | Path | None = None) -> str:
    """``error`` with every filesystem path taken out: the store's folder (``store_dir``, as
    configured, absolute or resolved: a relative one too) is "the model store", a path in it
    "a file in the model store", any other absolute path, relative path to a file (folders, then a
    name with a file extension the service reads or writes) or ``file:`` URI "a path on the worker".
    What a deletion request records of a job's failure (:func:`fail_job`): the store's errors
    name its folder and files, and the ``deletions`` scope learns nothing of the worker's disk."""
    if store_dir is not None:
        given = Path(store_dir)
        roots = {str(given.absolute()), str(given.resolve())} | ({str(store_dir)} if "/" in str(store_dir) else set())
        for root in sorted({r.rstrip("/") for r in roots if r.rstrip("/")}, key=len, reverse=True):
            forms = [re.escape(root)] + ([re.escape(Path(root).as_uri())] if Path(root).is_absolute() else [])
            # the root, alone or with a path under it, as a whole word: not "var/models" in "avar/models2"
            pattern = rf"""(?<![\w.~/:-])(?:{'|'.join(forms)})(/[^\s'"]*[^\s'".,;:)\]])?(?![\w.~-])"""
            error = re.sub(pattern, lambda m: "a file in the model store" if m.group(1) else "the model store", error)
    error = _FILE_URI.sub("a path on the worker", error)
    error = _ABSOLUTE_PATH.sub("a path on the worker", error)
    return _RELATIVE_FILE.sub("a path on the worker", error)


# --------------------------------------------------------------------------- entry point


def process_model(settings: Settings, store: ModelStore, model_name: str,
                  stop: threading.Event | None = None) -> JobOutcome:
    """Run the next job of ``model_name`` if there is one and no other is active.

    Returns ``busy`` when the model is held, with the claim's ``reason`` (and, for
    ``running``, the running job's id): the caller retries a ``locked`` one later, and
    leaves a ``running`` one to that job's end (:class:`Claim`). ``idle`` when nothing
    is queued, else the job's outcome. Idempotent:
    a duplicate delivery finds nothing queued, or the same job's version.
    ``stop``: see :func:`run_job`.
    """
    try:
        claim = claim_next(settings, model_name)
    except JobFailed as exc:
        return JobOutcome("failed", model_name, error=str(exc))
    if claim.status != "claimed":
        return JobOutcome(claim.status, model_name, job_id=claim.job_id, reason=claim.reason)
    return run_job(settings, store, claim.job_id, claim.attempt, stop=stop)


@dataclass
class Drain:
    """What :func:`drain_until_idle` did: the ``jobs`` it ran (their outcomes) and how it
    ended: ``end`` is the closing ``idle`` or ``busy`` claim's outcome, or ``None`` when it
    stopped with the model's work maybe not done (``stop`` set, ``max_jobs`` reached, a
    claim that failed by itself)."""

    jobs: list[JobOutcome]
    end: JobOutcome | None


def drain_until_idle(settings: Settings, store: ModelStore, model_name: str, max_jobs: int = 100,
                     stop: threading.Event | None = None) -> Drain:
    """Run jobs of ``model_name`` until it is idle or busy (what one delivery does: requests
    that arrived while a job ran are picked up without waiting for another message), or
    until ``stop`` is set (the job under way is put back in the queue: :func:`run_job`)."""
    ran: list[JobOutcome] = []
    for _ in range(max_jobs):
        if stop is not None and stop.is_set():
            break
        outcome = process_model(settings, store, model_name, stop=stop)
        if outcome.status in ("idle", "busy"):
            return Drain(ran, outcome)
        ran.append(outcome)
        if outcome.status == "failed" and outcome.job_id is None:
            break  # the claim itself failed (no serving version): claiming again fails the same way
    return Drain(ran, None)


def drain_model(settings: Settings, store: ModelStore, model_name: str, max_jobs: int = 100,
                stop: threading.Event | None = None) -> list[JobOutcome]:
    """:func:`drain_until_idle`'s outcomes: the jobs it ran, or the closing ``idle`` or
    ``busy`` outcome alone when it ran none."""
    drain = drain_until_idle(settings, store, model_name, max_jobs, stop)
    return drain.jobs or ([drain.end] if drain.end is not None else [])


def announce_by_outbox(settings: Settings, model_name: str) -> None:
    """Queue an announcement of ``model_name`` in the outbox (one transaction): the relay of
    whichever process runs next publishes it. For a runner that stops with the model's work
    maybe not done and cannot announce it in memory."""
    with transaction(settings.database_url) as session:
        session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": model_name}, created_at=utcnow()))
