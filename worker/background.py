"""Background threads of the API process: the outbox relay, the sweeper and, without a
broker, the in-process worker.

``start_background(settings)`` starts them and returns their :class:`Background`, whose call stops them; the API's
lifespan calls both. With ``settings.broker_url`` set the relay publishes to
Celery (``worker.celery_app``); otherwise to :class:`InProcessWorker`, a
thread that runs ``worker.jobs`` itself (the embedded default: one process,
SQLite, a local store).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from model_store import ModelStore, store_for

from .jobs import Drain, announce_by_outbox, drain_until_idle
from .outbox import NotNow, Publish, relay_once, sweep_once
from .settings import Settings

log = logging.getLogger(__name__)

#: how long stopping the background may take in all (the in-process worker's job included: one
#: under way stops at its next progress report and goes back in the queue). The compose API's
#: stop_grace_period leaves room for it before docker's SIGKILL
STOP_BUDGET_S = 30.0


class _FailureRun:
    """Logs a run of failures of ``what`` once, with its traceback, when it begins (then at
    DEBUG) and once when it ends: with the database down, the relay and the in-process
    worker logged a traceback on every retry."""

    def __init__(self, what: str, every: float):
        self.what, self.every = what, every
        self.since: float | None = None
        self.failures = 0

    def failed(self) -> None:
        """Call from an ``except`` block."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.exception("%s failed; retried every %ss (logged again when it succeeds)", self.what, self.every)
        else:
            log.debug("%s failed again", self.what, exc_info=True)

    def succeeded(self) -> None:
        if self.since is not None:
            log.warning("%s succeeds again after %d failure(s) over %.0f s", self.what, self.failures,
                        time.monotonic() - self.since)
            self.since, self.failures = None, 0


