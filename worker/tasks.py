"""Celery tasks: thin wrappers around ``worker.jobs`` and ``worker.outbox``."""
from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

from model_store import store_for

from .celery_app import PROCESS_MODEL_TASK, RELAY_TASK, SWEEP_TASK, app, publisher
from .jobs import drain_model
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
def process_model_task(self, model_name: str) -> list[dict]:
    """Run the queued work of ``model_name``; retried with back-off while another job holds it."""
    settings = get_settings()
    outcomes = drain_model(settings, store_for(settings.store_dir), model_name)
    if outcomes and outcomes[0].status == "busy":
        countdown = min(5 * 2 ** min(self.request.retries, 4), 60)
        log.info("model %s is busy; retrying in %ss", model_name, countdown)
        raise self.retry(countdown=countdown)
    return [o.to_dict() for o in outcomes]


@app.task(name=RELAY_TASK, ignore_result=True)
def relay_outbox_task() -> int:
    return relay_once(get_settings(), publisher(app))


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_task() -> dict:
    return sweep_once(get_settings(), publisher(app))
