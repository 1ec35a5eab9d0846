"""The sampler at extreme settings: a temperature so small that logits / T overflows must
sample the greedy token, not fail on NaN probabilities (found by fuzzing the HTTP service)."""
from __future__ import annotations

import torch

from llm.engine.sampler import Sampler
from llm.engine.sampling_params import SamplingParams


def test_tiny_temperatures_sample_the_greedy_token():
    logits = torch.tensor([[3.0, 7.5, -2.0, 7.0], [0.5, -1.0, 2.0, 1.0]])
    for t in (1e-300, 5e-324, 1e-30, 1e-6):
        params = [SamplingParams(temperature=t, seed=0)] * 2
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        assert Sampler()(logits, params, gens) == [1, 2]
    params = [SamplingParams(temperature=1e-300, top_p=0.5, top_k=2, seed=0)] * 2
    assert Sampler()(logits, params, [torch.Generator().manual_seed(0)] * 2) == [1, 2]
