"""The demo's last step: start the service on loopback, ask two users the same question through
the `openai` client with streaming, print each answer as it streams and each user's
recommendations, then stop the server. The store comes from the environment (USERLLM_HOME, ...),
as for every command; the API key made for the run is revoked at its end."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ask_through_server(adapter: str | Path, users: Sequence[str], question: str,
                       max_tokens: int = 24, k: int = 5, titles: dict[str, str] | None = None,
                       out=sys.stdout, **settings: Any) -> dict[str, dict]:  # noqa: ANN001
    """{user: {"answer": text, "recommendations": [item ids]}} from a server started here."""
    import httpx
    from openai import OpenAI

    from api.service import Settings, create_app
    from api.service.server import ServerThread
    from store import Store
    from store.admin import create_api_key
    from store.apikeys import revoke_key

    home, url, keys_url = settings.get("home"), settings.get("database_url"), settings.get("keys_database_url")
    with Store.open(home, url, keys_url) as store:
        token = create_api_key(store, ["generate"], label="demo")
    results: dict[str, dict] = {}
    try:
        app = create_app(Settings.load(adapter=Path(adapter), **settings))
        with ServerThread(app) as server:
            print(f"serving on {server.url} (OpenAPI at {server.url}/docs)", file=out, flush=True)
            client = OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0)
            for user in users:
                print(f"-- user {user}: ", end="", file=out, flush=True)
                stream = client.chat.completions.create(
                    model="userllm", messages=[{"role": "user", "content": question}],
                    user=user, max_tokens=max_tokens, stream=True)
                parts = []
                for chunk in stream:
                    text = chunk.choices[0].delta.content or "" if chunk.choices else ""
                    parts.append(text)
                    print(text, end="", file=out, flush=True)
                print(file=out)
                r = httpx.get(f"{server.url}/v1/users/{user}/recommendations", params={"k": k},
                              headers={"Authorization": f"Bearer {token}"}, timeout=60)
                r.raise_for_status()
                recs = [item["item_id"] for item in r.json()["items"]]
                names = [(titles or {}).get(i, f"item {i}") for i in recs]
                print(f"   recommendations (not yet seen) [source: {r.json()['source']}]: " + "; ".join(names),
                      file=out, flush=True)
                results[user] = {"answer": "".join(parts), "recommendations": recs}
    finally:
        with Store.open(home, url, keys_url) as store:
            revoke_key(store.data, token)
    return results
