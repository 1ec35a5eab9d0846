"""Personal data never leaks through the service: a canary user id, event text and prompt go in
through every route that takes them; afterwards no log line (ours, uvicorn's, the store's) and no
file under USERLLM_HOME (databases, WAL, cached user tokens, FAISS index) holds them in clear."""
from __future__ import annotations

import logging
import secrets

import httpx
import pytest

from api_helpers import make_keys, settings_for

pytestmark = pytest.mark.xdist_group("api")


def test_canaries_reach_no_log_and_no_file(sqlite_backend, tiny_models, serve, caplog):
    canary_user = f"canary-user-{secrets.token_hex(4)}"
    canary_text = f"canary-text-{secrets.token_hex(4)}"
    canary_prompt = f"canary-prompt-{secrets.token_hex(4)}"
    keys = make_keys(sqlite_backend)
    caplog.set_level(logging.DEBUG)
    server = serve(settings_for(sqlite_backend, adapter=tiny_models["adapter"], log_level="debug"))
    c = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": keys["all"]})
    events = [{"event_id": f"{canary_user}:{i}", "user_id": canary_user, "item_id": f"i{i}",
               "timestamp": 1_600_000_000 + i, "fields": {"text": canary_text, "rating": 4}}
              for i in range(6)]
    assert c.post("/v1/events", json={"events": events}).status_code == 200
    bad = [{**events[0], "timestamp": "not a number"}]
    assert c.post("/v1/events", json={"events": bad}).status_code == 422
    assert c.post(f"/v1/users/{canary_user}/embedding:refresh").status_code == 200
    for path in ("embedding", "recommendations", "similar"):
        assert c.get(f"/v1/users/{canary_user}/{path}").status_code == 200
    chat = {"messages": [{"role": "user", "content": canary_prompt}], "user": canary_user, "max_tokens": 3}
    assert c.post("/v1/chat/completions", json=chat).status_code == 200
    assert c.post("/v1/chat/completions", json=chat | {"stream": True}).status_code == 200
    assert c.post(f"/v1/users/{canary_user}/generate", json={"prompt": canary_prompt}).status_code == 200
    assert c.post("/v1/chat/completions", json=chat | {"max_tokens": 10**6}).status_code == 400
    assert c.get(f"/v1/users/{canary_user}x/embedding").status_code == 404

    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                       if not r.name.startswith(("httpx", "httpcore")))  # the client logs its URLs
    for canary in (canary_user, canary_text, canary_prompt):
        assert canary not in logged, canary
    home = sqlite_backend[1]
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any("cache" in p.parts for p in files)  # the sealed user tokens are among them
    for p in files:
        data = p.read_bytes()
        for canary in (canary_user, canary_text, canary_prompt):
            assert canary.encode() not in data, (p, canary)
