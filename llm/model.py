"""Our Llama-family decoder (Llama, SmolLM, Qwen2) with optional user-token integration.

Module names mirror transformers' LlamaForCausalLM, so checkpoints load by name:
`model.embed_tokens`, `model.layers[i].{input_layernorm,self_attn,post_attention_layernorm,mlp}`,
`model.norm`, `lm_head`. Ours on top: `model.cross_blocks[str(i)]` (a GatedCrossAttentionBlock run
before decoder layer i) or `model.soft_prompt` (a SoftPromptProjector).

API (what the engine and training use)
--------------------------------------
`load_model(path, dtype, device, cross_every_n=0, user_dim=None, ...) -> (model, tokenizer,
hf_config)` lives in llm/loader.py. The model (`LlamaForCausalLM`) offers:

- Dense path (no ForwardContext set): `model(input_ids [B, T], user_tokens [B, K, D_user] | None,
  user_mask [B, K] bool | None, positions [B, T] | None) -> hidden [B, T, hidden]` (final norm
  applied; with soft prompts the user-token positions are dropped, so row t is text token t).
  No cache; differentiable. Right-pad batches (causal attention never looks right).
- Paged path (under `with use_context(ctx):`): `model(input_ids [N], positions [N]) -> hidden
  [N, hidden]` for the flat stream of new tokens. User tokens come only through the context
  (cross_inputs / cross_lens / ... or soft_prompt_inputs / soft_prompt_positions).
- `compute_logits(hidden [..., hidden]) -> [..., vocab]` for whatever rows it is given (the engine
  picks the last token of each prefill sequence, hidden[cu_seqlens_q[1:] - 1], itself).
- `attention_modules()` -> the self-attention modules in layer order; assign each its
  `k_cache` / `v_cache` views [num_blocks, block_size, num_kv_heads, head_dim] in model dtype.
- `cross_attention_modules()` -> the CrossAttention modules; assign `cross_k_cache` /
  `cross_v_cache` [num_cross_blocks, block_size, cross_num_heads, head_dim].
- `num_layers`, `num_kv_heads`, `head_dim`, `cross_num_heads`, `user_dim`, `dtype`, `device`,
  `config` (our ModelConfig: `cross_layer_indices`, `cross_heads`, `max_position_embeddings`...).
- `prepack_linears()` / `drop_packed_linears()` -> MKL-packed weights for CPU inference (the
  engine makes them on CPU and drops them on close).
- `user_parameters()` -> the cross-block / soft-prompt parameters (adapter training).

Decode (is_prefill False) makes no host syncs in our layers, so it can be captured in a CUDA
graph when the kernels allow it; prefill reads cu_seqlens_q / context_lens on the host.

How the paged path reads the ForwardContext (llm/context.py):
- every step: slot_mapping, context_lens, block_tables; prefill also cu_seqlens_q. In a prefill, a
  sequence without a cached prefix attends over its own new K/V (so it also runs before the
  pools are assigned: the engine's warm-up); one with a cached prefix gathers its K/V from its
  blocks. Decode (one token per sequence) calls llm.kernels.ops.paged_decode_attention.
- cross integration (config.cross_every_n > 0, blocks before layers i with (i+1) % N == 0):
  cross_block_tables and cross_lens on every step when the model has cross blocks (cross_lens 0
  = no user tokens: exactly the base model for that sequence); cross_inputs [M, user_dim] +
  cross_slot_mapping [M] on the step that must write a request's user K/V (each cross block
  writes them before it attends, so prefill or decode steps both work).
- soft-prompt integration (config.integration == "soft_prompt"): the engine puts K placeholder
  token ids in front of the prompt and passes soft_prompt_inputs [P, user_dim] with
  soft_prompt_positions [P] (their indices in this step's flat stream); the model replaces those
  rows' embeddings. The placeholders occupy K positions / KV slots like ordinary tokens.
- a wrong user width raises ValueError naming both widths (dense and paged).
"""
from __future__ import annotations

import torch
from torch import nn

