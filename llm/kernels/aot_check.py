"""Compile the Triton kernels for a real GPU target on a machine without one.

Triton lowers a kernel to PTX and runs its bundled ptxas, so a CPU-only machine can still catch
what the interpreter never sees (type and layout errors of the compiled path) and read register
and spill counts. Must run with TRITON_INTERPRET unset or 0 (the interpreter replaces the
compiler's builder); the tests call it in a subprocess for that reason.

    TRITON_INTERPRET=0 python -m llm.kernels.aot_check [--arch 90]   # one JSON line per kernel
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llm.kernels import kv_write, paged_decode, paged_prefill

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

# (dtype, use_dot, GQA group, head_dim, num_splits): the shapes the engine meets.
DECODE_CASES = [
    ("bf16", True, 3, 64, 1),    # SmolLM2-135M, the CUDA default path
    ("fp16", True, 4, 128, 8),   # Llama-8B shape, split
    ("bf16", False, 3, 64, 4),   # broadcast path, split
    ("fp32", False, 8, 80, 2),   # fp32, head_dim not a power of 2
]

# (dtype, GQA group, head_dim, causal) for the varlen prefill kernel.
PREFILL_CASES = [
    ("bf16", 3, 64, True),    # SmolLM2-135M self-attention
    ("bf16", 3, 64, False),   # its cross-attention to user tokens
    ("fp16", 4, 128, True),   # Llama-8B shape
    ("fp32", 3, 64, True),    # fp32 (tests, parity): ieee dot
]


def _compile(kernel, signature: dict, constants: dict, arch: int, num_warps: int = 4):
    signature = dict(signature, **{name: "constexpr" for name in constants})
    return triton.compile(ASTSource(kernel, signature, constants),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _ptxas_usage(compiled, arch: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    try:
        info = subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return {"registers": int(re.search(r"Used (\d+) registers", info).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
            "shared_bytes": compiled.metadata.shared}


def _decode_signature(dtype: str) -> dict:
    ptrs = {"q_ptr": dtype, "k_cache_ptr": dtype, "v_cache_ptr": dtype,
            "block_tables_ptr": "i32", "context_lens_ptr": "i32", "out_ptr": dtype,
            "part_out_ptr": "fp32", "part_lse_ptr": "fp32"}
    sig = {name: "*" + ty for name, ty in ptrs.items()}
    sig.update(qk_scale="fp32", tokens_per_split="i32", max_pages="i32")
    for name in ("stride_q_seq", "stride_q_head", "stride_c_block", "stride_c_tok",
                 "stride_c_head", "stride_bt_seq", "stride_o_seq", "stride_o_head"):
        sig[name] = "i32"
    return sig


def check_all(arch: int = 90) -> list[dict]:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"
    rows = []
    for dtype, use_dot, group, head_dim, splits in DECODE_CASES:
        # the launch shape the host wrapper would pick, block size 16 (the engine default)
        group_pad, tile, num_warps = paged_decode.launch_shape(use_dot, group, head_dim)
        constants = dict(NUM_Q_HEADS=3 * group, GROUP=group, GROUP_PAD=group_pad,
                         HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
                         BLOCK_SIZE=16, TILE=tile, NUM_SPLITS=splits,
                         USE_DOT=use_dot, DOT_PRECISION="ieee" if dtype == "fp32" else None)
        compiled = _compile(paged_decode._paged_decode_kernel, _decode_signature(dtype),
                            constants, arch, num_warps=num_warps)
        rows.append({"kernel": "paged_decode", "dtype": dtype, "use_dot": use_dot,
                     "group": group, "head_dim": head_dim, "num_splits": splits,
                     "tile_tokens": tile, "num_warps": num_warps,
                     **_ptxas_usage(compiled, arch)})
    combine = _compile(paged_decode._combine_splits_kernel,
                       {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16",
                        "stride_o_seq": "i32", "stride_o_head": "i32"},
                       dict(NUM_Q_HEADS=9, HEAD_DIM=64, HEAD_PAD=64, NUM_SPLITS=5, SPLITS_PAD=8),
                       arch)
    rows.append({"kernel": "combine_splits", "dtype": "bf16", **_ptxas_usage(combine, arch)})
    write = _compile(kv_write._write_kv_kernel,
                     {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*bf16",
                      "v_cache_ptr": "*bf16", "slot_ptr": "*i64", "stride_k_tok": "i32",
                      "stride_v_tok": "i32"},
                     dict(ROW=192, BLOCK=256), arch)
    rows.append({"kernel": "write_kv", "dtype": "bf16", **_ptxas_usage(write, arch)})
    for dtype, group, head_dim, causal in PREFILL_CASES:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        block_m, tile, num_warps = paged_prefill.launch_shape(head_dim, torch_dtype[dtype])
        sig = {name: f"*{dtype}" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        sig.update(block_tables_ptr="*i32", context_lens_ptr="*i32", cu_seqlens_ptr="*i32",
                   qk_scale="fp32", max_pages="i32")
        for name in ("stride_q_tok", "stride_q_head", "stride_c_block", "stride_c_tok",
                     "stride_c_head", "stride_bt_seq", "stride_o_tok", "stride_o_head"):
            sig[name] = "i32"
        constants = dict(GROUP=group, HEAD_DIM=head_dim,
                         HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=16,
                         BLOCK_M=block_m, TILE=tile, CAUSAL=causal,
                         DOT_PRECISION="ieee" if dtype == "fp32" else None)
        compiled = _compile(paged_prefill._paged_prefill_kernel, sig, constants, arch,
                            num_warps=num_warps)
        rows.append({"kernel": "paged_prefill", "dtype": dtype, "group": group,
                     "head_dim": head_dim, "causal": causal, "block_m": block_m,
                     "tile_tokens": tile, "num_warps": num_warps,
                     **_ptxas_usage(compiled, arch)})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    for row in check_all(ap.parse_args().arch):
        print(json.dumps(row))
