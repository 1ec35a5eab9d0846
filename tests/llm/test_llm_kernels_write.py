"""KV-cache write: Triton kernel vs the PyTorch reference vs a hand-computed expectation.
On a GPU machine run with TRITON_INTERPRET=0 to compile the kernel for real (CPU cases skip)."""
from __future__ import annotations

import os

import pytest
import torch

from llm.kernels.ops import write_kv, write_kv_torch, write_kv_triton

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WRITERS = {"torch": write_kv_torch, "triton": write_kv_triton}


def need_triton_on(device: str) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def expected_after_write(k_cache, k, slots):
    """The pool after writing k[i] to slots[i], by a plain Python loop (skipping -1)."""
    want = k_cache.clone()
    flat = want.view(-1, *want.shape[2:])
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            flat[slot] = k[i].to(want.dtype)
    return want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_puts_tokens_in_their_slots_and_skips_padding(device, backend, dtype):
    if backend == "triton":
        need_triton_on(device)
    num_blocks, bs, hkv, d = 6, 4, 2, 16
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, device=device).to(dtype)
    # scattered slots across blocks, partial blocks, and -1 padding in the middle and the end
    slots = torch.tensor([9, 10, -1, 0, 23, 4, -1, 17, -1], device=device)
    k = torch.randn(len(slots), hkv, d, device=device).to(dtype)
    v = torch.randn(len(slots), hkv, d, device=device).to(dtype)
    want_k, want_v = expected_after_write(k_cache, k, slots), expected_after_write(v_cache, v, slots)
    WRITERS[backend](k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)

    # no padding at all (the common decode step), int32 slots
    dense_slots = torch.tensor([3, 22, 11], device=device, dtype=torch.int32)
    want_k = expected_after_write(k_cache, k[:3], dense_slots)
    want_v = expected_after_write(v_cache, v[:3], dense_slots)
    WRITERS[backend](k[:3], v[:3], k_cache, v_cache, dense_slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_write_from_fused_projection_views_and_casts(device):
    """K/V as strided views of one fused [N, 2 * Hkv * D] projection, fp32 into an fp16 pool;
    an all-padding batch and an empty batch leave the pool untouched."""
    need_triton_on(device)
    num_blocks, bs, hkv, d, n = 4, 8, 2, 32, 5
    kv = torch.randn(n, 2 * hkv * d, device=device)
    k, v = kv[:, : hkv * d].view(n, hkv, d), kv[:, hkv * d:].view(n, hkv, d)
    assert not k.is_contiguous()
    k_cache = torch.zeros(num_blocks, bs, hkv, d, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([31, 8, -1, 2, 15], device=device)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_torch(k, v, ref_k, ref_v, slots)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert k_cache.view(-1, hkv, d)[31].float().sub(k[0]).abs().max() < 1e-3

    before = k_cache.clone()
    write_kv_triton(k, v, k_cache, v_cache, torch.full((n,), -1, device=device))
    write_kv_triton(k[:0], v[:0], k_cache, v_cache, slots[:0])
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_dispatch_and_shape_errors(device, monkeypatch):
    if device == "cpu":
        monkeypatch.setenv("USERLLM_KERNELS", "torch")
    k_cache = torch.zeros(2, 4, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 2, 16, device=device)
    write_kv(k, 2 * k, k_cache, v_cache, torch.tensor([1, -1, 6], device=device))
    assert k_cache.view(-1, 2, 16)[[1, 6]].eq(1).all() and v_cache.view(-1, 2, 16)[[1, 6]].eq(2).all()
    assert k_cache.view(-1, 2, 16).abs().sum(dim=(1, 2)).count_nonzero() == 2
    with pytest.raises(AssertionError, match="Hkv, D"):
        write_kv(torch.ones(3, 1, 16, device=device), torch.ones(3, 1, 16, device=device),
                 k_cache, v_cache, torch.tensor([0, 1, 2], device=device))
