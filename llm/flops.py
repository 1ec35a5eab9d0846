"""Analytic prefill FLOPs of our model (2 FLOPs per multiply-add), for cost comparisons.

Counted: every matrix product of a prefill of T prompt tokens (the self-attention and MLP
projections of every layer, attention scores and values, the cross blocks' projections,
attention to K user tokens and gated MLP, the soft-prompt projection) and the LM head for the
last token only (what the engine computes). Norms, RoPE, softmax and activations are left out
(a few per cent). `causal=True` counts the T(T+1)/2 query-key pairs a causal prefill needs;
`causal=False` counts T^2, which is what a dense SDPA call executes and what torch's FLOP
counter reports: `check_with_counter` compares against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.config import ModelConfig


@dataclass(slots=True)
class PrefillFlops:
    layers: float
    attention: float
    cross: float
    lm_head: float

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.cross + self.lm_head


def prefill_flops(cfg: ModelConfig, tokens: int, user_tokens: int = 0,
                  causal: bool = True) -> PrefillFlops:
    t, h, d = tokens, cfg.hidden_size, cfg.head_dim
    soft = cfg.integration == "soft_prompt" and user_tokens > 0
    if soft:
        t += user_tokens  # K placeholder positions in front of the prompt
    qd, kvd = cfg.num_heads * d, cfg.num_kv_heads * d
    per_token = 2 * (h * qd + 2 * h * kvd + qd * h + 3 * h * cfg.intermediate_size)
    layers = cfg.num_layers * per_token * t
    pairs = t * (t + 1) / 2 if causal else t * t
    attention = cfg.num_layers * 2 * 2 * cfg.num_heads * d * pairs
    cross = 0.0
    if soft:
        cross = 2 * user_tokens * cfg.user_dim * h
    elif user_tokens and cfg.cross_layer_indices:
        cd = cfg.cross_heads * d
        per_block = (2 * t * (h * cd + cd * h + 3 * h * cfg.cross_intermediate_size)
                     + 2 * user_tokens * 2 * cfg.user_dim * cd
                     + 2 * 2 * cfg.cross_heads * d * t * user_tokens)
        cross = len(cfg.cross_layer_indices) * per_block
    return PrefillFlops(float(layers), float(attention), float(cross),
                        float(2 * h * cfg.vocab_size))


def counted_flops(cfg: ModelConfig, tokens: int, user_tokens: int = 0) -> int:
    """torch's FLOP counter over our dense forward of a `tokens`-long prompt (+ the LM head on
    its last row), on the meta device: shapes only, nothing computed."""
    from torch.utils.flop_counter import FlopCounterMode

    from llm.model import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        ids = torch.zeros(1, tokens, dtype=torch.long)
        users = torch.zeros(1, user_tokens, cfg.user_dim) if user_tokens else None
    with FlopCounterMode(display=False) as counter:
        hidden = model(ids, user_tokens=users)
        model.compute_logits(hidden[:, -1])
    return int(counter.get_total_flops())


def check_with_counter(cfg: ModelConfig, tokens: int, user_tokens: int = 0) -> float:
    """counted / analytic (causal=False, as SDPA executes it): ~1.0 when the formula is right."""
    return counted_flops(cfg, tokens, user_tokens) / prefill_flops(cfg, tokens, user_tokens,
                                                                   causal=False).total
