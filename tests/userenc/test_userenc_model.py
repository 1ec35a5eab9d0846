"""The encoder: causality, padding invariance (incl. left truncation), Perceiver shapes, the
next-event heads, and checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from userenc.checkpoint import load_checkpoint, save_checkpoint
from userenc.config import EncoderConfig
from userenc.tokenize import left_pad
from userenc_helpers import TINY_VOCAB, make_model, random_ids, vocab_sizes_of

COMBOS = [("early", "rope"), ("early", "learned"), ("late", "rope"), ("late", "learned")]


def _attrs(seed: int = 0) -> dict[str, np.ndarray]:
    """Genres of each of the TINY_VOCAB item ids (row 0/1: padding/OOV have none)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(2, TINY_VOCAB["genres"], size=(TINY_VOCAB["item"], 3))
    table[:, 2] = 0  # at most two genres per item: padding in the third slot
    table[:2] = 0
    return {"genres": table}


def _left_padded_valid(batch: int, length: int, pads: list[int]) -> torch.Tensor:
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(pads):
        valid[b, :n] = False
    return valid


# --- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion,positions", COMBOS)
def test_changing_a_later_event_never_changes_earlier_states(spec, fusion, positions):
    model = make_model(spec, TINY_VOCAB, item_attributes=_attrs(), fusion=fusion, positions=positions, n_layers=2)
    g = torch.Generator().manual_seed(1)
    ids = random_ids(spec, TINY_VOCAB, 2, 12, g)
    valid = _left_padded_valid(2, 12, [0, 3])
    base = model.states(ids, valid)
    for t, names in ((5, None), (11, None), (7, ["rating"]), (4, ["gap"])):
        changed = {k: v.clone() for k, v in ids.items()}
        for f in spec.features:
            if names is None or f.name in names:
                v = changed[f.name][:, t]
                changed[f.name][:, t] = (v - 2 + 1) % (TINY_VOCAB[f.name] - 2) + 2  # another real id
        out = model.states(changed, valid)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4, "the changed event itself must change its state"


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_learned_positions_tell_positions_apart(spec, fusion):
    """The same event repeated: with learned positions each position has its own state (late
    fusion once ignored the position table)."""
    model = make_model(spec, TINY_VOCAB, fusion=fusion, positions="learned")
    ids = {k: v[:, :1].expand(v.shape).clone() for k, v in random_ids(spec, TINY_VOCAB, 1, 6, torch.Generator().manual_seed(2)).items()}
    states = model.states(ids, torch.ones(1, 6, dtype=torch.bool))
    assert (states[0, 1:] - states[0, :1]).abs().amax(dim=-1).min() > 1e-3


# --- padding invariance ------------------------------------------------------------------------


@pytest.mark.parametrize("fusion,positions,k", [("early", "rope", 0), ("early", "learned", 0), ("late", "rope", 0), ("late", "learned", 4), ("early", "rope", 4)])
def test_left_padded_batch_equals_each_sequence_alone(spec, sample_tokenizer, sample_histories, fusion, positions, k):
    tok = sample_tokenizer
    model = make_model(spec, vocab_sizes_of(tok), item_attributes=tok.item_attributes, fusion=fusion, positions=positions, num_user_tokens=k, max_len=16)
    hs = list(sample_histories.values())
    encoded = [tok.encode(h[:n]) for h, n in zip(hs, (3, 9, 16, 25))]  # 25 > max_len: left-truncated
    ids_np, valid_np = left_pad(encoded, spec, 16)
    ids, valid = {k_: torch.from_numpy(v) for k_, v in ids_np.items()}, torch.from_numpy(valid_np)
    states = model.states(ids, valid)
    emb = model.user_embedding(ids, valid)
    tokens, _ = model.encode(ids, valid)
    assert emb.shape == (4, 8)
    for b, enc in enumerate(encoded):
        one_np, one_valid_np = left_pad([enc], spec, 16)
        one, one_valid = {k_: torch.from_numpy(v) for k_, v in one_np.items()}, torch.from_numpy(one_valid_np)
        assert one_valid.shape[1] == min(len(enc["item"]), 16)
        alone = model.states(one, one_valid)[0]
        torch.testing.assert_close(states[b][valid[b]], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb[b], model.user_embedding(one, one_valid)[0], atol=1e-5, rtol=1e-5)
        if k:
            torch.testing.assert_close(tokens[b], model.encode(one, one_valid)[0][0], atol=1e-5, rtol=1e-5)
    # The truncated user is the user's last 16 events: its embedding differs from the first 16's.
    first16 = left_pad([tok.encode(hs[3][:16])], spec, 16)
    other = model.user_embedding({k_: torch.from_numpy(v) for k_, v in first16[0].items()}, torch.from_numpy(first16[1]))[0]
    assert (other - emb[3]).abs().max() > 1e-4


