"""Paged decode attention: Triton split-KV kernel vs the PyTorch reference vs contiguous SDPA.

One decode step of one attention layer: S sequences, one query token each, context lengths drawn
from [L/2, L] (mixed, as in a real batch), K/V scattered over randomly placed blocks of a pool.
Side by side in one process:
  triton     paged_decode_attention_triton (CUDA only; under the CPU interpreter it is a
             correctness tool, not something to time)
  reference  paged_decode_attention_torch (gathers blocks, then SDPA)
  sdpa       F.scaled_dot_product_attention over a contiguous, max-length padded K/V cache with
             a length mask: the no-paging baseline a dense cache would give

Writes bench/results/kernels_decode.{json,md,png}. Every row also records the max abs difference
of each path against the reference, so a fast wrong kernel cannot hide here.

    python bench/kernels_decode.py                 # CUDA if present, else CPU (no Triton numbers)
    python bench/kernels_decode.py --shape llama8b --batch-sizes 1 16 64 --context-lens 1024 8192
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm.kernels.ops import paged_decode_attention_torch, paged_decode_attention_triton  # noqa: E402

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "smollm2-135m": (9, 3, 64),
    "llama8b": (32, 8, 128),
}
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def build_case(batch, max_len, hq, hkv, d, block_size, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, max_len // 2), max_len + 1, (batch,), generator=g)
    pages = (lens + block_size - 1) // block_size
    width = int(pages.max())
    num_blocks = int(pages.sum()) + 8
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((batch, width), -1, dtype=torch.int32)
    used = 0
    for s, p in enumerate(pages.tolist()):
        tables[s, :p] = order[used:used + p].to(torch.int32)
        used += p
    q = torch.randn(batch, hq, d, generator=g).to(device, dtype)
    tables, lens = tables.to(device), lens.to(device, torch.int32)
    # The contiguous baseline: each sequence's K/V copied out once (not timed), padded to max.
    dense_k = k_cache[tables.clamp(min=0).long()].view(batch, width * block_size, hkv, d)
    dense_v = v_cache[tables.clamp(min=0).long()].view(batch, width * block_size, hkv, d)
    dense_k = dense_k.transpose(1, 2).contiguous()  # [S, Hkv, Lpad, D]
    dense_v = dense_v.transpose(1, 2).contiguous()
    mask = torch.arange(width * block_size, device=device)[None, :] < lens.long()[:, None]
    return q, k_cache, v_cache, tables, lens, dense_k, dense_v, mask


def contiguous_sdpa(q, dense_k, dense_v, mask, scale):
    s, hq, d = q.shape
    out = F.scaled_dot_product_attention(q[:, :, None, :], dense_k, dense_v,
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0, :]


def time_us(fns: dict, device, reps) -> dict:
    """Microseconds per call for each of fns. CUDA: triton.testing.do_bench (median). CPU: the
    paths take turns within every repetition (so load from other processes hits them alike);
    the minimum is reported (the least-disturbed run), the median kept beside it."""
    if device.type == "cuda":
        import triton.testing
        return {name: triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
                for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: scratch buffers, first-call dispatch
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)
    out = {name: min(v) for name, v in samples.items()}
    out.update({f"{name}_median": statistics.median(v) for name, v in samples.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--batch-sizes", type=int, nargs="+")
    ap.add_argument("--context-lens", type=int, nargs="+")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=50, help="CPU timing repetitions")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "kernels_decode"))
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    if not on_gpu and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 has no effect here; Triton is not timed on CPU")
    batch_sizes = args.batch_sizes or ([1, 8, 32, 64, 128] if on_gpu else [1, 8, 16])
    context_lens = args.context_lens or ([256, 1024, 4096, 16384] if on_gpu else [128, 512, 1024])
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    hq, hkv, d = SHAPES[args.shape]
    scale = d ** -0.5
    elem = torch.finfo(dtype).bits // 8

    rows = []
    for batch in batch_sizes:
        for max_len in context_lens:
            q, kc, vc, bt, cl, dk, dv, mask = build_case(batch, max_len, hq, hkv, d,
                                                         args.block_size, dtype, device, seed=batch)
            ref = paged_decode_attention_torch(q, kc, vc, bt, cl, scale)
            fns = {"reference": lambda: paged_decode_attention_torch(q, kc, vc, bt, cl, scale),
                   "sdpa": lambda: contiguous_sdpa(q, dk, dv, mask, scale)}
            if on_gpu:
                fns["triton"] = lambda: paged_decode_attention_triton(q, kc, vc, bt, cl, scale)
            times = time_us(fns, device, args.reps)
            row = {"batch": batch, "max_context": max_len, "tokens": int(cl.sum())}
            row.update({f"{name}_us": t for name, t in times.items()})
            row["sdpa_maxdiff"] = (contiguous_sdpa(q, dk, dv, mask, scale) - ref).abs().max().item()
            if on_gpu:
                row["triton_maxdiff"] = (paged_decode_attention_triton(q, kc, vc, bt, cl, scale) - ref).abs().max().item()
                kv_bytes = 2 * row["tokens"] * hkv * d * elem
                row["triton_GBps"] = kv_bytes / (row["triton_us"] * 1e-6) / 1e9
                row["triton_vs_reference"] = row["reference_us"] / row["triton_us"]
                row["triton_vs_sdpa"] = row["sdpa_us"] / row["triton_us"]
            else:
                row["reference_vs_sdpa"] = row["sdpa_us"] / row["reference_us"]
            rows.append(row)
            print(json.dumps(row))

    config = {"device": str(device), "shape": args.shape, "q_heads": hq, "kv_heads": hkv,
              "head_dim": d, "block_size": args.block_size, "dtype": str(dtype).split(".")[-1],
              "batch_sizes": batch_sizes, "context_lens": context_lens,
              "lengths": "uniform in [max_context/2, max_context] per sequence",
              "timing": "triton.testing.do_bench median (us)" if on_gpu else
              f"min of {args.reps} interleaved runs (us; *_median beside it in the JSON)",
              "threads": torch.get_num_threads()}
    if not on_gpu:
        config["triton"] = ("not measured: the Triton kernel needs a CUDA GPU to be timed; on CPU "
                            "it runs only under TRITON_INTERPRET=1 as a correctness check")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine(), "config": config, "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, config, machine(), on_gpu))
    plot(rows, out.with_suffix(".png"), on_gpu, config)
    print(f"wrote {out.with_suffix('.json')}, .md, .png")


def markdown(rows, config, mach, on_gpu) -> str:
    where = mach["gpu"] if on_gpu else f"CPU ({mach['platform']}, {mach['cpu_threads']} threads)"
    lines = [f"# Paged decode attention — {where}", "",
             f"Shape {config['shape']} (Hq {config['q_heads']}, Hkv {config['kv_heads']}, "
             f"D {config['head_dim']}), block size {config['block_size']}, {config['dtype']}; "
             f"lengths {config['lengths']}; {config['timing']}.", ""]
    if on_gpu:
        lines += ["| batch | max ctx | triton us | reference us | contiguous SDPA us | "
                  "triton vs ref | triton vs SDPA | triton GB/s | max diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['max_context']} | {r['triton_us']:.1f} | "
                         f"{r['reference_us']:.1f} | {r['sdpa_us']:.1f} | "
                         f"{r['triton_vs_reference']:.2f}x | {r['triton_vs_sdpa']:.2f}x | "
                         f"{r['triton_GBps']:.0f} | {r['triton_maxdiff']:.1e} |")
    else:
        lines += ["Triton: not measured — it needs a CUDA GPU (on CPU it runs only under the "
                  "interpreter, for correctness).", "",
                  "| batch | max ctx | reference us | contiguous SDPA us | SDPA / reference | "
                  "SDPA max diff |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['max_context']} | {r['reference_us']:.0f} | "
                         f"{r['sdpa_us']:.0f} | {r['reference_vs_sdpa']:.2f} | "
                         f"{r['sdpa_maxdiff']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, on_gpu, config) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.4), squeeze=False)
    paths = [("triton_us", "Triton paged")] if on_gpu else []
    paths += [("reference_us", "PyTorch reference (paged)"), ("sdpa_us", "contiguous SDPA")]
    for ax, b in zip(axes[0], batches):
        sub = [r for r in rows if r["batch"] == b]
        for key, label in paths:
            ax.plot([r["max_context"] for r in sub], [r[key] for r in sub], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("max context")
        ax.set_ylabel("us per call")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"paged decode, {config['shape']}, {config['dtype']}, {config['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
