"""Training objectives beyond next-event prediction, mixed by weights in EncoderConfig.

- next-event (the default, `next_event_weight` 1): state t predicts event t+1 (userenc/heads.py).
- dense all-action (`all_action_weight`, PinnerFormer 2022): state t predicts EVERY item among
  events t+1..t+W, each a sampled softmax against the batch's window items plus uniform random
  items, the position's other window items masked out of its negatives. It scores with the
  next-event head's query and the (tied) candidate tower, so a model trained by it alone still
  ranks with `item_scores`, and no new weights exist (old checkpoints load unchanged).
- future genre distribution (`future_genre_weight`): from state t, the genre distribution of
  events t+1..t+W (each event's genres share its unit of mass), soft-target cross-entropy. Its
  head is the only new module, built only when its weight is > 0.

Why: next-event training under-represents long-term interests (PinnerFormer); these train the
states (the `embed` output's and the Perceiver's input) toward the next W events instead.

The Perceiver resampler's own auxiliary loss belongs to the next-event part: with
next_event_weight 0 the resampler is left to stage 2 (the adapter) to train.

Labels never reach into the input: `future_window` gives state t only events t+1.., and a
training window's labels come from inside that window (training histories only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from userenc.heads import NextEventHeads
from userenc.spec import FIRST_ID, OOV_ID, PAD_ID


def future_window(x: torch.Tensor, valid: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of the next `window` events for every position.

    x: [B, T] or [B, T, V] ids; valid: [B, T]. Returns (labels [B, T, W(, V)], mask [B, T, W]):
    labels[b, t, j] = x[b, t + 1 + j], mask True only when position t and event t + 1 + j are
    both real events. Strictly after t: position t's own event and its past are never labels."""
    assert window >= 1, "the future window holds at least one event"
    B, T = valid.shape
    pad_shape = (B, window) + tuple(x.shape[2:])
    padded_x = torch.cat([x, x.new_zeros(pad_shape)], dim=1)
    padded_valid = torch.cat([valid, valid.new_zeros(B, window)], dim=1)
    labels = torch.stack([padded_x[:, 1 + j : 1 + j + T] for j in range(window)], dim=2)
    mask = torch.stack([padded_valid[:, 1 + j : 1 + j + T] for j in range(window)], dim=2) & valid[:, :, None]
    return labels, mask


def all_action_loss(heads: NextEventHeads, states: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
                    window: int, num_negatives: int) -> torch.Tensor:
    """Mean over (position, future item) pairs of the sampled-softmax loss of that item against
    the batch's window items and `num_negatives` uniform items, the position's own window items
    excluded from its negatives (they are positives, not negatives)."""
    labels, mask = future_window(items, valid, window)
    mask = mask & (labels >= FIRST_ID)  # OOV targets carry no learnable signal
    rows = mask.any(dim=2)
    if not bool(rows.any()):
        return states.sum() * 0.0
    q = heads.query(states[rows])  # [P, item_dim]
    labels, mask = labels[rows], mask[rows]  # [P, W]
    n_items = heads.candidates.item.num_embeddings
    uniform = torch.randint(FIRST_ID, n_items, (num_negatives,), device=q.device)
    cand_ids, inverse = torch.unique(torch.cat([labels[mask], uniform]), return_inverse=True)
    logits = q @ heads.candidates(cand_ids).T  # [P, C]
    # Each pair's candidate column; the position's positives are masked out of the negatives.
    col = torch.zeros_like(labels)
    col[mask] = inverse[: int(mask.sum())]
    positive = torch.zeros_like(logits, dtype=torch.bool)
    row_of = torch.arange(len(col), device=col.device)[:, None].expand_as(col)
    positive[row_of[mask], col[mask]] = True
    negatives_lse = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1)  # [P]
    pos_logit = logits.gather(1, col)  # [P, W]
    # -log softmax of the positive among {itself} + negatives = softplus(lse(neg) - pos).
    pair_loss = F.softplus(negatives_lse[:, None] - pos_logit)
    return pair_loss[mask].mean()


class FutureGenreHead(nn.Module):
    """The genre distribution of the next W events, from a state."""

    def __init__(self, d_model: int, num_genre_ids: int) -> None:
        super().__init__()
        self.out = nn.Linear(d_model, num_genre_ids)

    def loss(self, states: torch.Tensor, genres: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
        """genres: [B, T, V] multi-valued genre ids per event. Soft-target cross-entropy."""
        n = self.out.out_features
        per_event = F.one_hot(genres, n).float().sum(dim=2)  # [B, T, n]
        per_event[..., :FIRST_ID] = 0.0  # padding and "unknown genre" are no genre
        per_event = per_event / per_event.sum(-1, keepdim=True).clamp(min=1.0)  # unit mass per event
        labels, mask = future_window(per_event, valid, window)  # [B, T, W, n], [B, T, W]
        target = (labels * mask[..., None]).sum(dim=2)  # [B, T, n]
        mass = target.sum(-1)
        rows = mass > 0
        if not bool(rows.any()):
            return states.sum() * 0.0
        target = target[rows] / mass[rows][:, None]
        logp = torch.log_softmax(self.out(states[rows])[:, FIRST_ID:], dim=-1)
        return -(target[:, FIRST_ID:] * logp).sum(-1).mean()


assert PAD_ID < FIRST_ID and OOV_ID < FIRST_ID  # the masking above relies on it
