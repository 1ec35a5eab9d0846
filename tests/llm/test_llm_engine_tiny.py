"""Engine behaviour on a tiny random Llama (a real HF folder, loaded through our loader):
parity with HF generate, batching invariance, preemption, cancellation, prefix cache,
cross-attention users, streaming, stop strings, bad input."""
from __future__ import annotations

import os

import pytest
import torch

from engine_fixtures import make_tiny_llama, random_prompts
from llm.engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


# `make test-gpu` runs these on CUDA (USERLLM_TEST_DEVICE=cuda): fp32 through the compiled
# Triton kernels and CUDA-graph decode. The default is the CPU, whatever the machine has.
DEVICE = os.environ.get("USERLLM_TEST_DEVICE", "cpu")


def engine(path, **kw) -> Engine:
    kw.setdefault("kv_cache_bytes", 1 << 21)
    kw.setdefault("device", DEVICE)
    kw.setdefault("dtype", torch.float32)
    return Engine.from_pretrained(path, **kw)


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def collect(outputs, done: dict) -> None:
    for out in outputs:
        if out.finished:
            done[out.request_id] = out.token_ids


def run_all(eng: Engine, done: dict | None = None) -> dict[str, list[int]]:
    done = {} if done is None else done
    while eng.has_unfinished():
        collect(eng.step(), done)
    return done


def test_greedy_matches_hf_generate_with_chunked_prefill(tiny_path, hf_model):
    prompts = random_prompts(5, [3, 17, 40, 64, 90], seed=1)
    eng = engine(tiny_path, max_num_batched_tokens=32, block_size=8)
    outs = eng.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, GREEDY.max_tokens)
        assert out.finish_reason == "length" and out.finished
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_batching_invariance_requests_joining_at_different_steps(tiny_path):
    target = random_prompts(1, [37], seed=2)[0]
    alone = engine(tiny_path).generate([target], GREEDY)[0].token_ids
    eng = engine(tiny_path, max_num_batched_tokens=48, block_size=8)
    others = random_prompts(16, [5, 23, 61, 100, 12, 44], seed=3)
    done: dict = {}
    for i, prompt in enumerate(others):  # one or two newcomers per step, target in the middle
        eng.add_request(prompt, sampling=SamplingParams(temperature=0, max_tokens=4 + i % 9,
                                                         ignore_eos=True))
        if i == 7:
            target_id = eng.add_request(target, sampling=GREEDY)
        if i % 2:
            collect(eng.step(), done)
    run_all(eng, done)
    assert done[target_id] == alone
    assert len(done) == 17


def test_preemption_with_tiny_pool_keeps_outputs(tiny_path):
    prompts = random_prompts(8, [30, 45, 20, 60], seed=4)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = engine(tiny_path).generate(prompts, sp)
    # 8 blocks of 16 tokens: two or three sequences at a time; decodes must preempt.
    eng = engine(tiny_path, block_size=16, max_num_batched_tokens=64,
                 kv_cache_bytes=8 * 2 * 2 * 16 * 2 * 16 * 4)
    assert eng.block_manager.num_blocks == 8
    outs = eng.generate(prompts, sp)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert eng.block_manager.num_free_blocks == 8


def test_cancel_returns_all_blocks(tiny_path):
    u = torch.randn(5, 8)
    eng = engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8)
    free0 = (eng.block_manager.num_free_blocks, eng.cross_manager.num_free_blocks)
    ids = [eng.add_request(p, user_tokens=u if i % 2 else None, sampling=GREEDY)
           for i, p in enumerate(random_prompts(6, [20, 50], seed=5))]
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < free0[0]
    assert eng.cross_manager.num_free_blocks < free0[1]
    assert all(eng.cancel(rid) for rid in ids)
    assert not eng.cancel(ids[0])  # already gone
    assert (eng.block_manager.num_free_blocks, eng.cross_manager.num_free_blocks) == free0
    assert not eng.has_unfinished() and eng.step() == []


