"""USER-LLM vs the history pasted as text, side by side: quality and cost against history length.

ML-1M (users 1-2999): an encoder trained with the last 10 events of every user held out; arms
trained on the encoder's training part (bench/userllm_arms.py): USER-LLM (user tokens through
gated cross-attention; "userllm-hints" adds the encoder's top-16 next items as hint tokens,
userenc/item_hints.py), the text prompt (zero-shot and LoRA-trained), no personalization
(LoRA-trained on the question alone), and the encoder alone. Every arm answers the same
questions about the same users, with the same LLM and the same trie-constrained beam search,
reading the same N = 50 / 200 / 500 events before the held-out tail (the text prompt keeps
the most recent of them that fit SmolLM2's 8,192-token context). Cost per N: prompt tokens,
prefill FLOPs (analytic, checked with torch's FLOP counter), time to first token p50/p99
through our engine (the encoder's time included on the USER-LLM side) and peak memory.
Amazon (musical instruments): review titles, ROUGE-1/L.

    python bench/userllm_vs_text.py [--users 24] [--ablations] [--arm-users text-lora@50=48] ...

Arms are compared per user (bench/userllm_compare.py): USER-LLM minus each other arm on the
users both answered, with a 95% paired bootstrap interval, so an arm run on fewer users (the
text prompts cost seconds to minutes a user on CPU) is still compared like for like.

Trained stages are kept in --work and reused when the benchmark is run again.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, markdown_table, write_results  # noqa: E402
from userllm_arms import (ABLATIONS, amazon_arms, ensure_arm, ensure_encoder, ml1m_arms,  # noqa: E402
                          tune_prior_weight)
from userllm_compare import ablation_comparisons, comparison_rows, comparisons  # noqa: E402
from userllm_cost import CostJob, encoder_flops, kv_bytes, measure  # noqa: E402

from training.data import load_dataset  # noqa: E402
from training.adapter_checkpoint import weights_sha256  # noqa: E402
from training.evaluate_adapter import evaluate, load_arm  # noqa: E402
from training.prompts import prompt_ids  # noqa: E402
from training.tasks import Catalogue, held_out_examples, task_split, valid_examples  # noqa: E402

ML_TASKS = ["next_movie", "genre_history", "genre_future"]
HOLDOUT = 10


def encoder_alone(encoder_dir: Path, examples, cat: Catalogue) -> dict[str, Any]:
    """The pretrained encoder's own heads: next-item Recall@K over the catalogue, and the genre
    its next-event genre head ranks first."""
    from userenc.checkpoint import load_checkpoint

    enc = load_checkpoint(encoder_dir)
    items = enc.tokenizer.vocabs[enc.tokenizer.spec.item.name]
    genres = enc.tokenizer.vocabs["genres"]
    by_title: dict[str, list[int]] = {}
    for item, title in cat.titles.items():
        by_title.setdefault(title, []).append(items.id(item))
    out: dict[str, Any] = {}
    for task in ML_TASKS:
        exs = [ex for ex in examples if ex.task == task]
        hits = []
        for i in range(0, len(exs), 64):
            chunk = exs[i:i + 64]
            if task == "next_movie":  # the seen bias on, where the encoder was trained with it
                scores = enc.next_item_scores([ex.history for ex in chunk])
                for ex, row in zip(chunk, scores):
                    target = max(row[j] for j in by_title[ex.target])
                    hits.append(int((row > target).sum()) + 1)
                continue
            ids, valid = enc.batch([ex.history for ex in chunk])
            with torch.inference_mode():
                state = enc.model.states(ids, valid, last_only=True)[:, -1]
                logits = enc.model.heads.others["genres"](state)[:, 2:]
            for ex, row in zip(chunk, logits):
                hits.append(genres.value(int(row.argmax()) + 2) == ex.target)
        ranks = np.asarray(hits, dtype=float)
        out[task] = ({f"recall@{k}": float((ranks <= k).mean()) for k in (1, 5, 10)}
                     if task == "next_movie" else {"accuracy": float(ranks.mean())})
        out[task] |= {"examples": len(exs), "users": [ex.user for ex in exs],
                      "ranks": [int(h) if task == "next_movie" else (1 if h else None)
                                for h in hits]}
    return out


def quality_rows(quality: dict, tasks: list[str]) -> list[list[Any]]:
    rows = []
    for n, arms in quality.items():
        for arm, m in arms.items():
            row: list[Any] = [n, arm, max((v.get("examples", 0) for v in m.values()
                                          if isinstance(v, dict)), default=0)]
            for t in tasks:
                if t == "next_movie":
                    row += [m.get(t, {}).get(f"recall@{k}", "-") for k in (1, 5, 10)]
                elif t == "review":
                    row += [m.get(t, {}).get("rouge1", "-"), m.get(t, {}).get("rougeL", "-")]
                else:
                    row.append(m.get(t, {}).get("accuracy", "-"))
            rows.append(row)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, cost = results["ml1m"]["quality"], results["ml1m"]["cost"]
    ns = sorted(int(n) for n in q)
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.5))
    metrics = [("next_movie", "recall@10"), ("genre_history", "accuracy"),
               ("genre_future", "accuracy")]
    for ax, (task, key) in zip(axes, metrics):
        for arm in ("userllm", "userllm-prior", "text-lora", "text-zeroshot", "none-lora",
                    "encoder"):
            ys = [q[str(n)].get(arm, {}).get(task, {}).get(key) for n in ns]
            if any(y is not None for y in ys):
                ax.plot(ns, ys, marker="o", label=arm)
        ax.set(title=f"{task} ({key})", xlabel="history events N", xscale="log")
        ax.legend(fontsize=7)
    for ax, (key, label) in zip(axes[3:], [("prefill_gflops", "prefill GFLOPs"),
                                           ("p50_ms", "time to first token p50 (ms)")]):
        measured = [n for n in ns if str(n) in cost]
        if not measured:  # a run that neither measured nor carried cost (another encoder's)
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{label}:\nnot measured in this run", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        for arm in ("userllm", "text"):
            ax.plot(measured, [cost[str(n)][arm].get(key) for n in measured], marker="o", label=arm)
        ax.set(title=label, xlabel="history events N", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate_arm(spec, model: str, folder: Path, exs, cat: Catalogue, label: str,
                 prior_weight: float = 0.0) -> dict:
    """One arm's answers to every example (its adapter from `folder`, none when zero-shot),
    with the wall seconds it took; prints the metrics."""
    t0 = time.perf_counter()
    adapter = folder / (spec.adapter_of or spec.name) if spec.adapter else None
    arm = load_arm(spec.name, model, adapter, kind=spec.kind, prior_weight=prior_weight,
                   titles=cat.titles)
    try:
        metrics = evaluate(arm, exs, cat) | {"seconds": round(time.perf_counter() - t0, 1)}
    finally:
        arm.close()
    print(f"{label} {spec.name}: " + json.dumps(
        {t: {k: v for k, v in m.items() if k not in ("predictions", "users", "ranks")
             and not k.endswith("_each")}
         for t, m in metrics.items() if isinstance(m, dict)}), flush=True)
    return metrics


def keep_training(r: dict, name: str, record: dict) -> None:
    """An arm's training record; one reused from disk keeps what its training run recorded
    (its wall seconds are not in the adapter's manifest)."""
    if not (record.get("reused") and name in r["training"]):
        r["training"][name] = record


def pick_users(split, need: int, count: int, seed: int) -> list[str]:
    """Users with at least `need` events before the held-out tail (so every N is really N),
    in a seeded random order; the same list for every arm and every N."""
    users = sorted(u for u, h in split.test.items() if len(h) - split.holdout >= need)
    random.Random(seed).shuffle(users)
    return users[:count]


def prior_examples(split, cat: Catalogue, test_users: list[str], count: int, n: int,
                   need: int, seed: int) -> list:
    """Next-movie validation cuts (the event before the held-out tail) of up to `count` users
    picked by the test users' rule (>= `need` events) but outside them, for tuning the item
    prior's weight: heavy users' histories rank differently from the average user's."""
    test = set(test_users)
    chosen = set([u for u in pick_users(split, need, len(split.test), seed + 1)
                  if u not in test][:count])
    return [ex for ex in valid_examples(split, ["next_movie"], cat, n) if ex.user in chosen]


def run_ml1m(a, results: dict, save) -> None:
    work = Path(a.work)
    ds = load_dataset(a.data, "movielens")
    hist = ds.histories
    enc_dir = work / "ml1m-encoder"
    r = results["ml1m"]
    r["encoder"] = {k: v for k, v in ensure_encoder(
        hist, "movielens", enc_dir, a.encoder_epochs, HOLDOUT, 512, a.seed, a.encoder_row).items()
        if k in ("metrics", "train_config", "epoch", "spec")} | {
        "row": a.encoder_row or "(default)", "weights_sha256": weights_sha256(enc_dir)}
    arms = ml1m_arms(a)
    for spec in arms:
        keep_training(r, spec.name, ensure_arm(spec, hist, a.model, enc_dir, work / "ml1m", a.seed))
        save()
    split = task_split(hist, HOLDOUT)
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    users = pick_users(split, max(a.ns), a.users, a.seed)
    r["users"] = {"count": len(users), "rule": f">= {max(a.ns)} events before the held-out tail",
                  "ids": users}
    for spec in arms:
        if spec.prior and spec.name not in r.get("prior_tuning", {}):
            r.setdefault("prior_tuning", {})[spec.name] = tune_prior_weight(
                work / "ml1m" / (spec.adapter_of or spec.name), a.model,
                prior_examples(split, cat, users, a.prior_users, min(a.ns), max(a.ns),
                               a.seed), cat)
            save()
    for n in a.ns:
        exs = held_out_examples(split, ML_TASKS, cat, n, users)
        q = r["quality"].setdefault(str(n), {})
        q["encoder"] = encoder_alone(enc_dir, exs, cat)
        for spec in arms:
            if spec.name in q or (spec.ablation and n != min(a.ns)) or (
                    a.skip_arm and f"{spec.name}@{n}" in a.skip_arm):
                continue
            arm_exs = exs
            if count := a.arm_users.get(f"{spec.name}@{n}"):  # text: seconds to minutes a user
                first = set(users[:count])
                arm_exs = [ex for ex in exs if ex.user in first]
            weight = r["prior_tuning"][spec.name]["weight"] if spec.prior else 0.0
            q[spec.name] = evaluate_arm(spec, a.model, work / "ml1m", arm_exs, cat, f"N={n}",
                                        weight) | ({"prior_weight": weight} if spec.prior else {})
            save()
    if not a.skip_cost:
        measure_cost(a, r, split, cat, users, save)


def measure_cost(a, r: dict, split, cat: Catalogue, users: list[str], save) -> None:
    """The next_movie question for the first users, each arm in its own process."""
    from llm.config import ModelConfig
    from llm.flops import check_with_counter, prefill_flops
    from training.adapter_checkpoint import load_adapter_encoder
    from transformers import AutoConfig

    from llm.loader import resolve

    folder, gguf = resolve(a.model)
    hf = AutoConfig.from_pretrained(folder, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(folder)
    work = Path(a.work)
    main_arm = work / "ml1m" / a.main_arm
    # The text arm's LoRA is merged into the weights, so its cost is the base model's; the
    # base model stands in when this run trained no text adapter.
    text_arm = work / "ml1m" / "text-lora"
    text_adapter = str(text_arm) if (text_arm / "adapter.json").is_file() else None
    meta = json.loads((main_arm / "adapter.json").read_text())["llm"]
    cross = ModelConfig.from_hf(hf, cross_every_n=meta["cross_every_n"], user_dim=meta["user_dim"])
    plain = ModelConfig.from_hf(hf)
    encoder = load_adapter_encoder(main_arm)
    from transformers import AutoTokenizer

    tok = (AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf
           else AutoTokenizer.from_pretrained(folder))
    budget = plain.max_position_embeddings - 40
    for n in a.ns:
        if str(n) in r["cost"]:
            continue
        exs = [ex for ex in held_out_examples(split, ["next_movie"], cat, n, users)][:a.latency_requests]
        text_prompts = [prompt_ids(tok, ex, "text", budget).ids for ex in exs]
        user_prompts = [prompt_ids(tok, ex, "userllm", budget).ids for ex in exs]
        k = encoder.model.cfg.num_user_tokens + encoder.model.cfg.item_hints
        t_len = float(np.mean([len(p) for p in text_prompts]))
        u_len = float(np.mean([len(p) for p in user_prompts]))
        enc_fl = float(np.mean([encoder_flops(encoder, ex.history) for ex in exs]))
        text_fl = float(np.mean([prefill_flops(plain, len(p)).total for p in text_prompts]))
        user_fl = float(np.mean([prefill_flops(cross, len(p), k).total for p in user_prompts]))
        row = {"text": {"prompt_tokens": t_len, "prefill_gflops": text_fl / 1e9,
                        "kv_mib": kv_bytes(plain, int(t_len)) / 2**20},
               "userllm": {"prompt_tokens": u_len, "user_tokens": k,
                           "prefill_gflops": (user_fl + enc_fl) / 1e9,
                           "encoder_gflops": enc_fl / 1e9,
                           "kv_mib": kv_bytes(plain, int(u_len)) / 2**20},
               "counter_check": {"text": check_with_counter(plain, int(t_len)),
                                 "userllm": check_with_counter(cross, int(u_len), k)}}
        text_cost, user_cost = measure([
            CostJob(a.model, text_adapter, "text", text_prompts, [],
                    a.threads),
            CostJob(a.model, str(main_arm), "userllm", user_prompts, [ex.history for ex in exs],
                    a.threads)])
        row["text"] |= text_cost
        row["userllm"] |= user_cost
        row["ratio"] = {"prefill_flops": text_fl / (user_fl + enc_fl),
                        "p50_latency": row["text"]["p50_ms"] / row["userllm"]["p50_ms"],
                        "prompt_tokens": t_len / u_len}
        r["cost"][str(n)] = row
        print(f"N={n} cost: " + json.dumps(row["ratio"]), flush=True)
        save()


def run_amazon(a, results: dict, save) -> None:
    work = Path(a.work)
    ds = load_dataset(a.amazon, "amazon")
    hist = ds.histories
    enc_dir = work / "amazon-encoder"
    r = results["amazon"]
    r["encoder"] = {k: v for k, v in ensure_encoder(
        hist, "amazon", enc_dir, a.amazon_encoder_epochs, 1, 64, a.seed).items()
        if k in ("metrics", "train_config", "epoch")}
    split = task_split(hist, 1)
    cat = Catalogue.from_histories(hist.values(), ranked_by=split.train.values())
    users = pick_users(split, 4, a.amazon_users, a.seed)
    exs = held_out_examples(split, ["review"], cat, 64, users)
    r["users"] = len(users)
    for spec in amazon_arms(a):
        keep_training(r, spec.name, ensure_arm(spec, hist, a.model, enc_dir, work / "amazon", a.seed))
        if spec.name in r["quality"]:
            continue
        r["quality"][spec.name] = evaluate_arm(spec, a.model, work / "amazon", exs, cat, "amazon")
        save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "data" / "ml-1m"))
    ap.add_argument("--amazon", default=str(SHARED / "data" / "amazon-musical-instruments-5core" / "Musical_Instruments_5.json"))
    ap.add_argument("--model", default=str(SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / ".work" / "userllm"))
    ap.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[50, 200, 500])
    ap.add_argument("--users", type=int, default=24, help="ML-1M users evaluated (every arm, every N)")
    ap.add_argument("--amazon-users", type=int, default=200)
    ap.add_argument("--latency-requests", type=int, default=6)
    ap.add_argument("--encoder-epochs", type=int, default=8)
    ap.add_argument("--encoder-row", default="",
                    help="train the ML-1M encoder as this row of encoder_quality.py (spec, "
                         "objectives, bf16), for --encoder-epochs; default: the multi-feature encoder")
    ap.add_argument("--adapter-minutes", type=float, default=40)
    ap.add_argument("--text-minutes", type=float, default=40)
    ap.add_argument("--none-minutes", type=float, default=15)
    ap.add_argument("--amazon-minutes", type=float, default=15)
    ap.add_argument("--amazon-encoder-epochs", type=int, default=15)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--ablation-minutes", type=float, default=12)
    ap.add_argument("--skip-amazon", action="store_true")
    ap.add_argument("--skip-arm", action="append", default=[],
                    help="ARM@N: leave that arm's quality at that N out (time on CPU)")
    ap.add_argument("--arm-users", type=lambda s: {k: int(v) for k, v in
                                                   (x.split("=") for x in s.split(",") if x)},
                    default={}, help="ARM@N=COUNT,...: that arm at N answers the first COUNT "
                    "users only (paired comparisons use the users both arms answered)")
    ap.add_argument("--arms", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="ML-1M arms to train and evaluate (default: every main arm, and every "
                         "ablation with --ablations)")
    ap.add_argument("--main-arm", default="userllm",
                    help="the USER-LLM arm the others are compared with and the cost measures")
    ap.add_argument("--carry-over", default=None,
                    help="an earlier userllm_vs_text.json on the same users: its ML-1M arms this "
                         "run does not run, and its cost rows when --skip-cost, are copied in "
                         "(marked carried over)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-ml1m", action="store_true",
                    help="run Amazon only; the ML-1M part is --carry-over's, whole")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prior-users", type=int, default=100,
                    help="validation users (the test users' rule, outside them) the item prior's weight is tuned on")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.skip_ml1m and not a.carry_over:
        ap.error("--skip-ml1m takes the ML-1M part from --carry-over: give it")
    torch.set_num_threads(a.threads)
    out = Path(a.work) / "partial.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for part in ("ml1m", "amazon"):
        results.setdefault(part, {}).setdefault("training", {})
        results[part].setdefault("quality", {})
    results["ml1m"].setdefault("cost", {})

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, default=str))

    earlier_all = json.loads(Path(a.carry_over).read_text())["results"] if a.carry_over else {}
    earlier = earlier_all.get("ml1m")
    if a.skip_ml1m:
        results["ml1m"] = {k: v for k, v in earlier.items() if k not in ("quality", "cost")} | {
            "quality": {}, "cost": {}}
    else:
        run_ml1m(a, results, save)
    if earlier is not None:
        carry_over(results["ml1m"], earlier, a.carry_over, a.skip_cost or a.skip_ml1m,
                   None if a.skip_ml1m else results["ml1m"]["encoder"]["weights_sha256"])
        save()
    if not a.skip_amazon:
        run_amazon(a, results, save)
    elif earlier_all.get("amazon", {}).get("quality"):
        # Amazon not run: its part of --carry-over stays, whole, marked with where it came from.
        results["amazon"] = earlier_all["amazon"] | {
            "carried_over": earlier_all["amazon"].get("carried_over",
                                                      f"carried over from {a.carry_over}")}
    config = {k: v for k, v in vars(a).items()}
    write_results("userllm_vs_text", config, results, tables(results, a.main_arm))
    plot(results, Path(__file__).resolve().parent / "results" / "userllm_vs_text.png")
    return 0


