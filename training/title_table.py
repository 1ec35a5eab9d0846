"""The item-hint table (userenc/item_hints.py) for an LLM: each item's row is the mean of the
LLM's input embeddings over its title's tokens, as the model writes that title in an answer.

The year in a MovieLens title ("Heat (1995)") is left out of the mean: four digit tokens and
brackets that every title shares would pull every row toward the same point. For the same
reason the rows are centred (the mean over titled items subtracted): what every title shares
says nothing about which one a hint is. Items without a title (and the padding / OOV ids) keep
a row of 0.
"""
from __future__ import annotations

import re

import torch

from userenc.tokenize import Vocabulary

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def title_core(title: str) -> str:
    """The part of a title that tells it apart: without a trailing "(YYYY)"."""
    core = _YEAR.sub("", title).strip()
    return core or title.strip()


@torch.no_grad()
def title_table(items: Vocabulary, titles: dict[str, str], tokenizer, embeddings: torch.Tensor
                ) -> torch.Tensor:
    """[len(items), hidden] rows for the item vocabulary; `titles` maps item id -> title text,
    `embeddings` is the LLM's input embedding matrix [vocab, hidden]."""
    table = torch.zeros(len(items), embeddings.shape[1], dtype=torch.float32)
    rows = []
    for item in items.values:
        title = titles.get(item)
        ids = tokenizer(title_core(title), add_special_tokens=False)["input_ids"] if title else []
        if ids:
            rows.append(items.id(item))
            table[rows[-1]] = embeddings[torch.as_tensor(ids)].float().mean(0).cpu()
    if rows:
        table[rows] -= table[rows].mean(0)
    return table
