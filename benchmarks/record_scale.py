"""How the HTTP API's latency scales with the size of the compliance record.

Builds a PostgreSQL database with a realistic record (written by COPY, not through the
API): one model, ``--versions`` versions (each holding every cell erased in its lineage,
as the worker writes them), ``--requests`` deletion requests over about 0.55 instances a
request (one request erases all three tasks of an instance, or two requests split them,
or three take one task each; 2% of a job's requests fail, the last 500 are queued or
running), a tombstone per erased cell, an outbox row per request, and an audit log with
a valid hash chain (``worker.audit.event_hash``). The last version is a rollback to an
earlier one that re-applied the erasures published after it; how far back it goes is
chosen so that the log has about ``--events`` events (the other events follow from the
requests and versions: a ``deletion.received`` per request, a ``deletion.completed`` or
``deletion.failed`` per request a job took, a ``deletion.reapplied`` per request the
rollback re-applied, two events per job). Then every route below is timed in-process
with FastAPI's ``TestClient`` over ``app.main.create_app(Settings(database_url=...,
background=False))`` (no relay, no worker; default settings otherwise): the median of 5
calls after one warm-up call, or of 2 for a route whose warm-up took over 2 s.

The database, ``unlearnd_bench_scale_<random>``, is created on the server of ``--pg``
(CREATE DATABASE, then ``worker.migrate.upgrade_database``: the migrations of the tree
imported, so an older checkout gets its own schema) and always dropped at the end, even
on error or interrupt. The code measured is whatever ``app``/``worker`` import: to
measure an older commit, put a worktree of it first on PYTHONPATH. The defaults are the
reviewed size (about 163k tombstones, 273k events, a 450-500 MB database); on two
shared cores a full run took 2 minutes with today's code and 4 with 34d1c0b's, which
peaked at 5.8 GB of memory (benchmarks/README.md, "The record at scale"). Responses are
checked for their status code only, so an older tree's shapes (its version listing has
``erased_cells`` where today's has ``erased_cell_count``) need nothing here.

    python benchmarks/record_scale.py --requests 100000 --events 273000 --versions 200 \\
        --out benchmarks/record_scale/after.json
    git worktree add /tmp/rs_before 34d1c0b
    PYTHONPATH=/tmp/rs_before python benchmarks/record_scale.py --requests 100000 \\
        --events 273000 --versions 200 --out benchmarks/record_scale/before.json
    git worktree remove /tmp/rs_before
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

TASKS = ["segmentation", "depth", "normal"]
SPEC = {"name": "indoor", "n_train": 128, "n_test": 48, "height": 48, "width": 64, "seed": 0}  # Settings' defaults
MODEL = "indoor-mtl"
FIRST_RECORD_INSTANCE = 120  # indoor-00120..: the record; indoor-00000..00119 stay fresh for POST
SLOW_S = 2.0  # a route whose warm-up call took longer is timed twice instead of five times
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _ms(t: datetime) -> datetime:
    return t.replace(microsecond=(t.microsecond // 1000) * 1000)


def _version_sha256(version: int) -> str:
    """Version ``version``'s weights' sha256, one value wherever the record names it (its row, the
    events that published it): a certificate is refused where its version's row and events disagree."""
    return hashlib.sha256(str(version).encode()).hexdigest()


# ----------------------------------------------------------------------------- the record


