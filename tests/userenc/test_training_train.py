"""Training jobs on generated data with planted structure: the loss falls and the encoder beats
popularity on full ranking; seeded runs are identical; an interrupted run resumed equals a
straight one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.data import load_dataset, write_sample_data
from training.evaluate import evaluate, model_scorer, popularity_scorer
from training.split import crop_starts, leave_one_out, windows
from training.train_encoder import native_bf16, planned_epochs, steady_epoch_seconds
from training.train_encoder import TrainConfig, lr_lambda, train_encoder
from userenc.checkpoint import load_checkpoint
from userenc.config import EncoderConfig
from userenc_helpers import assert_equal_state


def test_tiny_training_lowers_loss_and_beats_popularity(tmp_path):
    data = write_sample_data(tmp_path / "events.jsonl", users=300, seed=0)
    ds = load_dataset(data, "jsonl", "movielens")
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=2, dropout=0.1, max_len=64, out_dim=16)
    result = train_encoder(ds.histories, ds.spec, cfg, TrainConfig(epochs=15, batch_size=16, lr=5e-3, patience=100), tmp_path / "run", progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 15 and losses[-1] < 0.9 * losses[0], losses
    best = next(row["valid"] for row in result.history if row["epoch"] == result.best_epoch)
    assert result.best_valid == best and best["ndcg@10"] == max(row["valid"]["ndcg@10"] for row in result.history)

    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.manifest["epoch"] == result.best_epoch and loaded.manifest["users"] == 300
    split = leave_one_out(ds.histories)
    model = evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)
    popular = evaluate(popularity_scorer(loaded.tokenizer, split.train), loaded.tokenizer, split.test)
    hr, hr_pop = model["all"]["hr@10"], popular["all"]["hr@10"]
    # The lead's run: 0.39 vs 0.06; here typically ~0.55 vs ~0.05.
    assert hr >= 0.3 and hr >= 4 * hr_pop, (model["all"], popular["all"])
    assert model["all"]["ndcg@10"] > 3 * popular["all"]["ndcg@10"]
    assert model["all"]["users"] == popular["all"]["users"] == 300


def _small(tmp_path):
    data = write_sample_data(tmp_path / "events.jsonl", users=100, items=80, events_per_user=(10, 25), seed=3)
    return load_dataset(data, "jsonl", "movielens")


def _cfg() -> EncoderConfig:
    # Dropout and uniform negatives both draw from the torch RNG: resume must restore it.
    return EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.1, max_len=16, out_dim=8, item_loss="sampled", negatives="uniform", num_negatives=32)


def _tcfg(**overrides) -> TrainConfig:
    return TrainConfig(**({"epochs": 4, "batch_size": 16, "lr": 5e-3, "patience": 100, "seed": 7} | overrides))


def test_same_seed_gives_identical_weights(tmp_path):
    ds = _small(tmp_path)
    a = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=2), tmp_path / "a", progress=False)
    b = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=2), tmp_path / "b", progress=False)
    c = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=2, seed=8), tmp_path / "c", progress=False)
    wa, wb, wc = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a.last", "b.last", "c.last"))
    assert_equal_state(wa, wb)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) > 1e-3, "another seed must train differently"
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


@pytest.mark.parametrize("crop_prob", [0.0, 0.5])
def test_interrupted_run_resumed_equals_straight_run(tmp_path, crop_prob):
    """A 4-epoch run stopped after epoch 1 and again after epoch 2 (the time budget, crossed at
    once, stops it after the current epoch, as a crash would), then resumed to the end, gives
    exactly the weights, best checkpoint and loss history of the run that was never stopped
    (with crop augmentation too: each epoch's crops come from the seed and the epoch alone)."""
    ds = _small(tmp_path)
    straight = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(crop_prob=crop_prob), tmp_path / "straight", progress=False)
    first = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(max_minutes=1e-9, crop_prob=crop_prob), tmp_path / "resumed", progress=False)
    assert [r["epoch"] for r in first.history] == [1]
    second = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(max_minutes=1e-9, crop_prob=crop_prob), tmp_path / "resumed", resume=True, progress=False)
    assert [r["epoch"] for r in second.history] == [1, 2]
    assert json.loads((tmp_path / "resumed.last" / "state.json").read_text())["epoch"] == 2
    final = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(crop_prob=crop_prob), tmp_path / "resumed", resume=True, progress=False)
    assert [r["epoch"] for r in final.history] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in final.history] == [r["train_loss"] for r in straight.history]
    assert final.best_epoch == straight.best_epoch
    for name in ("", ".last"):
        assert_equal_state(load_file(str(tmp_path / f"straight{name}" / "model.safetensors")), load_file(str(tmp_path / f"resumed{name}" / "model.safetensors")))
    opt_a = load_file(str(tmp_path / "straight.last" / "training_state.safetensors"))
    opt_b = load_file(str(tmp_path / "resumed.last" / "training_state.safetensors"))
    assert_equal_state(opt_a, opt_b)


