"""`make demo`: the whole path once, on sample data or MovieLens-1M.

    generate (or read) events -> userllm ingest (encrypted store) -> userllm train-encoder
    --from-store -> userllm eval-encoder -> userllm embed --to-store -> similar users ->
    the engine answers one user's request, with that user's tokens attached.

Everything lives under .demo/ (USERLLM_HOME=.demo/home), so re-running is safe: ingest is
idempotent and training overwrites its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run_cli(*argv: str) -> None:
    from api.cli import main

    print("$ userllm " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"demo: `userllm {argv[0]}` failed with status {code}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DATA") or "", help="a MovieLens-1M folder; empty: generated sample data")
    ap.add_argument("--work", default=str(ROOT / ".demo"))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget on MovieLens")
    args = ap.parse_args()
    work = Path(args.work)
    os.environ["USERLLM_HOME"] = str(work / "home")
    threads = str(os.cpu_count() or 1)

    import torch

    from training.data import write_sample_data

    if args.data:
        data, fmt, spec = str(Path(args.data).resolve()), "movielens", "movielens"
        train_args = ["--max-minutes", str(args.minutes), "--fit-schedule"]
    else:
        step("generating sample events (300 users, planted sequential structure)")
        data, fmt, spec = str(write_sample_data(work / "sample" / "events.jsonl")), "jsonl", "movielens"
        train_args = ["--epochs", "15", "--batch-size", "16", "--lr", "5e-3", "--dropout", "0.1"]
    run_dir = str(work / "home" / "runs" / "encoder")

    step("ingest into the encrypted store")
    t0 = time.perf_counter()
    run_cli("ingest", "--data", data, "--format", fmt)
    print(f"({time.perf_counter() - t0:.1f}s)")

    step("train the user encoder on the store's histories")
    run_cli("train-encoder", "--from-store", "--spec", spec, "--out", run_dir, "--user-tokens", "4", "--threads", threads, *train_args)

    step("evaluate: full-corpus ranking, against the popularity baseline")
    run_cli("eval-encoder", "--from-store", "--checkpoint", run_dir, "--baseline", "--threads", threads)

    step("embed every user into the store (sealed) and the FAISS index")
    run_cli("embed", "--from-store", "--checkpoint", run_dir, "--to-store", "--threads", threads)

    from store import Store
    from userenc.checkpoint import load_checkpoint

    store = Store.open()
    try:
        titles: dict[str, str] = {}  # item id -> title, from every history (decrypted in memory only)
        user, history = None, []
        for ext, events in store.histories():
            if user is None:
                user, history = ext, events
            titles.update((e.item_id, e.fields["title"]) for e in events if "title" in e.fields)
        assert user is not None
        similar = store.similar_users(user, k=3)
    finally:
        store.close()
    step(f"user {user}: {len(history)} events; most similar users: " + ", ".join(f"{u} ({s:.2f})" for u, s in similar))

    encoder = load_checkpoint(run_dir)
    ids, valid = encoder.batch([history])
    with torch.inference_mode():
        user_tokens, _ = encoder.model.encode(ids, valid)  # [1, K, D]
        scores = encoder.model.heads.item_scores(encoder.model.states(ids, valid, last_only=True)[:, -1])[0]
    item_vocab = encoder.tokenizer.vocabs[encoder.tokenizer.spec.item.name]
    seen = {e.item_id for e in history}
    ranked = [item_vocab.value(int(i)) for i in scores.argsort(descending=True)[:50]]
    picks = [i for i in ranked if i and i not in seen][:5]
    recent = [titles.get(e.item_id, f"item {e.item_id}") for e in history[-5:]]
    print("recent:", "; ".join(recent))
    print("encoder's top next items (not yet seen):", "; ".join(titles.get(i, f"item {i}") for i in picks))

    step("personalized answer from the engine (SmolLM2-135M-Instruct, user tokens attached)")
    if not Path(args.model).is_file():
        print(f"no model at {args.model}: skipping generation (see README for where the model comes from)")
        return 0
    from llm.engine.engine import Engine
    from llm.engine.sampling_params import SamplingParams

    engine = Engine.from_pretrained(args.model, cross_every_n=6, user_dim=user_tokens.shape[-1], kv_cache_bytes=64 << 20)
    messages = [
        {"role": "system", "content": "You are a concise assistant for a movie service."},
        {"role": "user", "content": f"I recently watched: {'; '.join(recent)}. In two sentences, what kind of films do I seem to enjoy?"},
    ]
    print(f"request: {messages[-1]['content']}\nanswer: ", end="", flush=True)
    for out in engine.stream(messages, SamplingParams(temperature=0.0, max_tokens=64), user_tokens=user_tokens[0]):
        print(out.new_text, end="", flush=True)
    print("\n(The cross-attention adapter is untrained here: its gates are 0, so the user tokens pass through the"
          " engine without changing the text yet; `userllm train-adapter` is a later issue.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
