"""Triton varlen paged prefill against the PyTorch paths and dense SDPA.

Each case packs several sequences into one step: fresh prompts, later chunks over a cached
prefix, one-token runs (a decode riding along), GQA, a head_dim that is not a power of 2, and
a cross-attention step (not causal) where some sequences have no user tokens. Pools start full
of NaN, so a kernel that reads an unwritten or masked slot fails loudly. On a GPU machine run
with TRITON_INTERPRET=0: the CPU cases skip and the CUDA cases compile the kernel for real.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llm.kernels.ops import paged_prefill_attention_triton
from llm.layers.paged import paged_prefill_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need_triton_on(device: str) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def packed_step(runs, hq, hkv, d, block_size, dtype, device, seed=0):
    """runs: [(context_len, q_len)] per sequence. Dense K/V per sequence written to randomly
    placed blocks of a NaN pool; q for the last q_len positions, packed.

    Returns (q [N, Hq, D], k_cache, v_cache, block_tables, context_lens, cu_seqlens, dense)."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-c // block_size) for c, _ in runs]
    num_blocks = sum(pages) + 2
    order = torch.randperm(num_blocks, generator=g)
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = torch.full((len(runs), max(pages + [0]) + 1), -1, dtype=torch.int32)
    dense, qs, cu, used = [], [], [0], 0
    for s, ((length, q_len), p) in enumerate(zip(runs, pages)):
        blocks = order[used:used + p]
        used += p
        tables[s, :p] = blocks.to(torch.int32)
        k = torch.randn(length, hkv, d, generator=g).to(dtype)
        v = torch.randn(length, hkv, d, generator=g).to(dtype)
        for j in range(length):
            k_cache[blocks[j // block_size], j % block_size] = k[j]
            v_cache[blocks[j // block_size], j % block_size] = v[j]
        dense.append((k, v))
        qs.append(torch.randn(q_len, hq, d, generator=g).to(dtype))
        cu.append(cu[-1] + q_len)
    to = dict(device=device)
    return (torch.cat(qs).to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to),
            torch.tensor([c for c, _ in runs], dtype=torch.int32, device=device),
            torch.tensor(cu, dtype=torch.int32, device=device), dense)


def dense_reference(q, dense, runs, cu, scale, causal):
    """Per sequence, SDPA in float64 over its dense K/V with the causal offset."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    bounds = cu.tolist()
    for s, ((length, q_len), (k, v)) in enumerate(zip(runs, dense)):
        if length == 0 or q_len == 0:
            continue
        qs = q[bounds[s]:bounds[s + 1]].cpu().double().transpose(0, 1)
        ks, vs = (t.double().transpose(0, 1) for t in (k, v))
        mask = None
        if causal:
            prefix = length - q_len
            mask = torch.arange(length)[None, :] <= prefix + torch.arange(q_len)[:, None]
        out[bounds[s]:bounds[s + 1]] = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale,
            enable_gqa=qs.shape[0] != ks.shape[0]).transpose(0, 1)
    return out


CASES = [
    # runs (context_len, q_len), Hq, Hkv, D, block_size
    ([(37, 37), (50, 9), (21, 1), (70, 40)], 4, 2, 16, 16),  # fresh, chunk, decode, chunk
    ([(5, 5), (33, 33), (64, 17)], 3, 1, 24, 8),  # GQA group 3, D not a power of 2
    ([(130, 130)], 2, 2, 32, 16),  # one long fresh prompt: several row blocks
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("runs,hq,hkv,d,block_size", CASES)
def test_prefill_matches_the_torch_path_and_dense_sdpa(device, runs, hq, hkv, d, block_size):
    need_triton_on(device)
    q, kc, vc, tables, lens, cu, dense = packed_step(runs, hq, hkv, d, block_size,
                                                     torch.float32, device)
    scale = d ** -0.5
    ours = paged_prefill_attention_triton(q, kc, vc, tables, lens, cu, scale,
                                          max_seqlen_q=max(n for _, n in runs))
    # No max_seqlen_q: read from cu_seqlens_q.
    again = paged_prefill_attention_triton(q, kc, vc, tables, lens, cu, scale)
    torch_path = paged_prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens.cpu(),
                                         cu.cpu(), scale)
    ref = dense_reference(q, dense, runs, cu, scale, causal=True)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, again)
    assert (ours.cpu().double() - ref).abs().max() < 1e-5
    assert (ours.cpu() - torch_path).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_cross_prefill_sees_every_user_token_and_zeros_without_any(device):
    need_triton_on(device)
    # Cross-attention: context_len = user tokens (0 for a plain request), q_len = prompt tokens.
    runs = [(4, 12), (0, 7), (16, 3)]
    q, kc, vc, tables, lens, cu, dense = packed_step(runs, 4, 2, 16, 16, torch.float32, device)
    ours = paged_prefill_attention_triton(q, kc, vc, tables, lens, cu, 0.25, causal=False)
    ref = dense_reference(q, dense, runs, cu, 0.25, causal=False)
    torch_path = paged_prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens.cpu(),
                                         cu.cpu(), 0.25, causal=False)
    assert (ours.cpu().double() - ref).abs().max() < 1e-5
    assert (ours.cpu() - torch_path).abs().max() < 1e-5
    assert (ours[12:19] == 0).all()  # the request without user tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core path needs CUDA")
def test_prefill_bf16_on_cuda_within_bf16_rounding():
    runs = [(300, 300), (520, 64), (33, 1)]
    q, kc, vc, tables, lens, cu, dense = packed_step(runs, 9, 3, 64, 16, torch.bfloat16, "cuda")
    ours = paged_prefill_attention_triton(q, kc, vc, tables, lens, cu, 0.125)
    ref = dense_reference(q, dense, runs, cu, 0.125, causal=True)
    assert (ours.cpu().double() - ref).abs().max() < 2e-2
