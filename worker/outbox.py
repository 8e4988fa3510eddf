"""The outbox relay and the sweeper: how work reaches a worker, at least once.

The API writes an outbox row in the same transaction as the request it
announces; :func:`relay_once` publishes rows after that commit and marks them
published only once the publish went through (a crash in between publishes
again: jobs are idempotent). :func:`sweep_once` re-announces work that went
quiet: requests queued for too long, jobs whose worker stopped heartbeating.

``publish(topic, payload)`` is whatever delivers a message: a Celery
``send_task`` or the in-process worker's queue (``worker.background``).
"""
from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from typing import Callable

from sqlalchemy import delete, or_, select

from .audit import append_event
from .db import read_only_transaction, transaction
from .jobs import propagation_due
from .runner import GONE_REASON
from .runner import is_gone as runner_gone
from .settings import Settings
from .tables import DeletionRequest, Job, Model, OutboxMessage, utcnow

log = logging.getLogger(__name__)

Publish = Callable[[str, dict], None]

PROCESS_MODEL_TOPIC = "process_model"


def relay_once(settings: Settings, publish: Publish, batch: int = 100) -> int:
    """Publish up to ``batch`` unpublished outbox rows; returns how many were published.

    PostgreSQL: rows are locked ``FOR UPDATE SKIP LOCKED`` so relays in several processes
    share the work without publishing a row twice at the same time. SQLite has no row
    locks, and a write transaction there takes the whole database's write lock: the rows
    are read in a reading transaction, published outside any, and marked in a short write
    transaction after. A broker that accepts connections but never answers used to hold
    the write lock for its socket timeout (~10 s), and every submission waited for it.
    Two relays on one SQLite record may then publish a row twice (delivery is at least
    once: an announcement runs a claim, which finds the work or nothing). Identical
    messages in one batch (many requests for one model) are published once.
    """
    if settings.database_url.startswith("sqlite"):
        return _relay_unlocked(settings, publish, batch)
    with transaction(settings.database_url) as session:
        rows = list(
            session.execute(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        tried, published = _publish_rows(settings.database_url, rows, publish)
        for row in rows:
            if row.id in tried:
                row.attempts = (row.attempts or 0) + 1
            if row.id in published:
                row.published_at = utcnow()
    return _relayed(settings.database_url, len(published), bool(rows))


class NotNow(Exception):
    """Raised by a publisher that takes nothing now (the in-process worker, stopping): the
    relay leaves the rows for the next pass, as in an outage, and logs none."""


def _relay_unlocked(settings: Settings, publish: Publish, batch: int) -> int:
    """:func:`relay_once` on SQLite: no transaction is open while the broker is called."""
    with read_only_transaction(settings.database_url) as session:
        rows = list(session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
                                    .order_by(OutboxMessage.id).limit(batch)).scalars())
    tried, published = _publish_rows(settings.database_url, rows, publish)
    if tried:
        with transaction(settings.database_url) as session:
            for row in session.execute(select(OutboxMessage).where(OutboxMessage.id.in_(tried))).scalars():
                row.attempts = (row.attempts or 0) + 1
                if row.id in published and row.published_at is None:  # (another relay's mark stays)
                    row.published_at = utcnow()
    return _relayed(settings.database_url, len(published), bool(rows))


def _publish_rows(record: str, rows: list, publish: Publish) -> tuple[set, set]:
    """Publish ``rows`` in order, each distinct message once; returns the ids of the rows
    tried and of those published. Stops at the first failure: the rest of the batch would
    fail the same way, each after its timeout."""
    tried, published, sent = set(), set(), set()
    for row in rows:
        key = json.dumps([row.topic, row.payload], sort_keys=True)
        tried.add(row.id)
        if key not in sent:
            try:
                publish(row.topic, dict(row.payload))
            except NotNow:  # a stopping in-process worker: the rows wait for the next start, no outage
                break
            except Exception:  # the broker is down: leave the rows for the next pass
                _broker_failed(record, row)
                break
            sent.add(key)
        published.add(row.id)
    return tried, published


def _relayed(record: str, published: int, found_rows: bool) -> int:
    if published:
        _broker_answered(record, published)
    elif not found_rows:
        # nothing to publish: another relay published the backlog once the broker answered
        # (this one never saw it answer), and its next failure is a new outage, logged as one
        _outage_over_elsewhere(record)
    return published


# When the last publish of the relay of each record (database URL) began to fail, so that an
# outage is logged when it starts (with the error) and when it ends, not at every pass of the
# relay (once a second). Per record: a relay of another record in the process (a test
# session's, say) that found nothing to publish ended this one's outage, which was logged again.
_outages: dict[str, object] = {}
_outage_lock = threading.Lock()


def _broker_failed(record: str, row) -> None:
    with _outage_lock:
        first = record not in _outages
        if first:
            _outages[record] = utcnow()
    if first:
        log.warning("outbox: publishing %s %s failed; the relay keeps the messages and retries (logged again "
                    "when the broker answers)", row.topic, row.payload, exc_info=True)
    else:
        log.debug("outbox: the broker is still unreachable")


def _end_outage(record: str):
    """When the outage the relay of ``record`` saw began (None when it saw none); it is over now."""
    with _outage_lock:
        return _outages.pop(record, None)


def _broker_answered(record: str, published: int) -> None:
    since = _end_outage(record)
    if since is not None:
        log.warning("outbox: the broker answers again after %.0f s; published %d message(s)",
                    (utcnow() - since).total_seconds(), published)


def _outage_over_elsewhere(record: str) -> None:
    since = _end_outage(record)
    if since is not None:
        log.info("outbox: no message is left to publish (another relay published them); the outage that began "
                 "%.0f s ago is taken as over", (utcnow() - since).total_seconds())


#: how long a published outbox row is kept (for a look at recent announcements) before a sweep deletes it
KEEP_PUBLISHED = timedelta(days=7)


def sweep_once(settings: Settings, publish: Publish) -> dict:
    """Re-announce stale work; returns ``{"requests": n, "jobs": n, "behind": n, "models": [...]}``.

    - requests ``queued`` (and not part of a job) untouched for ``stale_after_s``;
    - jobs ``running`` whose heartbeat is older than ``stale_after_s`` (their worker
      died), or whose runner this process sees is gone (``worker.runner``: killed on this
      machine): reset to ``queued`` with their requests, so the next claim runs them again
      (a rerun that finds its stored artifact just publishes it);
    - jobs ``queued`` untouched for ``stale_after_s`` (their message was lost);
    - models whose serving version still holds cells erased through another model on
      the same dataset, with no job under way (``worker.jobs.propagation_due``): their
      next claim runs a ``propagate`` job; after that very job failed, not again in a loop
      but once its retry is due (``worker.versions.propagation_retry_at``: the settings'
      ``propagation_retry_s``, doubled with each failure); the model's next deletion request
      is a try too (``worker.versions.stalled_propagation``).

    The announcements go through the outbox in the same transaction, then are relayed.
    Rows published more than :data:`KEEP_PUBLISHED` ago are deleted (announcements, not
    records: the audit log keeps what happened; the table grew for good).
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    models: set[str] = set()
    n_requests = n_jobs = 0
    with transaction(settings.database_url) as session:
        session.execute(delete(OutboxMessage).where(OutboxMessage.published_at < now - KEEP_PUBLISHED))
        stale_requests = list(
            session.execute(
                select(DeletionRequest)
                .where(
                    DeletionRequest.status == "queued",
                    DeletionRequest.job_id.is_(None),
                    DeletionRequest.updated_at < cutoff,
                )
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        for req in stale_requests:
            req.updated_at = now  # announced again now; the next sweep waits another period
            models.add(req.model_name)
        n_requests = len(stale_requests)

        stale_jobs = list(
            session.execute(
                select(Job)
                .where(
                    or_(
                        (Job.status == "running")
                        & or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & (Job.created_at < cutoff)),
                        (Job.status == "queued")
                        & or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & (Job.created_at < cutoff)),
                    )
                )
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        # running jobs whose runner this process can see is gone (killed), heartbeat fresh or not
        stale_ids = {job.id for job in stale_jobs}
        gone_ids = sorted(job_id for job_id, runner in session.execute(
            select(Job.id, Job.runner).where(Job.status == "running")) if job_id not in stale_ids and runner_gone(runner))
        gone_jobs = [job for job in session.execute(  # locked only now, as the stale ones: not a live runner's
            select(Job).where(Job.id.in_(gone_ids), Job.status == "running").with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)).scalars() if runner_gone(job.runner)] if gone_ids else []
        gone = {job.id for job in gone_jobs}
        stale_jobs += gone_jobs
        for job in stale_jobs:
            if job.status == "running":
                requests = list(
                    session.execute(
                        select(DeletionRequest).where(DeletionRequest.job_id == job.id,
                                                      DeletionRequest.status == "running")
                    ).scalars()
                )
                for req in requests:
                    req.status = "queued"
                    req.progress = 0.0
                append_event(
                    session,
                    "job.requeued",
                    model_name=job.model_name,
                    payload={"job_id": job.id, "last_heartbeat": job.heartbeat_at, "attempts": job.attempts,
                             "request_ids": [r.id for r in requests],
                             **({"reason": GONE_REASON} if job.id in gone else {})},
                )
                job.status = "queued"
                job.progress = 0.0
            job.heartbeat_at = now
            models.add(job.model_name)
        n_jobs = len(stale_jobs)

        # models that still serve cells erased through another model on their dataset, with
        # nothing under way to catch up (the announcement was lost, or the worker died first)
        behind = [m.name for m in session.execute(select(Model).order_by(Model.name)).scalars()
                  if m.name not in models and propagation_due(session, m, settings, now)]
        models.update(behind)

        for model_name in sorted(models):
            session.add(OutboxMessage(topic=PROCESS_MODEL_TOPIC, payload={"model_name": model_name}, created_at=now))
    if models:
        log.info("sweeper: re-enqueued %d requests and %d jobs of %s; behind their dataset's erasures: %s",
                 n_requests, n_jobs, sorted(models), behind)
    # whatever it found: its announcements, and rows the relay has not published (a relay
    # tick lost, or discarded unrun by a worker whose clock runs ahead of beat's)
    relayed = relay_once(settings, publish)
    return {"requests": n_requests, "jobs": n_jobs, "behind": len(behind), "models": sorted(models),
            "relayed": relayed}
