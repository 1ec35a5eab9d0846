"""Quantized base weights for a model: which layers, which format, and the GGUF fast path.

Modes (`Engine.from_pretrained(..., quantize=...)`, CLI `--quantize` / `--dequantize`):
- "int8" / "int4": quantize the base linears at load, from any checkpoint (group-wise scales,
  `group_size` 32, 64 or 128, default 32); the LM head is int8 in both;
- "gguf": keep a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as they are (re-laid out, never held
  in fp32): the default for a .gguf file;
- "none": full precision (the GGUF de-quantized by transformers, as before).

Only the base model's decoder linears and LM head are quantized. The cross-attention blocks
and the soft-prompt projection (the user-token path: small, and what an adapter trains on the
de-quantized fp32 base) stay in full precision, and so do norms and biases. A tied LM head
shares its codes with the token embeddings (`QuantEmbedding`); an untied embedding table
stays float (it is gathered, not streamed per token). Layers whose shapes do not fit the
kernels (out_features % 32, in_features % group_size) stay float.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.layers.linear import Linear
from llm.layers.quant import (QUANT_BITS, QuantEmbedding, QuantizedTensor, QuantLinear,
                              quantizable)

QUANTIZE_MODES = ("none", "gguf", "int8", "int4")
DEFAULT_GROUP_SIZE = 32


def resolve_mode(quantize: str | None, is_gguf: bool) -> str:
    mode = (quantize or ("gguf" if is_gguf else "none")).lower()
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    if mode == "gguf" and not is_gguf:
        raise ValueError("quantize='gguf' keeps a GGUF file's blocks; this checkpoint is not "
                         "a GGUF file (use 'int8' or 'int4')")
    return mode


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder layers' linears (float or quantized) and the LM head (never the user-token
    modules)."""
    found = {f"model.layers.{name}": m for name, m in model.model.layers.named_modules()
             if isinstance(m, (nn.Linear, QuantLinear))}
    found["lm_head"] = model.lm_head
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _tie(model: nn.Module) -> None:
    if model.config.tie_word_embeddings and isinstance(model.lm_head, QuantLinear):
        model.model.embed_tokens = QuantEmbedding(model.lm_head)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int | None = None) -> int:
    """In place: base linears -> QuantLinear (the float weights are released). Returns how
    many layers were quantized."""
    bits, gs = QUANT_BITS[mode], group_size or DEFAULT_GROUP_SIZE
    if gs not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {gs}")
    count = 0
    for name, lin in base_linears(model).items():
        if isinstance(lin, nn.Linear) and quantizable(lin.in_features, lin.out_features, gs):
            # The LM head (and the embeddings tied to it) in int8 in both modes, as llama.cpp's
            # files keep output/token_embd at 6-8 bits: an int4 head measured +6% perplexity
            # on SmolLM2 where the int4 layers alone cost far less (bench/engine_quantized).
            head_bits = 8 if name == "lm_head" else bits
            _set_module(model, name, QuantLinear.from_float(lin, head_bits, gs))
            count += 1
    _tie(model)
    return count


def build_gguf_quantized(path: str | Path, cfg: Any, model_cls: type) -> nn.Module:
    """The model with the GGUF's quantized blocks kept: built on the meta device, base linears
    swapped for QuantLinear shells of each tensor's type, then filled one tensor at a time."""
    from llm.gguf_blocks import QUANT_TYPES, gguf_state, gguf_tensor_types, our_name

    types = {our_name(k): v for k, v in gguf_tensor_types(path).items()}
    if cfg.tie_word_embeddings and "lm_head.weight" not in types:
        types["lm_head.weight"] = types.get("model.embed_tokens.weight")
    with torch.device("meta"):
        model = model_cls(cfg)
    for name, lin in base_linears(model).items():
        qtype = types.get(f"{name}.weight")
        if qtype in QUANT_TYPES and quantizable(lin.in_features, lin.out_features, 32):
            _set_module(model, name, QuantLinear(lin.in_features, lin.out_features,
                                                 8 if qtype == "Q8_0" else 4, 32,
                                                 bias=lin.bias is not None))
    _tie(model)  # before materialising: a tied quantized head never gets a float table
    model.to_empty(device="cpu")
    if cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, value in gguf_state(path, cfg.num_heads, cfg.num_kv_heads):
        if name == "model.embed_tokens.weight" and isinstance(model.lm_head, QuantLinear) \
                and cfg.tie_word_embeddings:
            name = "lm_head.weight"
        module = modules.get(name.rsplit(".", 1)[0])
        if isinstance(module, QuantLinear) and name.endswith(".weight"):
            module.load_quantized(value)
        elif name in params:
            w = value.dequantize() if isinstance(value, QuantizedTensor) else value
            params[name].data.copy_(w)
        else:
            raise ValueError(f"GGUF tensor {name} does not match the architecture")
        filled.add(name)
    expected = {n for n, m in modules.items() if isinstance(m, QuantLinear)}
    expected = {f"{n}.weight" for n in expected} | {
        n for n in params if not n.startswith(("model.cross_blocks.", "model.soft_prompt."))
        and not n.endswith(".bias")}
    missing = expected - filled
    if missing:
        raise ValueError(f"GGUF file lacks tensors: {sorted(missing)[:5]}")
    return model


def count_linears(model: nn.Module) -> dict[str, int]:
    """{'int4': n, 'int8': n, 'float': n} over the base linears (for logs and benchmarks)."""
    out = {"int4": 0, "int8": 0, "float": 0}
    for lin in base_linears(model).values():
        key = f"int{lin.bits}" if isinstance(lin, QuantLinear) else "float"
        out[key] += 1
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


__all__ = ["QUANTIZE_MODES", "resolve_mode", "quantize_model", "build_gguf_quantized",
           "count_linears", "weight_bytes", "Linear"]
