"""Fuzzing: schemathesis generates requests from the service's own OpenAPI spec (valid ones for
every operation, then schema-violating ones) against a real uvicorn server with a tiny model
and a small store; no answer may be a 5xx. At least 1,000 cases in all, in CI's budget."""
from __future__ import annotations

import httpx
import pytest

from api_helpers import fuzz, settings_for

pytestmark = pytest.mark.xdist_group("api")
CASES = 1000


def test_no_server_errors_over_generated_requests(sqlite_backend, tiny_models, serve):
    pytest.importorskip("schemathesis")
    from store import Store
    from store.admin import create_api_key

    _, home, data_url, keys_url = sqlite_backend
    with Store.open(home, data_url, keys_url) as store:
        token = create_api_key(store, ["events:write", "generate", "embeddings:read", "admin"])
    server = serve(settings_for(sqlite_backend, adapter=tiny_models["adapter"], max_tokens=4,
                                max_events_per_request=100, max_k=20))
    histories = tiny_models["histories"]
    events = [{"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id,
               "timestamp": e.timestamp, "fields": e.fields} for u in sorted(histories)[:3]
              for e in histories[u]]
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{server.url}/v1/events", json={"events": events}, headers=auth).status_code == 200

    seen, failures = fuzz(server.url, auth, CASES)
    total = sum(seen.values())
    print("fuzz statuses", dict(sorted(seen.items())))
    assert total >= CASES, seen
    assert not failures, failures[:5]
    assert seen.get(200, 0) > 50, seen  # the valid half reaches the routes, not only validation