def encoder_of(training: dict, arm: str) -> str | None:
    """The weights hash of the encoder an arm's adapter was trained on (an arm decoding
    another's adapter: that one's); None for an arm without user tokens."""
    record = training.get(arm, {})
    record = training.get(record.get("decodes"), record) if record.get("decodes") else record
    return (record.get("encoder") or {}).get("weights_sha256")  # text / none arms: null


def carry_over(r: dict, old: dict, path: str, cost: bool, encoder: str | None = None) -> None:
    """Arms (and cost rows) of an earlier run's ML-1M part `old` (read from `path`) on the same
    users (or the first of this run's, see users_note) that this run did not make, each marked
    with where it came from; refused for other users. `encoder`: this run's encoder weights
    hash; arms (and cost rows) that read another encoder's user tokens are left out, since they
    measured a different encoder."""
    on_users = users_note(old, r, path)
    note = f"carried over from {path}{on_users}"
    training = old.get("training", {})
    # The encoder that run measured (older results name it only in their arms' records).
    theirs = {old.get("encoder", {}).get("weights_sha256")} | {encoder_of(training, arm) for arm in training}
    same = encoder is None or theirs - {None} <= {encoder}
    there = {arm for arms in old["quality"].values() for arm in arms}
    # The encoder's own row only from the same encoder; an arm when it read no user tokens or
    # this run's encoder's.
    kept = {arm for arm in there if (same if arm == "encoder" else
                                     encoder is None or encoder_of(training, arm) in (None, encoder))}
    dropped = there - kept - {"encoder"}
    if dropped:
        print(f"--carry-over: left out {', '.join(sorted(dropped))} (trained on another encoder)",
              flush=True)
    for n, arms in old["quality"].items():
        mine = r["quality"].setdefault(n, {})
        for arm, m in arms.items():
            if arm not in mine and arm in kept:
                # An arm the earlier run carried keeps its origin, plus what this run adds.
                told = m["carried_over"] + (f", then from {path}{on_users}" if on_users else "") \
                    if "carried_over" in m else note
                tokenless = "; this run's encoder is another, and this arm reads no user tokens"
                if not same and encoder_of(training, arm) is None and tokenless not in told:
                    told += tokenless  # its older note may say "same encoder"
                mine[arm] = m | {"carried_over": told}
    for arm, record in training.items():
        if arm in kept:
            r["training"].setdefault(arm, record)
    for arm, tuning in old.get("prior_tuning", {}).items():  # a carried prior arm's weight sweep
        if arm in kept:
            r.setdefault("prior_tuning", {}).setdefault(arm, tuning)
    if cost and same:
        for n, row in old.get("cost", {}).items():
            r["cost"].setdefault(n, row | {"carried_over": row.get("carried_over", note)})


