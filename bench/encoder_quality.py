"""Encoder quality on MovieLens-1M, every model on one split, the same seeds and budget:

- popularity: every user gets the catalogue ranked by training counts;
- id_only: the causal transformer with only the item feature (SASRec-equivalent), next-event;
- multi_feature: item + genres + rating + time features, next-event (today's default);
- all_action: the multi-feature encoder trained only by the dense all-action objective
  (PinnerFormer: every item of the next W events);
- mixed: next-event + all-action + the future genre-distribution head (weights 1 / 1 / 0.5);
- feature_dropout: multi_feature with each feature of an event dropped whole with p = 0.2 in
  training (a fusion variant: item ids cannot carry every token alone);
- id_only_crop / multi_crop: id_only / multi_feature with crop augmentation (each epoch, half of
  the training windows start at a random later event: training/split.crop_starts);
- multi_timebias: multi_feature with HSTU-style relative time biases in attention (a learned
  bias per head and layer for each log2 bucket of the seconds between two events);
- multi_d128: multi_feature with d_model 128 (twice as wide);
- id_only_seen / multi_seen: id_only / multi_feature with the seen bias (one learned score for
  the items already in the history, in training and in ranking: userenc/heads.py);
- multi_seen_d128_bf16: multi_seen with d_model 128, its forward under bf16 autocast
  (multi_seen_d128: the same in fp32, for CPUs without bf16 matrix units; multi_seen_d128_year:
  that with each movie's release year, from its title, as an item attribute, and _drop3 with
  dropout 0.3, _item128 with item embeddings 128 wide, _date with each event's calendar period
  (spec movielens_year_date); multi_seen_year: multi_seen with the release year, d_model 64);
  multi_seen_d128_l3_bf16: the same with three layers; multi_seen_d128_year_bf16 /
  id_only_seen_bf16: multi_seen_d128_year / id_only_seen under bf16 autocast;
  multi_seen_d128_year_len400_bf16: the first reading the last 400 events instead of 200;
  multi_seen_d128_year_drop3_bf16: the first with dropout 0.3; _fdrop1_bf16: with feature dropout 0.1;
  _h4_bf16: with four attention heads; multi_seen_d128_words_bf16: with the title's words as an
  item attribute (spec movielens_words); id_only_seen_nostop: id_only_seen without early stopping;
  _bf16 and _bf16_compiled versions of multi_seen_d128_year_date and id_only_seen_nostop: under
  bf16 autocast, and with the training step under torch.compile;
  multi_seen_d128_year_date_nostop_bf16_compiled: the compiled multi-feature row without early stopping,
  and _next_: that with the time until the next event (for the last one: until the request),
  _next60_ with that time no finer than a minute.

Full-corpus ranking on the leave-one-out test events (no sampled negatives), HR@10 by history
length and on truncated histories (cold start: only the last 1-5 / 6-20 input events, every
model and popularity on the same users and events, see training/evaluate.py), and the long-term
taste probe (bench/taste_probe.py: each user's most frequent genre in their next 20 held-out
events, from the stored user vector or from the 18-number genre profile of the history).

Holdout: the models train with each user's last `--holdout` events (default 20) never seen, so
the probe's 20 label events are truly held out (the spine bench used 1; pass --holdout 1 to
compare with bench/results/encoder_ml1m.*: the probe then flags its labels as trained on).
With several --seeds every number is mean ± std over seeds. Writes bench/results/NAME.json / .md / .png.

    python bench/encoder_quality.py [--data ../shared/data/ml-1m] [--minutes 14] [--users N] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, markdown_table, write_results  # noqa: E402
from bench.taste_probe import FUTURE, genre_order, genre_profile, probe_accuracy, probe_cases  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluate import cold_start_report, evaluate, model_scorer, popularity_scorer  # noqa: E402
from training.split import leave_one_out  # noqa: E402
from training.train_encoder import TrainConfig, train_encoder  # noqa: E402
from userenc.checkpoint import load_checkpoint  # noqa: E402
from userenc.config import EncoderConfig  # noqa: E402
from userenc.spec import load_spec  # noqa: E402

METRICS = ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "mrr")
# name -> (spec, objective settings over EncoderConfig's defaults)
MODELS = {
    "id_only": ("movielens_id_only", {}),
    "multi_feature": ("movielens", {}),
    "all_action": ("movielens", {"next_event_weight": 0.0, "all_action_weight": 1.0}),
    "mixed": ("movielens", {"all_action_weight": 1.0, "future_genre_weight": 0.5}),
    # fusion: whole features dropped per event in training (item ids cannot carry every token)
    "feature_dropout": ("movielens", {"feature_dropout": 0.2}),
    # crop augmentation (TrainConfig.crop_prob): half the windows start at a random later event
    # each epoch; the third entry overrides training settings
    "id_only_crop": ("movielens_id_only", {}, {"crop_prob": 0.5}),
    "multi_crop": ("movielens", {}, {"crop_prob": 0.5}),
    # HSTU-style relative time: a learned per-head attention bias per log2 time-gap bucket
    "multi_timebias": ("movielens", {"time_bias_buckets": 32}),
    # the multi-feature encoder twice as wide (d_model 128; ID-only stays SASRec-sized)
    "multi_d128": ("movielens", {"d_model": 128}),
    # a learned score for items already in the history (EncoderConfig.seen_bias), both specs
    "id_only_seen": ("movielens_id_only", {"seen_bias": True}),
    "multi_seen": ("movielens", {"seen_bias": True}),
    # ... twice as wide, its forward under bf16 autocast (27% faster steps at d_model 128 on this
    # AVX512-BF16 CPU, so about the epochs of d_model 64 in fp32)
    "multi_seen_d128_bf16": ("movielens", {"seen_bias": True, "d_model": 128}, {"bf16": True}),
    # ... in fp32, for CPUs without bf16 matrix units (there autocast makes steps ~10x slower;
    # in fp32 a d_model 128 step costs about what a 64 one does: the catalogue softmax dominates)
    "multi_seen_d128": ("movielens", {"seen_bias": True, "d_model": 128}),
    # ... with the release year from the title as an item attribute (spec movielens_year)
    "multi_seen_d128_year": ("movielens_year", {"seen_bias": True, "d_model": 128}),
    # ... with dropout 0.3 (0.2 by default): the d_model 128 model's validation HR@10 plateaus
    "multi_seen_d128_year_drop3": ("movielens_year", {"seen_bias": True, "d_model": 128, "dropout": 0.3}),
    # ... with item embeddings 128 wide instead of 64 (input table and candidate tower: the
    # next-item softmax ranks in a space twice as wide; ~no slower, the catalogue product dominates)
    "multi_seen_d128_year_item128": ("movielens_year_item128", {"seen_bias": True, "d_model": 128}),
    # ... with the calendar period of each event (weekly over ML-1M's busy months: what is
    # popular drifts, and the history's last events say when the next one happens)
    "multi_seen_d128_year_date": ("movielens_year_date", {"seen_bias": True, "d_model": 128}),
    # multi_seen with the release year at d_model 64 (where d_model 128 trains ~1.6x slower: fp32
    # on a CPU without bf16 dot products, 15 epochs in 14 minutes against ID-only's 24)
    "multi_seen_year": ("movielens_year", {"seen_bias": True}),
    # multi_seen_d128_year and id_only_seen under bf16 autocast, for CPUs with native bf16 dot
    # products (Zen 5 / AVX512-BF16: a [4096, 128] x [128, 3700] product 8x faster than fp32)
    "multi_seen_d128_year_bf16": ("movielens_year", {"seen_bias": True, "d_model": 128}, {"bf16": True}),
    "id_only_seen_bf16": ("movielens_id_only", {"seen_bias": True}, {"bf16": True}),
    # id_only_seen without early stopping (patience beyond any budget): its learning rate always
    # anneals to the end of the fitted schedule, so a baseline that stopped on a validation
    # plateau at a high rate cannot be why a ratio looks large
    "id_only_seen_nostop": ("movielens_id_only", {"seen_bias": True}, {"patience": 10_000}),
    # the two under bf16 autocast, for CPUs with native bf16 dot products (Zen 4: a
    # [4096, 128] x [128, 3700] product 3.7x faster than fp32)
    "multi_seen_d128_year_date_bf16": ("movielens_year_date", {"seen_bias": True, "d_model": 128}, {"bf16": True}),
    "id_only_seen_nostop_bf16": ("movielens_id_only", {"seen_bias": True}, {"patience": 10_000, "bf16": True}),
    # the two with the training step under torch.compile (TrainConfig.compile)
    "multi_seen_d128_year_date_bf16_compiled": ("movielens_year_date", {"seen_bias": True, "d_model": 128}, {"bf16": True, "compile": True}),
    "id_only_seen_nostop_bf16_compiled": ("movielens_id_only", {"seen_bias": True}, {"patience": 10_000, "bf16": True, "compile": True}),
    # the multi-feature row without early stopping too: where steps are fast enough that it
    # plateaus mid-budget (Zen 5, compiled: best epoch 16, stopped at 20 of 31 planned, 9 of
    # 14 minutes), patience stops it at a high learning rate; this one anneals to the end
    "multi_seen_d128_year_date_nostop_bf16_compiled": ("movielens_year_date", {"seen_bias": True, "d_model": 128}, {"patience": 10_000, "bf16": True, "compile": True}),
    # ... with the time until the next event as an input (spec movielens_year_date_next: for the
    # last event the gap to the request, here the test event's time; what a live service knows;
    # but on ML-1M its same-second bucket reads the page stamps: bench/request_time.py)
    "multi_seen_d128_year_date_next_nostop_bf16_compiled": ("movielens_year_date_next", {"seen_bias": True, "d_model": 128}, {"patience": 10_000, "bf16": True, "compile": True}),
    # ... with that time no finer than a minute (movielens_year_date_next60): ML-1M stamps a page
    # of ratings with one second, and a same-second "request" would say the target was on that page
    "multi_seen_d128_year_date_next60_nostop_bf16_compiled": ("movielens_year_date_next60", {"seen_bias": True, "d_model": 128}, {"patience": 10_000, "bf16": True, "compile": True}),
    # multi_seen_d128_year_bf16 reading 400 events instead of 200 (its gain over ID-only grows
    # with history length; a quarter of ML-1M's users have more than 200)
    "multi_seen_d128_year_len400_bf16": ("movielens_year", {"seen_bias": True, "d_model": 128, "max_len": 400}, {"bf16": True}),
    # ... and with dropout 0.3: on a host where it early-stops (best epoch 17-22 of 21-26), it overfits
    "multi_seen_d128_year_drop3_bf16": ("movielens_year", {"seen_bias": True, "d_model": 128, "dropout": 0.3}, {"bf16": True}),
    # ... and with each feature of an event dropped whole with p = 0.1 in training
    "multi_seen_d128_year_fdrop1_bf16": ("movielens_year", {"seen_bias": True, "d_model": 128, "feature_dropout": 0.1}, {"bf16": True}),
    # ... and four attention heads of width 32 instead of two of 64 (heads for time, rating, genre)
    "multi_seen_d128_year_h4_bf16": ("movielens_year", {"seen_bias": True, "d_model": 128, "n_heads": 4}, {"bf16": True}),
    # ... and the title's words as an item attribute (spec movielens_words)
    "multi_seen_d128_words_bf16": ("movielens_words", {"seen_bias": True, "d_model": 128}, {"bf16": True}),
    # ... and three layers (the two-layer model's validation HR@10 plateaued after 18 of 27 epochs)
    "multi_seen_d128_l3_bf16": ("movielens", {"seen_bias": True, "d_model": 128, "n_layers": 3}, {"bf16": True}),
}
PROFILE = "genre_profile"


def run_seed(args: argparse.Namespace, histories: dict, seed: int, names: list[str]) -> dict:
    """Every model's numbers for one seed: {model: {metric: value, ...}}."""
    split = leave_one_out(histories, args.holdout)
    tcfg = TrainConfig(epochs=args.epochs, seed=seed, max_minutes=args.minutes, fit_schedule_to_budget=True, holdout=args.holdout)
    genres = genre_order(histories)
    users, inputs, labels = probe_cases({u: histories[u] for u in split.test}, genres)
    out: dict[str, dict] = {}
    tokenizer = None
    for name in names:
        spec_name, objectives, *training = MODELS[name]
        t0 = time.perf_counter()
        run = train_encoder(histories, load_spec(spec_name), EncoderConfig(**objectives),
                            replace(tcfg, **(training[0] if training else {})),
                            Path(args.runs) / f"{name}-s{seed}", progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
        loaded = load_checkpoint(run.checkpoint)
        tokenizer = tokenizer or loaded.tokenizer
        scorer = model_scorer(loaded.model, loaded.tokenizer)
        report = evaluate(scorer, loaded.tokenizer, split.test)
        cold = cold_start_report({name: scorer}, loaded.tokenizer, split.test)
        probe = probe_accuracy(loaded.embed(inputs), labels, len(genres), seed)
        out[name] = _row(report, cold, name) | {
            "probe": probe["accuracy"], "train_seconds": seconds, "epochs": len(run.history), "best_epoch": run.best_epoch}
        print(f"seed {seed} {name}: test HR@10 {report['all']['hr@10']:.4f} (excl. seen {report['exclude_seen']['hr@10']:.4f}), "
              f"cold 1-5 {out[name]['cold 1-5']:.4f}, probe {probe['accuracy']:.3f} ({seconds:.0f}s, {len(run.history)} epochs)", flush=True)
    assert tokenizer is not None
    pop = popularity_scorer(tokenizer, split.train)  # training events only
    out["popularity"] = _row(evaluate(pop, tokenizer, split.test), cold_start_report({"popularity": pop}, tokenizer, split.test), "popularity")
    profile = probe_accuracy(genre_profile(inputs, genres), labels, len(genres), seed)
    out[PROFILE] = {"probe": profile["accuracy"]}
    out["_probe"] = {"users": profile["users"], "majority": profile["majority"], "genres": len(genres),
                     "labels_trained_on": args.holdout < FUTURE}
    print(f"seed {seed} popularity: HR@10 {out['popularity']['hr@10']:.4f}, cold 1-5 {out['popularity']['cold 1-5']:.4f}; "
          f"genre-profile probe {profile['accuracy']:.3f} (majority {profile['majority']:.3f})", flush=True)
    return out


def _row(report: dict, cold: dict, name: str) -> dict:
    row = {m: report["all"][m] for m in METRICS} | {f"excl {m}": report["exclude_seen"][m] for m in METRICS}
    row |= {f"cold {bucket}": rows[name]["hr@10"] for bucket, rows in cold.items()}
    row |= {f"cold {bucket} users": rows[name]["users"] for bucket, rows in cold.items()}
    row |= {f"len {bucket}": v["hr@10"] for bucket, v in report["by_length"].items()}
    return row


def earlier_runs(paths: list[str], args: argparse.Namespace, users: int, names: list[str],
                 seeds: list[int]) -> tuple[list[int], list[dict]]:
    """(seeds, per-seed results) of earlier runs to pool with this one; refused (exit 2) unless
    each ran the same data size, holdout, budget, epochs and encoder settings, its models as
    defined now, on other seeds than this run's. Runs of one seed with different models (two
    screens on one host) merge into that seed's row, which must then hold every model asked."""
    by_seed: dict[int, dict] = {}
    enc = EncoderConfig().to_dict()

    def refuse(path: str, why: str) -> None:
        print(f"--add-seeds-from {path}: {why}", file=sys.stderr)
        sys.exit(2)

    for path in paths:
        try:
            old = json.loads(Path(path).read_text())
            config, per_seed = old["config"], old["results"]["per_seed"]
        except (OSError, ValueError, KeyError):
            refuse(path, "not a result of this bench")
        # Encoder settings added since that run are compared only where it had them.
        theirs = {n: v for n, v in config.get("models", {}).items() if n in names}
        mine = {"users": users, "holdout": args.holdout, "budget_minutes_per_model": args.minutes,
                "max_epochs": args.epochs, "models": {n: list(MODELS[n]) for n in theirs},
                "encoder": {k: enc.get(k) for k in config.get("encoder", {})}}
        config = config | {"models": theirs}
        differ = sorted(k for k, v in mine.items()
                        if json.loads(json.dumps(config.get(k))) != json.loads(json.dumps(v)))
        if differ:
            refuse(path, f"settings differ: {', '.join(differ)}")
        for seed, row in zip(config["seeds"], per_seed):
            merged = by_seed.setdefault(seed, {})
            twice = set(theirs) & {n for n in merged if not n.startswith("_")}
            if seed in seeds or twice:
                refuse(path, f"seed {seed} again" + (f" for {', '.join(sorted(twice))}" if twice else ""))
            merged.update({k: v for k, v in row.items() if k in theirs or k.startswith("_") or k in ("popularity", PROFILE)})
    for seed, row in by_seed.items():
        if missing := [n for n in names if n not in row]:
            print(f"--add-seeds-from: seed {seed} lacks {', '.join(missing)}", file=sys.stderr)
            sys.exit(2)
    return list(by_seed), list(by_seed.values())


def aggregate(per_seed: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """{model: {metric: (mean, std over seeds)}} for every numeric metric."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for model in per_seed[0]:
        if model.startswith("_"):
            continue
        out[model] = {}
        for key, value in per_seed[0][model].items():
            if isinstance(value, (int, float)):
                vals = np.array([s[model][key] for s in per_seed], dtype=float)
                out[model][key] = (float(vals.mean()), float(vals.std()))
    return out


def _pm(stats: dict, key: str) -> str:
    if key not in stats:
        return ""
    mean, std = stats[key]
    return f"{mean:.4f} ± {std:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--minutes", type=float, default=14.0, help="training budget per model")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--users", type=int, default=0, help="use only the first N users (quick runs)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (>= 3 for mean ± std)")
    ap.add_argument("--holdout", type=int, default=FUTURE, help="events of each user's tail never trained on")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated rows to train")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="encoder_ml1m")
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--add-seeds-from", action="append", default=[], metavar="JSON",
                    help="an earlier result of this bench with the same settings and models: its "
                         "seeds join this run's in the mean ± std (seeds run in another session)")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        names = [n for n in args.models.split(",") if n]
        assert seeds and names and set(names) <= set(MODELS) and args.holdout >= 1
    except (ValueError, AssertionError):
        print(f"bad --seeds/--models/--holdout (models: {', '.join(MODELS)})", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads or torch.get_num_threads())

    histories = load_dataset(args.data, "movielens", "movielens").histories
    if args.users:
        histories = dict(list(histories.items())[: args.users])
    earlier_seeds, earlier = earlier_runs(args.add_seeds_from, args, len(histories), names, seeds)
    t0 = time.perf_counter()
    per_seed = earlier + [run_seed(args, histories, seed, names) for seed in seeds]
    seeds = earlier_seeds + seeds
    stats = aggregate(per_seed)
    split = leave_one_out(histories, args.holdout)
    config = {"data": args.data, "users": len(histories), "test_users": len(split.test), "seeds": seeds,
              "holdout": args.holdout, "budget_minutes_per_model": args.minutes, "max_epochs": args.epochs,
              "threads": torch.get_num_threads(), "models": {n: MODELS[n] for n in names},
              "encoder": EncoderConfig().to_dict(), "probe": per_seed[0]["_probe"], "wall_seconds": time.perf_counter() - t0,
              "seeds_added_from": args.add_seeds_from}
    rows_order = ["popularity", *names]
    header = ["model", "HR@10", "NDCG@10", "HR@10 excl. seen", "HR@10 last 1-5", "HR@10 last 6-20", "taste probe", "train s", "epochs"]
    rows = [[n, _pm(stats[n], "hr@10"), _pm(stats[n], "ndcg@10"), _pm(stats[n], "excl hr@10"), _pm(stats[n], "cold 1-5"),
             _pm(stats[n], "cold 6-20"), _pm(stats[n], "probe"), _pm(stats[n], "train_seconds"), _pm(stats[n], "epochs")] for n in rows_order]
    rows.append([PROFILE + " (probe only)", "", "", "", "", "", _pm(stats[PROFILE], "probe"), "", ""])
    probe = per_seed[0]["_probe"]
    # Each ID-only row present against the best multi-feature row (like for like: with the seen
    # bias on both sides when id_only_seen is the baseline).
    id_rows = [n for n in names if MODELS[n][0] == "movielens_id_only"]
    multi_rows = [n for n in names if n not in id_rows]
    ratio = ""
    if id_rows and multi_rows:
        best = max(multi_rows, key=lambda n: stats[n]["hr@10"][0])

        def times(base_row: str, key: str) -> str:
            base = stats[base_row][key][0]
            return f"{stats[best][key][0] / base:.3f}x" if base > 0 else f"n/a ({base_row} scored 0)"

        ratio = "".join(f"best multi-feature ({best}) / {b}: HR@10 {times(b, 'hr@10')}, excl. seen "
                        f"{times(b, 'excl hr@10')}\n\n" for b in id_rows)
    md = (
        f"# Encoder quality, MovieLens-1M users 1-{len(histories)} (full ranking, leave-one-out test)\n\n"
        f"Seeds {seeds} (mean ± std), {args.minutes:g} min per model, {torch.get_num_threads()} thread(s), "
        f"holdout {args.holdout}, {len(split.test)} test users."
        + (f" Seeds {earlier_seeds} come from {', '.join(args.add_seeds_from)} (an earlier run, "
           "same settings)." if earlier_seeds else "")
        + f"\n\n{markdown_table(header, rows)}\n"
        f"- HR@10 last 1-5 / 6-20: the same test event with only the last 1-5 / 6-20 input events (cold start; "
        f"{int(stats['popularity']['cold 1-5 users'][0])} / {int(stats['popularity']['cold 6-20 users'][0])} users).\n"
        f"- taste probe: 5-fold L2 logistic regression predicting the most frequent genre of each user's next {FUTURE} "
        f"events ({probe['users']} users, {probe['genres']} genres, majority class {probe['majority']:.3f}) from the "
        f"stored user vector, or from the genre-share profile of the history; labels "
        f"{'WERE' if probe['labels_trained_on'] else 'were never'} trained on.\n\n{ratio}"
        f"![HR@10 by history length]({args.name}.png)\n"
    )
    write_results(args.name, config, {"mean_std": stats, "per_seed": per_seed}, md)
    plot(stats, rows_order, RESULTS / f"{args.name}.png")
    print(md)


def plot(stats: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [k for k in stats["popularity"] if (k.startswith("cold ") and not k.endswith("users")) or k.startswith("len ")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        ax.bar([j + i * width for j in range(len(buckets))], [stats[name].get(b, (0.0, 0.0))[0] for b in buckets], width,
               yerr=[stats[name].get(b, (0.0, 0.0))[1] for b in buckets], label=name)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(buckets))])
    ax.set_xticklabels([b.replace("cold ", "last ").replace("len ", "all ") for b in buckets], fontsize=8)
    ax.set_xlabel("events the encoder reads (last n of the history, or the whole history by length)")
    ax.set_ylabel("HR@10 (full ranking)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
