"""The benchmark's paired arm comparison (bench/userllm_compare.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from userllm_compare import comparisons, paired, per_example  # noqa: E402


def _arm(ranks: dict[str, int | None], task: str = "genre_future") -> dict:
    return {task: {"users": list(ranks), "ranks": list(ranks.values())}}


def test_paired_difference_is_over_common_users_with_an_interval():
    users = [f"u{i}" for i in range(40)]
    a = per_example(_arm({u: 1 for u in users}), "genre_future")
    b = per_example(_arm({u: (1 if i % 4 == 0 else None) for i, u in enumerate(users[:30])}),
                    "genre_future")
    p = paired(a, b, "accuracy")
    assert p["users"] == 30  # b answered only 30 of them
    assert p["a"] == 1.0 and p["b"] == pytest.approx(8 / 30)
    assert p["diff"] == pytest.approx(22 / 30)
    assert 0 < p["ci95"][0] < p["diff"] < p["ci95"][1] <= 1


def test_equal_arms_are_not_separable_and_recall_counts_ranks():
    ranks = {f"u{i}": [1, 7, None, 12][i % 4] for i in range(20)}
    m = per_example(_arm(ranks, "next_movie"), "next_movie")
    assert m["u1"] == {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 1.0}
    rows = comparisons({"50": {"userllm": _arm(ranks, "next_movie"),
                               "none": _arm(ranks, "next_movie")}}, ["next_movie"])
    assert len(rows) == 1 and rows[0]["diff"] == 0.0 and rows[0]["ci95"] == [0.0, 0.0]
