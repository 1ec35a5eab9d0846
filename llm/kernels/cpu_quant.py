"""The CPU extension, compiled on first use with torch's extension builder and cached
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). It holds what a CPU decode step runs
outside MKL:
- the int4/int8 weight-only GEMV-GEMM (cpu_quant.cpp, cpu_quant_avx512.cpp);
- paged decode attention from the fp32 pool, alone or with RoPE and the K/V write of the step
  (cpu_attention.cpp, bound in cpu_ops.cpp; llm/kernels/ops.py dispatches to it);
- RMSNorm of fp32 rows (cpu_ops.cpp; llm/layers/rmsnorm.py).
At batch 1 a SmolLM2 decode step ran ~20 ATen calls per layer outside the GEMVs, and they cost
more than the arithmetic: each of these replaces several.

Why our own: torch 2.13's packed CPU ops (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`)
were measured 1.6-3x slower than this at decode sizes on the AVX2 box (SmolLM2's 1536x576
GEMV: 126 us int4pack with bf16, 1.9 ms with fp32 activations; 44 us here), and need bf16
activations and scales. This one reads llama.cpp-style blocks and multiplies int8 codes.

Two builds of the same source: AVX2, and AVX-512 VNNI (cpu_quant_avx512.cpp) where the CPU has
it. On a VNNI Xeon, SmolLM2's 1536x576 int4 GEMV at batch 1 from L2 took 38 us against 95 us
(the AVX2 loop is compute-bound); int8 was no faster there, and from DRAM both are
bandwidth-bound. The module's `isa` says which one runs; USERLLM_CPU_QUANT_ISA=avx2 forces the
AVX2 build.

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


ISAS = ("avx2", "avx512_vnni")
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                 "-DUSERLLM_AVX512_VNNI"]


def best_isa() -> str | None:
    """The fastest build this CPU runs (None: neither)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    forced = os.environ.get("USERLLM_CPU_QUANT_ISA")
    if forced:
        return forced if forced in ISAS else None
    return "avx512_vnni" if _cpu_flags() >= {"avx512f", "avx512bw", "avx512vl",
                                              "avx512_vnni"} else "avx2"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build():
    if os.environ.get("USERLLM_CPU_QUANT_KERNEL", "1") == "0":
        return None
    isa = best_isa()
    return None if isa is None else build(isa)


def build(isa: str):
    """The module for one instruction set (each cached under its own name), or None."""
    assert isa in ISAS
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        flags = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off"]
        return load(name=f"userllm_cpu_quant_{isa}",
                    sources=[str(here / f) for f in ("cpu_quant.cpp", "cpu_quant_avx512.cpp",
                                                          "cpu_attention.cpp", "cpu_ops.cpp")],
                    extra_cflags=flags + (_AVX512_FLAGS if isa == "avx512_vnni" else []),
                    extra_include_paths=[str(here)], verbose=False)
    except Exception as exc:  # no compiler / headers: the PyTorch path still works
        import warnings
        warnings.warn(f"CPU quant kernel unavailable ({type(exc).__name__}: {exc}); "
                      "using the PyTorch path", stacklevel=2)
        return None