def users_note(old: dict, r: dict, path: str) -> str:
    """How the earlier run's users relate to this run's: the same ones (""), or the first of
    this run's (a run with more users by the same rule and seed picks a longer list with the
    same start); anything else is refused, since paired comparisons need the same users."""
    theirs, mine = old.get("users", {}), r.get("users", {})

    def count(users: dict) -> dict:  # count and rule: older results lack the ids
        return {k: v for k, v in users.items() if k != "ids"}

    if count(theirs) == count(mine) and theirs.get("ids", mine.get("ids")) == mine.get("ids"):
        return ""
    answered = {u for arms in old.get("quality", {}).values() for m in arms.values()
                for task in m.values() if isinstance(task, dict) for u in task.get("users", [])}
    first = mine.get("ids", [])[:theirs.get("count", 0)]
    if (theirs.get("rule") == mine.get("rule") and theirs.get("count", 0) < len(mine.get("ids", []))
            and set(theirs.get("ids", first)) == set(first) and answered <= set(first)):
        return f" (its {theirs['count']} users are the first of this run's {mine['count']})"
    raise SystemExit(f"--carry-over: {path} evaluated other users ({count(theirs)})")


def main_arms(quality: dict) -> dict:
    """The quality table without the ablations (they have their own, against userllm-ref)."""
    return {n: {arm: m for arm, m in arms.items() if arm not in ABLATIONS}
            for n, arms in quality.items()}