def test_resume_starts_an_unsaved_run_and_extends_a_finished_one(tmp_path):
    ds = _small(tmp_path)
    # A run killed before its first epoch ended saved nothing: resuming it starts it.
    fresh = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=1), tmp_path / "x", resume=True, progress=False)
    assert [r["epoch"] for r in fresh.history] == [1]
    short = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=1), tmp_path / "run", progress=False)
    longer = train_encoder(ds.histories, ds.spec, _cfg(), _tcfg(epochs=2), tmp_path / "run", resume=True, progress=False)
    # Epoch 1 is kept as it was; training continues with epoch 2 only.
    assert [r["epoch"] for r in longer.history] == [1, 2] and longer.history[0] == short.history[0]


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_windows_cover_every_next_event_pair_once():
    encoded = {"item": np.arange(23)}
    for max_len in (4, 10, 23, 64):
        pairs = [(int(w["item"][i]), int(w["item"][i + 1])) for w in windows(encoded, max_len) for i in range(len(w["item"]) - 1)]
        assert sorted(pairs) == [(i, i + 1) for i in range(22)], max_len
        assert all(len(w["item"]) <= max_len for w in windows(encoded, max_len))
    assert windows({"item": np.arange(1)}, 8) == []


def test_crop_starts_are_seeded_and_keep_at_least_two_events():
    lengths = [2, 3, 7, 40, 40, 40, 40, 40]
    rng = np.random.default_rng(0)
    assert not crop_starts(lengths, 0.0, rng).any()
    assert rng.random() == np.random.default_rng(0).random(), "no crop draws nothing"
    starts = crop_starts(lengths, 0.9, np.random.default_rng([1, 2]))
    assert len(starts) == len(lengths)
    for n, start in zip(lengths, starts):
        assert 0 <= start and n - start >= 2  # a suffix of >= 2 events: one next-event pair
    assert starts[0] == 0  # two events: nothing to cut
    assert (starts > 0).sum() >= 4
    assert (crop_starts(lengths, 0.9, np.random.default_rng([1, 2])) == starts).all()
    with pytest.raises(AssertionError):
        crop_starts(lengths, 1.0, np.random.default_rng(0))


