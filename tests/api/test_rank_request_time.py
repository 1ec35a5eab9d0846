"""Serving an encoder that reads the time until the request (a "next_gap" feature): a ranking
depends on when it is asked, and the sealed cache still answers at any later time (it holds the
latest state for every bucket of that time, and the last event's time to pick one) without
reading the history again."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.xdist_group("api")

SPEC = ('[[feature]]\nname = "item"\nkind = "categorical"\nsource = "item_id"\ntarget = true\n'
        '[[feature]]\nname = "gap"\nkind = "time"\npart = "gap"\n'
        '[[feature]]\nname = "next_gap"\nkind = "time"\npart = "next_gap"\n')


def _request_time_encoder(tmp_path, histories):
    from userenc.checkpoint import load_checkpoint, save_checkpoint
    from userenc.config import EncoderConfig
    from userenc.model import UserEncoder
    from userenc.spec import load_spec
    from userenc.tokenize import EventTokenizer

    (tmp_path / "next.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "next.toml")
    tok = EventTokenizer.fit(spec, histories.values())
    cfg = EncoderConfig(d_model=32, n_heads=2, n_layers=1, max_len=32, seen_bias=True,
                        vocab_sizes={f.name: tok.vocab_size(f) for f in spec.features})
    torch.manual_seed(0)
    return load_checkpoint(save_checkpoint(tmp_path / "enc", UserEncoder(spec, cfg, tok.item_attributes), tok, {}))


def _shifted(history, seconds: int):
    from userenc.events import Event

    return [Event(e.event_id, e.user_id, e.item_id, e.timestamp + seconds, e.fields) for e in history]


def test_rankings_follow_the_request_time_and_the_cache_answers_at_any_time(tiny_models, sqlite_backend, tmp_path):
    from api.personalize import cached_recommend, recommend
    from store import Store
    from userenc.spec import DAY, FIRST_ID

    _, home, data_url, keys_url = sqlite_backend
    histories = tiny_models["histories"]
    u = sorted(histories)[0]
    encoder = _request_time_encoder(tmp_path, histories)
    assert encoder.request_gap is not None
    with Store.open(home, data_url, keys_url) as store:
        store.ingest(histories[u])
        history = store.history(u)
        last = history[-1].timestamp
        soon, later = last + 30, last + 40 * DAY  # two buckets of the time until the request
        rows = encoder.last_states_per_request_gap(history)
        assert rows.shape[0] == encoder.request_gap.fixed_size - FIRST_ID
        for now in (soon, later):
            # The per-bucket row is the state of the history asked at that time.
            row = encoder.request_gap_row(last, now)
            assert torch.allclose(rows[row], encoder.last_states([history], now=now)[0], atol=1e-5)
        direct = {now: recommend(encoder, history, 5, now=now) for now in (soon, later)}
        assert direct[soon] != direct[later], "a random encoder reads the request time"
        first, hit1 = cached_recommend(store, encoder, "v1", u, 5, lambda: store.history(u), now=soon)
        again, hit2 = cached_recommend(store, encoder, "v1", u, 5, lambda: 1 / 0, now=later)  # no read
        assert (hit1, hit2) == (False, True)
        for got, now in ((first, soon), (again, later)):
            assert [i for i, _ in got] == [i for i, _ in direct[now]]
            scores = encoder.next_item_scores([history], now=now)[0]
            assert torch.allclose(torch.tensor([s for _, s in got]),
                                  torch.stack([scores[encoder.tokenizer.vocabs["item"].id(i)] for i, _ in got]), atol=1e-4)

        # Times past int32 (the cache's integers) round-trip: the bucket is the one of the time.
        from api.personalize import _rank_inputs, _state_now

        far = _shifted(history, 2**32)
        state, _ = _state_now(encoder, _rank_inputs(encoder, far), far[-1].timestamp + 40 * DAY)
        assert torch.allclose(state, encoder.last_states([far], now=far[-1].timestamp + 40 * DAY)[0], atol=1e-5)


def test_the_rest_route_ranks_at_the_clock_and_a_new_event_moves_the_time(tiny_models, sqlite_backend, serve, tmp_path):
    """Serving what evaluation measures: through REST, a request-time encoder ranks at the
    service's clock, and an event posted since counts from its own time."""
    import time

    import httpx

    from api.personalize import recommend
    from api_helpers import make_keys, settings_for
    from store import Store
    from userenc.events import Event
    from userenc.spec import DAY

    _, home, data_url, keys_url = sqlite_backend
    histories = tiny_models["histories"]
    u = sorted(histories)[0]
    encoder = _request_time_encoder(tmp_path, histories)
    # The user's last event two days ago, the one posted later half an hour ago: each sits in
    # the middle of a bucket of the time until the request, so a slow test cannot cross one.
    shift = int(time.time()) - 2 * DAY - histories[u][-1].timestamp
    history = _shifted(histories[u], shift)
    with Store.open(home, data_url, keys_url) as store:
        store.ingest(history)
    keys = make_keys(sqlite_backend)
    server = serve(settings_for(sqlite_backend, encoder=tmp_path / "enc"))
    api = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": keys["all"]})

    def served() -> list[str]:
        before = int(time.time())
        r = api.get(f"/v1/users/{u}/recommendations", params={"k": 5})
        assert r.status_code == 200, r.text
        assert encoder.request_gap_row(history[-1].timestamp, before) == \
            encoder.request_gap_row(history[-1].timestamp, int(time.time()))
        return [i["item_id"] for i in r.json()["items"]]

    first = served()
    assert first == [i for i, _ in recommend(encoder, history, 5, now=int(time.time()))]
    assert first != [i for i, _ in recommend(encoder, history, 5, now=history[-1].timestamp + 30)]
    seen = {e.item_id for e in history}
    new_item = next(i for e in histories.values() for i in (x.item_id for x in e) if i not in seen)
    new = Event(f"{u}-live", u, new_item, int(time.time()) - 1800, dict(history[-1].fields))
    r = api.post("/v1/events", json={"events": [new.to_dict()]})
    assert r.status_code == 200 and r.json()["inserted"] == 1, r.text
    history.append(new)
    assert served() == [i for i, _ in recommend(encoder, history, 5, now=int(time.time()))]