def ablation_tables(results: dict) -> list[str]:
    """What each ablation changed, how it trained, and its paired difference from userllm-ref."""
    ml = results["ml1m"]
    names = [n for n in ABLATIONS if n in ml.get("training", {})]
    if not names:
        return []
    rows = []
    for name in names:
        t = ml["training"][name]
        loss = t.get("metrics", {}).get("valid_loss", {})
        change = ", ".join(f"{k}={v}" for k, v in ABLATIONS[name].items()) or "(reference)"
        rows.append([name, change, t.get("steps", t.get("step", 0)),
                     f"{(t.get('wall_seconds') or 0) / 60:.1f}",
                     f"{t['parameters']['trained']:,}"]
                    + [round(loss[k], 3) if k in loss else "-" for k in ("all", *ML_TASKS)])
    minutes = ml["training"][names[0]].get("train_config", {}).get("max_minutes", 0)
    md = [f"\nAblations of the USER-LLM arm ({minutes:g}-minute budget each, evaluated at the "
          "smallest N): userllm-ref has the main arm's settings (enc, cross-attention every 6 "
          "layers, K=4) under that budget; each other changes one setting.\n\n"
          + markdown_table(["arm", "change", "steps", "wall min", "trained parameters",
                            "valid loss", "loss next movie", "loss genre (a)", "loss genre (b)"], rows)]
    paired_rows = ablation_comparisons(ml["quality"], ML_TASKS, "userllm-ref", names)
    if paired_rows:
        md.append("\nEach ablation minus userllm-ref, paired over users (95% bootstrap):\n\n"
                  + markdown_table(["N", "task", "metric", "ablation", "users", "ablation",
                                    "userllm-ref", "diff", "95% CI", "verdict"],
                                   comparison_rows(paired_rows)))
    return md