def build_record(n_requests: int, n_versions: int, n_events: int, seed: int) -> dict:
    """Every row of the record, as the worker and the API would have written them."""
    from worker.audit import GENESIS, event_hash
    from unlearning.data import dataset_key

    rnd = random.Random(seed)
    key = dataset_key(SPEC)
    span = 365 * 86400

    # requests over instances; an instance's requests name disjoint tasks
    reqs: list[dict] = []
    inst = FIRST_RECORD_INSTANCE
    while len(reqs) < n_requests:
        iid = f"indoor-{inst:05d}"
        inst += 1
        r = rnd.random()
        if r < 0.4:
            parts = [TASKS]
        elif r < 0.8:
            t = rnd.choice(TASKS)
            parts = [[t], [x for x in TASKS if x != t]]
        else:
            p = TASKS[:]
            rnd.shuffle(p)
            parts = [[x] for x in p]
        reqs.extend({"instance_id": iid, "tasks": p} for p in parts)
    reqs = reqs[:n_requests]
    times = sorted(rnd.uniform(0, span) for _ in reqs)
    rnd.shuffle(reqs)  # an instance's requests spread over the year
    for i, r in enumerate(reqs):
        r["id"] = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        r["created_at"] = _ms(T0 + timedelta(seconds=times[i]))
        r["idem"] = f"ticket-{i}" if i % 2 == 0 else None
        r["reason"] = "GDPR art. 17" if i % 3 else None
        r["subject_ref"] = f"subj-{i}"
        r["hash"] = hashlib.sha256(r["id"].encode()).hexdigest()

    n_jobs = n_versions - 2  # deletion jobs publish v2..v(N-1); the rollback's reapply job publishes vN
    n_pending = min(500, n_requests // 10)
    per = (n_requests - n_pending) // n_jobs
    if per < 1:
        raise SystemExit(f"error: --requests {n_requests} is too few for --versions {n_versions}")

    def metrics():
        return {"method": "interference_aware", "uis": rnd.uniform(1, 5), "uis_task": rnd.uniform(1, 5),
                "uis_inst": rnd.uniform(1, 5), "mia_auc": rnd.uniform(.45, .55),
                "mia_auc_original": rnd.uniform(.8, .95), "seconds": rnd.uniform(30, 300)}

    events = [(T0 - timedelta(days=1), "model.registered", MODEL, None, None,
               {"version": 1, "sha256": _version_sha256(1), "dataset": SPEC, "tasks": TASKS})]
    for r in reqs:
        events.append((r["created_at"], "deletion.received", MODEL, r["id"], r["instance_id"],
                       {"tasks": r["tasks"], "requested_tasks": "all" if len(r["tasks"]) == 3 else r["tasks"],
                        "subject_ref": r["subject_ref"]}))
    versions = [{"version": 1, "parent": None, "job_id": None, "deletions": [], "ncum": 0,
                 "created_at": T0 - timedelta(days=1), "metrics": None}]
    jobs: list[dict] = []
    cells_in_order: list[list[str]] = []
    for j in range(n_jobs):
        batch = reqs[j * per:(j + 1) * per]
        jid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        start = _ms(batch[-1]["created_at"] + timedelta(seconds=5))
        end = _ms(start + timedelta(seconds=rnd.uniform(60, 600)))
        v, m = j + 2, metrics()
        ok = [r for r in batch if rnd.random() > 0.02]
        okset = {r["id"] for r in ok}
        cells = [[r["instance_id"], t] for r in ok for t in r["tasks"]]
        for r in batch:
            r.update(job_id=jid, base_version=v - 1, updated_at=end)
            if r["id"] in okset:
                r.update(status="completed", progress=1.0, produced_version=v, metrics=m, completed_at=end, error=None)
            else:
                r.update(status="failed", progress=0.0, produced_version=None, metrics=None, completed_at=None,
                         error="CUDA out of memory")
        jobs.append({"id": jid, "kind": "deletion", "status": "completed", "base": v - 1, "produced": v, "metrics": m,
                     "params": None, "created": start, "started": start, "finished": end})
        cells_in_order.extend(cells)
        versions.append({"version": v, "parent": v - 1, "job_id": jid, "deletions": [r["id"] for r in ok],
                         "ncum": len(cells_in_order), "created_at": end, "metrics": m})
        events.append((start, "job.started", MODEL, None, None,
                       {"job_id": jid, "kind": "deletion", "request_ids": [r["id"] for r in batch],
                        "cells": [[r["instance_id"], t] for r in batch for t in r["tasks"]], "base_version": v - 1,
                        "method": "interference_aware"}))
        events.append((end, "job.completed", MODEL, None, None,
                       {"job_id": jid, "kind": "deletion", "method": "interference_aware", "base_version": v - 1,
                        "version": v, "sha256": _version_sha256(v),
                        "request_ids": [r["id"] for r in ok], "cells": cells, "metrics": m, "seconds": 100.0}))
        for r in batch:
            if r["status"] == "completed":
                events.append((end, "deletion.completed", MODEL, r["id"], r["instance_id"],
                               {"job_id": jid, "version": v, "base_version": v - 1,
                                "cells": [[r["instance_id"], t] for t in r["tasks"]], "method": "interference_aware",
                                "sha256": _version_sha256(v), "metrics": m}))
            else:
                events.append((end, "deletion.failed", MODEL, r["id"], r["instance_id"], {"job_id": jid, "error": r["error"]}))
    tombstones = [(r["instance_id"], t, r["id"], r["completed_at"]) for r in reqs if r.get("status") == "completed"
                  for t in r["tasks"]]

    # the pending tail: the first 40 running in a job on the last version, the rest queued
    running_jid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    for k, r in enumerate(reqs[n_jobs * per:]):
        run = k < 40
        r.update(status="running" if run else "queued", progress=0.3 if run else 0.0,
                 job_id=running_jid if run else None, base_version=n_versions if run else None,
                 produced_version=None, metrics=None, completed_at=None, error=None, updated_at=r["created_at"])

    # the rollback from v(N-1) to vR, re-applying the erasures published after vR (-> vN): R
    # is chosen so that the log comes closest to n_events events
    completed_by_version = [0] * (n_versions + 1)
    for r in reqs:
        if r.get("status") == "completed":
            completed_by_version[r["produced_version"]] += 1
    fixed = len(events) + 3  # + rollback_requested, the reapply's job.started and job.completed
    best = None
    for rb in range(1, n_versions - 1):
        n = fixed + sum(completed_by_version[rb + 1:])
        if best is None or abs(n - n_events) < abs(best[1] - n_events):
            best = (rb, n)
    rollback_to = best[0]
    last_end = jobs[-1]["finished"]
    rb_at = _ms(last_end + timedelta(seconds=30))
    rj = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    rend = _ms(rb_at + timedelta(hours=2))
    reapplied = [r for r in reqs if r.get("status") == "completed" and r["produced_version"] > rollback_to]
    rcells = [[r["instance_id"], t] for r in reapplied for t in r["tasks"]]
    m = metrics()
    jobs.append({"id": rj, "kind": "reapply", "status": "completed", "base": rollback_to, "produced": n_versions,
                 "metrics": m, "params": {"cells": rcells, "request_ids": [r["id"] for r in reapplied]},
                 "created": rb_at, "started": rb_at, "finished": rend})
    jobs.append({"id": running_jid, "kind": "deletion", "status": "running", "base": n_versions, "produced": None,
                 "metrics": None, "params": None, "created": reqs[-1]["created_at"], "started": reqs[-1]["created_at"],
                 "finished": None})
    versions.append({"version": n_versions, "parent": rollback_to, "job_id": rj, "deletions": [r["id"] for r in reapplied],
                     "ncum": len(cells_in_order), "created_at": rend, "metrics": m})
    events.append((rb_at, "model.rollback_requested", MODEL, None, None,
                   {"from_version": n_versions - 1, "to_version": rollback_to, "job_id": rj, "reapply_cells": rcells,
                    "request_ids": [r["id"] for r in reapplied]}))
    events.append((_ms(rb_at + timedelta(seconds=1)), "job.started", MODEL, None, None,
                   {"job_id": rj, "kind": "reapply", "attempt": 1}))
    events.append((rend, "job.completed", MODEL, None, None,
                   {"job_id": rj, "kind": "reapply", "version": n_versions, "request_ids": [r["id"] for r in reapplied],
                    "cells": rcells, "metrics": m}))
    for r in reapplied:
        events.append((rend, "deletion.reapplied", MODEL, r["id"], r["instance_id"],
                       {"job_id": rj, "version": n_versions, "base_version": rollback_to,
                        "cells": [[r["instance_id"], t] for t in r["tasks"]], "method": "interference_aware",
                        "sha256": _version_sha256(n_versions), "metrics": m}))
    events.sort(key=lambda e: e[0])  # stable: events of one moment keep their order

    # the hash chain, built as worker.audit does one event at a time
    chain, prev = [], GENESIS
    for seq, (at, kind, mn, rid, iid, payload) in enumerate(events, 1):
        payload = json.loads(json.dumps(payload))
        h = event_hash(prev, seq, at, kind, mn, rid, iid, payload)
        chain.append((seq, at, kind, mn, rid, iid, json.dumps(payload), prev, h))
        prev = h
    return {"key": key, "reqs": reqs, "jobs": jobs, "versions": versions, "cells_in_order": cells_in_order,
            "tombstones": tombstones, "chain": chain, "head": (len(chain), prev), "rollback_to": rollback_to,
            "n_versions": n_versions, "rend": rend}


def record_rows(rec: dict):
    """(table, columns, rows) in an order the foreign keys accept."""
    key, n_versions, cells_in_order = rec["key"], rec["n_versions"], rec["cells_in_order"]

    def ver_cells(v):  # every cell of the lineage, sorted, as the worker writes a version
        return json.dumps(sorted(cells_in_order[:v["ncum"]]))

    yield "models", ["name", "dataset", "tasks", "created_at"], [(MODEL, json.dumps(SPEC), json.dumps(TASKS), T0 - timedelta(days=1))]
    yield ("jobs", ["id", "model_name", "kind", "status", "method", "base_version", "produced_version", "progress",
                    "attempts", "error", "metrics", "params", "created_at", "started_at", "heartbeat_at", "finished_at"],
           [(j["id"], MODEL, j["kind"], j["status"], "interference_aware", j["base"], j["produced"],
             1.0 if j["finished"] else 0.3, 1, None, json.dumps(j["metrics"]) if j["metrics"] else None,
             json.dumps(j["params"]) if j["params"] else None, j["created"], j["started"], j["finished"] or j["started"],
             j["finished"]) for j in rec["jobs"]])
    yield ("model_versions", ["model_name", "version", "parent_version", "job_id", "sha256", "artifact_uri", "deletions",
                              "erased_cells", "metrics", "note", "created_at"],
           ((MODEL, v["version"], v["parent"], v["job_id"], _version_sha256(v["version"]),
             f"file:///var/models/{MODEL}/v{v['version']}", json.dumps(v["deletions"]), ver_cells(v),
             json.dumps(v["metrics"]) if v["metrics"] else None, None, v["created_at"]) for v in rec["versions"]))
    yield "aliases", ["model_name", "alias", "version", "updated_at"], [(MODEL, "serving", n_versions, rec["rend"])]
    yield ("alias_history", ["model_name", "alias", "from_version", "to_version", "reason", "at"],
           [(MODEL, "serving", v["parent"], v["version"], "publish" if v["version"] > 1 else "initial", v["created_at"])
            for v in rec["versions"]])
    yield ("deletion_requests", ["id", "model_name", "instance_id", "tasks", "reason", "subject_ref", "status", "progress",
                                 "error", "idempotency_key", "request_hash", "job_id", "base_version", "produced_version",
                                 "metrics", "created_at", "updated_at", "completed_at"],
           [(r["id"], MODEL, r["instance_id"], json.dumps(r["tasks"]), r["reason"], r["subject_ref"], r["status"],
             r["progress"], r["error"], r["idem"], r["hash"], r["job_id"], r["base_version"], r["produced_version"],
             json.dumps(r["metrics"]) if r["metrics"] else None, r["created_at"], r["updated_at"], r["completed_at"])
            for r in rec["reqs"]])
    yield ("tombstones", ["dataset_key", "instance_id", "task", "request_id", "created_at"],
           [(key, iid, t, rid, at) for iid, t, rid, at in rec["tombstones"]])
    yield ("audit_events", ["seq", "at", "kind", "model_name", "request_id", "instance_id", "payload", "prev_hash", "hash"],
           rec["chain"])
    yield "audit_chain_head", ["id", "seq", "hash"], [(1, *rec["head"])]
    yield ("outbox", ["topic", "payload", "created_at", "published_at", "attempts"],
           [("process_model", json.dumps({"model_name": MODEL}), r["created_at"], r["created_at"] + timedelta(seconds=1), 1)
            for r in rec["reqs"]])


def _derived_version_columns(cur, rec: dict) -> None:
    """The columns a publish writes next to a version's cells, where the imported tree's
    schema has them (COPY leaves them at their defaults): ``erased_cell_count`` (migration
    0004) and ``tombstone_watermark`` (0005: the highest tombstone id up to which every
    tombstone is in the version's lineage, which is what a publish records)."""
    cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'model_versions'")
    columns = {name for (name,) in cur.fetchall()}
    if "erased_cell_count" in columns:
        cur.execute("UPDATE model_versions SET erased_cell_count = json_array_length(erased_cells)")
    if "tombstone_watermark" in columns:
        order = {(iid, t): k for k, (iid, t, _, _) in enumerate(rec["tombstones"], 1)}  # COPY's ids: 1, 2, ...
        by_id = sorted(order.values())
        for v in rec["versions"]:
            have = {order[tuple(c)] for c in rec["cells_in_order"][:v["ncum"]] if tuple(c) in order}
            watermark = 0
            for i in by_id:
                if i not in have:
                    break
                watermark = i
            cur.execute("UPDATE model_versions SET tombstone_watermark = %s WHERE model_name = %s AND version = %s",
                        (watermark, MODEL, v["version"]))


def fill(libpq_url: str, rec: dict) -> None:
    import psycopg

    with psycopg.connect(libpq_url) as conn:
        with conn.cursor() as cur:
            for table, cols, rows in record_rows(rec):
                with cur.copy(f"COPY {table} ({','.join(cols)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            cur.execute("SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), (SELECT max(seq) FROM audit_events))")
            _derived_version_columns(cur, rec)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")


