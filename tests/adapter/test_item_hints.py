"""Item hints (userenc/item_hints.py, training/title_table.py): the encoder's top-M next items,
each as its title's mean LLM embedding, appended to the user tokens; they reach the adapter
checkpoint and the served path unchanged."""
from __future__ import annotations

import pytest
import torch

from training.config import AdapterConfig
from training.tasks import task_split, train_examples
from adapter_helpers import titled
from userenc.item_hints import ItemHints

pytestmark = pytest.mark.xdist_group("adapter")


def test_hints_are_the_top_unseen_items_rows_plus_their_rank():
    hints = ItemHints(num_items=7, dim=3, m=2)
    hints.table.copy_(torch.arange(21, dtype=torch.float32).view(7, 3))
    with torch.no_grad():
        hints.rank.copy_(torch.tensor([[100.0, 0, 0], [0, 100.0, 0]]))
    inf = float("-inf")
    scores = torch.tensor([[inf, inf, 5.0, 1.0, 9.0, 3.0, 0.0],
                           [inf, inf, 1.0, 2.0, 3.0, 4.0, 5.0]])
    seen = torch.tensor([[4, 0], [6, 5]])  # row 0: item 4 seen (and padding); row 1: 6 and 5
    valid = torch.tensor([[True, False], [True, True]])
    chosen = hints.choose(scores, seen, valid)
    assert chosen.tolist() == [[2, 5], [4, 3]]
    out = hints(chosen)
    table = hints.table
    assert torch.equal(out[0], torch.stack([table[2], table[5]]) + hints.rank)
    assert torch.equal(out[1], torch.stack([table[4], table[3]]) + hints.rank)
    # Without the history, the best scores win, seen or not.
    assert hints.choose(scores)[0].tolist() == [4, 2]
    # The choice carries no gradient; the rank embeddings learn.
    out.sum().backward()
    assert hints.rank.grad is not None and hints.table.grad is None


def test_title_table_rows_are_centred_mean_title_embeddings_without_the_year(tiny_llm):
    from transformers import AutoTokenizer

    from training.title_table import title_core, title_table
    from userenc.tokenize import Vocabulary

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    emb = torch.randn(len(tok), 8, generator=torch.Generator().manual_seed(0))
    items = Vocabulary(["a", "b", "c"])
    table = title_table(items, {"a": "comedy drama (1999)", "b": "kids"}, tok, emb)
    assert title_core("Matrix, The (1999)") == "Matrix, The" and title_core("(1999)") == "(1999)"
    a = emb[tok("comedy drama", add_special_tokens=False)["input_ids"]].mean(0)
    b = emb[tok("kids", add_special_tokens=False)["input_ids"]].mean(0)
    centre = (a + b) / 2
    assert torch.allclose(table[items.id("a")], a - centre)
    assert torch.allclose(table[items.id("b")], b - centre)
    assert not table[items.id("c")].any() and not table[:2].any()  # untitled, padding, OOV


def test_hints_reach_the_checkpoint_and_the_served_tokens(tmp_path, tiny_llm, tiny_encoder,
                                                          sample_histories):
    from training.adapter_checkpoint import load_adapter_encoder, save_adapter
    from training.adapter_data import collate, encode_examples
    from training.train_adapter import build_stage2
    from userenc.tokenize import left_pad_tensors

    histories = titled(sample_histories)
    acfg = AdapterConfig(arm="userllm", strategy="enc", tasks=["next_movie"], cross_every_n=2,
                         num_user_tokens=2, item_hints=3)
    s2 = build_stage2(tiny_llm, tiny_encoder, acfg, histories)
    enc = s2.model.encoder
    hidden = s2.model.llm.model.embed_tokens.weight.shape[1]
    assert enc.cfg.out_dim == hidden and s2.meta["encoder"]["item_hints"] == 3
    assert int((enc.hints.table.abs().sum(1) > 0).sum()) == len(s2.catalogue.titles)
    exs = train_examples(task_split(histories, 1).train, ["next_movie"], s2.catalogue, 1, [20], 0)
    items = encode_examples(exs[:5], "userllm", s2.tokenizer, s2.end_token, 512,
                            s2.enc_tokenizer)
    b = collate(items, s2.pad_token, s2.enc_tokenizer, s2.enc_max_len)
    with torch.no_grad():
        enc.hints.rank.normal_()  # trained-looking, so the round trip must carry it
        tokens, mask = s2.model.user_tokens(b.enc_ids, b.enc_valid)
    assert tokens.shape == (5, 2 + 3, hidden) and bool(mask.all())
    # Each hint is an item the history does not hold, the encoder's best such.
    vocab = s2.enc_tokenizer.vocabs["item"]
    for row, ex in enumerate(exs[:5]):
        seen = {vocab.id(e.item_id) for e in ex.history}
        hint_rows = tokens[row, 2:] - enc.hints.rank
        chosen = torch.cdist(hint_rows, enc.hints.table).argmin(1).tolist()  # the rows' items
        assert not seen & set(chosen)
        ids, valid = left_pad_tensors([s2.enc_tokenizer.encode(ex.history)],
                                      s2.enc_tokenizer.spec, s2.enc_max_len)
        with torch.no_grad():
            scores = enc.heads.item_scores(enc.states(ids, valid)[:, -1])
        scores[0, list(seen)] = float("-inf")
        assert chosen == scores[0].topk(3).indices.tolist()
    save_adapter(tmp_path / "adapter", s2.model, s2.meta, {"kind": "adapter"})
    served = load_adapter_encoder(tmp_path / "adapter")
    assert torch.equal(served.model.hints.table, enc.hints.table)
    for row, ex in enumerate(exs[:5]):
        assert torch.allclose(served.user_tokens([ex.history])[0], tokens[row], atol=1e-6)


