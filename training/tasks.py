"""USER-LLM tasks built from event histories: (what the model may read, the answer text).

Every example cuts a user's events (time order) at a point: the model reads (the last
max_events of) the events before the cut, and the task's answer comes from the cut on.

- test: the cut is the start of the held-out tail (len - holdout: the encoder never trained
  on anything from there, training/split.py), so every test question about one user reads the
  same events (their prompts share that prefix: one prefill serves all of them);
- validation: the cut before the validation event (the future-genre task: W events before
  the end, its window then overlaps training events, which is fine for model selection);
- training: random cuts inside the encoder's training part, with the answer inside it too.
So no test event (with holdout >= 10, no event of the future-genre window) is read by either
training stage. With holdout = 1 the test cut is leave-one-out's: the last event is the answer.

Tasks (ML-1M unless noted):
- next_movie: the title of the next movie (answers: the catalogue's titles, trie-constrained).
- genre_history: the most frequent genre among the events the model reads (the paper's
  "favourite genre"; it depends on how many events are read, so it is computed on exactly those).
- genre_future: the most frequent genre among the next 10 events, held out of the input: it
  cannot be read off the history by counting.
- review (Amazon): given an item and the user's rating of it, the user's review summary.
Ties between genres go to the genre more frequent in the training data, then alphabetically.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from userenc.events import Event

FUTURE_WINDOW = 10
TASKS = ("next_movie", "genre_history", "genre_future", "review")
CLOSED_TASKS = ("next_movie", "genre_history", "genre_future")  # answers from a fixed set
# The encoder holdout each task needs so that none of its test answers was trained on.
REQUIRED_HOLDOUT = {"next_movie": 1, "genre_history": 1, "genre_future": FUTURE_WINDOW,
                    "review": 1}
MIN_HISTORY = 3  # events a model reads at the least


@dataclass(slots=True)
class Example:
    user: str
    task: str
    history: list[Event]  # what the model may read, oldest first
    target: str  # the answer text
    item: Event | None = None  # review: the event asked about (its item id and rating only)


@dataclass(slots=True)
class Catalogue:
    """What the answers come from: titles by item, genres ranked by training frequency."""
    titles: dict[str, str]
    genres: list[str]

    @classmethod
    def from_histories(cls, histories: Iterable[list[Event]],
                       ranked_by: Iterable[list[Event]] | None = None) -> "Catalogue":
        """Titles from every event given (item metadata); genres ranked by their frequency in
        `ranked_by` (the training parts), or in the same events."""
        titles: dict[str, str] = {}
        counts: Counter = Counter()
        for h in histories:
            for e in h:
                if "title" in e.fields:
                    titles[e.item_id] = str(e.fields["title"])
                if ranked_by is None:
                    counts.update(str(g) for g in _genres(e))
        for h in ranked_by or []:
            for e in h:
                counts.update(str(g) for g in _genres(e))
        return cls(titles, [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    def answers(self, task: str) -> list[str]:
        if task == "next_movie":
            return sorted(set(self.titles.values()))
        if task in ("genre_history", "genre_future"):
            return list(self.genres)
        raise ValueError(f"task {task!r} has open answers")


def _genres(e: Event) -> list[str]:
    g = e.fields.get("genres")
    if g is None:
        return []
    return [str(v) for v in g] if isinstance(g, (list, tuple)) else str(g).split("|")


def most_frequent_genre(events: list[Event], order: list[str]) -> str | None:
    counts = Counter(g for e in events for g in _genres(e))
    if not counts:
        return None
    rank = {g: i for i, g in enumerate(order)}
    return min(counts, key=lambda g: (-counts[g], rank.get(g, len(rank)), g))


def answer_span(task: str) -> int:
    """Events at and after the cut a task's answer needs."""
    return FUTURE_WINDOW if task == "genre_future" else 0 if task == "genre_history" else 1


def make_example(task: str, user: str, events: list[Event], cut: int, cat: Catalogue,
                 max_events: int) -> Example | None:
    """The example that reads events[:cut] (its last max_events) and answers from events[cut:].
    None when it cannot be made (too short, no title, no genres, no summary...)."""
    if cut < MIN_HISTORY or cut + answer_span(task) > len(events):
        return None
    history = events[max(0, cut - max_events):cut]
    if task == "genre_history":
        label = most_frequent_genre(history, cat.genres)
        return Example(user, task, history, label) if label else None
    if task == "genre_future":
        label = most_frequent_genre(events[cut:cut + FUTURE_WINDOW], cat.genres)
        return Example(user, task, history, label) if label else None
    answer = events[cut]
    if task == "next_movie":
        title = cat.titles.get(answer.item_id)
        return Example(user, task, history, title) if title else None
    if task == "review":
        summary = str(answer.fields.get("summary") or "").strip()
        return Example(user, task, history, summary, item=answer) if summary else None
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def check_tasks(tasks: list[str], holdout: int) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown} (known: {', '.join(TASKS)})")
    short = [t for t in tasks if REQUIRED_HOLDOUT[t] > holdout]
    if short:
        raise ValueError(f"tasks {short} need an encoder trained with --holdout "
                         f">= {max(REQUIRED_HOLDOUT[t] for t in short)} (it has {holdout}): "
                         "otherwise their test answers were trained on")


@dataclass(slots=True)
class TaskSplit:
    """The encoder's split, as the sequences the examples cut."""
    train: dict[str, list[Event]]  # training parts (random cuts make training examples)
    valid: dict[str, list[Event]]  # histories up to and with the validation event
    test: dict[str, list[Event]]  # whole histories
    holdout: int


def task_split(histories: dict[str, list[Event]], holdout: int) -> TaskSplit:
    from training.split import leave_one_out

    split = leave_one_out(histories, holdout)
    return TaskSplit(split.train, {u: inp + [t] for u, (inp, t) in split.valid.items()},
                     {u: histories[u] for u in split.test}, holdout)


def held_out_examples(split: TaskSplit, tasks: list[str], cat: Catalogue, max_events: int,
                  users: list[str] | None = None) -> list[Example]:
    """Per user (in order), one example per task, all cut at the start of the held-out tail."""
    out = []
    for user in users if users is not None else sorted(split.test):
        h = split.test[user]
        out += [ex for t in tasks
                if (ex := make_example(t, user, h, len(h) - split.holdout, cat, max_events))]
    return out


def valid_examples(split: TaskSplit, tasks: list[str], cat: Catalogue,
                   max_events: int) -> list[Example]:
    out = []
    for user in sorted(split.valid):
        seq = split.valid[user]
        out += [ex for t in tasks if (ex := make_example(
            t, user, seq, len(seq) - max(1, answer_span(t)), cat, max_events))]
    return out


def train_examples(train: dict[str, list[Event]], tasks: list[str], cat: Catalogue,
                   per_user: int, lengths: list[int], seed: int) -> list[Example]:
    """`per_user` examples per user and task at random cuts of the training parts; each reads
    the last N events before its cut, N drawn from `lengths`."""
    rng = random.Random(seed)
    out = []
    for user in sorted(train):
        part = train[user]
        for task in tasks:
            last = len(part) - answer_span(task)
            if last < MIN_HISTORY:
                continue
            for _ in range(per_user):
                ex = make_example(task, user, part, rng.randint(MIN_HISTORY, last), cat,
                                  rng.choice(lengths))
                if ex is not None:
                    out.append(ex)
    rng.shuffle(out)
    return out
