"""The engine serves what was trained: an adapter saved from the training model and loaded by
Engine.from_pretrained(adapter=...) gives the training forward's teacher-forced logits on the
engine's paged path (prefill + decode, LoRA merged), fp32, max abs diff <= 1e-4; and two loads
of one checkpoint give identical outputs."""
from __future__ import annotations

import pytest
import torch
from adapter_helpers import titled

from training.config import AdapterConfig
from training.tasks import task_split, train_examples

pytestmark = pytest.mark.xdist_group("adapter")
TASKS = ["genre_history"]


def _trained_looking(model) -> None:
    """Random values in every trained tensor (gates open): parity must not hide behind zeros."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.trained_parameters().items():
            if name.endswith(("gate_attn", "gate_mlp")):
                p.fill_(0.6)
            elif ".lora_B" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("strategy,integration,hints",
                         [("lora", "xattn", 0), ("enc", "softprompt", 0), ("enc", "xattn", 3)])
def test_engine_paged_path_matches_the_training_forward(tmp_path, tiny_llm, tiny_encoder,
                                                        sample_histories, strategy, integration,
                                                        hints):
    from llm.engine.beam_search import BeamSearch
    from llm.engine.engine import Engine
    from llm.engine.sampling_params import SamplingParams
    from training.adapter_checkpoint import load_adapter_encoder, save_adapter
    from training.adapter_data import encode_examples
    from training.train_adapter import build_stage2

    acfg = AdapterConfig(arm="userllm", strategy=strategy, integration=integration,
                         tasks=TASKS, cross_every_n=2, num_user_tokens=2, item_hints=hints)
    histories = titled(sample_histories) if hints else sample_histories
    s2 = build_stage2(tiny_llm, tiny_encoder, acfg, histories)
    _trained_looking(s2.model)
    s2.model.eval()
    save_adapter(tmp_path / "adapter", s2.model, s2.meta, {"kind": "adapter"})
    exs = train_examples(task_split(histories, 1).train, TASKS, s2.catalogue, 1, [25], 3)
    items = encode_examples(exs[:4], "userllm", s2.tokenizer, s2.end_token, 512,
                            s2.enc_tokenizer)
    engines = [Engine.from_pretrained(tiny_llm, adapter=tmp_path / "adapter") for _ in range(2)]
    encoder = load_adapter_encoder(tmp_path / "adapter")
    worst = 0.0
    try:
        for ex, it in zip(exs, items):
            seq = torch.tensor([it.prompt + it.answer[:-1]])
            with torch.no_grad():
                ids, valid = encoder.batch([ex.history])
                tokens, mask = s2.model.user_tokens(ids, valid)
                dense = s2.model.llm.compute_logits(
                    s2.model.llm(seq, user_tokens=tokens, user_mask=mask))[0]
            served_tokens = encoder.user_tokens([ex.history])[0]
            assert torch.allclose(served_tokens, tokens[0], atol=1e-6)
            paged = [BeamSearch(e.model).forced_logits(it.prompt, it.answer[:-1], served_tokens)
                     for e in engines]
            assert torch.equal(paged[0], paged[1])  # two loads of one checkpoint: identical
            n = len(it.prompt) - 1
            worst = max(worst, float((paged[0] - dense[n:].float()).abs().max()))
            greedy = [e.generate([it.prompt], SamplingParams(temperature=0, max_tokens=6),
                                 [served_tokens])[0].token_ids for e in engines]
            assert greedy[0] == greedy[1]
    finally:
        for e in engines:
            e.close()
    assert worst <= 1e-4, worst
