"""The CPU int4/int8 kernel (cpu_quant.cpp), compiled on first use with torch's extension
builder and cached (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).

Why our own: torch 2.13's packed CPU ops (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`)
were measured 1.6-3x slower than this at decode sizes on the AVX2 box (SmolLM2's 1536x576
GEMV: 126 us int4pack with bf16, 1.9 ms with fp32 activations; 44 us here), and need bf16
activations and scales. This one reads llama.cpp-style blocks and multiplies int8 codes.

`kernel()` returns the module or None (not x86 with AVX2, no compiler, or
USERLLM_CPU_QUANT_KERNEL=0); QuantLinear then runs its PyTorch path, which computes the same
numbers (activations rounded to int8 blocks the same way) with a de-quantized fp32 GEMM.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel():
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            _state["mod"] = _build()
    return _state["mod"]


def _build():
    if os.environ.get("USERLLM_CPU_QUANT_KERNEL", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("cpu_quant.cpp")
        return load(name="userllm_cpu_quant", sources=[str(src)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off"], verbose=False)
    except Exception as exc:  # no compiler / headers: the PyTorch path still works
        import warnings
        warnings.warn(f"CPU quant kernel unavailable ({type(exc).__name__}: {exc}); "
                      "using the PyTorch path", stacklevel=2)
        return None
