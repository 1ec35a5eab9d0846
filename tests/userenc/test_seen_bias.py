"""The seen bias (EncoderConfig.seen_bias): a learned score on the items a history already holds.
Its sparse indices equal a dense mask, the training loss equals the dense computation, it learns
a negative bias where items never repeat and a positive one where they do, ranking applies it to
the history's items only (LoadedEncoder.next_item_scores too), and it survives a checkpoint
round trip; an encoder without it ranks as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.data import load_dataset, write_sample_data
from training.train_encoder import TrainConfig, train_encoder
from userenc.checkpoint import load_checkpoint
from userenc.config import EncoderConfig
from userenc.heads import last_seen_index, seen_index
from userenc.model import UserEncoder
from userenc.spec import FIRST_ID, OOV_ID
from userenc.tokenize import EventTokenizer, left_pad_tensors


def _dense_seen(items: torch.Tensor, valid: torch.Tensor, num_items: int) -> torch.Tensor:
    """[P, num_items] bool, by loops: row p (the p-th valid position, row-major) marks every real
    item at or before its position."""
    rows = []
    for b in range(items.shape[0]):
        for t in range(items.shape[1]):
            if valid[b, t]:
                row = torch.zeros(num_items, dtype=torch.bool)
                for s in range(t + 1):
                    if items[b, s] >= FIRST_ID:
                        row[items[b, s]] = True
                rows.append(row)
    return torch.stack(rows)


def test_seen_index_equals_a_dense_mask_with_repeats_and_padding():
    g = torch.Generator().manual_seed(0)
    items = torch.randint(FIRST_ID, 9, (4, 12), generator=g)  # few items: many repeats
    items[1, :5] = 0  # left padding
    items[2, :11] = 0
    valid = items >= FIRST_ID
    valid[0, 3] = False  # a position without a next event is not a row
    dense = _dense_seen(items, valid, 9)
    flat = torch.zeros(dense.numel(), dtype=torch.bool)
    idx = seen_index(items, valid, 9)
    assert len(idx) == len(torch.unique(idx)), "each (row, item) once, however often it repeats"
    flat[idx] = True
    assert torch.equal(flat.view_as(dense), dense)
    last = torch.zeros(4 * 9, dtype=torch.bool)
    last[last_seen_index(items, 9)] = True
    expected = torch.zeros(4, 9, dtype=torch.bool)
    for b in range(4):
        expected[b, items[b][items[b] >= FIRST_ID]] = True
    assert torch.equal(last.view(4, 9), expected)


def _model(ds, tokenizer, **overrides) -> UserEncoder:
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=24, out_dim=8, **overrides)
    cfg.vocab_sizes = {f.name: tokenizer.vocab_size(f) for f in ds.spec.features}
    return UserEncoder(ds.spec, cfg, tokenizer.item_attributes)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    data = write_sample_data(tmp_path_factory.mktemp("seen") / "events.jsonl", users=80, items=60, seed=3)
    ds = load_dataset(data, "jsonl", "movielens")
    tokenizer = EventTokenizer.fit(ds.spec, ds.histories.values())
    batch = [tokenizer.encode(h[-24:]) for h in list(ds.histories.values())[:32]]
    ids, valid = left_pad_tensors(batch, ds.spec, 24)
    return data, ds, tokenizer, ids, valid


def test_training_loss_equals_the_dense_computation(sample):
    _, ds, tokenizer, ids, valid = sample
    torch.manual_seed(0)
    model = _model(ds, tokenizer, seen_bias=True).train()
    with torch.no_grad():
        model.heads.seen_bias.fill_(-1.5)
    ids = dict(ids)
    item = ds.spec.item.name
    ids[item] = ids[item].clone()
    ids[item][0, 5:8] = OOV_ID  # OOV targets are ignored, as without the bias
    loss, parts = model.next_event_loss(ids, valid)
    states = model.states(ids, valid)
    pair_valid = valid[:, :-1] & valid[:, 1:]
    num_items = model.heads.candidates.item.num_embeddings
    logits = model.heads.item_logits(states[:, :-1][pair_valid])
    logits = logits - 1.5 * _dense_seen(ids[item][:, :-1], pair_valid, num_items)
    expected = F.cross_entropy(logits, ids[item][:, 1:][pair_valid], ignore_index=OOV_ID)
    assert parts[item] == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert model.heads.seen_bias.grad is not None and model.heads.seen_bias.grad != 0


@pytest.mark.parametrize("repeats", [False, True])
def test_bias_learns_the_sign_of_repeat_consumption(sample, repeats):
    """Item sequences rewritten: each row a random permutation (nothing repeats), or each next
    item one of the row's last four (everything repeats)."""
    _, ds, tokenizer, ids, valid = sample
    g = torch.Generator().manual_seed(1)
    num_items = tokenizer.vocab_size(ds.spec.item)
    rows = []
    for _ in range(valid.shape[0]):
        if not repeats:
            rows.append(torch.randperm(num_items - FIRST_ID, generator=g)[:24] + FIRST_ID)
            continue
        row = list((torch.randperm(num_items - FIRST_ID, generator=g)[:4] + FIRST_ID).tolist())
        while len(row) < 24:
            row.append(row[-1 - int(torch.randint(0, 4, (1,), generator=g))])
        rows.append(torch.tensor(row))
    ids = dict(ids) | {ds.spec.item.name: torch.where(valid, torch.stack(rows), 0)}
    torch.manual_seed(0)
    model = _model(ds, tokenizer, seen_bias=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(30):
        loss, _ = model.training_loss(ids, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bias = float(model.heads.seen_bias.detach())
    assert (bias > 0.3) if repeats else (bias < -0.3), bias


def test_ranking_applies_the_bias_to_history_items_only_and_round_trips(sample, tmp_path):
    data, ds, _, _, _ = sample
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, max_len=24, out_dim=8, seen_bias=True)
    train_encoder(ds.histories, ds.spec, cfg, TrainConfig(epochs=2, batch_size=16), tmp_path / "run", progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    model = loaded.model.eval()
    bias = float(model.heads.seen_bias.detach())
    assert loaded.model.cfg.seen_bias and bias != 0.0
    histories = [ds.histories[u] for u in sorted(ds.histories)[:6]]
    ids, valid = loaded.batch(histories)
    with_bias = model.next_item_scores(ids, valid)
    with torch.inference_mode():
        plain = model.heads.item_scores(model.states(ids, valid, last_only=True)[:, -1])
    item_vocab = loaded.tokenizer.vocabs[ds.spec.item.name]
    for row, h in enumerate(histories):
        seen = sorted({item_vocab.id(e.item_id) for e in h[-24:]} - {OOV_ID})
        diff = (with_bias[row] - plain[row])[FIRST_ID:]
        expected = np.zeros(len(diff), dtype=np.float32)
        expected[np.array(seen) - FIRST_ID] = bias
        np.testing.assert_allclose(diff.numpy(), expected, atol=1e-5)
    reloaded = load_checkpoint(tmp_path / "run").model.eval()
    assert torch.equal(reloaded.next_item_scores(ids, valid), with_bias)
    # What the item prior and the benchmark's encoder-alone row rank by: the same, from events.
    assert torch.allclose(loaded.next_item_scores(histories), with_bias)


def test_seen_bias_needs_the_full_softmax():
    with pytest.raises(ValueError, match="seen_bias needs the full-softmax"):
        EncoderConfig(seen_bias=True, item_loss="sampled")


def test_an_encoder_without_the_bias_ranks_by_its_head_alone(sample, tmp_path):
    data, ds, _, _, _ = sample
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, max_len=24, out_dim=8)
    train_encoder(ds.histories, ds.spec, cfg, TrainConfig(epochs=1, batch_size=16), tmp_path / "run", progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    histories = [ds.histories[u] for u in sorted(ds.histories)[:4]]
    assert torch.equal(loaded.next_item_scores(histories), loaded.item_scores(loaded.last_states(histories)))
    with pytest.raises(ValueError, match="empty history"):
        loaded.next_item_scores([histories[0], []])
