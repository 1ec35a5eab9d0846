"""Soft-prompt integration: user tokens [K, D_user] projected to the model width and placed in
front of the text as input embeddings (the alternative to gated cross-attention)."""
from __future__ import annotations

import torch
from torch import nn

from llm.config import ModelConfig
from llm.layers.cross_attention import check_user_width
from llm.layers.rmsnorm import RMSNorm


class SoftPromptProjector(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.user_dim is not None
        self.user_dim = cfg.user_dim
        # Normalise first: user encoders emit arbitrary scales, embeddings have a fixed one.
        self.norm = RMSNorm(cfg.user_dim, cfg.rms_norm_eps)
        self.proj = nn.Linear(cfg.user_dim, cfg.hidden_size)

    def forward(self, user_tokens: torch.Tensor) -> torch.Tensor:
        check_user_width(user_tokens.shape[-1], self.user_dim)
        return self.proj(self.norm(user_tokens.to(self.proj.weight.dtype)))
