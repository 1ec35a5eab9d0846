"""The benchmark's paired arm comparison (bench/userllm_compare.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from userllm_compare import ablation_comparisons, comparisons, paired, per_example  # noqa: E402


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


def test_ablations_are_compared_with_the_reference_arm_only():
    users = [f"u{i}" for i in range(30)]
    ref = _arm({u: 1 if i % 2 else None for i, u in enumerate(users)})  # accuracy 0.5
    better = _arm({u: 1 for u in users})
    quality = {"50": {"userllm-ref": ref, "userllm-K16": better, "none-lora": better},
               "500": {"userllm-K16": better}}  # no reference at 500: nothing to compare
    rows = ablation_comparisons(quality, ["genre_future"], "userllm-ref",
                                ["userllm-ref", "userllm-K16", "userllm-proj"])
    assert [(r["n"], r["vs"]) for r in rows] == [("50", "userllm-K16")]
    # the ablation minus the reference: "a" is the ablation
    assert rows[0]["a"] == 1.0 and rows[0]["b"] == 0.5 and rows[0]["diff"] == pytest.approx(0.5)
    assert rows[0]["ci95"][0] > 0


def test_review_scores_are_paired_per_user():
    def arm(scores: dict[str, float]) -> dict:
        return {"review": {"users": list(scores), "rouge1_each": list(scores.values()),
                           "rougeL_each": [s / 2 for s in scores.values()]}}

    mine = arm({f"u{i}": 0.5 for i in range(30)})
    other = arm({f"u{i}": 0.1 for i in range(20)})
    assert per_example(mine, "review")["u3"] == {"rouge1": 0.5, "rougeL": 0.25}
    rows = comparisons({"amazon": {"userllm": mine, "text": other}}, ["review"])
    assert len(rows) == 1 and rows[0]["metric"] == "rougeL" and rows[0]["users"] == 20
    assert rows[0]["diff"] == pytest.approx(0.2) and rows[0]["ci95"][0] > 0
    assert per_example({"review": {"rouge1": 0.3}}, "review") == {}  # no per-example scores


def test_review_evaluation_keeps_each_users_rouge(tiny_llm, sample_histories):
    from rouge_score import rouge_scorer

    from training.evaluate_adapter import evaluate_review, load_arm
    from training.tasks import Example

    users = sorted(sample_histories)[:3]
    exs = [Example(u, "review", sample_histories[u][:-1], "great strings, fair price",
                   item=sample_histories[u][-1]) for u in users]
    arm = load_arm("none", tiny_llm, None, kind="none")
    try:
        out = evaluate_review(arm, exs, max_tokens=6)["review"]
    finally:
        arm.close()
    assert out["users"] == users and len(out["rouge1_each"]) == len(out["rougeL_each"]) == 3
    assert out["rouge1"] == pytest.approx(sum(out["rouge1_each"]) / 3)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for text, r1, rl in zip(out["predictions"], out["rouge1_each"], out["rougeL_each"]):
        score = scorer.score("great strings, fair price", text)
        assert (r1, rl) == (score["rouge1"].fmeasure, score["rougeL"].fmeasure)
