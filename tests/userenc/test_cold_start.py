"""Cold start: truncated-history evaluation buckets against popularity on the same events, and
the popularity fallback for a user with no events (training counts, or the vocabulary order of
a checkpoint saved before counts were kept)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from training.evaluate import cold_start_report, popularity_scorer, truncated_cases
from training.split import leave_one_out
from userenc.cold_start import SOURCE_POPULARITY, popular_items, popularity_scores
from userenc.events import Event
from userenc.spec import Feature, FeatureSpec
from userenc.tokenize import EventTokenizer


def _ev(user: str, item: str, ts: int) -> Event:
    return Event(f"{user}:{item}:{ts}", user, item, ts, {})


def _histories() -> dict[str, list[Event]]:
    # Training counts (all but each user's last two events): a 5, b 3, c 3, d 1.
    return {
        "u1": [_ev("u1", x, t) for t, x in enumerate("aabbcxy")],
        "u2": [_ev("u2", x, t) for t, x in enumerate("aacbdxy")],
        "u3": [_ev("u3", x, t) for t, x in enumerate("acxy")],
    }


SPEC = FeatureSpec("ids", [Feature("item", "categorical", source="item_id")])


def test_truncated_cases_keep_the_last_events_and_the_same_target():
    cases = {f"u{i}": ([_ev(f"u{i}", str(t), t) for t in range(30)], _ev(f"u{i}", "T", 99)) for i in range(7)}
    short = truncated_cases(cases, 1, 5)
    assert [len(short[u][0]) for u in sorted(short)] == [1, 2, 3, 4, 5, 1, 2]
    for u, (history, target) in short.items():
        assert history == cases[u][0][-len(history):] and target is cases[u][1]
    # A user whose input is shorter than its n is left out, never padded.
    assert "u0" not in truncated_cases({"u0": ([_ev("u0", "a", 1)] * 3, _ev("u0", "T", 9))}, 6, 20)


def test_cold_start_report_compares_scorers_on_the_same_users():
    split = leave_one_out(_histories())
    tok = EventTokenizer.fit(SPEC, split.train.values())
    pop = popularity_scorer(tok, split.train)
    report = cold_start_report({"popularity": pop, "again": pop}, tok, split.test, buckets=((1, 2),))
    assert set(report) == {"1-2"}
    assert report["1-2"]["popularity"] == report["1-2"]["again"]
    assert report["1-2"]["popularity"]["users"] == 3


def test_tokenizer_keeps_training_counts_and_popularity_follows_them(tmp_path):
    split = leave_one_out(_histories())
    tok = EventTokenizer.fit(SPEC, split.train.values())
    vocab = tok.vocabs["item"]
    assert {vocab.value(i): int(c) for i, c in enumerate(tok.item_counts) if i >= 2} == {"a": 5, "b": 3, "c": 3, "d": 1}
    ranked = popular_items(tok, 3)
    assert ranked.source == SOURCE_POPULARITY
    assert ranked.items == [("a", 5.0), ("b", 3.0), ("c", 3.0)]  # ties by value, like the vocabulary
    assert [i for i, _ in popular_items(tok, 2, exclude={"a"}).items] == ["b", "c"]
    assert len(popular_items(tok, 100).items) == 4, "padding and OOV are never recommended"

    tok.save(tmp_path / "vocab")
    loaded = EventTokenizer.load(tmp_path / "vocab")
    assert np.array_equal(loaded.item_counts, tok.item_counts)
    # A vocabulary saved before counts were kept: the same order, from the vocabulary itself.
    (tmp_path / "vocab" / "item_counts.json").unlink()
    old = EventTokenizer.load(tmp_path / "vocab")
    assert old.item_counts is None
    assert [i for i, _ in popular_items(old, 4).items] == [i for i, _ in popular_items(tok, 4).items]
    assert np.isneginf(popularity_scores(old)[:2]).all()
    shutil.rmtree(tmp_path / "vocab")


def test_item_counts_of_the_wrong_length_are_refused(tmp_path):
    tok = EventTokenizer.fit(SPEC, _histories().values())
    tok.save(tmp_path / "vocab")
    (tmp_path / "vocab" / "item_counts.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="counts for"):
        EventTokenizer.load(tmp_path / "vocab")
