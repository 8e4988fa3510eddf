"""Celery tasks: thin wrappers around ``worker.jobs`` and ``worker.outbox``."""
from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

from model_store import store_for

from .celery_app import PROCESS_MODEL_TASK, RELAY_TASK, SWEEP_TASK, app, publisher
from .jobs import process_model
from .outbox import relay_once, sweep_once
from .settings import get_settings

log = logging.getLogger(__name__)

BUSY_RETRIES = 120  # up to two hours at the 60 s cap; past that the sweeper announces the work again


@app.task(
    name=PROCESS_MODEL_TASK,
    bind=True,
    autoretry_for=(OperationalError,),  # the database went away: try again later
    retry_backoff=True,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=BUSY_RETRIES,
)
def process_model_task(self, model_name: str) -> dict:
    """Run one job of ``model_name``; retried with back-off while another job holds it.

    One job a delivery: the task's time limit (``UNLEARND_JOB_TIME_LIMIT_S``) is then a
    job's. After a job the model is announced again, so requests that arrived meanwhile
    are picked up by a delivery of their own (draining every job in one delivery charged
    them all to one time limit)."""
    settings = get_settings()
    outcome = process_model(settings, store_for(settings.store_dir), model_name)
    if outcome.status == "busy":
        countdown = min(5 * 2 ** min(self.request.retries, 4), 60)
        log.info("model %s is busy; retrying in %ss", model_name, countdown)
        raise self.retry(countdown=countdown)
    if outcome.status != "idle" and not (outcome.status == "failed" and outcome.job_id is None):
        # (a claim that failed by itself, with no serving version, would fail the same way again)
        try:
            self.app.send_task(PROCESS_MODEL_TASK, args=[model_name])
        except Exception:  # noqa: BLE001 - the sweeper announces queued work again
            log.warning("model %s: could not announce the next job; the sweeper will", model_name, exc_info=True)
    return outcome.to_dict()


@app.task(name=RELAY_TASK, ignore_result=True)
def relay_outbox_task() -> int:
    return relay_once(get_settings(), publisher(app))


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_task() -> dict:
    return sweep_once(get_settings(), publisher(app))
