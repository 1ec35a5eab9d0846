"""Pure-PyTorch paged-attention ops: the CPU path and the oracle the Triton kernels are tested
against.

Cache layout (shared by every op here and by the Triton kernels):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is block * block_size + offset; a sequence's block table lists its blocks in
order, padded with -1. Everything is vectorised over sequences (no Python loop per sequence):
the CPU engine runs decode through this path, so it must not be a toy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write token i's K/V [Hkv, D] to slot slot_mapping[i]; slot -1 (padding) is skipped."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size, hkv, d = k_cache.shape
    # view(), not reshape(): the write must land in the caller's storage.
    k_cache.view(num_blocks * block_size, hkv, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, hkv, d)[slots] = v[keep].to(v_cache.dtype)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, max_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous copies of each sequence's first context_lens[s] cached tokens.

    Returns K, V [S, L, Hkv, D] (L = max_len or max(context_lens)) in the cache's dtype and a
    bool mask [S, L] that is True for real tokens; padded positions are zeros. -1 block-table
    entries past a sequence's length are read as block 0 and zeroed, never used.
    """
    num_blocks, block_size, hkv, d = k_cache.shape
    s = block_tables.shape[0]
    if max_len is None:
        max_len = int(context_lens.max().item()) if s > 0 else 0
    pages = (max_len + block_size - 1) // block_size
    assert pages <= block_tables.shape[1], "block table narrower than context length"
    valid = torch.arange(max_len, device=k_cache.device)[None, :] < context_lens.long()[:, None]
    blocks = block_tables[:, :pages].long()
    page_used = valid[:, ::block_size]  # [S, pages]: the page's first token is real
    assert bool((blocks[page_used] >= 0).all()), "a -1 block-table entry inside context_lens"
    # Whole blocks at a time (one block_size * Hkv * D copy each) into a contiguous buffer.
    index = blocks.clamp(min=0).flatten()
    k = k_cache.index_select(0, index).view(s, pages * block_size, hkv, d)
    v = v_cache.index_select(0, index).view(s, pages * block_size, hkv, d)
    # A pool made with torch.empty can hold NaN/inf in slots nobody wrote; padded positions
    # read such slots, and 0 * NaN is NaN, so they are zeroed rather than only masked.
    pad = (torch.arange(pages * block_size, device=k.device)[None, :]
           >= context_lens.long()[:, None])[:, :, None, None]
    k.masked_fill_(pad, 0)
    v.masked_fill_(pad, 0)
    return k[:, :max_len], v[:, :max_len], valid


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """One query token per sequence attending to its first context_lens[s] cached tokens.

    q: [S, Hq, D] with Hq a multiple of Hkv (GQA: q head h reads kv head h // (Hq // Hkv)).
    Returns [S, Hq, D] in q's dtype; a sequence with context_len 0 gets zeros (not NaN).
    Math runs in fp32 whatever the input dtype.
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    k, v, valid = gather_kv(k_cache, v_cache, block_tables, context_lens)
    if k.shape[1] == 0:
        return torch.zeros_like(q)
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
