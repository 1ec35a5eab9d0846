"""bench/userllm_vs_text.py --carry-over: an earlier run's arms join this run's table only when
they measured the same encoder (or read no user tokens), so a run with a retrained encoder never
shows the old encoder's USER-LLM rows, prior sweep or cost rows as its own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def _earlier() -> dict:
    enc = {"encoder": {"weights_sha256": "A"}}
    metrics = {"genre_history": {"accuracy": 0.5}}
    return {
        "users": {"count": 4, "rule": ">= 500 events"},
        "encoder": {"epoch": 8},  # older results name the encoder only in the arms' records
        "training": {"userllm": enc, "userllm-prior": {"decodes": "userllm"},
                     "text-lora": {"parameters": {"trained": 10}}, "text-zeroshot": {},
                     "none-lora": {"encoder": None}},  # as the text / none adapters record it
        "prior_tuning": {"userllm-prior": {"weight": 256.0}},
        "quality": {"50": {arm: metrics for arm in
                           ("encoder", "userllm", "userllm-prior", "text-lora", "text-zeroshot",
                            "none-lora")},
                    "200": {"encoder": metrics, "text-lora": metrics}},
        "cost": {"500": {"ratio": {"prefill_flops": 400.0}}},
    }


def _run(encoder: str | None, cost: bool = True) -> dict:
    from userllm_vs_text import carry_over

    mine = {"users": {"count": 4, "rule": ">= 500 events"}, "training": {}, "cost": {},
            "quality": {"50": {"encoder": {"fresh": True}}}}
    carry_over(mine, _earlier(), "old.json", cost, encoder)
    return mine


def test_arms_of_another_encoder_are_left_out():
    r = _run("B")
    assert set(r["quality"]["50"]) == {"encoder", "text-lora", "text-zeroshot", "none-lora"}
    assert r["quality"]["50"]["encoder"] == {"fresh": True}  # this run's own row
    assert set(r["quality"]["200"]) == {"text-lora"}  # not the old encoder's row at N=200
    assert set(r["training"]) == {"text-lora", "text-zeroshot", "none-lora"}
    assert "prior_tuning" not in r and r["cost"] == {}
    assert r["quality"]["50"]["text-lora"]["carried_over"] == (
        "carried over from old.json; this run's encoder is another, and this arm reads no user tokens")


def test_the_same_encoder_carries_everything_this_run_did_not_make():
    for encoder in ("A", None):  # None: this run trained nothing (Amazon only)
        r = _run(encoder)
        assert set(r["quality"]["50"]) == {"encoder", "userllm", "userllm-prior", "text-lora",
                                           "text-zeroshot", "none-lora"}
        assert r["quality"]["50"]["encoder"] == {"fresh": True}
        assert set(r["quality"]["200"]) == {"encoder", "text-lora"}
        assert r["prior_tuning"] == {"userllm-prior": {"weight": 256.0}}
        assert r["cost"]["500"]["carried_over"] == "carried over from old.json"
        assert r["quality"]["50"]["text-lora"]["carried_over"] == "carried over from old.json"
    assert _run("A", cost=False)["cost"] == {}


def test_other_users_are_refused():
    from userllm_vs_text import carry_over

    mine = {"users": {"count": 5}, "training": {}, "cost": {}, "quality": {}}
    with pytest.raises(SystemExit, match="evaluated other users"):
        carry_over(mine, _earlier(), "old.json", True, "A")
