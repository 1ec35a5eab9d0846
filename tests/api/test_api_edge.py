"""The service's edge against a real uvicorn server: the auth matrix (no key 401, unknown key
401, wrong scope 403, admin-only routes), 413 before the body is read (Content-Length, and a
chunked body counted as it streams), 415, 429 (in-process and Redis), security headers, request
ids, one error body shape, and access logs without user ids. No model is loaded: these checks
stop before any model would run."""
from __future__ import annotations

import logging
import secrets
import socket

import httpx
import pytest

from api_helpers import make_keys, settings_for

pytestmark = pytest.mark.xdist_group("api")

ROUTES = [  # (method, path, scope, json body)
    ("POST", "/v1/events", "events:write", {"events": [{"event_id": "e1", "user_id": "u1", "item_id": "i1", "timestamp": 1}]}),
    ("GET", "/v1/users/u1/embedding", "embeddings:read", None),
    ("POST", "/v1/users/u1/embedding:refresh", "embeddings:read", None),
    ("GET", "/v1/users/u1/similar", "embeddings:read", None),
    ("GET", "/v1/users/u1/recommendations", "generate", None),
    ("POST", "/v1/chat/completions", "generate", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/users/u1/generate", "generate", {"prompt": "hi"}),
    ("GET", "/v1/admin/audit", "admin", None),
    ("GET", "/v1/admin/erasures/1", "admin", None),
    ("DELETE", "/v1/admin/users/u1", "admin", None),
]


@pytest.fixture
def edge_server(sqlite_backend, serve):
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, max_body_bytes=2048))
    return server, keys


def _error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind and body["error"]["message"]
    assert body["error"]["request_id"] == r.headers["x-request-id"]


def test_auth_matrix(edge_server):
    server, keys = edge_server
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, scope, body in ROUTES:
            _error(c.request(method, path, json=body), 401, "unauthorized")
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer ulk_nope"})
            _error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            for other in ("events:write", "generate", "embeddings:read", "admin"):
                if other == scope:
                    continue
                r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {keys[other]}"})
                _error(r, 403, "forbidden")
            # The right scope passes auth (what follows is the route's own answer).
            r = c.request(method, path, json=body, headers={"X-API-Key": keys[scope]})
            assert r.status_code not in (401, 403), (path, r.text)
        # The key with every non-admin scope still cannot reach admin routes.
        r = c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {keys['all']}"})
        _error(r, 403, "forbidden")
        r = c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {keys['admin']}"})
        assert r.status_code == 200 and r.json()["verified"] is True
        # Without a model, generation says so (503), after auth.
        r = c.post("/v1/chat/completions", json=ROUTES[5][3], headers={"X-API-Key": keys["generate"]})
        _error(r, 503, "unavailable")
        # Health, readiness and metrics need no key.
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["store"] == "ok"
        assert "userllm_http_requests_total" in c.get("/metrics").text


