"""Public kernel entry points: the layers and the engine call these, never a backend directly.

Dispatch (per call, from the tensors and the environment):
- USERLLM_KERNELS=torch   -> the PyTorch reference (llm.kernels.reference), anywhere;
- USERLLM_KERNELS=triton  -> the Triton kernels, also on CPU tensors (tests run them under
                             TRITON_INTERPRET=1);
- unset / "auto"          -> Triton when the tensors are on CUDA, the reference otherwise,
                             except fp32 decode attention on CPU: the C++ kernel
                             (cpu_attention.cpp, built with llm.kernels.cpu_quant) when it built.

Both backends are also exported by name (`*_triton`, `*_torch`) so tests and benchmarks can
compare them. Cache layout everywhere: [num_blocks, block_size, num_kv_heads, head_dim].

Cross-attention decode (query token -> the request's user-token K/V in the cross pool) is the
same computation without a causal mask, so the engine calls `paged_decode_attention` with the
cross block tables and cross lens; `cross_decode_attention` is that call under its own name.
A cross length of 0 (a request without user tokens) returns zeros on both backends.

CUDA graphs: the Triton path makes no host-device sync (its split count comes from the
block-table width, not from context_lens), so a decode step can be captured with fixed-width
tables. The reference path reads max(context_lens) with .item() and cannot be captured.
"""
from __future__ import annotations

import os

import torch

from llm.kernels.cpu_quant import kernel
from llm.kernels.reference import gather_kv, paged_decode_attention_torch, write_kv_torch

__all__ = [
    "write_kv", "write_kv_torch", "write_kv_triton",
    "paged_decode_attention", "paged_decode_attention_torch", "paged_decode_attention_triton",
    "cross_decode_attention", "gather_kv", "backend_for", "paged_prefill_attention_triton",
]

_BACKENDS = ("auto", "torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose tensors live where `t` does."""
    choice = os.environ.get("USERLLM_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"USERLLM_KERNELS must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if t.is_cuda else "torch"
    return choice


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    # Imported on first use: CPU-only installs without triton still get the reference path.
    from llm.kernels.kv_write import write_kv_triton as impl
    impl(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale,
                                  num_splits: int | None = None,
                                  tile_tokens: int | None = None,
                                  use_dot: bool | None = None) -> torch.Tensor:
    """num_splits / tile_tokens / use_dot override the kernel's shape-derived choices."""
    from llm.kernels.paged_decode import paged_decode_attention_triton as impl
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits,
                tile_tokens=tile_tokens, use_dot=use_dot)


def paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                   cu_seqlens_q, scale, causal: bool = True,
                                   max_seqlen_q: int = 0) -> torch.Tensor:
    """Varlen paged prefill in one launch (llm.layers.paged.paged_prefill_attention's
    contract, every key already in the pool)."""
    from llm.kernels.paged_prefill import paged_prefill_attention_triton as impl
    return impl(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                causal=causal, max_seqlen_q=max_seqlen_q)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """In place: k_cache/v_cache slot slot_mapping[i] <- k[i], v[i] ([N, Hkv, D]); -1 skips."""
    if backend_for(k_cache) == "triton":
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, plans: dict | None = None) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) over its first context_lens[s] cached tokens.

    block_tables [S, max_blocks] int32 (-1 padded), context_lens [S] int32. GQA when Hq is a
    multiple of Hkv. Returns [S, Hq, D] in q's dtype; context_len 0 -> zeros. plans: a dict
    kept for one forward step, in which the reference path builds its gather plan once for
    all layers (the Triton path needs none).
    """
    if backend_for(q) == "triton":
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                             scale)
    cpu = cpu_decode_kernel(q, k_cache, block_tables, context_lens)
    if cpu is not None:
        return cpu.paged_decode(q.contiguous(), k_cache, v_cache, block_tables.contiguous(),
                                context_lens.contiguous(),
                                scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale,
                                        plans)


def fused_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """A self-attention decode step after the projections in one C++ call on CPU (RoPE, K/V
    write, paged attention: cpu_attention.cpp), bit-identical RoPE and writes to the PyTorch
    path. None when it does not apply (see cpu_decode_kernel; also under autograd): the
    caller then runs the ops one by one."""
    if q.requires_grad or k.requires_grad or slot_mapping.dtype != torch.int64:
        return None
    if k.dtype != torch.float32 or cos.dtype != torch.float32:
        return None
    mod = cpu_decode_kernel(q, k_cache, block_tables, context_lens)
    if mod is None:
        return None
    return mod.decode_step(q.contiguous(), k.contiguous(), v.contiguous(), cos.contiguous(),
                           sin.contiguous(), k_cache, v_cache, slot_mapping.contiguous(),
                           block_tables.contiguous(), context_lens.contiguous(), scale)


def cpu_decode_kernel(q, k_cache, block_tables, context_lens):
    """The compiled CPU module when it applies: auto dispatch (USERLLM_KERNELS=torch means the
    reference), CPU, fp32 query and pool, int32 tables; else None."""
    if os.environ.get("USERLLM_KERNELS", "auto").strip().lower() not in ("auto", ""):
        return None
    if q.is_cuda or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        return None
    return kernel()


def cross_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cross_block_tables: torch.Tensor, cross_lens: torch.Tensor,
                           scale: float, plans: dict | None = None) -> torch.Tensor:
    """Decode-time cross-attention to user tokens held in the cross pool (no causal mask:
    every user token is visible). Exactly paged_decode_attention over the cross blocks."""
    return paged_decode_attention(q, k_cache, v_cache, cross_block_tables, cross_lens, scale,
                                  plans)
