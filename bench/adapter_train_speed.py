"""Stage-2 (adapter) training step time on ML-1M and SmolLM2: fp32 against bf16 autocast
(AdapterTrainConfig.bf16), side by side in one process, for the USER-LLM arm and the
text-prompt LoRA arm as bench/userllm_vs_text.py trains them.

Each arm is built once (SmolLM2 frozen; a one-epoch encoder of the userllm_vs_text shape,
holdout 10, for the split and the user tokens); every pass starts from the same trained-part
weights and takes optimizer steps on the same batches of real examples. Each dtype runs twice,
in the order fp32, bf16, bf16, fp32, and the first `--warmup` steps of a pass are timed apart.
The first batch's loss in bf16 against fp32 checks the numerics. A CPU arm's training budget
is wall-clock, so a faster step is more steps of training. Writes
bench/results/NAME.{json,md,png}.

    python bench/adapter_train_speed.py [--data ../shared/data/ml-1m] [--model GGUF]
        [--users 300] [--steps 10] [--warmup 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, bar_chart, markdown_table, write_results  # noqa: E402
from training.adapter_data import encode_examples, length_batches  # noqa: E402
from training.config import AdapterConfig, AdapterTrainConfig, TrainConfig  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.tasks import task_split, train_examples  # noqa: E402
from training.train_adapter import _loss, _optimizer, build_stage2  # noqa: E402
from training.train_encoder import native_bf16, train_encoder  # noqa: E402
from userenc.config import EncoderConfig  # noqa: E402
from userenc.spec import load_spec  # noqa: E402

TASKS = ["next_movie", "genre_history", "genre_future"]
# The arms as bench/userllm_arms.py trains them: (adapter config, batch size, history lengths).
ARMS = {
    "userllm": (AdapterConfig(arm="userllm", strategy="enc", integration="xattn", cross_every_n=6,
                              num_user_tokens=4, tasks=TASKS), 16, [50, 200, 500]),
    "text-lora": (AdapterConfig(arm="text", strategy="lora", tasks=TASKS), 4, [50]),
}


def step_times(s2, items: list, batches: list[list[int]], bf16: bool, warmup: int,
               initial: dict[str, torch.Tensor]) -> dict:
    model = s2.model
    with torch.no_grad():
        for name, p in model.trained_parameters().items():
            p.copy_(initial[name])
    opt = _optimizer(model, AdapterTrainConfig())
    model.train()
    seconds, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model, [items[i] for i in batch], s2, "cpu")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.trained_parameters().values()), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - t0)
    return {"warmup_seconds": float(sum(seconds[:warmup])), "steady_seconds": seconds[warmup:],
            "losses": losses}


def pooled(arm: str, bf16: bool, passes: list[dict], batches: list[list[int]], warmup: int) -> dict:
    """One dtype's passes (ABBA order, so a drift of the machine hits both dtypes alike) pooled."""
    steady = np.array([s for p in passes for s in p["steady_seconds"]])
    examples = len(passes) * sum(len(b) for b in batches[warmup:])
    return {"arm": arm, "bf16": bf16, "passes": passes,
            "warmup_seconds": float(np.mean([p["warmup_seconds"] for p in passes])),
            "step_s_mean": float(steady.mean()), "step_s_median": float(np.median(steady)),
            "examples_per_min": 60 * examples / float(steady.sum()), "losses": passes[0]["losses"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--users", type=int, default=300, help="the first N users (examples and the encoder)")
    ap.add_argument("--steps", type=int, default=10, help="steady steps timed per arm and dtype")
    ap.add_argument("--warmup", type=int, default=2, help="first steps timed apart")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--name", default="adapter_train_speed")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    model_path = Path(args.model)
    if not arms or not set(arms) <= set(ARMS) or args.steps < 1 or args.warmup < 1 or args.users < 20:
        print(f"bad --arms/--steps/--warmup/--users (arms: {', '.join(ARMS)})", file=sys.stderr)
        sys.exit(2)
    if not model_path.exists() or not Path(args.data).is_dir():
        print("--model or --data not found", file=sys.stderr)
        sys.exit(2)
    histories = dict(list(load_dataset(args.data, "movielens", "movielens_year").histories.items())[: args.users])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        encoder_dir = Path(tmp) / "encoder"
        train_encoder(histories, load_spec("movielens_year"),
                      EncoderConfig(d_model=128, seen_bias=True, num_user_tokens=4),
                      TrainConfig(epochs=1, holdout=10), encoder_dir, progress=False)
        for arm in arms:
            acfg, batch_size, lengths = ARMS[arm]
            s2 = build_stage2(model_path, encoder_dir, acfg, histories, 0)
            split = task_split(histories, s2.holdout)
            lengths = sorted({min(n, s2.enc_max_len) if s2.enc_max_len else n for n in lengths})  # as train_adapter reads them
            examples = train_examples(split.train, TASKS, s2.catalogue, 2, lengths, 0)
            items = encode_examples(examples, acfg.arm, s2.tokenizer, s2.end_token,
                                    AdapterTrainConfig().text_budget, s2.enc_tokenizer)
            batches = length_batches(items, batch_size, np.random.default_rng(0))[: args.warmup + args.steps]
            initial = {n: p.detach().clone() for n, p in s2.model.trained_parameters().items()}
            tokens = [len(items[i].prompt) for b in batches for i in b]
            passes: dict[bool, list[dict]] = {False: [], True: []}
            for bf16 in (False, True, True, False):
                passes[bf16].append(step_times(s2, items, batches, bf16, args.warmup, initial))
            for bf16 in (False, True):
                r = pooled(arm, bf16, passes[bf16], batches, args.warmup)
                r |= {"batch_size": batch_size, "lengths": lengths, "prompt_tokens_mean": float(np.mean(tokens))}
                results.append(r)
                print({k: v for k, v in r.items() if k not in ("losses", "passes")}, flush=True)
            del s2
    rows = []
    for r in results:
        fp32 = next(e for e in results if e["arm"] == r["arm"] and not e["bf16"])
        rows.append([r["arm"], "bf16" if r["bf16"] else "fp32", r["batch_size"], f"{r['prompt_tokens_mean']:.0f}",
                     f"{r['step_s_mean']:.2f}", f"{r['step_s_median']:.2f}", f"{r['examples_per_min']:.0f}",
                     f"{fp32['step_s_mean'] / r['step_s_mean']:.2f}x",
                     f"{r['losses'][0]:.4f}", f"{abs(r['losses'][0] - fp32['losses'][0]) / fp32['losses'][0]:.1e}"])
    header = ["arm", "dtype", "batch", "prompt tokens", "s/step mean", "median", "examples/min", "vs fp32",
              "first loss", "rel. diff vs fp32"]
    config = {"data": args.data, "model": str(model_path), "users": len(histories), "steps": args.steps,
              "warmup": args.warmup, "threads": torch.get_num_threads(),
              "native_bf16": native_bf16(torch.device("cpu")), "torch": torch.__version__}
    md = (f"# Adapter training step: fp32 vs bf16 autocast, ML-1M ({len(histories)} users), SmolLM2-135M frozen\n\n"
          f"{args.steps} steady steps per arm and dtype after {args.warmup} warm-up steps, twice per dtype in the order "
          f"fp32, bf16, bf16, fp32 (pooled), the same batches and initial trained-part weights for each pass, {torch.get_num_threads()} thread(s), CPU bf16 dot products: "
          f"{config['native_bf16']}. Prompt tokens: the mean over the timed batches (the userllm arm's prompt holds "
          f"no history; its encoder reads 50-500 events).\n\n{markdown_table(header, rows)}\n")
    write_results(args.name, config, {"variants": results}, md)
    plot(results, RESULTS / f"{args.name}.png")
    print(md)


def plot(results: list[dict], path: Path) -> None:
    bar_chart(path, [f"{r['arm']}\n{'bf16' if r['bf16'] else 'fp32'}" for r in results],
              [r["examples_per_min"] for r in results], [r["bf16"] for r in results],
              "training examples per minute", "Adapter training throughput, fp32 vs bf16 autocast")


if __name__ == "__main__":
    main()