class InProcessWorker:
    """A single thread that runs the jobs of the models announced to it, one at a time.

    ``publish`` is its outbox entry point. A model announced several times
    while waiting is run once; a model locked by another transaction is tried again
    after ``retry_s``, one with a job running elsewhere is not (:meth:`_after`).
    """

    def __init__(self, settings: Settings, store: ModelStore, retry_s: float = 2.0):
        self.settings, self.store, self.retry_s = settings, store, retry_s
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._failing: dict[str, _FailureRun] = {}  # models whose last run raised (the thread's own state)
        self._retrying: set[str] = set()  # models with a retry timer set (one each; under _lock)
        self._thread = threading.Thread(target=self._run, name="unlearnd-inprocess-worker", daemon=True)

    def start(self) -> "InProcessWorker":
        self._thread.start()
        return self

    def publish(self, topic: str, payload: dict) -> None:
        """The relay's publish. Refused once stopping (the relay then keeps the outbox row for
        the next start): an announcement into a worker that takes no more work was marked
        published and lost."""
        if topic != "process_model":
            raise ValueError(f"unknown outbox topic {topic!r}")
        if self._stopping.is_set():
            raise NotNow("the in-process worker is stopping: the announcement stays in the outbox")
        self.announce(payload["model_name"])

    def announce(self, model_name: str) -> None:
        with self._lock:
            if model_name in self._pending:
                return
            self._pending.add(model_name)
        self._queue.put(model_name)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work. A job under way stops at its engine's next progress report and
        is put back in the queue (``job.requeued``), so the next start runs it at once; one
        that is storing or publishing finishes first. Were the thread still running after
        ``timeout`` (it is a daemon), the job it leaves 'running' is re-run by the sweeper."""
        self.begin_stop()
        self._thread.join(timeout)

    def begin_stop(self) -> None:
        """Take no more work; a job under way stops at its engine's next progress report."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._queue.put(None)

    def _run(self) -> None:
        while not self._stopping.is_set():
            model_name = self._queue.get()
            if model_name is None:
                break
            with self._lock:
                self._pending.discard(model_name)
            try:
                try:
                    drain = drain_until_idle(self.settings, self.store, model_name, stop=self._stopping)
                except Exception:  # the database hiccuped: try again shortly
                    self._failing.setdefault(
                        model_name, _FailureRun(f"in-process worker: processing {model_name}", self.retry_s)).failed()
                    self._retry_later(model_name)
                    continue
                if model_name in self._failing:
                    self._failing.pop(model_name).succeeded()
                self._after(model_name, drain)
            except Exception:  # noqa: BLE001 - the thread must outlive anything (a Timer that cannot start)
                log.exception("in-process worker: handling %s failed; the sweeper announces its work again",
                              model_name)

    def _after(self, model_name: str, drain: Drain) -> None:
        """What a drain's end leaves to do. The drain claims again after each job until the
        model is idle, so this thread's own jobs need no announcement; a ``busy`` end is
        another runner's (another process on the same record, a job left 'running' by a
        worker that died):

        - a job running (reason ``running``): nothing. Its runner takes the model's next
          work when it ends (a drain claims again, a Celery delivery announces the model),
          a job put back in the queue is announced, and the sweeper resets and announces
          one whose worker died. Tried again every ``retry_s`` instead, each announcement
          meanwhile kept a retry of its own going for as long as that runner had work;
        - the model locked (``locked``: a concurrent claim, a rollback, a purge), first or
          after jobs: tried again after ``retry_s``. The claim holding it may have read the
          queue before the announced request committed and end idle; and should it be the
          other runner's claim after a job, that runner's delivery found this drain's job
          running and left the model to it;
        - idle: nothing;
        - no closing claim: the drain stopped at its ``max_jobs``, or because this worker is
          stopping, after a job that ended anyway (storing or publishing, it finishes
          first): the model may still have work (a request whose delivery elsewhere found
          this drain's job running). Announced again; when stopping, through the outbox,
          which the next relay of any process publishes (a job put back in the queue is
          announced so already). Not after a claim that failed by itself (no serving
          version): claiming again fails the same way."""
        end = drain.end
        if end is not None:
            if end.status == "busy" and end.reason == "running":
                log.info("model %s is busy with job %s; its end announces the model again", model_name, end.job_id)
            elif end.status == "busy":
                self._retry_later(model_name)
            return
        last = drain.jobs[-1] if drain.jobs else None
        if last is None or (last.status == "failed" and last.job_id is None) or last.status == "requeued":
            return
        if not self._stopping.is_set():
            self.announce(model_name)
            return
        try:
            announce_by_outbox(self.settings, model_name)
        except Exception:  # noqa: BLE001 - stopping with the database gone: the sweeper announces it
            log.warning("in-process worker: could not queue an announcement of %s while stopping; the sweeper "
                        "will", model_name, exc_info=True)

    def _retry_later(self, model_name: str) -> None:
        """Announce ``model_name`` again after ``retry_s``: one timer per model at a time. A
        timer each call made, during an outage, a retry loop per announcement that never
        merged (a failing drain takes milliseconds, so the next announcement found the model
        no longer pending): with the relay re-announcing rows it could not mark published,
        one more loop a tick, thousands of threads within the hour."""
        if self._stopping.is_set():
            return
        with self._lock:
            if model_name in self._retrying:
                return
            self._retrying.add(model_name)
        timer = threading.Timer(self.retry_s, self._retry, args=[model_name])
        timer.daemon = True
        try:
            timer.start()
        except BaseException:
            with self._lock:
                self._retrying.discard(model_name)
            raise

    def _retry(self, model_name: str) -> None:
        with self._lock:
            self._retrying.discard(model_name)
        if not self._stopping.is_set():
            self.announce(model_name)


class _Every(threading.Thread):
    """Calls ``fn`` now and then every ``interval`` seconds until stopped; a run of failures
    is logged once, and its end (:class:`_FailureRun`)."""

    def __init__(self, name: str, interval: float, fn: Callable[[], object], stopping: threading.Event):
        super().__init__(name=name, daemon=True)
        self.interval, self.fn, self.stopping = interval, fn, stopping
        self.failing = _FailureRun(name, interval)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.call()
            self.stopping.wait(self.interval)

    def call(self) -> None:
        try:
            self.fn()
        except Exception:
            self.failing.failed()
            return
        self.failing.succeeded()