@pytest.mark.parametrize("fusion,positions", COMBOS)
def test_last_state_fast_path_equals_the_full_states(spec, fusion, positions):
    """states(last_only=True) (user embeddings, evaluation) is the last row of the full states."""
    model = make_model(spec, TINY_VOCAB, item_attributes=_attrs(), fusion=fusion, positions=positions, n_layers=2)
    ids = random_ids(spec, TINY_VOCAB, 3, 9, torch.Generator().manual_seed(10))
    valid = _left_padded_valid(3, 9, [0, 4, 8])
    last = model.states(ids, valid, last_only=True)
    assert last.shape == (3, 1, 16)
    torch.testing.assert_close(last, model.states(ids, valid)[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.user_embedding(ids, valid), model.encode(ids, valid)[0][:, -1], atol=1e-5, rtol=1e-5)


def test_max_len_512_supported(spec):
    model = make_model(spec, TINY_VOCAB, max_len=512, positions="learned")
    ids = random_ids(spec, TINY_VOCAB, 1, 512, torch.Generator().manual_seed(3))
    assert model.states(ids, torch.ones(1, 512, dtype=torch.bool)).shape == (1, 512, 16)
    with pytest.raises(AssertionError, match="exceeds max_len"):
        model.states({k: torch.cat([v, v[:, :1]], 1) for k, v in ids.items()}, torch.ones(1, 513, dtype=torch.bool))


# --- Perceiver resampler -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 16, 32])
def test_perceiver_output_shapes(spec, k):
    model = make_model(spec, TINY_VOCAB, num_user_tokens=k, out_dim=12)
    g = torch.Generator().manual_seed(4)
    for length in (5, 10):
        ids = random_ids(spec, TINY_VOCAB, 3, length, g)
        valid = _left_padded_valid(3, length, [0, 2, length - 1])
        tokens, mask = model.encode(ids, valid)
        assert tokens.shape == (3, k, 12) and mask.shape == (3, k) and bool(mask.all())
        assert torch.isfinite(tokens).all() and (tokens[0] - tokens[1]).abs().max() > 1e-5
        assert model.user_embedding(ids, valid).shape == (3, 12)


def test_without_resampler_tokens_are_per_position(spec):
    model = make_model(spec, TINY_VOCAB, out_dim=12)
    ids = random_ids(spec, TINY_VOCAB, 2, 7, torch.Generator().manual_seed(5))
    valid = _left_padded_valid(2, 7, [0, 3])
    tokens, mask = model.encode(ids, valid)
    assert tokens.shape == (2, 7, 12) and torch.equal(mask, valid)
    torch.testing.assert_close(model.user_embedding(ids, valid), tokens[:, -1])


@pytest.mark.parametrize("k", [0, 4])
def test_empty_history_is_refused(spec, k):
    model = make_model(spec, TINY_VOCAB, num_user_tokens=k)
    ids = random_ids(spec, TINY_VOCAB, 2, 4, torch.Generator().manual_seed(6))
    valid = _left_padded_valid(2, 4, [0, 4])  # the second user has no events
    with pytest.raises(ValueError, match="at least one event"):
        model.encode(ids, valid)
    with pytest.raises(ValueError, match="at least one event"):
        model.user_embedding(ids, valid)


# --- next-event heads --------------------------------------------------------------------------


@pytest.mark.parametrize("item_loss,negatives,k", [("full", "in_batch", 0), ("sampled", "in_batch", 0), ("sampled", "uniform", 0), ("full", "in_batch", 4)])
def test_heads_give_finite_losses_and_gradients(spec, item_loss, negatives, k):
    # 64 uniform negatives from 28 real items: collisions with the target are certain and masked.
    model = make_model(spec, TINY_VOCAB, item_attributes=_attrs(), item_loss=item_loss, negatives=negatives, num_negatives=64, dropout=0.1, num_user_tokens=k).train()
    ids = random_ids(spec, TINY_VOCAB, 4, 9, torch.Generator().manual_seed(7))
    valid = _left_padded_valid(4, 9, [0, 1, 4, 7])
    loss, parts = model.next_event_loss(ids, valid)
    assert set(parts) == {"item", "genres", "rating"} | ({"resampler"} if k else set())
    assert torch.isfinite(loss) and all(np.isfinite(v) and v > 0 for v in parts.values())
    loss.backward()
    named = dict(model.named_parameters())
    for name, p in named.items():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    # The item table (input side, tied to the candidate side) and every head learn.
    for name in ("heads.query.weight", "heads.candidates.attr_lift.genres.weight", "heads.others.genres.weight", "heads.others.rating.weight", "fusion.embed.item.table.weight", "fusion.embed.genres.table.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    if k:
        assert named["resampler.latents"].grad.abs().sum() > 0
    if item_loss == "sampled":
        # Out of training the item loss is the full softmax: the sampled one was a different number.
        model.eval()
        full = make_model(spec, TINY_VOCAB, item_attributes=_attrs(), num_user_tokens=k)
        full.load_state_dict(model.state_dict())
        assert model.next_event_loss(ids, valid)[1]["item"] == pytest.approx(full.next_event_loss(ids, valid)[1]["item"], rel=1e-6)


def test_head_losses_match_a_hand_computation(spec):
    """State t predicts event t+1: full softmax over items (+ genre attributes), multi-label
    genres (BCE over real ids), rating buckets (CE), each times its loss weight."""
    attrs = _attrs()
    model = make_model(spec, TINY_VOCAB, item_attributes=attrs)
    ids = random_ids(spec, TINY_VOCAB, 3, 6, torch.Generator().manual_seed(8))
    ids["genres"][..., 2] = 0
    ids["genres"][0, 3, 1] = 0  # one event with a single genre
    ids["item"][1, 4] = 1  # an OOV next item carries no item loss
    valid = _left_padded_valid(3, 6, [0, 2, 0])
    _, parts = model.next_event_loss(ids, valid)
    with torch.no_grad():
        _hand_check(model, ids, valid, attrs, parts)


def _hand_check(model, ids, valid, attrs, parts) -> None:
    states = model.states(ids, valid)
    heads = model.heads
    cand = heads.candidates.item.weight.clone()
    table = heads.candidates.attr_embed["genres"].table.weight
    for i in range(cand.shape[0]):
        g = [x for x in attrs["genres"][i] if x]
        if g:
            cand[i] += heads.candidates.attr_lift["genres"](table[g].mean(0))
    item_terms, genre_terms, rating_terms = [], [], []
    for b in range(3):
        for t in range(5):
            if not (valid[b, t] and valid[b, t + 1]):
                continue
            h = states[b, t]
            target = int(ids["item"][b, t + 1])
            if target != 1:
                # The training loss is a softmax over the raw catalogue logits (padding and OOV
                # included: they are never targets); ranking masks them, training does not.
                scores = heads.query(h) @ cand.T
                item_terms.append(torch.logsumexp(scores, 0) - scores[target])
            logits = heads.others["genres"](h)[2:]
            hot = torch.zeros_like(logits)
            for g in ids["genres"][b, t + 1]:
                if g >= 2:
                    hot[g - 2] = 1.0
            genre_terms.append(F.binary_cross_entropy_with_logits(logits, hot, reduction="none"))
            rating_terms.append(F.cross_entropy(heads.others["rating"](h), ids["rating"][b, t + 1]))
    assert len(item_terms) == 12 and len(rating_terms) == 13
    assert parts["item"] == pytest.approx(float(torch.stack(item_terms).mean()), rel=1e-5)
    assert parts["genres"] == pytest.approx(0.5 * float(torch.cat(genre_terms).mean()), rel=1e-5)
    assert parts["rating"] == pytest.approx(0.5 * float(torch.stack(rating_terms).mean()), rel=1e-5)


def test_loss_weights_scale_the_parts(spec):
    ids = random_ids(spec, TINY_VOCAB, 2, 6, torch.Generator().manual_seed(9))
    valid = torch.ones(2, 6, dtype=torch.bool)
    _, base = make_model(spec, TINY_VOCAB).next_event_loss(ids, valid)
    spec.features[2].loss_weight = 2.0  # rating: 0.5 -> 2.0
    _, heavier = make_model(spec, TINY_VOCAB).next_event_loss(ids, valid)
    assert heavier["rating"] == pytest.approx(4 * base["rating"], rel=1e-6) and heavier["item"] == pytest.approx(base["item"], rel=1e-6)


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 4])
def test_checkpoint_roundtrip_gives_identical_embeddings(spec, sample_tokenizer, sample_histories, tmp_path, k):
    tok = sample_tokenizer
    model = make_model(spec, vocab_sizes_of(tok), item_attributes=tok.item_attributes, num_user_tokens=k, fusion="late" if k else "early")
    folder = save_checkpoint(tmp_path / "ckpt", model, tok, {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "vocab"]
    torch.manual_seed(123)  # the loader builds a fresh (differently initialised) model first
    loaded = load_checkpoint(folder)
    assert loaded.manifest == {"note": "test"} and loaded.model.cfg == model.cfg
    histories = list(sample_histories.values())[:7]
    before = np.concatenate([model.user_embedding(*_batch(tok, [h], 16)).numpy() for h in histories])
    after = loaded.embed(histories, batch_size=3)
    np.testing.assert_allclose(loaded.embed(histories, batch_size=1), after, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(loaded.embed(histories, batch_size=3), load_checkpoint(folder).embed(histories, batch_size=3))
    # Rewriting in place replaces the folder atomically; no temporary folders are left behind.
    save_checkpoint(folder, loaded.model, tok, {"note": "again"})
    assert load_checkpoint(folder).manifest == {"note": "again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ValueError, match="empty history"):
        loaded.embed([histories[0], []])
    # bf16 autocast changes the arithmetic, not the answer: every vector keeps its direction.
    low = loaded.embed(histories, batch_size=3, bf16=True)
    assert not np.array_equal(low, after)
    cosine = (low * after).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(after, axis=1))
    assert cosine.min() > 0.99


def _batch(tok, histories, max_len):
    ids, valid = left_pad([tok.encode(h) for h in histories], tok.spec, max_len)
    return {k: torch.from_numpy(v) for k, v in ids.items()}, torch.from_numpy(valid)


def test_missing_checkpoint_files(spec, sample_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an encoder checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    model = make_model(spec, vocab_sizes_of(sample_tokenizer), item_attributes=sample_tokenizer.item_attributes)
    folder = save_checkpoint(tmp_path / "ckpt", model, sample_tokenizer, {})
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors missing"):
        load_checkpoint(folder)


def test_encoder_config_validation():
    with pytest.raises(ValueError, match="fusion"):
        EncoderConfig(fusion="middle")
    with pytest.raises(ValueError, match="heads of even width"):
        EncoderConfig(d_model=18, n_heads=2)
    with pytest.raises(ValueError, match="unknown encoder settings: depth"):
        EncoderConfig.from_dict({"depth": 3})
    cfg = EncoderConfig(d_model=32, num_user_tokens=16, vocab_sizes={"item": 5})
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_feature_dropout_drops_whole_features_in_training_only(spec):
    """Early fusion with feature_dropout: in training, some (event, feature) embeddings are
    zeroed whole and the rest rescaled; in eval the model is the same function as without it."""
    plain = make_model(spec, TINY_VOCAB, item_attributes=_attrs())
    dropped = make_model(spec, TINY_VOCAB, item_attributes=_attrs(), feature_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = random_ids(spec, TINY_VOCAB, 2, 10, g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    plain.eval()
    dropped.eval()
    torch.testing.assert_close(dropped.states(ids, valid), plain.states(ids, valid))
    fusion = dropped.fusion
    fusion.train()
    fusion.drop.p = 0.0  # isolate the feature dropout from the ordinary dropout
    seen = [fusion.embed[n](ids[n]) for n in fusion.names]
    captured = {}
    hook = fusion.mlp.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    torch.manual_seed(0)
    fusion(ids)
    hook.remove()
    x, start = captured["x"], 0
    zeroed = kept = 0
    for part in seen:
        block = x[..., start:start + part.shape[-1]]
        start += part.shape[-1]
        is_zero = (block == 0).all(-1)
        assert torch.allclose(block[~is_zero], part[~is_zero] * 2.0)  # kept: scaled by 1 / (1 - p)
        zeroed += int(is_zero.sum())
        kept += int((~is_zero).sum())
    assert zeroed > 0 and kept > 0
    with pytest.raises(ValueError, match="feature_dropout"):
        EncoderConfig(feature_dropout=1.0)
