"""Paged-attention kernels: Triton on GPU, a PyTorch reference on CPU (see ops.py)."""
from llm.kernels.ops import (  # noqa: F401
    cross_decode_attention,
    gather_kv,
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    write_kv,
    write_kv_torch,
    write_kv_triton,
)