# ----------------------------------------------------------------------------- timing


def time_routes(url: str, store_dir: str, log) -> tuple[list[dict], dict]:
    from fastapi.testclient import TestClient
    from sqlalchemy import event, text
    from sqlalchemy.engine import Engine

    from app.main import create_app
    from worker.queries import encode_cursor
    from worker.settings import Settings

    stmts: list[float] = []

    @event.listens_for(Engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):
        conn.info["t_stmt"] = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):
        stmts.append(time.perf_counter() - conn.info.pop("t_stmt", time.perf_counter()))

    app = create_app(Settings(database_url=url, background=False, store_dir=store_dir))
    with app.state.engine.connect() as c:
        def q(sql, **kw):
            return c.execute(text(sql), kw).first()

        n_req = q("SELECT count(*) FROM deletion_requests")[0]
        rid, iid = q("SELECT id, instance_id FROM deletion_requests WHERE status = 'completed' "
                     "ORDER BY created_at, id LIMIT 1 OFFSET :o", o=min(5000, n_req // 20))
        deep = q("SELECT created_at, id FROM deletion_requests ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET :o",
                 o=n_req * 9 // 10)
        n_failed = q("SELECT count(*) FROM audit_events WHERE kind = 'deletion.failed'")[0]
        failed_deep = q("SELECT seq FROM audit_events WHERE kind = 'deletion.failed' ORDER BY seq LIMIT 1 OFFSET :o",
                        o=n_failed * 9 // 10)[0]
        latest = q("SELECT max(version) FROM model_versions WHERE model_name = :m", m=MODEL)[0]
        anchor = q("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1 OFFSET 100")  # 100 events back
        late = q("SELECT id FROM deletion_requests WHERE status = 'completed' ORDER BY created_at DESC, id DESC "
                 "LIMIT 1")[0]  # erased last: every earlier version still holds it
        erased = q("SELECT instance_id, task FROM tombstones WHERE instance_id < :hi ORDER BY instance_id, task LIMIT 1",
                   hi=f"indoor-{SPEC['n_train']:05d}")
    if erased is None:
        raise RuntimeError("no erased cell among the dataset's instances: cannot time the 409 submission")
    deep_at = deep[0] if deep[0].tzinfo else deep[0].replace(tzinfo=timezone.utc)
    deep_cursor = encode_cursor("deletions", deep_at.isoformat(), deep[1])
    gets = [
        ("GET /deletions", "/deletions"),
        ("GET /deletions?instance_id", f"/deletions?instance_id={iid}"),
        ("GET /deletions?status=completed", "/deletions?status=completed"),
        ("GET /deletions?cursor (90% deep)", f"/deletions?cursor={deep_cursor}"),
        ("GET /deletions/{id}", f"/deletions/{rid}"),
        ("GET /deletions/{id}/certificate", f"/deletions/{rid}/certificate"),
        ("GET /deletions/{id}/certificate (the latest completed)", f"/deletions/{late}/certificate"),
        ("GET /audit/events", "/audit/events"),
        ("GET /audit/events?instance_id", f"/audit/events?instance_id={iid}"),
        ("GET /audit/events?request_id", f"/audit/events?request_id={rid}"),
        ("GET /audit/events?model=<known>", f"/audit/events?model={MODEL}"),
        ("GET /audit/events?model=<unknown>", "/audit/events?model=no-such-model"),
        ("GET /audit/events?kind=deletion.failed", "/audit/events?kind=deletion.failed"),
        ("GET /audit/events?kind=deletion.failed&cursor (90% deep)",
         f"/audit/events?kind=deletion.failed&cursor={encode_cursor('audit', failed_deep)}"),
        ("GET /audit/verify", "/audit/verify"),
        ("GET /audit/verify?seq&hash&after_anchor (100 new events)",
         f"/audit/verify?seq={anchor[0]}&hash={anchor[1]}&after_anchor=true"),
        ("GET /jobs", "/jobs"),
        ("GET /models", "/models"),
        ("GET /models/{name}/versions", f"/models/{MODEL}/versions"),
        ("GET /models/{name}/versions/{latest}", f"/models/{MODEL}/versions/{latest}"),
        ("GET /metrics", "/metrics"),
    ]
    client = TestClient(app)
    results = []

    def run(name, call, expect):
        stmts.clear()
        t = time.perf_counter()
        r = call()
        warm_s = time.perf_counter() - t
        if r.status_code != expect:
            raise RuntimeError(f"{name}: {r.status_code} (expected {expect}): {r.text[:300]}")
        reps = 2 if warm_s > SLOW_S else 5
        ts, n_sql, sql_s = [], 0, 0.0
        for _ in range(reps):
            stmts.clear()
            t = time.perf_counter()
            r = call()
            ts.append(time.perf_counter() - t)
            n_sql, sql_s = len(stmts), sum(stmts)
            if r.status_code != expect:
                raise RuntimeError(f"{name}: {r.status_code} (expected {expect}): {r.text[:300]}")
        row = {"route": name, "status": r.status_code, "bytes": len(r.content), "runs": reps,
               "median_ms": round(statistics.median(ts) * 1000, 1), "min_ms": round(min(ts) * 1000, 1),
               "warmup_ms": round(warm_s * 1000, 1), "n_sql": n_sql, "sql_ms": round(sql_s * 1000, 1),
               "maxrss_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        results.append(row)
        log(f"  {name:58s} {row['median_ms']:>10.1f} ms {row['bytes']:>11d} B  ({reps} runs, {n_sql} SQL)")
        return r

    for name, path in gets:
        r = run(name, lambda p=path: client.get(p), 200)
        if path.startswith("/audit/verify") and not r.json().get("ok"):
            raise RuntimeError(f"the filled chain does not verify: {r.json()}")
    # the first submission renders the dataset's scenes; that is not what is measured
    from worker.datasets import get_splits
    get_splits(SPEC)
    fresh = iter(range(FIRST_RECORD_INSTANCE))
    run("POST /deletions (fresh cell, 202)",
        lambda: client.post("/deletions", json={"instance_id": f"indoor-{next(fresh):05d}", "tasks": "all"}), 202)
    run("POST /deletions (erased cell, 409)",
        lambda: client.post("/deletions", json={"instance_id": erased[0], "tasks": [erased[1]]}), 409)
    return results, {"deep_deletion_cursor_offset": n_req * 9 // 10, "deep_failed_event_seq": failed_deep,
                     "latest_version": latest, "request_id": rid, "instance_id": iid, "erased_cell": list(erased)}


# ----------------------------------------------------------------------------- provenance


def code_provenance() -> dict:
    """Which tree ``app`` and ``worker`` came from, at which commit, and whether its
    code (app/, worker/, migrations/) differs from that commit."""
    import app
    import worker

    root = Path(worker.__file__).resolve().parent.parent
    if Path(app.__file__).resolve().parent.parent != root:
        raise SystemExit(f"error: app ({app.__file__}) and worker ({worker.__file__}) come from different trees")

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    changed = git("status", "--porcelain", "--", "app", "worker", "migrations")
    return {"tree": str(root), "commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "uncommitted_changes": changed.splitlines() if changed else []}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gb": mem_gb}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000, help="deletion requests in the record (default 100000)")
    p.add_argument("--events", type=int, default=273_000,
                   help="audit events to aim at (default 273000; reached by how far back the rollback goes, "
                        "within what the requests and versions allow)")
    p.add_argument("--versions", type=int, default=200, help="model versions (default 200, at least 4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432",
                   help="a PostgreSQL server (SQLAlchemy URL, no database or a maintenance one): the benchmark "
                        "creates its own database there and drops it at the end")
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    a = p.parse_args(argv)
    if a.versions < 4 or a.requests < 10 * a.versions:
        p.error("--versions must be at least 4 and --requests at least 10 x --versions")

    from sqlalchemy.engine import make_url

    server = make_url(a.pg)
    if not server.drivername.startswith("postgresql"):
        p.error("--pg must be a PostgreSQL URL")
    name = f"unlearnd_bench_scale_{secrets.token_hex(4)}"
    url = server.set(database=name).render_as_string(hide_password=False)
    admin = server.set(drivername="postgresql", database=server.database or "postgres").render_as_string(hide_password=False)
    libpq = server.set(drivername="postgresql", database=name).render_as_string(hide_password=False)

    def log(msg):
        print(msg, flush=True)

    def on_term(signum, frame):  # a SIGTERM unwinds through the finally that drops the database
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    code = code_provenance()
    log(f"code: {code['tree']} @ {(code['commit'] or '?')[:9]} {code['subject'] or ''}"
        + (f" (+{len(code['uncommitted_changes'])} uncommitted)" if code["uncommitted_changes"] else ""))

    import psycopg

    from worker.migrate import upgrade_database

    started = time.time()
    with psycopg.connect(admin, autocommit=True) as c:
        pg_version = c.execute("SHOW server_version").fetchone()[0]
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory(prefix="record_scale_") as store:
            t = time.perf_counter()
            revision = upgrade_database(url)
            log(f"database {name} at {revision}; building the record ...")
            rec = build_record(a.requests, a.versions, a.events, a.seed)
            build_s = time.perf_counter() - t
            sizes = {"requests": len(rec["reqs"]), "instances": len({r["instance_id"] for r in rec["reqs"]}),
                     "versions": len(rec["versions"]), "rollback_to": rec["rollback_to"],
                     "erased_cells": len(rec["cells_in_order"]), "tombstones": len(rec["tombstones"]),
                     "outbox": len(rec["reqs"]), "audit_events": len(rec["chain"]), "jobs": len(rec["jobs"])}
            log("  " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
            t = time.perf_counter()
            fill(libpq, rec)
            del rec
            fill_s = time.perf_counter() - t
            with psycopg.connect(libpq) as c:
                db_mb = round(c.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20)
            log(f"  built in {build_s:.0f} s, copied in {fill_s:.0f} s ({db_mb} MB); timing routes ...")
            routes, picked = time_routes(url, store, log)
        out = {
            "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
            "pythonpath": os.environ.get("PYTHONPATH"),
            "machine": machine(),
            "postgres": pg_version,
            "code": code,
            "migration_head": revision,
            "settings": "Settings(database_url=..., background=False, store_dir=<temporary>): defaults otherwise",
            "client": "fastapi.testclient.TestClient, in-process",
            "timing": f"median of 5 calls after one warm-up call; 2 when the warm-up took over {SLOW_S:g} s",
            "asked": {"requests": a.requests, "events": a.events, "versions": a.versions, "seed": a.seed},
            "sizes": sizes,
            "database_mb": db_mb,
            "fill_seconds": {"build": round(build_s, 1), "copy": round(fill_s, 1)},
            "picked": picked,
            "routes": routes,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "seconds": round(time.time() - started),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    finally:
        from sqlalchemy.orm import close_all_sessions

        close_all_sessions()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped {name}")

    w = max(len(r["route"]) for r in routes)
    print(f"\n{'route':{w}s} {'median ms':>10s} {'bytes':>11s} runs")
    for r in routes:
        print(f"{r['route']:{w}s} {r['median_ms']:>10.1f} {r['bytes']:>11d} {r['runs']:>4d}")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
