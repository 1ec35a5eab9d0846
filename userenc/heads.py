"""Next-event heads: what the state after event t predicts about event t+1.

- item: scores against every candidate item (full softmax), or a sampled softmax with in-batch
  or uniform negatives for large catalogues. A candidate's embedding is its item embedding plus
  its static attributes (a movie's genres), so attribute-sharing items share signal.
- multi_categorical targets (genres): multi-label, binary cross-entropy per value.
- other categorical/bucket targets (rating): softmax over the feature's ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from userenc.config import EncoderConfig
from userenc.fusion import FeatureEmbedding
from userenc.spec import FIRST_ID, OOV_ID, PAD_ID, FeatureSpec


def seen_index(items: torch.Tensor, valid: torch.Tensor, num_items: int) -> torch.Tensor:
    """Where the seen bias goes in the [P, num_items] scores of the P positions where `valid`
    (row-major): flat indices of (position t's row, every distinct item at or before t).
    items, valid: [B, T]. Sparse (about T^2 / 2 per row) instead of a dense [P, num_items] mask,
    which cost 60% more per training step at T = 200 and 3,706 items."""
    B, T = items.shape
    pos = torch.arange(T, device=items.device)
    first = torch.full((B, num_items), T, dtype=torch.long, device=items.device)
    first.scatter_reduce_(1, items, pos.expand(B, T), reduce="amin")
    distinct = first.gather(1, items) == pos  # each item counted once, at its first position
    b, t, s = torch.nonzero(valid[:, :, None] & (distinct & (items >= FIRST_ID))[:, None, :]
                            & (pos[None, :, None] >= pos[None, None, :]), as_tuple=True)
    row = (valid.flatten().cumsum(0) - 1).view(B, T)
    return row[b, t] * num_items + items[b, s]


def last_seen_index(items: torch.Tensor, num_items: int) -> torch.Tensor:
    """seen_index for one position per row that has read the whole row: [B, num_items] scores."""
    rows = torch.arange(items.shape[0], device=items.device)[:, None]
    return torch.unique((rows * num_items + items)[items >= FIRST_ID])


class CandidateTower(nn.Module):
    """Embeddings of every item in the catalogue, for ranking."""

    def __init__(self, spec: FeatureSpec, vocab_sizes: dict[str, int], item_attributes: dict[str, torch.Tensor], dim: int) -> None:
        super().__init__()
        self.item = nn.Embedding(vocab_sizes[spec.item.name], dim, padding_idx=PAD_ID)
        self.attr_names = sorted(item_attributes)
        self.attr_embed = nn.ModuleDict()
        self.attr_lift = nn.ModuleDict()
        for f in spec.features:
            if f.name in item_attributes:
                self.attr_embed[f.name] = FeatureEmbedding(f, vocab_sizes[f.name])
                self.attr_lift[f.name] = nn.Linear(f.dim, dim, bias=False)
                self.register_buffer(f"attr_{f.name}", item_attributes[f.name].long(), persistent=True)

    def forward(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[*, dim] for the given item ids, or [num_items, dim] for the whole catalogue."""
        ids = item_ids if item_ids is not None else torch.arange(self.item.num_embeddings, device=self.item.weight.device)
        out = self.item(ids)
        for name in self.attr_names:
            attrs = getattr(self, f"attr_{name}")[ids]
            if attrs.shape[-1] == 1:
                attrs = attrs.squeeze(-1)
            out = out + self.attr_lift[name](self.attr_embed[name](attrs))
        return out


class NextEventHeads(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: EncoderConfig, item_attributes: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        item_dim = spec.item.dim
        self.query = nn.Linear(cfg.d_model, item_dim, bias=False)
        self.candidates = CandidateTower(spec, cfg.vocab_sizes, item_attributes, item_dim)
        # A learned score for items already in the history (EncoderConfig.seen_bias); None: off,
        # and checkpoints saved without it load unchanged.
        self.seen_bias = nn.Parameter(torch.zeros(())) if cfg.seen_bias else None
        self.others = nn.ModuleDict(
            {f.name: nn.Linear(cfg.d_model, cfg.vocab_sizes[f.name]) for f in spec.features if f.target and not f.is_item}
        )

    def item_logits(self, states: torch.Tensor, catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores over the whole catalogue [*, num_items], padding and OOV ids included.
        `catalogue`: the candidate tower's output, when the caller keeps it (it depends on the
        weights only, so inference computes it once)."""
        return self.query(states) @ (self.candidates() if catalogue is None else catalogue).T

    def item_scores(self, states: torch.Tensor, catalogue: torch.Tensor | None = None,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
        """Scores over the whole catalogue [*, num_items]; padding and OOV ids can never win.
        `seen`: where the history's items are (`last_seen_index`), for the seen bias."""
        scores = self.with_seen_bias(self.item_logits(states, catalogue), seen)
        scores[..., :FIRST_ID] = float("-inf")
        return scores

    def with_seen_bias(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """`seen`: flat indices into `logits` (seen_index) that get the learned seen bias. In
        place: callers pass a fresh matrix product, which autograd does not keep (a copy of the
        [positions, catalogue] matrix cost ~10 ms of a ~400 ms training step)."""
        if self.seen_bias is None or seen is None:
            return logits
        assert logits.is_contiguous(), "the seen indices address a contiguous score matrix"
        bias = self.seen_bias.to(logits.dtype).expand(len(seen))
        return logits.view(-1).index_add_(0, seen, bias).view_as(logits)

    def loss(self, states: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor,
             history: torch.Tensor | None = None, report: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean next-event loss over positions where `valid` (a real next event exists).
        `history` [B, T]: the item ids states t read (for the seen bias; None: no bias).
        `report`: also each part's value as a float (a host sync each; training skips them)."""
        h = states[valid]
        parts: dict[str, torch.Tensor] = {}
        item = self.spec.item
        if item.target:
            seen = None
            if history is not None and self.seen_bias is not None:
                seen = seen_index(history, valid, self.candidates.item.num_embeddings)
            parts[item.name] = self._item_loss(h, targets[item.name][valid], seen) * item.loss_weight
        for f in self.spec.features:
            if f.name not in self.others:
                continue
            logits = self.others[f.name](h)
            tgt = targets[f.name][valid]
            if f.kind == "multi_categorical":
                multi_hot = torch.zeros_like(logits).scatter_(1, tgt, 1.0)
                multi_hot[:, PAD_ID] = 0.0
                loss = F.binary_cross_entropy_with_logits(logits[:, FIRST_ID:], multi_hot[:, FIRST_ID:])
            else:
                loss = F.cross_entropy(logits, tgt, ignore_index=PAD_ID)
            parts[f.name] = loss * f.loss_weight
        total = sum(parts.values())
        return total, ({k: float(v.detach()) for k, v in parts.items()} if report else {})

    def _item_loss(self, h: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        # OOV targets (items unseen in training) carry no learnable signal: ignored.
        keep = target != OOV_ID
        if self.cfg.item_loss == "full" or not self.training:
            # Raw logits: padding and OOV are never targets, so the softmax learns to push them
            # down; masking them here would cost a copy of the [positions, catalogue] matrix.
            # OOV rows are ignored, not dropped (the seen indices address every row), and the
            # mean is a sum over a clamped count: 0 for a batch without a learnable target, and
            # no host sync to find out.
            logits = self.with_seen_bias(self.item_logits(h), seen)
            return F.cross_entropy(logits, target, ignore_index=OOV_ID, reduction="sum") / keep.sum().clamp(min=1)
        if not bool(keep.any()):
            return h.sum() * 0.0  # no learnable target in this batch: zero, not the NaN of an empty mean
        h, target = h[keep], target[keep]
        q = self.query(h)
        if self.cfg.negatives == "in_batch":
            # The batch's distinct target items are the candidates: every other one is a negative.
            cand_ids, label = torch.unique(target, return_inverse=True)
            return F.cross_entropy(q @ self.candidates(cand_ids).T, label)
        n_items = self.candidates.item.num_embeddings
        negatives = torch.randint(FIRST_ID, n_items, (self.cfg.num_negatives,), device=q.device)
        pos = (q * self.candidates(target)).sum(-1, keepdim=True)
        neg = q @ self.candidates(negatives).T
        neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
        return F.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros(len(target), dtype=torch.long, device=q.device))
