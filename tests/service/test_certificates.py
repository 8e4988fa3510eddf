"""Signed deletion certificates (worker.signing): with UNLEARND_CERTIFICATE_KEY_FILE the
certificate carries an Ed25519 signature that the public key (GET /certificates/public-key)
verifies offline, and any change to it, or another key, does not."""
from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from app.cli import main as cli_main
from app.main import create_app
from worker.db import transaction
from worker.signing import SigningKeyError, generate_key_file, load_signer, verify_certificate
from worker.tables import AuditEvent

from .conftest import assert_problem
from .test_hardening_worker import TINY, TINY_B, _submit, tiny, tiny_v1, two_models  # noqa: F401 - fixtures
from .test_deletions import _complete

METRICS = {"uis": 1.5, "uis_task": 2.0, "uis_inst": 1.25, "mia_auc": 0.52, "mia_auc_original": 0.81}


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "certificate-key.pem"
    generate_key_file(path)
    return path


@pytest.fixture
def signing(settings, key_file):
    with TestClient(create_app(settings.model_copy(update={"certificate_key_file": key_file}))) as c:
        yield c


def _completed_certificate(client, settings, model, index=4, **fields) -> dict:
    body = {"instance_id": model.train_ids[index], "tasks": ["depth"], **fields}
    rid = client.post("/deletions", json=body).json()["id"]
    _complete(settings, rid, METRICS)
    r = client.get(f"/deletions/{rid}/certificate")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_signed_certificate_verifies_with_the_public_key_and_nothing_else(signing, settings, model, key_file):
    cert = _completed_certificate(signing, settings, model)
    key = signing.get("/certificates/public-key").json()
    assert key == load_signer(key_file).public_key_info() and key["algorithm"] == "Ed25519"
    assert cert["signature"]["key_id"] == key["key_id"]
    assert verify_certificate(cert, key["public_key"]) is None

    # any field changed (the hash recomputed or not), the signature changed, or another key: refused
    from worker.requests import certificate_hash

    moved = {**cert, "version_after": 3}
    assert "certificate_sha256 does not match" in verify_certificate(moved, key["public_key"])
    rehashed = {**moved, "certificate_sha256": certificate_hash({k: v for k, v in moved.items() if k != "signature"})}
    assert "signature does not match" in verify_certificate(rehashed, key["public_key"])
    # a well-formed signature with one bit flipped: it reaches the Ed25519 check and fails there
    raw = bytearray(base64.b64decode(cert["signature"]["value"]))
    raw[0] ^= 0x01
    forged = {**cert, "signature": {**cert["signature"], "value": base64.b64encode(bytes(raw)).decode()}}
    assert verify_certificate(forged, key["public_key"]) == "the signature does not match the certificate's contents"
    other = generate_key_file(key_file.parent / "other.pem").public_key_info()["public_key"]
    assert "not with this key" in verify_certificate(cert, other)
    unsigned = {k: v for k, v in cert.items() if k != "signature"}
    assert "no Ed25519 signature" in verify_certificate(unsigned, key["public_key"])


def _edit(settings, sql: str, **params) -> None:
    """A row changed behind the service's back, as anyone who can write the database can (the
    audit log refuses changes; the other tables do not)."""
    with transaction(settings.database_url) as s:
        s.execute(text(sql), params)


def _refused(client, rid: str, audit_state: str) -> dict:
    """The 409 of a certificate the record cannot back: nothing signed, the chain still intact."""
    body = assert_problem(client.get(f"/deletions/{rid}/certificate"), 409, "conflict")
    assert body["audit_state"] == audit_state and body["request_id"] == rid
    assert "signature" not in body and "certificate_sha256" not in body
    assert client.get("/audit/verify").json()["ok"] is True  # what verify cannot see: the rows
    return body


