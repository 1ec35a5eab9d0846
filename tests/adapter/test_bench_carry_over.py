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


def test_an_arm_on_this_runs_encoder_is_not_called_tokenless():
    """An earlier file mixing encoders (A for userllm, B for userllm-b): a run on B keeps
    userllm-b with the plain note, and marks only the arms without user tokens as such."""
    from userllm_vs_text import carry_over

    old = _earlier()
    old["training"]["userllm-b"] = {"encoder": {"weights_sha256": "B"}}
    old["quality"]["50"]["userllm-b"] = {"genre_history": {"accuracy": 0.6}}
    mine = {"users": old["users"], "training": {}, "cost": {}, "quality": {}}
    carry_over(mine, old, "old.json", True, "B")
    carried = mine["quality"]["50"]
    assert set(carried) == {"userllm-b", "text-lora", "text-zeroshot", "none-lora"}
    assert carried["userllm-b"]["carried_over"] == "carried over from old.json"
    assert carried["none-lora"]["carried_over"].endswith("this arm reads no user tokens")


def test_other_users_are_refused():
    from userllm_vs_text import carry_over

    mine = {"users": {"count": 5}, "training": {}, "cost": {}, "quality": {}}
    with pytest.raises(SystemExit, match="evaluated other users"):
        carry_over(mine, _earlier(), "old.json", True, "A")


@pytest.mark.parametrize("made, asked", [("", "multi_seen_d128_year_bf16"),
                                         ("multi_seen_d128_year_bf16", ""),
                                         ("multi_seen_d128_year_bf16", "id_only_seen_bf16")])
def test_encoder_of_another_row_is_refused(tmp_path: Path, made: str, asked: str) -> None:
    """A work folder keeps its encoder between runs: asking for another row's encoder there must
    stop before anything trains or is reused, naming both rows."""
    from userllm_arms import ensure_encoder

    out = tmp_path / "encoder"
    state = tmp_path / "encoder.last"
    state.mkdir()
    (state / "manifest.json").write_text(f'{{"bench_row": "{made}"}}')
    (state / "state.json").write_text('{"epoch": 99, "bad_epochs": 0}')  # finished: would be reused
    with pytest.raises(SystemExit) as stop:
        ensure_encoder({}, "movielens", out, epochs=1, holdout=1, max_len=16, seed=0, row=asked)
    assert f"row {made or '(default)'}, not {asked or '(default)'}" in str(stop.value)
    assert not out.exists()


def test_unknown_row_is_refused(tmp_path: Path) -> None:
    from userllm_arms import ensure_encoder

    with pytest.raises(SystemExit, match="no row 'nope'"):
        ensure_encoder({}, "movielens", tmp_path / "encoder", epochs=1, holdout=1, max_len=16, seed=0, row="nope")


def _with_users(ids: list[str], answered: list[str]) -> dict:
    old = _earlier()
    old["users"] = {"count": len(ids), "rule": ">= 500 events"}  # as older results record it
    for arms in old["quality"].values():
        for m in arms.values():
            m["genre_history"]["users"] = answered
    return old


def _six_users() -> tuple[list[str], dict]:
    """This run: 6 users picked by the earlier run's rule (whose results keep the ids)."""
    ids = ["u1", "u2", "u3", "u4", "u5", "u6"]
    return ids, {"users": {"count": 6, "rule": ">= 500 events", "ids": ids}, "training": {},
                 "cost": {}, "quality": {}}


def test_a_longer_list_by_the_same_rule_carries_the_earlier_users():
    """A run on 6 users whose first 4 are the earlier run's: the earlier arms come over, their
    note says on which users, and paired comparisons pair them over those users."""
    from userllm_vs_text import carry_over

    ids, mine = _six_users()
    carry_over(mine, _with_users(ids[:4], ids[:2]), "old.json", True, "B")
    assert set(mine["quality"]["50"]) == {"text-lora", "text-zeroshot", "none-lora"}
    assert mine["quality"]["50"]["text-lora"]["carried_over"].startswith(
        "carried over from old.json (its 4 users are the first of this run's 6)")


@pytest.mark.parametrize("answered, rule, count", [
    (["u1", "u9"], ">= 500 events", 4),  # an arm answered someone outside this run's first 4
    (["u1"], ">= 50 events", 4),  # another rule: other users
    (["u1"], ">= 500 events", 7),  # more users than this run has
])
def test_users_that_are_not_the_first_of_this_runs_are_refused(answered, rule, count):
    from userllm_vs_text import carry_over

    ids, mine = _six_users()
    old = _with_users((ids + ["u7"])[:count], answered)
    old["users"]["rule"] = rule
    with pytest.raises(SystemExit, match="evaluated other users"):
        carry_over(mine, old, "old.json", True, "B")


def test_an_arm_carried_twice_keeps_its_origin_and_says_each_thing_once():
    """Carrying a file that itself carried an arm: the arm's first origin stays, the longer user
    list is named, and "reads no user tokens" is not said twice."""
    from userllm_vs_text import carry_over

    ids, mine = _six_users()
    old = _with_users(ids[:4], ids[:2])
    first = "carried over from older.json; this run's encoder is another, and this arm reads no user tokens"
    old["quality"]["50"]["text-lora"] = old["quality"]["50"]["text-lora"] | {"carried_over": first}
    carry_over(mine, old, "old.json", True, "B")
    assert mine["quality"]["50"]["text-lora"]["carried_over"] == (
        first + ", then from old.json (its 4 users are the first of this run's 6)")
    assert mine["quality"]["50"]["none-lora"]["carried_over"] == (
        "carried over from old.json (its 4 users are the first of this run's 6); this run's "
        "encoder is another, and this arm reads no user tokens")
