"""Item hints: the next-item head's top M candidates, as M extra user tokens.

The Perceiver's K tokens summarize the user; an LLM reading them must still learn, item by
item, which title a direction of that summary means, and a CPU budget of stage-2 steps sees
each title a handful of times at most (the adapter's next-movie answers collapsed onto a few
popular titles). A hint token instead carries a candidate item's row of a fixed table given
from outside -- for an LLM, the mean of its input embeddings over the item's title tokens --
so one learned reading ("raise the tokens this row points at") serves every item, seen in
training or not.

    hints = ItemHints(num_items, dim, m)            # table filled by the caller (a buffer)
    items = hints.choose(item_scores, seen_ids, seen_valid)   # [B, M] item ids
    tokens = hints(items)                                     # [B, M, dim]

The ranking is the encoder's own (items already in the history left out, as a recommendation
would); no gradient flows through the choice, only into the rank embeddings.
"""
from __future__ import annotations

import torch
from torch import nn

from userenc.spec import FIRST_ID


class ItemHints(nn.Module):
    def __init__(self, num_items: int, dim: int, m: int) -> None:
        super().__init__()
        assert m >= 1 and num_items > FIRST_ID
        self.m = m
        # One row per item id (padding / OOV rows stay 0); persistent, so an adapter keeps the
        # table it was trained with.
        self.register_buffer("table", torch.zeros(num_items, dim), persistent=True)
        # Which rank a hint holds (the attention can prefer the encoder's first choice).
        self.rank = nn.Parameter(torch.zeros(m, dim))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """The hint tokens [B, M, dim] of the chosen item ids [B, M] (best first)."""
        return self.table[items].to(self.rank.dtype) + self.rank

    @torch.no_grad()
    def choose(self, item_scores: torch.Tensor, seen_ids: torch.Tensor | None = None,
               seen_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The hinted item ids [B, M], best first: item_scores [B, num_items] (padding / OOV at
        -inf); seen_ids [B, T] with seen_valid [B, T] are items left out."""
        assert item_scores.shape[-1] == self.table.shape[0], "scores and table disagree on items"
        return top_unseen(item_scores, self.m, seen_ids, seen_valid)


@torch.no_grad()
def top_unseen(item_scores: torch.Tensor, m: int, seen_ids: torch.Tensor | None = None,
               seen_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The m best item ids [B, m] of item_scores [B, num_items], best first, the items of
    seen_ids [B, T] (where seen_valid [B, T]) left out."""
    scores = item_scores.detach().float().clone()
    if seen_ids is not None:
        assert seen_valid is not None and seen_ids.shape == seen_valid.shape
        seen = seen_ids.masked_fill(~seen_valid, 0)  # padding's row is -inf already
        scores.scatter_(1, seen, float("-inf"))
    return scores.topk(m, dim=-1).indices
