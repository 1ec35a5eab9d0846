"""Our model against transformers on tiny random checkpoints written to disk (safetensors +
config.json + tokenizer), loaded through llm.loader: GQA, tied/untied embeddings, Qwen2 q/k/v
biases, RoPE scaling; plus the user-token paths and bad input."""
from __future__ import annotations

import pytest
import torch

from llm.loader import load_model, resolve

TOL = 1e-4


def max_diff(hf, ours, ids, **kw):
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.compute_logits(ours(ids, **kw))
    return (expected - got).abs().max().item()


@pytest.mark.parametrize("kind,overrides", [
    ("llama", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0,
                                    "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32})),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                    "factor": 4.0})),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=4)),
], ids=["llama-gqa", "llama-tied-mqa", "llama-biases", "llama3-rope", "linear-rope",
        "qwen2-tied", "qwen2-mha"])
def test_tiny_checkpoint_matches_transformers(tiny_checkpoint, kind, overrides):
    folder, hf = tiny_checkpoint(kind, **overrides)
    model, tokenizer, hf_config = load_model(folder)
    assert hf_config.model_type == kind
    rope = overrides.get("rope_parameters", {}).get("rope_type")
    assert (model.config.rope_scaling or {}).get("rope_type") == rope
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, hf.config.vocab_size, (2, 14),
                        generator=torch.Generator().manual_seed(1))
    if kind == "llama":  # (transformers gives a qwen2 folder its own Qwen2Tokenizer class)
        ids[0] = torch.tensor(tokenizer("w3 w1 w4 w1 w5 w9 w2 w6 w5 w3 w5 w8 w9 w7").input_ids)
    # Long enough that llama3's scaled frequencies (original context 32) matter.
    long_ids = torch.randint(0, hf.config.vocab_size, (1, 120),
                             generator=torch.Generator().manual_seed(2))
    assert max_diff(hf, model, ids) <= TOL
    assert max_diff(hf, model, long_ids) <= TOL


def test_sharded_safetensors_folder_loads(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    model, _, _ = load_model(sharded)
    assert max_diff(hf, model, torch.randint(0, 96, (2, 9))) <= TOL


def test_dense_path_is_differentiable(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=12)
    model.requires_grad_(False)
    for p in model.user_parameters():
        p.requires_grad_(True)
    gates = [g for b in model.model.cross_blocks.values() for g in (b.gate_attn, b.gate_mlp)]
    assert {id(g) for g in gates} <= {id(p) for p in model.user_parameters()}
    ids = torch.randint(0, 96, (2, 9))
    users = torch.randn(2, 3, 12)
    logits = model.compute_logits(model(ids, user_tokens=users))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    loss.backward()
    # At gate 0 the gates still receive gradient (d tanh(0) = 1), so training can open them.
    assert all(g.grad is not None and g.grad.abs().item() > 0 for g in gates)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None


def test_cross_blocks_identity_at_gate_zero_and_per_user_when_open(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama")
    base, _, _ = load_model(folder)
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=12, cross_heads=2)
    assert sorted(model.model.cross_blocks) == ["1", "3"]
    assert len(model.cross_attention_modules()) == 2 and model.cross_num_heads == 2
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(3))
    users = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False  # user 1 has 3 tokens
    mask[2] = False  # row 2 has no user tokens
    with torch.no_grad():
        plain = base(ids)
        assert torch.equal(model(ids), plain)
        assert torch.equal(model(ids, user_tokens=users, user_mask=mask), plain)
        assert torch.equal(model(ids, user_tokens=users[:, :0]), plain)  # K = 0
        for block in model.model.cross_blocks.values():
            block.gate_attn.fill_(0.7)
            block.gate_mlp.fill_(-0.4)
        opened = model(ids, user_tokens=users, user_mask=mask)
        # Padded user slots change nothing: user 1 alone with its 3 tokens gives the same row.
        alone = model(ids[1:2], user_tokens=users[1:2, :3])
    assert (opened[0] - plain[0]).abs().max() > 1e-2
    assert (opened[1] - plain[1]).abs().max() > 1e-2
    assert torch.equal(opened[2], plain[2])  # no user tokens: the base model, whatever the gates
    assert torch.allclose(alone[0], opened[1], atol=1e-5)
    assert max_diff(hf, base, ids) <= TOL


