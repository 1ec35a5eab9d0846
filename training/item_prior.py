"""The encoder's next-item head as a prior over next-movie answers (beam search's trie).

Trained for a CPU budget, the LLM side of USER-LLM answers next movie from its popularity
prior: it does not single out the encoder's candidates, whether it reads them as user tokens
or as item hints (bench/userllm_hint_probe.py). The encoder's own head ranks items far
better. This joins them at the decoding of a closed answer: beam search ranks each title by
the LLM's log-prob + w * the head's log-prob of that title (llm/engine/beam_search.TokenTrie's
priors), so neither has to learn what the other knows. The head is the stage-1 checkpoint's,
untouched by stage 2 (the `enc` strategy fine-tunes the encoder's trunk for the LLM, not for
its heads), and a title's probability is the sum over the items that carry it.

    prior = ItemPrior.for_adapter(adapter_dir, catalogue_titles)
    per_title = prior.log_priors(histories)      # [B, len(prior.titles)] float32
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.adapter_checkpoint import adapter_encoder_checkpoint
from userenc.checkpoint import LoadedEncoder, load_checkpoint
from userenc.events import Event


@dataclass(slots=True)
class ItemPrior:
    encoder: LoadedEncoder
    titles: list[str]  # the answers, in the order of log_priors' columns
    column: dict[str, int]
    item_ids: torch.Tensor  # [I] encoder item ids that have a title
    item_title: torch.Tensor  # [I] the column of each one's title

    @classmethod
    def build(cls, encoder: LoadedEncoder, titles: dict[str, str]) -> "ItemPrior":
        """`titles`: item id -> title (the catalogue); items the encoder never saw add nothing."""
        items = encoder.tokenizer.vocabs[encoder.tokenizer.spec.item.name]
        names = sorted(set(titles.values()))
        column = {t: i for i, t in enumerate(names)}
        known = [(items.id(item), column[t]) for item, t in titles.items() if item in items.index]
        assert known, "the encoder knows none of the catalogue's items"
        ids, cols = zip(*known)
        return cls(encoder, names, column, torch.tensor(ids), torch.tensor(cols))

    @classmethod
    def for_adapter(cls, adapter: str | Path, titles: dict[str, str],
                    encoder_dir: str | Path | None = None) -> "ItemPrior":
        """The prior of the stage-1 encoder an adapter was trained on (checked unchanged)."""
        return cls.build(load_checkpoint(adapter_encoder_checkpoint(adapter, encoder_dir)), titles)

    @torch.inference_mode()
    def log_priors(self, histories: list[list[Event]]) -> torch.Tensor:
        """[B, len(titles)]: log of each title's probability under the next-item head; a title
        of no known item gets the row's smallest finite value (every answer stays possible)."""
        scores = self.encoder.next_item_scores(histories).cpu()
        probs = torch.softmax(scores, dim=-1)[:, self.item_ids]
        per_title = torch.zeros(len(histories), len(self.titles))
        per_title.index_add_(1, self.item_title, probs)
        logp = per_title.log()
        floor = logp.masked_fill(~torch.isfinite(logp), float("inf")).amin(-1, keepdim=True)
        return torch.where(torch.isfinite(logp), logp, floor)
