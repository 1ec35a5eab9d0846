"""Next-token choice for the whole batch in one pass of tensor ops on the logits' device.

Greedy, temperature, top-k and top-p rows are handled together: the settings are per-row
tensors (llm/engine/input_batch.py); one sort serves both masks (skipped when no running
request uses either; a top-k of the largest k instead when every sampling request has a top_k),
and the draw is an exponential race, argmax(p / q) with q ~ Exp(1), which picks token i with
probability p_i, as multinomial does.

Noise: requests without a seed share one draw from the engine's generator. A seeded request's
noise is a counter-based hash of (seed, output position, token id), computed for all seeded
rows at once (no generator per request, no loop over rows): the same tokens whatever else
shares its batch, which path (sort, top-k, none) the batch needed, and on any device. The reference
(llm/engine/sampler.py: Sampler) stays the oracle: same greedy tokens, same distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingBatch:
    """One step's sampling rows, gathered from the persistent InputBatch."""
    temperature: torch.Tensor  # [S] float32, 0 = greedy
    top_k: torch.Tensor  # [S] (any dtype holding integers), 0 = off
    top_p: torch.Tensor  # [S] float32, 1 = off
    any_random: bool
    use_top_k: bool
    use_top_p: bool
    seeded: list[tuple[int, tuple[int, int]]]  # (row, step_keys(seed, output position))
    # > 0 when every sampling row has a top_k <= this: a top-k of that width replaces the sort.
    candidates: int = 0
    all_random: bool = False  # no greedy row: skip the argmax they would need


_M32 = 0xFFFFFFFF


def _mix32(x):
    """lowbias32 (C. Wellons): a well-mixing bijection on 32-bit values; works on Python ints
    and on int64 tensors (every product of a 32-bit value and a constant is masked back)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def step_keys(seed: int, step: int) -> tuple[int, int]:
    """Two 32-bit keys for a seeded request's draw at output position `step`."""
    seed &= (1 << 64) - 1
    h = _mix32(_mix32(seed & _M32) ^ (seed >> 32))
    k1 = _mix32(h ^ (step & _M32))
    return k1, _mix32(k1 ^ 0x5BD1E995)


def seeded_uniform(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """keys [R, 2] int64, tokens [R, C] or [1, C] int64 -> uniforms [R, C] float32 in (0, 1):
    two hash rounds over (key, token id), so each token's number depends on nothing else."""
    x = _mix32(((tokens * 0x9E3779B9) & _M32) ^ keys[:, :1])
    x = _mix32(x ^ keys[:, 1:])
    return ((x >> 9).float() + 0.5) * 2.0 ** -23  # 23 bits + 0.5: exact in float32


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
           ) -> torch.Tensor:
    """logits [S, V] (any float dtype; penalties and min_tokens masks already applied) ->
    token ids [S] int64 on the logits' device."""
    logits = logits.float()
    if not batch.any_random:
        return logits.argmax(dim=-1)
    t = batch.temperature
    greedy = is_greedy = None
    if not batch.all_random:
        greedy, is_greedy = logits.argmax(dim=-1), t == 0
        t = torch.where(is_greedy, torch.ones_like(t), t)
    # As the reference: shift by the row maximum and keep T above the smallest normal, so a
    # tiny temperature tends to the greedy token instead of overflowing to inf / NaN.
    t = t.clamp_min(torch.finfo(torch.float32).tiny)
    x = (logits - logits.max(dim=-1, keepdim=True).values) / t[:, None]
    vocab = x.shape[-1]
    index = None  # candidate column -> token id; None: the candidates are the vocabulary
    if batch.candidates:
        x, index = x.topk(min(batch.candidates, vocab), dim=-1)
    elif batch.use_top_k or batch.use_top_p:
        x, index = x.sort(dim=-1, descending=True)
    if index is not None:
        width = x.shape[-1]
        drop = torch.zeros_like(x, dtype=torch.bool)
        if batch.use_top_k:
            top_k = batch.top_k.long()
            k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
            drop |= x < x.gather(1, (k - 1)[:, None])  # ties with the k-th are kept
        if batch.use_top_p:
            probs = x.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= batch.top_p[:, None]
            drop[:, 0] = False
        x = x.masked_fill(drop, float("-inf"))
    # Unnormalised weights (x <= 0): elementwise the same numbers whichever path ran, so a
    # seeded row's choice does not depend on its batch; argmax(w / q) ignores the scale.
    weights = x.exp()
    if batch.seeded:
        dev = weights.device
        keys = torch.tensor([k for _, k in batch.seeded], dtype=torch.long).to(dev)
        if len(batch.seeded) == weights.shape[0]:  # every row seeded, in row order
            tokens = index if index is not None else torch.arange(vocab, device=dev)[None]
            u = seeded_uniform(keys, tokens)
        else:
            u = torch.empty_like(weights).uniform_(generator=generator)
            rows = torch.tensor([r for r, _ in batch.seeded], device=dev)
            tokens = index[rows] if index is not None else torch.arange(vocab, device=dev)[None]
            u[rows] = seeded_uniform(keys, tokens)
    else:
        u = torch.empty_like(weights).uniform_(generator=generator)
    # q = -log(u) ~ Exp(1); u = 0 gives q = inf and a score of 0, never NaN (w > 0 or 0 / inf).
    choice = (weights / u.log_().neg_()).argmax(dim=-1)
    if index is not None:
        choice = index.gather(1, choice[:, None])[:, 0]
    return choice if greedy is None else torch.where(is_greedy, greedy, choice)
