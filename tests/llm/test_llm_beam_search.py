"""Trie-constrained beam search on the paged path: with a beam as wide as the answer set it is
exhaustive, so its ranking and scores must equal the dense model's exact sequence log-probs;
prompts sharing a prefix (and user tokens) give what they give alone; teacher-forced paged
logits equal the dense ones; Engine.beam_search leaves the engine's own pool as it was."""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import make_tiny_llama
from llm.engine.beam_search import BeamSearch, TokenTrie
from llm.loader import load_model

END = 1


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("beam") / "llm", layers=4)


def _model(folder, integration: str):
    model, _, _ = load_model(folder, cross_every_n=2 if integration == "cross" else 0,
                             user_dim=8, integration=integration)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_attn", "gate_mlp")):
                p.fill_(0.7)  # open gates: the user tokens matter
    return model


def _exact(model, prompt, answer, user):
    ids = torch.tensor([prompt + answer + [END]])
    with torch.no_grad():
        h = model(ids, user_tokens=None if user is None else user[None])
        lp = torch.log_softmax(model.compute_logits(h)[0].float(), -1)
    return sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer + [END]))


@pytest.mark.parametrize("integration", ["cross", "soft_prompt"])
def test_exhaustive_beam_equals_exact_ranking(tiny_folder, integration):
    model = _model(tiny_folder, integration)
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(3, 300, (int(torch.randint(1, 5, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(7)]
    trie = TokenTrie(answers, end_token=END)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 16, 23)]
    users = [torch.randn(3, 8, generator=g), None, torch.randn(2, 8, generator=g)]
    searcher = BeamSearch(model, block_size=4)
    for prompt, user, ranked in zip(prompts, users, searcher.run(prompts, trie, 7, users)):
        exact = sorted(((a, _exact(model, prompt, a, user)) for a in answers), key=lambda x: -x[1])
        assert [a for a, _ in ranked] == [a for a, _ in exact]
        assert max(abs(x[1] - y[1]) for x, y in zip(ranked, exact)) < 1e-4
        forced = searcher.forced_logits(prompt, answers[0], user)
        with torch.no_grad():
            h = model(torch.tensor([prompt + answers[0]]),
                      user_tokens=None if user is None else user[None])
            dense = model.compute_logits(h)[0, len(prompt) - 1:].float()
        assert (forced - dense).abs().max() < 1e-4
    narrow = searcher.run(prompts, trie, 2, users)
    assert all(len(r) == 2 and all(a in answers for a, _ in r) for r in narrow)


@pytest.mark.parametrize("integration", ["cross", "soft_prompt"])
def test_shared_prefixes_give_what_each_prompt_gives_alone(tiny_folder, integration, monkeypatch):
    model = _model(tiny_folder, integration)
    g = torch.Generator().manual_seed(1)
    answers = [torch.randint(3, 300, (3,), generator=g).tolist() for _ in range(5)]
    tries = [TokenTrie(answers, END), TokenTrie(answers[:2], END)]
    shared = torch.randint(3, 300, (21,), generator=g).tolist()
    u, other = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    prompts = [shared + [5, 6], shared + [7], shared[:9] + [8, 9], shared + [5, 6, 11, 12],
               shared + [5]]
    users = [u, u, u, None, other]  # the last two share tokens but not the user: no sharing
    picked = [tries[0], tries[1], tries[0], tries[0], tries[1]]
    searcher = BeamSearch(model, block_size=4)
    sizes = []
    real_pool = searcher._pool
    monkeypatch.setattr(searcher, "_pool", lambda n, c: sizes.append(n) or real_pool(n, c))
    together = searcher.run(prompts, picked, 3, users)
    alone = [searcher.run([p], [t], 3, [x])[0] for p, t, x in zip(prompts, picked, users)]
    for a, b in zip(together, alone):
        assert [x for x, _ in a] == [x for x, _ in b]
        assert max(abs(x[1] - y[1]) for x, y in zip(a, b)) < 1e-4
    # Prompts 1 and 2 reuse 5 and 2 of prompt 0's blocks (4 tokens each; 6 and 3 with the soft
    # prompt's 3 placeholder tokens in front); 3 and 4 reuse none.
    assert sizes[0] == sum(sizes[1:]) - (7 if integration == "cross" else 9)


def test_engine_beam_search_keeps_the_engine_pool(tiny_folder):
    from llm.engine.engine import Engine
    from llm.engine.sampling_params import SamplingParams

    engine = Engine.from_pretrained(tiny_folder, kv_cache_bytes=1 << 20)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=5)
        before = engine.generate([[5, 6, 7, 8]], sp)[0].token_ids
        pools = [(m.k_cache.data_ptr(), m.v_cache.data_ptr())
                 for m in engine.model.attention_modules()]
        ranked = engine.beam_search([[5, 6, 7, 8]], TokenTrie([[9, 10], [11]], END), 2)
        assert len(ranked[0]) == 2
        assert pools == [(m.k_cache.data_ptr(), m.v_cache.data_ptr())
                         for m in engine.model.attention_modules()]
        assert engine.generate([[5, 6, 7, 8]], sp)[0].token_ids == before
        with pytest.raises(ValueError, match="tries must match"):
            engine.beam_search([[5, 6]], [TokenTrie([[9]], END)] * 2)
    finally:
        engine.close()


