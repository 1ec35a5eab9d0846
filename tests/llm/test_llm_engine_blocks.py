"""Block manager, scheduler bookkeeping, sampler and stop strings: no model needed."""
from pathlib import Path

import pytest
import torch

from llm.engine.block_manager import (NO_USER_SALT, BlockManager, CrossBlockManager, chain_hash,
                                      user_salt)
from llm.engine.detokenizer import _held_back_tail
from llm.engine.sampler import Sampler, apply_repetition_penalty, top_k_mask, top_p_mask
from llm.engine.sampling_params import SamplingParams
from llm.engine.scheduler import Scheduler
from llm.engine.sequence import Sequence, SequenceStatus


def make_seq(tokens, user=None, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(temperature=0), user, user_salt(user), None)


def compute_all(bm, seq):
    """What a step does for the whole sequence: slots, then KV 'written', then publish."""
    assert bm.ensure_slots(seq, len(seq) - seq.num_computed_tokens)
    seq.num_computed_tokens = len(seq)
    bm.register_full_blocks(seq)


def test_alloc_free_and_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(10))
    assert bm.match_prefix(a) == 0
    assert bm.ensure_slots(a, 10) and len(a.block_table) == 3
    assert bm.num_free_blocks == 5
    assert bm.ensure_slots(a, 2)  # 10 + 2 = 12 tokens still fit 3 blocks
    assert len(a.block_table) == 3
    big = make_seq(range(100, 130), rid="big")
    assert not bm.ensure_slots(big, 30)  # 8 blocks needed, 5 free: refused, nothing taken
    assert bm.num_free_blocks == 5 and big.block_table == []
    bm.free(a)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.pool.blocks)
    with pytest.raises(AssertionError):
        bm.pool.release(bm.pool.blocks[0])  # double free is caught


def test_prefix_hit_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(10), rid="a")
    bm.match_prefix(a)
    compute_all(bm, a)
    assert len(a.block_hashes) == 2  # two full blocks published; the partial third is not
    b = make_seq(list(range(8)) + [50, 51, 52], rid="b")
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.pool.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    compute_all(bm, b)
    assert b.block_table[2] != a.block_table[2]
    bm.free(a)
    assert [bm.pool.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    # Freed blocks stay findable until reused.
    c = make_seq(list(range(8)) + [7], rid="c")
    assert bm.match_prefix(c) == 8


def test_prefix_match_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(8), rid="a")
    bm.match_prefix(a)
    compute_all(bm, a)
    b = make_seq(range(8), rid="b")  # identical, exactly two full blocks
    assert bm.match_prefix(b) == 4  # the last block is recomputed to get logits


def test_salt_separates_users():
    bm = BlockManager(num_blocks=16, block_size=4)
    u1, u2 = torch.randn(3, 8), torch.randn(3, 8)
    a = make_seq(range(9), user=u1, rid="a")
    bm.match_prefix(a)
    compute_all(bm, a)
    assert bm.match_prefix(make_seq(range(9), user=u2, rid="b")) == 0
    assert bm.match_prefix(make_seq(range(9), user=None, rid="c")) == 0
    same = make_seq(range(9), user=u1.clone(), rid="d")
    assert bm.match_prefix(same) == 8
    assert same.block_table == a.block_table[:2]
    # The salt is the exact bytes: same values in another dtype or shape are another user.
    assert user_salt(u1) != user_salt(u1.double())
    assert user_salt(u1) != user_salt(u1.reshape(8, 3))
    assert user_salt(None) == NO_USER_SALT
    assert chain_hash(user_salt(u1), [1, 2]) != chain_hash(user_salt(u2), [1, 2])


def test_eviction_forgets_hash():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq(range(5), rid="a")
    bm.match_prefix(a)
    compute_all(bm, a)
    bm.free(a)
    assert len(bm.hash_to_block) == 2
    b = make_seq(range(100, 106), rid="b")  # needs all 3 blocks: the cached ones are evicted
    bm.match_prefix(b)
    compute_all(bm, b)
    assert bm.match_prefix(make_seq(range(5), rid="c")) == 0
    assert len(bm.hash_to_block) == 3  # only b's blocks


def test_cross_blocks_alloc_free():
    cm = CrossBlockManager(num_blocks=4, block_size=16)
    s = make_seq([1, 2], user=torch.randn(20, 4))
    assert cm.allocate(s) and len(s.cross_block_table) == 2
    t = make_seq([1, 2], user=torch.randn(40, 4))
    assert not cm.allocate(t) and t.cross_block_table == []
    cm.free(s)
    assert cm.num_free_blocks == 4


def test_scheduler_chunked_prefill_decode_first_and_preemption():
    bm = BlockManager(num_blocks=7, block_size=4)
    sched = Scheduler(bm, None, max_num_seqs=4, max_num_batched_tokens=8)
    long = make_seq(range(20), rid="long")
    sched.add(long)
    batch = sched.schedule()
    assert batch.seqs == [long] and batch.num_new_tokens == [8]  # chunk of the budget
    long.num_computed_tokens += 8
    short = make_seq(range(50, 53), rid="short")
    sched.add(short)
    batch = sched.schedule()
    assert batch.seqs == [long] and batch.num_new_tokens == [8]  # running prefill goes first
    long.num_computed_tokens += 8
    batch = sched.schedule()
    assert batch.seqs == [long, short] and batch.num_new_tokens == [4, 3]
    long.num_computed_tokens += 4
    short.num_computed_tokens += 3
    long.token_ids.append(1)
    short.token_ids.append(2)
    # long holds 5 blocks, short 1, one is free: long's token 21 takes it, short's 4th token
    # still fits its block. Then the pool is full.
    batch = sched.schedule()
    assert batch.seqs == [long, short] and batch.num_new_tokens == [1, 1]
    long.num_computed_tokens += 1
    short.num_computed_tokens += 1
    long.token_ids.append(3)
    short.token_ids.append(4)
    batch = sched.schedule()  # short needs a second block: none free -> short (newest) preempted
    assert batch.preempted == [short] and batch.seqs == [long]
    assert short.status is SequenceStatus.WAITING and short.block_table == []
    assert sched.waiting[0] is short and short.num_computed_tokens == 0
    assert short.token_ids == [50, 51, 52, 2, 4]  # output kept, recomputed as prompt
    sched.remove(long)
    sched.remove(short)
    assert bm.num_free_blocks == 7


