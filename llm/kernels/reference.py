"""Pure-PyTorch paged-attention ops: the CPU path and the oracle the Triton kernels are tested
against.

Cache layout (shared by every op here and by the Triton kernels):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is block * block_size + offset; a sequence's block table lists its blocks in
order, padded with -1. Everything is vectorised over sequences (no Python loop per sequence):
the CPU engine runs decode through this path, so it must not be a toy.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write token i's K/V [Hkv, D] to slot slot_mapping[i]; slot -1 (padding) is skipped."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    if bool((slots < 0).any()):  # padding present: drop those tokens (the common case has none)
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    num_blocks, block_size, hkv, d = k_cache.shape
    # view(), not reshape(): the write must land in the caller's storage. index_copy_ is about
    # twice as fast as an advanced-index assignment on CPU.
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, max_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous copies of each sequence's first context_lens[s] cached tokens.

    Returns K, V [S, L, Hkv, D] (L = max_len or max(context_lens)) in the cache's dtype and a
    bool mask [S, L] that is True for real tokens; padded positions are zeros. -1 block-table
    entries past a sequence's length are read as block 0 and zeroed, never used.
    """
    if max_len is None:
        max_len = int(context_lens.max().item()) if block_tables.shape[0] > 0 else 0
    k, v, valid = _gather_pages(k_cache, v_cache, block_tables, context_lens, max_len)
    return k[:, :max_len], v[:, :max_len], valid[:, :max_len]


class _PagePlan:
    """Which pool blocks to copy and which copied token rows are padding, for one
    (block_tables, context_lens, max_len). Every layer of a step reads the same tables, so the
    plan is built once per step (see _page_plan) instead of once per layer."""
    __slots__ = ("index", "pad_rows", "valid", "num_seqs", "span")

    def __init__(self, block_tables, context_lens, max_len, block_size, device) -> None:
        s = block_tables.shape[0]
        pages = (max_len + block_size - 1) // block_size
        assert pages <= block_tables.shape[1], "block table narrower than context length"
        self.num_seqs, self.span = s, pages * block_size
        self.valid = (torch.arange(self.span, device=device)[None, :]
                      < context_lens.long()[:, None])
        blocks = block_tables[:, :pages].long()
        page_used = self.valid[:, ::block_size]  # [S, pages]: the page's first token is real
        assert bool((blocks[page_used] >= 0).all()), "a -1 block-table entry inside context_lens"
        # -1 entries past a sequence's length are read as block 0 and zeroed, never used.
        self.index = blocks.clamp(min=0).flatten()
        self.pad_rows = (~self.valid).flatten().nonzero().squeeze(1)


def _page_plan(block_tables, context_lens, max_len, block_size, plans: dict | None
               ) -> _PagePlan:
    """plans: a dict the caller keeps for one forward step (the engine's ForwardContext), in
    which the plan for these tables is built once and found by every later layer."""
    if plans is None:
        return _PagePlan(block_tables, context_lens, max_len, block_size, block_tables.device)
    key = (id(block_tables), id(context_lens), max_len, block_size)
    entry = plans.get(key)
    if entry is None:
        # The entry holds the tensors, so their ids cannot be reused while the dict lives.
        entry = plans[key] = (block_tables, context_lens,
                              _PagePlan(block_tables, context_lens, max_len, block_size,
                                        block_tables.device))
    return entry[2]


