"""GGUF tensors read straight from the file (memory-mapped), quantized blocks re-laid out into
our `QuantizedTensor` without going through fp32.

Block formats (32 weights per block, one block row = one output channel's run of inputs):
- Q8_0: fp16 d, 32 x int8 q            -> w = d * q            (int8, scale d)
- Q4_0: fp16 d, 16 bytes of nibbles    -> w = d * (q - 8)      (int4, scale d, offset -8d)
- Q4_1: fp16 d, fp16 m, 16 bytes       -> w = d * q + m        (int4, scale d, offset m)
In a 16-byte nibble run, byte j holds weight j (low nibble) and weight j + 16 (high nibble):
the order QuantLinear keeps, so the codes are copied, not re-packed.

llama.cpp's converter permutes the q/k projection rows for its RoPE layout; transformers
undoes it when it de-quantizes, and so do we, on the codes and scales (a row permutation).
`gguf_state` yields one tensor at a time so a loader never holds the whole model unpacked.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llm.layers.quant import QuantizedTensor

BLOCK = 32
QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")

# llama-architecture GGUF names -> ours (transformers' Llama names).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def our_name(gguf_name: str) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{kind}"
    return f"{_TOP_NAMES[base]}.{kind}" if base in _TOP_NAMES else None


def decode_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> QuantizedTensor:
    """raw: the tensor's bytes [N, K / 32 * block bytes] -> the lossless QuantizedTensor."""
    assert k % BLOCK == 0, k
    # np.array copies one tensor's bytes: the memory map is read-only.
    blocks = torch.from_numpy(np.array(raw)).view(n, k // BLOCK, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedTensor(8, BLOCK, q, d, None)
    if qtype == "Q4_0":
        nib, offset = blocks[..., 2:], -8 * d
    elif qtype == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        nib, offset = blocks[..., 4:], m
    else:
        raise ValueError(f"GGUF block type {qtype} is not supported (supported: {QUANT_TYPES})")
    q = torch.cat([nib & 0xF, nib >> 4], dim=-1).reshape(n, k)
    return QuantizedTensor(4, BLOCK, q, d, offset)


def _rope_unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (same as transformers' reverse)."""
    idx = torch.arange(rows)
    return idx.view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows).argsort()


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def gguf_state(path: str | Path, num_heads: int, num_kv_heads: int,
               ) -> Iterator[tuple[str, Any]]:
    """(our name, QuantizedTensor | float32 tensor) per GGUF tensor, one at a time."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    if arch != "llama":
        raise ValueError(f"keeping GGUF blocks is supported for llama-architecture files, "
                         f"not {arch!r}; load with dequantize")
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None:
            continue
        qtype = t.tensor_type.name
        shape = [int(s) for s in reversed(t.shape)]  # ggml lists the fastest dim first
        if qtype in FLOAT_TYPES:
            arr = np.asarray(t.data)
            value: Any = torch.from_numpy(arr.astype(np.float32)).reshape(shape)
        elif qtype in QUANT_TYPES and len(shape) == 2:
            value = decode_blocks(np.asarray(t.data), qtype, shape[0], shape[1])
        else:
            raise ValueError(f"GGUF tensor {t.name} has type {qtype}: not supported when "
                             f"keeping blocks (supported: {QUANT_TYPES + FLOAT_TYPES}); "
                             "load with dequantize")
        heads = {"q_proj": num_heads, "k_proj": num_kv_heads}.get(name.split(".")[-2])
        if heads is not None and name.endswith(".weight"):
            index = _rope_unpermute_index(shape[0], heads)
            value = value.permute_rows(index) if isinstance(value, QuantizedTensor) \
                else value[index]
        yield name, value
