"""The service end to end against a real uvicorn server on 127.0.0.1, on SQLite and PostgreSQL:
ingest -> refresh -> chat (streamed and not, through the `openai` client) -> recommendations ->
similar -> erase, then 404s, a clean verify-deleted and no cached user tokens left."""
from __future__ import annotations

import time

import httpx
import pytest

from api_helpers import make_keys, settings_for

pytestmark = pytest.mark.xdist_group("api")


def _events(histories, users):  # noqa: ANN001, ANN202
    return [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
             "timestamp": e.timestamp, "fields": e.fields}
            for u in users for e in histories[u]]


def test_ingest_refresh_chat_recommend_similar_erase(backend, tiny_models, serve):
    from openai import OpenAI

    from store import Store, verify_deleted

    keys = make_keys(backend)
    server = serve(settings_for(backend, adapter=tiny_models["adapter"]))
    api = httpx.Client(base_url=server.url, timeout=60,
                       headers={"Authorization": f"Bearer {keys['all']}"})
    histories = tiny_models["histories"]
    users = sorted(histories)[:8]
    batch = _events(histories, users)

    # Ingest, then the same batch again: idempotent.
    r = api.post("/v1/events", json={"events": batch})
    assert r.status_code == 200, r.text
    assert r.json() == {"received": len(batch), "inserted": len(batch), "duplicates": 0, "refused_erased": 0}
    r = api.post("/v1/events", json={"events": batch[:5]})
    assert r.json()["inserted"] == 0 and r.json()["duplicates"] == 5
    # One bad event refuses the whole request.
    bad = [*_events(histories, [sorted(histories)[9]]), {**batch[0], "timestamp": -1}]
    assert api.post("/v1/events", json={"events": bad}).status_code == 422
    with Store.open(backend[1], backend[2], backend[3]) as store:
        assert store.history(sorted(histories)[9]) == []

    # Embeddings: none until refreshed; refresh stores and indexes them.
    u = users[0]
    assert api.get(f"/v1/users/{u}/embedding").status_code == 404
    for user in users:
        r = api.post(f"/v1/users/{user}/embedding:refresh")
        assert r.status_code == 200, r.text
    emb = api.get(f"/v1/users/{u}/embedding").json()
    assert emb["dim"] == 8 and len(emb["embedding"]) == 8

    # Chat through the openai client, plain and streamed.
    client = OpenAI(base_url=f"{server.url}/v1", api_key=keys["all"], max_retries=0)
    msgs = [{"role": "user", "content": "What is my favourite movie genre?"}]
    raw = client.chat.completions.with_raw_response.create(model="userllm", messages=msgs,
                                                           user=u, max_tokens=6, seed=1)
    assert raw.headers["x-userllm-personalized"] == "true"
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(model="userllm", messages=msgs, user=u,
                                              max_tokens=6, stream=True, seed=1)
    parts, finish = [], None
    for chunk in streamed:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == reply.choices[0].message.content and finish == reply.choices[0].finish_reason
    # An unknown user gets the base model (cold start), said in a header.
    raw = client.chat.completions.with_raw_response.create(model="userllm", messages=msgs,
                                                           user="nobody", max_tokens=2)
    assert raw.headers["x-userllm-personalized"] == "false"
    r = api.post(f"/v1/users/{u}/generate", json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["personalized"] is True, r.text

    # The second request for the same history came from the sealed token cache.
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'userllm_user_token_cache_total{result="hit"}' in metrics
    with Store.open(backend[1], backend[2], backend[3]) as store:
        cache_dir = store.artefact_dir(store.hasher.user(u))
    assert cache_dir.is_dir() and any(cache_dir.iterdir())

    # Recommendations: unseen items only.
    recs = api.get(f"/v1/users/{u}/recommendations", params={"k": 5}).json()["items"]
    seen = {e.item_id for e in histories[u]}
    assert len(recs) == 5 and not seen & {r["item_id"] for r in recs}
    sim = api.get(f"/v1/users/{u}/similar", params={"k": 3}).json()["users"]
    assert len(sim) == 3 and u not in {s["user_id"] for s in sim}

    # Erase through the admin API: 202 with a request id, then done.
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    r = httpx.delete(f"{server.url}/v1/admin/users/{u}", headers=admin)
    assert r.status_code == 202 and r.headers["x-request-id"], r.text
    rid = r.json()["request_id"]
    for _ in range(200):
        status = httpx.get(f"{server.url}/v1/admin/erasures/{rid}", headers=admin).json()
        if status["status"] == "done":
            break
        time.sleep(0.05)
    assert status["status"] == "done" and set(status["steps"].values()) == {"done"}
    ops = server.app.state.ops
    ops.pending[rid].result(timeout=60)
    # No cached KV block computed from the erased user's tokens survives in the engine.
    assert not ops.personalizer.engine.block_manager.hash_to_block

    for path in (f"/v1/users/{u}/embedding", f"/v1/users/{u}/recommendations",
                 f"/v1/users/{u}/similar"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (path, r.text)
    assert api.post(f"/v1/users/{u}/embedding:refresh").status_code == 404
    assert api.post(f"/v1/users/{u}/generate", json={"prompt": "Hi"}).status_code == 404
    for other in users[1:]:  # nobody surfaces the erased user
        sim = api.get(f"/v1/users/{other}/similar", params={"k": 10}).json()["users"]
        assert u not in {s["user_id"] for s in sim}
    # Events of the erased user are refused, not stored.
    r = api.post("/v1/events", json={"events": batch[:1]})
    assert r.json()["refused_erased"] == 1
    with Store.open(backend[1], backend[2], backend[3]) as store:
        v = verify_deleted(store, u)
        assert v.clean, v.remaining
    assert not cache_dir.exists()

    audit = httpx.get(f"{server.url}/v1/admin/audit", headers=admin, params={"limit": 1000}).json()
    actions = [e["action"] for e in audit["entries"]]
    assert audit["verified"] and "erasure.requested" in actions and "erasure.completed" in actions
    assert u not in str(audit)  # keyed ids only

    rot = httpx.post(f"{server.url}/v1/admin/keys/rotate", headers=admin)
    assert rot.status_code == 200 and rot.json()["to_version"] >= 1, rot.text
    # Still readable after the rotation.
    assert api.get(f"/v1/users/{users[1]}/embedding").status_code == 200
