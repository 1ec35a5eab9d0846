"""Full-corpus ranking evaluation: every catalogue item is a candidate, no sampled negatives.

Metrics: HR@1/5/10/50, NDCG@10, MRR, reported with and without excluding the items a user has
already interacted with. A target unseen in training (OOV) counts as a miss.

Cold start (`cold_start_report`): ML-1M users all have >= 20 ratings, so short histories are
made by truncation: each test user's leave-one-out test event is asked with only the LAST n
events of its input (n in 1-5 or 6-20). The last events, not the first, so the gap between input
and target stays the one of the full evaluation: the buckets then differ by history length only,
not also by how far in the future the target lies.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from userenc.events import Event
from userenc.model import UserEncoder
from userenc.spec import FIRST_ID, OOV_ID
from userenc.tokenize import EventTokenizer, left_pad_tensors

CUTOFFS = (1, 5, 10, 50)
# Histories longer than these event counts fall in the next bucket (for HR@10 by length).
LENGTH_BUCKETS = (5, 20, 50, 100, 200, 500)
# Truncated-history buckets for the cold-start report: (fewest, most) input events.
COLD_START_BUCKETS = ((1, 5), (6, 20))

ScoreFn = Callable[[list[list[Event]], list[dict[str, np.ndarray]]], torch.Tensor]


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """ranks: 1-based float array, inf for a miss."""
    if len(ranks) == 0:
        return {f"hr@{k}": 0.0 for k in CUTOFFS} | {"ndcg@10": 0.0, "mrr": 0.0, "users": 0}
    out = {f"hr@{k}": float((ranks <= k).mean()) for k in CUTOFFS}
    out["ndcg@10"] = float(np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    out["users"] = int(len(ranks))
    return out


def length_bucket(n: int) -> str:
    lo = 0
    for hi in LENGTH_BUCKETS:
        if n <= hi:
            return f"{lo + 1}-{hi}"
        lo = hi
    return f">{LENGTH_BUCKETS[-1]}"


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, seen: list[np.ndarray] | None) -> np.ndarray:
    """1-based rank of each target among all candidates (ties counted against the target)."""
    scores = scores.float().clone()
    scores[:, :FIRST_ID] = float("-inf")
    if seen is not None:
        for row, items in enumerate(seen):
            items = items[(items >= FIRST_ID) & (items != targets[row].item())]
            scores[row, torch.from_numpy(items)] = float("-inf")
    target_scores = scores.gather(1, targets[:, None].clamp(min=0))
    # >= counts the target itself and every tie: a constant scorer ranks last, not first.
    ranks = (scores >= target_scores).sum(1).float()
    ranks[targets < FIRST_ID] = math.inf
    return ranks.numpy()


def model_scorer(model: UserEncoder, tokenizer: EventTokenizer) -> ScoreFn:
    def score(histories: list[list[Event]], encoded: list[dict[str, np.ndarray]]) -> torch.Tensor:
        ids, valid = left_pad_tensors(encoded, tokenizer.spec, model.cfg.max_len, next(model.parameters()).device)
        return model.next_item_scores(ids, valid).cpu()

    return score


def evaluate(
    score: ScoreFn,
    tokenizer: EventTokenizer,
    cases: dict[str, tuple[list[Event], Event]],
    batch_size: int = 256,
) -> dict[str, dict]:
    """{"all": metrics, "exclude_seen": metrics, "by_length": {bucket: hr@10 (all)}}."""
    item_vocab = tokenizer.vocabs[tokenizer.spec.item.name]
    item_name = tokenizer.spec.item.name
    ranks_all, ranks_excl, lengths = [], [], []
    users = sorted(cases)
    for i in range(0, len(users), batch_size):
        chunk = [cases[u] for u in users[i : i + batch_size]]
        histories = [h for h, _ in chunk]
        # The target's time is the request time: what a "next_gap" feature reads (others don't).
        encoded = [tokenizer.encode(h, now=t.timestamp) for h, t in chunk]
        targets = torch.tensor([item_vocab.id(t.item_id) for _, t in chunk], dtype=torch.long)
        scores = score(histories, encoded)
        ranks_all.append(rank_targets(scores, targets, None))
        ranks_excl.append(rank_targets(scores, targets, [e[item_name] for e in encoded]))
        lengths += [len(h) for h in histories]
    all_r = np.concatenate(ranks_all) if ranks_all else np.zeros(0)
    excl_r = np.concatenate(ranks_excl) if ranks_excl else np.zeros(0)
    by_length: dict[str, dict[str, float]] = {}
    for bucket in dict.fromkeys(length_bucket(n) for n in sorted(lengths)):
        sel = np.array([length_bucket(n) == bucket for n in lengths])
        by_length[bucket] = {"users": int(sel.sum()), "hr@10": float((all_r[sel] <= 10).mean())}
    oov = int(sum(1 for _, t in (cases[u] for u in users) if item_vocab.id(t.item_id) == OOV_ID))
    return {"all": metrics_from_ranks(all_r), "exclude_seen": metrics_from_ranks(excl_r), "by_length": by_length, "oov_targets": oov}


def popularity_scorer(tokenizer: EventTokenizer, train: dict[str, list[Event]]) -> ScoreFn:
    """The popularity baseline: every user gets the catalogue ranked by training counts."""
    item_vocab = tokenizer.vocabs[tokenizer.spec.item.name]
    counts = torch.zeros(len(item_vocab))
    for h in train.values():
        for e in h:
            counts[item_vocab.id(e.item_id)] += 1
    counts[:FIRST_ID] = float("-inf")

    def score(histories: list[list[Event]], encoded: list[dict[str, np.ndarray]]) -> torch.Tensor:
        return counts.expand(len(histories), -1)

    return score


def truncated_cases(cases: dict[str, tuple[list[Event], Event]], fewest: int, most: int
                    ) -> dict[str, tuple[list[Event], Event]]:
    """The same test events asked with only the last n events of each input, n cycling through
    fewest..most over the sorted users (deterministic, every length equally often). A user whose
    input is shorter than its n is left out (no padding a history to a length it never had)."""
    assert 1 <= fewest <= most, "a truncated history holds at least one event"
    out = {}
    for i, user in enumerate(sorted(cases)):
        history, target = cases[user]
        n = fewest + i % (most - fewest + 1)
        if len(history) >= n:
            out[user] = (history[-n:], target)
    return out


def cold_start_report(scorers: dict[str, ScoreFn], tokenizer: EventTokenizer,
                      cases: dict[str, tuple[list[Event], Event]],
                      buckets: tuple[tuple[int, int], ...] = COLD_START_BUCKETS) -> dict[str, dict[str, dict]]:
    """{"1-5": {scorer name: {"users", "hr@10", "hr@10_exclude_seen", "ndcg@10"}}, ...}: every
    scorer on the very same truncated users and events."""
    report: dict[str, dict[str, dict]] = {}
    for fewest, most in buckets:
        short = truncated_cases(cases, fewest, most)
        report[f"{fewest}-{most}"] = {}
        for name, score in scorers.items():
            res = evaluate(score, tokenizer, short)
            report[f"{fewest}-{most}"][name] = {"users": res["all"]["users"], "hr@10": res["all"]["hr@10"],
                                                "hr@10_exclude_seen": res["exclude_seen"]["hr@10"],
                                                "ndcg@10": res["all"]["ndcg@10"]}
    return report
