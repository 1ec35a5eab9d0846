"""Gated cross-attention to user tokens (Flamingo's GATED XATTN-DENSE), in front of a decoder
layer:

    x = x + tanh(gate_attn) * CrossAttn(RMSNorm(x), user_tokens)
    x = x + tanh(gate_mlp)  * MLP(RMSNorm(x))            (only where the sequence has users)

Both gates are scalars initialised to 0, so a freshly inserted block is the identity and the
model equals its base model exactly; a sequence without user tokens gets a zero update from both
halves whatever the gates are. User tokens [K, D_user] are RMS-normalised and projected to
keys/values inside the block (no RoPE: user tokens are a set, not a sequence).

Dense mode: x [B, T, hidden], user_tokens [B, K, D_user], user_mask [B, K] (True = real token).
Paged mode (ForwardContext set): the first prefill chunk of a request brings ctx.cross_inputs
[M, D_user]; every block projects them and writes K/V to its own cross pool
(`cross_k_cache` / `cross_v_cache`, assigned by the engine, layout as the self-attention pool
with `cross_heads` heads) at ctx.cross_slot_mapping. Every step then attends from the new tokens
to the sequence's cross blocks (ctx.cross_block_tables, ctx.cross_lens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.context import ForwardContext, get_context
from llm.layers.linear import Linear
from llm.layers.mlp import SwiGLU
from llm.layers.paged import paged_prefill_attention, token_sequence_index
from llm.layers.rmsnorm import RMSNorm


def check_user_width(width: int, user_dim: int | None) -> None:
    if user_dim is None:
        raise ValueError(f"user tokens of width {width} were given, but the model has no "
                         "user-token integration (load it with cross_every_n > 0 or "
                         "integration='soft_prompt' and a user_dim)")
    if width != user_dim:
        raise ValueError(f"user tokens have width {width}, but the model expects "
                         f"user_dim={user_dim}")


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.user_dim is not None and cfg.cross_heads is not None
        self.user_dim = cfg.user_dim
        self.num_heads = cfg.cross_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        inner = cfg.cross_heads * cfg.head_dim
        self.user_norm = RMSNorm(cfg.user_dim, cfg.rms_norm_eps)
        self.q_proj = Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = Linear(cfg.user_dim, inner, bias=False)
        self.v_proj = Linear(cfg.user_dim, inner, bias=False)
        self.o_proj = Linear(inner, cfg.hidden_size, bias=False)
        # Cross pool views, assigned by the engine (plain attributes: not in state_dict).
        self.cross_k_cache = torch.empty(0, device="cpu")
        self.cross_v_cache = torch.empty(0, device="cpu")

    def project_kv(self, user_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., D_user] -> K, V [..., cross_heads, head_dim]."""
        check_user_width(user_tokens.shape[-1], self.user_dim)
        u = self.user_norm(user_tokens.to(self.k_proj.weight.dtype))
        lead = u.shape[:-1]
        k = self.k_proj(u).view(*lead, self.num_heads, self.head_dim)
        v = self.v_proj(u).view(*lead, self.num_heads, self.head_dim)
        return k, v

    def forward_dense(self, x: torch.Tensor, user_tokens: torch.Tensor,
                      user_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.project_kv(user_tokens)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, K, D]
        has_user = user_mask.any(-1)
        # Rows without user tokens would softmax over nothing (NaN); let them see token 0 and
        # zero their output.
        mask = user_mask.clone()
        mask[:, 0] |= ~has_user
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out) * has_user[:, None, None].to(x.dtype)

    def forward_paged(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        from llm.kernels.ops import paged_decode_attention

        q = self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        if ctx.is_prefill:
            out = paged_prefill_attention(q, self.cross_k_cache, self.cross_v_cache,
                                          ctx.cross_block_tables, ctx.cross_lens,
                                          ctx.cu_seqlens_q, self.scale, causal=False,
                                          max_seqlen_q=ctx.max_seqlen_q)
        else:
            out = paged_decode_attention(q, self.cross_k_cache, self.cross_v_cache,
                                         ctx.cross_block_tables, ctx.cross_lens, self.scale,
                                         ctx.plans)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))

    def write_user_kv(self, ctx: ForwardContext) -> None:
        from llm.kernels.ops import write_kv

        assert self.cross_k_cache.numel() > 0, "the engine must assign cross_k/v_cache first"
        assert ctx.cross_slot_mapping is not None, "cross_inputs without cross_slot_mapping"
        k, v = self.project_kv(ctx.cross_inputs)
        write_kv(k, v, self.cross_k_cache, self.cross_v_cache, ctx.cross_slot_mapping)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.cross_intermediate_size)
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.gate_mlp = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, user_tokens: torch.Tensor | None = None,
                user_mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = get_context()
        if ctx is None:
            if user_tokens is None:
                return x  # no users in the batch: the base model
            assert user_mask is not None
            attn = self.cross_attn.forward_dense(self.attn_norm(x), user_tokens, user_mask)
            has_user = user_mask.any(-1)[:, None, None]  # [B, 1, 1]
        else:
            if ctx.cross_inputs is not None and ctx.cross_inputs.shape[0] > 0:
                self.cross_attn.write_user_kv(ctx)
            if ctx.cross_lens is None:
                return x
            # Skip a batch without users, but only where checking is free: on CUDA the check
            # would sync and break CUDA-graph capture of decode, and zero-length rows cost
            # little there (the kernel returns zeros; the MLP update is masked below).
            if not ctx.cross_lens.is_cuda and not bool((ctx.cross_lens > 0).any()):
                return x
            attn = self.cross_attn.forward_paged(self.attn_norm(x), ctx)
            seq = (token_sequence_index(ctx.cu_seqlens_q)[0] if ctx.is_prefill
                   else torch.arange(x.shape[0], device=x.device))
            has_user = (ctx.cross_lens.to(x.device)[seq] > 0)[:, None]  # [N, 1]
        x = x + torch.tanh(self.gate_attn).to(x.dtype) * attn
        mlp = self.mlp(self.mlp_norm(x)) * has_user.to(x.dtype)
        return x + torch.tanh(self.gate_mlp).to(x.dtype) * mlp
