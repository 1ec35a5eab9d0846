"""Engine integration through HTTP: concurrent requests share the engine's batching, a client
that goes away mid-stream has its request cancelled and its KV blocks freed, every request has
a timeout (504), and the sealed user-token cache is refreshed when new events arrive."""
from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from api_helpers import make_keys, settings_for

pytestmark = pytest.mark.xdist_group("api")
ASK = [{"role": "user", "content": "Which movie will I watch next?"}]


def _ingest(c: httpx.Client, histories, users) -> None:  # noqa: ANN001
    events = [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
               "timestamp": e.timestamp, "fields": e.fields} for u in users for e in histories[u]]
    assert c.post("/v1/events", json={"events": events}).status_code == 200


def _engine(server):  # noqa: ANN001, ANN202
    return server.app.state.engine.engine


def test_concurrency_disconnect_timeout_and_cache_refresh(sqlite_backend, tiny_models, serve):
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, adapter=tiny_models["adapter"], max_tokens=256))
    histories = tiny_models["histories"]
    users = sorted(histories)[:4]
    c = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": keys["all"]})
    _ingest(c, histories, users)

    # Eight concurrent chats: all answered, the engine batched them (fewer steps than tokens).
    before = _engine(server).num_steps
    body = {"messages": ASK, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    with cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: c.post("/v1/chat/completions",
                                                 json=body | {"user": users[i % 4]}), range(8)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    assert _engine(server).num_steps - before < tokens

    # A client that disconnects after the first chunk: its request is cancelled, blocks freed.
    # (A seed whose answer, left alone, runs to max_tokens: sampling is seeded, so it is fixed.)
    long = {"messages": ASK, "max_tokens": 256, "temperature": 2.0, "stream": True, "user": users[0]}
    for seed in range(40):
        full = c.post("/v1/chat/completions", json=long | {"stream": False, "seed": seed}).json()
        if full["usage"]["completion_tokens"] == 256:
            long["seed"] = seed
            break
    assert "seed" in long
    steps = _engine(server).num_steps
    with c.stream("POST", "/v1/chat/completions", json=long) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    eng = _engine(server)
    for _ in range(200):
        stats = eng.stats()
        if not eng.has_unfinished() and stats["free_blocks"] == stats["num_blocks"]:
            break
        time.sleep(0.02)
    assert not eng.has_unfinished() and stats["free_blocks"] == stats["num_blocks"], stats
    assert eng.num_steps - steps < 200  # stopped well before its 256 tokens

    # New events change the history: the cached tokens are recomputed (a miss), then hit again.
    def cache(result: str) -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(f'userllm_user_token_cache_total{{result="{result}"}}'):
                return float(line.split()[-1])
        return 0.0

    misses, hits = cache("miss"), cache("hit")
    c.post("/v1/events", json={"events": [{"event_id": "new-1", "user_id": users[0], "item_id": "i7",
                                           "timestamp": 1_900_000_000, "fields": {"rating": 5}}]})
    short = {"messages": ASK, "max_tokens": 2, "user": users[0]}
    assert c.post("/v1/chat/completions", json=short).status_code == 200
    assert cache("miss") == misses + 1 and cache("hit") == hits
    assert c.post("/v1/chat/completions", json=short).status_code == 200
    assert cache("hit") == hits + 1
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("userllm_engine_queue_depth", "userllm_engine_kv_blocks_in_use",
                 "userllm_generated_tokens_total", "userllm_time_to_first_token_seconds_count",
                 "userllm_user_tokens_refresh_seconds_count"):
        assert name in metrics, name


def test_requests_time_out(sqlite_backend, tiny_models, serve):
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, adapter=tiny_models["adapter"], max_tokens=256,
                                request_timeout_s=0.01))
    c = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": keys["generate"]})
    body = {"messages": ASK, "max_tokens": 256, "temperature": 1.0, "seed": 1}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
    eng = _engine(server)
    for _ in range(200):
        if not eng.has_unfinished():
            break
        time.sleep(0.02)
    assert not eng.has_unfinished()


def test_base_model_alone_answers_unpersonalized(sqlite_backend, tiny_models, serve):
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, model=tiny_models["llm"]))
    c = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": keys["all"]})
    histories = tiny_models["histories"]
    _ingest(c, histories, sorted(histories)[:1])
    r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3, "user": sorted(histories)[0]})
    assert r.status_code == 200 and r.headers["x-userllm-personalized"] == "false", r.text
    r = c.get(f"/v1/users/{sorted(histories)[0]}/recommendations")
    assert r.status_code == 503 and "encoder" in r.json()["error"]["message"]
    assert c.get("/readyz").json()["checks"] == {"store": "ok", "model": "ok", "encoder": "not configured"}