def training_rows(results: dict) -> list[list[Any]]:
    rows = []
    for part in ("ml1m", "amazon"):
        for arm, t in results.get(part, {}).get("training", {}).items():
            strategy = (f"({t['decodes']}'s adapter)" if "decodes" in t
                        else t.get("adapter_config", {}).get("strategy", "zeroshot"))
            rows.append([part, arm, strategy,
                         t.get("steps", 0), f"{(t.get('wall_seconds') or 0) / 60:.1f}",
                         f"{t.get('train_config', {}).get('max_minutes', 0):g}",
                         f"{t['parameters']['trained']:,}"])
    return rows


def prior_notes(ml: dict) -> list[str]:
    """How each item-prior arm's weight was chosen, with the validation sweep."""
    out = []
    for arm, t in ml.get("prior_tuning", {}).items():
        sweep = ", ".join(f"w={w}: {m['recall@10']:.3f}" for w, m in t["sweep"].items())
        out.append(f"\n{arm}: the userllm adapter; next movie's beam search adds w x the "
                   "encoder head's log-prob of each title (training/item_prior.py; genres "
                   f"unchanged). w = {t['weight']:g}, the best next-movie Recall@10 on "
                   f"{t['examples']} validation cuts of users picked by the test users' rule, outside "
                   f"them ({sweep}).")
    return out


