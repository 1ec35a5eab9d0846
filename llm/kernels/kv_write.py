"""Triton KV-cache write: one program per new token copies its K and V rows ([Hkv * D]
contiguous values each) into the token's slot of the paged pool. Slot -1 marks a padding token
(e.g. a CUDA-graph batch padded to a fixed size) and is skipped, so the pool is never touched
for it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.kernels.reference import _check_write


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_k_tok, stride_v_tok,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        # A cache slot is one contiguous row of ROW = Hkv * D values (the pool is contiguous).
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + tok * stride_k_tok + offs, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + offs, mask=mask)
        dst = slot * ROW + offs
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same contract as reference.write_kv_torch."""
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    n, hkv, d = k.shape
    if n == 0:
        return
    # Each token's [Hkv, D] must be one contiguous row; a strided token dim is fine (views of a
    # fused qkv projection), anything else is copied once here.
    if k.stride(1) != d or k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(1) != d or v.stride(2) != 1:
        v = v.contiguous()
    row = hkv * d
    _write_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping.contiguous(),
                           k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row))
