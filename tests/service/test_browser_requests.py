"""Requests a web browser sends on a page's behalf (app.guards.browser_refusal): the API's
callers are programs, which send no Origin or Sec-Fetch-Site. Without API keys (the embedded
default) a page the operator had open could submit, roll back and purge through the
browser; a page whose name was re-pointed at 127.0.0.1 (DNS rebinding) too."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.auth import token_sha256
from app.guards import _authority, is_loopback
from app.main import create_app
from worker.settings import ApiKey

from .conftest import assert_problem, counts


def _deletion(model):
    return {"instance_id": model.train_ids[0], "tasks": ["depth"]}


@pytest.mark.parametrize("headers, refused", [
    ({"Origin": "https://evil.example"}, "cross-origin-request"),
    ({"Origin": "http://127.0.0.1:9999", "Host": "127.0.0.1:8000"}, "cross-origin-request"),  # another port
    ({"Origin": "null"}, "cross-origin-request"),
    ({"Origin": "not a url at all"}, "cross-origin-request"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site-request"),
    ({"Sec-Fetch-Site": "same-site"}, "cross-site-request"),
    # DNS rebinding: same origin to the browser, a name that is not this machine's
    ({"Origin": "http://rebound.example:8000", "Host": "rebound.example:8000"}, "browser-without-keys"),
])
def test_a_browsers_request_from_elsewhere_is_refused_and_stores_nothing(client, model, settings, headers, refused):
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json=_deletion(model), headers=headers), 403, "forbidden")
    assert body["refused"] == refused
    assert counts(settings) == before


@pytest.mark.parametrize("headers", [
    {},  # a program
    {"Origin": "http://127.0.0.1:8000", "Host": "127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"},  # /docs
    {"Origin": "http://localhost", "Host": "localhost:80"},  # the scheme's default port, said or not
    {"Origin": "http://[::1]:8000", "Host": "[::1]:8000"},
    {"Sec-Fetch-Site": "none"},  # typed by the user
])
def test_programs_and_this_origins_own_pages_on_the_loopback_are_served(client, model, headers):
    r = client.post("/deletions", json=_deletion(model), headers=headers)
    assert r.status_code == 202, r.text


def test_reading_is_not_refused(client, model):
    """GET changes nothing: a page's reads are the browser's same-origin policy's business."""
    r = client.get("/deletions", headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200, r.text


def test_with_api_keys_a_browser_on_the_services_own_origin_may_use_any_name(settings, model):
    """A page cannot send a key it does not hold: with keys, the name under which the service
    is reached is the operator's choice (a reverse proxy's); another origin is still refused."""
    keys = {"ops": ApiKey(token_sha256=token_sha256("ops-token"), scopes=["admin"])}
    with TestClient(create_app(settings.model_copy(update={"api_keys": keys}))) as c:
        auth = {"Authorization": "Bearer ops-token"}
        r = c.post("/deletions", json=_deletion(model),
                   headers={**auth, "Origin": "https://unlearnd.example", "Host": "unlearnd.example"})
        assert r.status_code == 202, r.text
        r = c.post("/deletions", json=_deletion(model), headers={**auth, "Origin": "https://evil.example"})
        assert_problem(r, 403, "forbidden")
        # a browser's refusal comes before the key check: no key was sent to check
        assert c.post("/deletions", json=_deletion(model), headers={"Sec-Fetch-Site": "cross-site"}).json()[
            "refused"] == "cross-site-request"


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
def test_an_encoded_body_is_a_415_naming_the_encoding(client, model, settings, coding):
    """A gzip body was answered "not valid JSON"; a plain one labelled br was taken."""
    before = counts(settings)
    body = assert_problem(client.post("/deletions", json=_deletion(model), headers={"Content-Encoding": coding}),
                          415, "unsupported-media-type")
    assert coding in body["detail"] and counts(settings) == before
    r = client.post("/deletions", json=_deletion(model), headers={"Content-Encoding": "identity"})
    assert r.status_code == 202, r.text


def test_an_encoded_or_mistyped_body_needs_the_key_first(settings, model):
    """As for a body that is not JSON: a caller without the route's key gets the 401 first."""
    keys = {"ops": ApiKey(token_sha256=token_sha256("ops-token"), scopes=["admin"])}
    with TestClient(create_app(settings.model_copy(update={"api_keys": keys}))) as c:
        assert_problem(c.post("/deletions", content=b"{}", headers={"Content-Encoding": "gzip"}), 401)
        assert_problem(c.post(f"/models/{model.name}/purge", headers={"Content-Type": "text/plain"}), 401)


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1:8000", ("127.0.0.1", 8000)), ("LOCALHOST", ("localhost", None)), ("[::1]:80", ("::1", 80)),
    ("[::1]", ("::1", None)), ("example.com.", ("example.com", None)), ("a:b", ("a", None)),
])
def test_authority(host, expected):
    assert _authority(host) == expected


@pytest.mark.parametrize("name, loopback", [
    ("localhost", True), ("api.localhost", True), ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
    ("0.0.0.0", False), ("10.0.0.1", False), ("example.com", False), ("localhost.example.com", False), ("", False),
])
def test_is_loopback(name, loopback):
    assert is_loopback(name) is loopback


def test_the_operators_origins_pass_behind_a_proxy_that_rewrites_the_host(settings, model):
    """nginx's default Host is the upstream's ($proxy_host): every browser request through it,
    /docs included, looked cross-origin. UNLEARND_ALLOWED_ORIGINS names the public origins."""
    allowed = settings.model_copy(update={"allowed_origins": ("https://unlearnd.example",)})
    with TestClient(create_app(allowed)) as c:
        proxied = {"Origin": "https://unlearnd.example", "Host": "127.0.0.1:8000"}
        r = c.post("/deletions", json=_deletion(model), headers=proxied)
        assert r.status_code == 202, r.text
        r = c.post("/deletions", json={**_deletion(model), "instance_id": model.train_ids[1]},
                   headers={**proxied, "Sec-Fetch-Site": "cross-site"})  # a portal's page on that origin
        assert r.status_code == 202, r.text
        for headers in ({"Origin": "https://evil.example", "Host": "127.0.0.1:8000"},
                        {"Origin": "https://unlearnd.example.evil", "Host": "127.0.0.1:8000"},
                        {"Sec-Fetch-Site": "cross-site"}):
            assert_problem(c.post("/deletions", json=_deletion(model), headers=headers), 403, "forbidden")


@pytest.mark.parametrize("value, origins", [
    ("https://Unlearnd.Example:443, http://localhost:8080/", ("https://unlearnd.example", "http://localhost:8080")),
    ("http://[::1]:8000", ("http://[::1]:8000",)), ("", ()), (" , ", ()),
])
def test_allowed_origins_are_kept_as_a_browser_writes_them(value, origins):
    from worker.settings import Settings

    assert Settings(_env_file=None, allowed_origins=value).allowed_origins == origins


@pytest.mark.parametrize("value", ["unlearnd.example", "ftp://x", "https://x/api", "https://x:port", "https://u@x"])
def test_what_is_not_a_web_origin_is_refused(value):
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="is not a web origin"):
        Settings(_env_file=None, allowed_origins=value)
