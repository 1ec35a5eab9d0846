"""The stated fallback for a user the encoder cannot read: popularity.

A user with no events (unknown to the store, or not yet ingested) has nothing to encode, so the
catalogue is ranked by how often each item occurs in the encoder's TRAINING events: data the
service legitimately holds, saved in the checkpoint's vocabulary (`vocab/item_counts.json`).

Why popularity and not demographics: ML-1M's users.dat has gender/age/occupation, but an `Event`
carries no user attributes and the store keeps events only, so a serving node has no clean
demographic source; popularity needs nothing but the checkpoint.

Checkpoints written before counts were kept still rank: their item vocabulary is already in
descending training-count order (Vocabulary.build sorts by count, ties by value), so vocabulary
order IS the popularity order; scores are then the descending rank (n_items - position), not counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from userenc.spec import FIRST_ID
from userenc.tokenize import EventTokenizer

SOURCE_ENCODER = "encoder"
SOURCE_POPULARITY = "popularity"


@dataclass(slots=True)
class Ranked:
    """Top items for one user and which model ranked them."""
    items: list[tuple[str, float]]
    source: str  # SOURCE_ENCODER or SOURCE_POPULARITY


def popularity_scores(tokenizer: EventTokenizer) -> np.ndarray:
    """A score per item id [item vocab size] (float64), higher = more popular; padding and OOV
    score -inf. Training counts when the vocabulary kept them, else the vocabulary-order rank."""
    n = len(tokenizer.vocabs[tokenizer.spec.item.name])
    if tokenizer.item_counts is not None:
        scores = tokenizer.item_counts.astype(np.float64)
    else:
        scores = np.arange(n, 0, -1, dtype=np.float64)  # id FIRST_ID (most frequent) highest
    assert len(scores) == n, "one score per item id"
    scores = scores.copy()
    scores[:FIRST_ID] = -np.inf
    return scores


def popular_items(tokenizer: EventTokenizer, k: int, exclude: set[str] | frozenset[str] = frozenset()) -> Ranked:
    """The k most popular items (ties by vocabulary order, i.e. by value), `exclude` left out."""
    vocab = tokenizer.vocabs[tokenizer.spec.item.name]
    scores = popularity_scores(tokenizer)
    for item in exclude:
        if (idx := vocab.id(item)) >= FIRST_ID:
            scores[idx] = -np.inf
    # Stable sort on -score: equal scores keep id order, which is the vocabulary's own tie order.
    order = np.argsort(-scores, kind="stable")
    top = [int(i) for i in order[: max(0, k)] if np.isfinite(scores[i])]
    return Ranked([(vocab.value(i), float(scores[i])) for i in top], SOURCE_POPULARITY)
