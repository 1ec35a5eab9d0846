"""Cold-start HR@10 read two ways, side by side for each encoder checkpoint: the last 1-5 input
events of each ML-1M test user tokenized alone (what training/evaluate.cold_start_report does:
the first kept event has no previous event, so its time gap is "unknown"), and the same events
tokenized within the full history (every feature as in context, the first one keeping its real
gap). The difference is what a multi-feature encoder reads into "no previous event": in
training that only ever marks a user's very first event.

    python bench/cold_start_context.py --checkpoints DIR [DIR ...] [--name cold_start_context]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED, markdown_table, write_results  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.evaluate import evaluate, model_scorer, truncated_cases  # noqa: E402
from training.split import leave_one_out  # noqa: E402
from userenc.checkpoint import load_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--holdout", type=int, default=1, help="as the checkpoints were trained")
    ap.add_argument("--fewest", type=int, default=1)
    ap.add_argument("--most", type=int, default=5)
    ap.add_argument("--name", default="cold_start_context")
    args = ap.parse_args()
    if not 1 <= args.fewest <= args.most or args.holdout < 1:
        print("bad --fewest/--most/--holdout", file=sys.stderr)
        sys.exit(2)
    histories = load_dataset(args.data, "movielens", "movielens").histories
    split = leave_one_out(histories, args.holdout)
    short = truncated_cases(split.test, args.fewest, args.most)
    full_by_last = {history[-1].event_id: (history, target) for history, target in split.test.values()}
    results = []
    for path in args.checkpoints:
        try:
            loaded = load_checkpoint(path)
        except (OSError, ValueError) as err:
            print(f"{path}: not an encoder checkpoint ({type(err).__name__})", file=sys.stderr)
            sys.exit(2)
        alone = model_scorer(loaded.model, loaded.tokenizer)

        def in_context(cut: list, encoded: list[dict[str, np.ndarray]], tokenizer=loaded.tokenizer, score=alone) -> torch.Tensor:
            rows = [{k: v[-len(h):] for k, v in tokenizer.encode(full, now=target.timestamp).items()}
                    for h in cut for full, target in [full_by_last[h[-1].event_id]]]
            return score(cut, rows)

        with torch.no_grad():
            a = evaluate(alone, loaded.tokenizer, short)["all"]
            b = evaluate(in_context, loaded.tokenizer, short)["all"]
        results.append({"checkpoint": str(path), "spec": loaded.tokenizer.spec.name, "users": a["users"],
                        "hr@10_alone": a["hr@10"], "hr@10_in_context": b["hr@10"]})
        print(results[-1], flush=True)
    header = ["checkpoint", "spec", "users", f"HR@10 last {args.fewest}-{args.most}, tokenized alone", "tokenized in context"]
    rows = [[Path(r["checkpoint"]).name, r["spec"], r["users"], r["hr@10_alone"], r["hr@10_in_context"]] for r in results]
    md = (f"# Cold start read two ways: the last {args.fewest}-{args.most} events alone or in their history's context\n\n"
          f"ML-1M, holdout {args.holdout}, the test event of each user with only the last n input events (n cycling "
          f"{args.fewest}..{args.most}, as training/evaluate.truncated_cases).\n\n{markdown_table(header, rows)}\n")
    write_results(args.name, {"data": args.data, "holdout": args.holdout, "fewest": args.fewest, "most": args.most},
                  {"checkpoints": results}, md)
    print(md)


if __name__ == "__main__":
    main()
