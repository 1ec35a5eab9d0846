"""Time to first token at batch 1 through the engine: plain prompts of several lengths, and a
personalized 40-token request (gated cross-attention every n layers, K user tokens) beside the
1,200-token text prompt it replaces (a 50-event history as text).

Each request is fresh (prefix caching off), so every run pays its whole prefill. TTFT is from
`add_request` to the first sampled token, synchronized on CUDA; median and p99 over --runs after
one warm-up per shape. On CUDA the prefill runs the Triton varlen kernel
(llm/kernels/paged_prefill.py); on CPU the PyTorch path.

Writes bench/results/NAME.{json,md,png}.

    python bench/engine_ttft.py --random-weights --device cuda --dtype bf16   # GPU machine
    python bench/engine_ttft.py --lengths 40,1200 --runs 5                     # CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, markdown_table, write_results  # noqa: E402
from bench.engine_throughput import DEFAULT_CONFIG, DEFAULT_MODEL, random_checkpoint  # noqa: E402
from llm.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from llm.loader import build_model, read_checkpoint  # noqa: E402

FIRST_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def engine_for(ckpt, dtype, device, args, personalized: bool) -> Engine:
    kw = dict(cross_every_n=args.cross_every_n, user_dim=args.user_dim) if personalized else {}
    model = build_model(ckpt.hf_config, ckpt.state_dict, dtype=dtype, device=device, **kw)
    with torch.no_grad():  # open gates: the cross blocks do their full work
        for block in model.model.cross_blocks.values():
            block.gate_attn.fill_(0.5)
            block.gate_mlp.fill_(0.5)
    return Engine(model, ckpt.tokenizer, EngineConfig(
        block_size=16, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=4,
        max_num_batched_tokens=max(args.lengths) + 64, enable_prefix_caching=False,
        max_user_tokens=args.user_tokens))


def ttft_ms(engine: Engine, prompt: list[int], user, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(prompt, user, FIRST_TOKEN)
    while engine.has_unfinished():
        engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def measure(engine, length, user, device, args, vocab) -> dict:
    g = torch.Generator().manual_seed(length)
    prompts = [torch.randint(100, vocab, (length,), generator=g).tolist()
               for _ in range(args.runs + 1)]
    ttft_ms(engine, prompts[0], user, device)  # warm-up: allocator, kernels for this shape
    times = sorted(ttft_ms(engine, p, user, device) for p in prompts[1:])
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {"prompt_tokens": length, "personalized": user is not None,
            "p50_ms": statistics.median(times), "p99_ms": p99, "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2's shape from --config (config + tokenizer), random weights")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                    default=[40, 1200, 4000, 8000])
    ap.add_argument("--personalized-length", type=int, default=40)
    ap.add_argument("--text-length", type=int, default=1200,
                    help="the text prompt the personalized request replaces")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cross-every-n", type=int, default=6)
    ap.add_argument("--user-tokens", type=int, default=4)
    ap.add_argument("--user-dim", type=int, default=64)
    ap.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    ap.add_argument("--name", default="engine_ttft")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    ckpt = (random_checkpoint(args.config, 0) if args.random_weights
            else read_checkpoint(args.model))
    vocab = ckpt.hf_config.vocab_size
    args.lengths = sorted(set(args.lengths) | {args.personalized_length, args.text_length})

    rows = []
    plain = engine_for(ckpt, dtype, device, args, personalized=False)
    for length in args.lengths:
        rows.append(measure(plain, length, None, device, args, vocab))
        print(f"plain {length} tokens: p50 {rows[-1]['p50_ms']:.1f} ms", flush=True)
    plain.close()
    pers = engine_for(ckpt, dtype, device, args, personalized=True)
    user = torch.randn(args.user_tokens, args.user_dim, generator=torch.Generator().manual_seed(1))
    rows.append(measure(pers, args.personalized_length, user, device, args, vocab))
    print(f"personalized {args.personalized_length} tokens + K={args.user_tokens}: "
          f"p50 {rows[-1]['p50_ms']:.1f} ms", flush=True)
    pers.close()

    text = next(r for r in rows if r["prompt_tokens"] == args.text_length
                and not r["personalized"])
    speedup = text["p50_ms"] / rows[-1]["p50_ms"]
    config = vars(args) | {"device": str(device), "dtype": str(dtype),
                           "weights": "random" if args.random_weights else args.model}
    results = {"rows": rows, "personalized_vs_text_speedup": speedup}
    body = [[("personalized, K=%d" % args.user_tokens) if r["personalized"] else "plain",
             r["prompt_tokens"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", r["runs"]]
            for r in rows]
    md = (f"# Time to first token, batch 1\n\n{device.type}, {dtype}, "
          f"{'random weights of SmolLM2-135M shape' if args.random_weights else 'SmolLM2-135M'}"
          f", prefix caching off, {args.runs} runs per row after a warm-up.\n\n"
          + markdown_table(["request", "prompt tokens", "p50 ms", "p99 ms", "runs"], body)
          + f"\nPersonalized {args.personalized_length}-token request vs the "
            f"{args.text_length}-token text prompt it replaces: **{speedup:.1f}x** faster to "
            "first token.\n")
    write_results(args.name, config, results, md)
    plot(rows, RESULTS / f"{args.name}.png")
    print(md)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [r for r in rows if not r["personalized"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["prompt_tokens"] for r in plain], [r["p50_ms"] for r in plain], "o-",
            label="plain prompt")
    for r in rows:
        if r["personalized"]:
            ax.plot([r["prompt_tokens"]], [r["p50_ms"]], "s", color="C1",
                    label="personalized (user tokens)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token, p50 (ms)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
