"""Weight-only quantization: QuantLinear against the float reference, GGUF block re-layout
against the gguf reader's own de-quantization, the Triton kernel against the PyTorch path, and
the engine on quantized weights (batching invariance, cancellation, a personalized request
with full-precision cross blocks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import make_tiny_llama, random_prompts
from llm.engine import Engine, SamplingParams
from llm.quantize import count_linears
from llm.layers.quant import (DEQUANT_MIN_ROWS, QuantEmbedding, QuantLinear, quantize_int4,
                              quantize_int8, round_activations)

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


# The same file tests/llm/conftest.py names (a plain `from conftest import` finds another test
# folder's conftest under the full suite).
SMOLLM2_GGUF = (Path(__file__).resolve().parents[2] / ".." / "shared" / "models"
                / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (160, 384)])
def test_quant_linear_matches_float_reference(bits, group_size, shape):
    n, k = shape
    torch.manual_seed(n + k + bits)
    lin = torch.nn.Linear(k, n, bias=True)
    ql = QuantLinear.from_float(lin, bits, group_size)
    w = ql.dequantize()
    # Quantization error of the weights themselves: int8 ~0.4%, int4 ~6.5% (uniform weights).
    assert _relative(w, lin.weight) < (0.01 if bits == 8 else 0.1)
    # The packed layout is lossless: codes, scales and offsets come back exactly.
    canon = (quantize_int4 if bits == 4 else quantize_int8)(lin.weight, group_size)
    back = ql.quantized()
    assert torch.equal(back.q, canon.q) and torch.equal(back.scale, canon.scale)
    assert torch.equal(back.dequantize(), canon.dequantize()) and torch.equal(w, back.dequantize())
    for rows in (1, 5, DEQUANT_MIN_ROWS + 3):  # the CPU kernel and the de-quantized GEMM
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k).to(dtype)
            y = ql(x)
            assert y.dtype == dtype and y.shape == (rows, n)
            exact = round_activations(x.float()) @ w.t() + lin.bias  # what both paths compute
            assert _relative(y, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
            # Against unrounded activations: int8 activation blocks cost ~0.5%.
            assert _relative(y, x.float() @ w.t() + lin.bias) < 2e-2
    x3 = torch.randn(2, 3, k)  # leading dims kept
    assert ql(x3).shape == (2, 3, n)


def test_cpu_kernel_builds_agree_with_the_reference():
    """The AVX2 and (where the CPU has it) AVX-512 VNNI builds of the CPU kernel compute the
    same sums: activation-row counts 1-9 cover the 4-row chunks and each tail, group sizes
    32-128 the per-group scale walk."""
    from llm.kernels.cpu_quant import best_isa, build

    isas = ["avx2"] + (["avx512_vnni"] if best_isa() == "avx512_vnni" else [])
    mods = [m for m in (build(isa) for isa in isas) if m is not None]
    if not mods:
        pytest.skip("the CPU extension did not build here")
    assert [m.isa for m in mods] == isas[:len(mods)]
    for bits in (4, 8):
        for group_size in (32, 64, 128):
            torch.manual_seed(bits * group_size)
            ql = QuantLinear.from_float(torch.nn.Linear(256, 96, bias=False), bits, group_size)
            w = ql.dequantize()
            for rows in range(1, 10):
                x = torch.randn(rows, 256)
                exact = round_activations(x) @ w.t()
                for mod in mods:
                    y = (mod.q4_mm(x, ql.qweight, ql.scales, ql.offsets, group_size) if bits == 4
                         else mod.q8_mm(x, ql.qweight, ql.scales, group_size))
                    assert _relative(y, exact) < 1e-6, (mod.isa, bits, group_size, rows)
            # The prefill path's two passes: bit-identical to the PyTorch forms.
            for mod in mods:
                out = torch.empty(96, 256)
                mod.dequantize(out, ql.qweight, ql.scales, ql.offsets, group_size, bits)
                assert torch.equal(out, ql.quantized().dequantize()), (mod.isa, bits, group_size)
                x = torch.randn(7, 256) * 5
                x[2] = 0  # an all-zero block: scale 0, codes 0
                assert torch.equal(mod.round_activations(x), round_activations(x)), mod.isa


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_embedding_reads_head_rows(bits):
    torch.manual_seed(bits)
    ql = QuantLinear.from_float(torch.nn.Linear(64, 96, bias=False), bits, 32)
    emb = QuantEmbedding(ql)
    ids = torch.tensor([[0, 5, 95], [17, 33, 40]])
    assert torch.equal(emb(ids), ql.dequantize()[ids])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_relayout_matches_gguf_dequantize(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from llm.gguf_blocks import decode_blocks

    t = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 2, (64, 1))).astype(np.float32)
    raw = quantize(w, t)
    qt = decode_blocks(raw, qtype, 64, 256)
    reference = torch.from_numpy(dequantize(raw, t).astype(np.float32))
    # Q4_0's d * (q - 8) is computed as d * q + (-8 d) here: one more fp32 rounding.
    torch.testing.assert_close(qt.dequantize(), reference, rtol=0,
                               atol=0 if qtype != "Q4_0" else 1e-6)
    # And through the module: the codes and fp32 scales are held without loss.
    ql = QuantLinear(256, 64, qt.bits, 32)
    ql.load_quantized(qt)
    assert torch.equal(ql.dequantize(), qt.dequantize())


@pytest.mark.xdist_group("smollm2")
def test_smollm2_gguf_blocks_equal_transformers_dequantization(smollm2_checkpoint):
    from llm.gguf_blocks import gguf_state
    from llm.layers.quant import QuantizedTensor

    cfg = smollm2_checkpoint.hf_config
    seen = 0
    for name, value in gguf_state(SMOLLM2_GGUF, cfg.num_attention_heads,
                                  cfg.num_key_value_heads):
        w = value.dequantize() if isinstance(value, QuantizedTensor) else value
        # transformers de-quantizes and undoes llama.cpp's q/k row permutation: bit-equal.
        assert torch.equal(w, smollm2_checkpoint.state_dict[name]), name
        seen += 1
    assert seen == len(smollm2_checkpoint.state_dict) - 1  # lm_head is tied to the embeddings


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_triton_quant_matmul_matches_reference(bits, group_size, rows):
    from llm.kernels.quant_matmul import quant_matmul_triton

    torch.manual_seed(rows)
    ql = QuantLinear.from_float(torch.nn.Linear(128, 96, bias=False), bits, group_size)
    w = ql.dequantize()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(rows, 128).to(dtype)
        out = quant_matmul_triton(x, ql.qweight, ql.scales, ql.offsets, bits, group_size)
        assert out.dtype == dtype
        assert _relative(out, x.float() @ w.t()) < tol


# --- the engine on quantized weights --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-quant"))


def _engine(path, **kw) -> Engine:
    kw.setdefault("kv_cache_bytes", 1 << 21)
    return Engine.from_pretrained(path, **kw)


def _run(eng: Engine, done: dict) -> None:
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_batching_invariance(tiny_path, mode):
    target = random_prompts(1, [37], seed=2)[0]
    alone = _engine(tiny_path, quantize=mode).generate([target], GREEDY)[0].token_ids
    eng = _engine(tiny_path, quantize=mode, max_num_batched_tokens=48, block_size=8)
    # Every decoder linear in `mode`, the head (320 rows: a multiple of 32) in int8.
    counts = count_linears(eng.model)
    assert counts["float"] == 0 and counts[mode] == 2 * 7 + (mode == "int8")
    assert counts["int8"] == 2 * 7 * (mode == "int8") + 1
    done: dict = {}
    target_id = None
    for i, prompt in enumerate(random_prompts(16, [5, 23, 61, 100, 12, 44], seed=3)):
        eng.add_request(prompt, sampling=SamplingParams(temperature=0, max_tokens=4 + i % 9,
                                                         ignore_eos=True))
        if i == 7:
            target_id = eng.add_request(target, sampling=GREEDY)
        if i % 2:
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
    _run(eng, done)
    assert done[target_id] == alone and len(done) == 17


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_flat_cpu_decode_loop_is_bit_identical_to_the_modules(tiny_path, mode, monkeypatch):
    """llm/cpu_decode.py runs a decode step's layers without module dispatch: every logit of
    every step equals the module path's, for 1 and 5 sequences at once; it did run; and a
    step with 64+ rows (QuantLinear's de-quantized path) is left to the modules."""
    from llm import cpu_decode

    if __import__("llm.kernels.cpu_quant", fromlist=["kernel"]).kernel() is None:
        pytest.skip("the CPU extension did not build here")
    monkeypatch.delenv("USERLLM_KERNELS", raising=False)
    prompts = random_prompts(5, [9, 30, 4, 17, 50], seed=4)
    flat_runs = []
    real = cpu_decode.run_decode_layers
    monkeypatch.setattr(cpu_decode, "run_decode_layers",
                        lambda *a: flat_runs.append(a[2].shape[0]) or real(*a))
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(cpu_decode, "ENABLED", enabled)
        eng = _engine(tiny_path, quantize=mode)
        logits: list[torch.Tensor] = []
        head = eng.model.compute_logits
        eng.model.compute_logits = lambda h: logits.append(head(h).clone()) or logits[-1]
        tokens = [eng.generate([prompts[0]], GREEDY)[0].token_ids,
                  [o.token_ids for o in eng.generate(prompts, GREEDY)]]
        results[enabled] = (tokens, logits)
    assert results[True][0] == results[False][0]
    assert len(results[True][1]) == len(results[False][1])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    assert 1 in flat_runs and 5 in flat_runs
    h = torch.zeros(64, 8)
    ctx = type("Ctx", (), {"is_prefill": False})()
    assert cpu_decode.plan_for(torch.nn.ModuleList(), h, ctx) is None


def test_quantized_engine_cancel_returns_all_blocks(tiny_path):
    eng = _engine(tiny_path, quantize="int4", cross_every_n=1, user_dim=8, block_size=8)
    free0 = (eng.block_manager.num_free_blocks, eng.cross_manager.num_free_blocks)
    u = torch.randn(5, 8)
    ids = [eng.add_request(p, user_tokens=u if i % 2 else None, sampling=GREEDY)
           for i, p in enumerate(random_prompts(6, [20, 50], seed=5))]
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < free0[0]
    assert all(eng.cancel(rid) for rid in ids)
    assert (eng.block_manager.num_free_blocks, eng.cross_manager.num_free_blocks) == free0
    assert not eng.has_unfinished()


def test_personalized_request_on_quantized_base_with_float_cross_blocks(tiny_path):
    # No prefix cache: both engines below then run the same row counts in every step, so the
    # quantized linears take the same path (packed int kernel or de-quantized GEMM) in both.
    eng = _engine(tiny_path, quantize="int8", cross_every_n=1, user_dim=8, block_size=8,
                  enable_prefix_caching=False)
    blocks = eng.model.model.cross_blocks
    # The user-token path stays full precision: plain float linears, no codes.
    assert not any(isinstance(m, QuantLinear) for m in blocks.modules())
    assert all(p.dtype == torch.float32 for p in blocks.parameters())
    assert any(isinstance(m, QuantLinear) for m in eng.model.model.layers.modules())
    torch.manual_seed(0)
    for block in blocks.values():
        block.gate_attn.data.fill_(0.8)
        block.gate_mlp.data.fill_(0.8)
        for p in block.cross_attn.parameters():
            p.data.normal_(0, 0.3)
    prompt = random_prompts(1, [30], seed=7)[0]
    u1, u2 = torch.randn(6, 8) * 3, torch.randn(3, 8) * 3
    with_users = eng.generate([prompt, prompt, prompt], GREEDY, user_tokens=[u1, u2, None])
    assert with_users[0].token_ids != with_users[1].token_ids
    # The request without user tokens is exactly the quantized base model.
    base = _engine(tiny_path, quantize="int8", block_size=8, enable_prefix_caching=False)
    assert with_users[2].token_ids == base.generate([prompt] * 3, GREEDY)[2].token_ids


def test_quantize_modes_are_checked(tiny_path):
    with pytest.raises(ValueError, match="quantize must be one of"):
        _engine(tiny_path, quantize="int3")
    with pytest.raises(ValueError, match="not a GGUF file"):
        _engine(tiny_path, quantize="gguf")


@pytest.mark.xdist_group("smollm2")
def test_smollm2_gguf_kept_quantized_small_and_personalizes():
    from llm.quantize import weight_bytes

    if not SMOLLM2_GGUF.is_file():
        pytest.skip("SmolLM2 GGUF not available")
    eng = Engine.from_pretrained(SMOLLM2_GGUF, kv_cache_bytes=16 << 20, cross_every_n=10,
                                 user_dim=16)
    assert count_linears(eng.model) == {"int4": 210, "int8": 1, "float": 0}
    base_bytes = weight_bytes(eng.model) - sum(
        p.numel() * 4 for p in eng.model.model.cross_blocks.parameters())
    # 106 MiB: Q4_1 codes + fp32 d/m, Q8_0 tied head/embeddings + fp32 d, norms.
    assert base_bytes < 115 * 2**20
    for block in eng.model.model.cross_blocks.values():
        block.gate_attn.data.fill_(1.0)
        block.gate_mlp.data.fill_(1.0)
        for p in block.cross_attn.o_proj.parameters():
            p.data.mul_(50)  # fresh blocks are tiny: make users matter
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = eng.tokenizer.encode("I play the guitar and")
    g = torch.Generator().manual_seed(0)
    a, b = eng.generate([prompt, prompt], sp, user_tokens=[torch.randn(8, 16, generator=g),
                                                            None])
    assert len(a.token_ids) == len(b.token_ids) == 8
    assert a.token_ids != b.token_ids
