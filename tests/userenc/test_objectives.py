"""Training objectives (userenc/objectives.py): the future-window labels never include an event
of the input, each objective lowers its own loss on generated data with planted structure, and
checkpoints trained with them load and embed/evaluate as before; a checkpoint saved before the
objective fields existed (no weights in config.json, no item counts) still loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.data import load_dataset, write_sample_data
from training.evaluate import evaluate, model_scorer
from training.split import leave_one_out, windows
from training.train_encoder import TrainConfig, train_encoder
from userenc.checkpoint import load_checkpoint
from userenc.config import EncoderConfig
from userenc.model import UserEncoder
from userenc.objectives import future_window
from userenc.tokenize import EventTokenizer, left_pad_tensors
from userenc_helpers import run_cli


def test_future_window_labels_are_strictly_after_the_position():
    # Ids equal to the position + 2, two left-padded rows: a label's id tells its position.
    T, W = 9, 4
    x = torch.arange(T)[None].repeat(2, 1) + 2
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :3] = False
    x[1, :3] = 0
    labels, mask = future_window(x, valid, W)
    assert labels.shape == (2, T, W) and mask.shape == (2, T, W)
    for b in range(2):
        for t in range(T):
            for j in range(W):
                if mask[b, t, j]:
                    # Event t + 1 + j exactly: never position t itself nor anything before it.
                    assert labels[b, t, j] == t + 1 + j + 2 and labels[b, t, j] > x[b, t]
                else:
                    assert not valid[b, t] or t + 1 + j >= T
    assert not mask[1, :3].any(), "padding positions have no labels"
    assert mask[0, T - 1].sum() == 0 and mask[0, T - 2].sum() == 1 and mask[0, 0].sum() == W
    # Multi-valued features window the same way.
    multi, mmask = future_window(torch.stack([x, x], dim=-1), valid, W)
    assert torch.equal(multi[..., 0], labels) and torch.equal(mmask, mask)


def _batch(ds, tokenizer, max_len=32, n=48):
    split = leave_one_out(ds.histories)
    items = [w for u in sorted(split.train) for w in windows(tokenizer.encode(split.train[u]), max_len)][:n]
    return left_pad_tensors(items, ds.spec, max_len)


@pytest.mark.parametrize("weights,part", [
    (dict(next_event_weight=1.0), "item"),
    (dict(next_event_weight=0.0, all_action_weight=1.0), "all_action"),
    (dict(next_event_weight=0.0, future_genre_weight=1.0), "future_genres"),
])
def test_each_objective_lowers_its_loss_on_planted_structure(tmp_path, weights, part):
    torch.manual_seed(0)
    data = write_sample_data(tmp_path / "events.jsonl", users=120, items=80, seed=2)
    ds = load_dataset(data, "jsonl", "movielens")
    tokenizer = EventTokenizer.fit(ds.spec, leave_one_out(ds.histories).train.values())
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=2, dropout=0.0, max_len=32, out_dim=16,
                        future_window=5, num_negatives=32, **weights)
    cfg.vocab_sizes = {f.name: tokenizer.vocab_size(f) for f in ds.spec.features}
    model = UserEncoder(ds.spec, cfg, tokenizer.item_attributes).train()
    ids, valid = _batch(ds, tokenizer)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(40):
        loss, parts = model.training_loss(ids, valid)
        assert part in parts and torch.isfinite(loss)
        first = parts[part] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts[part] < 0.8 * first, (part, first, parts[part])


def test_default_mix_is_exactly_the_next_event_loss(spec, sample_tokenizer, sample_histories):
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8)
    cfg.vocab_sizes = {f.name: sample_tokenizer.vocab_size(f) for f in spec.features}
    model = UserEncoder(spec, cfg, sample_tokenizer.item_attributes)
    assert model.future_genres is None
    batch = [sample_tokenizer.encode(h[:16]) for h in list(sample_histories.values())[:5]]
    ids, valid = left_pad_tensors(batch, spec, 16)
    mixed, parts = model.training_loss(ids, valid)
    plain, plain_parts = model.next_event_loss(ids, valid)
    assert torch.equal(mixed, plain) and parts == plain_parts


def test_future_genre_objective_needs_a_multi_valued_feature(spec):
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, future_genre_weight=1.0, future_genre_feature="rating",
                        vocab_sizes={f.name: 9 for f in spec.features} | {"item": 30, "hour": 26})
    with pytest.raises(ValueError, match="multi_categorical feature 'rating'"):
        UserEncoder(spec, cfg)
    with pytest.raises(ValueError, match="objective weights"):
        EncoderConfig(next_event_weight=0.0)


def test_mixed_objective_checkpoint_embeds_evaluates_and_old_checkpoints_load(tmp_path):
    data = write_sample_data(tmp_path / "events.jsonl", users=60, items=50, seed=4)
    ds = load_dataset(data, "jsonl", "movielens")
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, max_len=32, out_dim=8, all_action_weight=1.0,
                        future_genre_weight=0.5, future_window=4)
    train_encoder(ds.histories, ds.spec, cfg, TrainConfig(epochs=1, batch_size=16), tmp_path / "run", progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.model.cfg.all_action_weight == 1.0 and loaded.model.future_genres is not None
    histories = [ds.histories[u] for u in sorted(ds.histories)[:5]]
    assert loaded.embed(histories).shape == (5, 8)
    split = leave_one_out(ds.histories)
    assert evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)["all"]["users"] == 60
    # ... and through the CLI's embed and eval-encoder as they are.
    for command, extra in (("eval-encoder", ["--split", "test"]), ("embed", ["--out", str(tmp_path / "emb.npz")])):
        r = run_cli(tmp_path, command, "--data", str(data), "--format", "jsonl", "--checkpoint", str(tmp_path / "run"), "--threads", "1", *extra)
        assert r.returncode == 0, r.stderr

    # A next-event checkpoint as written before the objective fields and item counts existed.
    old = tmp_path / "old"
    train_encoder(ds.histories, ds.spec, EncoderConfig(d_model=16, n_layers=1, n_heads=2, max_len=32, out_dim=8),
                  TrainConfig(epochs=1, batch_size=16), old, progress=False)
    before = load_checkpoint(old).embed(histories)
    config = json.loads((old / "config.json").read_text())
    for key in ("next_event_weight", "all_action_weight", "future_genre_weight", "future_window", "future_genre_feature"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))
    (old / "vocab" / "item_counts.json").unlink()
    reloaded = load_checkpoint(old)
    assert reloaded.model.cfg.next_event_weight == 1.0 and reloaded.tokenizer.item_counts is None
    np.testing.assert_array_equal(reloaded.embed(histories), before)
