"""Full-corpus ranking metrics on hand-made ranks and scores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.evaluate import evaluate, length_bucket, metrics_from_ranks, popularity_scorer, rank_targets
from training.split import leave_one_out
from userenc.events import Event
from userenc.spec import Feature, FeatureSpec
from userenc.tokenize import EventTokenizer


def test_metrics_from_hand_made_ranks():
    ranks = np.array([1.0, 3.0, 10.0, 11.0, 50.0, math.inf])
    m = metrics_from_ranks(ranks)
    assert m["hr@1"] == pytest.approx(1 / 6) and m["hr@5"] == pytest.approx(2 / 6)
    assert m["hr@10"] == pytest.approx(3 / 6) and m["hr@50"] == pytest.approx(5 / 6)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(11)) / 6)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 50) / 6)
    assert m["users"] == 6
    assert metrics_from_ranks(np.zeros(0))["hr@10"] == 0.0


def test_rank_targets_full_ranking_exclude_seen_and_oov():
    # Columns 0/1 are padding/OOV and never count; real items are ids 2..7.
    scores = torch.tensor(
        [
            [9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.2],  # target 5 (0.7): only item 3 (0.9) is higher -> rank 2
            [0.0, 0.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.2],  # target 4 (0.1): lowest -> rank 6
            [0.0, 0.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.2],  # target OOV: a miss
            [0.0, 0.0, 0.4, 0.4, 0.4, 0.4, 0.1, 0.1],  # target 3 tied with 2, 4, 5: ties count against -> rank 4
        ]
    )
    targets = torch.tensor([5, 4, 1, 3])
    assert rank_targets(scores, targets, None).tolist() == [2.0, 6.0, math.inf, 4.0]
    # Excluding seen items: user 0 saw 3 (removed), and 5 (its own target stays ranked);
    # user 1 saw 2 and 3 and 5 and the OOV id; user 3 saw 2.
    seen = [np.array([3, 5]), np.array([2, 3, 5, 1, 0]), np.array([2]), np.array([2, 4])]
    assert rank_targets(scores, targets, seen).tolist() == [1.0, 3.0, math.inf, 2.0]
    assert scores[0, 0] == 9.0, "the caller's scores are not modified"


def _ev(user: str, item: str, ts: int) -> Event:
    return Event(f"{user}:{item}:{ts}", user, item, ts, {})


def test_evaluate_counts_oov_targets_as_misses_and_reports_both_views():
    spec = FeatureSpec("s", [Feature("item", "categorical", source="item_id")])
    histories = {
        # u1 repeats a: with exclude-seen, a drops out of the ranking
        "u1": [_ev("u1", "a", 1), _ev("u1", "a", 2), _ev("u1", "b", 3), _ev("u1", "b", 4), _ev("u1", "c", 5)],
        "u2": [_ev("u2", "a", 1), _ev("u2", "b", 2), _ev("u2", "a", 3), _ev("u2", "new", 4)],  # test target never trained on
        "u3": [_ev("u3", "a", 1), _ev("u3", "c", 2)],  # too short: training only
        "u4": [_ev("u4", "c", 1), _ev("u4", "b", 2), _ev("u4", "c", 3), _ev("u4", "a", 4)],
    }
    split = leave_one_out(histories)
    assert sorted(split.test) == ["u1", "u2", "u4"]
    tok = EventTokenizer.fit(spec, split.train.values())
    # training counts: a 4, b 3, c 2 -> popularity ranks a, b, c
    result = evaluate(popularity_scorer(tok, split.train), tok, split.test)
    assert result["oov_targets"] == 1
    # u1: target c ranks 3rd; excluding seen (a, b): 1st. u2: OOV, a miss either way. u4: target a, 1st.
    assert result["all"]["hr@1"] == pytest.approx(1 / 3) and result["all"]["hr@5"] == pytest.approx(2 / 3)
    assert result["all"]["mrr"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert result["exclude_seen"]["hr@1"] == pytest.approx(2 / 3) and result["exclude_seen"]["mrr"] == pytest.approx(2 / 3)
    assert result["by_length"] == {"1-5": {"users": 3, "hr@10": pytest.approx(2 / 3)}}
    valid = evaluate(popularity_scorer(tok, split.train), tok, split.valid)
    # valid targets: u1 b (2nd), u2 a (1st), u4 c (3rd)
    assert valid["oov_targets"] == 0 and valid["all"]["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_length_buckets():
    assert [length_bucket(n) for n in (1, 5, 6, 20, 21, 200, 501)] == ["1-5", "1-5", "6-20", "6-20", "21-50", "101-200", ">500"]
