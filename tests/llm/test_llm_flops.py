"""The analytic prefill FLOP count equals torch's FLOP counter on our dense forward (shapes only,
meta device) for the plain model, gated cross-attention and the soft prompt; causal counting
halves the attention part."""
from __future__ import annotations

import pytest

from llm.config import ModelConfig
from llm.flops import check_with_counter, prefill_flops

BASE = dict(vocab_size=500, hidden_size=64, intermediate_size=160, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=4096)


@pytest.mark.parametrize("extra,tokens,users", [
    ({}, 37, 0), ({}, 1500, 0),
    ({"cross_every_n": 2, "user_dim": 24}, 40, 5),
    ({"integration": "soft_prompt", "user_dim": 24}, 40, 5),
])
def test_analytic_prefill_flops_match_torchs_counter(extra, tokens, users):
    cfg = ModelConfig(**BASE, **extra)
    assert check_with_counter(cfg, tokens, users) == pytest.approx(1.0, abs=1e-9)


def test_causal_attention_counts_half_the_pairs():
    cfg = ModelConfig(**BASE)
    dense, causal = prefill_flops(cfg, 1000, causal=False), prefill_flops(cfg, 1000)
    assert causal.attention == pytest.approx(dense.attention * 1001 / 2000)
    assert causal.layers == dense.layers and causal.lm_head == 2 * 64 * 500