def tables(results: dict, main: str = "userllm") -> str:
    ml = results["ml1m"]
    md = ["# USER-LLM vs text prompts (SmolLM2-135M-Instruct, CPU)\n",
          f"ML-1M, {ml.get('users', {}).get('count', '?')} users with "
          f"{ml.get('users', {}).get('rule', '?')}, the same for every N; an arm run on fewer "
          "(the users column) answered the first of them. Trie-constrained beam search (beam 10) "
          "for every arm.\n"]
    head = ["N", "arm", "users", "next R@1", "next R@5", "next R@10", "genre (a) acc", "genre (b) acc"]
    md.append(markdown_table(head, quality_rows(ml["quality"], ML_TASKS)))
    md += prior_notes(ml)
    md.append(f"\n{main} minus each arm, paired over the users both answered (95% bootstrap "
              "interval over users):\n\n" + markdown_table(
                  ["N", "task", "metric", "vs", "users", "userllm", "other", "diff", "95% CI",
                   "verdict"], comparison_rows(comparisons(main_arms(ml["quality"]), ML_TASKS,
                                                           main))))
    md += ablation_tables(results)
    carried = sorted({f"{arm}: {m['carried_over']}" for arms in ml["quality"].values()
                      for arm, m in arms.items() if "carried_over" in m})
    md += [f"\nQuality carried over (not run again), {c}." for c in carried]
    rows = []
    for n, c in ml["cost"].items():
        for arm in ("text", "userllm"):
            x = c[arm]
            rows.append([n, arm, round(x["prompt_tokens"]), round(x["prefill_gflops"], 2),
                         round(x["p50_ms"], 1), round(x["p99_ms"], 1),
                         round(x["peak_rss_over_loaded_mib"], 1), round(x["kv_mib"], 1)])
        rows.append([n, "text / userllm", round(c["ratio"]["prompt_tokens"], 1),
                     round(c["ratio"]["prefill_flops"], 1), round(c["ratio"]["p50_latency"], 1),
                     "", "", ""])
    md.append("\n" + markdown_table(["N", "arm", "prompt tokens", "prefill GFLOPs", "TTFT p50 ms",
                                     "TTFT p99 ms", "peak MiB over loaded", "KV MiB"], rows))
    carried = sorted({c["carried_over"] for c in ml["cost"].values() if "carried_over" in c})
    md += [f"\nCost rows carried over: {note}." for note in carried]
    md.append("\nHow the arms were trained, as their training runs recorded (an arm carried over without its record is not listed):\n\n"
              + markdown_table(["data", "arm", "strategy", "steps", "wall min", "budget min",
                                "trained parameters"], training_rows(results)))
    amazon = results.get("amazon", {}).get("quality", {})
    if amazon:
        users = results["amazon"].get("users", "?")
        md.append(f"\nAmazon musical instruments, review titles of {users} users' held-out last "
                  "reviews (ROUGE F1, rouge-score, stemmed; greedy decoding, 24 tokens):\n\n"
                  + markdown_table(["arm", "ROUGE-1", "ROUGE-L"],
                                   [[arm, round(m["review"]["rouge1"], 4),
                                     round(m["review"]["rougeL"], 4)]
                                    for arm, m in amazon.items()]))
        if "carried_over" in results["amazon"]:
            md.append(f"\nThe Amazon part is {results['amazon']['carried_over']} (not run again).")
        rows = comparisons({"amazon": amazon}, ["review"], "userllm")
        if rows:
            md.append("\nuserllm minus each arm on Amazon, paired over users (95% bootstrap):\n\n"
                      + markdown_table(["", "task", "metric", "vs", "users", "userllm", "other",
                                        "diff", "95% CI", "verdict"], comparison_rows(rows)))
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
