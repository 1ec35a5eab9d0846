"""HSTU-style relative time bias in the encoder's attention (EncoderConfig.time_bias_buckets):
the buckets, causality and padding invariance with it, a zero bias equal to the plain model,
checkpoints, and training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import load_dataset, write_sample_data
from training.train_encoder import TrainConfig, train_encoder
from userenc.checkpoint import load_checkpoint, save_checkpoint
from userenc.config import EncoderConfig
from userenc.layers import time_buckets
from userenc.model import UserEncoder
from userenc.tokenize import TIME_KEY, left_pad
from userenc_helpers import make_model, tiny_config, vocab_sizes_of

DAY = 86_400


def _tensors(encoded, spec, max_len=16):
    ids, valid = left_pad(encoded, spec, max_len)
    return {k: torch.from_numpy(v) for k, v in ids.items()}, torch.from_numpy(valid)


def test_buckets_are_log2_of_the_seconds_between_events():
    times = torch.tensor([[0, 60, DAY, DAY + 365 * DAY]])
    b = time_buckets(times, 32)
    assert b.shape == (1, 4, 4)
    assert b[0, :, 0].tolist() == [0, 5, 16, 24]  # the same second, a minute, a day, a year later
    assert torch.equal(b, b.transpose(1, 2))
    assert time_buckets(times, 8)[0, 3, 0].item() == 7  # capped at the last bucket


def test_encoded_histories_carry_their_times(sample_tokenizer, sample_histories):
    h = next(iter(sample_histories.values()))
    enc = sample_tokenizer.encode(h)
    assert enc[TIME_KEY].tolist() == [e.timestamp for e in h]
    ids, valid = left_pad([enc, sample_tokenizer.encode(h[:3])], sample_tokenizer.spec, 16)
    assert ids[TIME_KEY].shape == valid.shape
    assert ids[TIME_KEY][1, -3:].tolist() == [e.timestamp for e in h[:3]]


def test_time_bias_keeps_causality_padding_and_the_last_state(spec, sample_tokenizer, sample_histories):
    tok = sample_tokenizer
    model = make_model(spec, vocab_sizes_of(tok), item_attributes=tok.item_attributes, n_layers=2,
                       time_bias_buckets=32)
    assert model.encoder.time_bias[0].weight.abs().max() > 0  # make_model perturbs every weight
    hs = list(sample_histories.values())
    encoded = [tok.encode(h[:n]) for h, n in zip(hs, (3, 9, 16, 25))]  # 25: left-truncated
    ids, valid = _tensors(encoded, spec)
    states = model.states(ids, valid)
    torch.testing.assert_close(model.states(ids, valid, last_only=True), states[:, -1:], atol=1e-5, rtol=1e-5)
    for b, enc in enumerate(encoded):
        one, one_valid = _tensors([enc], spec)
        torch.testing.assert_close(states[b][valid[b]], model.states(one, one_valid)[0], atol=1e-5, rtol=1e-5)
    # Moving the last event in time never changes an earlier state; moving the first one changes
    # the later states (through the bias only: hour and weekday keep their ids).
    one, one_valid = _tensors([encoded[2]], spec)
    base = model.states(one, one_valid)
    later = {k: v.clone() for k, v in one.items()}
    later[TIME_KEY][0, -1] += 30 * DAY
    torch.testing.assert_close(model.states(later, one_valid)[0, :-1], base[0, :-1], atol=1e-6, rtol=0)
    earlier = {k: v.clone() for k, v in one.items()}
    earlier[TIME_KEY][0, 0] -= 700 * DAY
    moved = model.states(earlier, one_valid)
    torch.testing.assert_close(moved[0, 0], base[0, 0], atol=1e-6, rtol=0)  # alone, no gap to see
    assert (moved[0, -1] - base[0, -1]).abs().max() > 1e-4
    with pytest.raises(AssertionError, match="needs the events' times"):
        model.states({k: v for k, v in one.items() if k != TIME_KEY}, one_valid)


def test_a_new_time_bias_is_zero_and_equals_the_model_without_it(spec, sample_tokenizer, sample_histories):
    tok = sample_tokenizer
    torch.manual_seed(0)
    biased = UserEncoder(spec, tiny_config(spec, vocab_sizes_of(tok), time_bias_buckets=16), tok.item_attributes).eval()
    plain = UserEncoder(spec, tiny_config(spec, vocab_sizes_of(tok)), tok.item_attributes).eval()
    missing, unexpected = plain.load_state_dict(biased.state_dict(), strict=False)
    assert not missing and all("time_bias" in k for k in unexpected) and unexpected
    ids, valid = _tensors([tok.encode(h) for h in list(sample_histories.values())[:5]], spec)
    torch.testing.assert_close(biased.states(ids, valid), plain.states(ids, valid), atol=1e-6, rtol=0)


def test_time_bias_checkpoint_roundtrip_and_config_rules(spec, sample_tokenizer, sample_histories, tmp_path):
    tok = sample_tokenizer
    model = make_model(spec, vocab_sizes_of(tok), item_attributes=tok.item_attributes, time_bias_buckets=32)
    folder = save_checkpoint(tmp_path / "ckpt", model, tok, {})
    loaded = load_checkpoint(folder)
    assert loaded.model.cfg.time_bias_buckets == 32
    histories = list(sample_histories.values())[:6]
    before = np.concatenate([model.user_embedding(*_tensors([tok.encode(h)], spec)).numpy() for h in histories])
    np.testing.assert_allclose(loaded.embed(histories, batch_size=4), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs early fusion"):
        EncoderConfig(fusion="late", time_bias_buckets=8)
    with pytest.raises(ValueError, match="time_bias_buckets"):
        EncoderConfig(time_bias_buckets=-1)
    assert EncoderConfig.from_dict({"d_model": 32}).time_bias_buckets == 0  # configs saved before it


def test_training_with_a_time_bias_lowers_the_loss_and_learns_the_bias(tmp_path):
    data = write_sample_data(tmp_path / "events.jsonl", users=100, items=80, events_per_user=(10, 25), seed=3)
    ds = load_dataset(data, "jsonl", "movielens")
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8, time_bias_buckets=24)
    result = train_encoder(ds.histories, ds.spec, cfg, TrainConfig(epochs=4, batch_size=16, lr=5e-3, patience=100, seed=1),
                           tmp_path / "run", progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0], losses
    assert result.model.encoder.time_bias[0].weight.abs().max() > 1e-3  # it trained


def test_bucket_bias_gradient_equals_the_embedding_gradient():
    from userenc.layers import BucketBias

    g = torch.Generator().manual_seed(3)
    buckets = torch.randint(0, 12, (3, 7, 7), generator=g)
    weight = torch.randn(12, 2, generator=g, requires_grad=True)
    upstream = torch.randn(3, 7, 7, 2, generator=g)
    (BucketBias.apply(weight, buckets) * upstream).sum().backward()
    ours, weight.grad = weight.grad.clone(), None
    (torch.nn.functional.embedding(buckets, weight) * upstream).sum().backward()
    torch.testing.assert_close(ours, weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(BucketBias.apply(weight, buckets), weight[buckets])
