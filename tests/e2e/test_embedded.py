"""The embedded default: `unlearnd serve` alone (SQLite, local store, in-process worker)
takes a deletion over HTTP and publishes a new version."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager

import httpx
import pytest

from .conftest import TINY, _child_env, free_port, stop_process, wait_for


@pytest.fixture
def embedded_server(tmp_path):
    with _serve(tmp_path) as (proc, base):
        yield base, tmp_path


@contextmanager
def _serve(tmp_path, **extra):
    """`unlearnd serve` on SQLite in ``tmp_path`` (``extra``: UNLEARND_* over the tiny model's);
    yields the process and its URL once it is ready, stops it at the end."""
    port = free_port()
    env = _child_env({
        **TINY,
        "UNLEARND_DATABASE_URL": f"sqlite:///{tmp_path / 'unlearnd.db'}",
        "UNLEARND_STORE_DIR": str(tmp_path / "models"),
        "UNLEARND_MODEL_NAME": "embedded-indoor",
        **extra,
    })
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-progress"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"unlearnd serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 120, 0.5, what="unlearnd serve")
        yield proc, base
    finally:
        stop_process(proc)
        sys.stderr.write(f"\n--- unlearnd serve log (tail) ---\n{log.read_text()[-3000:]}\n")


def test_embedded_serve_runs_a_deletion_end_to_end(embedded_server):
    base, workdir = embedded_server
    with httpx.Client(base_url=base, timeout=10) as http:
        versions = http.get("/models/embedded-indoor/versions").json()
        assert [(v["version"], v["serving"]) for v in versions] == [(1, True)]
        from unlearning.data import load_splits

        target = load_splits(_spec())[0].instance_ids[0]
        r = http.post("/deletions", json={"instance_id": target, "tasks": ["depth"]},
                      headers={"Idempotency-Key": "embedded-1"})
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]

        def finished():
            body = http.get(f"/deletions/{request_id}").json()
            return body if body["status"] in ("completed", "failed", "rejected") else None

        done = wait_for(finished, 120, 0.5, what="the embedded job")
        assert done["status"] == "completed", done
        assert done["produced_version"] == 2
        v2 = http.get("/models/embedded-indoor/versions/2").json()
        assert v2["serving"] and v2["deletions"] == [request_id]
        assert [target, "depth"] in v2["erased_cells"]
        assert http.get("/audit/verify").json()["ok"] is True
    manifest = (workdir / "models" / "embedded-indoor" / "v2" / "manifest.json")
    assert manifest.is_file() and request_id in manifest.read_text()


def _spec() -> dict:
    return {"name": "indoor", "n_train": int(TINY["UNLEARND_N_TRAIN"]), "n_test": int(TINY["UNLEARND_N_TEST"]),
            "height": int(TINY["UNLEARND_IMAGE_HEIGHT"]), "width": int(TINY["UNLEARND_IMAGE_WIDTH"]), "seed": 0}


@contextmanager
def _computing(tmp_path, instance_index: int, stale_after_s: int):
    """`unlearnd serve` with a recipe that never ends (retrain, 100000 epochs), a depth erasure
    of training instance ``instance_index`` submitted and computing: yields ``(process,
    request id, the settings)``."""
    from unlearning.data import load_splits

    target = load_splits(_spec())[0].instance_ids[instance_index]
    endless = {"UNLEARND_METHOD": "retrain", "UNLEARND_CALIBRATE_SHADOWS": "false",
               "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 100000}}),
               "UNLEARND_STALE_AFTER_S": str(stale_after_s)}
    with _serve(tmp_path, **endless) as (proc, base), httpx.Client(base_url=base, timeout=10) as http:
        r = http.post("/deletions", json={"instance_id": target, "tasks": ["depth"]})
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]
        wait_for(lambda: http.get(f"/deletions/{request_id}").json()["progress"] > 0, 120, 0.5,
                 what="the job to be computing")
        yield proc, request_id, endless

def _run_again_as_attempt_2(http: httpx.Client, request_id: str) -> None:
    """The job put back (or left running) by the last start completes at this one, on its
    second attempt, as version 2."""
    def finished():
        body = http.get(f"/deletions/{request_id}").json()
        return body if body["status"] in ("completed", "failed", "rejected") else None

    done = wait_for(finished, 120, 0.5, what="the job to run again")
    assert (done["status"], done["produced_version"]) == ("completed", 2), done
    assert http.get(f"/jobs/{done['job_id']}").json()["attempts"] == 2


def test_ctrl_c_mid_job_puts_the_job_back_and_the_next_start_runs_it(tmp_path):
    """Ctrl-C while the in-process worker runs a job: the process exits cleanly (it aborted,
    'terminate called without an active exception', with the job's thread still in torch)
    and the job is back in the queue, so the next start runs it at once; it stayed
    'running' until the sweeper found its heartbeat STALE_AFTER_S (10 minutes) old."""
    with _computing(tmp_path, 1, stale_after_s=20) as (proc, request_id, endless):  # a heartbeat every 5 s
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]

    db = sqlite3.connect(tmp_path / "unlearnd.db")
    try:
        assert db.execute("SELECT status, attempts FROM jobs").fetchall() == [("queued", 1)]
        assert db.execute("SELECT status FROM deletion_requests").fetchall() == [("queued",)]
        assert db.execute("SELECT count(*) FROM audit_events WHERE kind = 'job.requeued'").fetchone() == (1,)
    finally:
        db.close()

    # the next start (the sweeper's default 10 minutes away) runs it again, shorter this time
    short = {**endless, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 2}}), "UNLEARND_STALE_AFTER_S": "600"}
    with _serve(tmp_path, **short) as (proc, base), httpx.Client(base_url=base, timeout=10) as http:
        _run_again_as_attempt_2(http, request_id)
        assert http.get("/audit/verify").json()["ok"] is True


def test_a_killed_serve_s_job_runs_at_the_next_start(tmp_path):
    """SIGKILL to `unlearnd serve` mid-job (the OOM killer): nothing puts the job back, it
    stays 'running'. The next start sees that the process that ran it is gone
    (``worker.runner``) and runs it at once, where it waited for the sweeper to find its
    heartbeat STALE_AFTER_S (10 minutes) old."""
    from worker.runner import GONE_REASON

    with _computing(tmp_path, 2, stale_after_s=600) as (proc, request_id, endless):
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL

    db = sqlite3.connect(tmp_path / "unlearnd.db")
    try:
        assert db.execute("SELECT status, attempts FROM jobs").fetchall() == [("running", 1)]
        assert json.loads(db.execute("SELECT runner FROM jobs").fetchone()[0])["pid"] == proc.pid
    finally:
        db.close()

    short = {**endless, "UNLEARND_METHOD_CONFIG": json.dumps({"train": {"epochs": 2}})}
    with _serve(tmp_path, **short) as (proc, base), httpx.Client(base_url=base, timeout=10) as http:
        _run_again_as_attempt_2(http, request_id)
        requeued = http.get("/audit/events", params={"kind": "job.requeued"}).json()["items"]
        assert [e["payload"]["reason"] for e in requeued] == [GONE_REASON]
        assert http.get("/audit/verify").json()["ok"] is True
