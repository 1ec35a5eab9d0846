"""Triton paged-attention decode, split-KV ("flash decoding").

Decode has one query token per sequence, so a program per (sequence, head) leaves the GPU idle
when the batch is small and the context long. We also split each sequence's tokens into
NUM_SPLITS ranges:

  pass 1, grid (S, Hkv, NUM_SPLITS): a program takes the GROUP q heads that share one kv head
          (GQA: K/V are loaded once for the group), walks its token range a tile (TILE
          consecutive positions, any block size; each looks up its block) at a time
          with an online softmax (running max m, running sum l, fp32 accumulator), and writes
          its normalised partial output and log-sum-exp;
  pass 2, grid (S, Hq): combines the splits, weighting each by exp(lse_split - lse_max).

Two ways to compute a tile's scores and P@V, chosen on the host (USE_DOT): tl.dot with the GQA
group padded to 16 rows (tensor cores; the CUDA default for fp16/bf16), or broadcast-and-reduce
in fp32 registers (any shape; fp32 and the interpreter). `python -m llm.kernels.aot_check`
compiles both for sm_90 without a GPU and reports registers and spills.

With one split, pass 1 writes the final output and pass 2 is skipped. Scores are kept in log2
units (q is pre-scaled by scale * log2(e)) so the kernel uses exp2. Everything is shape-derived
on the host (no .item() on device data), so the call can be captured in a CUDA graph as long as
the block-table width is fixed.

Masking: tokens at positions >= context_len and -1 block entries are never loaded; a context_len of 0 gives an all-zero output (cross-attention for a
request without user tokens), never NaN. The caller keeps context_lens[s] <= block-table width
* block_size (the reference asserts it; the kernel, which cannot check without a device sync,
never reads past the table and so would attend to the first width * block_size tokens only).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llm.kernels.reference import _check_decode

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it buys
MAX_SPLITS = 32
TILE_ELEMS = 8192  # broadcast path: elements of one [GROUP_PAD, TILE, HEAD_PAD] product
DOT_TILE_TOKENS = 32
MAX_TILE_TOKENS = 128
MIN_TILE_TOKENS = 4


@triton.jit
def load_keys(k_cache_ptr, table_ptr, pos, pos_ok, d, d_ok, kv_head, stride_c_block,
              stride_c_tok, stride_c_head, BLOCK_SIZE: tl.constexpr):
    """A tile of one sequence's token positions -> (their keys [TILE, HEAD_PAD] for `kv_head`,
    their offsets in the pool (the values sit at the same ones), the load mask, whether each
    position exists). Each position looks up its block in the sequence's table row; -1 entries
    and positions outside `pos_ok` load zeros. Shared by the decode and prefill kernels."""
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=pos_ok, other=-1).to(tl.int64)
    row = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + kv_head * stride_c_head
    valid = pos_ok & (block >= 0)
    kv_mask = valid[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return k, row, kv_mask, valid


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, tokens_per_split, max_pages,
    stride_q_seq, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt_seq,
    stride_o_seq, stride_o_head,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # This program's token range; never past the context nor the block table's width.
    context_len = tl.minimum(tl.load(context_lens_ptr + seq), max_pages * BLOCK_SIZE)
    tok_start = split * tokens_per_split
    tok_end = tl.minimum(tok_start + tokens_per_split, context_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_head = kv_head * GROUP + g
    q_raw = tl.load(q_ptr + seq * stride_q_seq + q_head[:, None] * stride_q_head + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q_raw.to(tl.float32) * qk_scale  # scale * log2(e): scores in log2 units

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    t = tl.arange(0, TILE)
    for tile_start in range(tok_start, tok_end, TILE):
        # A tile is TILE consecutive token positions: any block size, pages may straddle tiles.
        pos = tile_start + t
        pos_ok = pos < tok_end
        k, row, kv_mask, valid = load_keys(k_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
                                           pos, pos_ok, d, d_ok, kv_head, stride_c_block,
                                           stride_c_tok, stride_c_head, BLOCK_SIZE)
        if USE_DOT:  # tensor cores; GROUP_PAD >= 16 (padded q heads are zero rows)
            s = tl.dot(q_raw, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        else:  # broadcast-and-reduce: any tile shape, exact fp32 (the interpreter's path)
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [GROUP_PAD, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile stays 0
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m = m_new

    has = l > 0.0
    o = acc / tl.where(has, l, 1.0)[:, None]  # no tokens -> zeros
    o_mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + seq * stride_o_seq + q_head[:, None] * stride_o_head + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partial buffers: out [S, Hq, NUM_SPLITS, HEAD_PAD], lse [S, Hq, NUM_SPLITS], fp32
        part = (seq * NUM_Q_HEADS + q_head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :], o, mask=o_mask)
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_ok)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_o_seq, stride_o_head,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    sp_ok = sp < NUM_SPLITS
    part = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + sp
    lse = tl.load(part_lse_ptr + part, mask=sp_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits weigh 0
    o = tl.load(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :],
                mask=sp_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d,
             res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, block_size: int,
                      device: torch.device) -> int:
    """From shapes only: enough splits to fill the GPU when S * Hkv is small, never splits
    shorter than MIN_TOKENS_PER_SPLIT tokens of the longest possible context."""
    by_length = triton.cdiv(max_pages * block_size, MIN_TOKENS_PER_SPLIT)
    target_programs = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 64
    by_occupancy = triton.cdiv(target_programs, max(1, num_seqs * num_kv_heads))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def launch_shape(use_dot: bool, group: int, head_dim: int) -> tuple[int, int, int]:
    """(GROUP_PAD, TILE tokens, num_warps) for one path. The broadcast path's products are
    [GROUP_PAD, TILE, HEAD_PAD] register tiles, kept near TILE_ELEMS and spread over 8 warps
    (ptxas reports no spills for the engine's shapes, see aot_check); tl.dot wants 16 rows."""
    head_pad = triton.next_power_of_2(head_dim)
    if use_dot:
        return max(16, triton.next_power_of_2(group)), DOT_TILE_TOKENS, 4
    group_pad = triton.next_power_of_2(group)
    tile = min(MAX_TILE_TOKENS, TILE_ELEMS // (group_pad * head_pad))
    return group_pad, max(MIN_TILE_TOKENS, _floor_pow2(tile)), 8


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, num_splits: int | None = None,
                                  tile_tokens: int | None = None,
                                  use_dot: bool | None = None) -> torch.Tensor:
    """Same contract as reference.paged_decode_attention_torch; num_splits / tile_tokens
    override the heuristics (tests use them to cover several split counts and tile shapes).

    use_dot (default: on CUDA for fp16/bf16 q and cache) computes scores and P@V with
    tl.dot, padding the GQA group to 16 rows for the tensor cores; the broadcast-and-reduce path
    serves any shape and is what the interpreter runs by default. A tile is then at least 16
    tokens, which can lower a requested split count."""
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    s, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    assert q.stride(2) == 1, "q's head_dim must be contiguous"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous whatever q's strides
    max_pages = block_tables.shape[1]
    if s == 0:
        return out
    if max_pages == 0:
        return out.zero_()
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    group = hq // hkv
    head_pad = triton.next_power_of_2(d)
    if use_dot is None:  # fp32 stays on the broadcast path: an ieee fp32 dot spills at D=128
        use_dot = (q.is_cuda and q.dtype == k_cache.dtype and head_pad >= 16
                   and q.dtype in (torch.float16, torch.bfloat16))
    assert not use_dot or q.dtype == k_cache.dtype, "use_dot needs q and the cache in one dtype"
    group_pad, default_tile, num_warps = launch_shape(use_dot, group, d)
    tile = default_tile if tile_tokens is None else tile_tokens
    assert tile & (tile - 1) == 0, f"tile_tokens must be a power of 2, got {tile}"
    capacity = max_pages * block_size  # tokens the block tables can address
    if num_splits is None:
        num_splits = choose_num_splits(s, hkv, max_pages, block_size, q.device)
    # A tile never spans more than a split's share of tokens (TILE stays a power of 2)...
    tile = min(tile, max(MIN_TILE_TOKENS, _floor_pow2(triton.cdiv(capacity, num_splits))))
    if use_dot:  # ...but tl.dot needs a reduction dim of at least 16 tokens.
        tile = max(tile, 16)
    # Split ranges in whole tiles; recompute the count so no split is empty by construction.
    tokens_per_split = triton.cdiv(triton.cdiv(capacity, num_splits), tile) * tile
    num_splits = triton.cdiv(capacity, tokens_per_split)
    if num_splits > 1:
        part_out = torch.empty(s, hq, num_splits, head_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(s, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    _paged_decode_kernel[(s, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E, tokens_per_split, max_pages,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_Q_HEADS=hq, GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=d, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size, TILE=tile, NUM_SPLITS=num_splits,
        USE_DOT=use_dot, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps,
    )
    if num_splits > 1:
        _combine_splits_kernel[(s, hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_Q_HEADS=hq, HEAD_DIM=d, HEAD_PAD=head_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out
