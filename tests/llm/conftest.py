"""Shared fixtures for the llm tests.

- `smollm2_checkpoint`: SmolLM2-135M-Instruct from ../shared, read once per worker (the GGUF
  de-quantisation takes ~15 s), fp32 on CPU. Tests that use it carry
  `pytest.mark.xdist_group("smollm2")` so `--dist loadgroup` reads it on one worker only.
- `smollm2` / `smollm2_hf`: our model and transformers' LlamaForCausalLM on those same weights.
- `tiny_checkpoint`: a factory writing a tiny random Llama/Qwen2 (built here from a config,
  saved with save_pretrained(safe_serialization=True) plus a small word-level tokenizer) to
  tmp_path; returns (folder, the HF model).
- `PagedHarness`: a hand-built paged KV pool and ForwardContext driver, so the model's paged
  path is tested without the engine.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm.context import ForwardContext, use_context

SMOLLM2_GGUF = (Path(__file__).resolve().parents[2] / ".." / "shared" / "models"
                / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not available at {SMOLLM2_GGUF}")
    from llm.loader import read_checkpoint

    return read_checkpoint(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint):
    from llm.loader import build_model

    ckpt = smollm2_checkpoint
    return build_model(ckpt.hf_config, ckpt.state_dict)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_checkpoint):
    """transformers' own Llama on the weights transformers de-quantised from the GGUF."""
    from transformers import AutoModelForCausalLM

    ckpt = smollm2_checkpoint
    # Built on the meta device (no random init of 135M weights), the checkpoint's tensors
    # assigned in; the rotary module's inv_freq is a non-persistent buffer, so it is rebuilt.
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(ckpt.hf_config, dtype=torch.float32)
    hf.load_state_dict(ckpt.state_dict, assign=True, strict=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=ckpt.hf_config)
    assert not any(t.is_meta for t in list(hf.parameters()) + list(hf.buffers()))
    return hf.eval()


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<unk>"], vocab["</s>"] = vocab_size - 2, vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(folder)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """make(kind="llama"|"qwen2", **config overrides) -> (folder, hf_model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    def make(kind: str = "llama", seed: int = 0, **overrides):
        base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5, tie_word_embeddings=False)
        base.update(overrides)
        torch.manual_seed(seed)
        if kind == "qwen2":
            hf = Qwen2ForCausalLM(Qwen2Config(**base))
            # Random init leaves biases at zero; make them matter.
            with torch.no_grad():
                for layer in hf.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                 layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
        else:
            hf = LlamaForCausalLM(LlamaConfig(**base))
        hf = hf.eval()
        folder = tmp_path / f"{kind}-{seed}"
        hf.save_pretrained(folder, safe_serialization=True)
        save_word_tokenizer(folder, base["vocab_size"])
        return folder, hf

    return make


