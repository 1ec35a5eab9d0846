"""Triton paged decode vs the PyTorch reference, and the reference vs dense SDPA.

Every pool starts full of NaN (torch.empty memory at its worst): a kernel that lets a masked or
unwritten slot into a result fails loudly. On a GPU machine run with TRITON_INTERPRET=0 to
compile the kernels for real; the CPU cases then skip, the CUDA cases run.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llm.kernels.ops import (
    backend_for,
    cross_decode_attention,
    gather_kv,
    paged_decode_attention,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
    write_kv,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need_triton_on(device: str) -> None:
    """Triton runs CPU tensors only in the interpreter; on a GPU machine run the suite with
    TRITON_INTERPRET=0 to compile the kernels for real (the CPU cases then skip)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def empty_pool(num_blocks, block_size, hkv, d, dtype, device):
    """A pool full of NaN: like torch.empty memory at its worst. Any kernel that lets an
    unwritten or masked slot leak into a result shows up as NaN."""
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return k_cache, k_cache.clone()


def paged_case(lens, block_size, hkv, d, dtype, device, seed=0, spare_cols=2, spare_blocks=3):
    """Random dense K/V per sequence, written to randomly placed blocks of a NaN pool.

    Returns (k_cache, v_cache, block_tables [S, W] int32 -1 padded, context_lens [S] int32,
    dense [(K [L, Hkv, D], V [L, Hkv, D]) per sequence]).
    """
    g = torch.Generator().manual_seed(seed)
    pages = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(pages) + spare_blocks
    width = max(pages + [0]) + spare_cols
    order = torch.randperm(num_blocks, generator=g)
    k_cache, v_cache = empty_pool(num_blocks, block_size, hkv, d, dtype, device)
    block_tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    dense, used = [], 0
    for s, (n, p) in enumerate(zip(lens, pages)):
        blocks = order[used:used + p]
        used += p
        block_tables[s, :p] = blocks.to(torch.int32)
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        pos = torch.arange(n)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        flat = (num_blocks * block_size, hkv, d)
        k_cache.view(flat)[slots.to(device)] = k.to(device)
        v_cache.view(flat)[slots.to(device)] = v.to(device)
        dense.append((k.to(device), v.to(device)))
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache, v_cache, block_tables.to(device), context_lens.to(device), dense


def tolerance(dtype):
    return {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


def dense_attention(q, dense, scale):
    """The oracle's oracle: SDPA over contiguous K/V, one sequence at a time, fp32."""
    outs = []
    for s, (k, v) in enumerate(dense):
        hq, d = q.shape[1:]
        if k.shape[0] == 0:
            outs.append(torch.zeros(hq, d, device=q.device))
            continue
        group = hq // k.shape[1]
        kk = k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, L, D]
        vv = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(q[s].float()[:, None, :], kk, vv, scale=scale)
        outs.append(o[:, 0, :])
    return torch.stack(outs)


