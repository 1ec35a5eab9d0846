"""Triton dequant-GEMM for QuantLinear on CUDA: out [M, N] = x [M, K] @ W^T, W read as int4 or
int8 codes in QuantLinear's own layouts (llm/layers/quant.py), so one set of buffers serves
the CPU ops and this kernel:

- int4: uint8 [N, K/2], per 32 inputs 16 bytes: input j in the low nibble of byte j, input
  j + 16 in its high nibble (llama.cpp's block order); w = scale * q + offset;
- int8: int8 [N, K] row-major; w = scale * q;
scales / offsets fp32 per group; rows interleaved in groups of 4 (codes
[N/4, K/32, 4, block bytes], scales [N/4, K/group, 4]; llm/layers/quant.py).

One program computes a [BLOCK_M, BLOCK_N] tile, walking K one group at a time (BLOCK_K = the
group size, so each step needs one scale per column). Decode (M = 1-16) is a GEMV: the
weights are read once per N tile, 4 or 8 bits each. Accumulates in fp32; returns x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_mm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, out_ptr, M, N, K,
                     stride_xm, stride_om,
                     BITS: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        k = g * GROUP + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None],
                    other=0.0).to(tl.float32)  # [BM, GROUP]
        # Row n sits in row group n // 4 at lane n % 4.
        rg, lane = rn // 4, rn % 4
        sidx = rg * (K // GROUP) * 4 + g * 4 + lane
        scale = tl.load(s_ptr + sidx, mask=n_ok, other=0.0).to(tl.float32)
        kb = k % 32
        if BITS == 4:
            byte = (rg[None, :] * (K // 32) + k[:, None] // 32) * 64 + lane[None, :] * 16 \
                + kb[:, None] % 16
            packed = tl.load(q_ptr + byte, mask=n_ok[None, :], other=0).to(tl.int32)
            q = (packed >> ((kb[:, None] // 16) * 4)) & 0xF  # [GROUP, BN]
            off = tl.load(o_ptr + sidx, mask=n_ok, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * scale[None, :] + off[None, :]
        else:
            idx = (rg[None, :] * (K // 32) + k[:, None] // 32) * 128 + lane[None, :] * 32 \
                + kb[:, None]
            codes = tl.load(q_ptr + idx, mask=n_ok[None, :], other=0)
            w = codes.to(tl.float32) * scale[None, :]
        acc += tl.dot(x, w)  # [BM, GROUP] @ [GROUP, BN]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        offsets: torch.Tensor | None, bits: int,
                        group_size: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype (offsets: int4 only)."""
    assert x.dim() == 2 and bits in (4, 8) and (offsets is None) == (bits == 8)
    m, k = x.shape
    n = scales.shape[0] * 4
    assert k % group_size == 0 and group_size % 32 == 0, (k, group_size)
    x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    # tl.dot needs every tile dimension >= 16.
    block_m = 16 if m <= 16 else 32
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_mm_kernel[grid](x, qweight, scales, scales if offsets is None else offsets, out,
                           m, n, k, x.stride(0), out.stride(0),
                           BITS=bits, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