def test_prefix_cache_shares_per_user_and_keeps_outputs(tiny_path):
    shared = random_prompts(1, [40], seed=6)[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    u1, u2 = torch.randn(4, 8), torch.randn(4, 8)
    eng = engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8)
    for blocks in eng.model.model.cross_blocks.values():
        blocks.gate_attn.data.fill_(1.0)
        blocks.gate_mlp.data.fill_(1.0)
    first = eng.add_request(a, u1, GREEDY)
    eng.step()  # a's prompt is computed and its 5 full blocks published
    same_user = eng.add_request(b, u1, GREEDY)
    other_user = eng.add_request(b, u2, GREEDY)
    no_user = eng.add_request(b, None, GREEDY)
    eng.step()
    seqs = eng._seqs
    assert seqs[same_user].num_cached_tokens == 40
    assert seqs[same_user].block_table[:5] == seqs[first].block_table[:5]
    for rid in (other_user, no_user):
        assert seqs[rid].num_cached_tokens == 0
        assert not set(seqs[rid].block_table) & set(seqs[first].block_table)
    shared_block = eng.block_manager.pool.blocks[seqs[first].block_table[0]]
    assert shared_block.ref_count == 2
    done = run_all(eng)
    # The same requests with the prefix cache off give the same tokens.
    ref = engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8,
                 enable_prefix_caching=False)
    for blocks in ref.model.model.cross_blocks.values():
        blocks.gate_attn.data.fill_(1.0)
        blocks.gate_mlp.data.fill_(1.0)
    expected = ref.generate([a, b, b, b], GREEDY, user_tokens=[u1, u1, u2, None])
    assert [done[r] for r in (first, same_user, other_user, no_user)] == \
        [o.token_ids for o in expected]
    assert ref.block_manager.num_hit_tokens == 0


def _dense_greedy(model, prompt, n, user=None):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            kwargs = {} if user is None else {"user_tokens": user[None].to(model.device)}
            h = model(torch.tensor([ids], device=model.device), **kwargs)
            ids.append(int(model.compute_logits(h[0, -1]).argmax()))
    return ids[len(prompt):]


def open_cross_gates(eng: Engine) -> Engine:
    """Gates at 0.8 and random cross-attention weights (seeded): users' tokens then matter."""
    torch.manual_seed(0)
    for block in eng.model.model.cross_blocks.values():
        block.gate_attn.data.fill_(0.8)
        block.gate_mlp.data.fill_(0.8)
        for p in block.cross_attn.parameters():
            p.data.normal_(0, 0.3)
    return eng


def test_cross_attention_users_differ_and_match_dense_path(tiny_path, hf_model):
    eng = open_cross_gates(engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8,
                                  max_num_batched_tokens=24, max_num_seqs=8))
    u1, u2 = torch.randn(6, 8) * 3, torch.randn(3, 8) * 3
    prompt = random_prompts(1, [30], seed=7)[0]
    outs = eng.generate([prompt, prompt, prompt], GREEDY, user_tokens=[u1, u2, None])
    assert outs[0].token_ids != outs[1].token_ids
    assert outs[0].token_ids == _dense_greedy(eng.model, prompt, GREEDY.max_tokens, u1)
    assert outs[1].token_ids == _dense_greedy(eng.model, prompt, GREEDY.max_tokens, u2)
    # No user tokens in a batch with users: exactly the base model.
    assert outs[2].token_ids == hf_greedy(hf_model, prompt, GREEDY.max_tokens)
    assert eng.cross_manager.num_free_blocks == eng.cross_manager.pool.num_blocks


def test_stream_deltas_and_stop_string(tiny_path):
    eng = engine(tiny_path)
    prompt = "Hello world, how are"
    full = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=16,
                                                 ignore_eos=True))[0]
    assert full.text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = full.text.index(stop)
    chunks = list(eng.stream(prompt, SamplingParams(temperature=0, max_tokens=16,
                                                    ignore_eos=True, stop=[stop])))
    assert chunks[-1].finished and chunks[-1].finish_reason == "stop"
    assert "".join(c.new_text for c in chunks) == chunks[-1].text == full.text[:cut]
    streamed = list(eng.stream(prompt, SamplingParams(temperature=0, max_tokens=16,
                                                      ignore_eos=True)))
    assert "".join(c.new_text for c in streamed) == full.text
    assert sum((c.new_token_ids for c in streamed), []) == full.token_ids
    # Closing a stream early cancels the request and frees its blocks.
    it = eng.stream(prompt, SamplingParams(temperature=0, max_tokens=16))
    next(it)
    it.close()
    assert not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_seeded_sampling_independent_of_batch(tiny_path):
    sp = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2,
                        seed=123, max_tokens=10, ignore_eos=True)
    prompt = random_prompts(1, [25], seed=8)[0]
    alone = engine(tiny_path).generate([prompt], sp)[0].token_ids
    eng = engine(tiny_path)
    others = random_prompts(5, [10, 33], seed=9)
    outs = eng.generate(others + [prompt], [SamplingParams(temperature=1.0, max_tokens=10)] * 5
                        + [sp])
    assert outs[-1].token_ids == alone
    unseeded = engine(tiny_path).generate([prompt], SamplingParams(temperature=1.0, seed=124,
                                                                    max_tokens=10,
                                                                    ignore_eos=True))
    assert unseeded[0].token_ids != alone


