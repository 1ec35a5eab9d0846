"""Triton dequant-GEMM for QuantLinear on CUDA: out [M, N] = x [M, K] @ W^T, W read as int4 or
int8 codes in QuantLinear's own layouts (llm/layers/quant.py), so one set of buffers serves
the CPU ops and this kernel:

- int4: torch's CPU int4pack layout, uint8 [N, K/2]: in each block of 32 rows, byte
  k*16 + j holds row j (low nibble) and row j + 16 (high nibble) of column k;
  scales [K/group, N, 2] = (scale, zero), w = scale * (q - 8) + zero.
- int8: int8 [K/group, N, group] (one group's codes contiguous), scales [K/group, N],
  w = scale * q.

One program computes a [BLOCK_M, BLOCK_N] tile, walking K one group at a time (BLOCK_K = the
group size, so each step needs one scale per column). Decode (M = 1-16) is a GEMV: the
weights are read once per N tile, 4 or 8 bits each. Accumulates in fp32; returns x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_mm_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K,
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
        if BITS == 4:
            # byte (n // 32) * 16K + k * 16 + n % 16, nibble (n % 32) // 16
            byte = (rn[None, :] // 32) * (16 * K) + k[:, None] * 16 + rn[None, :] % 16
            packed = tl.load(q_ptr + byte, mask=n_ok[None, :], other=0).to(tl.int32)
            q = (packed >> (((rn[None, :] % 32) // 16) * 4)) & 0xF  # [GROUP, BN]
            scale = tl.load(s_ptr + (g * N + rn) * 2, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(s_ptr + (g * N + rn) * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - 8.0) * scale[None, :] + zero[None, :]
        else:
            codes = tl.load(q_ptr + g * N * GROUP + rn[None, :] * GROUP + rk[:, None],
                            mask=n_ok[None, :], other=0)
            scale = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            w = codes.to(tl.float32) * scale[None, :]
        acc += tl.dot(x, w)  # [BM, GROUP] @ [GROUP, BN]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bits: int, group_size: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype."""
    assert x.dim() == 2 and bits in (4, 8)
    m, k = x.shape
    n = scales.shape[1]
    assert k % group_size == 0 and (bits == 8 or n % 32 == 0), (k, n, group_size)
    x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    # tl.dot needs every tile dimension >= 16.
    block_m = 16 if m <= 16 else 32
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_mm_kernel[grid](x, qweight, scales, out, m, n, k, x.stride(0), out.stride(0),
                           BITS=bits, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
