"""What an encoder with a request-time feature ("next_gap": the time until the next event, for
the last one the time until the request) owes to that time, per checkpoint, on the ML-1M
leave-one-out test events:

- asked at the test event's time (what bench/encoder_quality.py reports);
- asked with the time unknown (the last event's next gap OOV, as embeddings are computed);
- asked at a wrong time of the right distribution (each user gets another test user's gap);
- asked a second after the last event at least (ML-1M stamps a page of ratings with one second,
  so 42% of its test events share their input's last second: no live request can);
- HR@10 by bucket of the true time until the test event, beside a time-blind baseline
  (ID-only) checkpoint of the same seed, if given: where the time helps.

    python bench/request_time.py --checkpoints DIR [DIR ...] [--baselines DIR ...] [--name request_time]
"""
from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, markdown_table, write_results  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluate import evaluate, model_scorer  # noqa: E402
from training.split import leave_one_out  # noqa: E402
from userenc.checkpoint import load_checkpoint  # noqa: E402
from userenc.spec import DEFAULT_GAP_BOUNDARIES  # noqa: E402

BUCKET_NAMES = ["<1s", "<1min", "<10min", "<1h", "<6h", "<1d", "<3d", "<1w", "<30d", "<90d", "<1y", ">=1y"]


def asked_at(loaded, score, gaps: dict[str, int] | None, cases: dict):
    """A scorer that re-tokenizes each history with the request `last + gaps[user]` (None: the
    time unknown) instead of the test event's own time."""
    by_last = {h[-1].event_id: user for user, (h, _) in cases.items()}

    def scorer(histories, encoded):
        rows = []
        for h in histories:
            gap = None if gaps is None else gaps[by_last[h[-1].event_id]]
            rows.append(loaded.tokenizer.encode(h, now=None if gap is None else h[-1].timestamp + gap))
        return score(histories, rows)
    return scorer


def by_bucket(score, tokenizer, cases: dict, gaps: dict[str, int]) -> dict[str, dict]:
    out = {}
    for b, name in enumerate(BUCKET_NAMES):
        part = {u: c for u, c in cases.items() if bisect.bisect_right(DEFAULT_GAP_BOUNDARIES, gaps[u]) == b}
        if part:
            out[name] = {"users": len(part), "hr@10": evaluate(score, tokenizer, part)["all"]["hr@10"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--checkpoints", nargs="+", required=True, help="encoders with a next_gap feature")
    ap.add_argument("--baselines", nargs="*", default=[], help="time-blind encoders, one per checkpoint")
    ap.add_argument("--holdout", type=int, default=1, help="as the checkpoints were trained")
    ap.add_argument("--seed", type=int, default=0, help="for the wrong-time shuffle")
    ap.add_argument("--name", default="request_time")
    args = ap.parse_args()
    if args.holdout < 1 or (args.baselines and len(args.baselines) != len(args.checkpoints)):
        print("bad --holdout, or not one baseline per checkpoint", file=sys.stderr)
        sys.exit(2)
    histories = load_dataset(args.data, "movielens", "movielens").histories
    cases = leave_one_out(histories, args.holdout).test
    users = sorted(cases)
    gaps = {u: max(0, cases[u][1].timestamp - cases[u][0][-1].timestamp) for u in users}
    rng = np.random.default_rng(args.seed)
    shuffled = dict(zip(users, (gaps[u] for u in rng.permutation(users))))
    # A live request never comes in the very second its last event was stamped, but ML-1M stamps
    # a page of ratings with one second: the same time, a second after the last event at least.
    a_second_later = {u: max(g, 1) for u, g in gaps.items()}
    results = []
    for i, path in enumerate(args.checkpoints):
        try:
            loaded = load_checkpoint(path)
            base = load_checkpoint(args.baselines[i]) if args.baselines else None
        except (OSError, ValueError) as err:
            print(f"{path}: not an encoder checkpoint ({type(err).__name__})", file=sys.stderr)
            sys.exit(2)
        if loaded.request_gap is None:
            print(f"{path}: its spec has no next_gap feature", file=sys.stderr)
            sys.exit(2)
        score = model_scorer(loaded.model, loaded.tokenizer)
        row = {"checkpoint": str(path)}
        with torch.no_grad():
            for key, scorer in (("at the test time", score), ("time unknown", asked_at(loaded, score, None, cases)),
                                ("another user's gap", asked_at(loaded, score, shuffled, cases)),
                                ("a second later at least", asked_at(loaded, score, a_second_later, cases))):
                res = evaluate(scorer, loaded.tokenizer, cases)
                row[key] = {"hr@10": res["all"]["hr@10"], "hr@10_exclude_seen": res["exclude_seen"]["hr@10"]}
            row["by_gap"] = by_bucket(score, loaded.tokenizer, cases, gaps)
            if base is not None:
                row["baseline"] = str(args.baselines[i])
                row["baseline_by_gap"] = by_bucket(model_scorer(base.model, base.tokenizer), base.tokenizer, cases, gaps)
        results.append(row)
        print({k: v for k, v in row.items() if not k.endswith("by_gap")}, flush=True)
    keys = ["at the test time", "time unknown", "another user's gap", "a second later at least"]
    header = ["checkpoint", "HR@10 at the test time"] + keys[1:]
    rows = [[Path(r["checkpoint"]).name] + [f"{r[k]['hr@10']:.4f} / {r[k]['hr@10_exclude_seen']:.4f}" for k in keys]
            for r in results]
    md = ("# The request time an encoder reads: asked at the test event's time, without it, at a wrong one, "
          "a second later at least\n\n"
          f"ML-1M, holdout {args.holdout}, {len(users)} test users; HR@10 all items / history excluded.\n\n"
          f"{markdown_table(header, rows)}\n")
    bucket_rows = []
    for name in BUCKET_NAMES:
        cells = [name, results[0]["by_gap"].get(name, {}).get("users", 0)]
        for r in results:
            cells.append(r["by_gap"].get(name, {}).get("hr@10", ""))
            if "baseline_by_gap" in r:
                cells.append(r["baseline_by_gap"].get(name, {}).get("hr@10", ""))
        bucket_rows.append(cells)
    sub = [h for i in range(len(results)) for h in ([f"#{i} next_gap"] + (["time-blind"] if args.baselines else []))]
    md += ("\nHR@10 by the true time from the last input event to the test event (the checkpoints in order, each beside "
           f"its baseline):\n\n{markdown_table(['time until the test event', 'users'] + sub, bucket_rows)}\n")
    write_results(args.name, {"data": args.data, "holdout": args.holdout, "seed": args.seed,
                              "checkpoints": args.checkpoints, "baselines": args.baselines}, {"checkpoints": results}, md)
    plot(results, RESULTS / f"{args.name}.png")
    print(md)


def plot(results: list[dict], path: Path) -> None:
    """HR@10 by bucket of the time until the test event, each checkpoint beside its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(BUCKET_NAMES))
    for i, r in enumerate(results):
        for key, style, label in (("by_gap", "-o", f"#{i} next_gap"), ("baseline_by_gap", "--x", f"#{i} time-blind")):
            if key in r:
                ax.plot(x, [r[key].get(name, {}).get("hr@10", float("nan")) for name in BUCKET_NAMES], style,
                        color=f"C{i}", label=label)
    ax.set_xticks(x, BUCKET_NAMES, fontsize=7)
    ax.set_xlabel("time from the last input event to the test event")
    ax.set_ylabel("HR@10")
    ax.set_title("HR@10 by the time until the request")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
