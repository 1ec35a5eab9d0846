"""The recommendations' sealed latest-state cache: the same ranking as running the encoder, a hit
for an unchanged history (checked by the store's digest of event row ids: the history is not
even read), a recompute when an event arrives, sealed like every artefact, and gone with the
user's erasure."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.xdist_group("api")


def test_cached_ranking_matches_the_encoder_and_follows_the_history(tiny_models, sqlite_backend):
    from api.personalize import cached_recommend, recommend
    from store import Store, delete_user
    from userenc.checkpoint import load_checkpoint
    from userenc.events import Event

    _, home, data_url, keys_url = sqlite_backend
    histories = tiny_models["histories"]
    users = sorted(histories)[:3]
    encoder = load_checkpoint(tiny_models["encoder"])
    with Store.open(home, data_url, keys_url) as store:
        store.ingest([e for u in users for e in histories[u]])
        for u in users:
            history = store.history(u)
            direct = recommend(encoder, history, 5)
            first, hit1 = cached_recommend(store, encoder, "v1", u, 5, lambda u=u: store.history(u))
            again, hit2 = cached_recommend(store, encoder, "v1", u, 5, lambda: 1 / 0)  # no read
            assert (hit1, hit2) == (False, True)
            for got in (first, again):
                assert [i for i, _ in got] == [i for i, _ in direct]
                assert torch.allclose(torch.tensor([s for _, s in got]),
                                      torch.tensor([s for _, s in direct]), atol=1e-5)

        # The artefact is sealed under the user's key: its bytes name no item and no score.
        u = users[0]
        folder = store.artefact_dir(store.hasher.user(u))
        blob = (folder / "rank-state-v1").read_bytes()
        state = encoder.last_states([store.history(u)])[0].numpy().astype("<f4").tobytes()
        assert state[:16] not in blob

        # A new event changes the history: the state is recomputed, and the new item, now
        # seen, is no longer recommended.
        top = recommend(encoder, store.history(u), 1)[0][0]
        last = store.history(u)[-1]
        store.ingest([Event("new-1", u, top, last.timestamp + 60, dict(last.fields))])
        after, hit = cached_recommend(store, encoder, "v1", u, 5, lambda: store.history(u))
        assert hit is False and top not in {i for i, _ in after}
        assert [i for i, _ in after] == [i for i, _ in recommend(encoder, store.history(u), 5)]
        # Another encoder version is another artefact: never a state from other weights.
        _, hit = cached_recommend(store, encoder, "v2", u, 5, lambda: store.history(u))
        assert hit is False

        delete_user(store, u)
        assert not folder.exists() or not any(folder.iterdir())
        assert cached_recommend(store, encoder, "v1", u, 5, lambda: 1 / 0) == (None, False)


def test_recent_answers_are_reused_only_for_the_same_history(tiny_models, sqlite_backend):
    """The process's answer cache: the same answer object for an unchanged history and k, a
    fresh ranking for another k or after a new event, and nothing for an erased user, even
    when the entry is still in memory (the digest is checked first)."""
    from api.personalize import cached_recommend, recommend
    from api.recent_answers import RecentAnswers
    from store import Store, delete_user
    from userenc.checkpoint import load_checkpoint
    from userenc.events import Event

    _, home, data_url, keys_url = sqlite_backend
    histories = tiny_models["histories"]
    u = sorted(histories)[0]
    encoder = load_checkpoint(tiny_models["encoder"])
    answers = RecentAnswers(capacity=2)
    with Store.open(home, data_url, keys_url) as store:
        store.ingest(histories[u])
        first, _ = cached_recommend(store, encoder, "v1", u, 5, lambda: store.history(u), answers)
        again, hit = cached_recommend(store, encoder, "v1", u, 5, lambda: 1 / 0, answers)
        assert hit and again is first and len(answers) == 1
        three, _ = cached_recommend(store, encoder, "v1", u, 3, lambda: 1 / 0, answers)
        assert [i for i, _ in three] == [i for i, _ in first[:3]] and len(answers) == 2

        top, last = first[0][0], store.history(u)[-1]
        store.ingest([Event("new-1", u, top, last.timestamp + 60, dict(last.fields))])
        after, _ = cached_recommend(store, encoder, "v1", u, 5, lambda: store.history(u), answers)
        assert top not in {i for i, _ in after}
        assert [i for i, _ in after] == [i for i, _ in recommend(encoder, store.history(u), 5)]
        assert len(answers) == 2  # bounded: the oldest entry went

        delete_user(store, u)
        assert len(answers) == 2  # still in memory, never reached: no digest, no answer
        assert cached_recommend(store, encoder, "v1", u, 5, lambda: 1 / 0, answers) == (None, False)
        answers.forget(u)
        assert len(answers) == 0