LENS = [7, 16, 1, 33, 20]  # partial last blocks, an exact multiple, a single token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_matches_dense_sdpa(device, group):
    hkv, d, bs = 2, 16, 8
    k_cache, v_cache, bt, cl, dense = paged_case(LENS + [0], bs, hkv, d, torch.float32, device)
    q = torch.randn(len(dense), hkv * group, d, device=device)
    out = paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, scale=d ** -0.5)
    want = dense_attention(q, dense, d ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out[-1].abs().max() == 0  # context_len 0 -> zeros


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_returns_contiguous_sequences(device):
    k_cache, v_cache, bt, cl, dense = paged_case([5, 12, 0], 4, 2, 16, torch.float32, device)
    k, v, valid = gather_kv(k_cache, v_cache, bt, cl)
    assert k.shape == (3, 12, 2, 16) and valid.sum(1).tolist() == [5, 12, 0]
    for s, (dk, dv) in enumerate(dense):
        n = dk.shape[0]
        assert torch.equal(k[s, :n], dk) and torch.equal(v[s, :n], dv)
        assert k[s, n:].abs().sum() == 0 and v[s, n:].abs().sum() == 0  # padding is 0, not NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_triton_decode_matches_reference(device, dtype, group, num_splits):
    need_triton_on(device)
    hkv, d, bs = 2, 16, 4
    k_cache, v_cache, bt, cl, dense = paged_case(LENS, bs, hkv, d, dtype, device, seed=group)
    q = torch.randn(len(LENS), hkv * group, d, device=device).to(dtype)
    scale = d ** -0.5
    got = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, scale, num_splits=num_splits,
                                        use_dot=False)
    want = paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got, want, **tolerance(dtype))
    torch.testing.assert_close(got.float(), dense_attention(q, dense, scale), **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_tensor_core_path_matches_reference(device, dtype, group, num_splits):
    """use_dot=True: the GQA group padded to 16 rows, scores and P@V through tl.dot (the CUDA
    default for fp16/bf16), 16-token tiles over 4-token pages."""
    need_triton_on(device)
    if os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot "
                    "(triton-lang/triton#11584); runs compiled on CUDA (TRITON_INTERPRET=0)")
    hkv, d, bs = 2, 16, 4
    lens = LENS + [70]
    k_cache, v_cache, bt, cl, dense = paged_case(lens, bs, hkv, d, dtype, device, seed=group)
    q = torch.randn(len(lens), hkv * group, d, device=device).to(dtype)
    scale = d ** -0.5
    got = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, scale, num_splits=num_splits,
                                        use_dot=True)
    want = paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, scale)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,num_splits,tile_tokens", [
    (8, 1, 8), (8, 2, 16), (8, 5, 8), (8, 32, 16),  # tiles of whole pages
    (3, 1, 8), (3, 4, 16), (5, 3, 4), (16, 2, 4),   # pages straddling tiles, tiles inside pages
])
def test_triton_decode_long_context_split_counts(device, block_size, num_splits, tile_tokens):
    """Many tiles per split, splits that do and do not divide the context evenly, more splits
    than tiles (the count is trimmed so no split is empty), block sizes that are not powers of
    2 (tiles are token ranges; each token looks up its own block)."""
    need_triton_on(device)
    hkv, d = 1, 32
    lens = [150, 3, 64]
    k_cache, v_cache, bt, cl, dense = paged_case(lens, block_size, hkv, d, torch.float32, device)
    q = torch.randn(len(lens), 3 * hkv, d, device=device)  # group 3: padded to 4 in the kernel
    got = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, 0.2,
                                        num_splits=num_splits, tile_tokens=tile_tokens)
    torch.testing.assert_close(got, paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, 0.2),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_decode_odd_head_dim_and_strided_q(device):
    """head_dim 24 (not a power of 2) and q as a slice of a fused qkv projection."""
    need_triton_on(device)
    hkv, d, bs, hq = 2, 24, 16, 4
    k_cache, v_cache, bt, cl, dense = paged_case([17, 40, 9], bs, hkv, d, torch.float32, device)
    qkv = torch.randn(3, (hq + 2 * hkv) * d, device=device)
    q = qkv[:, : hq * d].view(3, hq, d)
    assert not q.is_contiguous()
    got = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, d ** -0.5, num_splits=2)
    torch.testing.assert_close(got, dense_attention(q, dense, d ** -0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_cross_style_zero_lengths_give_zeros(device, backend, num_splits, monkeypatch):
    """Cross-attention use: user-token K/V per request, some requests have none (length 0 and
    an all -1 block-table row); a batch where nobody has user tokens at all."""
    if backend == "triton":
        need_triton_on(device)
    monkeypatch.setenv("USERLLM_KERNELS", backend)
    hkv, d, bs, hq = 2, 16, 4, 4
    lens = [0, 6, 0, 13]
    k_cache, v_cache, bt, cl, dense = paged_case(lens, bs, hkv, d, torch.float32, device)
    q = torch.randn(len(lens), hq, d, device=device)
    if backend == "triton":
        out = paged_decode_attention_triton(q, k_cache, v_cache, bt, cl, 0.25, num_splits=num_splits)
    else:
        out = cross_decode_attention(q, k_cache, v_cache, bt, cl, 0.25)
    assert not out.isnan().any()
    assert out[0].abs().max() == 0 and out[2].abs().max() == 0
    torch.testing.assert_close(out, dense_attention(q, dense, 0.25), atol=1e-5, rtol=1e-5)

    nobody = torch.zeros(len(lens), dtype=torch.int32, device=device)
    empty_tables = torch.full_like(bt, -1)
    out = cross_decode_attention(q, k_cache, v_cache, empty_tables, nobody, 0.25)
    assert out.abs().max() == 0 and not out.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_follows_device_and_environment(device, monkeypatch):
    t = torch.zeros(1, device=device)
    monkeypatch.delenv("USERLLM_KERNELS", raising=False)
    assert backend_for(t) == ("triton" if device == "cuda" else "torch")
    monkeypatch.setenv("USERLLM_KERNELS", "torch")
    assert backend_for(t) == "torch"
    monkeypatch.setenv("USERLLM_KERNELS", "triton")
    assert backend_for(t) == "triton"
    monkeypatch.setenv("USERLLM_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="USERLLM_KERNELS"):
        backend_for(t)


@pytest.mark.parametrize("device", DEVICES)
def test_public_entry_points_agree_across_backends(device, monkeypatch):
    """paged_decode_attention / write_kv under each forced backend give the same cache and
    output (fp32, GQA 3:1 as in SmolLM2)."""
    need_triton_on(device)
    hkv, d, bs, hq = 1, 16, 4, 3
    lens = [5, 11]
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("USERLLM_KERNELS", backend)
        k_cache, v_cache, bt, cl, _ = paged_case(lens, bs, hkv, d, torch.float32, device, seed=7)
        # decode step: each sequence appends one token at position len, then attends over len+1
        new_k = torch.randn(2, hkv, d, generator=torch.Generator().manual_seed(1)).to(device)
        new_v = torch.randn(2, hkv, d, generator=torch.Generator().manual_seed(2)).to(device)
        pos = cl.long()
        slots = bt.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        write_kv(new_k, new_v, k_cache, v_cache, slots)
        q = torch.randn(2, hq, d, generator=torch.Generator().manual_seed(3)).to(device)
        results[backend] = paged_decode_attention(q, k_cache, v_cache, bt, cl + 1, 0.25)
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-5, rtol=1e-5)
    assert not results["torch"].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_reference_scratch_reuse_across_shapes(device):
    """The reference decode gathers into per-thread scratch: consecutive calls with growing,
    shrinking and different-dtype shapes must not see each other's data."""
    cases = [([40, 3], torch.float32), ([2], torch.float32), ([9, 60, 1], torch.float32),
             ([5, 5], torch.float16), ([33], torch.float32)]
    outs = []
    for i, (lens, dtype) in enumerate(cases):
        k_cache, v_cache, bt, cl, dense = paged_case(lens, 8, 1, 16, dtype, device, seed=i)
        q = torch.randn(len(lens), 2, 16, device=device).to(dtype)
        outs.append((paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, 0.25), q, dense))
    for out, q, dense in outs:  # checked after all calls: earlier outputs are not aliased
        torch.testing.assert_close(out.float(), dense_attention(q, dense, 0.25),
                                   **tolerance(out.dtype))


def _cpu_module():
    from llm.kernels.cpu_quant import kernel

    mod = kernel()
    if mod is None:
        pytest.skip("the CPU extension did not build here (no AVX2 or no compiler)")
    return mod


@pytest.mark.parametrize("hq,hkv,d,block_size", [(9, 3, 64, 16), (4, 2, 24, 4), (2, 2, 8, 8)])
def test_cpu_kernel_decode_matches_dense_attention(hq, hkv, d, block_size, monkeypatch):
    """The C++ decode attention (auto dispatch on CPU, fp32) reads the NaN pool through the
    block tables: SmolLM2's GQA 3:1 at head_dim 64, a head_dim that is no multiple of 8 (the
    scalar tail), empty sequences, and one long context across many blocks."""
    _cpu_module()
    monkeypatch.delenv("USERLLM_KERNELS", raising=False)
    lens = [1, 0, 37, block_size, 300]
    k_cache, v_cache, bt, cl, dense = paged_case(lens, block_size, hkv, d, torch.float32, "cpu")
    q = torch.randn(len(lens), hq, d)
    import llm.kernels.ops as ops

    def not_the_reference(*args, **kwargs):
        raise AssertionError("auto dispatch on CPU fp32 must take the C++ kernel")

    with monkeypatch.context() as m:
        m.setattr(ops, "paged_decode_attention_torch", not_the_reference)
        out = paged_decode_attention(q, k_cache, v_cache, bt, cl, d ** -0.5)
    assert not out.isnan().any() and out[1].abs().max() == 0
    torch.testing.assert_close(out, dense_attention(q, dense, d ** -0.5), atol=1e-5, rtol=1e-5)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, bt, cl, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # One sequence's result does not depend on the others in the step.
    alone = paged_decode_attention(q[2:3], k_cache, v_cache, bt[2:3], cl[2:3], d ** -0.5)
    assert torch.equal(alone, out[2:3])


def test_cpu_kernel_decode_refuses_a_block_outside_the_pool():
    """A corrupt block table is an error, never a read of someone else's memory."""
    mod = _cpu_module()
    k_cache, v_cache, bt, cl, _ = paged_case([5, 9], 4, 1, 8, torch.float32, "cpu")
    q = torch.randn(2, 1, 8)
    for bad in (-1, k_cache.shape[0]):
        broken = bt.clone()
        broken[1, 1] = bad
        with pytest.raises(RuntimeError, match="block table entry outside the pool"):
            mod.paged_decode(q, k_cache, v_cache, broken, cl, 0.3)
    short = cl.clone()
    short[0] = 4 * bt.shape[1] + 1
    with pytest.raises(RuntimeError, match="narrower than context length"):
        mod.paged_decode(q, k_cache, v_cache, bt, short, 0.3)
