"""The model's paged path (ForwardContext + block pool, built by hand here) against its dense
path: chunked prefill over a cached prefix, mixed batches, decode through the kernels' entry
points, cross-attention K/V written once into the cross pool, soft prompts in the flat stream.
Pools start as NaN so any read of an unwritten slot shows."""
from __future__ import annotations

import pytest
import torch

from llm.context import ForwardContext, use_context
from llm.loader import load_model

TOL = 1e-4


def dense_logits(model, tokens, **kw):
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor([tokens]), **kw))[0]


def tokens(n, seed):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_schedule(harness, seqs, schedule, soft_prompts=None):
    """schedule: list of steps, each {sid: how many next tokens}; returns {(sid, pos): logits}."""
    done = {sid: 0 for sid in seqs}
    out = {}
    for step in schedule:
        chunks = {sid: seqs[sid][done[sid]:done[sid] + n] for sid, n in step.items()}
        assert all(len(chunks[sid]) == n for sid, n in step.items()), "schedule too long"
        soft = {sid: soft_prompts[sid] for sid in step
                if soft_prompts and sid in soft_prompts and done[sid] == 0}
        logits = harness.step(chunks, soft_prompts=soft or None)
        for row, (sid, n) in enumerate(step.items()):
            done[sid] += n
            out[(sid, done[sid] - 1)] = logits[row]
    return out


# Prefill in chunks (sequence 1 arrives in two pieces, the second attending to a cached
# prefix), a mixed step, then decode steps for everyone.
SCHEDULE = [{0: 7, 1: 5, 2: 3}, {1: 7, 0: 1}, {0: 1, 1: 1, 2: 1}, {2: 1, 0: 1, 1: 1},
            {0: 1, 1: 1, 2: 1}]


def test_paged_self_attention_matches_dense(tiny_checkpoint, paged_harness):
    folder, _ = tiny_checkpoint("llama", tie_word_embeddings=True)
    model, _, _ = load_model(folder)
    seqs = {0: tokens(11, 1), 1: tokens(15, 2), 2: tokens(6, 3)}
    h = paged_harness(model, block_size=4)
    for sid in seqs:
        h.add(sid)
    got = run_schedule(h, seqs, SCHEDULE)
    assert len(got) == 5 * 3 - 1
    for sid, toks in seqs.items():
        expected = dense_logits(model, toks)
        for (s, pos), logits in got.items():
            if s == sid:
                assert (logits - expected[pos]).abs().max() <= TOL, (sid, pos)


def test_paged_qwen2_with_biases_matches_dense(tiny_checkpoint, paged_harness):
    folder, _ = tiny_checkpoint("qwen2")
    model, _, _ = load_model(folder)
    seqs = {0: tokens(9, 4), 1: tokens(5, 5)}
    h = paged_harness(model, block_size=3)
    h.add(0), h.add(1)
    got = run_schedule(h, seqs, [{0: 6, 1: 4}, {0: 1, 1: 1}, {0: 1}, {0: 1}])
    for (sid, pos), logits in got.items():
        assert (logits - dense_logits(model, seqs[sid])[pos]).abs().max() <= TOL


def test_paged_cross_attention_matches_dense(tiny_checkpoint, paged_harness):
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=12, cross_heads=2)
    with torch.no_grad():
        for block in model.model.cross_blocks.values():
            block.gate_attn.fill_(0.8)
            block.gate_mlp.fill_(0.5)
    g = torch.Generator().manual_seed(9)
    users = {0: torch.randn(5, 12, generator=g), 1: None, 2: torch.randn(3, 12, generator=g)}
    seqs = {0: tokens(11, 6), 1: tokens(15, 7), 2: tokens(6, 8)}
    h = paged_harness(model, block_size=4)
    for sid in seqs:
        h.add(sid, users[sid])
    got = run_schedule(h, seqs, SCHEDULE)
    for sid, toks in seqs.items():
        u = users[sid]
        kw = {} if u is None else {"user_tokens": u[None]}
        expected = dense_logits(model, toks, **kw)
        base = dense_logits(model, toks)
        for (s, pos), logits in got.items():
            if s == sid:
                assert (logits - expected[pos]).abs().max() <= TOL, (sid, pos)
                if u is not None:  # the users really changed something
                    assert (logits - base[pos]).abs().max() > 1e-3


def test_paged_soft_prompt_matches_dense(tiny_checkpoint, paged_harness):
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder, integration="soft_prompt", user_dim=10)
    g = torch.Generator().manual_seed(10)
    users = {0: torch.randn(4, 10, generator=g), 1: torch.randn(2, 10, generator=g)}
    text = {0: tokens(9, 11), 1: tokens(7, 12)}
    # The engine's stream: K placeholder ids (here 0) in front of the prompt.
    seqs = {sid: [0] * users[sid].shape[0] + text[sid] for sid in text}
    h = paged_harness(model, block_size=4)
    h.add(0), h.add(1)
    got = run_schedule(h, seqs, [{0: 12, 1: 8}, {0: 1, 1: 1}], soft_prompts=users)
    # Dense returns text positions only; paged positions are shifted by K.
    for (sid, pos), logits in got.items():
        k = users[sid].shape[0]
        expected = dense_logits(model, text[sid][:pos - k + 1], user_tokens=users[sid][None])
        assert (logits - expected[-1]).abs().max() <= TOL, (sid, pos)


def test_prefill_without_pool_matches_dense(tiny_checkpoint, paged_harness):
    """Before the engine sizes its pool it runs a prefill with no caches assigned."""
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder)
    seqs = {0: tokens(9, 13), 1: tokens(4, 14)}
    h = paged_harness(model, assign_pool=False)
    h.add(0), h.add(1)
    got = run_schedule(h, seqs, [{0: 9, 1: 4}])
    for (sid, pos), logits in got.items():
        assert (logits - dense_logits(model, seqs[sid])[pos]).abs().max() <= TOL


def test_paged_rejects_wrong_user_width(tiny_checkpoint, paged_harness):
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=12)
    h = paged_harness(model)
    h.add(0, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"width 7.*user_dim=12"):
        h.step({0: tokens(5, 15)})
    ctx = ForwardContext(is_prefill=True, slot_mapping=torch.arange(2),
                         context_lens=torch.tensor([2], dtype=torch.int32),
                         block_tables=torch.tensor([[0]], dtype=torch.int32),
                         cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32))
    with use_context(ctx), pytest.raises(ValueError, match="through the context"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), user_tokens=torch.randn(1, 3, 12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_half_precision_matches_dense(tiny_checkpoint, paged_harness, dtype):
    """The GPU dtypes (here on CPU): pools, projections and user tokens all in that dtype."""
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder, dtype=dtype, cross_every_n=2, user_dim=12)
    with torch.no_grad():
        for block in model.model.cross_blocks.values():
            block.gate_attn.fill_(0.5)
            block.gate_mlp.fill_(0.5)
    users = torch.randn(3, 12, generator=torch.Generator().manual_seed(16))
    toks = tokens(10, 17)
    h = paged_harness(model)
    h.add(0, users)
    got = run_schedule(h, {0: toks}, [{0: 6}, {0: 2}, {0: 1}, {0: 1}])
    expected = dense_logits(model, toks, user_tokens=users[None])
    for (_, pos), logits in got.items():
        assert logits.dtype == dtype
        assert (logits.float() - expected[pos].float()).abs().max() <= 2e-2
