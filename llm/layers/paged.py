"""Attention over the paged KV pool for a prefill step (and the token -> sequence bookkeeping
the paged layers share).

Decode (one new token per sequence) goes to the kernels (`llm.kernels.ops`). Prefill steps carry
many new tokens per sequence, possibly after a cached prefix (prefix cache hit or an earlier
prefill chunk): each sequence's K/V is gathered from its blocks and one SDPA runs per sequence
with the causal offset as its mask. Query i of a sequence with `q_len` new
tokens and `ctx_len` tokens in the cache sits at absolute position ctx_len - q_len + i, so it may
see keys 0 ..= ctx_len - q_len + i (the causal offset). Cross-attention uses the same routine
without the causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_sequence_index(cu_seqlens_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of the flat stream: (its sequence, its offset among that sequence's new
    tokens). cu_seqlens_q [S+1] -> two [N] int64 tensors."""
    cu = cu_seqlens_q.to(torch.long)
    q_lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=cu.device), q_lens)
    offset = torch.arange(seq.numel(), device=cu.device) - cu[:-1][seq]
    return seq, offset


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, scale: float, causal: bool = True
                            ) -> torch.Tensor:
    """q [N, Hq, D] (the step's new tokens, grouped by sequence as cu_seqlens_q says) attending
    to each sequence's first context_lens[s] pooled tokens. Returns [N, Hq, D]; a sequence with
    context_len 0 gets zeros (as the decode kernel does).

    One SDPA per sequence over its own gathered K/V: no padding to the longest chunk, so a
    short chunk (or a decode riding along) costs what it needs."""
    from llm.kernels.ops import gather_kv

    n, hq, d = q.shape
    assert cu_seqlens_q is not None and int(cu_seqlens_q[-1]) == n, "cu_seqlens_q[-1] != N"
    bounds, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    gqa = hq != k_cache.shape[2]
    out = torch.zeros_like(q)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        length, q_len = lens[s], end - start
        if q_len == 0 or length == 0:
            continue  # nothing to attend to: zeros
        k, v, _ = gather_kv(k_cache, v_cache, block_tables[s:s + 1], context_lens[s:s + 1],
                            max_len=length)
        mask = None
        if causal and q_len > 1:
            # query i sits at absolute position prefix + i and sees keys 0 ..= prefix + i
            prefix = length - q_len
            assert prefix >= 0, "context_lens smaller than the new tokens"
            keys = torch.arange(length, device=q.device)
            mask = keys[None, :] <= prefix + torch.arange(q_len, device=q.device)[:, None]
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[0].to(q.dtype).transpose(0, 1),
            v[0].to(q.dtype).transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=gqa,
        ).transpose(0, 1)
    return out


def has_cached_prefix(context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor) -> bool:
    """True when some sequence attends to tokens from earlier steps (prefix-cache hit or an
    earlier prefill chunk)."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    return not torch.equal(context_lens.to(torch.long), q_lens.to(torch.long))


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal prefill when no sequence has a cached prefix: each sequence attends over its own
    new K/V only, so nothing is read back from the pool (also the engine's warm-up run before
    it has a pool). One causal SDPA per sequence: no padding, no explicit mask."""
    bounds = cu_seqlens_q.tolist()
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, T, D]
        out[start:end] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
    return out
