"""Triton varlen paged prefill attention: one launch per layer for a whole prefill step.

The step's new tokens arrive packed ([N, Hq, D], cu_seqlens_q says where each sequence's run
starts), and every sequence's K/V, this step's included, is already in the pool (write_kv runs
first). A program takes BLOCK_M consecutive new tokens of one sequence for one q head, walks
that sequence's keys a tile (TILE consecutive positions, each looking up its block) at a time
with an online softmax, and writes its rows. Nothing is padded to the longest sequence, no mask
is materialized, and the host never loops over sequences.

Causal (self-attention): new token i of a sequence with `q_len` new tokens and `context_len`
cached ones sits at absolute position prefix + i (prefix = context_len - q_len: an earlier
chunk or a prefix-cache hit) and sees keys 0 ..= prefix + i; a program stops at the last key
its rows can see. Not causal (cross-attention to user tokens): every one of the sequence's
context_len keys is visible. A context_len of 0 gives zeros, as the decode kernel does.

Scores are in log2 units (q pre-scaled by scale * log2(e)), as in paged_decode.py. fp32 uses
an ieee tl.dot (exact enough for the reference comparison); fp16/bf16 use the tensor cores.
The grid's third axis is the longest run of new tokens, which the engine knows on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.kernels.paged_decode import LOG2E, load_keys


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_ptr,
    out_ptr, qk_scale, max_pages,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt_seq,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    context_len = tl.minimum(tl.load(context_lens_ptr + seq), max_pages * BLOCK_SIZE)
    i = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # offsets among the sequence's new tokens
    i_ok = i < q_len
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
                mask=i_ok[:, None] & d_ok[None, :], other=0.0)

    prefix = context_len - q_len
    if CAUSAL:  # the last key any row of this program may see
        kv_end = tl.minimum(context_len, prefix + (m_block + 1) * BLOCK_M)
    else:
        kv_end = context_len
    kv_end = tl.where(m_block * BLOCK_M < q_len, kv_end, 0)  # programs past the run: no work

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    t = tl.arange(0, TILE)
    for tile_start in range(0, kv_end, TILE):
        pos = tile_start + t
        pos_ok = pos < kv_end
        k, row, kv_mask, valid = load_keys(k_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
                                           pos, pos_ok, d, d_ok, kv_head, stride_c_block,
                                           stride_c_tok, stride_c_head, BLOCK_SIZE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE]
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= (prefix + i)[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row stays 0
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    o = acc / tl.where(l > 0.0, l, 1.0)[:, None]  # no visible key -> zeros
    dst = out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])


def launch_shape(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, TILE, num_warps): 16-row tiles are tl.dot's minimum; fp32 tiles stay small so
    an ieee dot at head_dim 128 keeps its registers (aot_check reports the spills)."""
    if dtype == torch.float32:
        return 16, 16, 4
    return (64, 32, 8) if head_dim <= 64 else (32, 32, 4)


def paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, block_tables: torch.Tensor,
                                   context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   scale: float, causal: bool = True,
                                   max_seqlen_q: int = 0) -> torch.Tensor:
    """Same contract as llm.layers.paged.paged_prefill_attention with every key in the pool.
    max_seqlen_q: the longest run of new tokens (0: read from cu_seqlens_q, a device read)."""
    n, hq, d = q.shape
    num_seqs = context_lens.shape[0]
    _, block_size, hkv, _ = k_cache.shape
    assert hq % hkv == 0, "GQA needs Hq to be a multiple of Hkv"
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cu_seqlens_q.shape[0] == num_seqs + 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, "tl.dot needs q and the pool in one dtype"
    block_tables = block_tables.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_pages = block_tables.shape[1]
    if n == 0 or num_seqs == 0:
        return out
    if max_pages == 0:
        return out.zero_()
    if not max_seqlen_q:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m, tile, num_warps = launch_shape(d, q.dtype)
    head_pad = max(16, triton.next_power_of_2(d))
    grid = (num_seqs, hq, triton.cdiv(max(1, max_seqlen_q), block_m))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens.contiguous(),
        cu_seqlens_q.contiguous(), out, scale * LOG2E, max_pages,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=d, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, TILE=tile, CAUSAL=causal,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps,
    )
    return out