def test_prior_adds_its_weighted_log_prob_to_every_answer(tiny_folder):
    """With priors, an exhaustive beam ranks by model log-prob + w * (prior(answer) - the best
    prior); answers share prefixes, so the per-step additions must telescope through shared
    nodes."""
    model = _model(tiny_folder, "cross")
    g = torch.Generator().manual_seed(2)
    answers = [[7, 8], [7, 9, 4], [7, 9], [12], [12, 8, 8], [30, 31]]
    raw = torch.randn(len(answers), generator=g).mul(3).tolist()
    log_norm = max(raw)
    prompt = torch.randint(3, 300, (9,), generator=g).tolist()
    user = torch.randn(3, 8, generator=g)
    searcher = BeamSearch(model, block_size=4)
    for w in (0.0, 0.5, 3.0):
        trie = TokenTrie(answers, END, raw, prior_weight=w)
        ranked = searcher.run([prompt], trie, len(answers), [user])[0]
        exact = sorted(((a, _exact(model, prompt, a, user) + w * (p - log_norm))
                        for a, p in zip(answers, raw)), key=lambda x: -x[1])
        assert [a for a, _ in ranked] == [a for a, _ in exact]
        assert max(abs(x[1] - y[1]) for x, y in zip(ranked, exact)) < 1e-4
    # A weight large enough makes the prior's order the answer order, even with a beam
    # narrower than the answers: a prefix is scored by the best answer below it. Here the
    # prefix 7 holds three middling answers whose total beats the best answer's.
    raw = [-1.0, -1.1, -1.2, -3.0, -0.9, -5.0]
    for width in (1, 2, 3):
        ranked = searcher.run([prompt], TokenTrie(answers, END, raw, prior_weight=1e4), width,
                              [user])[0]
        assert [a for a, _ in ranked] == [answers[i] for i in sorted(
            range(len(raw)), key=lambda i: -raw[i])[:width]]


@pytest.mark.parametrize("priors, weight, match", [
    ([0.0], 1.0, "one value per sequence"),
    ([0.0, float("nan")], 1.0, "finite"),
    ([0.0, float("-inf")], 1.0, "finite"),
    ([0.0, 1.0], -1.0, "prior_weight"),
])
def test_bad_priors_are_refused(priors, weight, match):
    with pytest.raises(ValueError, match=match):
        TokenTrie([[3], [4, 5]], END, priors, prior_weight=weight)
