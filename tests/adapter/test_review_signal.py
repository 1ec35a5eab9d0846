"""bench/review_signal.py: its rules answer from what the arms may read (the history and other
users' training reviews), never from a held-out review, and its oracles bound the rules they pick
from."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from userenc.events import Event  # noqa: E402


def _histories() -> dict[str, list[Event]]:
    out = {}
    for u in range(6):
        titles = ["good strings", "great cable", "nice pedal", "solid stand", f"valid{u} pick",
                  f"secret{u} great tuner"]  # the last two: held out (validation, test)
        # every user's held-out reviews are of the same two items, so an item rule reading
        # beyond the training reviews would find another user's held-out title
        items = [f"item{(u + i) % 7}" for i in range(4)] + ["asked-in-valid", "asked-in-test"]
        out[f"u{u}"] = [Event(f"e{u}-{i}", f"u{u}", item, 1000 * i, {"summary": t, "rating": 5.0})
                        for i, (item, t) in enumerate(zip(items, titles))]
    return out


def test_rules_never_read_a_held_out_review():
    from review_signal import rules, score

    from training.tasks import Catalogue, held_out_examples, task_split

    hist = _histories()
    split = task_split(hist, 1)
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    exs = held_out_examples(split, ["review"], cat, 64, sorted(hist))
    assert [ex.target for ex in exs] == [f"secret{u} great tuner" for u in range(6)]
    answers = rules(split, exs)
    for name, per_example in answers.items():
        for ex, answer in zip(exs, per_example):
            text = " ".join(answer) if isinstance(answer, list) else answer
            assert "secret" not in text, (name, ex.user)
            # another user's validation review is not a training review either
            assert not any(f"valid{u}" in text for u in range(6) if f"u{u}" != ex.user), name
    # the user's own validation review is in the history the arms read
    assert answers["own last"][0] == "valid0 pick"
    rouge = {name: score(exs, a)["review"]["rougeL"] for name, a in answers.items()}
    assert rouge["own best (oracle)"] >= max(rouge["own last"], rouge["own words"]) - 1e-9
    assert rouge["own best (oracle)"] > rouge["own last"] == 0  # "great cable" shares a word
