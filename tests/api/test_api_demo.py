"""The demo's last step (api/demo_serve.py) on tiny models: a server on loopback, two users
asked through the openai client with streaming, their recommendations, the key revoked after."""
from __future__ import annotations

import io

import pytest

pytestmark = pytest.mark.xdist_group("api")


def test_ask_through_server_streams_two_users_and_revokes_its_key(backend, tiny_models):
    from api.demo_serve import ask_through_server
    from store import Store
    from store.models import ApiKey

    _, home, data_url, keys_url = backend
    histories = tiny_models["histories"]
    users = sorted(histories)[:2]
    with Store.open(home, data_url, keys_url) as store:
        store.ingest([e for u in users for e in histories[u]])
    out = io.StringIO()
    results = ask_through_server(tiny_models["adapter"], users, "What is my favourite movie genre?",
                                 max_tokens=4, k=3, out=out, home=home, database_url=data_url,
                                 keys_database_url=keys_url, threads=1, kv_cache_mb=8)
    assert set(results) == set(users)
    for u in users:
        assert results[u]["answer"] and len(results[u]["recommendations"]) == 3
        assert not {e.item_id for e in histories[u]} & set(results[u]["recommendations"])
    text = out.getvalue()
    assert f"-- user {users[0]}: " in text and "recommendations (not yet seen)" in text
    with Store.open(home, data_url, keys_url) as store, store.data.connect() as conn:
        assert all(r.revoked_at is not None for r in conn.execute(ApiKey.__table__.select()))
