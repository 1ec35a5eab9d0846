"""The reference sampler: next-token choice for a batch of sequences with per-request settings,
written for clarity. The engine samples with llm/engine/batch_sampler.py (one vectorized pass on
the device); tests hold that one to this one (same greedy tokens, same distribution).

The logit transforms are batched tensor ops; only the final draw loops over rows, because each
request draws from its own torch.Generator: a seeded request then gets the same tokens whatever
else shares its batch.
"""
from __future__ import annotations

import torch

from llm.engine.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, previous: list[list[int]],
                             penalties: list[float]) -> torch.Tensor:
    """HF semantics over prompt + output tokens: positive logits / p, negative logits * p
    (each token once, however often it occurred)."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and previous[i]]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        ids = torch.tensor(sorted(set(previous[i])), dtype=torch.long, device=logits.device)
        picked = logits[i, ids]
        p = penalties[i]
        logits[i, ids] = torch.where(picked > 0, picked / p, picked * p)
    return logits


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0: keep all); the rest become -inf."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).long()[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least
    one token); the rest become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 previous: list[list[int]] | None = None) -> list[int]:
        """logits: [S, V] for S sequences; previous: each sequence's tokens so far (for the
        repetition penalty). Returns one token id per row."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators)
        logits = logits.float()
        if previous is not None:
            logits = apply_repetition_penalty(logits, previous,
                                              [p.repetition_penalty for p in params])
        greedy_ids = logits.argmax(dim=-1).tolist()
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return greedy_ids
        device = logits.device
        rows = torch.tensor(random_rows, device=device)
        sub = logits[rows]
        temperature = torch.tensor([params[i].temperature for i in random_rows],
                                   dtype=sub.dtype, device=device)
        # Shifted by the row's maximum first (softmax and the top-k / top-p masks do not
        # change) and T kept above the dtype's smallest normal (a float64 1e-300 is 0 in
        # float32): a tiny temperature would otherwise overflow positive logits to inf, or
        # divide 0 by 0, and sample from NaN; this way it tends to the greedy choice.
        temperature = temperature.clamp_min(torch.finfo(sub.dtype).tiny)
        sub = (sub - sub.max(dim=-1, keepdim=True).values) / temperature[:, None]
        if any(params[i].top_k > 0 for i in random_rows):
            sub = top_k_mask(sub, torch.tensor([params[i].top_k for i in random_rows],
                                               device=device))
        if any(params[i].top_p < 1.0 for i in random_rows):
            sub = top_p_mask(sub, torch.tensor([params[i].top_p for i in random_rows],
                                               dtype=sub.dtype, device=device))
        probs = sub.softmax(dim=-1).cpu()  # generators live on the CPU
        for r, i in enumerate(random_rows):
            greedy_ids[i] = int(torch.multinomial(probs[r], 1, generator=generators[i]))
        return greedy_ids
