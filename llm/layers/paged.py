"""Attention over the paged KV pool for a prefill step (and the token -> sequence bookkeeping
the paged layers share).

Decode (one new token per sequence) goes to the kernels (`llm.kernels.ops`). Prefill steps carry
many new tokens per sequence, possibly after a cached prefix (prefix cache hit or an earlier
prefill chunk): such a sequence's K/V is gathered from its blocks and one SDPA runs for it with
the causal offset as its mask; a sequence without a cached prefix attends over its own new K/V
with a plain causal SDPA. Query i of a sequence with `q_len` new
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
                            cu_seqlens_q: torch.Tensor, scale: float, causal: bool = True,
                            k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                            max_seqlen_q: int = 0) -> torch.Tensor:
    """q [N, Hq, D] (the step's new tokens, grouped by sequence as cu_seqlens_q says) attending
    to each sequence's first context_lens[s] pooled tokens. Returns [N, Hq, D]; a sequence with
    context_len 0 gets zeros (as the decode kernel does).

    k_new / v_new [N, Hkv, D]: this step's own K/V (causal only). A sequence with no cached
    prefix (context_len == its new tokens) attends over them directly with a plain causal SDPA:
    no gather from the pool and no explicit mask, which on CPU is about 3x cheaper than the
    masked call. That also serves the engine's warm-up run before it has a pool.

    One SDPA per sequence: no padding to the longest chunk, so a short chunk (or a decode riding
    along) costs what it needs. On the Triton backend (CUDA by default) with a pool, which then
    already holds this step's K/V, one varlen kernel launch replaces the loop
    (llm/kernels/paged_prefill.py); max_seqlen_q (0 = unknown) sizes its grid."""
    from llm.kernels.ops import backend_for, gather_kv, paged_prefill_attention_triton

    if k_cache.numel() > 0 and backend_for(q) == "triton":
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                              cu_seqlens_q, scale, causal=causal,
                                              max_seqlen_q=max_seqlen_q)

    n, hq, d = q.shape
    assert cu_seqlens_q is not None and int(cu_seqlens_q[-1]) == n, "cu_seqlens_q[-1] != N"
    assert causal or k_new is None, "own K/V are a causal shortcut"
    bounds, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    gqa = hq != k_cache.shape[2] if k_new is None else hq != k_new.shape[1]
    out = torch.zeros_like(q)
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        length, q_len = lens[s], end - start
        if q_len == 0 or length == 0:
            continue  # nothing to attend to: zeros
        prefix = length - q_len
        assert prefix >= 0 or not causal, "context_lens smaller than the new tokens"
        if causal and prefix == 0 and k_new is not None:
            k, v = k_new[start:end], v_new[start:end]
            mask, is_causal = None, q_len > 1
        else:
            k, v, _ = gather_kv(k_cache, v_cache, block_tables[s:s + 1],
                                context_lens[s:s + 1], max_len=length)
            k, v = k[0].to(q.dtype), v[0].to(q.dtype)
            mask, is_causal = None, False
            if causal and q_len > 1:
                # query i sits at absolute position prefix + i and sees keys 0 ..= prefix + i
                keys = torch.arange(length, device=q.device)
                mask = keys[None, :] <= prefix + torch.arange(q_len, device=q.device)[:, None]
                if _small_on_cpu(q, q_len, length):
                    out[start:end] = _masked_attention_matmul(q[start:end], k, v, mask, scale)
                    continue
        # 4-D, with a batch of one: torch's CPU SDPA takes 3-D input to its math path, which
        # materializes every score (8.2 s, 11.5 s of it in the kernel zeroing fresh pages, for one
        # 8,192-token causal layer of SmolLM2's shape on 2 cores) where the 4-D call reaches the
        # flash kernel (0.47 s).
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa,
        )[0].transpose(0, 1)
    return out


_MATMUL_SCORES_BYTES = 64 << 20


def _small_on_cpu(q: torch.Tensor, q_len: int, length: int) -> bool:
    """The masked CPU SDPA kernel is 1.5-2.5x slower than three plain ops on these shapes
    (measured on chunked-prefill sizes); use them while the score matrix stays small."""
    return not q.is_cuda and q.shape[1] * q_len * length * 4 <= _MATMUL_SCORES_BYTES


def _masked_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [L, Hkv, D], mask [T, L] (True = visible; every row sees a key) ->
    [T, Hq, D]. GQA without repeating K/V: a KV head's group of query heads is stacked into
    one matrix."""
    t, hq, d = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    qg = q.transpose(0, 1).reshape(hkv, group * t, d)
    scores = torch.matmul(qg, k.permute(1, 2, 0)).view(hkv, group, t, length)
    scores.mul_(scale).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(hkv, group * t, length)
    return torch.matmul(probs, v.transpose(0, 1)).view(hq, t, d).transpose(0, 1)
