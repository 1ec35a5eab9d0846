"""Quantized base weights in the engine, side by side in one run: fp32, int8, int4 and the
GGUF's own Q4_1 blocks (kept), plus llama.cpp on the same GGUF when a build is given.

Per precision:
  batch-1 decode     tokens/s of a 64-token greedy decode after a short prompt, median of
                     --repeats runs, configurations interleaved (the CPU box is shared: a slow
                     spell then hits every configuration alike); wall and process-CPU seconds
  batched            16 requests x 256 prompt tokens / 64 output tokens, all at t=0
  memory             bytes of the tensors the model holds (parameters + buffers, shared ones
                     once) + the MKL-packed copies the fp32 engine makes; and the resident-set
                     growth of loading that configuration in a fresh process (--memory-runs)
  perplexity         on the first --ppl-reviews Amazon Musical Instruments reviews (each cut
                     to --ppl-tokens tokens), relative to fp32
  greedy outputs     the 8 chat prompts of the parity tests, 32 tokens: identical to fp32, and
                     how many leading tokens agree
llama.cpp: `llama-bench -m GGUF -t 1 -p 256 -n 64 -r 5 -o json` (its batch-1 decode row is
the `-n 64` test; prefill the `-p 256` test).

Writes bench/results/engine_quantized.{json,md,png}.

    python bench/engine_quantized.py --llama-bench /work/llamacpp/build/bin/llama-bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED, RESULTS, markdown_table, write_results  # noqa: E402
from llm.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from llm.loader import build_model, load_model, read_checkpoint  # noqa: E402
from llm.quantize import count_linears, quantize_model, weight_bytes  # noqa: E402

DEFAULT_MODEL = (SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf"
                 / "SmolLM2-135M-Instruct.Q4_1.gguf")
REVIEWS = SHARED / "data" / "amazon-musical-instruments-5core" / "Musical_Instruments_5.json"
CHATS = [  # tests/llm/test_llm_engine_smollm2.py
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a hash function is in one sentence.", "List three primary colors.",
    "How many legs does a spider have?", "Give me a tip for learning to cook.",
    "What is 12 times 7?", "Translate 'good morning' into Spanish.",
]
CONFIGS = ("fp32", "int8", "int4", "q4_1-kept")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(name: str, ckpt, path: str):
    """The model for one configuration (fp32 / int8 / int4 from the de-quantized checkpoint;
    q4_1-kept straight from the GGUF blocks)."""
    if name == "q4_1-kept":
        return load_model(path, quantize="gguf")[0]
    model = build_model(ckpt.hf_config, ckpt.state_dict)
    if name != "fp32":
        quantize_model(model, name, 32)
    return model


def _trimmed_rss() -> int:
    """Resident bytes after returning freed heap to the OS (a load's transients do not count)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_bytes()


def memory_child(name: str, path: str) -> None:
    """Run in a fresh process: resident-set growth of loading one configuration's weights
    (config and tokenizer loaded first, so only the weights count)."""
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf = Path(path).parent, Path(path).name
    AutoConfig.from_pretrained(folder, gguf_file=gguf)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    before = _trimmed_rss()
    if name == "q4_1-kept":
        model = load_model(path, quantize="gguf")[0]
    else:
        model, _, _ = load_model(path, quantize="none" if name == "fp32" else name)
    if name == "fp32":
        model.prepack_linears()
    print(json.dumps({"rss_growth": _trimmed_rss() - before, "peak_rss_kib": __import__(
        "resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss}))


def batch1_decode(engine: Engine, prompt, n_new: int) -> dict:
    engine.reset_prefix_cache()
    engine.add_request(prompt, sampling=SamplingParams(temperature=0, max_tokens=n_new,
                                                       ignore_eos=True))
    engine.step()  # prefill + first token
    t0, c0 = time.perf_counter(), time.process_time()
    count = 0
    while engine.has_unfinished():
        count += sum(len(o.new_token_ids) for o in engine.step())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tok_s_wall": count / wall, "tok_s_cpu": count / cpu}


def batched(engine: Engine, prompts, n_out: int) -> dict:
    engine.reset_prefix_cache()
    sp = SamplingParams(temperature=0, max_tokens=n_out, min_tokens=n_out, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.generate(prompts, sp)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


@torch.inference_mode()
def perplexity(model, texts: list[list[int]], batch: int = 8) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(texts), batch):
        rows = texts[i:i + batch]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, t in enumerate(rows):
            ids[r, :len(t)] = torch.tensor(t)
            mask[r, :len(t)] = True
        logits = model.compute_logits(model(ids)).float()  # right padding: causal, harmless
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:]
        nll -= float(lp[keep].sum())
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(nll / count)))


def llama_cpp(binary: str, model: str, repeats: int, prompt: int = 256,
              gen: int = 64) -> dict | None:
    if not binary or not Path(binary).is_file():
        return None
    cmd = [binary, "-m", model, "-t", "1", "-p", str(prompt), "-n", str(gen), "-r", str(repeats),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    res = {"command": " ".join(cmd), "build": rows[0].get("build_commit"),
           "cpu": rows[0].get("cpu_info")}
    for r in rows:
        key = "decode_tok_s" if r.get("n_gen") else "prefill_tok_s"
        res[key] = r["avg_ts"]
        res[key + "_samples"] = r.get("samples_ts")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH", ""),
                    help="path of a llama-bench binary (its row is left out when absent)")
    ap.add_argument("--repeats", type=int, default=5, help="batch-1 runs per configuration")
    ap.add_argument("--batched-repeats", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ppl-reviews", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--memory-runs", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch1-only", action="store_true",
                    help="only the batch-1 decode rounds (engine_quantized_batch1.*)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.model)
    torch.set_num_threads(1)
    configs = args.configs.split(",")

    ckpt = read_checkpoint(args.model)
    tok = ckpt.tokenizer
    eos = ckpt.hf_config.eos_token_id
    engines: dict[str, Engine] = {}
    info: dict[str, dict] = {}
    for name in configs:
        model = build(name, ckpt, args.model)
        engines[name] = Engine(model, tok, EngineConfig(
            kv_cache_bytes=256 << 20, max_num_seqs=args.num_requests,
            max_num_batched_tokens=512), eos_token_ids=[eos])
        packs = sum(m._pack[0].numel() * m._pack[0].element_size() for m in model.modules()
                    if getattr(m, "_pack", None) is not None)
        info[name] = {"linears": count_linears(model), "tensor_bytes": weight_bytes(model),
                      "mkl_pack_bytes": packs}
        print(name, info[name], flush=True)
    del ckpt.state_dict  # the fp32 engine holds its own copy

    # Warm-up, then batch-1 decode, interleaved.
    prompt = tok.encode("Write a short story about a guitar player who")
    for eng in engines.values():
        eng.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    b1: dict[str, list] = {n: [] for n in configs}
    llama_b1: list[float] = []  # llama.cpp's batch-1 decode, in the same rounds as ours
    for _ in range(args.repeats):
        for name, eng in engines.items():
            b1[name].append(batch1_decode(eng, prompt, args.decode_tokens))
        one = llama_cpp(args.llama_bench, args.model, 1, prompt=0, gen=args.decode_tokens)
        if one:
            llama_b1.append(one["decode_tok_s"])
        print({n: round(v[-1]["tok_s_wall"], 1) for n, v in b1.items()}, llama_b1[-1:],
              flush=True)
    if args.batch1_only:
        return write_batch1(args, configs, b1, llama_b1, info)

    # Batched.
    g = torch.Generator().manual_seed(0)
    vocab = ckpt.hf_config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.num_requests)]
    bat: dict[str, list] = {n: [] for n in configs}
    for _ in range(args.batched_repeats):
        for name, eng in engines.items():
            bat[name].append(batched(eng, prompts, args.output_len))
            print(name, "batched", bat[name][-1], flush=True)

    # Greedy chat outputs vs fp32.
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    sp = SamplingParams(temperature=0, max_tokens=32)
    greedy = {n: [o.token_ids for o in eng.generate(chats, sp)] for n, eng in engines.items()}

    # Perplexity.
    texts = []
    with open(REVIEWS) as f:
        for line in f:
            text = json.loads(line).get("reviewText", "").strip()
            if text:
                texts.append(tok.encode(text)[:args.ppl_tokens])
            if len(texts) == args.ppl_reviews:
                break
    ppl = {}
    for name, eng in engines.items():
        ppl[name] = perplexity(eng.model, texts)
        print(name, "ppl", ppl[name], flush=True)

    # Resident memory of each configuration, loaded alone in a fresh process.
    rss: dict[str, list] = {n: [] for n in configs}
    for _ in range(args.memory_runs):
        for name in configs:
            out = subprocess.run([sys.executable, __file__, "--model", args.model,
                                  "--memory-child", name], capture_output=True, text=True,
                                 check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rss[name].append(json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"])
            print(name, "rss growth MiB", rss[name][-1] / 2**20, flush=True)

    # llama.cpp's own prefill / decode figures (its decode also interleaved above).
    llama = llama_cpp(args.llama_bench, args.model, args.repeats)
    if llama and llama_b1:
        llama["decode_tok_s_interleaved_median"] = statistics.median(llama_b1)
        llama["decode_tok_s_interleaved_runs"] = llama_b1
    print("llama.cpp", llama, flush=True)
    base = greedy.get("fp32")
    results: dict = {"configs": {}, "llama_cpp": llama}
    rows = []
    for name in configs:
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        same = prefix = None
        if base is not None:
            same = sum(a == b for a, b in zip(greedy[name], base))
            prefix = statistics.mean(_common_prefix(a, b) for a, b in zip(greedy[name], base))
        r = {**info[name], "batch1_tok_s_wall": med(b1[name], "tok_s_wall"),
             "batch1_tok_s_cpu": med(b1[name], "tok_s_cpu"), "batch1_runs": b1[name],
             "batched_wall_s": med(bat[name], "wall_s"), "batched_cpu_s": med(bat[name], "cpu_s"),
             "batched_runs": bat[name], "perplexity": ppl[name],
             "ppl_vs_fp32": ppl[name] / ppl["fp32"] - 1 if "fp32" in ppl else None,
             "greedy_identical_to_fp32": same, "greedy_mean_common_prefix": prefix,
             "rss_growth_bytes": statistics.median(rss[name]), "rss_runs": rss[name],
             "fp32_mean_len": statistics.mean(map(len, base)) if base else None}
        results["configs"][name] = r
        rows.append([name, f"{r['batch1_tok_s_wall']:.1f}", f"{r['batch1_tok_s_cpu']:.1f}",
                     f"{r['batched_wall_s']:.1f}", f"{r['tensor_bytes'] / 2**20:.0f}",
                     f"{r['mkl_pack_bytes'] / 2**20:.0f}",
                     f"{r['rss_growth_bytes'] / 2**20:.0f}", f"{r['perplexity']:.3f}",
                     "-" if r["ppl_vs_fp32"] is None else f"{100 * r['ppl_vs_fp32']:+.2f}%",
                     f"{same}/8" if same is not None else "-",
                     f"{prefix:.1f}" if prefix is not None else "-"])
    if llama:
        rows.append(["llama.cpp (Q4_1 GGUF)", f"{_llama_decode(llama):.1f}", "-", "-",
                     "-", "-", "-", "-", "-", "-", "-"])
    header = ["weights", "batch-1 decode tok/s (wall)", "tok/s (cpu)",
              f"{args.num_requests}x{args.prompt_len}/{args.output_len} batched s (wall)",
              "tensor MiB", "MKL pack MiB (allocated)", "RSS growth MiB", "perplexity", "vs fp32",
              "greedy = fp32", "mean common prefix with fp32 (tokens)"]
    md = ("SmolLM2-135M-Instruct, CPU, 1 thread. Batch-1: median of "
          f"{args.repeats} runs (configurations interleaved; the machine is shared). Batched: "
          f"median of {args.batched_repeats}. Perplexity: first {args.ppl_reviews} Amazon "
          f"Musical Instruments reviews, {args.ppl_tokens} tokens each. Greedy: 8 chat "
          f"prompts, up to 32 tokens (fp32 answers average "
          f"{results['configs'].get('fp32', {}).get('fp32_mean_len') or 0:.1f} tokens).\n\n"
          + markdown_table(header, rows))
    if llama:
        md += (f"\nllama.cpp: `{llama['command']}` (build {llama['build']}); prefill 256: "
               f"{llama.get('prefill_tok_s', 0):.1f} tok/s.\n")
    config = vars(args) | {"threads": 1}
    write_results("engine_quantized", config, results, md)
    plot(results, RESULTS / "engine_quantized.png")
    print(md)


def _llama_decode(llama: dict) -> float:
    return llama.get("decode_tok_s_interleaved_median", llama.get("decode_tok_s", 0.0))


def write_batch1(args, configs, b1, llama_b1, info) -> None:
    """--batch1-only: the batch-1 decode rows alone (engine_quantized_batch1.*)."""
    results = {n: {"tok_s_wall": statistics.median(r["tok_s_wall"] for r in b1[n]),
                   "tok_s_cpu": statistics.median(r["tok_s_cpu"] for r in b1[n]),
                   "runs": b1[n], **info[n]} for n in configs}
    results["llama_cpp"] = {"decode_tok_s_median": statistics.median(llama_b1),
                            "runs": llama_b1} if llama_b1 else None
    rows = [[n, f"{results[n]['tok_s_wall']:.1f}", f"{results[n]['tok_s_cpu']:.1f}",
             f"{results[n]['tensor_bytes'] / 2**20:.0f}"] for n in configs]
    if llama_b1:
        rows.append(["llama.cpp (Q4_1 GGUF)", f"{statistics.median(llama_b1):.1f}", "-", "-"])
    md = (f"SmolLM2-135M-Instruct batch-1 decode ({args.decode_tokens} tokens), CPU, 1 thread; "
          f"median of {args.repeats} rounds, each round runs every configuration and "
          "llama.cpp (`llama-bench -t 1 -p 0 -n 64 -r 1`) in turn (the machine is shared).\n\n"
          + markdown_table(["weights", "tok/s (wall)", "tok/s (cpu)", "tensor MiB"], rows))
    write_results("engine_quantized_batch1", vars(args), results, md)
    print(md)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["configs"]
    names = list(cfg)
    speed = [cfg[n]["batch1_tok_s_wall"] for n in names]
    if results.get("llama_cpp"):
        names_s = names + ["llama.cpp"]
        speed.append(_llama_decode(results["llama_cpp"]))
    else:
        names_s = names
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names_s, speed, color="tab:blue")
    a.set_ylabel("batch-1 decode tok/s (1 thread)")
    mem = [(cfg[n]["tensor_bytes"] + cfg[n]["mkl_pack_bytes"]) / 2**20 for n in names]
    b.bar(names, mem, color="tab:orange")
    b.axhline(250, color="gray", ls="--", lw=1)
    b.set_ylabel("weights MiB (tensors + MKL packs)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("SmolLM2-135M: quantized weights in the engine (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