from llm import cpu_decode
from llm.config import ModelConfig
from llm.context import get_context
from llm.layers.attention import Attention
from llm.layers.cross_attention import CrossAttention, GatedCrossAttentionBlock, check_user_width
from llm.layers.linear import Linear
from llm.layers.mlp import SwiGLU
from llm.layers.rmsnorm import RMSNorm
from llm.layers.rotary import RotaryEmbedding
from llm.layers.soft_prompt import SoftPromptProjector


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, x, cos, sin, key_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.cross_blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(cfg) for i in cfg.cross_layer_indices})
        self.soft_prompt = (SoftPromptProjector(cfg) if cfg.integration == "soft_prompt"
                            else None)

    def run_layers(self, h, positions, user_tokens=None, user_mask=None, key_mask=None):
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        if not self.cross_blocks:
            ctx = get_context()
            fast = cpu_decode.plan_for(self.layers, h, ctx)
            if fast is not None:  # the same kernel calls without module dispatch
                return self.norm(cpu_decode.run_decode_layers(*fast, h, cos, sin, ctx))
        for i, layer in enumerate(self.layers):
            block = self.cross_blocks[str(i)] if str(i) in self.cross_blocks else None
            if block is not None:
                h = block(h, user_tokens, user_mask)
            h = layer(h, cos, sin, key_mask)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- what the engine reads ---
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def cross_num_heads(self) -> int:
        return self.config.cross_heads

    @property
    def user_dim(self) -> int | None:
        return self.config.user_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the LM head may hold quantized codes

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def attention_modules(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def cross_attention_modules(self) -> list[CrossAttention]:
        return [block.cross_attn for block in self.model.cross_blocks.values()]

    def prepack_linears(self, lm_head_rows: int = 16) -> int:
        """MKL-packed copies of the base model's Linear weights for CPU inference
        (llm/layers/linear.py); the LM head pads small batches to `lm_head_rows` rows, where
        its GEMM is fastest (16 rows: 19 ms vs 39-54 ms for 8-12 on SmolLM2). The user modules
        are left unpacked: they are trained and swapped at run time, and a pack is a copy.
        Returns how many layers were packed (0 off CPU fp32 or without MKL)."""
        packed = 0
        for module in [*self.model.layers.modules(), self.lm_head]:
            if isinstance(module, Linear):
                pad = lm_head_rows if module is self.lm_head else 0
                packed += module.prepack(pad_rows_to=pad)
        return packed

    def drop_packed_linears(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.drop_pack()

    def user_parameters(self) -> list[nn.Parameter]:
        """Our user-token modules' parameters (cross blocks or soft-prompt projection): what
        adapter training optimises with the base model frozen."""
        modules = list(self.model.cross_blocks.values())
        if self.model.soft_prompt is not None:
            modules.append(self.model.soft_prompt)
        return [p for m in modules for p in m.parameters()]

    # --- forward ---
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                user_tokens: torch.Tensor | None = None,
                user_mask: torch.Tensor | None = None) -> torch.Tensor:
        if get_context() is not None:
            return self._forward_paged(input_ids, positions, user_tokens)
        return self._forward_dense(input_ids, positions, user_tokens, user_mask)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _forward_paged(self, input_ids, positions, user_tokens):
        ctx = get_context()
        if user_tokens is not None:
            raise ValueError("under a ForwardContext user tokens come through the context "
                             "(cross_inputs / soft_prompt_inputs), not as an argument")
        assert input_ids.dim() == 1 and positions is not None \
            and positions.shape == input_ids.shape, "paged path: input_ids and positions [N]"
        h = self.model.embed_tokens(input_ids)
        if ctx.cross_inputs is not None:
            check_user_width(ctx.cross_inputs.shape[-1], self._cross_user_dim())
        if ctx.soft_prompt_inputs is not None and ctx.soft_prompt_inputs.shape[0] > 0:
            if self.model.soft_prompt is None:
                raise ValueError("soft_prompt_inputs given, but the model was not loaded with "
                                 "integration='soft_prompt'")
            assert ctx.soft_prompt_positions is not None, "soft_prompt_inputs without positions"
            h = h.index_copy(0, ctx.soft_prompt_positions.to(torch.long),
                             self.model.soft_prompt(ctx.soft_prompt_inputs).to(h.dtype))
        return self.model.run_layers(h, positions)

    def _cross_user_dim(self) -> int | None:
        return self.config.user_dim if self.model.cross_blocks else None

    def _forward_dense(self, input_ids, positions, user_tokens, user_mask):
        if input_ids.dim() != 2:
            raise ValueError(f"dense path: input_ids must be [B, T], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        h = self.model.embed_tokens(input_ids)
        if user_tokens is None:
            if user_mask is not None:
                raise ValueError("user_mask given without user_tokens")
            return self.model.run_layers(h, positions)
        if user_tokens.dim() != 3 or user_tokens.shape[0] != b:
            raise ValueError(f"user_tokens must be [B={b}, K, D], got {tuple(user_tokens.shape)}")
        soft = self.model.soft_prompt
        check_user_width(user_tokens.shape[-1],
                         soft.user_dim if soft is not None else self._cross_user_dim())
        if user_tokens.shape[1] == 0:  # K = 0: nobody has user tokens
            return self._forward_dense(input_ids, positions, None, None)
        if user_mask is None:
            user_mask = torch.ones(user_tokens.shape[:2], dtype=torch.bool,
                                   device=user_tokens.device)
        if user_mask.shape != user_tokens.shape[:2]:
            raise ValueError(f"user_mask must be [B, K] = {tuple(user_tokens.shape[:2])}, "
                             f"got {tuple(user_mask.shape)}")
        user_mask = user_mask.bool()
        if soft is not None:
            return self._soft_prompt_dense(h, positions, user_tokens, user_mask)
        return self.model.run_layers(h, positions, user_tokens.to(h.dtype), user_mask)

    def _soft_prompt_dense(self, h, positions, user_tokens, user_mask):
        k = user_tokens.shape[1]
        prompt = self.model.soft_prompt(user_tokens).to(h.dtype)  # [B, K, hidden]
        h = torch.cat([prompt, h], dim=1)
        key_mask = torch.cat([user_mask, torch.ones_like(positions, dtype=torch.bool)], dim=1)
        # Positions count only real tokens, so a padded user slot shifts nothing: a row with
        # fewer user tokens computes exactly what it would alone.
        n_users = user_mask.sum(-1, keepdim=True)
        user_pos = (user_mask.long().cumsum(-1) - 1).clamp(min=0)
        pos = torch.cat([user_pos, positions + n_users], dim=1)
        out = self.model.run_layers(h, pos, key_mask=key_mask)
        return out[:, k:]
