"""Encoder quality on MovieLens-1M, three models side by side on one split, seed and budget:

- popularity: every user gets the catalogue ranked by training counts;
- id_only: the causal transformer with only the item feature (SASRec-equivalent);
- multi_feature: the same encoder with item + genres + rating + time features.

Full-corpus ranking on the leave-one-out test events (no sampled negatives). Writes
bench/results/encoder_ml1m.json / .md / .png (HR@10 by history length).

    python bench/encoder_quality.py [--data ../shared/data/ml-1m] [--minutes 14] [--users N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, markdown_table, write_results  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluate import evaluate, model_scorer, popularity_scorer  # noqa: E402
from training.split import leave_one_out  # noqa: E402
from training.train_encoder import TrainConfig, train_encoder  # noqa: E402
from userenc.checkpoint import load_checkpoint  # noqa: E402
from userenc.config import EncoderConfig  # noqa: E402
from userenc.spec import load_spec  # noqa: E402

METRICS = ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "mrr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--minutes", type=float, default=14.0, help="training budget per model")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--users", type=int, default=0, help="use only the first N users (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="encoder_ml1m")
    ap.add_argument("--runs", default="runs/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())

    ds = load_dataset(args.data, "movielens", "movielens")
    histories = ds.histories
    if args.users:
        histories = dict(list(histories.items())[: args.users])
    split = leave_one_out(histories)
    tcfg = TrainConfig(epochs=args.epochs, seed=args.seed, max_minutes=args.minutes, fit_schedule_to_budget=True)
    models = {
        "id_only": load_spec("movielens_id_only"),
        "multi_feature": load_spec("movielens"),
    }
    results: dict[str, dict] = {}
    by_length: dict[str, dict] = {}
    tokenizer = None
    for name, spec in models.items():
        cfg = EncoderConfig()
        t0 = time.perf_counter()
        run = train_encoder(histories, spec, cfg, tcfg, Path(args.runs) / name, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
        loaded = load_checkpoint(run.checkpoint)
        tokenizer = loaded.tokenizer if name == "id_only" else tokenizer
        report = evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)
        results[name] = {m: report["all"][m] for m in METRICS} | {
            "train_seconds": seconds,
            "epochs": len(run.history),
            "best_epoch": run.best_epoch,
            "exclude_seen": {m: report["exclude_seen"][m] for m in METRICS},
            "valid": run.best_valid,
        }
        by_length[name] = report["by_length"]
        print(f"{name}: test HR@10 {report['all']['hr@10']:.4f} NDCG@10 {report['all']['ndcg@10']:.4f} ({seconds:.0f}s, {len(run.history)} epochs)", flush=True)
    assert tokenizer is not None
    pop = evaluate(popularity_scorer(tokenizer, split.train), tokenizer, split.test)
    results = {"popularity": {m: pop["all"][m] for m in METRICS} | {"train_seconds": 0.0, "exclude_seen": {m: pop["exclude_seen"][m] for m in METRICS}}} | results
    by_length = {"popularity": pop["by_length"]} | by_length
    ratio = {m: results["multi_feature"][m] / max(results["id_only"][m], 1e-12) for m in ("hr@10", "ndcg@10")}
    config = {"data": args.data, "users": len(histories), "test_users": len(split.test), "seed": args.seed, "budget_minutes_per_model": args.minutes, "max_epochs": args.epochs, "encoder": EncoderConfig().to_dict(), "train": tcfg.__repr__()}
    rows = [[name] + [r[m] for m in METRICS] + [f"{r['train_seconds']:.0f}"] for name, r in results.items()]
    table = markdown_table(["model"] + list(METRICS) + ["train s"], rows)
    excl_rows = [[name] + [r["exclude_seen"][m] for m in METRICS] for name, r in results.items()]
    md = (
        f"# Encoder quality, MovieLens-1M users 1-{len(histories)} (full ranking, leave-one-out test)\n\n{table}\n"
        f"Excluding items the user already rated:\n\n{markdown_table(['model'] + list(METRICS), excl_rows)}\n"
        f"multi_feature / id_only: HR@10 {ratio['hr@10']:.3f}x, NDCG@10 {ratio['ndcg@10']:.3f}x\n\n![HR@10 by history length]({args.name}.png)\n"
    )
    write_results(args.name, config, {"models": results, "by_length": by_length, "multi_over_id_only": ratio}, md)
    plot(by_length, RESULTS / f"{args.name}.png")
    print(md)


def plot(by_length: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = list(next(iter(by_length.values())).keys())
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(by_length)
    for i, (name, rows) in enumerate(by_length.items()):
        ax.bar([j + i * width for j in range(len(buckets))], [rows[b]["hr@10"] for b in buckets], width, label=name)
    ax.set_xticks([j + width * (len(by_length) - 1) / 2 for j in range(len(buckets))])
    ax.set_xticklabels([f"{b}\n(n={by_length['popularity'][b]['users']})" for b in buckets])
    ax.set_xlabel("history length (events before the test event)")
    ax.set_ylabel("HR@10 (full ranking)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