def test_hints_belong_to_the_userllm_arm_only():
    with pytest.raises(ValueError, match="no encoder to give item hints"):
        AdapterConfig(arm="text", strategy="lora", item_hints=4)
    with pytest.raises(ValueError, match="item_hints"):
        AdapterConfig(arm="userllm", item_hints=-1)


def test_hinted_next_movie_examples_hold_their_answer_among_the_hints(tiny_llm, tiny_encoder,
                                                                      sample_histories):
    from training.hint_examples import hinted_training_examples
    from training.train_adapter import build_stage2
    from userenc.tokenize import left_pad_tensors

    histories = titled(sample_histories)
    tasks = ["next_movie", "genre_history"]
    acfg = AdapterConfig(arm="userllm", strategy="enc", tasks=tasks, cross_every_n=2,
                         num_user_tokens=2, item_hints=4)
    s2 = build_stage2(tiny_llm, tiny_encoder, acfg, histories)
    train = task_split(histories, 1).train
    exs = train_examples(train, tasks, s2.catalogue, 1, [20], 0)
    out, stats = hinted_training_examples(exs, train, s2.model.encoder, s2.enc_tokenizer,
                                          s2.catalogue, 1, [20], 0)
    assert [e for e in out if e.task != "next_movie"] == [e for e in exs if e.task != "next_movie"]
    kept = [e for e in out if e.task == "next_movie"]
    assert 0 < len(kept) == stats["next_movie_kept"] <= stats["next_movie_unfiltered"]
    assert stats["next_movie_in_hints"] < stats["next_movie_drawn"]  # some were left out
    enc, items = s2.model.encoder, s2.enc_tokenizer.vocabs["item"]
    for ex in kept:
        ids, valid = left_pad_tensors([s2.enc_tokenizer.encode(ex.history)],
                                      s2.enc_tokenizer.spec, s2.enc_max_len)
        with torch.no_grad():
            scores = enc.heads.item_scores(enc.states(ids, valid)[:, -1])[0]
        scores[[items.id(e.item_id) for e in ex.history]] = float("-inf")
        top = {s2.catalogue.titles[items.value(j)] for j in scores.topk(4).indices.tolist()}
        assert ex.target in top
        # A training cut: the answer is an event of the user's training part.
        assert any(e.fields["title"] == ex.target for e in train[ex.user])


def test_the_hint_reader_copies_at_the_residual_scale_and_starts_closed(tiny_llm, tiny_encoder,
                                                                        sample_histories):
    from llm.loader import load_model
    from training.adapter_data import collate, encode_examples
    from training.train_adapter import build_stage2

    histories = titled(sample_histories)
    acfg = AdapterConfig(arm="userllm", strategy="enc", tasks=["next_movie"], cross_every_n=2,
                         num_user_tokens=2, item_hints=3)
    s2 = build_stage2(tiny_llm, tiny_encoder, acfg, histories)
    blocks = s2.model.llm.model.cross_blocks
    last = blocks[str(max(int(i) for i in blocks))].cross_attn
    eye = torch.eye(last.v_proj.weight.shape[0])
    assert torch.equal(last.v_proj.weight, eye)
    scale = float(last.o_proj.weight[0, 0].detach())
    assert scale > 0 and torch.equal(last.o_proj.weight, scale * eye)
    # Gates at 0: the fresh adapter with real user tokens and hints is the base model.
    base, _, _ = load_model(tiny_llm)
    exs = train_examples(task_split(histories, 1).train, ["next_movie"], s2.catalogue, 1, [20], 0)
    items = encode_examples(exs[:4], "userllm", s2.tokenizer, s2.end_token, 512,
                            s2.enc_tokenizer)
    b = collate(items, s2.pad_token, s2.enc_tokenizer, s2.enc_max_len)
    with torch.no_grad():
        tokens, mask = s2.model.user_tokens(b.enc_ids, b.enc_valid)
        assert torch.equal(s2.model.llm(b.input_ids, user_tokens=tokens, user_mask=mask),
                           base(b.input_ids))


def test_exclude_seen_leaves_the_read_titles_out_of_the_next_movie_trie(tiny_llm,
                                                                       sample_histories):
    from transformers import AutoTokenizer

    from llm.engine.beam_search import TokenTrie
    from training.evaluate_adapter import _trie
    from training.prompts import answer_ids
    from training.tasks import Catalogue, held_out_examples

    histories = titled(sample_histories)
    cat = Catalogue.from_histories(histories.values())
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    end = tok.convert_tokens_to_ids("<end>")
    titles = {tuple(answer_ids(tok, t, end)[:-1]): t for t in cat.answers("next_movie")}
    tries = {"next_movie": (TokenTrie(list(titles), end), titles)}
    ex = held_out_examples(task_split(histories, 1), ["next_movie"], cat, 10)[0]

    def answers(trie: TokenTrie) -> set[str]:
        out, stack = set(), [((), trie.root)]
        while stack:
            seq, node = stack.pop()
            for t, child in node.items():
                if t == end:
                    out.add(titles[seq])
                else:
                    stack.append(((*seq, t), child))
        return out

    seen = {e.fields["title"] for e in ex.history}
    assert answers(_trie(ex, tries, False)) == set(titles.values())
    assert answers(_trie(ex, tries, True)) == set(titles.values()) - seen and seen
