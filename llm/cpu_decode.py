"""A CPU decode step's decoder layers as one flat loop of kernel calls.

Why: with quantized weights on CPU, a SmolLM2 decode step at batch 1 spent ~14 ms in its
kernels and ~9 ms around them: nn.Module dispatch (about 200 module calls and 1,500 attribute
lookups a token), the per-call checks that pick a kernel, views. With this loop a token took
16 ms instead of 23 (same machine, kernels unchanged). The layers' own forwards stay the reference; this
loop makes exactly their calls, in their order, on the same tensors (the C++ extension in
llm/kernels/cpu_quant.py: RMSNorm, the int4/int8 GEMVs, RoPE + K/V write + paged attention),
so its hidden states are bit-identical to theirs (tests/llm/test_llm_quant.py checks it).

It applies to a paged decode step (no prefill) on CPU in fp32 without autograd, with the
extension built, USERLLM_KERNELS on auto, no cross-attention blocks, and every decoder
projection a bias-free QuantLinear (a GGUF kept quantized, or --quantize int4/int8). Anything
else (a LoRA-wrapped projection, an adapter's cross blocks, fp32 weights) runs the modules.
`ENABLED` turns it off for comparisons.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.context import ForwardContext
from llm.kernels.ops import cpu_decode_kernel
from llm.layers.quant import DEQUANT_MIN_ROWS, QuantLinear

ENABLED = True
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def plan_for(layers: nn.ModuleList, h: torch.Tensor, ctx: ForwardContext | None):
    """(extension module, per-layer tensors) when the flat loop applies to this step, else
    None. Built each step in one pass that also checks every layer; it reads the modules'
    dicts directly (nn.Module.__getattr__ was ~1,500 Python calls a token)."""
    if not ENABLED or ctx is None or ctx.is_prefill:
        return None
    if h.dim() != 2 or torch.is_grad_enabled() and h.requires_grad:
        return None
    if h.shape[0] >= DEQUANT_MIN_ROWS:  # QuantLinear takes its de-quantized GEMM path there
        return None
    if ctx.slot_mapping.dtype != torch.int64 or not layers:
        return None
    # The same rule the layers' own decode attention follows (USERLLM_KERNELS, dtypes).
    mod = cpu_decode_kernel(h, layers[0].self_attn.k_cache, ctx.block_tables, ctx.context_lens)
    if mod is None:
        return None
    plan = []
    for layer in layers:
        sub = layer._modules
        attn, mlp = sub["self_attn"], sub["mlp"]
        norms = []
        for norm in (sub["input_layernorm"], sub["post_attention_layernorm"]):
            w = norm._parameters["weight"]
            if w.dtype != torch.float32:
                return None
            norms.append((w, norm.eps))
        lins = [attn._modules[n] for n in _PROJECTIONS] + [mlp._modules[n] for n in _MLP]
        if any(type(m) is not QuantLinear or m._parameters.get("bias") is not None
               for m in lins):
            return None
        if attn.k_cache.numel() == 0 or attn.k_cache.dtype != torch.float32:
            return None
        weights = [(m._buffers["qweight"], m._buffers["scales"], m._buffers["offsets"],
                    m.group_size) for m in lins]
        plan.append((norms, weights, attn))
    return mod, plan


def _mm(mod, x: torch.Tensor, w: tuple) -> torch.Tensor:
    codes, scales, offsets, group_size = w
    if offsets is not None:  # int4
        return mod.q4_mm(x, codes, scales, offsets, group_size)
    return mod.q8_mm(x, codes, scales, group_size)


def _many(mod, x: torch.Tensor, ws: list[tuple]) -> list[torch.Tensor]:
    return mod.quant_mm_many(x, [w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws],
                             [w[3] for w in ws])


@torch.no_grad()
def run_decode_layers(mod, plan: list, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      ctx: ForwardContext) -> torch.Tensor:
    """Hidden states after every decoder layer (the final norm is the caller's)."""
    n = h.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    slots, tables, lens = (ctx.slot_mapping.contiguous(), ctx.block_tables.contiguous(),
                           ctx.context_lens.contiguous())
    for (norm_in, norm_post), w, attn in plan:
        heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k, v = _many(mod, mod.rms_norm(h, *norm_in), w[0:3])
        out = mod.decode_step(q.view(n, heads, d), k.view(n, kv_heads, d), v.view(n, kv_heads, d),
                              cos, sin, attn.k_cache, attn.v_cache, slots, tables, lens,
                              attn.scale)
        h = h + _mm(mod, out.reshape(n, heads * d), w[3])
        gate, up = _many(mod, mod.rms_norm(h, *norm_post), w[4:6])
        h = h + _mm(mod, F.silu(gate) * up, w[6])
    return h