def test_sampler_greedy_and_seeded_determinism_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    sampler = Sampler()
    greedy = SamplingParams(temperature=0)
    assert sampler(logits, [greedy] * 5, [None] * 5) == logits.argmax(-1).tolist()
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)

    def draw(rows, seeded_row):
        gens = [torch.Generator().manual_seed(7 if i == seeded_row else 100 + i)
                for i in range(len(rows))]
        return [sampler(rows, [p] * len(rows), gens)[seeded_row] for _ in range(1)][0]

    alone = [sampler(logits[2:3], [p], [torch.Generator().manual_seed(7)])[0]]
    g = torch.Generator().manual_seed(7)
    seq_alone = [sampler(logits[2:3], [p], [g])[0] for _ in range(10)]
    g1 = torch.Generator().manual_seed(7)
    others = [torch.Generator().manual_seed(i) for i in range(4)]
    seq_batched = [sampler(logits, [p] * 5, others[:2] + [g1] + others[2:])[2] for _ in range(10)]
    assert seq_alone == seq_batched
    assert alone[0] == seq_alone[0]
    assert len(set(seq_alone)) > 1  # it really samples
    assert draw(logits, 2) == alone[0]


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 10.0, 0.0]])
    masked = top_k_mask(logits, torch.tensor([2, 0]))
    assert torch.isinf(masked[0]).tolist() == [True, False, False, True]
    assert not torch.isinf(masked[1]).any()  # k = 0: off
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    masked = top_p_mask(probs, torch.tensor([0.7]))
    assert torch.isinf(masked[0]).tolist() == [False, False, True, True]  # 0.5 + 0.3 >= 0.7
    masked = top_p_mask(probs, torch.tensor([0.4]))
    assert torch.isinf(masked[0]).tolist() == [False, True, True, True]  # at least the top one
    masked = top_p_mask(probs, torch.tensor([1.0]))
    assert not torch.isinf(masked).any()
    # Sampling only ever returns kept tokens.
    p = SamplingParams(temperature=1.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    draws = {Sampler()(logits[:1], [p], [gen])[0] for _ in range(50)}
    assert draws == {1, 2}


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, [[0, 1, 1]], [2.0])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5]]  # input untouched
    # With the penalty the greedy choice moves off a repeated token.
    sampler = Sampler()
    p = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sampler(logits, [p], [None], previous=[[0]]) == [2]


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=0),
                dict(repetition_penalty=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


def test_stop_string_hold_back():
    assert _held_back_tail("hello wor", ("world",)) == 3
    assert _held_back_tail("hello", ("world",)) == 0
    assert _held_back_tail("abc\ufffd", ()) == 1
    assert _held_back_tail("abc</", ("</s>",)) == 2


def test_reset_prefix_cache_forgets_idle_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(9), rid="a")
    bm.match_prefix(a)
    compute_all(bm, a)
    b = make_seq(range(100, 109), rid="b")
    bm.match_prefix(b)
    compute_all(bm, b)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2  # a's two full blocks; b still holds its own
    assert bm.match_prefix(make_seq(range(9), rid="c")) == 0
    assert bm.match_prefix(make_seq(range(100, 109), rid="d")) == 8


SMOLLM2_TOKENIZER = (Path(__file__).resolve().parents[2] / ".." / "shared" / "models"
                     / "smollm2-135m-config").resolve()


@pytest.mark.parametrize("text", ["Hello world, héllo 😀 ok\n\tdone", "日本語のテキスト 🎉🎉 end",
                                  "  leading spaces and a tab\tthen 😀"])
def test_incremental_detokenizer_equals_full_decode(text):
    """Token by token, the streamed deltas join to exactly the full decode, and no delta holds
    half a character (byte-level pieces of an emoji arrive over several tokens)."""
    if not SMOLLM2_TOKENIZER.is_dir():
        pytest.skip(f"no tokenizer at {SMOLLM2_TOKENIZER}")
    from transformers import AutoTokenizer

    from llm.engine.detokenizer import Detokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    ids = tok(text)["input_ids"]
    for detok in (Detokenizer(tok), _slow(Detokenizer(tok))):
        seq = Sequence("r", [1, 2], SamplingParams(temperature=0), None, NO_USER_SALT, None)
        deltas = []
        for i, t in enumerate(ids):
            seq.token_ids.append(t)
            [(delta, stopped)] = detok.update([seq], [i == len(ids) - 1])
            assert not stopped and "\ufffd" not in delta
            deltas.append(delta)
        assert "".join(deltas) == seq.text == tok.decode(ids, skip_special_tokens=True)


def _slow(detok):
    detok._decode_batch = None  # the per-window tokenizer.decode fallback
    return detok


def test_token_only_requests_refuse_stop_strings():
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
