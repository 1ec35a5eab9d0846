"""How much of the Amazon review task's answer can a user's own past reviews give at all?

userllm_vs_text.py's review task (given a user's history and an item, write that user's review
title) reads as "personalization" only if a user's titles say something about their next one. This
scores simple rules, no model, on exactly that benchmark's 200 users and held-out last reviews
(same split, same users, same rouge-score settings), and pairs them with the LLM arms' per-user
scores from a userllm_vs_text.json:

- constant: the most frequent title among all training reviews (what no personalization can do);
- item words: the 3 most frequent words of other users' training titles of the asked item;
- own last / own words: the user's most recent title / 3 most frequent title words, from the
  history the arms read;
- own best, item best (oracles: they pick with the answer): the best single past title of the
  user / of the item, a ceiling for copying one.

Where "own words" is not above "constant", a user's history holds little of the answer, and no
arm can be separated from no personalization on this task by its personal signal.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, RESULTS, markdown_table, write_results  # noqa: E402
from userllm_compare import comparison_rows, comparisons  # noqa: E402
from userllm_vs_text import pick_users  # noqa: E402

from training.data import load_dataset  # noqa: E402
from training.evaluate_adapter import review_rouge  # noqa: E402
from training.tasks import Catalogue, held_out_examples, task_split  # noqa: E402

LLM_ARMS = ("userllm", "text-lora", "none-lora", "text-zeroshot")


def title(event) -> str:
    return str(event.fields.get("summary") or "").strip()


def top_words(titles: list[str], k: int = 3) -> str:
    return " ".join(w for w, _ in Counter(w for t in titles for w in t.lower().split()).most_common(k))


def rules(split, exs) -> dict[str, list[str | list[str]]]:
    """Each rule's answer per example; an oracle's is the list of candidates it picks from."""
    by_item: dict[str, list[tuple[str, str]]] = {}  # item -> (user, title) of training reviews
    for user, h in split.train.items():
        for e in h:
            if t := title(e):
                by_item.setdefault(e.item_id, []).append((user, t))
    constant = Counter(t.lower() for pairs in by_item.values() for _, t in pairs).most_common(1)[0][0]
    out: dict[str, list] = {k: [] for k in ("constant", "item words", "own last", "own words",
                                            "own best (oracle)", "item best (oracle)")}
    for ex in exs:
        own = [title(e) for e in ex.history if title(e)]
        others = [t for user, t in by_item.get(ex.item.item_id, []) if user != ex.user]
        out["constant"].append(constant)
        out["item words"].append(top_words(others) or constant)
        out["own last"].append(own[-1] if own else constant)
        out["own words"].append(top_words(own) or constant)
        out["own best (oracle)"].append(own or [constant])
        out["item best (oracle)"].append(others or [constant])
    return out


def score(exs, answers: list) -> dict:
    """An answer per example, or an oracle's candidates, scored as the LLM arms are."""
    return review_rouge(exs, [a if isinstance(a, list) else [a] for a in answers])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--amazon", default=str(SHARED / "data" / "amazon-musical-instruments-5core" / "Musical_Instruments_5.json"))
    ap.add_argument("--arms-from", default=str(RESULTS / "userllm_vs_text.json"),
                    help="a userllm_vs_text.json whose Amazon arms (per-user ROUGE) join the table")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not Path(a.amazon).is_file():
        raise SystemExit(f"--amazon: no file {a.amazon}")
    hist = load_dataset(a.amazon, "amazon").histories
    split = task_split(hist, 1)  # as userllm_vs_text.run_amazon
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    exs = held_out_examples(split, ["review"], cat, 64, pick_users(split, 4, a.users, a.seed))
    rules_out = rules(split, exs)
    quality = {name: score(exs, answers) for name, answers in rules_out.items()}
    arms_path = Path(a.arms_from)
    if arms_path.is_file():
        amazon = json.loads(arms_path.read_text())["results"].get("amazon", {}).get("quality", {})
        asked = {ex.user for ex in exs}
        for arm in LLM_ARMS:
            if arm in amazon and set(amazon[arm]["review"]["users"]) == asked:
                quality[arm] = amazon[arm]
    rows = [row for name in quality if name != "constant"  # "n" names the answer here
            for row in comparisons({name: {name: quality[name], "constant": quality["constant"]}},
                                   ["review"], name)]
    constant = rules_out["constant"][0]
    md = [f"# Amazon review titles: the personal signal in the answer\n\n{len(exs)} users' held-out "
          "last review titles, the users and split of userllm_vs_text.py; ROUGE F1 (rouge-score, "
          f"stemmed). constant = {constant!r}. LLM arms from {arms_path.name} where they answered "
          "these users.\n",
          markdown_table(["answer", "ROUGE-1", "ROUGE-L"],
                         [[k, v["review"]["rouge1"], v["review"]["rougeL"]] for k, v in quality.items()]),
          "\nEach row minus constant, paired over users (95% bootstrap):\n",
          markdown_table(["answer", "task", "metric", "minus", "users", "row", "constant", "diff", "95% CI",
                          "verdict"], comparison_rows(rows))]
    slim = {k: {"rouge1": v["review"]["rouge1"], "rougeL": v["review"]["rougeL"]} for k, v in quality.items()}
    write_results("review_signal", vars(a), {"quality": slim, "paired_vs_constant": rows}, "\n".join(md))
    plot(slim, RESULTS / "review_signal.png")
    print("\n".join(md))
    return 0


def plot(slim: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(slim)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [slim[n]["rougeL"] for n in names], color="tab:blue")
    ax.set_xlabel("ROUGE-L F1 on held-out review titles")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
