"""Does a USER-LLM adapter read the encoder's next-item candidates, or answer from popularity?

Next movie stays at 0 Recall@10 for every USER-LLM arm of userllm_vs_text.py, hints or not,
while the encoder alone ranks the answer in its top 10 for ~6% of users. This probe says which
side fails. Per user (ML-1M, the bench's users, N events before the held-out tail), the
adapter's own engine runs the bench's trie-constrained beam search (beam 10) over a small
catalogue: the encoder's 16 best unseen items (its "hints", userenc/item_hints.py; for an
adapter without hints, the same choice from its encoder's next-item head) and the 64 most
popular unseen training titles. An LLM that follows its user tokens fills its top 10 with
hints (share -> 1); one that ignores them picks by popularity (share below the 16/80 = 0.20
of a random pick, since the popular titles are what the answers were mostly trained on). A
second search over the hints alone ranks them: where the answer is among them, the LLM's rank
against the encoder's own order says whether the LLM re-ranks better than the encoder.

    python bench/userllm_hint_probe.py --adapters DIR[,DIR...] [--users 40] [--n 50]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, markdown_table, write_results  # noqa: E402
from userllm_vs_text import HOLDOUT, pick_users  # noqa: E402

from training.data import load_dataset  # noqa: E402
from training.evaluate_adapter import _inputs, answer_trie, load_arm  # noqa: E402
from training.tasks import Catalogue, held_out_examples, task_split  # noqa: E402
from userenc.item_hints import top_unseen  # noqa: E402

HINTS, POPULAR, BEAM = 16, 64, 10


def candidate_items(enc, ids: dict, valid: torch.Tensor) -> list[list[int]]:
    """Per history: the encoder's best HINTS unseen item ids, best first."""
    model = enc.model
    states = model.states(ids, valid, last_only=True)
    if model.hints is not None:
        return model.hinted_items(states, valid, ids).tolist()
    scores = model.heads.item_scores(states[:, -1])
    return top_unseen(scores, HINTS, ids[model.spec.item.name], valid).tolist()


@torch.inference_mode()
def probe(arm, examples, cat: Catalogue, popular: list[str]) -> dict[str, Any]:
    from llm.engine.beam_search import TokenTrie

    trie, by_ids = answer_trie(arm, cat.answers("next_movie"))
    ids_of = {title: seq for seq, title in by_ids.items()}
    items = arm.encoder.tokenizer.vocabs[arm.encoder.tokenizer.spec.item.name]
    share = top1 = hits = answered = 0
    llm_ranks: list[int | None] = []
    encoder_ranks: list[int] = []
    for i in range(0, len(examples), 4):
        batch = examples[i:i + 4]
        chosen = candidate_items(arm.encoder, *arm.encoder.batch([ex.history for ex in batch]))
        prompts, tokens, _ = _inputs(arm, batch, arm.engine.max_model_len // 2)
        hints, mixed = [], []
        for ex, row in zip(batch, chosen):
            seen = {str(e.fields.get("title")) for e in ex.history}
            h = [t for t in dict.fromkeys(cat.titles.get(items.value(j)) for j in row) if t in ids_of]
            pop = [t for t in popular if t not in seen and t not in h][:POPULAR]
            hints.append(h)
            mixed.append(h + pop)
        only_hints = arm.engine.beam_search(
            prompts, [TokenTrie([ids_of[t] for t in h], trie.end_token) for h in hints], BEAM, tokens)
        with_popular = arm.engine.beam_search(
            prompts, [TokenTrie([ids_of[t] for t in m], trie.end_token) for m in mixed], BEAM, tokens)
        for ex, h, ranked_h, ranked_m in zip(batch, hints, only_hints, with_popular):
            top = [by_ids[tuple(a)] for a, _ in ranked_m]
            share += sum(t in h for t in top)
            top1 += bool(top) and top[0] in h
            hits += ex.target in top
            if ex.target in h:
                answered += 1
                order = [by_ids[tuple(a)] for a, _ in ranked_h]
                llm_ranks.append(order.index(ex.target) + 1 if ex.target in order else None)
                encoder_ranks.append(h.index(ex.target) + 1)
    n = len(examples)
    return {"users": n, "hint_share_top10": share / (BEAM * n), "hint_top1": top1 / n,
            "chance_share": HINTS / (HINTS + POPULAR), "recall@10_in_candidates": hits / n,
            "answer_in_hints": answered, "llm_rank_in_hints": llm_ranks,
            "encoder_rank_in_hints": encoder_ranks}


def trained_as(adapter: Path) -> str:
    """What the adapter is, from its manifest: strategy, K, hints, tasks, steps, budget."""
    m = json.loads((adapter / "manifest.json").read_text())
    c = m["adapter_config"]
    return (f"{c['strategy']}, {c['integration']} every {c['cross_every_n']}, K={c['num_user_tokens']}, "
            f"hints {c['item_hints']}, tasks {'+'.join(c['tasks'])}, {m['step']} steps "
            f"({m['train_config']['max_minutes']:g}-minute budget)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", required=True, type=lambda s: [x for x in s.split(",") if x])
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf"
                                           / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--n", type=int, default=50, help="events read before the held-out tail")
    ap.add_argument("--name", default="userllm_hint_probe")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hist = load_dataset(a.data, "movielens").histories
    split = task_split(hist, HOLDOUT)
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    # The bench's users (>= 500 events before the tail, seeded order), the first --users.
    examples = held_out_examples(split, ["next_movie"], cat, a.n, pick_users(split, 500, 120, 0)[:a.users])
    counts = Counter(e.item_id for h in split.train.values() for e in h)
    popular = list(dict.fromkeys(cat.titles[i] for i, _ in counts.most_common() if i in cat.titles))
    results: dict[str, Any] = {}
    for path in a.adapters:
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["adapter_config"]["arm"] != "userllm":
            ap.error(f"{path}: not a USER-LLM adapter (no manifest.json with arm 'userllm')")
    for path in a.adapters:
        arm = load_arm(Path(path).name, a.model, path)
        try:
            results[Path(path).name] = probe(arm, examples, cat, popular) | {
                "adapter": trained_as(Path(path))}
        finally:
            arm.close()
        print(Path(path).name, json.dumps(results[Path(path).name]), flush=True)
    rows = [[name, r["adapter"], r["users"], r["hint_share_top10"], r["chance_share"], r["hint_top1"],
             r["recall@10_in_candidates"], r["answer_in_hints"],
             " ".join(str(x) for x in r["llm_rank_in_hints"]),
             " ".join(str(x) for x in r["encoder_rank_in_hints"])] for name, r in results.items()]
    md = (f"# Does the adapter read its hints? (ML-1M, N={a.n}, {HINTS} hints + {POPULAR} popular "
          f"unseen titles, beam {BEAM})\n\n" + markdown_table(
              ["adapter", "trained", "users", "hint share of top 10", "chance", "top 1 is a hint",
               "R@10 (candidates)", "answer in hints", "LLM rank of answer among hints",
               "encoder rank"], rows))
    write_results(a.name, vars(a), results, md)
    plot(results, Path(__file__).resolve().parent / "results" / f"{a.name}.png")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 3))
    ax.bar(names, [results[n]["hint_share_top10"] for n in names])
    ax.axhline(HINTS / (HINTS + POPULAR), color="grey", linestyle="--", label="random pick")
    ax.set_ylabel("hint share of the top 10")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
