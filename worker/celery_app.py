"""The Celery application, configured from :class:`worker.settings.Settings`.

Long jobs the Celery way: late acknowledgement (a task whose worker dies is
delivered again), prefetch of one (a worker holds one job, not a queue of
them; a retry waiting for its countdown counts, :func:`_eta_tasks_take_no_extra_slot`), rejected-on-worker-lost, explicit soft and hard time limits. Tasks are
idempotent (``worker.jobs``), so a second delivery does the work once.

Relay and sweeper: the API process runs them in threads (``worker.background``).
For deployments whose API runs with ``UNLEARND_BACKGROUND=false``, the beat
schedule below runs them as tasks instead: ``celery -A worker.celery_app beat -s
var/celerybeat-schedule`` (beat keeps its schedule in a file, by default in the
working directory, which the image's user cannot write; ``var/`` it can).
Each beat task expires after one interval, or a minute if that is longer (the
expiry is a time on beat's clock that the worker reads on its own): while every
worker is busy with a job, the ticks still queue up in the broker, but a worker
that takes an expired one discards it unrun (the next tick does the same work), so
an hour-long job leaves a few seconds of discarding and a minute of relay passes,
not an hour of them. Each sweep relays too, a backstop for relay ticks lost or
discarded. They share the job
queue, so with a single worker they wait for the job to end; a second worker
(``unlearnd worker``) keeps the relay going meanwhile.

    celery -A worker.celery_app worker -c 1 --loglevel info      # what `unlearnd worker` runs

The time limits are enforced by the prefork pool (Celery's default): with ``--pool
solo`` or ``threads`` Celery ignores them, and a job runs as long as it takes.
One delivery runs one job (``worker.tasks``), so the limit is a job's.
"""
from __future__ import annotations

from celery import Celery
from celery.signals import celeryd_after_setup

from .settings import Settings, get_settings

PROCESS_MODEL_TASK = "unlearnd.process_model"
RELAY_TASK = "unlearnd.relay_outbox"
SWEEP_TASK = "unlearnd.sweep"
TICK_EXPIRY_MIN_S = 60.0  # a beat tick's shortest life: clocks of beat and workers may differ this much


def create_celery(settings: Settings) -> Celery:
    app = Celery("unlearnd", broker=settings.broker_url or "memory://", backend=settings.result_backend)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 60,  # a minute to record the failure after the soft limit
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=settings.result_backend is None,
        broker_connection_retry_on_startup=True,
        # Redis redelivers an unacknowledged task after the visibility timeout: longer than a job may run.
        # The socket timeouts bound a publish to a broker that stopped answering (kombu's default
        # is none: the relay waited, inside its transaction, for as long as TCP did).
        broker_transport_options={"visibility_timeout": settings.job_time_limit_s + 600,
                                  "socket_timeout": 10, "socket_connect_timeout": 10},
        broker_connection_timeout=10,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 3},
        worker_hijack_root_logger=False,
        beat_schedule={
            # expiry from beat's clock, read against the worker's: at least a minute, so a worker
            # whose clock runs a little ahead still runs the ticks (it discarded every one)
            name: {"task": task, "schedule": every, "options": {"expires": max(every, TICK_EXPIRY_MIN_S)}}
            for name, task, every in (
                ("relay-outbox", RELAY_TASK, max(settings.relay_interval_s, 1.0)),
                ("sweep", SWEEP_TASK, max(settings.stale_after_s / 4, 5.0)),
            )
        },
    )
    app.conf.include = ["worker.tasks"]
    return app


@celeryd_after_setup.connect
def _eta_tasks_take_no_extra_slot(sender, instance, conf, **kwargs) -> None:
    """A countdown retry (``locked``, :mod:`worker.tasks`) is held by the worker until it is due,
    and Celery raises the worker's prefetch by one for each such message: a ``-c 1`` worker
    holding a 5 s retry fetched and started another job, and the retry waited behind that
    whole job (up to the time limit) while another worker sat idle. Capped at 1 for a pool of
    one (``unlearnd worker``'s default: one GPU, one job), a held retry takes the worker's slot
    instead. Not for larger pools: Celery lowers the prefetch again when the retry is due even
    where the cap kept it from rising, so each capped retry cost a ``-c 2`` worker one slot for
    good; there a retry may still wait behind a job. Set here, where the worker's concurrency is
    known (``--concurrency``, or Celery's own flags after ``--``); a value configured otherwise
    is kept."""
    if conf.worker_eta_task_limit is None and instance.concurrency == 1:
        conf.worker_eta_task_limit = 1


def publisher(app: Celery):
    """An outbox ``publish(topic, payload)`` that sends the matching Celery task."""

    def publish(topic: str, payload: dict) -> None:
        if topic != "process_model":
            raise ValueError(f"unknown outbox topic {topic!r}")
        app.send_task(PROCESS_MODEL_TASK, args=[payload["model_name"]])

    return publish


app = create_celery(get_settings())
