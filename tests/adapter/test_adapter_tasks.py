"""Task examples honour the encoder's split: training reads and answers only from the training
part, test questions about one user read the same events (the start of the held-out tail),
the future-genre window is never read, and the text prompt keeps the newest events that fit."""
from __future__ import annotations

import pytest

from training.prompts import HEADERS, event_line, prompt_ids
from training.tasks import (FUTURE_WINDOW, Catalogue, check_tasks, held_out_examples,
                            most_frequent_genre, task_split, train_examples, valid_examples)
from userenc.events import Event

TASKS = ["next_movie", "genre_history", "genre_future"]


def _histories(users: int = 12, length: int = 40) -> dict[str, list[Event]]:
    genres = ["Drama", "Comedy", "Action"]
    return {f"u{u}": [Event(f"e{u}:{i}", f"u{u}", f"m{(u + i) % 30}", 1000 + i,
                            {"title": f"Film {(u + i) % 30} (1999)",
                             "genres": [genres[(u * i) % 3]], "rating": 1 + i % 5})
                      for i in range(length + u)] for u in range(users)}


def test_examples_never_read_or_answer_from_the_held_out_tail():
    hist = _histories()
    split = task_split(hist, FUTURE_WINDOW)
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    for ex in train_examples(split.train, TASKS, cat, 3, [5, 20], seed=0):
        part = split.train[ex.user]
        assert all(e in part for e in ex.history)
        cut = part.index(ex.history[-1]) + 1
        if ex.task == "next_movie":
            assert cut < len(part) and ex.target == part[cut].fields["title"]
        if ex.task == "genre_future":
            assert cut + FUTURE_WINDOW <= len(part)
            assert ex.target == most_frequent_genre(part[cut:cut + FUTURE_WINDOW], cat.genres)
    test = held_out_examples(split, TASKS, cat, 25)
    assert len(test) == 3 * len(hist)
    for ex in test:
        h = hist[ex.user]
        cut = len(h) - FUTURE_WINDOW
        assert ex.history == h[cut - 25:cut]  # every question about a user reads the same events
        if ex.task == "next_movie":
            assert ex.target == h[cut].fields["title"]
        if ex.task == "genre_future":
            assert ex.target == most_frequent_genre(h[cut:], cat.genres)
        if ex.task == "genre_history":
            assert ex.target == most_frequent_genre(ex.history, cat.genres)
    for ex in valid_examples(split, TASKS, cat, 25):
        assert hist[ex.user][-FUTURE_WINDOW] not in ex.history


def test_a_task_that_would_read_trained_answers_is_refused():
    check_tasks(["next_movie", "genre_history"], 1)
    with pytest.raises(ValueError, match="--holdout >= 10"):
        check_tasks(TASKS, 1)
    with pytest.raises(ValueError, match="unknown tasks"):
        check_tasks(["favourite_colour"], 10)


def test_genre_ties_go_to_the_more_frequent_genre():
    events = [Event("a", "u", "1", 1, {"genres": ["Comedy"]}),
              Event("b", "u", "2", 2, {"genres": ["Western", "Drama"]})]
    assert most_frequent_genre(events, ["Drama", "Comedy", "Western"]) == "Drama"
    assert most_frequent_genre([Event("c", "u", "3", 3, {})], ["Drama"]) is None


def test_text_prompt_keeps_the_newest_events_that_fit(tiny_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    hist = _histories(users=1, length=200)
    split = task_split(hist, 1)
    cat = Catalogue.from_histories(hist.values())
    ex = held_out_examples(split, ["next_movie"], cat, 200)[0]
    full = prompt_ids(tok, ex, "text", 100_000)
    assert full.events_shown == 199
    cut = prompt_ids(tok, ex, "text", len(full.ids) // 3)
    assert len(cut.ids) <= len(full.ids) // 3 and 0 < cut.events_shown < 199
    lines = "\n".join(event_line(e, ex.task) for e in ex.history[-cut.events_shown:])
    assert HEADERS["default"] + "\n" + lines + "\n" in tok.decode(cut.ids)
    plain = prompt_ids(tok, ex, "userllm", 100_000)
    assert plain.events_shown == 0 and len(plain.ids) < len(cut.ids)
