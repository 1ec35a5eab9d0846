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

import functools
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
    seeded: list[tuple[int, int]]  # (row, step_key(seed, output position))
    # > 0 when every sampling row has a top_k <= this: a top-k of that width replaces the sort.
    candidates: int = 0
    all_random: bool = False  # no greedy row: skip the argmax they would need
    # Every sampling row's top_k equals `candidates`: the top-k selection is the mask.
    top_k_is_width: bool = False


_M32 = 0xFFFFFFFF


def _mix32(x):
    """lowbias32 (C. Wellons): a well-mixing bijection on 32-bit values; works on Python ints
    and on int64 tensors (every product of a 32-bit value and a constant is masked back)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """_mix32 in place on an int64 tensor (fewer temporaries: this runs every sampled step)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= _M32
    x ^= x >> 15
    x *= 0x846CA68B
    x &= _M32
    x ^= x >> 16
    return x


@functools.lru_cache(maxsize=4096)
def _seed_hash(seed: int) -> int:
    """A request's seed folded to 32 bits; cached, since it is asked for at every step."""
    seed &= (1 << 64) - 1
    return _mix32(_mix32(seed & _M32) ^ (seed >> 32))


def step_key(seed: int, step: int) -> int:
    """A seeded request's 32-bit key for its draw at output position `step`."""
    return _mix32(_mix32(_seed_hash(seed) ^ (step & _M32)) ^ 0x5BD1E995)


def seeded_uniform(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """keys [R] int64, tokens [R, C] or [1, C] int64 -> uniforms [R, C] float32 in (0, 1): one
    hash round over (key, token id), so each token's number depends on nothing else. One round
    is enough: the key is already a full hash of (seed, position), and token -> number is a
    bijection for a given key (a multiplication by an odd constant, an xor, lowbias32)."""
    x = ((tokens * 0x9E3779B9) & _M32) ^ keys[:, None]
    x = _mix32_(x)
    x >>= 9
    return x.float().add_(0.5).mul_(2.0 ** -23)  # 23 bits + 0.5: exact in float32


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
    t = t.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    vocab = logits.shape[-1]
    index = None  # candidate column -> token id; None: the candidates are the vocabulary
    # Selecting before scaling is the same selection (x -> (x - max) / T keeps the order) on
    # far fewer numbers; column 0 then holds the row maximum.
    if batch.candidates:
        x, index = logits.topk(min(batch.candidates, vocab), dim=-1)
    elif batch.use_top_k or batch.use_top_p:
        x, index = logits.sort(dim=-1, descending=True)
    if index is None:
        x = logits - logits.max(dim=-1, keepdim=True).values
    else:
        x = x - x[:, :1]
    x /= t
    if index is not None:
        width = x.shape[-1]
        if batch.use_top_k and not batch.top_k_is_width:
            top_k = batch.top_k.long()
            k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
            x.masked_fill_(x < x.gather(1, (k - 1)[:, None]), float("-inf"))  # ties kept
        if batch.use_top_p:
            # Drop a column when the mass before it already reaches top_p (never column 0).
            mass = x.softmax(dim=-1).cumsum_(dim=-1)
            x[:, 1:].masked_fill_(mass[:, :-1] >= batch.top_p[:, None], float("-inf"))
    # Unnormalised weights (x <= 0): elementwise the same numbers whichever path ran, so a
    # seeded row's choice does not depend on its batch; argmax(w / q) ignores the scale.
    weights = x.exp_()
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
    choice = weights.div_(u.log_().neg_()).argmax(dim=-1)
    if index is not None:
        choice = index.gather(1, choice[:, None])[:, 0]
    return choice if greedy is None else torch.where(is_greedy, greedy, choice)
