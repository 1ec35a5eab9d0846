"""Task examples -> token ids and encoder arrays -> padded training batches.

A batch is right-padded (causal attention never looks right), and only answer positions are
scored: position len(prompt) - 1 + i predicts answer token i. The encoder reads each example's
history left-padded, as at serving time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.prompts import answer_ids, prompt_ids
from training.tasks import Example
from userenc.tokenize import EventTokenizer, left_pad_tensors


@dataclass(slots=True)
class Encoded:
    task: str
    prompt: list[int]
    answer: list[int]  # ends with the end token
    enc: dict[str, np.ndarray] | None  # the history for the encoder (userllm arm)
    events_shown: int  # text arm: history events that fit in the prompt


def encode_examples(examples: list[Example], arm: str, tokenizer, end_token: int,
                    budget: int, enc_tokenizer: EventTokenizer | None) -> list[Encoded]:
    """budget: prompt tokens at most (the text arm drops its oldest events to fit)."""
    out = []
    for ex in examples:
        p = prompt_ids(tokenizer, ex, arm, budget)
        enc = enc_tokenizer.encode(ex.history) if (arm == "userllm" and enc_tokenizer) else None
        out.append(Encoded(ex.task, p.ids, answer_ids(tokenizer, ex.target, end_token), enc,
                           p.events_shown))
    return out


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T]
    label_rows: torch.Tensor  # [N]
    label_cols: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    enc_ids: dict[str, torch.Tensor] | None
    enc_valid: torch.Tensor | None

    def args(self) -> tuple:
        return (self.input_ids, self.label_rows, self.label_cols, self.labels, self.enc_ids,
                self.enc_valid)


def collate(items: list[Encoded], pad_id: int, enc_tokenizer: EventTokenizer | None,
            enc_max_len: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(it.prompt) + len(it.answer) - 1 for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    rows, cols, labels = [], [], []
    for b, it in enumerate(items):
        seq = it.prompt + it.answer[:-1]  # the last answer token is predicted, never read
        ids[b, :len(seq)] = torch.tensor(seq)
        start = len(it.prompt) - 1
        rows += [b] * len(it.answer)
        cols += range(start, start + len(it.answer))
        labels += it.answer
    enc_ids = enc_valid = None
    if items[0].enc is not None:
        assert enc_tokenizer is not None
        enc_ids, enc_valid = left_pad_tensors([it.enc for it in items], enc_tokenizer.spec,
                                              enc_max_len, device)
    return Batch(ids.to(device), torch.tensor(rows, device=device),
                 torch.tensor(cols, device=device), torch.tensor(labels, device=device),
                 enc_ids, enc_valid)


def length_batches(items: list[Encoded], batch_size: int, rng: np.random.Generator
                   ) -> list[list[int]]:
    """Shuffled batches of similar prompt lengths (less padding for the text arm): shuffle,
    sort within chunks of 50 batches, shuffle the batches."""
    order = rng.permutation(len(items))
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk].tolist(),
                      key=lambda j: len(items[j].prompt) + len(items[j].answer))
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
