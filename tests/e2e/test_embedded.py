"""The embedded default: `unlearnd serve` alone (SQLite, local store, in-process worker)
takes a deletion over HTTP and publishes a new version."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from .conftest import TINY, _child_env, free_port, stop_process, wait_for


@pytest.fixture
def embedded_server(tmp_path):
    port = free_port()
    env = _child_env({
        **TINY,
        "UNLEARND_DATABASE_URL": f"sqlite:///{tmp_path / 'unlearnd.db'}",
        "UNLEARND_STORE_DIR": str(tmp_path / "models"),
        "UNLEARND_MODEL_NAME": "embedded-indoor",
    })
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
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
        yield base, tmp_path
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
