"""Engine decode-step host overhead: one engine step beside the bare paged forward of the same
batch, in the same process, on a tiny model whose compute is negligible.

A tiny Llama (2 layers, 64 wide, random weights, the SmolLM2 tokenizer's first `--vocab` ids)
runs N sequences that all decode (16-token prompts, prefilled first). Per N we time engine
steps (median over `--steps`), then build the same batch's ForwardContext by hand and time the
bare forward + logits on it (median; the two interleaved, step by step). Host overhead =
median of (step - forward) over the pairs; "best" = min(step) - min(forward). The engine's StepProfile
splits the step into schedule / prepare / forward / sample / detokenize / bookkeeping (means).

Variants: greedy with streamed text (the API's default), seeded sampling (T 0.8, top-k 50,
top-p 0.9) with text, greedy token ids only (detokenize=False), and personalized (a gated
cross-attention block, half the requests with K=4 user tokens, greedy with text).

Writes bench/results/NAME.{json,md,png} (NAME: engine_overhead, or --name). The table keeps
the numbers of bench/results/engine_overhead_before.json beside the new ones when it exists.

    python bench/engine_overhead.py                      # CPU, 1 thread
    python bench/engine_overhead.py --name engine_overhead_before
    python bench/engine_overhead.py --device cuda        # GPU: bf16, CUDA graphs (default)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, SHARED, markdown_table, write_results  # noqa: E402
from llm.config import ModelConfig  # noqa: E402
from llm.context import ForwardContext, use_context  # noqa: E402
from llm.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from llm.engine.step_profile import PHASES  # noqa: E402
from llm.model import LlamaForCausalLM  # noqa: E402

TOKENIZER = SHARED / "models" / "smollm2-135m-config"
VARIANTS = ("greedy_text", "sampled_text", "greedy_ids", "personalized")


def tiny_model(vocab: int, personalized: bool, dtype, device) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                      cross_every_n=2 if personalized else 0,
                      user_dim=32 if personalized else None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for block in model.model.cross_blocks.values():  # open gates: users change outputs
            block.gate_attn.fill_(0.5)
            block.gate_mlp.fill_(0.5)
    return model.to(device=device, dtype=dtype).eval()


def sampling_for(variant: str, i: int, max_tokens: int) -> SamplingParams:
    kw = dict(max_tokens=max_tokens, ignore_eos=True)
    if variant == "sampled_text":
        return SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i, **kw)
    if variant == "greedy_ids":
        # Older engines have no detokenize flag: they stream text regardless.
        if "detokenize" in SamplingParams.__slots__:
            kw["detokenize"] = False
    return SamplingParams(temperature=0, **kw)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_context(engine: Engine) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
    """The decode batch the engine would run next, built directly from its sequences."""
    seqs = engine.scheduler.running
    bs, dev = engine.config.block_size, engine.device
    pos = [s.num_computed_tokens for s in seqs]
    assert all(len(s) == p + 1 for s, p in zip(seqs, pos)), "every sequence must be decoding"
    ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
    for s in seqs:  # the block the next step's scheduling would add (it then finds it there)
        assert engine.block_manager.ensure_slots(s, 1)
    slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]

    def padded(rows):
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32,
                            device=dev)

    ctx = ForwardContext(is_prefill=False,
                         slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                         context_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32,
                                                   device=dev),
                         block_tables=padded([s.block_table for s in seqs]))
    if engine.cross_manager is not None:
        ctx.cross_block_tables = padded([s.cross_block_table for s in seqs])
        ctx.cross_lens = torch.tensor([s.num_cross_tokens for s in seqs], dtype=torch.int32,
                                      device=dev)
    return (torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx)


@torch.inference_mode()
def time_bare_forward(engine: Engine) -> float:
    """Seconds for the forward + logits of the batch the engine runs next. It writes the K/V
    the next step writes again (same tokens, same slots), so the engine's state is unchanged."""
    ids, pos, ctx = bare_context(engine)
    sync(engine.device)
    t0 = time.thread_time()
    with use_context(ctx):
        engine.model.compute_logits(engine.model(ids, pos))
    sync(engine.device)
    return time.thread_time() - t0


