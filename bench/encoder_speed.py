"""Encoder inference throughput for 200-event histories (users/s), CPU and GPU when present.

Side by side in one run: one user at a time (the baseline a naive service would do) against
batched encoding at several batch sizes; model-only (tensors already tokenized) and end to end
(Event lists -> tokenizer -> encoder). Writes bench/results/encoder_speed.json / .md.

    python bench/encoder_speed.py [--events 200] [--users 2048] [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_results  # noqa: E402
from userenc.checkpoint import LoadedEncoder  # noqa: E402
from userenc.config import EncoderConfig  # noqa: E402
from userenc.events import Event  # noqa: E402
from userenc.model import UserEncoder  # noqa: E402
from userenc.spec import load_spec  # noqa: E402
from userenc.tokenize import EventTokenizer  # noqa: E402

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War"]


def synthetic_histories(users: int, events: int, items: int, seed: int = 0) -> list[list[Event]]:
    rng = random.Random(seed)
    out = []
    for u in range(users):
        ts = 978_300_000 + rng.randrange(10**6)
        h = []
        for t in range(events):
            ts += rng.choice([0, 30, 600, 86_400])
            item = rng.randrange(items)
            h.append(Event(f"{u}:{t}", str(u), str(item), ts, {"rating": rng.randint(1, 5), "genres": rng.sample(GENRES, 2)}))
        out.append(h)
    return out


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--users", type=int, default=2048)
    ap.add_argument("--items", type=int, default=3700, help="catalogue size (ML-1M has ~3,700 movies)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-sizes", default="1,32,64,256,1024")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--name", default="encoder_speed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec("movielens")
    histories = synthetic_histories(args.users, args.events, args.items)
    tokenizer = EventTokenizer.fit(spec, histories)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, results = [], []
    for k in (0, 16):
        cfg = EncoderConfig(max_len=args.events, num_user_tokens=k, vocab_sizes={f.name: tokenizer.vocab_size(f) for f in spec.features})
        for device in devices:
            model = UserEncoder(spec, cfg, tokenizer.item_attributes).to(device).eval()
            enc = LoadedEncoder(model, tokenizer, {}, Path("."))
            baseline_users = min(64, args.users)
            one = timed(lambda: [model.user_embedding(*enc.batch([h], device)) for h in histories[:baseline_users]], 1)
            base_rate = baseline_users / one
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                bs = min(bs, args.users)
                ids, valid = enc.batch(histories[:bs], device)
                n_batches = max(1, min(args.users // bs, 4))

                def model_only(dtype: torch.dtype = torch.float32) -> None:
                    # bf16 autocast: the CPU's bf16 dot products (avx512_bf16 here), fp32 elsewhere.
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        for _ in range(n_batches):
                            model.user_embedding(ids, valid)
                    if device == "cuda":
                        torch.cuda.synchronize()

                def end_to_end() -> None:
                    enc.embed(histories[: bs * n_batches], batch_size=bs)

                model_rate = bs * n_batches / timed(model_only, args.repeat)
                bf16_rate = bs * n_batches / timed(lambda: model_only(torch.bfloat16), args.repeat)
                e2e_rate = bs * n_batches / timed(end_to_end, 1)
                row = {"device": device, "user_tokens": k, "batch_size": bs, "threads": torch.get_num_threads(), "model_users_per_s": model_rate, "model_bf16_users_per_s": bf16_rate, "end_to_end_users_per_s": e2e_rate, "one_at_a_time_users_per_s": base_rate, "speedup_vs_one_at_a_time": e2e_rate / base_rate}
                results.append(row)
                rows.append([device, k or "last state", bs, row["threads"], f"{model_rate:,.0f}", f"{bf16_rate:,.0f}", f"{e2e_rate:,.0f}", f"{base_rate:,.0f}", f"{row['speedup_vs_one_at_a_time']:.1f}x"])
                print(rows[-1], flush=True)
    md = f"# Encoder throughput, {args.events}-event histories\n\n" + markdown_table(
        ["device", "K user tokens", "batch", "threads", "model-only users/s (fp32)", "model-only users/s (bf16 autocast)", "end-to-end users/s (fp32)", "one-at-a-time users/s", "e2e speed-up"], rows
    )
    write_results(args.name, vars(args) | {"encoder": EncoderConfig().to_dict() | {"vocab_sizes": "ML-1M-sized"}}, results, md)
    print(md)


if __name__ == "__main__":
    main()
