"""Per-user leave-one-out split and the training windows cut from it.

For each user (timestamp order): the last event is the test target, the second-to-last the
validation target, the rest is training history. Validation reads the training history; test
reads training history + the validation event. Users with fewer than 3 events train only.
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


def leave_one_out(histories: dict[str, list[Event]]) -> Split:
    split = Split()
    for user, h in histories.items():
        if len(h) < 3:
            split.train[user] = h
            continue
        split.train[user] = h[:-2]
        split.valid[user] = (h[:-2], h[-2])
        split.test[user] = (h[:-1], h[-1])
    return split


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
