"""The rules of a deletion request: what may be submitted, what a replay returns,
when a certificate may be issued. Plain functions on a Session, called inside
the caller's transaction; refusals are :mod:`worker.errors` exceptions and
leave nothing written."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Literal, Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from unlearning.data import dataset_key
from unlearning.jsonio import finite_json

from .audit import append_event, commit_ordered_now
from .db import advisory_lock
from .datasets import erased_cells, get_splits
from .errors import Conflict, DatasetUnavailable, Invalid, NotFound
from .settings import Settings
from .tables import (AuditEvent, DeletionRequest, Job, Model, ModelVersion, OutboxMessage, Tombstone, iso_utc,
                     new_id, utcnow)

log = logging.getLogger(__name__)

#: statuses of a request the worker has yet to finish; its cells are "pending"
PENDING_STATUSES = ("queued", "running")
#: the outbox topic that asks a worker to process a model's queued work
PROCESS_MODEL_TOPIC = "process_model"
#: the audit event a worker writes when an erasure made through another model on the same
#: dataset reaches a model (the certificate lists them)
PROPAGATED_EVENT = "deletion.propagated"
#: the audit event written when a request is accepted (the certificate's request facts agree with it)
RECEIVED_EVENT = "deletion.received"
#: the audit event a worker writes when a request completes (the certificate points at it, and
#: its erasure facts agree with it)
COMPLETED_EVENT = "deletion.completed"


@dataclass
class Submission:
    """The stored request and whether this call replayed an earlier one (same Idempotency-Key)."""

    request: DeletionRequest
    replayed: bool


def request_fingerprint(model: str, instance_id: str, tasks: Sequence[str] | str, reason, subject_ref) -> str:
    """sha256 of the request as submitted (defaults applied, task list sorted): what an Idempotency-Key binds."""
    body = {
        "model": model,
        "instance_id": instance_id,
        "tasks": tasks if isinstance(tasks, str) else sorted(set(tasks)),
        "reason": reason,
        "subject_ref": subject_ref,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def get_model(session: Session, name: str) -> Model:
    model = session.get(Model, name)
    if model is None:
        known = session.execute(select(Model.name).order_by(Model.name)).scalars().all()
        raise NotFound(f"no model named {name!r}", model=name, known_models=known)
    return model


def pending_cells(session: Session, model_name: str, instance_id: str) -> dict[tuple[str, str], str]:
    """Cells of ``instance_id`` named by unfinished requests on ``model_name`` -> the request id."""
    rows = session.execute(
        select(DeletionRequest.id, DeletionRequest.tasks).where(
            DeletionRequest.model_name == model_name,
            DeletionRequest.instance_id == instance_id,
            DeletionRequest.status.in_(PENDING_STATUSES),
        )
    )
    return {(instance_id, task): rid for rid, tasks in rows for task in tasks}


def _lock_model_submissions(session: Session, model_name: str) -> None:
    """Serialise submissions per model so two racing requests cannot both claim a cell.
    An advisory lock, not a row lock on ``models``: workers may hold that one for long."""
    advisory_lock(session, f"unlearnd-submit:{model_name}")


def resolve_cells(
    session: Session, model: Model, instance_id: str, tasks: Sequence[str] | Literal["all"],
    visible_to: str | None = None,
) -> list[tuple[str, str]]:
    """Validate a request against the model's dataset and the record; the cells it will erase.

    An explicit task list must name tasks of the model (422), an instance of its
    training data (422), and cells neither erased (tombstoned) nor pending in an
    unfinished request (409 naming them). ``"all"`` means every cell of the
    instance not yet erased or pending, so a full erasure after a partial one
    is accepted; it is refused (409) only when nothing is left. A cell erased
    through another model on the dataset that this model still holds is refused
    while its propagate job is due (``"propagating": true``), and counts as not
    erased once that job has failed with nothing under way
    (:func:`worker.versions.stalled_propagation`): the request's job is its next try. With
    ``visible_to`` (an API key that sees its own requests only) the 409 names
    the requests of other submitters as such, without their ids.
    """
    try:
        train, _ = get_splits(model.dataset)
    except (OSError, ValueError) as exc:  # what unlearning.data raises for a missing or unreadable dataset
        # the cause names server paths: it goes to the log, the client learns which model
        log.error("the dataset of model %r cannot be loaded: %s", model.name, exc)
        raise DatasetUnavailable(f"the dataset of model {model.name!r} cannot be loaded on this host (the server "
                                 "log says why); nothing was stored", model=model.name) from exc
    model_tasks = [t for t in model.tasks if t in train.tasks]
    if tasks != "all":
        unknown = [t for t in tasks if t not in model_tasks]
        if unknown:
            every = any(t.lower() == "all" for t in unknown)  # ["all"]: the word is not a task
            raise Invalid(
                f"unknown task(s) {unknown} for model {model.name!r}; its tasks are {model_tasks}"
                + ('; for every task send "all" as a string, not in a list' if every else ""),
                unknown_tasks=unknown,
                tasks=model_tasks,
            )
    try:
        train.index_of(instance_id)
    except KeyError:
        raise Invalid(
            f"instance {instance_id!r} is not in the training data of model {model.name!r}",
            instance_id=instance_id,
            model=model.name,
        ) from None

    wanted = [(instance_id, t) for t in (model_tasks if tasks == "all" else tasks)]
    # Pending first, then erased: each read sees what was committed when it ran (READ
    # COMMITTED), and a job's publish turns a pending cell into an erased one in one commit
    # without the submission lock. Read the other way round, a publish landing between the
    # two reads hid the cell from both (not yet erased, no longer pending) and a request
    # for a cell just erased was accepted (202), to be rejected by the worker later.
    pending = pending_cells(session, model.name, instance_id)
    erased = erased_cells(session, model.dataset, instance_id)
    held: set[tuple[str, str]] = set()
    if any(c in erased for c in wanted):
        # erased through another model on the same dataset, and this model's serving version
        # still holds them: its propagate job is due, or it failed (and is tried again only
        # after a wait, versions.propagation_retry_at), and then a request for them is accepted:
        # its job is the propagation's next try (worker.jobs claims it with them, and no timed
        # retry runs while it waits), where a 409 would promise a job that may not run for hours
        from .versions import erasure_cells, erasures_behind, stalled_propagation

        held = set(map(tuple, erasure_cells(erasures_behind(session, model, instance_id))))
        if held and stalled_propagation(session, model) is not None:
            erased = {c: rid for c, rid in erased.items() if c not in held}
    if tasks == "all":
        cells = [c for c in wanted if c not in erased and c not in pending]
        if cells:
            return cells
    else:
        cells = wanted
        if not any(c in erased or c in pending for c in wanted):
            return cells
    clash = [  # pending first: a cell erased elsewhere that a request of this model is erasing here
        # (its propagation stalled, above) is that request's, not a propagate job's
        {"instance_id": iid, "task": t, "state": "pending", "request_id": pending[(iid, t)]}
        if (iid, t) in pending
        else {"instance_id": iid, "task": t, "state": "erased", "request_id": erased[(iid, t)]}
        for iid, t in wanted
        if (iid, t) in erased or (iid, t) in pending
    ]
    for c in clash:
        if c["state"] == "erased":  # still held here: this model's propagate job is due (not stalled, above)
            c["propagating"] = (c["instance_id"], c["task"]) in held
    if visible_to is not None:
        ids = {c["request_id"] for c in clash}
        own = set(session.execute(select(DeletionRequest.id).where(
            DeletionRequest.id.in_(ids), DeletionRequest.submitted_by == visible_to)).scalars())
        for c in clash:
            if c["request_id"] not in own:
                c["request_id"] = None  # another submitter's: its id would open nothing, but says who asked
    named = ", ".join(f"{c['task']} ({c['state']} by "
                      f"{'request ' + c['request_id'] if c['request_id'] else 'a request of another submitter'}"
                      f"{'; this model still holds it until its propagate job has run' if c.get('propagating') else ''})"
                      for c in clash)
    raise Conflict(f"instance {instance_id!r}: cells already erased or pending: {named}", cells=clash)


def submit_deletion(
    session: Session,
    settings: Settings,
    *,
    instance_id: str,
    tasks: Sequence[str] | Literal["all"] = "all",
    model: str | None = None,
    reason: str | None = None,
    subject_ref: str | None = None,
    idempotency_key: str | None = None,
    actor: str | None = None,
    visible_to: str | None = None,
) -> Submission:
    """Accept a deletion request: validate it, then write the request (``queued``),
    its ``deletion.received`` audit event and a ``process_model`` outbox row in the
    caller's transaction. Nothing is enqueued here: the relay publishes the outbox
    row after commit.

    ``actor`` (the API key's name, when the API has keys) is the request's
    ``submitted_by`` and is written into the audit event. ``visible_to``: see
    :func:`resolve_cells` (the submitter whose requests a 409 may name; None: all).

    With an ``idempotency_key`` this submitter already used for the same body, the stored request
    is returned (``replayed=True``) without any check or write; used for a
    different body, :class:`Invalid` (422).
    """
    model_name = model or settings.model_name
    if tasks != "all":
        tasks = list(dict.fromkeys(tasks))  # drop repeats, keep order
        if not tasks:
            raise Invalid('tasks must name at least one task, or be "all"', tasks=tasks)
    fingerprint = request_fingerprint(model_name, instance_id, tasks, reason, subject_ref)

    if idempotency_key is not None:
        earlier = _by_idempotency_key(session, idempotency_key, fingerprint, actor)
        if earlier is not None:
            return Submission(earlier, replayed=True)

    model_row = get_model(session, model_name)
    _lock_model_submissions(session, model_name)
    if idempotency_key is not None:  # a twin may have committed while we waited for the lock
        earlier = _by_idempotency_key(session, idempotency_key, fingerprint, actor)
        if earlier is not None:
            return Submission(earlier, replayed=True)
    cells = resolve_cells(session, model_row, instance_id, tasks, visible_to)

    request = DeletionRequest(
        id=new_id(),
        model_name=model_name,
        instance_id=instance_id,
        tasks=[t for _, t in cells],
        reason=reason,
        subject_ref=subject_ref,
        status="queued",
        progress=0.0,
        idempotency_key=idempotency_key,
        submitted_by=actor or "",
        request_hash=fingerprint,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    try:
        with session.begin_nested():  # a racing twin with the same key loses here, not at commit
            session.add(request)
            session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        earlier = _by_idempotency_key(session, idempotency_key, fingerprint, actor)
        if earlier is None:
            raise
        return Submission(earlier, replayed=True)
    # Stamped under the audit log's lock, after the row's insert (its key-share lock on the model
    # row comes first, as in every writer): requests of any model then get created_at in commit
    # order, so a client paging /deletions newest first never passes one that commits late.
    request.created_at = request.updated_at = commit_ordered_now(session)
    # The audit log is append-only and cannot be erased: the free-text reason stays out of it.
    append_event(
        session,
        RECEIVED_EVENT,
        model_name=model_name,
        request_id=request.id,
        instance_id=instance_id,
        payload={"tasks": request.tasks, "requested_tasks": tasks, "subject_ref": subject_ref,
                 **({"actor": actor} if actor else {})},
    )
    session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": model_name}, created_at=utcnow()))
    session.flush()
    return Submission(request, replayed=False)


def _by_idempotency_key(session: Session, key: str, fingerprint: str, actor: str | None) -> DeletionRequest | None:
    """The request this submitter sent with ``key`` (keys are unique per API key, not across callers)."""
    earlier = session.execute(
        select(DeletionRequest).where(DeletionRequest.submitted_by == (actor or ""),
                                      DeletionRequest.idempotency_key == key)
    ).scalar_one_or_none()
    if earlier is not None and earlier.request_hash != fingerprint:
        raise Invalid(
            "this Idempotency-Key was already used with a different request body",
            idempotency_key=key,
            request_id=earlier.id,
        )
    return earlier


def request_metrics(metrics: dict | None, cells: list) -> dict | None:
    """A request's share of its job's metrics, which may batch the requests of several
    submitters: what names the job's cells or tasks is narrowed to the request's own
    ``cells``: ``forget_cells``, ``forget_tasks``, ``mia_tasks`` and ``forget_loss`` keep its tasks;
    ``per_task.forgotten`` (the forgotten instances' kept cells, task-level interference)
    keeps the other tasks, those its instance may keep; and ``mode`` is the request's
    (full when it names every task of the model). The numbers themselves (UIS, MIA AUC,
    a task's metrics on the forgotten instances' kept cells) stay the job's, over every
    cell it erased."""
    if not isinstance(metrics, dict) or "forget_cells" not in metrics:
        return metrics
    own = {tuple(c) for c in cells}
    tasks = {t for _, t in own}
    out = {**metrics, "forget_cells": [c for c in metrics["forget_cells"] if tuple(c) in own]}
    for key in ("forget_tasks", "mia_tasks"):  # mia_tasks: the forgotten tasks the attack compared
        if isinstance(out.get(key), list):
            out[key] = [t for t in out[key] if t in tasks]
    per_task = out.get("per_task")
    if isinstance(per_task, dict) and isinstance(per_task.get("forgotten"), dict):
        out["per_task"] = {**per_task, "forgotten": {t: m for t, m in per_task["forgotten"].items()
                                                     if t not in tasks}}
    if isinstance(out.get("forget_loss"), dict):
        out["forget_loss"] = {name: {t: v for t, v in losses.items() if t in tasks} if isinstance(losses, dict)
                              else losses for name, losses in out["forget_loss"].items()}
    every_task = per_task.get("test") if isinstance(per_task, dict) else None
    if "mode" in out and isinstance(every_task, dict) and every_task:
        out["mode"] = "full" if set(every_task) <= tasks else "partial"
    return out


def get_request(session: Session, request_id: str, submitted_by: str | None = None) -> DeletionRequest:
    """The request ``request_id``; :class:`NotFound` when there is none, or (with
    ``submitted_by``) when another submitter made it: the same answer, so a caller
    learns nothing of requests that are not its own."""
    request = session.get(DeletionRequest, request_id)
    if request is None or (submitted_by is not None and request.submitted_by != submitted_by):
        raise NotFound(f"no deletion request {request_id!r}", request_id=request_id)
    return request


def deletion_certificate(session: Session, request_id: str, submitted_by: str | None = None, store=None) -> dict:
    """The certificate of a completed request: what was removed from which model, how,
    the versions before and after, the forgetting/interference metrics, and where
    the audit chain records it; the other models trained on the same dataset that the
    erasure has reached (``also_erased_from``) and those it has yet to
    (``propagation_pending``). Includes ``certificate_sha256``: the sha256 of the
    canonical JSON (sorted keys, no spaces) of every other field. 409 before completion;
    ``submitted_by``: as :func:`get_request`. What it states of the request and its erasure
    comes from the request's ``deletion.received`` and ``deletion.completed`` events, its times
    too (:func:`_audited_facts`): 409 as well, nothing issued, where either event is missing or
    a row disagrees with them (changed outside the service: the signing key is not the
    database's, and its rows alone must not be able to have a false erasure signed). ``held_by_stored_versions``: the stored
    weights, per model on the dataset, that still hold what was erased
    (:func:`stored_versions_holding`; ``store`` adds the artifacts no version points at)."""
    request = get_request(session, request_id, submitted_by)
    if request.status != "completed":
        raise Conflict(
            f"request {request_id!r} is {request.status}; a certificate is issued only once it is completed",
            request_id=request_id,
            request_status=request.status,
        )
    received, completion = _request_events(session, request)
    job = session.get(Job, request.job_id) if request.job_id else None
    version = None
    if request.produced_version is not None:
        version = session.execute(  # not its lineage of cells: megabytes late in a long history
            select(ModelVersion).options(defer(ModelVersion.erased_cells, raiseload=True)).where(
                ModelVersion.model_name == request.model_name, ModelVersion.version == request.produced_version
            )
        ).scalar_one_or_none()
    metrics = request.metrics or (job.metrics if job else None) or (version.metrics if version else None) or {}
    facts = _audited_facts(request, job, version, metrics, received, completion)

    head = session.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one_or_none()
    model = session.get(Model, request.model_name)
    cells = {(request.instance_id, t) for t in request.tasks}
    # The erasure reached the other models trained on the dataset: propagated there (worker.jobs:
    # propagate), for this request or for the one whose tombstone recorded a cell first, or
    # erased there by another model's own request for the same cells (two portals, one person)
    also = {request.id} | _requests_erasing(session, model, request, cells)
    # one entry per version that erased the cells: the other model's own request for them and this
    # request's propagation can complete in one job there (worker.jobs._claim), and this request's
    # own event is the one named
    reached: dict[tuple, tuple[bool, dict]] = {}
    job_cells: dict[str, set | None] = {}

    def erased_by(job_id) -> set | None:  # the cells a job erased (None: not recorded)
        if job_id not in job_cells:
            other = session.get(Job, job_id) if isinstance(job_id, str) else None
            job_cells[job_id] = None if other is None else {tuple(c) for c in (other.params or {}).get("cells") or []}
        return job_cells[job_id]

    for e in session.execute(
        select(AuditEvent).where(AuditEvent.request_id.in_(sorted(also)), AuditEvent.kind.in_(
            (PROPAGATED_EVENT, COMPLETED_EVENT))).order_by(AuditEvent.seq)
    ).scalars():
        if not (e.kind == PROPAGATED_EVENT and (e.request_id == request.id or e.model_name != request.model_name)
                or e.kind == COMPLETED_EVENT and e.model_name != request.model_name):
            continue
        if e.kind == COMPLETED_EVENT:
            # another model's own request for some of the cells: its version erased them only if its
            # job did (the others were erased there before, by a version listed already)
            erased = erased_by((e.payload or {}).get("job_id"))
            if erased is not None and not erased & cells:
                continue
        entry = {"model": e.model_name, "version": (e.payload or {}).get("version"),
                 "version_sha256": (e.payload or {}).get("sha256"),
                 "event": {"seq": e.seq, "kind": e.kind, "hash": e.hash}}
        key, own = (e.model_name, entry["version"], entry["version_sha256"]), e.request_id == request.id
        if key not in reached or (own and not reached[key][0]):
            reached[key] = (own, entry)
    propagated = sorted((entry for _, entry in reached.values()), key=lambda x: x["event"]["seq"])
    pending = []
    if model is not None:
        from .versions import erasure_cells, erasures_behind, models_sharing_dataset

        pending = [other.name for other in models_sharing_dataset(session, model.name, dataset_key(model.dataset))
                   if cells & {tuple(c) for c in erasure_cells(erasures_behind(session, other))}]

    body = {
        "request_id": request.id,
        "subject_ref": facts["subject_ref"],
        "model": facts["model"],
        "dataset_key": dataset_key(model.dataset) if model else None,
        "removed": {
            "instance_id": facts["instance_id"],
            "tasks": facts["tasks"],
            "cells": facts["cells"],
        },
        "method": facts["method"],
        "job_id": facts["job_id"],
        "version_before": facts["version_before"],
        "version_after": facts["version_after"],
        "version_after_sha256": facts["version_after_sha256"],
        **{name: finite_json(facts["metrics"].get(name)) for name in CERTIFIED_METRICS},
        "received_at": iso_utc(received.at),
        "completed_at": iso_utc(completion.at),
        "audit": {
            "completion_event": {"seq": completion.seq, "kind": completion.kind, "hash": completion.hash},
            "chain_head": {"seq": head.seq, "hash": head.hash} if head else None,
        },
        "also_erased_from": propagated,
        "propagation_pending": pending,
        "held_by_stored_versions": stored_versions_holding(session, model, request, store) if model else {},
        "issued_at": iso_utc(utcnow()),
    }
    body["certificate_sha256"] = certificate_hash(body)
    return body


def _request_events(session: Session, request: DeletionRequest) -> tuple[AuditEvent, AuditEvent]:
    """The ``deletion.received`` and ``deletion.completed`` events of ``request`` (the first of
    each: the service writes one of each). :class:`Conflict` when either is missing: its row
    says completed, but the record cannot prove that it was asked or that it completed (a row
    written or changed outside the service; a certificate is not issued on a row's word)."""
    first = {}
    for event in session.execute(select(AuditEvent).where(
            AuditEvent.request_id == request.id, AuditEvent.kind.in_((RECEIVED_EVENT, COMPLETED_EVENT)))
            .order_by(AuditEvent.seq)).scalars():
        first.setdefault(event.kind, event)
    missing = [kind for kind in (RECEIVED_EVENT, COMPLETED_EVENT) if kind not in first]
    if missing:
        log.warning("request %s is completed in its row, but its audit log has no %s event: no certificate",
                    request.id, " or ".join(missing))
        raise Conflict(
            f"request {request.id!r} is completed in its row, but its audit log records no "
            f"{' or '.join(missing)} event: the record cannot show that it completed, and no certificate is "
            "issued (its row was written or changed outside the service)",
            request_id=request.id, request_status=request.status, audit_state="not_recorded",
            missing_events=missing,
        )
    return first[RECEIVED_EVENT], first[COMPLETED_EVENT]


#: the metrics a certificate states (each request's share of its job's: request_metrics keeps them)
CERTIFIED_METRICS = ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original")
_ROW_LACKS = object()  # no row holds the fact (the job or the version is not recorded)


def _audited_facts(request: DeletionRequest, job: Job | None, version: ModelVersion | None, metrics: dict,
                   received: AuditEvent, completion: AuditEvent) -> dict:
    """What a certificate states of ``request``, taken from its audit events (hash-chained,
    append-only) where they hold it, else from its rows (``job``, ``version``; ``metrics``,
    the rows' metrics): ``model``, ``subject_ref``, ``instance_id``, ``tasks``, ``cells``,
    ``job_id``, ``method``, ``version_before``, ``version_after``, ``version_after_sha256``
    and ``metrics``. Where a row holds a fact an event holds too, the two must agree, else
    :class:`Conflict` naming the facts: a row changed outside the service (a status, an
    instance, a version's sha256) would otherwise be certified, and signed, while the chain
    still verifies. Events written by every version of the service hold these facts; one
    that lacks a field (a record written by hand) leaves the row's value standing."""
    cells = [[request.instance_id, t] for t in request.tasks]
    wrong: dict[str, AuditEvent] = {}

    def fact(name: str, row, event: AuditEvent, key: str | None = None, column: str | None = None):
        """The event's value (its ``column``, or ``key`` of its payload) where it holds one, else the row's."""
        payload = event.payload if isinstance(event.payload, dict) else {}
        if column is None and key not in payload:
            return None if row is _ROW_LACKS else row
        value = getattr(event, column) if column else payload[key]
        if row is not _ROW_LACKS and row != value:
            wrong.setdefault(name, event)
        return value

    done = completion.payload if isinstance(completion.payload, dict) else {}
    facts = {
        "model": fact("model", request.model_name, received, column="model_name"),
        "subject_ref": fact("subject_ref", request.subject_ref, received, "subject_ref"),
        "instance_id": fact("instance_id", request.instance_id, received, column="instance_id"),
        "tasks": fact("tasks", list(request.tasks), received, "tasks"),
        "cells": fact("cells", cells, completion, "cells"),
        "job_id": fact("job_id", request.job_id, completion, "job_id"),
        "method": fact("method", job.method if job else _ROW_LACKS, completion, "method"),
        "version_before": fact("version_before", request.base_version if request.base_version is not None
                               else (job.base_version if job else None), completion, "base_version"),
        "version_after": fact("version_after", request.produced_version, completion, "version"),
        "version_after_sha256": fact("version_after_sha256", version.sha256 if version else _ROW_LACKS,
                                     completion, "sha256"),
    }
    # the completion event names the model and the instance again (one of them changed since the request
    # was received would show here only)
    fact("model", request.model_name, completion, column="model_name")
    fact("instance_id", request.instance_id, completion, column="instance_id")
    if facts["method"] is None:
        facts["method"] = metrics.get("method")
    # the event holds the job's metrics, the request's row its share (request_metrics): the
    # certified numbers are the same in both; NaN (SQLite only) is compared as the null it is served as
    if isinstance(done.get("metrics"), dict):
        facts["metrics"] = done["metrics"]
        for name in CERTIFIED_METRICS:
            if finite_json(metrics.get(name)) != finite_json(done["metrics"].get(name)):
                wrong.setdefault(name, completion)
    else:
        facts["metrics"] = metrics
    if wrong:
        events = sorted({e.seq: e for e in wrong.values()}.values(), key=lambda e: e.seq)
        log.warning("request %s: its rows disagree with its audit log on %s (events %s): no certificate",
                    request.id, ", ".join(wrong), ", ".join(str(e.seq) for e in events))
        raise Conflict(
            f"the record's rows of request {request.id!r} disagree with its audit log on "
            f"{', '.join(wrong)} (audit event{'s' if len(events) > 1 else ''} "
            f"{', '.join(str(e.seq) for e in events)}): they were changed outside the service, and no "
            "certificate is issued; the service's operators are told (its log), and a key with the read scope "
            "sees what the audit log records (GET /audit/events?request_id=)",
            request_id=request.id, request_status=request.status, audit_state="rows_disagree",
            disagreeing=list(wrong),
            audit_events=[{"seq": e.seq, "kind": e.kind, "hash": e.hash} for e in events],
        )
    return facts


def stored_versions_holding(session: Session, model: Model, request: DeletionRequest, store=None) -> dict:
    """``{model: [versions]}`` for the request's model and every other model trained on its
    dataset: the versions whose weights are still stored (not purged) and still hold a
    cell the request erased (the versions before the erasure, until ``unlearnd purge``;
    another model's serving version until its propagate job has run). With ``store``,
    also the artifacts no version points at (a job stored them, then did not publish).

    The cells are the request's, whichever request's tombstone recorded them (two models'
    requests for one cell: the first published writes it). A version's watermark (the
    dataset's highest tombstone id when it was published, migration 0005) answers without
    reading its lineage: publish refuses a version that misses a tombstoned cell, and every
    cell of a lineage was tombstoned when it entered it, so a version holds one of the
    cells exactly when its watermark is below their last tombstone. Versions without a
    watermark (a first version, or published before 0005) are compared cell by cell."""
    from .versions import as_cell, models_sharing_dataset, unpublished_artifacts

    key = dataset_key(model.dataset)
    cells = {(request.instance_id, t) for t in request.tasks}
    last = session.execute(select(func.max(Tombstone.id)).where(
        Tombstone.dataset_key == key, Tombstone.instance_id == request.instance_id,
        Tombstone.task.in_(list(request.tasks)))).scalar()
    if last is None:
        return {}
    out = {}
    for m in [model, *models_sharing_dataset(session, model.name, key)]:
        stored = (ModelVersion.model_name == m.name, ModelVersion.purged_at.is_(None))
        held = list(session.execute(select(ModelVersion.version).where(
            *stored, ModelVersion.tombstone_watermark < last)).scalars())
        held += [v for v, erased in session.execute(select(ModelVersion.version, ModelVersion.erased_cells).where(
            *stored, ModelVersion.tombstone_watermark.is_(None))) if not cells <= {as_cell(c) for c in erased or []}]
        if store is not None:
            for number in unpublished_artifacts(session, store, m.name, clean=False):
                if store.exists(m.name, number) and not cells <= _artifact_erased(store, m.name, number):
                    held.append(number)
        out[m.name] = sorted(held)
    return out


def _requests_erasing(session: Session, model: Model | None, request: DeletionRequest, cells: set) -> set[str]:
    """The other requests that erase any of ``cells`` of ``request`` (its own instance's) on a
    model trained on the same dataset: the one whose tombstone recorded a cell first, and the
    completed requests of other models for the same cells."""
    if model is None:
        return set()
    from .versions import models_sharing_dataset

    out = {rid for cell, rid in erased_cells(session, model.dataset, request.instance_id).items() if cell in cells}
    others = session.execute(select(DeletionRequest.id, DeletionRequest.tasks, DeletionRequest.model_name).where(
        DeletionRequest.instance_id == request.instance_id, DeletionRequest.status == "completed",
        DeletionRequest.model_name != request.model_name)).all()
    if others:
        same_data = {m.name for m in models_sharing_dataset(session, model.name, dataset_key(model.dataset))}
        out |= {rid for rid, tasks, name in others if name in same_data and cells & {(request.instance_id, t)
                                                                                      for t in tasks or []}}
    return out - {request.id, None}


def _artifact_erased(store, model_name: str, version: int) -> set:
    """The cells an unpublished artifact's manifest says it has erased; none when the manifest
    cannot be read (it may hold anything, until ``unlearnd purge`` deletes it)."""
    from model_store import StoreError

    from .versions import as_cell  # (versions imports this module)

    try:
        return {as_cell(c) for c in store.manifest(model_name, version).erased_cells}
    except (StoreError, OSError):  # OSError: a manifest the service may not read (permissions) was a 500
        return set()


def canonical_json(fields: dict) -> bytes:
    """The canonical JSON of certificate fields (sorted keys, separators ``,`` and ``:``, ASCII:
    every non-ASCII character escaped; numbers as Python's ``repr``, ``2.0``, ``1e-05``).
    Strict JSON (no NaN): what is hashed or signed is what a client receives and can check again."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False).encode()


def certificate_hash(body: dict) -> str:
    """sha256 of a certificate's canonical JSON, without its own ``certificate_sha256`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in body.items() if k != "certificate_sha256"})).hexdigest()


