"""Per-feature embedding tables and their fusion into one token per event."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from userenc.layers import RMSNorm
from userenc.spec import PAD_ID, Feature, FeatureSpec


class FeatureEmbedding(nn.Module):
    """One table per feature; a multi-valued feature (genres) is the mean of its values."""

    def __init__(self, feature: Feature, vocab_size: int) -> None:
        super().__init__()
        self.multi = feature.kind == "multi_categorical"
        self.table = nn.Embedding(vocab_size, feature.dim, padding_idx=PAD_ID)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.multi:
            return self.table(ids)
        present = (ids != PAD_ID).unsqueeze(-1).float()
        return (self.table(ids) * present).sum(-2) / present.sum(-2).clamp(min=1.0)


class EarlyFusion(nn.Module):
    """Concatenate every feature's embedding, then an MLP to d_model: one input token per event."""

    def __init__(self, spec: FeatureSpec, vocab_sizes: dict[str, int], d_model: int, dropout: float,
                 feature_dropout: float = 0.0) -> None:
        super().__init__()
        self.names = [f.name for f in spec.features]
        self.feature_dropout = feature_dropout
        self.embed = nn.ModuleDict({f.name: FeatureEmbedding(f, vocab_sizes[f.name]) for f in spec.features})
        width = sum(f.dim for f in spec.features)
        self.mlp = nn.Sequential(nn.Linear(width, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.norm = RMSNorm(d_model)  # the transformer sees unit-scale tokens whatever the tables' scale
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.embed[n](ids[n]) for n in self.names]
        if self.training and self.feature_dropout > 0 and len(parts) > 1:
            # One keep/drop draw per (event, feature), spread over that feature's columns.
            keep = torch.rand(*parts[0].shape[:-1], len(parts), device=parts[0].device)
            keep = (keep >= self.feature_dropout).to(parts[0].dtype) / (1 - self.feature_dropout)
            parts = [p * keep[..., i:i + 1] for i, p in enumerate(parts)]
        return self.drop(self.norm(self.mlp(torch.cat(parts, dim=-1))))


class LateFusion(nn.Module):
    """Each feature gets its own causal encoder; their states are concatenated and mixed.

    `encoders` is built by the caller (one CausalTransformer per feature) so that this module
    stays about fusion only."""

    def __init__(self, spec: FeatureSpec, vocab_sizes: dict[str, int], d_model: int, dropout: float, encoders: nn.ModuleDict) -> None:
        super().__init__()
        self.names = [f.name for f in spec.features]
        self.embed = nn.ModuleDict({f.name: FeatureEmbedding(f, vocab_sizes[f.name]) for f in spec.features})
        self.lift = nn.ModuleDict({f.name: nn.Linear(f.dim, d_model) for f in spec.features})
        self.encoders = encoders
        self.mix = nn.Linear(d_model * len(self.names), d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: dict[str, torch.Tensor], valid: torch.Tensor, positions: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """`pos_embed` [B, T, d_model]: learned positions, added to every feature's input."""
        lifted = {n: self.lift[n](self.embed[n](ids[n])) for n in self.names}
        if pos_embed is not None:
            lifted = {n: x + pos_embed for n, x in lifted.items()}
        states = [self.encoders[n](self.drop(lifted[n]), valid, positions) for n in self.names]
        return F.silu(self.mix(torch.cat(states, dim=-1)))
