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
        from userenc.events import Event

        far = [Event(e.event_id, e.user_id, e.item_id, e.timestamp + 2**32, e.fields) for e in history]
        state, _ = _state_now(encoder, _rank_inputs(encoder, far), far[-1].timestamp + 40 * DAY)
        assert torch.allclose(state, encoder.last_states([far], now=far[-1].timestamp + 40 * DAY)[0], atol=1e-5)
