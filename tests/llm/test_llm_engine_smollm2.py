"""The engine on SmolLM2-135M-Instruct (fp32, CPU) against transformers' generate on the same
weights. Shares the session checkpoint of tests/llm/conftest.py (one load per worker, one worker
thanks to the xdist group)."""
from __future__ import annotations

import pytest
import torch

from llm.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.xdist_group("smollm2")

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash function is in one sentence.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Give me a tip for learning to cook.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
]


def hf_generate(hf, tokenizer, messages, n):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                           dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_greedy_chat_generations_match_hf_generate(smollm2, smollm2_hf, smollm2_checkpoint):
    tokenizer = smollm2_checkpoint.tokenizer
    chats = [[{"role": "user", "content": c}] for c in CHATS[:5]]  # mixed lengths, one batch
    eng = Engine(smollm2, tokenizer, EngineConfig(kv_cache_bytes=64 << 20,
                                                  max_num_batched_tokens=256),
                 eos_token_ids=[smollm2_checkpoint.hf_config.eos_token_id])
    try:
        outs = eng.generate(chats, SamplingParams(temperature=0, max_tokens=24))
    finally:
        eng.close()
    for chat, out in zip(chats, outs):
        expected = hf_generate(smollm2_hf, tokenizer, chat, 24)
        assert out.token_ids == expected, (chat, out.text)
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(len(o.token_ids) for o in outs) > 5 * 12  # real generations, not early eos


def test_cross_blocks_gate_zero_equal_base_and_open_gates_personalise(smollm2_checkpoint,
                                                                      smollm2_hf):
    from llm.loader import build_model

    ckpt = smollm2_checkpoint
    model = build_model(ckpt.hf_config, ckpt.state_dict, cross_every_n=10, user_dim=16)
    eng = Engine(model, ckpt.tokenizer, EngineConfig(kv_cache_bytes=32 << 20),
                 eos_token_ids=[ckpt.hf_config.eos_token_id])
    chat = [{"role": "user", "content": CHATS[1]}]
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    sp = SamplingParams(temperature=0, max_tokens=12)
    try:
        closed = eng.generate([chat, chat, chat], sp, user_tokens=[u1, u2, None])
        expected = hf_generate(smollm2_hf, ckpt.tokenizer, chat, 12)
        assert all(o.token_ids == expected for o in closed)  # gates at 0: the base model
        for block in model.model.cross_blocks.values():
            block.gate_attn.data.fill_(1.0)
            block.gate_mlp.data.fill_(1.0)
            for p in block.cross_attn.o_proj.parameters():
                p.data.mul_(50)  # fresh blocks are tiny (std 0.02): make users matter
        opened = eng.generate([chat, chat, chat], sp, user_tokens=[u1, u2, None])
        assert opened[0].token_ids != expected and opened[0].token_ids != opened[1].token_ids
        assert opened[2].token_ids == expected  # no user tokens: still the base model
    finally:
        eng.close()
