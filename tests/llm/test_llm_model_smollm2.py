"""SmolLM2-135M-Instruct (the GGUF in ../shared, de-quantised by transformers) in fp32 on CPU:
our model against transformers' LlamaForCausalLM on the same weights.

- logits on several prompts: max abs diff <= 1e-4;
- greedy generation, 32 tokens, 8 chat prompts: identical to HF generate (through our paged
  path with a hand-built pool, one batch), and the dense path agrees on the first tokens;
- gated cross-attention blocks at gate 0: the same logits and generations; with open gates:
  different outputs, and different for two users.
"""
from __future__ import annotations

import pytest
import torch

from llm.loader import build_model

pytestmark = pytest.mark.xdist_group("smollm2")

TOL = 1e-4
USER_DIM = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "Les fleurs du printemps",
]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    "Explain what a hash table is in one sentence.",
    "What is 12 times 7?",
    "Recommend a science fiction film and say why.",
    "Translate 'good morning' into Spanish.",
    "How do plants make their food?",
]


@pytest.fixture(scope="module")
def smollm2_cross(smollm2_checkpoint):
    ckpt = smollm2_checkpoint
    return build_model(ckpt.hf_config, ckpt.state_dict, cross_every_n=10, user_dim=USER_DIM,
                       seed=3)


@pytest.fixture(scope="module")
def chat_ids(smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for c in CHATS]


@pytest.fixture(scope="module")
def hf_generations(smollm2_hf, smollm2_checkpoint, chat_ids):
    """HF generate, greedy, 32 new tokens, the 8 prompts in one left-padded batch (4x cheaper
    than one by one; the same tokens for these prompts)."""
    tok = smollm2_checkpoint.tokenizer
    pad, width = tok.pad_token_id, max(map(len, chat_ids))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in chat_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chat_ids])
    with torch.no_grad():
        out = smollm2_hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=pad)
    outs = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:  # finished rows are padded after their EOS
            row = row[:row.index(tok.eos_token_id) + 1]
        outs.append(row)
    return outs


def paged_greedy(model, prompts, harness, steps=32, users=None):
    """All prompts in one prefill step, then batched decode steps through the pool."""
    h = harness(model, block_size=16, num_blocks=8 * len(prompts),
                num_cross_blocks=4 * len(prompts))
    for sid in range(len(prompts)):
        h.add(sid, None if users is None else users[sid])
    logits = h.step({sid: list(p) for sid, p in enumerate(prompts)})
    generated = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(steps - 1):
        logits = h.step({sid: [g[-1]] for sid, g in enumerate(generated)})
        for g, t in zip(generated, logits.argmax(-1)):
            g.append(int(t))
    return generated


def same_until_eos(ours, theirs, eos):
    """HF stops at EOS; we decode on. Equal up to HF's end, which is EOS if it came early."""
    assert ours[:len(theirs)] == theirs
    assert len(theirs) == 32 or theirs[-1] == eos


def test_logits_match_transformers(smollm2, smollm2_hf, smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    assert smollm2.config.num_kv_heads == 3 and smollm2.config.tie_word_embeddings
    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tok(text).input_ids])
            expected = smollm2_hf(ids).logits
            got = smollm2.compute_logits(smollm2(ids))
            worst = max(worst, (expected - got).abs().max().item())
    print(f"SmolLM2 max |logits - HF| over {len(PROMPTS)} prompts: {worst:.2e}")
    assert worst <= TOL


def test_greedy_generation_matches_hf_generate(smollm2, chat_ids, hf_generations,
                                               smollm2_checkpoint, paged_harness):
    eos = smollm2_checkpoint.tokenizer.eos_token_id
    ours = paged_greedy(smollm2, chat_ids, paged_harness)
    for mine, theirs in zip(ours, hf_generations):
        same_until_eos(mine, theirs, eos)
    # The dense path (no cache, a plain greedy loop) agrees too: first prompt, 8 tokens.
    ids = list(chat_ids[0])
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(smollm2.compute_logits(smollm2(torch.tensor([ids])))[0, -1].argmax()))
    assert ids[len(chat_ids[0]):] == ours[0][:8]


def test_cross_blocks_at_gate_zero_are_the_base_model(smollm2, smollm2_cross, chat_ids,
                                                      hf_generations, smollm2_checkpoint,
                                                      paged_harness):
    assert sorted(smollm2_cross.model.cross_blocks) == ["19", "29", "9"]
    tok = smollm2_checkpoint.tokenizer
    users = torch.randn(len(chat_ids), 6, USER_DIM, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([tok(PROMPTS[2]).input_ids])
    with torch.no_grad():
        base = smollm2(ids)
        assert torch.equal(smollm2_cross(ids, user_tokens=users[:1]), base)
    eos = tok.eos_token_id
    ours = paged_greedy(smollm2_cross, chat_ids, paged_harness, users=list(users))
    for mine, theirs in zip(ours, hf_generations):
        same_until_eos(mine, theirs, eos)


def test_open_gates_change_outputs_per_user(smollm2, smollm2_cross, smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    ids = torch.tensor([tok(PROMPTS[0]).input_ids] * 3)
    g = torch.Generator().manual_seed(1)
    users = torch.randn(3, 6, USER_DIM, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False  # the third row has no user tokens
    blocks = list(smollm2_cross.model.cross_blocks.values())
    try:
        with torch.no_grad():
            for block in blocks:
                block.gate_attn.fill_(1.0)
                block.gate_mlp.fill_(1.0)
            logits = smollm2_cross.compute_logits(smollm2_cross(ids, user_tokens=users,
                                                                user_mask=mask))
            # The same batch shape as above: BLAS may block a batch of 1 differently.
            base = smollm2.compute_logits(smollm2(ids))[2]
    finally:
        with torch.no_grad():
            for block in blocks:
                block.gate_attn.zero_()
                block.gate_mlp.zero_()
    user_a, user_b, nobody = logits[0, -1], logits[1, -1], logits[2]
    assert (user_a - base[-1]).abs().max() > 0.1
    assert (user_b - base[-1]).abs().max() > 0.1
    assert (user_a - user_b).abs().max() > 0.1
    assert torch.equal(nobody, base)
