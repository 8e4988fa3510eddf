"""Celery tasks: thin wrappers around ``worker.jobs`` and ``worker.outbox``."""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

from celery.signals import worker_process_init, worker_shutting_down

from model_store import store_for

from .celery_app import PROCESS_MODEL_TASK, RELAY_TASK, SWEEP_TASK, app, publisher
from .jobs import TRANSIENT_DB_ERRORS, process_model
from .outbox import relay_once, sweep_once
from .settings import get_settings

log = logging.getLogger(__name__)

# Retries of a delivery that found its model locked (a concurrent claim, a rollback, a purge:
# held for one short transaction). A delivery that finds a job of its model running is not
# retried: that job's end announces the model again (process_model_task below). Retried, every
# request announced during a long job kept a delivery claiming every minute for up to two hours.
BUSY_RETRIES = 120  # up to two hours at the 60 s cap; past that the sweeper announces the work again

# SIGTERM to a prefork pool process in the middle of a job (Celery's cold shutdown terminates
# its pool so; systemd's default KillMode signals every process of the unit) used to end it at
# once and leave the job 'running' until the sweeper found its heartbeat STALE_AFTER_S old. Now
# the job ends at the engine's next progress report and goes back in the queue
# (worker.jobs.run_job), then the process ends as SIGTERM asked; a job that has not stopped
# within STOP_GRACE_S (storing, say) is killed then.
# Celery's warm shutdown (SIGTERM to the main process alone: docker stop, Ctrl-C) lets the job
# go on for UNLEARND_WORKER_STOP_GRACE_S, then sends its pool processes that SIGTERM (with
# --pool solo, which runs jobs in the main process, it sets STOP there): docker's 10 s grace
# period used to end in a SIGKILL mid-job, and the job waited for the sweeper.
STOP = threading.Event()
STOP_GRACE_S = 30.0
_pool_process = False


@worker_process_init.connect
def _in_a_pool_process(**_) -> None:
    """A prefork pool process; the solo pool sends this signal too, in the main process,
    whose SIGTERM stays Celery's warm shutdown (bounded by :func:`_bound_the_warm_shutdown`)."""
    from billiard.process import current_process

    global _pool_process
    _pool_process = current_process().name != "MainProcess"


@worker_shutting_down.connect
def _bound_the_warm_shutdown(how=None, **_) -> None:
    """In the worker's main process, at a warm shutdown: after ``worker_stop_grace_s``, stop
    the jobs still running (they go back in the queue; the cold shutdown stops them at once)."""
    if how != "Warm":
        return
    grace = get_settings().worker_stop_grace_s
    timer = threading.Timer(grace, _stop_running_jobs, args=(grace,))
    timer.daemon = True
    timer.start()


def _stop_running_jobs(grace: float) -> None:
    from billiard.process import active_children
    from celery.worker import state

    if not state.active_requests:
        return  # nothing running: the shutdown ends by itself
    log.warning("warm shutdown: a job is still running after %g s; putting it back in the queue", grace)
    STOP.set()  # --pool solo: the job runs in this process
    for child in active_children():  # prefork: each pool process stops its job (_on_sigterm), then exits
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _on_sigterm(signum, frame) -> None:
    log.warning("SIGTERM in the middle of a job: putting it back in the queue, then exiting")
    STOP.set()
    timer = threading.Timer(STOP_GRACE_S, os.kill, args=(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


@contextmanager
def _sigterm_stops_the_job():
    """In a pool process, SIGTERM during the block sets :data:`STOP` instead of ending the
    process; after the block the process ends as SIGTERM asked (billiard's own handler,
    installed after ``worker_process_init``, is the one put back and called)."""
    if not _pool_process:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if STOP.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


@app.task(
    name=PROCESS_MODEL_TASK,
    bind=True,
    autoretry_for=TRANSIENT_DB_ERRORS,  # the database went away: try again later (as worker.jobs takes it)
    retry_backoff=True,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=BUSY_RETRIES,
)
def process_model_task(self, model_name: str) -> dict:
    """Run one job of ``model_name``.

    One job a delivery: the task's time limit (``UNLEARND_JOB_TIME_LIMIT_S``) is then a
    job's. After a job the model is announced again, so requests that arrived meanwhile
    are picked up by a delivery of their own (draining every job in one delivery charged
    them all to one time limit).

    A model that is busy (:class:`worker.jobs.Claim`): with a job running, the delivery
    ends (``busy``, that job's id, reason ``running``): the job's end announces the model
    again (here, or the in-process worker claims again), a job put back in the queue is
    announced, and the sweeper resets and announces one whose worker died. Retrying it
    instead, every request announced during a long job kept a delivery of its own claiming
    every minute for up to two hours. A model row locked by another transaction (reason
    ``locked``) is retried with back-off: the claim holding it may have read the queue
    before this delivery's request committed, and end idle without announcing anything."""
    settings = get_settings()
    with _sigterm_stops_the_job():
        outcome = process_model(settings, store_for(settings.store_dir), model_name, stop=STOP)
    if outcome.status == "busy" and outcome.reason == "running":
        log.info("model %s is busy with job %s; its end announces the model again", model_name, outcome.job_id)
        return outcome.to_dict()
    if outcome.status == "busy":
        countdown = min(5 * 2 ** min(self.request.retries, 4), 60)
        log.info("model %s is busy (%s by another claim, a rollback or a purge); retrying in %ss", model_name,
                 outcome.reason or "held", countdown)
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
    """A sweep, which relays whatever it found (:func:`worker.outbox.sweep_once`): the relay's
    own ticks can all be lost or expire unrun, and then this publishes new requests' rows."""
    return sweep_once(get_settings(), publisher(app))
