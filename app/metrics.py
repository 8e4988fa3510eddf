"""Prometheus metrics.

HTTP counts and latency are this process's own (route templates, not raw paths,
so ids do not explode the label space). Everything about the work itself is
read from the database at scrape time by :class:`RecordCollector`, so the
numbers are right whichever process (API, Celery worker) did the work.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, defer, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.tables import Alias, DeletionRequest, Job, Model, ModelVersion, OutboxMessage, as_utc, utcnow
from worker.versions import erasure_cells, erasures_behind

log = logging.getLogger(__name__)

REQUEST_STATUSES = ("queued", "running", "completed", "failed", "rejected")
JOB_STATUSES = ("queued", "running", "completed", "failed")
JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# The method label's values; any other token a client sends counts as OTHER (bounded label space).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RecordCollector(Collector):
    """Counts and gauges computed from the compliance record on every scrape."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def collect(self):
        up = GaugeMetricFamily("unlearnd_record_up", "1 when the database answered this scrape")
        try:
            with self.sessions() as session, session.begin():
                families = list(self._families(session))
        except Exception:  # a scrape must not fail because the database is down
            log.warning("metrics: reading the record failed", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session: Session):
        by_status = dict(
            session.execute(select(DeletionRequest.status, func.count()).group_by(DeletionRequest.status)).all()
        )
        requests = GaugeMetricFamily("unlearnd_deletion_requests", "Deletion requests by status", labels=["status"])
        for status in sorted(set(REQUEST_STATUSES) | set(by_status)):
            requests.add_metric([status], by_status.get(status, 0))
        yield requests
        received = CounterMetricFamily("unlearnd_deletion_requests_received", "Deletion requests accepted, ever")
        received.add_metric([], sum(by_status.values()))
        yield received

        jobs_by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("unlearnd_jobs", "Unlearning jobs by status", labels=["status"])
        for status in sorted(set(JOB_STATUSES) | set(jobs_by_status)):
            jobs.add_metric([status], jobs_by_status.get(status, 0))
        yield jobs

        models = session.execute(select(Model.name).order_by(Model.name)).scalars().all()
        queued = dict(
            session.execute(
                select(DeletionRequest.model_name, func.count())
                .where(DeletionRequest.status == "queued")
                .group_by(DeletionRequest.model_name)
            ).all()
        )
        depth = GaugeMetricFamily("unlearnd_queue_depth", "Deletion requests queued, per model", labels=["model"])
        for name in sorted(set(models) | set(queued)):
            depth.add_metric([name], queued.get(name, 0))
        yield depth

        yield self._job_durations(session)

        # what the relay has not handed to the broker yet (growing: the broker is away)
        count, oldest = session.execute(
            select(func.count(), func.min(OutboxMessage.created_at)).where(OutboxMessage.published_at.is_(None))
        ).one()
        backlog = GaugeMetricFamily("unlearnd_outbox_unpublished", "Outbox messages not yet published to the broker")
        backlog.add_metric([], count)
        yield backlog
        age = GaugeMetricFamily("unlearnd_outbox_oldest_unpublished_seconds",
                                "Age of the oldest unpublished outbox message (0 when none)")
        age.add_metric([], max(0.0, (utcnow() - as_utc(oldest)).total_seconds()) if oldest is not None else 0.0)
        yield age

        serving = {
            (v.model_name): v
            for v in session.execute(
                select(ModelVersion).options(defer(ModelVersion.erased_cells), defer(ModelVersion.deletions)).join(
                    Alias,
                    (Alias.model_name == ModelVersion.model_name)
                    & (Alias.version == ModelVersion.version)
                    & (Alias.alias == "serving"),
                )
            ).scalars()
        }
        version = GaugeMetricFamily("unlearnd_model_serving_version", "Version the serving alias points at", labels=["model"])
        gauges = {  # record key -> family; UIS is in percent (the design's definition), hence the suffix
            key: GaugeMetricFamily(f"unlearnd_model_{name}", help_, labels=["model"])
            for key, name, help_ in (
                ("uis", "uis_percent", "UIS (%) of the serving version's last unlearning step"),
                ("uis_task", "uis_task_percent", "Task-level UIS (%) of the serving version"),
                ("uis_inst", "uis_inst_percent", "Instance-level UIS (%) of the serving version"),
                ("mia_auc", "mia_auc", "Membership-inference AUC on the forgotten cells, serving version"),
                ("mia_auc_original", "mia_auc_original", "The same attack against the version before unlearning"),
            )
        }
        for name, v in sorted(serving.items()):
            version.add_metric([name], v.version)
            for key, family in gauges.items():
                value = (v.metrics or {}).get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([name], float(value))
        yield version
        yield from gauges.values()

        # erased data a model still serves (its dataset's tombstones that its serving version
        # lacks): 0 but while a propagate job is due or under way; alert when it stays above 0
        behind = GaugeMetricFamily("unlearnd_model_erased_cells_served",
                                   "Cells erased from the model's dataset that its serving version still holds",
                                   labels=["model"])
        for m in session.execute(select(Model).where(Model.name.in_(list(serving))).order_by(Model.name)).scalars():
            behind.add_metric([m.name], len(erasure_cells(erasures_behind(session, m))))
        yield behind

        # versions whose weights are still stored against those purged (`unlearnd purge`): stored
        # versions growing with erasures are weights that may still hold erased data
        stored = ModelVersion.purged_at.is_(None)
        counts = {(name, bool(is_stored)): n for name, is_stored, n in session.execute(
            select(ModelVersion.model_name, stored, func.count()).group_by(ModelVersion.model_name, stored))}
        kept = GaugeMetricFamily("unlearnd_model_versions", "Versions per model, by whether their weights are stored "
                                 "or were purged (they held erased data)", labels=["model", "weights"])
        for name in models:
            for is_stored, label in ((True, "stored"), (False, "purged")):
                kept.add_metric([name, label], counts.get((name, is_stored), 0))
        yield kept

    def _job_durations(self, session: Session) -> HistogramMetricFamily:
        """The histogram of finished jobs' durations, per kind, counted by PostgreSQL in one
        grouped query (a scrape does not grow with the history). SQLite (the embedded
        default) and other dialects are read row by row in Python: SQLite's date functions
        round each timestamp to the millisecond, which moves a job across a bucket bound
        (60.0004 s counted as <= 60)."""
        family = HistogramMetricFamily(
            "unlearnd_job_duration_seconds", "Duration of finished jobs (started to finished)", labels=["kind"]
        )
        finished = (Job.started_at.is_not(None), Job.finished_at.is_not(None))
        if session.get_bind().dialect.name != "postgresql":
            return self._job_durations_in_python(session, family, finished)
        seconds = func.extract("epoch", Job.finished_at - Job.started_at)  # exact
        seconds = case((seconds < 0, 0.0), else_=seconds)  # a clock step back counts as 0, as before
        rows = session.execute(
            select(Job.kind, func.count(), func.coalesce(func.sum(seconds), 0.0),
                   *[func.sum(case((seconds <= b, 1), else_=0)) for b in JOB_DURATION_BUCKETS])
            .where(*finished).group_by(Job.kind).order_by(Job.kind)
        ).all()
        for kind, count, total, *in_bucket in rows:
            buckets = [(floatToGoString(b), int(n or 0)) for b, n in zip(JOB_DURATION_BUCKETS, in_bucket)]
            buckets.append(("+Inf", int(count)))
            family.add_metric([kind], buckets, float(total))
        return family

    @staticmethod
    def _job_durations_in_python(session: Session, family: HistogramMetricFamily, finished) -> HistogramMetricFamily:
        per_kind: dict[str, list[float]] = {}
        for kind, started, ended in session.execute(select(Job.kind, Job.started_at, Job.finished_at).where(*finished)):
            per_kind.setdefault(kind, []).append(max(0.0, (as_utc(ended) - as_utc(started)).total_seconds()))
        for kind, durations in sorted(per_kind.items()):
            buckets = [(floatToGoString(b), sum(d <= b for d in durations)) for b in JOB_DURATION_BUCKETS]
            buckets.append(("+Inf", len(durations)))
            family.add_metric([kind], buckets, sum(durations))
        return family


class HttpMetrics:
    """Per-app registry (so several apps in one process, as in tests, do not collide)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "unlearnd_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "unlearnd_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class HttpMetricsMiddleware:
    """Counts requests and observes latency by route template (``/deletions/{request_id}``);
    paths that match no route count as ``<unmatched>``."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = _route_template(scope)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"  # clients pick any token
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    """The template of the route that answered, ``<unmatched>`` when none did. FastAPI's own
    routes put themselves in the scope; Starlette's plain ones (``/docs``, ``/openapi.json``)
    only their endpoint, which names the route among the router's."""
    path = getattr(scope.get("route"), "path", None)
    if path is None and "endpoint" in scope:
        path = next((r.path for r in getattr(scope.get("router"), "routes", ())
                     if getattr(r, "endpoint", None) is scope["endpoint"] and isinstance(getattr(r, "path", None), str)),
                    None)
    return path or "<unmatched>"


def build_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(RecordCollector(sessions))
    return registry, HttpMetrics(registry)
