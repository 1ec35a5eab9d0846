"""Per-user leave-one-out split and the training windows cut from it.

For each user (timestamp order): the last event is the test target, the second-to-last the
validation target, the rest is training history. Validation reads the training history; test
reads training history + the validation event. Users with fewer than 3 events train only.

`holdout` > 1 keeps more of each user's tail out of training: the last `holdout` events are
never trained on, the event before them is the validation target, and the test still asks for
the last event (its input holds the unseen events before it). USER-LLM's future-window task
(the favourite genre of the next 10 events) needs holdout >= 10, so that no event of the
window is ever seen by the encoder; holdout = 1 is the plain leave-one-out split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from userenc.events import Event


@dataclass(slots=True)
class Split:
    train: dict[str, list[Event]] = field(default_factory=dict)
    # user -> (input history, target event)
    valid: dict[str, tuple[list[Event], Event]] = field(default_factory=dict)
    test: dict[str, tuple[list[Event], Event]] = field(default_factory=dict)


def leave_one_out(histories: dict[str, list[Event]], holdout: int = 1) -> Split:
    if holdout < 1:
        raise ValueError(f"holdout must be >= 1, got {holdout}")
    split = Split()
    for user, h in histories.items():
        if len(h) < holdout + 2:
            if holdout == 1:
                split.train[user] = h
            continue  # too short to hold its tail out: not used at all
        split.train[user] = h[: -holdout - 1]
        split.valid[user] = (h[: -holdout - 1], h[-holdout - 1])
        split.test[user] = (h[:-1], h[-1])
    return split


def encoder_holdout(manifest: dict) -> int:
    """The holdout an encoder checkpoint was trained with (1 for checkpoints that predate it)."""
    return int((manifest.get("train_config") or {}).get("holdout", 1))


def data_fingerprint(histories: dict[str, list[Event]]) -> str:
    """sha256 over event ids, users and timestamps: identifies the data a model saw."""
    digest = hashlib.sha256()
    for user in sorted(histories):
        for e in histories[user]:
            digest.update(f"{e.event_id}\x1f{e.timestamp}\x1e".encode())
    return digest.hexdigest()


def windows(encoded: dict[str, np.ndarray], max_len: int) -> list[dict[str, np.ndarray]]:
    """Cut one user's encoded training history into windows of at most max_len events, from the
    end backwards, overlapping by one event so that every next-event pair is trained exactly once."""
    n = len(next(iter(encoded.values())))
    out = []
    end = n
    while end >= 2:
        start = max(0, end - max_len)
        out.append({k: v[start:end] for k, v in encoded.items()})
        end = start + 1 if start > 0 else 0
    return out


def crop_starts(lengths: "list[int] | np.ndarray", prob: float, rng: np.random.Generator) -> np.ndarray:
    """This epoch's crop of each window: the number of leading events dropped (0: none). Each
    window, with probability `prob`, starts at a random later event, keeping >= 2 events (one
    next-event pair). Without it, a target is always read with the same context, and the only
    short contexts the model ever sees are the first events of a history, while cold-start and
    recent-window reads give it the last few events of a long one."""
    assert 0.0 <= prob < 1.0, "crop_prob must be in [0, 1)"
    starts = np.zeros(len(lengths), dtype=np.int64)
    if prob == 0.0:
        return starts
    for i, (n, draw) in enumerate(zip(lengths, rng.random(len(lengths)))):
        if draw < prob and n > 2:
            starts[i] = int(rng.integers(1, n - 1))
    return starts