def test_a_request_completed_only_in_its_row_gets_no_certificate(signing, settings, model):
    """A queued request's status set to completed by an UPDATE was certified and signed, its
    completion_event the request's latest event: its deletion.received."""
    rid = signing.post("/deletions", json={"instance_id": model.train_ids[4], "tasks": ["depth"]}).json()["id"]
    assert_problem(signing.get(f"/deletions/{rid}/certificate"), 409)
    _edit(settings, "UPDATE deletion_requests SET status = 'completed', progress = 1, produced_version = 1, "
                    "completed_at = now() WHERE id = :id", id=rid)
    assert signing.get(f"/deletions/{rid}").json()["status"] == "completed"  # the row says so
    body = _refused(signing, rid, "not_recorded")
    assert body["missing_events"] == ["deletion.completed"] and body["request_status"] == "completed"
    assert "records no deletion.completed event" in body["detail"]


#: edits of a completed request's rows: the facts each makes disagree with its audit events, and those events
ROW_EDITS = {
    "instance": ("UPDATE deletion_requests SET instance_id = :other WHERE id = :id", ["instance_id", "cells"],
                 {"deletion.received", "deletion.completed"}),
    "tasks": ("""UPDATE deletion_requests SET tasks = '["depth", "normal"]' WHERE id = :id""", ["tasks", "cells"],
              {"deletion.received", "deletion.completed"}),
    "subject": ("UPDATE deletion_requests SET subject_ref = 'someone-else' WHERE id = :id", ["subject_ref"],
                {"deletion.received"}),
    "version sha256": ("UPDATE model_versions SET sha256 = :sha WHERE version = 2", ["version_after_sha256"],
                       {"deletion.completed"}),
    # pointed at the model's first version, whose sha256 is another
    "version": ("UPDATE deletion_requests SET produced_version = 1 WHERE id = :id",
                ["version_after", "version_after_sha256"], {"deletion.completed"}),
    "base": ("UPDATE deletion_requests SET base_version = 2 WHERE id = :id", ["version_before"],
             {"deletion.completed"}),
    "method": ("UPDATE jobs SET method = 'retrain'", ["method"], {"deletion.completed"}),
    "metrics": ("""UPDATE deletion_requests SET metrics = '{"uis": 9.5, "uis_task": 2.0, "uis_inst": 1.25, """
                """"mia_auc": 0.5, "mia_auc_original": 0.81}' WHERE id = :id""", ["uis", "mia_auc"],
                {"deletion.completed"}),
}


@pytest.mark.parametrize("edit", ROW_EDITS)
def test_a_row_that_disagrees_with_the_audit_log_is_not_certified(signing, settings, model, edit):
    """An edited instance, task list, version or sha256 was certified and signed as the service's
    word while /audit/verify said ok: the certificate's facts are the request's events'."""
    cert = _completed_certificate(signing, settings, model)  # the same record, before the edit: certified
    public = signing.get("/certificates/public-key").json()["public_key"]
    assert verify_certificate(cert, public) is None
    sql, disagreeing, kinds = ROW_EDITS[edit]
    _edit(settings, sql, id=cert["request_id"], other=model.train_ids[5], sha="b" * 64)
    body = _refused(signing, cert["request_id"], "rows_disagree")
    assert body["disagreeing"] == disagreeing
    assert "disagree with its audit log on " + ", ".join(disagreeing) in body["detail"]
    with transaction(settings.database_url) as s:
        events = {e.kind: e for e in s.execute(select(AuditEvent).where(
            AuditEvent.request_id == cert["request_id"])).scalars()}
    assert {e["kind"] for e in body["audit_events"]} == kinds
    assert all(e["hash"] == events[e["kind"]].hash for e in body["audit_events"])
    assert cert["audit"]["completion_event"]["hash"] == events["deletion.completed"].hash


def test_a_completion_event_that_holds_fewer_facts_vouches_for_those_it_holds(signing, settings, model):
    """An event that lacks a field (written by hand, or by an older writer) leaves the rows'
    value standing for it; what it holds is still compared."""
    rid = signing.post("/deletions", json={"instance_id": model.train_ids[4], "tasks": ["depth"]}).json()["id"]
    _complete(settings, rid, METRICS, payload={"version": 2})
    cert = signing.get(f"/deletions/{rid}/certificate").json()
    assert (cert["version_after"], cert["version_after_sha256"], cert["method"], cert["uis"]) == (
        2, "a" * 64, "interference_aware", 1.5)
    _edit(settings, "UPDATE model_versions SET sha256 = :sha WHERE version = 2", sha="b" * 64)
    assert signing.get(f"/deletions/{rid}/certificate").json()["version_after_sha256"] == "b" * 64  # not compared
    _edit(settings, "UPDATE deletion_requests SET produced_version = 1 WHERE id = :id", id=rid)
    assert _refused(signing, rid, "rows_disagree")["disagreeing"] == ["version_after"]


