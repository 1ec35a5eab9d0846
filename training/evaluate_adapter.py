"""Evaluating a USER-LLM arm on task examples, through the engine that serves it.

Closed tasks (a title, a genre) decode with beam search constrained to a trie of every
possible answer (llm/engine/beam_search.py), the same for every arm: next_movie reports
Recall@1/5/10 over the ranked beams, the genre tasks accuracy of the top beam. With
exclude_seen, next_movie's trie also leaves out the titles of the events the question reads
(a recommender does not offer a movie already watched; ML-1M users rarely rate one twice). An
arm with an item prior (training/item_prior.py) adds prior_weight * the encoder head's log-prob
of each title to next_movie's beam scores. The review task decodes greedily and reports
ROUGE-1 / ROUGE-L F1 (rouge-score, stemmed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.prompts import answer_ids, prompt_ids
from training.tasks import CLOSED_TASKS, Catalogue, Example

RECALL_AT = (1, 5, 10)


@dataclass(slots=True)
class Arm:
    """One way of answering: an engine (base LLM + adapter), its encoder side, its arm kind."""
    name: str
    kind: str  # userllm | text | none
    engine: Any  # llm.engine.Engine
    encoder: Any = None  # userenc.checkpoint.LoadedEncoder (userllm arm)
    stats: dict[str, float] = field(default_factory=dict)
    # Next movie's beam search adds prior_weight * the encoder head's log-prob of each title
    # (training/item_prior.py); 0: the LLM alone.
    prior: Any = None  # training.item_prior.ItemPrior
    prior_weight: float = 0.0

    def close(self) -> None:
        self.engine.close()


def load_arm(name: str, model_path: str | Path, adapter: str | Path | None, *,
             kind: str | None = None, kv_cache_bytes: int = 256 << 20,
             max_num_seqs: int = 16, prior_weight: float = 0.0,
             titles: dict[str, str] | None = None) -> Arm:
    """`prior_weight` > 0 (a USER-LLM adapter; `titles` the catalogue's item -> title) joins
    the encoder's next-item head to next movie's beam search."""
    from llm.engine.engine import Engine
    from training.adapter_checkpoint import adapter_meta, load_adapter_encoder
    from training.item_prior import ItemPrior

    prior = None
    if prior_weight:
        if adapter is None or titles is None:
            raise ValueError("an item prior needs a USER-LLM adapter and the catalogue's titles")
        prior = ItemPrior.for_adapter(adapter, titles)
    engine = Engine.from_pretrained(model_path, adapter=adapter, kv_cache_bytes=kv_cache_bytes,
                                    max_num_seqs=max_num_seqs)
    encoder = load_adapter_encoder(adapter) if adapter is not None else None
    kind = kind or (adapter_meta(adapter)["arm"] if adapter is not None else "none")
    return Arm(name, kind, engine, encoder, prior=prior, prior_weight=prior_weight)


def answer_trie(arm: Arm, answers: list[str]):
    from llm.engine.beam_search import TokenTrie

    end = _end_token(arm.engine.tokenizer)
    ids = {tuple(answer_ids(arm.engine.tokenizer, a, end)[:-1]): a for a in answers}
    return TokenTrie(list(ids), end), ids


def _end_token(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    return int(vocab["<|im_end|>"]) if "<|im_end|>" in vocab else int(tokenizer.eos_token_id)


def _inputs(arm: Arm, batch: list[Example], budget: int) -> tuple[list[list[int]], list, list[int]]:
    """(prompt ids, user tokens or None per example, events shown as text)."""
    prompts = [prompt_ids(arm.engine.tokenizer, ex, arm.kind, budget) for ex in batch]
    users: list = [None] * len(batch)
    if arm.kind == "userllm":
        t0 = time.perf_counter()
        users = arm.encoder.user_tokens([ex.history for ex in batch])
        arm.stats["encoder_seconds"] = arm.stats.get("encoder_seconds", 0.0) + time.perf_counter() - t0
    return [p.ids for p in prompts], users, [p.events_shown for p in prompts]


def evaluate_closed(arm: Arm, examples: list[Example], catalogue: Catalogue,
                    beam_width: int = 10, users_per_call: int = 4,
                    exclude_seen: bool = False) -> dict[str, Any]:
    """Per task: recall@k (next_movie) or accuracy (genres), with every prediction kept. A
    user's questions go to the engine together: they share the history prefix (text arm) or
    the user tokens, and are prefilled once."""
    exs = [ex for ex in examples if ex.task in CLOSED_TASKS]
    tries = {t: answer_trie(arm, catalogue.answers(t)) for t in {ex.task for ex in exs}}
    if not tries:
        return {}
    longest = max(trie.max_length for trie, _ in tries.values())
    budget = arm.engine.max_model_len - longest - 1
    by_user: dict[str, list[Example]] = {}
    for ex in exs:
        by_user.setdefault(ex.user, []).append(ex)
    users = list(by_user)
    rank: dict[int, float] = {}
    pred: dict[int, str | None] = {}
    shown: dict[int, int] = {}
    for i in range(0, len(users), users_per_call):
        batch = [ex for u in users[i:i + users_per_call] for ex in by_user[u]]
        prompts, tokens, events = _inputs(arm, batch, budget)
        priors = _priors(arm, batch)
        results = arm.engine.beam_search(prompts, [_trie(ex, tries, exclude_seen, priors.get(k))
                                                   for k, ex in enumerate(batch)],
                                         beam_width, tokens)
        for ex, res, n in zip(batch, results, events):
            answers = [tries[ex.task][1][tuple(a)] for a, _ in res]
            rank[id(ex)] = answers.index(ex.target) + 1 if ex.target in answers else np.inf
            pred[id(ex)] = answers[0] if answers else None
            shown[id(ex)] = n
    out: dict[str, Any] = {}
    for task in CLOSED_TASKS:
        task_exs = [ex for ex in exs if ex.task == task]
        if not task_exs:
            continue
        ranks = np.asarray([rank[id(ex)] for ex in task_exs], dtype=float)
        metrics: dict[str, Any] = {"examples": len(task_exs)}
        if task == "next_movie":
            metrics |= {f"recall@{k}": float((ranks <= k).mean()) for k in RECALL_AT}
        else:
            metrics["accuracy"] = float((ranks == 1).mean())
        if arm.kind == "text":
            metrics["events_shown_mean"] = float(np.mean([shown[id(ex)] for ex in task_exs]))
        metrics["predictions"] = [pred[id(ex)] for ex in task_exs]
        # Per example, for paired comparisons between arms on the same users.
        metrics["users"] = [ex.user for ex in task_exs]
        metrics["ranks"] = [None if np.isinf(r) else int(r) for r in ranks]
        out[task] = metrics
    return out


def _priors(arm: Arm, batch: list[Example]) -> dict[int, tuple[dict[str, int], torch.Tensor, float]]:
    """Per next-movie example of the batch (by position): the prior's columns, its row and
    weight."""
    at = [k for k, ex in enumerate(batch) if ex.task == "next_movie"]
    if arm.prior is None or not arm.prior_weight or not at:
        return {}
    t0 = time.perf_counter()
    rows = arm.prior.log_priors([batch[k].history for k in at])
    arm.stats["encoder_seconds"] = arm.stats.get("encoder_seconds", 0.0) + time.perf_counter() - t0
    return {k: (arm.prior.column, row, arm.prior_weight) for k, row in zip(at, rows)}


def _trie(ex: Example, tries: dict, exclude_seen: bool, prior=None):
    trie, titles = tries[ex.task]
    if prior is None and (not exclude_seen or ex.task != "next_movie"):
        return trie
    from llm.engine.beam_search import TokenTrie

    seen = {e.fields.get("title") for e in ex.history} if exclude_seen else set()
    kept = [(seq, title) for seq, title in titles.items() if title not in seen]
    if prior is None:
        return TokenTrie([seq for seq, _ in kept], trie.end_token)
    column, row, weight = prior
    values = row.tolist()
    return TokenTrie([seq for seq, _ in kept], trie.end_token,
                     [values[column[title]] for _, title in kept], weight)


def review_rouge(exs: list[Example], candidates: list[list[str]]) -> dict[str, Any]:
    """ROUGE-1 / ROUGE-L F1 (rouge-score, stemmed) of each example's best candidate against its
    target (a model gives one candidate; an oracle picks among several), per example too, for
    paired comparisons between arms on the same users."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for ex, cands in zip(exs, candidates, strict=True):
        scores = [scorer.score(ex.target, c) for c in cands]
        r1.append(max(s["rouge1"].fmeasure for s in scores))
        rl.append(max(s["rougeL"].fmeasure for s in scores))
    return {"review": {"examples": len(exs), "rouge1": float(np.mean(r1)),
                       "rougeL": float(np.mean(rl)), "users": [ex.user for ex in exs],
                       "rouge1_each": r1, "rougeL_each": rl}}


def evaluate_review(arm: Arm, examples: list[Example], max_tokens: int = 24,
                    batch_size: int = 16) -> dict[str, Any]:
    from llm.engine.sampling_params import SamplingParams

    exs = [ex for ex in examples if ex.task == "review"]
    if not exs:
        return {}
    budget = arm.engine.max_model_len - max_tokens - 1
    texts = []
    for i in range(0, len(exs), batch_size):
        batch = exs[i:i + batch_size]
        prompts, users, _ = _inputs(arm, batch, budget)
        outs = arm.engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                   users)
        texts += [o.text.strip() for o in outs]
    out = review_rouge(exs, [[t] for t in texts])
    out["review"]["predictions"] = texts
    return out


def evaluate(arm: Arm, examples: list[Example], catalogue: Catalogue, beam_width: int = 10,
             exclude_seen: bool = False) -> dict[str, Any]:
    with torch.inference_mode():
        return (evaluate_closed(arm, examples, catalogue, beam_width, exclude_seen=exclude_seen)
                | evaluate_review(arm, examples))
