"""The encoder's next-item head as a prior over next-movie answers (training/item_prior.py):
a title's prior is the head's probability summed over the items carrying it, and with a large
weight the evaluator's beam search returns the titles in the head's order."""
from __future__ import annotations

import pytest
import torch

from adapter_helpers import titled
from training.tasks import Catalogue, held_out_examples, task_split

pytestmark = pytest.mark.xdist_group("adapter")


def _prior(tiny_encoder, titles):
    from training.item_prior import ItemPrior
    from userenc.checkpoint import load_checkpoint

    return ItemPrior.build(load_checkpoint(tiny_encoder), titles)


def test_a_titles_prior_sums_the_head_over_its_items(tiny_encoder, sample_histories):
    histories = titled(sample_histories)
    cat = Catalogue.from_histories(histories.values())
    items = sorted(cat.titles)
    # Two items share a title, as remakes and re-releases do in a real catalogue.
    titles = dict(cat.titles) | {items[1]: cat.titles[items[0]]}
    prior = _prior(tiny_encoder, titles)
    users = sorted(histories)[:3]
    rows = prior.log_priors([histories[u] for u in users])
    assert rows.shape == (3, len(set(titles.values())))
    enc = prior.encoder
    vocab = enc.tokenizer.vocabs[enc.tokenizer.spec.item.name]
    probs = torch.softmax(enc.item_scores(enc.last_states([histories[u] for u in users])), -1)
    shared = prior.column[cat.titles[items[0]]]
    expected = probs[:, vocab.id(items[0])] + probs[:, vocab.id(items[1])]
    assert torch.allclose(rows[:, shared].exp(), expected, rtol=1e-5)
    # Every titled item is in the vocabulary here, so the titles share the head's whole mass
    # but for the padding / OOV rows (-inf scores).
    assert torch.allclose(rows.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_a_heavy_prior_makes_the_heads_order_the_answer_order(tiny_llm, tiny_encoder,
                                                              sample_histories):
    from llm.engine.engine import Engine
    from training.evaluate_adapter import Arm, evaluate_closed

    histories = titled(sample_histories)
    cat = Catalogue.from_histories(histories.values())
    exs = held_out_examples(task_split(histories, 1), ["next_movie"], cat, 10)[:3]
    prior = _prior(tiny_encoder, cat.titles)
    rows = prior.log_priors([ex.history for ex in exs])
    engine = Engine.from_pretrained(tiny_llm, kv_cache_bytes=8 << 20)
    try:
        plain = evaluate_closed(Arm("plain", "none", engine), exs, cat)["next_movie"]
        heavy = evaluate_closed(Arm("heavy", "none", engine, prior=prior, prior_weight=1e4),
                                exs, cat)["next_movie"]
    finally:
        engine.close()
    assert heavy["predictions"] == [prior.titles[int(r.argmax())] for r in rows]
    assert heavy["predictions"] != plain["predictions"]
    for ex, rank, row in zip(exs, heavy["ranks"], rows):
        # The answer's rank is the head's rank of its title (within the beam of 10).
        head_rank = int((row > row[prior.column[ex.target]]).sum()) + 1
        assert rank == (head_rank if head_rank <= 10 else None)


def test_a_prior_needs_a_userllm_adapter(tiny_llm):
    from training.evaluate_adapter import load_arm

    with pytest.raises(ValueError, match="USER-LLM adapter"):
        load_arm("x", tiny_llm, None, prior_weight=1.0, titles={"1": "a"})