def test_training_runs_with_a_resampler_and_late_fusion(tmp_path):
    ds = _small(tmp_path)
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8, fusion="late", positions="learned", num_user_tokens=4)
    result = train_encoder(ds.histories, ds.spec, cfg, _tcfg(epochs=2), tmp_path / "run", progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.model.cfg.num_user_tokens == 4 and loaded.embed(list(ds.histories.values())[:3]).shape == (3, 8)


def test_time_budget_plan_is_refit_at_the_steady_pace():
    """A 14-minute budget: epoch 1 (26 s with start-up costs) plans 32 epochs; after epoch 2
    (18 s) the plan grows to what the remaining time fits at that pace. Never fewer epochs than
    done, never more than the configured maximum."""
    assert planned_epochs(1, 26.0, 26.0, 14, 200) == 32
    assert planned_epochs(2, 44.0, 18.0, 14, 200) == 2 + int((840 - 44) / 18)
    assert planned_epochs(2, 44.0, 18.0, 14, 20) == 20
    assert planned_epochs(2, 900.0, 18.0, 14, 200) == 2  # already over the budget


def test_budget_pace_is_the_mean_of_the_epochs_after_the_first():
    """The pace is refitted after every epoch from all epochs but the first, so a slow second
    epoch does not fix the plan: the 14-minute d_model-64 screen paced 46 s after epoch 2, then
    ran 35-40 s epochs and stopped with 105 s unused."""
    assert steady_epoch_seconds([]) == 0.0
    assert steady_epoch_seconds([{"seconds": 26.0}]) == 26.0
    history = [{"seconds": s} for s in (46.0, 92.0, 132.0, 170.0, 209.0)]
    assert steady_epoch_seconds(history[:2]) == 46.0
    assert steady_epoch_seconds(history) == (209.0 - 46.0) / 4
    assert planned_epochs(5, 209.0, steady_epoch_seconds(history), 14, 200) == 5 + int((840 - 209) / 40.75)


def test_training_refits_its_budget_plan_every_epoch(tmp_path):
    """A budgeted run keeps, after each epoch, the plan the remaining time fits at the steady
    pace of its own epochs so far, and stops where that plan (or the budget) ends."""
    ds = _small(tmp_path)
    tcfg = _tcfg(epochs=400, max_minutes=0.04, fit_schedule_to_budget=True)
    result = train_encoder(ds.histories, ds.spec, _cfg(), tcfg, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run.last" / "state.json").read_text())
    history = meta["history"]
    assert 2 <= len(history) < 400 and result.history == history
    assert meta["planned_epochs"] == planned_epochs(len(history), meta["seconds"], steady_epoch_seconds(history),
                                                    tcfg.max_minutes, tcfg.epochs)
    assert len(history) >= meta["planned_epochs"] or meta["seconds"] > 60 * tcfg.max_minutes


def test_bf16_autocast_trains_like_fp32_and_saves_fp32_weights(tmp_path, capsys):
    """--bf16 runs the forward under bf16 autocast: the loss falls as in the fp32 run with the same
    seed (within a few percent), and the checkpoint holds fp32 weights that load as usual. On a
    CPU without bf16 dot products the run says it will be slow (and only then)."""
    ds = _small(tmp_path)
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8, seen_bias=True)
    runs = {}
    for bf16 in (False, True):
        runs[bf16] = train_encoder(ds.histories, ds.spec, cfg, _tcfg(epochs=6, bf16=bf16), tmp_path / f"run{bf16}", progress=False)
        warned = "bf16 autocast on a CPU without bf16 dot products" in capsys.readouterr().err
        assert warned == (bf16 and not native_bf16(torch.device("cpu")))
    fp32, bf16 = ([row["train_loss"] for row in runs[b].history] for b in (False, True))
    assert bf16[-1] < 0.8 * bf16[0] and abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1], (fp32, bf16)
    weights = load_file(tmp_path / "runTrue" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    loaded = load_checkpoint(tmp_path / "runTrue")
    split = leave_one_out(ds.histories)
    assert evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)["all"]["users"] == 100


def test_device_windows_batches_equal_left_padding_with_and_without_crops(sample_tokenizer, sample_histories, spec):
    """A batch gathered from the windows padded once equals left_pad_tensors of the same windows,
    and of the same windows cut by hand to the suffixes crop_starts chose (every feature cut at
    the same event)."""
    from training.device_windows import DeviceWindows
    from userenc.tokenize import left_pad_tensors

    items = [w for u in sorted(sample_histories) for w in windows(sample_tokenizer.encode(sample_histories[u]), 12)]
    data = DeviceWindows.build(items, spec, 12, torch.device("cpu"))
    assert len(data) == len(items) and data.lengths.max() == 12 and data.lengths.min() >= 2
    assert list(data.lengths) == [len(w["item"]) for w in items]
    starts = crop_starts(data.lengths, 0.8, np.random.default_rng([4, 1]))
    rows = np.concatenate([np.flatnonzero(starts)[:4], np.flatnonzero(starts == 0)[:2]])
    assert (starts[rows] > 0).sum() == 4
    for cut in (np.zeros_like(starts), starts):
        ids, valid = data.batch(rows, (data.lengths - cut)[rows])
        want_ids, want_valid = left_pad_tensors([{k: v[cut[r]:] for k, v in items[r].items()} for r in rows], spec, 12)
        assert torch.equal(valid, want_valid) and ids.keys() == want_ids.keys()
        for key in ids:
            assert torch.equal(ids[key], want_ids[key]), key


def test_compiled_training_follows_the_eager_run(tmp_path):
    """TrainConfig.compile: a run with the training step under torch.compile follows the eager
    run's losses epoch by epoch (dropout off, so both draw the same batches and nothing random;
    crops on, so windows change length every epoch and padded batches go through the one
    dynamic-shape graph), and its manifest says it was compiled."""
    ds = _small(tmp_path)
    cfg = EncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16, out_dim=8, seen_bias=True)
    runs = {c: train_encoder(ds.histories, ds.spec, cfg, _tcfg(epochs=3, crop_prob=0.5, compile=c), tmp_path / f"run{c}", progress=False)
            for c in (False, True)}
    eager_losses, compiled_losses = ([row["train_loss"] for row in runs[c].history] for c in (False, True))
    assert np.allclose(compiled_losses, eager_losses, rtol=1e-3), (eager_losses, compiled_losses)
    assert compiled_losses[-1] < 0.9 * compiled_losses[0], compiled_losses
    assert load_checkpoint(tmp_path / "runTrue").manifest["train_config"]["compile"] is True