def test_chat_messages_and_eos(tiny_path):
    eng = engine(tiny_path)
    msgs = [{"role": "user", "content": "Hello world"}]
    expected_ids = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                     tokenize=True)
    if not isinstance(expected_ids, list):
        expected_ids = expected_ids["input_ids"]
    out = eng.generate([msgs], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.num_prompt_tokens == len(expected_ids)
    # Forcing eos as a stop token id ends the request on it.
    first = out.token_ids[0]
    out2 = eng.generate([msgs], SamplingParams(temperature=0, max_tokens=8,
                                               stop_token_ids=[first]))[0]
    assert out2.token_ids == [first] and out2.finish_reason == "stop"
    # min_tokens masks stop tokens (and eos) until that many tokens exist.
    out3 = eng.generate([msgs], SamplingParams(temperature=0, max_tokens=8, min_tokens=3,
                                               stop_token_ids=[first]))[0]
    assert len(out3.token_ids) >= 3 and first not in out3.token_ids[:3]
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_bad_input_is_refused_and_others_keep_running(tiny_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "no-such-model")
    eng = engine(tiny_path, cross_every_n=2, user_dim=8)
    good = random_prompts(2, [15, 25], seed=10)
    expected = engine(tiny_path).generate(good, GREEDY)
    rid = eng.add_request(good[0], sampling=GREEDY)
    eng.step()
    bad_cases = [
        dict(prompt=good[1], user_tokens=torch.randn(4, 7)),  # wrong width
        dict(prompt=good[1], user_tokens=torch.randn(4)),  # not [K, D]
        dict(prompt=good[1], user_tokens=torch.randn(100, 8)),  # more than max_user_tokens
        dict(prompt=good[1], user_tokens=torch.full((2, 8), float("nan"))),
        dict(prompt=""),
        dict(prompt=[]),
        dict(prompt="   "),
        dict(prompt=[1, 2, 10_000]),  # outside the vocabulary
        dict(prompt=good[1], sampling=SamplingParams(max_tokens=600)),  # beyond 512 context
        dict(prompt=42),
    ]
    for case in bad_cases:
        with pytest.raises(ValueError):
            eng.add_request(**case)
    with pytest.raises(ValueError, match="user_dim 8"):
        eng.add_request(good[1], user_tokens=torch.randn(4, 7))
    rid2 = eng.add_request(good[1], sampling=GREEDY)
    done = run_all(eng)
    assert [done[rid], done[rid2]] == [o.token_ids for o in expected]
    # A model without cross blocks refuses user tokens clearly.
    with pytest.raises(ValueError, match="no cross-attention"):
        engine(tiny_path).add_request(good[0], user_tokens=torch.randn(2, 8))


def test_soft_prompt_users_match_dense_path(tiny_path):
    eng = engine(tiny_path, integration="soft_prompt", user_dim=8, max_num_batched_tokens=4,
                 max_num_seqs=4, block_size=4)
    torch.manual_seed(1)
    for p in eng.model.model.soft_prompt.parameters():
        p.data.normal_(0, 0.5)
    u1, u2 = torch.randn(6, 8), torch.randn(2, 8)
    prompt = random_prompts(1, [9], seed=12)[0]
    outs = eng.generate([prompt, prompt, prompt], GREEDY, user_tokens=[u1, u2, None])
    assert outs[0].token_ids != outs[1].token_ids
    for out, user in zip(outs, (u1, u2, None)):
        assert out.token_ids == _dense_greedy(eng.model, prompt, GREEDY.max_tokens, user)
        assert out.num_prompt_tokens == len(prompt) + (0 if user is None else user.shape[0])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_static_decode_buffers_match_eager_path(tiny_path):
    """The CUDA-graph decode path's padded buckets (run eagerly on CPU): same tokens."""
    prompts = random_prompts(5, [7, 19, 33], seed=13)
    sp = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    expected = engine(tiny_path, block_size=8).generate(prompts, sp)
    eng = engine(tiny_path, block_size=8, use_cuda_graphs=True, max_num_seqs=6,
                 max_num_batched_tokens=64)
    assert eng.runner.decode_graphs is not None and eng.runner.decode_graphs.buckets == [1, 2, 4, 6]
    outs = eng.generate(prompts, sp)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_padded_decode_mixes_personalized_and_plain_sequences(tiny_path):
    """The CUDA-graph decode buffers of a cross-attention model (static cross block tables
    and lengths, padded buckets), run eagerly on CPU: a batch mixing users with and without
    user tokens gives the same tokens as the unpadded eager path, and users still matter."""
    def personalized(**kw) -> Engine:
        return open_cross_gates(engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8,
                                       max_num_seqs=7, max_num_batched_tokens=64, **kw))

    g = torch.Generator().manual_seed(5)
    users = [torch.randn(6, 8, generator=g) * 3, None, torch.randn(3, 8, generator=g) * 3,
             None, torch.randn(9, 8, generator=g) * 3]
    prompts = random_prompts(5, [7, 19, 33], seed=14)
    eager = personalized(use_cuda_graphs=False)
    expected = eager.generate(prompts, GREEDY, user_tokens=users)
    padded = personalized(use_cuda_graphs=True)
    assert padded.runner.decode_graphs.buckets == [1, 2, 4, 7]
    outs = padded.generate(prompts, GREEDY, user_tokens=users)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    alone = personalized(use_cuda_graphs=True).generate([prompts[0]], GREEDY,
                                                        user_tokens=[None])[0]
    assert alone.token_ids != outs[0].token_ids  # the user tokens changed the output
    # Requests join and leave at different steps: the buckets shrink and grow.
    staggered = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                 for m in (3, 12, 5, 9, 12)]
    ref = eager.generate(prompts, staggered, user_tokens=users)
    got = padded.generate(prompts, staggered, user_tokens=users)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for eng in (eager, padded):
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        assert eng.cross_manager.num_free_blocks == eng.cross_manager.pool.num_blocks
        assert not eng.inputs.rows and len(eng.inputs.free_rows) == 7