def measure(variant: str, n: int, args, tokenizer, device, dtype) -> dict:
    personalized = variant == "personalized"
    model = tiny_model(args.vocab, personalized, dtype, device)
    kw = {} if args.graphs is None else {"use_cuda_graphs": args.graphs}
    engine = Engine(model, tokenizer, EngineConfig(
        block_size=16, kv_cache_bytes=64 << 20, max_num_seqs=n,
        max_num_batched_tokens=max(17 * n, 256), max_user_tokens=8, **kw))
    g = torch.Generator().manual_seed(n)
    total = args.warmup + args.steps + 64  # prefill steps decode the first ones already
    for i in range(n):
        prompt = torch.randint(32, args.vocab, (16,), generator=g).tolist()
        user = torch.randn(4, 32, generator=g) if personalized and i % 2 == 0 else None
        engine.add_request(prompt, user, sampling_for(variant, i, total))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()  # prefills
    for _ in range(args.warmup):
        engine.step()
    engine.profile.reset()
    engine.profile.clock = time.thread_time
    steps, forward = [], []
    # Interleaved, so a slow spell of the shared machine hits both alike.
    for _ in range(args.steps):
        forward.append(time_bare_forward(engine))
        sync(device)
        t0 = time.thread_time()
        outs = engine.step()
        sync(device)
        steps.append(time.thread_time() - t0)
        assert len(outs) == n, "every sequence decodes one token per step"
    prof = engine.profile.snapshot()
    engine.close()
    step_us, fwd_us = statistics.median(steps) * 1e6, statistics.median(forward) * 1e6
    overhead_us = statistics.median(s - f for s, f in zip(steps, forward)) * 1e6
    return {
        "variant": variant, "num_seqs": n, "step_us": step_us, "forward_us": fwd_us,
        "overhead_us": overhead_us, "step_over_forward": step_us / fwd_us,
        # Best of the run: contention only ever adds time, so on a busy machine the minima
        # are the steadier estimate of the work itself.
        "step_min_us": min(steps) * 1e6, "forward_min_us": min(forward) * 1e6,
        "overhead_best_us": (min(steps) - min(forward)) * 1e6,
        "step_mean_us": statistics.fmean(steps) * 1e6,
        "phases_us": {p: prof[p] / prof["steps"] * 1e6 for p in PHASES},
    }


def table(rows: list[dict], title: str) -> str:
    header = ["variant", "seqs", "step µs", "bare forward µs", "overhead µs",
              "overhead (best) µs", "step/forward", *[f"{p} µs" for p in PHASES]]
    body = [[r["variant"], r["num_seqs"], f"{r['step_us']:.0f}", f"{r['forward_us']:.0f}",
             f"{r['overhead_us']:.0f}", f"{r.get('overhead_best_us', float('nan')):.0f}",
             f"{r['step_over_forward']:.2f}",
             *[f"{r['phases_us'][p]:.0f}" for p in PHASES]] for r in rows]
    return f"## {title}\n\n" + markdown_table(header, body)


def compare(before: list[dict], after: list[dict]) -> str:
    """Overhead and step/forward before -> after, with the CPU targets of issue 11."""
    old = {(r["variant"], r["num_seqs"]): r for r in before}
    target = {1: 300, 64: 1500}
    body = []
    for r in after:
        b = old.get((r["variant"], r["num_seqs"]))
        if b is None:
            continue
        t = target.get(r["num_seqs"])
        met = [r[k] <= t for k in ("overhead_us", "overhead_best_us")] if t else []
        body.append([r["variant"], r["num_seqs"], f"{b['overhead_us']:.0f}",
                     f"{r['overhead_us']:.0f}", f"{b['overhead_us'] / r['overhead_us']:.1f}x",
                     f"{b.get('overhead_best_us', float('nan')):.0f}",
                     f"{r['overhead_best_us']:.0f}",
                     f"{b['step_over_forward']:.2f}", f"{r['step_over_forward']:.2f}",
                     "-" if t is None else f"<= {t}: median {'yes' if met[0] else 'no'}, "
                                           f"best {'yes' if met[1] else 'no'}"])
    return "## before -> after\n\n" + markdown_table(
        ["variant", "seqs", "overhead before µs", "after µs", "cut", "best before µs",
         "best after µs", "step/forward before", "after", "target"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="engine_overhead")
    ap.add_argument("--num-seqs", default="1,8,64,256")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--graphs", type=int, default=None,
                    help="1/0: force use_cuda_graphs (default: the engine's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = []
    for variant in args.variants.split(","):
        for n in map(int, args.num_seqs.split(",")):
            r = measure(variant, n, args, tokenizer, device, dtype)
            print(json.dumps(r), flush=True)
            rows.append(r)
    config = dict(vars(args)) | {"device": str(device), "dtype": str(dtype), "model":
                                 "2 layers, hidden 64, 4 heads (2 KV), head_dim 16",
                                 "prompt_tokens": 16, "block_size": 16}
    md = (f"# Engine decode-step overhead\n\nTiny Llama (2 layers, 64 wide, vocab {args.vocab}), "
          f"{device}, {dtype}, {args.threads} thread(s). Step and bare forward (+ logits) of "
          f"the same batch in one process; medians over {args.steps} steps; phases are means. "
          f"Overhead = median over steps of (step - forward). Times are this thread's CPU "
          f"time (the machine is shared; one torch thread runs every op on it).\n\n"
          + table(rows, args.name))
    results: dict = {"rows": rows}
    before = RESULTS / "engine_overhead_before.json"
    if args.name != "engine_overhead_before" and before.exists():
        old = json.loads(before.read_text())
        results["before"] = old["results"]["rows"]
        md += "\n" + compare(old["results"]["rows"], rows)
        md += "\n" + table(old["results"]["rows"], "before (engine_overhead_before.json: "
                           + old["machine"].get("processor", "?") + ")")
    write_results(args.name, config, results, md)
    plot(rows, results.get("before"), RESULTS / f"{args.name}.png")
    print(md)


def plot(rows, before, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        for data, style, label in ((rows, "-", ""), (before or [], ":", " (before)")):
            pts = [(r["num_seqs"], r["overhead_us"]) for r in data if r["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=variant + label)
    ax.axhline(300, color="gray", lw=0.8)
    ax.axhline(1500, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences decoding")
    ax.set_ylabel("host overhead per step (step - bare forward), µs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
