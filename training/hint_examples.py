"""Next-movie training examples for an adapter with item hints (userenc/item_hints.py).

The encoder's top-M unseen items hold the next movie for roughly one example in ten (ML-1M,
M = 16). Trained on every example, the LLM learned the popular titles and ignored the hints:
the teacher-forced loss is mostly about titles no hint names. Trained only on examples whose
answer is among the hints, it learns the reading the hints are for -- which of these candidates
comes next -- as a re-ranker over the encoder's candidates. Only training cuts are drawn (the
split's training parts), so no held-out event is looked at; validation is not filtered.
"""
from __future__ import annotations

import torch

from training.tasks import Catalogue, Example, train_examples
from userenc.events import Event
from userenc.tokenize import EventTokenizer, left_pad_tensors

DRAWS = 10  # candidate cuts per user for each next-movie example kept


@torch.no_grad()
def answered_by_hints(encoder, tokenizer: EventTokenizer, examples: list[Example],
                      cat: Catalogue, batch_size: int = 128) -> list[bool]:
    """Per next-movie example: is its answer's title among the titles of its hinted items?"""
    items = tokenizer.vocabs[tokenizer.spec.item.name]
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out: list[bool] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            ids, valid = left_pad_tensors([tokenizer.encode(ex.history) for ex in chunk],
                                          tokenizer.spec, encoder.cfg.max_len, device)
            chosen = encoder.hinted_items(encoder.states(ids, valid, last_only=True), valid, ids)
            for ex, row in zip(chunk, chosen.tolist()):
                out.append(ex.target in {cat.titles.get(items.value(j)) for j in row})
    finally:
        encoder.train(was_training)
    return out


def hinted_training_examples(examples: list[Example], train: dict[str, list[Event]], encoder,
                             tokenizer: EventTokenizer, cat: Catalogue, per_user: int,
                             lengths: list[int], seed: int) -> tuple[list[Example], dict]:
    """`examples` with its next-movie ones replaced by as many (at most) drawn cuts whose
    answer the hints hold; the other tasks' examples are kept as they are."""
    wanted = sum(ex.task == "next_movie" for ex in examples)
    pool = train_examples(train, ["next_movie"], cat, per_user * DRAWS, lengths, seed + 1)
    hit = answered_by_hints(encoder, tokenizer, pool, cat)
    kept = [ex for ex, h in zip(pool, hit) if h][:wanted]
    rest = [ex for ex in examples if ex.task != "next_movie"]
    stats = {"next_movie_drawn": len(pool), "next_movie_in_hints": sum(hit),
             "next_movie_kept": len(kept), "next_movie_unfiltered": wanted}
    return rest + kept, stats
