"""The paged K/V pools and their binding to the model's attention modules.

Self-attention: one tensor [2, L, num_blocks, block_size, Hkv, D]; layer i reads the contiguous
slices [0, i] (K) and [1, i] (V), each [num_blocks, block_size, Hkv, D], the layout the kernels
take. Cross-attention (user tokens): its own, smaller pool of the same shape per cross block.
Sizing: a byte budget for the self pool (the cross pool is sized for max_num_seqs requests of
max_user_tokens each, so admission rarely waits on it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(slots=True)
class PoolShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for_bytes(self, budget: int) -> int:
        return budget // self.bytes_per_block if self.num_layers else 0


def attention_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The model's self-attention modules (they have `k_cache`) and cross-attention modules
    (they have `cross_k_cache`), in forward order (the model's own lists when it has them)."""
    if hasattr(model, "attention_modules") and hasattr(model, "cross_attention_modules"):
        return list(model.attention_modules()), list(model.cross_attention_modules())
    self_attn = [m for m in model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]
    cross_attn = [m for m in model.modules()
                  if hasattr(m, "cross_k_cache") and hasattr(m, "cross_v_cache")]
    return self_attn, cross_attn


class KVCache:
    def __init__(self, self_shape: PoolShape, num_blocks: int, cross_shape: PoolShape | None,
                 num_cross_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV budget holds no block of {self_shape.bytes_per_block} "
                             f"bytes; raise kv_cache_bytes")
        self.self_shape, self.num_blocks = self_shape, num_blocks
        s = self_shape
        # zeros, not empty: a stale NaN in an unwritten slot must never reach a masked softmax.
        self.kv = torch.zeros(2, s.num_layers, num_blocks, s.block_size, s.num_kv_heads,
                              s.head_dim, dtype=s.dtype, device=device)
        self.cross_shape, self.num_cross_blocks = cross_shape, num_cross_blocks
        self.cross_kv = None
        if cross_shape is not None and cross_shape.num_layers:
            c = cross_shape
            self.cross_kv = torch.zeros(2, c.num_layers, num_cross_blocks, c.block_size,
                                        c.num_kv_heads, c.head_dim, dtype=c.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.cross_kv.nbytes if self.cross_kv is not None else 0)

    def bind(self, model: nn.Module) -> None:
        self_attn, cross_attn = attention_modules(model)
        assert len(self_attn) == self.self_shape.num_layers, \
            f"{len(self_attn)} attention modules, pool has {self.self_shape.num_layers} layers"
        for i, m in enumerate(self_attn):
            m.k_cache, m.v_cache = self.kv[0, i], self.kv[1, i]
        if cross_attn:
            assert self.cross_kv is not None and len(cross_attn) == self.cross_kv.shape[1]
            for i, m in enumerate(cross_attn):
                m.cross_k_cache, m.cross_v_cache = self.cross_kv[0, i], self.cross_kv[1, i]

    @staticmethod
    def unbind(model: nn.Module) -> None:
        self_attn, cross_attn = attention_modules(model)
        for m in self_attn:
            m.k_cache, m.v_cache = torch.empty(0), torch.empty(0)
        for m in cross_attn:
            m.cross_k_cache, m.cross_v_cache = torch.empty(0), torch.empty(0)