class PagedHarness:
    """A small paged pool driven by hand, the way the engine drives the model.

    Blocks are handed out in a shuffled order so a sequence's blocks are never contiguous.
    `step({seq_id: new_token_ids})` runs one forward under a ForwardContext (prefill when any
    sequence brings more than one token or its user tokens are still unwritten, else decode)
    and returns the logits of each sequence's last new token, in the dict's order.
    """

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64,
                 num_cross_blocks: int = 32, seed: int = 0, assign_pool: bool = True) -> None:
        self.model, self.bs = model, block_size
        dt, dev = model.dtype, model.device
        if assign_pool:
            shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
            for m in model.attention_modules():
                # NaN-filled: any read of an unwritten slot poisons the result.
                m.k_cache = torch.full(shape, float("nan"), dtype=dt, device=dev)
                m.v_cache = torch.full(shape, float("nan"), dtype=dt, device=dev)
            cshape = (num_cross_blocks, block_size, model.cross_num_heads, model.head_dim)
            for m in model.cross_attention_modules():
                m.cross_k_cache = torch.full(cshape, float("nan"), dtype=dt, device=dev)
                m.cross_v_cache = torch.full(cshape, float("nan"), dtype=dt, device=dev)
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.free_cross = torch.randperm(num_cross_blocks, generator=g).tolist()
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.cross: dict[int, list[int]] = {}
        self.users: dict[int, torch.Tensor | None] = {}
        self.written: set[int] = set()

    def release(self) -> None:
        for m in self.model.attention_modules():
            m.k_cache, m.v_cache = torch.empty(0), torch.empty(0)
        for m in self.model.cross_attention_modules():
            m.cross_k_cache, m.cross_v_cache = torch.empty(0), torch.empty(0)

    def add(self, sid: int, user_tokens: torch.Tensor | None = None) -> None:
        self.blocks[sid], self.lens[sid], self.users[sid] = [], 0, user_tokens
        n = 0 if user_tokens is None else user_tokens.shape[0]
        self.cross[sid] = [self.free_cross.pop() for _ in range(-(-n // self.bs))]

    def _slot(self, sid: int, pos: int) -> int:
        while len(self.blocks[sid]) * self.bs <= pos:
            self.blocks[sid].append(self.free.pop())
        return self.blocks[sid][pos // self.bs] * self.bs + pos % self.bs

    def step(self, chunks: dict[int, list[int]],
             soft_prompts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """soft_prompts[sid] [K, D]: the first K tokens of that chunk are placeholders whose
        embeddings the model replaces with the projected user tokens."""
        dev = self.model.device
        sids = list(chunks)
        pending = [s for s in sids if self.users[s] is not None and s not in self.written]
        is_prefill = any(len(chunks[s]) != 1 for s in sids) or bool(pending)
        ids, pos, slots, cu = [], [], [], [0]
        for s in sids:
            start = self.lens[s]
            for i, t in enumerate(chunks[s]):
                ids.append(t)
                pos.append(start + i)
                slots.append(self._slot(s, start + i))
            self.lens[s] += len(chunks[s])
            cu.append(cu[-1] + len(chunks[s]))

        def padded(rows):
            width = max(1, max(len(r) for r in rows))
            return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32,
                                device=dev)

        ctx = ForwardContext(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            context_lens=torch.tensor([self.lens[s] for s in sids], dtype=torch.int32,
                                      device=dev),
            block_tables=padded([self.blocks[s] for s in sids]),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev) if is_prefill else None,
        )
        if self.model.cross_attention_modules():
            ctx.cross_block_tables = padded([self.cross[s] for s in sids])
            ctx.cross_lens = torch.tensor(
                [0 if self.users[s] is None else self.users[s].shape[0] for s in sids],
                dtype=torch.int32, device=dev)
            if pending:
                ctx.cross_inputs = torch.cat([self.users[s] for s in pending]).to(dev)
                ctx.cross_slot_mapping = torch.tensor(
                    [self.cross[s][j // self.bs] * self.bs + j % self.bs
                     for s in pending for j in range(self.users[s].shape[0])],
                    dtype=torch.int64, device=dev)
                self.written.update(pending)
        if soft_prompts:
            starts = dict(zip(sids, cu[:-1]))
            ctx.soft_prompt_inputs = torch.cat([soft_prompts[s] for s in soft_prompts]).to(dev)
            ctx.soft_prompt_positions = torch.tensor(
                [starts[s] + j for s in soft_prompts for j in range(soft_prompts[s].shape[0])],
                dtype=torch.int64, device=dev)
        with use_context(ctx), torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev))
            last = torch.tensor(cu[1:], device=dev) - 1
            return self.model.compute_logits(hidden[last])


@pytest.fixture
def paged_harness():
    made: list[PagedHarness] = []

    def make(model, **kw) -> PagedHarness:
        made.append(PagedHarness(model, **kw))
        return made[-1]

    yield make
    for h in made:  # session-scoped models must not keep a test's pool
        h.release()