def test_soft_prompt_prepends_user_tokens(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    base, _, _ = load_model(folder)
    model, _, _ = load_model(folder, integration="soft_prompt", user_dim=10)
    assert model.model.soft_prompt is not None and not model.model.cross_blocks
    ids = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(5))
    users = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False
    with torch.no_grad():
        plain = base(ids)
        hidden = model(ids, user_tokens=users, user_mask=mask)
        alone = model(ids[1:2], user_tokens=users[1:2, :2])
        # The same thing by hand: projected user tokens as the first input embeddings.
        embeds = torch.cat([model.model.soft_prompt(users[:1]),
                            model.model.embed_tokens(ids[:1])], dim=1)
        positions = torch.arange(12)[None]
        by_hand = model.model.run_layers(embeds, positions)[:, 4:]
    assert hidden.shape == (3, 8, 64)  # text positions only
    assert (hidden[0] - plain[0]).abs().max() > 1e-2
    assert torch.allclose(hidden[0], by_hand[0], atol=1e-5)
    assert torch.allclose(alone[0], hidden[1], atol=1e-5)
    assert torch.allclose(hidden[2], plain[2], atol=1e-5)  # no user tokens: the base model
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)


def test_user_modules_are_seeded_and_reloaded_from_checkpoint(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    folder, _ = tiny_checkpoint("llama")
    a, _, _ = load_model(folder, cross_every_n=2, user_dim=12, seed=7)
    b, _, _ = load_model(folder, cross_every_n=2, user_dim=12, seed=7)
    c, _, _ = load_model(folder, cross_every_n=2, user_dim=12, seed=8)
    key = "model.cross_blocks.1.cross_attn.k_proj.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    # A checkpoint that carries our cross blocks (a trained adapter) loads them back.
    with torch.no_grad():
        a.model.cross_blocks["1"].gate_attn.fill_(0.25)
    state = {k: v.contiguous() for k, v in a.state_dict().items()}
    saved = tmp_path / "adapter"
    saved.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (saved / name).write_bytes((folder / name).read_bytes())
    save_file(state, saved / "model.safetensors")
    d, _, _ = load_model(saved, cross_every_n=2, user_dim=12, seed=8)
    assert torch.equal(d.state_dict()[key], a.state_dict()[key])
    assert d.model.cross_blocks["1"].gate_attn.item() == 0.25


def test_bad_input_gets_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "empty")
    folder, hf = tiny_checkpoint("llama")
    no_tokenizer = tmp_path / "no-tokenizer"
    hf.save_pretrained(no_tokenizer, safe_serialization=True)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_model(no_tokenizer)
    # A folder holding exactly one .gguf file is read as that file.
    (tmp_path / "gguf-folder").mkdir()
    (tmp_path / "gguf-folder" / "model.gguf").write_bytes(b"GGUF")
    assert resolve(tmp_path / "gguf-folder") == (tmp_path / "gguf-folder", "model.gguf")
    with pytest.raises(ValueError, match="user_dim"):
        load_model(folder, cross_every_n=2)  # cross blocks need a user width
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=12)
    ids = torch.randint(0, 96, (1, 5))
    with pytest.raises(ValueError, match=r"width 7.*user_dim=12"):
        model(ids, user_tokens=torch.randn(1, 3, 7))
    base, _, _ = load_model(folder)
    with pytest.raises(ValueError, match="no user-token integration"):
        base(ids, user_tokens=torch.randn(1, 3, 12))
    soft, _, _ = load_model(folder, integration="soft_prompt", user_dim=10)
    with pytest.raises(ValueError, match=r"width 12.*user_dim=10"):
        soft(ids, user_tokens=torch.randn(1, 3, 12))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        load_model(gpt2)
    yarn, _ = tiny_checkpoint("llama", seed=1, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
        "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        load_model(yarn)
    with pytest.raises(ValueError, match="integration must be one of"):
        load_model(folder, cross_every_n=2, user_dim=12, integration="prefix")
    with pytest.raises(ValueError, match="user_mask"):
        model(ids, user_tokens=torch.randn(1, 3, 12), user_mask=torch.ones(1, 4, dtype=torch.bool))
