"""Encoder training step time on ML-1M: eager against torch.compile (TrainConfig.compile), in
fp32 and under bf16 autocast, side by side in one process.

Every variant starts from the same weights and trains on the same batches of real ML-1M
windows (batch 32, the training default), one optimizer step each; the first `--warmup` steps
(where torch.compile traces and compiles, and recompiles for the few guarded cases) are timed
apart from the steady steps. Writes bench/results/encoder_train_speed.{json,md,png}.

    python bench/encoder_train_speed.py [--data ../shared/data/ml-1m] [--steps 120] [--warmup 12]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, bar_chart, markdown_table, write_results  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.device_windows import DeviceWindows  # noqa: E402
from training.distributed import wrap  # noqa: E402
from training.train_encoder import _batches, compiled_step, native_bf16, training_data  # noqa: E402
from userenc.config import EncoderConfig  # noqa: E402
from userenc.model import UserEncoder  # noqa: E402
from userenc.spec import load_spec  # noqa: E402
from userenc.tokenize import EventTokenizer  # noqa: E402

# The two rows of the encoder-quality headline (bench/encoder_quality.py).
MODELS = {
    "multi_seen_d128_year_date": ("movielens_year_date", {"seen_bias": True, "d_model": 128}),
    "id_only_seen": ("movielens_id_only", {"seen_bias": True}),
}


def training_windows(histories: dict, model_name: str) -> tuple[EncoderConfig, EventTokenizer, DeviceWindows]:
    """The model's config, tokenizer and padded training windows, as train_encoder builds them
    (leave-one-out split, vocabularies from the training part): built once, shared by every variant."""
    spec_name, overrides = MODELS[model_name]
    cfg = EncoderConfig(**overrides)
    _, tokenizer, data = training_data(histories, load_spec(spec_name), cfg, 1, torch.device("cpu"))
    return cfg, tokenizer, data


def step_times(model_name: str, cfg: EncoderConfig, tokenizer: EventTokenizer, data: DeviceWindows,
               bf16: bool, compile_step: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)  # the same initial weights for every variant
    model = UserEncoder(tokenizer.spec, cfg, tokenizer.item_attributes).train()
    batches = _batches(data.lengths, 32, np.random.default_rng(0))[: warmup + steps]
    loss_module = wrap(model)
    step = compiled_step(loss_module) if compile_step else loss_module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds, losses = [], []
    for rows in batches:
        rows = np.asarray(rows)
        ids, valid = data.batch(rows, data.lengths[rows])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step(ids, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - t0)
    steady = np.array(seconds[warmup:])
    events = sum(int(data.lengths[np.asarray(r)].sum()) for r in batches[warmup:])
    return {"model": model_name, "bf16": bf16, "compile": compile_step, "warmup_seconds": float(sum(seconds[:warmup])),
            "step_ms_mean": 1000 * float(steady.mean()), "step_ms_median": 1000 * float(np.median(steady)),
            "events_per_s": events / float(steady.sum()), "loss_first": losses[0], "loss_last": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--users", type=int, default=0, help="use only the first N users (quick runs)")
    ap.add_argument("--steps", type=int, default=120, help="steady steps timed per variant")
    ap.add_argument("--warmup", type=int, default=12, help="first steps timed apart (compiling happens there)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--name", default="encoder_train_speed")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    if not names or not set(names) <= set(MODELS) or args.steps < 1 or args.warmup < 1:
        print(f"bad --models/--steps/--warmup (models: {', '.join(MODELS)})", file=sys.stderr)
        sys.exit(2)
    histories = load_dataset(args.data, "movielens", "movielens").histories
    if args.users:
        histories = dict(list(histories.items())[: args.users])
    results = []
    for name in names:
        cfg, tokenizer, data = training_windows(histories, name)
        for bf16 in (False, True):
            for compile_step in (False, True):
                results.append(step_times(name, cfg, tokenizer, data, bf16, compile_step, args.steps, args.warmup))
                print(results[-1], flush=True)
    rows = []
    for r in results:
        eager = next(e for e in results if e["model"] == r["model"] and e["bf16"] == r["bf16"] and not e["compile"])
        rows.append([r["model"], "bf16" if r["bf16"] else "fp32", "compiled" if r["compile"] else "eager",
                     f"{r['step_ms_mean']:.0f}", f"{r['step_ms_median']:.0f}", f"{r['events_per_s']:.0f}",
                     f"{eager['step_ms_mean'] / r['step_ms_mean']:.2f}x", f"{r['warmup_seconds']:.1f}"])
    header = ["model", "dtype", "step", "ms/step mean", "median", "events/s", "vs eager", f"first {args.warmup} steps s"]
    config = {"data": args.data, "users": len(histories), "steps": args.steps, "warmup": args.warmup, "batch_size": 32,
              "threads": torch.get_num_threads(), "native_bf16": native_bf16(torch.device("cpu")), "torch": torch.__version__}
    md = (f"# Encoder training step: eager vs torch.compile, ML-1M ({len(histories)} users)\n\n"
          f"{args.steps} steady steps of batch 32 per variant after {args.warmup} warm-up steps (compiling), the same "
          f"batches and initial weights for each, {torch.get_num_threads()} thread(s), CPU bf16 dot products: "
          f"{config['native_bf16']}.\n\n{markdown_table(header, rows)}\n")
    write_results(args.name, config, {"variants": results}, md)
    plot(results, RESULTS / f"{args.name}.png")
    print(md)


def plot(results: list[dict], path: Path) -> None:
    labels = [f"{r['model']}\n{'bf16' if r['bf16'] else 'fp32'} {'compiled' if r['compile'] else 'eager'}" for r in results]
    bar_chart(path, labels, [r["step_ms_mean"] for r in results], [r["compile"] for r in results],
              "ms per training step (mean)", "Encoder training step, eager vs torch.compile", fontsize=6)


if __name__ == "__main__":
    main()
