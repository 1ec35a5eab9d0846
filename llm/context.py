"""What one forward step of the engine tells the attention layers (the paged path).

The model's layers read this instead of taking a dozen arguments (the nano-vllm pattern). With
no context set, the model runs its dense path: a plain [B, T] causal forward without a cache,
used for training adapters and for parity checks against transformers.

Token layout: the engine flattens all sequences of a step into one [N] stream of new tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass(slots=True)
class ForwardContext:
    is_prefill: bool
    # Where each new token's K/V goes in the self-attention pool (block * block_size + offset).
    slot_mapping: torch.Tensor  # [N] int64
    # Per sequence: total tokens in the cache after this step (cached prefix + new tokens).
    context_lens: torch.Tensor  # [S] int32
    # Per sequence: the self-attention blocks it owns, -1 padded.
    block_tables: torch.Tensor  # [S, max_blocks] int32
    # Prefill only: new-token offsets per sequence in the flat stream (cu_seqlens_q[-1] == N).
    cu_seqlens_q: torch.Tensor | None = None  # [S+1] int32
    # Prefill only: the longest run of new tokens (host int, so a GPU kernel's grid needs no
    # device read); 0 = unknown, read from cu_seqlens_q when needed.
    max_seqlen_q: int = 0
    # Cross-attention to user tokens: per sequence, its cross blocks (-1 padded) and how many
    # user tokens it has (0: no user tokens, the cross-attention block is the identity for it).
    cross_block_tables: torch.Tensor | None = None  # [S, max_cross_blocks] int32
    cross_lens: torch.Tensor | None = None  # [S] int32
    # User tokens whose cross K/V must be computed and written this step (first prefill chunk of a
    # request), flattened, and the cross-pool slots they go to.
    cross_inputs: torch.Tensor | None = None  # [M, D_user]
    cross_slot_mapping: torch.Tensor | None = None  # [M] int64
    # Soft-prompt integration (added by the model, part A): projected user tokens replace the
    # input embeddings at these flat-stream indices (the engine puts K placeholder token ids in
    # front of the prompt, e.g. the pad id, and lists where they landed in this step's stream).
    soft_prompt_inputs: torch.Tensor | None = None  # [P, D_user]
    soft_prompt_positions: torch.Tensor | None = None  # [P] int64, indices into the [N] stream
    # Work the layers of this step share (the reference decode path's gather plans), built by
    # the first layer that needs it.
    plans: dict = field(default_factory=dict)


_current: ForwardContext | None = None


def get_context() -> ForwardContext | None:
    return _current


@contextmanager
def use_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous
