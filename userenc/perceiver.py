"""Perceiver resampler: K learned latent queries read a variable-length history of states and
return K user tokens, so the LLM's cost does not grow with history length."""
from __future__ import annotations

import torch
from torch import nn

from userenc.layers import CrossAttention, FeedForward, RMSNorm


class ResamplerLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = RMSNorm(d_model), RMSNorm(d_model), RMSNorm(d_model)
        self.attn = CrossAttention(d_model, n_heads)
        self.ffn = FeedForward(d_model, mult, dropout)

    def forward(self, latents: torch.Tensor, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(self.norm_q(latents), self.norm_kv(states), valid)
        return latents + self.ffn(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, d_model: int, num_tokens: int, n_layers: int, n_heads: int, mult: int, dropout: float) -> None:
        super().__init__()
        assert num_tokens > 0
        self.latents = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(d_model, n_heads, mult, dropout) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """states [B, T, d], valid [B, T] (every row has a real event) -> [B, K, d]."""
        assert bool(valid.any(dim=1).all()), "every history needs at least one event"
        # Latents start from the user's latest state (the one trained to predict the next event):
        # plain learned latents read near-uniform attention early on and collapse to one output
        # for every user; conditioned ones carry the user from the first step.
        positions = torch.arange(valid.shape[1], device=valid.device)
        last = (valid * positions).argmax(dim=1)
        summary = states[torch.arange(states.shape[0], device=states.device), last]
        x = self.latents + summary[:, None, :]
        for layer in self.layers:
            x = layer(x, states, valid)
        return self.norm(x)
