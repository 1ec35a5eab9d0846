"""The CPU engine's fast paths against plain oracles: prefill attention (own-K/V shortcut for
sequences without a cached prefix, matmul path for masked chunks), the decode gather plan
shared by a step's layers, and MKL-packed Linear weights (used only while valid)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm.kernels.reference import paged_decode_attention_torch, write_kv_torch
from llm.layers import paged
from llm.layers.linear import PACK_MIN_ROWS, Linear, packing_available

BS, HQ, HKV, D = 4, 6, 2, 8


def naive_attention(q, k, v, prefix, causal=True):
    """float64 softmax attention of q [T, Hq, D] over k/v [L, Hkv, D]; query i sees keys
    0 ..= prefix + i (all keys when not causal)."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for i in range(t):
        stop = prefix + i + 1 if causal else k.shape[0]
        for h in range(hq):
            kk, vv = k[:stop, h // group].double(), v[:stop, h // group].double()
            w = torch.softmax(kk @ q[i, h].double() / math.sqrt(d), 0)
            out[i, h] = w @ vv
    return out


def build_pool(seqs, seed=0):
    """seqs: [(prefix, new)] -> pool filled with every sequence's K/V (NaN elsewhere), block
    tables, and the per-sequence K/V and queries."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(p + n) // BS) for p, n in seqs) + 2
    k_cache = torch.full((num_blocks, BS, HKV, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    tables, ks, vs, qs = [], [], [], []
    for prefix, new in seqs:
        length = prefix + new
        blocks = [order.pop() for _ in range(-(-length // BS))]
        tables.append(blocks)
        k = torch.randn(length, HKV, D, generator=g)
        v = torch.randn(length, HKV, D, generator=g)
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(length)])
        write_kv_torch(k, v, k_cache, v_cache, slots)
        ks.append(k), vs.append(v), qs.append(torch.randn(new, HQ, D, generator=g))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, block_tables, ks, vs, qs


@pytest.mark.parametrize("matmul_path", [True, False])
def test_prefill_mixes_fresh_and_cached_prefix_sequences(monkeypatch, matmul_path):
    if not matmul_path:  # force the masked-SDPA branch for chunks after a prefix
        monkeypatch.setattr(paged, "_MATMUL_SCORES_BYTES", 0)
    seqs = [(0, 7), (9, 5), (0, 1), (13, 1), (6, 6)]
    k_cache, v_cache, tables, ks, vs, qs = build_pool(seqs)
    q = torch.cat(qs)
    k_new = torch.cat([k[p:] for k, (p, _) in zip(ks, seqs)])
    v_new = torch.cat([v[p:] for v, (p, _) in zip(vs, seqs)])
    cu = torch.tensor([0] + list(torch.tensor([n for _, n in seqs]).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor([p + n for p, n in seqs], dtype=torch.int32)
    out = paged.paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, D ** -0.5,
                                        k_new=k_new, v_new=v_new)
    for s, (prefix, new) in enumerate(seqs):
        want = naive_attention(qs[s], ks[s], vs[s], prefix)
        got = out[int(cu[s]):int(cu[s + 1])]
        assert torch.allclose(got.double(), want, atol=1e-5), f"sequence {s}"


def test_prefill_without_own_kv_reads_the_pool_and_cross_style_sees_all():
    seqs = [(0, 5), (8, 3)]
    k_cache, v_cache, tables, ks, vs, qs = build_pool(seqs, seed=1)
    q = torch.cat(qs)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    lens = torch.tensor([5, 11], dtype=torch.int32)
    causal = paged.paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, D ** -0.5)
    full = paged.paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, D ** -0.5,
                                         causal=False)
    for s, (prefix, _) in enumerate(seqs):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        assert torch.allclose(causal[rows].double(), naive_attention(qs[s], ks[s], vs[s], prefix),
                              atol=1e-5)
        assert torch.allclose(full[rows].double(),
                              naive_attention(qs[s], ks[s], vs[s], prefix, causal=False),
                              atol=1e-5)


def test_decode_plan_is_shared_within_a_step_and_never_across_tables():
    seqs = [(11, 1), (2, 1), (20, 1)]
    k_cache, v_cache, tables, ks, vs, qs = build_pool(seqs, seed=2)
    q = torch.cat(qs)
    lens = torch.tensor([12, 3, 21], dtype=torch.int32)
    plain = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, D ** -0.5)
    plans: dict = {}
    first = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, D ** -0.5, plans)
    # a second "layer": other cache contents, same tables -> same plan, its own values
    k2, v2 = k_cache * 2, v_cache.flip(-1)
    second = paged_decode_attention_torch(q, k2, v2, tables, lens, D ** -0.5, plans)
    assert len(plans) == 1
    assert torch.equal(first, plain)
    assert torch.equal(second, paged_decode_attention_torch(q, k2, v2, tables, lens, D ** -0.5))
    # other tables in the same dict (cross-attention's) get their own plan
    short = torch.tensor([5, 3, 1], dtype=torch.int32)
    other = paged_decode_attention_torch(q, k_cache, v_cache, tables, short, D ** -0.5, plans)
    assert len(plans) == 2
    assert torch.equal(other, paged_decode_attention_torch(q, k_cache, v_cache, tables, short,
                                                           D ** -0.5))
    for s, length in enumerate(short.tolist()):
        want = naive_attention(qs[s], ks[s][:length], vs[s][:length], length - 1)
        assert torch.allclose(other[s:s + 1].double(), want, atol=1e-5)


needs_mkl = pytest.mark.skipif(not packing_available(),
                               reason="this torch build has no MKL packed GEMM")


@needs_mkl
@pytest.mark.parametrize("rows", [1, PACK_MIN_ROWS - 1, PACK_MIN_ROWS, 8, 13, 16, 600])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_plain(rows, bias):
    torch.manual_seed(rows)
    lin = Linear(48, 80, bias=bias)
    assert lin.prepack()
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        uses_pack = lin._usable_pack(x) is not None
        got = lin(x)
    assert uses_pack == (rows >= PACK_MIN_ROWS)
    want = F.linear(x, lin.weight, lin.bias).detach()
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@needs_mkl
@pytest.mark.parametrize("rows, pad", [(8, 0), (5, 16)])
def test_packed_product_really_runs(rows, pad):
    """_mkl_linear falls back to a plain mm when told the wrong row count: see none ran."""
    lin = Linear(32, 300, bias=False)
    assert lin.prepack(pad_rows_to=pad)
    x = torch.randn(rows, 32)
    with torch.inference_mode():
        ran = ops_run(lambda: lin(x))
    assert "mkl::_mkl_linear" in ran and not ran & {"aten::mm", "aten::addmm"}


@needs_mkl
def test_padded_rows_give_the_same_rows():
    torch.manual_seed(0)
    lin = Linear(32, 300, bias=False)
    assert lin.prepack(pad_rows_to=16)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        got = lin(x)
    assert got.shape == (5, 300)
    assert torch.allclose(got, F.linear(x, lin.weight).detach(), atol=1e-5)


@needs_mkl
def test_stale_pack_is_never_used():
    torch.manual_seed(0)
    lin = Linear(32, 40)
    x = torch.randn(8, 32)
    assert lin.prepack()
    with torch.no_grad():
        lin.weight.mul_(3)  # in-place change: the version counter moves
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert lin._pack is None
    assert lin.prepack()
    lin.weight = torch.nn.Parameter(torch.randn(40, 32))  # replaced tensor
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert lin._pack is None


@needs_mkl
def test_autograd_takes_the_plain_product():
    lin = Linear(16, 24)
    assert lin.prepack()
    x = torch.randn(8, 16)
    assert lin._usable_pack(x) is None  # grad mode, trainable weight
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_no_pack_off_cpu_fp32_or_for_inference_tensors():
    with torch.inference_mode():
        assert not Linear(16, 24).prepack()  # no version counter to notice changes by
    lin = Linear(16, 24).to(torch.bfloat16)
    assert not lin.prepack()
    with torch.inference_mode():
        x = torch.randn(8, 16, dtype=torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


@needs_mkl
def test_model_packs_base_layers_only(tiny_checkpoint):
    from llm.loader import load_model

    folder, _ = tiny_checkpoint()
    model, _, _ = load_model(folder, cross_every_n=2, user_dim=8)
    packed = model.prepack_linears()
    base = [m for m in [*model.model.layers.modules(), model.lm_head] if isinstance(m, Linear)]
    users = [m for m in model.model.cross_blocks.modules() if isinstance(m, Linear)]
    assert users and packed == len(base)
    assert all(m._pack is not None for m in base) and all(m._pack is None for m in users)
    assert model.lm_head.pad_rows_to == 16
    model.drop_packed_linears()
    assert not any(m.is_packed for m in base)


@needs_mkl
def test_engine_packs_on_cpu_and_drops_on_close(tiny_checkpoint):
    from llm.engine import Engine, EngineConfig
    from llm.loader import load_model

    folder, _ = tiny_checkpoint()
    model, tokenizer, _ = load_model(folder)
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_bytes=1 << 20))
    assert model.lm_head.is_packed
    engine.close()
    assert not any(m.is_packed for m in model.modules() if isinstance(m, Linear))
    unpacked = Engine(model, tokenizer, EngineConfig(kv_cache_bytes=1 << 20,
                                                     cpu_packed_weights=False))
    assert not model.lm_head.is_packed
    unpacked.close()
