"""Transformer pieces: RMSNorm, rotary positions, a pre-norm causal block, cross-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """Rotations [B, 1, T, head_dim/2, 2] (cos, sin) for integer positions [B, T]. Real pairs,
    not complex numbers: torch.compile's inductor cannot fuse complex ops."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (2i, 2i+1) of x [B, H, T, head_dim] by the angles in `rot`."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b, cos, sin = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: query t sees real keys <= t. A padding query sees only itself, which
    keeps its softmax finite; its output is never used."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, :]
    return (mask | torch.eye(t, dtype=torch.bool, device=valid.device))[:, None]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool) -> None:
        super().__init__()
        self.n_heads, self.rope, self.dropout = n_heads, rope, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """[B, T, d] -> [B, T, d], or [B, 1, d] for the last query only (inference of one state)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            k = apply_rope(k, rope)
            q = apply_rope(q[:, :, -1:], rope[:, :, -1:]) if last_only else apply_rope(q, rope)
        elif last_only:
            q = q[:, :, -1:]
        if last_only and mask is not None:
            mask = mask[:, :, -1:]
        # No padding (mask None): the fused causal kernel; the last query alone sees every key.
        causal = mask is None and not last_only
        # No dropout on attention probabilities: it forces the slow unfused path on CPU, and the
        # residual dropout after the block regularizes enough.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, q.shape[2], d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, 2 * mult * d_model, bias=False)  # SwiGLU: gate and value
        self.down = nn.Linear(mult * d_model, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * value))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, mult: int, dropout: float, rope: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, rope)
        self.ffn = FeedForward(d_model, mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        attn = self.drop(self.attn(self.norm1(x), mask, rope, last_only))
        x = (x[:, -1:] if last_only else x) + attn
        return x + self.ffn(self.norm2(x))


def time_buckets(times: torch.Tensor, buckets: int) -> torch.Tensor:
    """[B, T, T] bucket of |t_q - t_k| in seconds: floor(log2(1 + dt)), capped at buckets - 1
    (the same second 0, a minute 5, a day 16, a year 24)."""
    dt = (times[:, :, None] - times[:, None, :]).abs().double()
    return torch.log2(1.0 + dt).floor().long().clamp(max=buckets - 1)


class BucketBias(torch.autograd.Function):
    """weight[buckets] ([..., H] from weight [K, H]) whose backward sums the gradient per bucket
    with bincount: embedding's backward sorts all B x T x T indices, which made a training step
    3x slower; K is tiny, so one counting pass per head is enough."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buckets)
        ctx.num_buckets = weight.shape[0]
        return weight[buckets]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (buckets,) = ctx.saved_tensors
        flat = buckets.reshape(-1)
        per_head = [torch.bincount(flat, weights=grad[..., h].reshape(-1).double(), minlength=ctx.num_buckets)
                    for h in range(grad.shape[-1])]
        return torch.stack(per_head, 1).to(grad.dtype), None


class CausalTransformer(nn.Module):
    def __init__(self, d_model: int, n_layers: int, n_heads: int, mult: int, dropout: float, rope: bool,
                 time_bias_buckets: int = 0) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.rope = rope
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mult, dropout, rope) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        # HSTU-style relative time: each layer's own per-head bias for each time-gap bucket.
        self.time_bias = (nn.ModuleList(nn.Embedding(time_bias_buckets, n_heads) for _ in range(n_layers))
                          if time_bias_buckets else None)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, last_only: bool = False,
                times: torch.Tensor | None = None) -> torch.Tensor:
        """States [B, T, d]; with last_only, just the last position's [B, 1, d]: the final block
        then computes one query, which is all a user embedding needs. `times` [B, T] (unix
        seconds) are required with a time bias."""
        rope = rope_tables(positions, self.head_dim) if self.rope else None
        mask = None if bool(valid.all()) else causal_mask(valid)
        if self.time_bias is not None:
            assert times is not None and times.shape == valid.shape, "a time bias needs the events' times"
            allowed = mask if mask is not None else causal_mask(valid)
            buckets = time_buckets(times, self.time_bias[0].num_embeddings)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            if self.time_bias is not None:
                rows = slice(-1, None) if last else slice(None)  # last_only: the last query's row only
                bias = BucketBias.apply(self.time_bias[i].weight, buckets[:, rows]).permute(0, 3, 1, 2)
                mask = bias.masked_fill(~allowed[:, :, rows], float("-inf")).to(x.dtype)  # [B, H, T(q), T]
            x = block(x, mask, rope, last)
        return self.norm(x)


class CrossAttention(nn.Module):
    """Queries from one sequence (latents), keys/values from another, with a key mask."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        b, k, d = queries.shape
        t = keys.shape[1]
        h = self.n_heads
        q = self.q(queries).view(b, k, h, d // h).transpose(1, 2)
        kk, vv = self.kv(keys).view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=key_valid[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, k, d))
