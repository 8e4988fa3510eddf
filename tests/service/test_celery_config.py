"""The Celery application's configuration (worker/celery_app.py)."""
from __future__ import annotations

from worker.celery_app import RELAY_TASK, SWEEP_TASK, create_celery
from worker.settings import Settings


def test_beat_ticks_expire_after_one_interval_or_a_minute():
    """While every worker is busy with an hour-long job, beat's ticks queue up in the broker
    (3,600 relay ticks an hour at the default interval): each expires when the next one is
    due, or after a minute if that is later, so a worker discards them unrun instead of
    running an hour of relay passes. (Expiring after 2 s, a worker whose clock ran 2 s ahead
    of beat's discarded every relay tick: the expiry is a time on beat's clock.)"""
    settings = Settings(_env_file=None, relay_interval_s=2.0, stale_after_s=600)
    schedule = create_celery(settings).conf.beat_schedule
    by_task = {entry["task"]: entry for entry in schedule.values()}
    assert set(by_task) == {RELAY_TASK, SWEEP_TASK}
    assert (by_task[RELAY_TASK]["schedule"], by_task[RELAY_TASK]["options"]["expires"]) == (2.0, 60.0)
    assert by_task[SWEEP_TASK]["schedule"] == by_task[SWEEP_TASK]["options"]["expires"] == 150.0


def test_a_sweep_relays_what_is_pending_though_it_found_nothing(tmp_path, monkeypatch):
    """Relay ticks lost or discarded: a new request's outbox row waited until the request
    went stale (10 minutes), since a sweep relayed only when it found something."""
    from worker import tasks
    from worker.db import transaction
    from worker.migrate import upgrade_database
    from worker.tables import OutboxMessage, utcnow

    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/record.db", broker_url=None)
    upgrade_database(settings.database_url)
    with transaction(settings.database_url) as session:
        session.add(OutboxMessage(topic="process_model", payload={"model_name": "m"}, created_at=utcnow()))
    sent = []
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks.app, "send_task", lambda name, args: sent.append((name, args)))
    found = tasks.sweep_task.apply().get()
    assert (found["models"], found["relayed"]) == ([], 1)
    assert sent == [(tasks.PROCESS_MODEL_TASK, ["m"])]
    assert tasks.sweep_task.apply().get()["relayed"] == 0 and len(sent) == 1  # published once


def test_long_jobs_are_not_redelivered_while_they_run():
    settings = Settings(_env_file=None, job_time_limit_s=1800)
    conf = create_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit == 1800 and conf.task_time_limit == 1860
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_a_retry_held_for_its_countdown_takes_a_slot_of_the_worker():
    """Celery raises a worker's prefetch by one per message held until its ETA: a ``-c 1``
    worker holding a countdown retry fetched and ran another job first. Capped at 1 for a pool
    of one once the worker knows its size; larger pools are left alone (the cap would cost them
    a slot per capped retry: Celery lowers the prefetch when the retry is due all the same,
    as kombu's QoS below shows); a limit configured otherwise is kept."""
    from types import SimpleNamespace

    from celery.signals import celeryd_after_setup
    from kombu.common import QoS

    conf = create_celery(Settings(_env_file=None)).conf
    assert conf.worker_eta_task_limit is None
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(concurrency=3), conf=conf)
    assert conf.worker_eta_task_limit is None
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(concurrency=1), conf=conf)
    assert conf.worker_eta_task_limit == 1
    conf.worker_eta_task_limit = 7
    celeryd_after_setup.send(sender="w@host", instance=SimpleNamespace(concurrency=1), conf=conf)
    assert conf.worker_eta_task_limit == 7
    # why not for larger pools: a retry held at the cap, then due, leaves the pool a slot short
    for size, after in ((1, 1), (2, 1)):
        qos = QoS(lambda prefetch_count: None, size, max_prefetch=size)
        qos.increment_eventually()  # the retry arrives: kept at the cap
        qos.decrement_eventually()  # it is due: lowered all the same
        assert qos.value == after


def test_a_sweep_deletes_outbox_rows_published_a_week_ago(tmp_path):
    """Published rows were never deleted: the table grew with every announcement for good."""
    from datetime import timedelta

    from sqlalchemy import select

    from worker.db import transaction
    from worker.migrate import upgrade_database
    from worker.outbox import sweep_once
    from worker.tables import OutboxMessage, utcnow

    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/record.db", broker_url=None)
    upgrade_database(settings.database_url)
    now = utcnow()
    with transaction(settings.database_url) as session:
        for days, published in ((8, True), (6, True), (8, False)):
            at = now - timedelta(days=days)
            session.add(OutboxMessage(topic="process_model", payload={"model_name": f"m{days}{published}"},
                                      created_at=at, published_at=at if published else None))
    sweep_once(settings, lambda topic, payload: None)
    with transaction(settings.database_url) as session:
        left = sorted(r.payload["model_name"] for r in session.execute(select(OutboxMessage)).scalars())
    assert left == ["m6True", "m8False"]  # an unpublished row waits for the relay, whatever its age
