"""Attention over the paged KV pool for a prefill step (and the token -> sequence bookkeeping
the paged layers share).

Decode (one new token per sequence) goes to the kernels (`llm.kernels.ops`). Prefill steps carry
many new tokens per sequence, possibly after a cached prefix (prefix cache hit or an earlier
prefill chunk): each sequence's K/V is gathered from its blocks, the new queries are padded into
[S, max_q] and one masked SDPA call runs over the batch. Query i of a sequence with `q_len` new
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
    context_len 0 gets zeros (as the decode kernel does)."""
    from llm.kernels.ops import gather_kv

    n, hq, d = q.shape
    assert cu_seqlens_q is not None and int(cu_seqlens_q[-1]) == n, "cu_seqlens_q[-1] != N"
    k, v, valid = gather_kv(k_cache, v_cache, block_tables, context_lens)  # [S, L, Hkv, D]
    return _padded_attention(q, k, v, valid, context_lens, cu_seqlens_q, scale, causal)


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal prefill over the step's own K/V only (no cached prefix, no pool yet: the engine's
    warm-up/profiling run before it has sized the pool)."""
    seq, offset = token_sequence_index(cu_seqlens_q)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.long)
    s, max_q = q_lens.numel(), int(q_lens.max()) if q_lens.numel() else 0
    kp = k.new_zeros(s, max_q, *k.shape[1:])
    vp = v.new_zeros(s, max_q, *v.shape[1:])
    kp[seq, offset], vp[seq, offset] = k, v
    valid = torch.arange(max_q, device=q.device)[None, :] < q_lens[:, None]
    return _padded_attention(q, kp, vp, valid, q_lens, cu_seqlens_q, scale, causal=True)


def _padded_attention(q, k, v, valid, context_lens, cu_seqlens_q, scale, causal):
    n, hq, d = q.shape
    s, max_len = valid.shape
    seq, offset = token_sequence_index(cu_seqlens_q)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.long)
    max_q = int(q_lens.max()) if s else 0
    qp = q.new_zeros(s, max_q, hq, d)
    qp[seq, offset] = q
    allowed = valid[:, None, :].expand(s, max_q, max_len)  # [S, Tq, L]
    if causal:
        prefix = context_lens.to(torch.long) - q_lens  # cached tokens before the new ones
        last_visible = prefix[:, None] + torch.arange(max_q, device=q.device)[None, :]
        allowed = allowed & (torch.arange(max_len, device=q.device)[None, None, :]
                             <= last_visible[:, :, None])
    # Rows with nothing to see (padding queries, empty cross contexts) would softmax to NaN:
    # let them see key 0 and zero them afterwards.
    empty = ~allowed.any(-1)  # [S, Tq]
    if max_len > 0:
        allowed = allowed.clone()
        allowed[..., 0] |= empty
    else:  # no keys at all: every output is zero
        return q.new_zeros(n, hq, d)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=allowed[:, None], scale=scale, enable_gqa=hq != k.shape[2],
    ).transpose(1, 2)  # [S, Tq, Hq, D]
    out = out.masked_fill(empty[:, :, None, None], 0)
    return out[seq, offset]