def test_body_limits_content_types_headers_and_request_ids(edge_server, caplog):
    server, keys = edge_server
    auth = {"Authorization": f"Bearer {keys['events:write']}"}
    big = {"events": [{"event_id": f"e{i}", "user_id": "secret-user-77", "item_id": "i", "timestamp": 1} for i in range(100)]}
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _error(c.post("/v1/events", json=big, headers=auth), 413, "payload_too_large")
        # Chunked (no Content-Length): refused as the bytes arrive, before they are all read.
        chunks = (b"x" * 1024 for _ in range(64))
        r = c.post("/v1/events", content=chunks, headers=auth | {"Content-Type": "application/json"})
        _error(r, 413, "payload_too_large")
        # Content-Length is checked before authentication: no body is read for anyone.
        _error(c.post("/v1/events", json=big), 413, "payload_too_large")
        _error(c.post("/v1/events", content=b"a=1", headers=auth | {"Content-Type": "application/x-www-form-urlencoded"}),
               415, "unsupported_media_type")
        _error(c.post("/v1/events", content=b"{}", headers=auth | {"Content-Type": "text/plain"}), 415,
               "unsupported_media_type")
        _error(c.post("/v1/events", content=b"{not json", headers=auth | {"Content-Type": "application/json"}), 422,
               "invalid_request")
        r = c.get("/v1/users/secret-user-77/embedding", headers={"X-Request-ID": "trace-123"})
        assert r.headers["x-request-id"] == "trace-123" and r.json()["error"]["request_id"] == "trace-123"
        r = c.get("/v1/users/secret-user-77/embedding", headers={"X-Request-ID": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32
        for r in (c.get("/healthz"), c.get("/nowhere"), c.get("/v1/admin/audit", headers={"X-API-Key": keys["admin"]})):
            assert r.headers["cache-control"] == "no-store"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
        _error(c.get("/nowhere"), 404, "not_found")
        _error(c.get("/v1/users/u1/recommendations", params={"k": 0}, headers={"X-API-Key": keys["generate"]}),
               422, "invalid_request")
    # The server's log lines (httpx, the client here, logs its own URLs).
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "/v1/users/{user_id}/embedding" in logged and "secret-user-77" not in logged


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_rate_limit_answers_429(sqlite_backend, serve, where):
    if where == "redis" and not _redis_up():
        pytest.skip("Redis at 127.0.0.1:6379 is unreachable")
    keys = make_keys(sqlite_backend)
    redis = "redis://127.0.0.1:6379/0" if where == "redis" else None
    server = serve(settings_for(sqlite_backend, rate_limit="5/minute",
                                rate_limit_per_address="12/minute", redis_url=redis,
                                rate_limit_namespace=f"userllm-test-{secrets.token_hex(4)}"))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        codes = [c.get("/v1/admin/audit", headers=admin).status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
        r = c.get("/v1/admin/audit", headers=admin)
        _error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        # Another key has its own window; health checks are never limited.
        assert c.get("/v1/admin/audit", headers={"X-API-Key": keys["generate"]}).status_code == 403
        assert all(c.get("/healthz").status_code == 200 for _ in range(8))
        # Made-up keys buy no extra requests: the address has its own window (12; 9 used).
        codes = [c.get("/v1/admin/audit", headers={"X-API-Key": f"ulk_fake{i}"}).status_code
                 for i in range(6)]
        assert codes == [401] * 3 + [429] * 3, codes
        if where == "redis":
            assert c.get("/readyz").json()["checks"]["rate_limit"] == "ok"


def test_unreachable_redis_fails_closed_with_503(sqlite_backend, serve):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(settings_for(sqlite_backend, rate_limit="5/minute",
                                redis_url=f"redis://127.0.0.1:{port}/0"))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _error(c.get("/v1/admin/audit", headers={"X-API-Key": "ulk_any"}), 503, "unavailable")
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["rate_limit"].startswith("unavailable")


def test_a_bug_answers_500_with_headers_and_logs_no_message(edge_server, caplog):
    server, keys = edge_server

    secret = "-".join(("secret", "user", "99"))  # a value: the logged frames show code only

    def broken(after: int, limit: int) -> dict:
        raise RuntimeError(f"{secret} was in this message")

    server.app.state.ops.audit = broken
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get("/v1/admin/audit", headers={"X-API-Key": keys["admin"], "X-Request-ID": "bug-1"})
    _error(r, 500, "internal_error")
    assert r.json()["error"]["message"] == "internal error" and r.headers["x-request-id"] == "bug-1"
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("userllm"))
    assert "unhandled RuntimeError on /v1/admin/audit" in logged and secret not in logged


def test_api_keys_created_listed_and_revoked_over_http_and_cli(edge_server, sqlite_backend):
    import subprocess
    import sys

    from api_helpers import subprocess_env

    server, keys = edge_server
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # Only the admin scope manages keys; a bad scope name is refused before anything is made.
        r = c.post("/v1/admin/api-keys", json={"scopes": ["admin"]},
                   headers={"Authorization": f"Bearer {keys['all']}"})
        _error(r, 403, "forbidden")
        _error(c.post("/v1/admin/api-keys", json={"scopes": ["root"]}, headers=admin), 422,
               "invalid_request")
        before = len(c.get("/v1/admin/api-keys", headers=admin).json()["keys"])
        r = c.post("/v1/admin/api-keys", json={"scopes": ["generate", "generate"], "label": "ci"},
                   headers=admin)
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["key"].startswith("ulk_") and made["scopes"] == ["generate"]
        listed = c.get("/v1/admin/api-keys", headers=admin).json()["keys"]
        assert len(listed) == before + 1
        mine = next(k for k in listed if k["id"] == made["id"])
        assert mine["label"] == "ci" and mine["revoked_at"] is None and set(mine) == {
            "id", "label", "scopes", "created_at", "revoked_at"}
        new = {"Authorization": f"Bearer {made['key']}"}
        # The new key works for its scope (past the auth check: an unknown user gets the
        # popularity fallback, or 503 without an encoder) at once ...
        assert c.get("/v1/users/nobody/recommendations", headers=new).status_code in (200, 503)
        # ... and stops at once when revoked here, even though the checker had cached it.
        assert c.delete(f"/v1/admin/api-keys/{made['id']}", headers=admin).status_code == 204
        _error(c.get("/v1/users/nobody/recommendations", headers=new), 401, "unauthorized")
        _error(c.delete(f"/v1/admin/api-keys/{made['id']}", headers=admin), 404, "not_found")
        audit = c.get("/v1/admin/audit", params={"limit": 1000}, headers=admin).json()
        kinds = [e["action"] for e in audit["entries"]]
        assert "api-key.created" in kinds and "api-key.revoked" in kinds and audit["verified"]

    # The same through the CLI: list-keys prints ids and states (never a key), revoke-key by id.
    env = subprocess_env(sqlite_backend)
    cli = [sys.executable, "-m", "api.cli", "admin"]
    listed = subprocess.run([*cli, "list-keys"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [r[1] for r in rows if r[0] == str(made["id"])] == ["revoked"]
    assert not any(k in listed.stdout for k in keys.values())
    live = next(r[0] for r in rows if r[1] == "live" and r[2] == "admin")
    out = subprocess.run([*cli, "revoke-key", "--id", live], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    again = subprocess.run([*cli, "revoke-key", "--id", live], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "no live API key" in again.stderr


def test_store_routes_answer_504_past_the_request_timeout_and_a_retry_is_harmless(
        sqlite_backend, serve, monkeypatch):
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, request_timeout_s=0.3))
    auth = {"Authorization": f"Bearer {keys['events:write']}"}
    batch = {"events": [{"event_id": f"e{i}", "user_id": "u-slow", "item_id": f"i{i}",
                         "timestamp": 1_000 + i} for i in range(3)]}
    # The store's test hook holds the ingest transaction open for 1 s: past the 0.3 s timeout.
    monkeypatch.setenv("USERLLM_TEST_BATCH_DELAY", "1.0")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/events", json=batch, headers=auth)
        _error(r, 504, "timeout")
        monkeypatch.delenv("USERLLM_TEST_BATCH_DELAY")
        import time

        time.sleep(1.2)  # the timed-out write finishes in its thread
        r = c.post("/v1/events", json=batch, headers=auth)
        assert r.status_code == 200 and r.json()["duplicates"] == 3 and r.json()["inserted"] == 0
