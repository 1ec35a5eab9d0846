"""Grouped-query self-attention with RoPE, in two modes.

Dense (no ForwardContext): x [B, T, hidden] -> causal SDPA, no cache; differentiable. An
optional key mask [B, T] hides padding keys (soft-prompt batches with fewer user tokens).

Paged (a ForwardContext is set, see llm/context.py): x [N, hidden] is the engine's flat stream.
The new K/V go to the pool at ctx.slot_mapping (`write_kv`), then prefill attends over each
sequence's cached prefix + new tokens and decode calls `paged_decode_attention`. The engine
assigns `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) to every
instance. In a prefill step a sequence without a cached prefix attends over its own new K/V
(no read-back from the pool); that also covers the engine's warm-up run before it has a pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.context import ForwardContext, get_context
from llm.kernels.ops import fused_decode_step
from llm.layers.linear import Linear
from llm.layers.quant import QuantLinear
from llm.layers.paged import paged_prefill_attention
from llm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim,
                             bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim,
                             bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Pool views, assigned by the engine; plain attributes so they stay out of state_dict.
        self.k_cache = torch.empty(0, device="cpu")
        self.v_cache = torch.empty(0, device="cpu")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]  # [B, T] dense or [N] paged
        q, k, v = QuantLinear.many(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        ctx = get_context()
        if ctx is not None and not ctx.is_prefill and self.k_cache.numel() > 0:
            out = fused_decode_step(q, k, v, cos, sin, self.k_cache, self.v_cache,
                                    ctx.slot_mapping, ctx.block_tables, ctx.context_lens,
                                    self.scale)
            if out is not None:  # CPU fp32: RoPE + K/V write + attention in one call
                return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        if ctx is None:
            out = self._dense(q, k, v, key_mask)
        else:
            assert x.dim() == 2, "under a ForwardContext the input is the flat [N, hidden] stream"
            out = self._paged(q, k, v, ctx)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))

    def _dense(self, q, k, v, key_mask):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        gqa = self.num_heads != self.num_kv_heads
        if key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=gqa)
        else:
            t = q.shape[2]
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            allowed = causal[None] & key_mask[:, None, :].bool()
            # A padding query may see nothing; give it its own key (its output is never used).
            allowed = allowed | torch.eye(t, dtype=torch.bool, device=q.device)[None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                                 scale=self.scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    def _paged(self, q, k, v, ctx: ForwardContext):
        from llm.kernels.ops import paged_decode_attention, write_kv

        has_pool = self.k_cache.numel() > 0
        if has_pool:
            write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            # Sequences without a cached prefix use their own new K/V (so the warm-up run works
            # before there is a pool); the others read their prefix from the pool.
            return paged_prefill_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                           ctx.context_lens, ctx.cu_seqlens_q, self.scale,
                                           k_new=k, v_new=v, max_seqlen_q=ctx.max_seqlen_q)
        assert has_pool, "decode needs the engine to have assigned k_cache/v_cache"
        assert q.shape[0] == ctx.context_lens.shape[0], "decode: one new token per sequence"
        return paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                      ctx.context_lens, self.scale, ctx.plans)