def test_without_a_key_certificates_are_unsigned_and_there_is_no_public_key(client, settings, model):
    cert = _completed_certificate(client, settings, model)
    assert "signature" not in cert
    assert_problem(client.get("/certificates/public-key"), 404, "not-found")


def test_a_bad_key_file_is_refused_naming_it(settings, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cases = {tmp_path / "missing.pem": "cannot read", ec_key: "not an Ed25519 private key"}
    (tmp_path / "junk.pem").write_text("not a key")
    cases[tmp_path / "junk.pem"] = "not an unencrypted PEM private key"
    (tmp_path / "big.pem").write_bytes(b"x" * 20000)
    cases[tmp_path / "big.pem"] = "20000 bytes"
    for path, message in cases.items():
        with pytest.raises(SigningKeyError, match=message):
            load_signer(path)
        with pytest.raises(SigningKeyError, match=message):
            create_app(settings.model_copy(update={"certificate_key_file": path}))


def test_verify_certificate_reads_utf8_whatever_the_locale(signing, settings, model, tmp_path):
    """The API writes UTF-8; read in the locale's encoding (ASCII, cp1252), a certificate whose
    subject_ref is not ASCII could not be read, or failed to verify."""
    import subprocess
    import sys

    cert = _completed_certificate(signing, settings, model, subject_ref="ticket-Zoë-4711")
    public = signing.get("/certificates/public-key").json()["public_key"]
    path = tmp_path / "cert.json"
    path.write_bytes(json.dumps(cert, ensure_ascii=False).encode("utf-8"))
    ascii_locale = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                    "PYTHONIOENCODING": "ascii:backslashreplace"}
    command = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", "verify-certificate"]
    for args, stdin in (([str(path)], None), (["-"], path.read_bytes())):
        done = subprocess.run(command + args + ["--public-key", public], input=stdin, capture_output=True,
                              env=ascii_locale, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().startswith(f"verified: request {cert['request_id']}")


def test_the_commands_make_a_key_and_check_certificates(environment, signing, settings, model, tmp_path, capsys):
    out = tmp_path / "new-key.pem"
    assert cli_main(["certificate-key", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert load_signer(out).public_key_info()["public_key"] in printed
    assert cli_main(["certificate-key", "--out", str(out)]) == 2  # never overwritten
    assert "is not overwritten" in capsys.readouterr().err

    cert = _completed_certificate(signing, settings, model, index=5)
    public = signing.get("/certificates/public-key").json()["public_key"]
    good, bad = tmp_path / "cert.json", tmp_path / "bad.json"
    good.write_text(json.dumps(cert))
    bad.write_text(json.dumps({**cert, "instance_id": "someone-else"}))
    assert cli_main(["verify-certificate", str(good), "--public-key", public]) == 0
    assert capsys.readouterr().out.startswith(f"verified: request {cert['request_id']}")
    assert cli_main(["verify-certificate", str(bad), "--public-key", public]) == 1
    assert capsys.readouterr().out.startswith("NOT verified:")
    assert cli_main(["verify-certificate", str(tmp_path / "none.json"), "--public-key", public]) == 2
    # a curl without the API key saves the 401 problem document as cert.json: named as such, not "NOT verified"
    answer = tmp_path / "answer.json"
    capsys.readouterr()
    answer.write_text(signing.get("/deletions/nope/certificate").text)
    assert cli_main(["verify-certificate", str(answer), "--public-key", public]) == 2
    err = capsys.readouterr().err
    assert "not a certificate but an error answer of the API: 404 Not found: no deletion request" in err
    # another JSON object (`{}`, the deletion's own answer) is not a certificate either: 2, not "NOT verified"
    for other in ({}, signing.get(f"/deletions/{cert['request_id']}").json()):
        answer.write_text(json.dumps(other))
        assert cli_main(["verify-certificate", str(answer), "--public-key", public]) == 2
        captured = capsys.readouterr()
        assert "is not a certificate: it has no certificate_sha256 nor signature" in captured.err
        assert "NOT verified" not in captured.out
    # a certificate that lost its signature is damaged, not something else: it does not verify (1)
    answer.write_text(json.dumps({k: v for k, v in cert.items() if k != "signature"}))
    assert cli_main(["verify-certificate", str(answer), "--public-key", public]) == 1
    assert capsys.readouterr().out.startswith("NOT verified:")

    # serve refuses to start on a key file it cannot use (before migrating or training anything)
    environment.setenv("UNLEARND_CERTIFICATE_KEY_FILE", str(tmp_path / "missing.pem"))
    environment.setenv("UNLEARND_DATABASE_URL", f"sqlite:///{tmp_path / 'never.db'}")
    assert cli_main(["serve"]) == 2
    assert "UNLEARND_CERTIFICATE_KEY_FILE" in capsys.readouterr().err and not (tmp_path / "never.db").exists()


def test_two_models_requests_for_one_cell_each_certify_where_it_went(two_models):
    """Portals of models A and B ask to erase the same cell, both claimed before either publishes;
    model C, on the same dataset, is behind on it. The tombstone names A's request only, and B's
    certificate said nothing was pending while C still served the cell, and never listed C once
    the erasure reached it; neither certificate listed the other model, which erased it too."""
    from worker import jobs
    from worker.bootstrap import ensure_model

    s, s_b, store, ids = two_models
    model, manifest = store.load(TINY, 1)
    store.put_version(model, model_name="tiny-mtl-c", version=1, parent=None, dataset=manifest.dataset,
                      train_config=manifest.train_config, note="initial training")
    s_c = s.model_copy(update={"model_name": "tiny-mtl-c"})
    ensure_model(s_c, store, progress=False)
    mine, theirs = _submit(s, ids[0]), _submit(s_b, ids[0])
    claims = jobs.claim_next(s, TINY), jobs.claim_next(s_b, TINY_B)
    for settings, claim in zip((s, s_b), claims):
        assert jobs.run_job(settings, store, claim.job_id, claim.attempt).status == "completed"
    with TestClient(create_app(s)) as client:
        def certificate(rid):
            body = client.get(f"/deletions/{rid}/certificate").json()
            return sorted(e["model"] for e in body["also_erased_from"]), body["propagation_pending"]

        assert certificate(mine) == ([TINY_B], ["tiny-mtl-c"])
        assert certificate(theirs) == ([TINY], ["tiny-mtl-c"])
        assert [o.status for o in jobs.drain_model(s_c, store, "tiny-mtl-c")] == ["completed"]  # C's propagate job
        assert certificate(mine) == ([TINY_B, "tiny-mtl-c"], [])
        assert certificate(theirs) == ([TINY, "tiny-mtl-c"], [])


def test_a_key_whose_write_failed_leaves_nothing_and_an_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    """A failed write (a full disk) left an empty key file that every retry refused as a key
    not to be overwritten, and that serve refused as no key."""
    import errno

    out = tmp_path / "key.pem"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        assert cli_main(["certificate-key", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err and not out.exists()
    assert cli_main(["certificate-key", "--out", str(out)]) == 0 and load_signer(out)
    capsys.readouterr()
    assert cli_main(["certificate-key", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_a_signing_key_others_can_read_is_loaded_with_a_warning(tmp_path, caplog):
    """Whoever reads the key signs certificates as the service: a key file readable beyond its
    owner is named in a warning (not refused: a docker secret is mounted as its host file is)."""
    import logging

    from worker.signing import generate_key_file, load_signer

    path = tmp_path / "key.pem"
    generate_key_file(path)  # 0600
    with caplog.at_level(logging.WARNING, logger="worker.signing"):
        load_signer(path)
        assert not caplog.records
        path.chmod(0o644)
        assert load_signer(path).public_key_info()["algorithm"] == "Ed25519"
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{path} is readable by others (mode 644)" in warning and "chmod 600" in warning