def test_token_only_streams_get_no_text_and_text_streams_the_full_decode(tiny_path):
    eng = engine(tiny_path)
    prompt = "Hello world, how are"
    text_sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ids_sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, detokenize=False)
    with_text, ids_only = eng.generate([prompt, prompt], [text_sp, ids_sp])
    assert with_text.token_ids == ids_only.token_ids
    assert ids_only.text == "" and with_text.text
    assert with_text.text == eng.tokenizer.decode(with_text.token_ids, skip_special_tokens=True)


def test_triton_kernels_give_the_torch_backends_tokens(tiny_path, monkeypatch):
    """The whole engine on the Triton backend (the interpreter on CPU; compiled under
    `make test-gpu`): varlen prefill in one launch, chunks over a cached prefix, a prefix-cache
    hit, cross-attention with and without user tokens, then paged decode. Same greedy tokens
    as the PyTorch backend."""
    shared = random_prompts(1, [21], seed=11)[0]
    prompts = [shared + [5, 6], shared + [9], random_prompts(1, [13], seed=12)[0]]
    users = [torch.randn(3, 8) * 3, torch.randn(5, 8) * 3, None]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    import llm.kernels.paged_prefill as prefill_kernel
    launches = []
    real = prefill_kernel.paged_prefill_attention_triton
    monkeypatch.setattr(prefill_kernel, "paged_prefill_attention_triton",
                        lambda *a, **kw: launches.append(kw["causal"]) or real(*a, **kw))
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("USERLLM_KERNELS", backend)
        eng = open_cross_gates(engine(tiny_path, cross_every_n=1, user_dim=8, block_size=8,
                                      max_num_batched_tokens=16, max_num_seqs=4))
        first = eng.generate(prompts[:1], params, user_tokens=users[:1])  # publishes a prefix
        rest = eng.generate(prompts, params, user_tokens=users)
        assert eng.block_manager.num_hit_tokens > 0
        results[backend] = [o.token_ids for o in first + rest]
    assert results["triton"] == results["torch"]
    assert True in launches and False in launches  # self- and cross-attention prefill ran