def _gather_pages(k_cache, v_cache, block_tables, context_lens, max_len, workspace=False,
                  plans: dict | None = None):
    """K, V [S, pages * block_size, Hkv, D] (whole pages, padding zeroed) and the valid mask.
    workspace=True reuses this thread's scratch buffers: the caller must be done with the
    result before the next call (decode consumes it at once)."""
    num_blocks, block_size, hkv, d = k_cache.shape
    plan = _page_plan(block_tables, context_lens, max_len, block_size, plans)
    s, span, index = plan.num_seqs, plan.span, plan.index
    # Whole blocks at a time (one block_size * Hkv * D copy each) into a contiguous buffer.
    if workspace:
        k_buf, v_buf = _scratch(2 * index.numel() * block_size * hkv * d, k_cache)
        k = torch.index_select(k_cache, 0, index, out=k_buf.view(-1, block_size, hkv, d))
        v = torch.index_select(v_cache, 0, index, out=v_buf.view(-1, block_size, hkv, d))
    else:
        k, v = k_cache.index_select(0, index), v_cache.index_select(0, index)
    # A pool made with torch.empty can hold NaN/inf in slots nobody wrote; padded positions
    # read such slots, and 0 * NaN is NaN, so they are zeroed rather than only masked
    # (index_fill_ over whole token rows: about half the time of a broadcast masked_fill_).
    k.view(s * span, hkv * d).index_fill_(0, plan.pad_rows, 0)
    v.view(s * span, hkv * d).index_fill_(0, plan.pad_rows, 0)
    return k.view(s, span, hkv, d), v.view(s, span, hkv, d), plan.valid


_scratch_local = threading.local()


def _scratch(numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat buffers of numel // 2 elements each, kept per thread, device and dtype. Why: on
    CPU a fresh multi-MB tensor per layer per step is an mmap + page faults, which cost more
    than the attention itself (measured ~4x on the decode path at 16 x 512 tokens)."""
    buffers = _scratch_local.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first made under torch.inference_mode (the engine): an
        # inference tensor could not be written by a later call outside it (tests, training).
        with torch.inference_mode(False):
            buf = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    half = numel // 2
    return buf[:half], buf[half:numel]


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float, plans: dict | None = None) -> torch.Tensor:
    """One query token per sequence attending to its first context_lens[s] cached tokens.

    q: [S, Hq, D] with Hq a multiple of Hkv (GQA: q head h reads kv head h // (Hq // Hkv)).
    Returns [S, Hq, D] in q's dtype; a sequence with context_len 0 gets zeros (not NaN).
    Math runs in fp32 whatever the input dtype. plans: see _page_plan (one step's layers share
    the gather plan).
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    max_len = int(context_lens.max().item()) if s > 0 else 0
    if max_len == 0:
        return torch.zeros_like(q)
    k, v, valid = _gather_pages(k_cache, v_cache, block_tables, context_lens, max_len,
                                workspace=True, plans=plans)
    # GQA without repeating K/V: the group's q heads are SDPA's "query length" dimension.
    out = F.scaled_dot_product_attention(
        q.float().view(s, hkv, group, d),
        k.float().transpose(1, 2), v.float().transpose(1, 2),  # [S, Hkv, L, D]
        attn_mask=valid[:, None, None, :], scale=scale)
    # Rows with no key at all come out NaN (or 0, by backend); they are defined as zeros.
    out = out.masked_fill((context_lens == 0).view(s, 1, 1, 1), 0.0)
    return out.reshape(s, hq, d).to(q.dtype)


def _check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    assert k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} / v {tuple(v.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k_cache / v_cache shapes"
    assert k.shape[1:] == k_cache.shape[2:], \
        f"token [Hkv, D] {tuple(k.shape[1:])} vs cache {tuple(k_cache.shape[2:])}"
    assert slot_mapping.shape == (k.shape[0],), "slot_mapping must be [N]"
    assert not slot_mapping.is_floating_point(), "slot_mapping must be an integer tensor"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"


def _check_decode(q, k_cache, v_cache, block_tables, context_lens) -> None:
    assert q.dim() == 3, f"q must be [S, Hq, D], got {tuple(q.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k_cache / v_cache shapes"
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    assert k_cache.shape[3] == d, f"head_dim: q {d} vs cache {k_cache.shape[3]}"
    assert hq % hkv == 0, f"q heads {hq} not a multiple of kv heads {hkv}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == s, "block_tables must be [S, B]"
    assert context_lens.shape == (s,), "context_lens must be [S]"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
