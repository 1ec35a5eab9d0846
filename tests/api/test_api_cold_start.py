"""Recommendations for a user with no events: the popularity fallback (training counts saved in
the encoder checkpoint), with `source` saying so, through UserOps and the REST route; a user
with events gets the encoder (`source: encoder`); an erased user stays unknown."""
from __future__ import annotations

import httpx
import pytest

from api_helpers import make_keys, settings_for

pytestmark = pytest.mark.xdist_group("api")


def test_unknown_user_gets_popularity_and_is_told(tiny_models, sqlite_backend, serve):
    from api.personalize import ranked_for, recommend
    from api.userops import UnknownUser, UserOps
    from store import Store, delete_user
    from userenc.checkpoint import load_checkpoint
    from userenc.cold_start import popular_items

    _, home, data_url, keys_url = sqlite_backend
    histories = tiny_models["histories"]
    u = sorted(histories)[0]
    encoder = load_checkpoint(tiny_models["encoder"])
    assert encoder.tokenizer.item_counts is not None, "new checkpoints keep training counts"
    expected = [i for i, _ in popular_items(encoder.tokenizer, 5).items]
    # The CLI/demo path: the same fallback, and the source named.
    assert ranked_for(encoder, [], 5).source == "popularity" and [i for i, _ in ranked_for(encoder, [], 5).items] == expected
    warm_direct = ranked_for(encoder, histories[u], 5)
    assert warm_direct.source == "encoder" and warm_direct.items == recommend(encoder, histories[u], 5)
    with Store.open(home, data_url, keys_url) as store:
        store.ingest(histories[u])
        ops = UserOps(store, encoder=encoder)
        try:
            cold = ops.recommendations("nobody", 5)
            assert cold.source == "popularity" and [i for i, _ in cold.items] == expected
            warm = ops.recommendations(u, 5)
            assert warm.source == "encoder" and len(warm.items) == 5
            delete_user(store, u)
            with pytest.raises(UnknownUser):  # erased: refused as everywhere, not a fallback
                ops.recommendations(u, 5)
        finally:
            ops.close()

    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, encoder=tiny_models["encoder"]))
    r = httpx.get(f"{server.url}/v1/users/newcomer/recommendations", params={"k": 5},
                  headers={"X-API-Key": keys["generate"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "popularity"
    assert [i["item_id"] for i in r.json()["items"]] == expected
