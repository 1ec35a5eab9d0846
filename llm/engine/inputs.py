"""Request inputs checked at the edge: a prompt (text, token ids or chat messages) becomes token
ids, user tokens are checked against the model. Every problem is a ValueError naming it, raised
before anything is queued."""
from __future__ import annotations

import torch

Prompt = str | list[int] | list[dict]


def prompt_token_ids(tokenizer, prompt: Prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat messages need 'role' and 'content', got {m!r}")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                            tokenize=True)
        if not isinstance(ids, list):  # transformers v5 returns a BatchEncoding
            ids = ids["input_ids"]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("empty prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a token prompt must be a list of ints")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")
        ids = list(prompt)
    else:
        raise ValueError(f"prompt must be str, list[int] or chat messages, "
                         f"got {type(prompt).__name__}")
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the prompt tokenizes to nothing")
    return ids


def checked_user_tokens(user_tokens: torch.Tensor | None, user_dim: int | None,
                        max_user_tokens: int) -> torch.Tensor | None:
    """user_tokens [K, D] with D == user_dim and 1 <= K <= max_user_tokens, finite floats."""
    if user_tokens is None:
        return None
    if not isinstance(user_tokens, torch.Tensor):
        raise ValueError(f"user_tokens must be a tensor [K, D], got {type(user_tokens).__name__}")
    if user_dim is None:
        raise ValueError("this engine's model has no cross-attention blocks (nor a soft prompt); "
                         "load it with cross_every_n > 0 and user_dim to pass user tokens")
    if user_tokens.dim() != 2:
        raise ValueError(f"user_tokens must be [K, D], got shape {tuple(user_tokens.shape)}")
    k, d = user_tokens.shape
    if d != user_dim:
        raise ValueError(f"user_tokens width {d} does not match the model's user_dim {user_dim}")
    if not 1 <= k <= max_user_tokens:
        raise ValueError(f"user_tokens count {k} must be in [1, {max_user_tokens}] "
                         f"(max_user_tokens)")
    if not user_tokens.is_floating_point() or not torch.isfinite(user_tokens).all():
        raise ValueError("user_tokens must be finite floats")
    return user_tokens.detach()