def publisher_for(settings: Settings, store: ModelStore) -> tuple[Publish, InProcessWorker | None]:
    """Where the outbox goes: Celery when a broker is configured, else a new in-process worker."""
    if settings.broker_url:
        from .celery_app import create_celery, publisher

        return publisher(create_celery(settings)), None
    worker = InProcessWorker(settings, store)
    return worker.publish, worker


def models_with_queued_work(settings: Settings) -> list[str]:
    """The models with a queued deletion request or a queued job in the record, or a job
    running in a process that is gone (``worker.runner``: this process was killed before,
    mid-job): its claim puts that job back in the queue and runs it."""
    from sqlalchemy import select

    from .db import read_only_transaction
    from .runner import is_gone
    from .tables import DeletionRequest, Job

    with read_only_transaction(settings.database_url) as session:  # a read: no write lock on SQLite
        names = set(session.execute(select(DeletionRequest.model_name).where(
            DeletionRequest.status == "queued").distinct()).scalars())
        names |= set(session.execute(select(Job.model_name).where(Job.status == "queued").distinct()).scalars())
        names |= {name for name, runner in session.execute(select(Job.model_name, Job.runner).where(
            Job.status == "running")) if is_gone(runner)}
    return sorted(names)


class Background:
    """The background threads of a process: call it to stop them (:func:`start_background`);
    :meth:`dead` names those that ended while they should run (``/readyz`` reports them)."""

    def __init__(self, threads: list[threading.Thread], stop: Callable[[], None]):
        self._threads, self._stop, self._stopped = threads, stop, False

    def dead(self) -> list[str]:
        return [] if self._stopped else [t.name for t in self._threads if not t.is_alive()]

    def __call__(self) -> None:
        self._stopped = True
        self._stop()


def start_background(settings: Settings) -> Background:
    """Start the relay and the sweeper (and the in-process worker without a broker); returns the
    :class:`Background`, which stops them when called.

    The in-process worker's queue is memory: announcements it held when the process stopped
    were relayed (their outbox rows marked published) and are gone, so it starts with every
    model that has queued work. Before, those requests waited for the sweeper to find them
    stale (``stale_after_s``, 10 minutes by default) after every restart."""
    store = store_for(settings.store_dir)
    publish, worker = publisher_for(settings, store)
    if worker is not None:
        worker.start()
        try:
            for name in models_with_queued_work(settings):
                worker.announce(name)
        except Exception:  # the record is not reachable yet: the sweeper finds the work later
            log.warning("in-process worker: could not read the queued work at start", exc_info=True)
    stopping = threading.Event()
    threads = [
        _Every("unlearnd-outbox-relay", settings.relay_interval_s, lambda: relay_once(settings, publish), stopping),
        _Every("unlearnd-sweeper", max(1.0, settings.stale_after_s / 4), lambda: sweep_once(settings, publish),
               stopping),
    ]
    for t in threads:
        t.start()
    log.info("background started: relay every %ss, sweeper every %ss, %s", settings.relay_interval_s,
             threads[1].interval, "publishing to Celery" if settings.broker_url else "in-process worker")

    def stop() -> None:
        """Everything told first (a job under way stops at its next progress report while the
        relay and the sweeper end), then joined against one deadline of :data:`STOP_BUDGET_S`."""
        stopping.set()
        if worker is not None:
            worker.begin_stop()
        deadline = time.monotonic() + STOP_BUDGET_S
        for t in threads:
            t.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        if worker is not None:
            worker.stop(timeout=max(1.0, deadline - time.monotonic()))

    return Background(threads + ([worker._thread] if worker is not None else []), stop)
