"""Subcommands: train-encoder, eval-encoder, embed (parsing and printing; the work is in training/)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.config import TrainConfig, encoder_config_from, env_threads, train_config_from
from training.sources import Source, open_source
from userenc.config import FUSIONS, ITEM_LOSSES, NEGATIVES, POSITIONS, EncoderConfig

# torch and the model code load inside the commands: `userllm admin ...` should not pay for them.


def add_source_args(p: argparse.ArgumentParser, spec: bool = False) -> None:
    from userenc.readers import FORMATS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset file or folder (MovieLens: the ml-1m folder)")
    src.add_argument("--from-store", action="store_true", help="read users' histories from the encrypted store (USERLLM_HOME)")
    p.add_argument("--format", default="movielens", choices=FORMATS, help="format of --data")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed lines instead of stopping")
    if spec:
        p.add_argument("--spec", default=None, help="feature spec: a TOML file or a built-in name (default per format)")


def source_from_args(args: argparse.Namespace, spec_name: str | None = None) -> Source:
    return open_source(None if args.from_store else args.data, args.format, spec_name,
                       args.skip_bad, from_store=args.from_store)


def data_source_name(args: argparse.Namespace) -> str:
    return "store" if args.from_store else str(Path(args.data).resolve())


def _data_args(p: argparse.ArgumentParser, spec: bool = False) -> None:
    add_source_args(p, spec)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    d_enc, d_train = EncoderConfig(), TrainConfig()
    p = sub.add_parser("train-encoder", help="pretrain the user encoder on next-event prediction")
    _data_args(p, spec=True)
    p.add_argument("--out", required=True, help="checkpoint folder to write (e.g. runs/ml1m)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.last")
    p.add_argument("--seed", type=int, default=d_train.seed)
    p.add_argument("--epochs", type=_positive(int), default=d_train.epochs)
    p.add_argument("--batch-size", dest="batch_size", type=_positive(int), default=d_train.batch_size)
    p.add_argument("--lr", type=_positive(float), default=d_train.lr)
    p.add_argument("--patience", type=_positive(int), default=d_train.patience)
    p.add_argument("--max-minutes", dest="max_minutes", type=float, default=d_train.max_minutes, help="stop after the epoch that crosses this budget")
    p.add_argument("--fit-schedule", dest="fit_schedule_to_budget", action="store_true", help="with --max-minutes: anneal the learning rate over the epochs that fit the budget (timing-dependent)")
    p.add_argument("--d-model", dest="d_model", type=_positive(int), default=d_enc.d_model)
    p.add_argument("--layers", dest="n_layers", type=_positive(int), default=d_enc.n_layers)
    p.add_argument("--heads", dest="n_heads", type=_positive(int), default=d_enc.n_heads)
    p.add_argument("--max-len", dest="max_len", type=_positive(int), default=d_enc.max_len)
    p.add_argument("--dropout", type=float, default=d_enc.dropout)
    p.add_argument("--feature-dropout", dest="feature_dropout", type=float, default=d_enc.feature_dropout, help="early fusion: drop each feature of an event whole with this probability in training")
    p.add_argument("--fusion", choices=FUSIONS, default=d_enc.fusion)
    p.add_argument("--positions", choices=POSITIONS, default=d_enc.positions)
    p.add_argument("--time-bias-buckets", dest="time_bias_buckets", type=int, default=d_enc.time_bias_buckets, help="HSTU-style relative time: a learned attention bias per log2 bucket of the seconds between events (0 = off; early fusion)")
    p.add_argument("--item-loss", dest="item_loss", choices=ITEM_LOSSES, default=d_enc.item_loss)
    p.add_argument("--negatives", choices=NEGATIVES, default=d_enc.negatives)
    p.add_argument("--num-negatives", dest="num_negatives", type=_positive(int), default=d_enc.num_negatives)
    p.add_argument("--seen-bias", dest="seen_bias", action="store_true", help="learn a score for items already in the history (full-softmax item loss)")
    p.add_argument("--out-dim", dest="out_dim", type=_positive(int), default=d_enc.out_dim, help="user-token width (the LLM's cross-attention input)")
    p.add_argument("--user-tokens", dest="num_user_tokens", type=int, default=d_enc.num_user_tokens, help="K: Perceiver resampler output tokens (0 = off)")
    p.add_argument("--next-event-weight", dest="next_event_weight", type=float, default=d_enc.next_event_weight, help="weight of the next-event objective (the default)")
    p.add_argument("--all-action-weight", dest="all_action_weight", type=float, default=d_enc.all_action_weight, help="weight of the dense all-action objective (every item of the next --future-window events)")
    p.add_argument("--future-genre-weight", dest="future_genre_weight", type=float, default=d_enc.future_genre_weight, help="weight of the future genre-distribution objective")
    p.add_argument("--future-window", dest="future_window", type=_positive(int), default=d_enc.future_window, help="W: events ahead the future objectives predict")
    p.add_argument("--crop-prob", dest="crop_prob", type=float, default=d_train.crop_prob, help="crop augmentation: each epoch, this share of the training windows starts at a random later event (0-1)")
    p.add_argument("--bf16", action="store_true", help="forward pass under bf16 autocast (faster with bf16 hardware: GPUs, CPUs with AVX512-BF16/AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (faster steps after a compile of tens of seconds; needs a C++ compiler on CPU)")
    p.add_argument("--holdout", type=_positive(int), default=d_train.holdout, help="events of each user's tail never trained on (1 = leave-one-out; USER-LLM's future-genre task needs 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-encoder", help="full-corpus ranking metrics on validation and test")
    _data_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("valid", "test", "both"), default="both")
    p.add_argument("--exclude-seen", action="store_true", help="headline numbers exclude items the user already has (both are always in --json)")
    p.add_argument("--baseline", action="store_true", help="also evaluate the popularity baseline")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("embed", help="user embeddings from a checkpoint, written to a file")
    _data_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="output .npz (user_ids, embeddings)")
    p.add_argument("--to-store", action="store_true", help="seal the embeddings into the store and index them for similar-user search")
    p.add_argument("--batch-size", dest="batch_size", type=_positive(int), default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoder's matrix products (faster; embeddings within ~1e-3 cosine)")
    p.set_defaults(func=cmd_embed)


def _threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None and args.threads <= 0:
        raise ValueError("--threads must be > 0")
    torch.set_num_threads(args.threads or env_threads())


def cmd_train(args: argparse.Namespace) -> int:
    from training import distributed as dist
    from training.train_encoder import train_encoder

    _threads(args)
    cfg, tcfg = encoder_config_from(args), train_config_from(args)
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError("--dropout must be in [0, 1)")
    dist.init()
    source = None
    try:
        source = source_from_args(args, args.spec)
        for note in source.notes:
            print(note, file=sys.stderr)
        erasure, files = source.erasure_manifest()
        ds = source.dataset
        result = train_encoder(
            ds.histories, ds.spec, cfg, tcfg, args.out, resume=args.resume,
            manifest_extra={"data_source": data_source_name(args)} | erasure, progress=not args.quiet, files=files,
        )
    finally:
        if source is not None:
            source.close()
        dist.shutdown()
    if dist.rank() == 0:
        best = result.best_valid
        print(f"best epoch {result.best_epoch}: valid HR@10 {best.get('hr@10', 0):.4f} NDCG@10 {best.get('ndcg@10', 0):.4f}; {result.train_seconds:.0f}s; checkpoint {result.checkpoint}")
    return 0


def _format_row(name: str, m: dict) -> str:
    return f"{name:<22} " + " ".join(f"{k}={m[k]:.4f}" for k in ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "mrr")) + f" users={m['users']}"


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import cold_start_report, evaluate, model_scorer, popularity_scorer
    from training.split import encoder_holdout, leave_one_out
    from userenc.checkpoint import load_checkpoint

    _threads(args)
    loaded = load_checkpoint(args.checkpoint)
    source = source_from_args(args)
    source.close()
    split = leave_one_out(source.dataset.histories, encoder_holdout(loaded.manifest))
    scorers = {"encoder": model_scorer(loaded.model, loaded.tokenizer)}
    if args.baseline:
        scorers["popularity"] = popularity_scorer(loaded.tokenizer, split.train)
    report: dict = {}
    key = "exclude_seen" if args.exclude_seen else "all"
    for part in ("valid", "test") if args.split == "both" else (args.split,):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            res = evaluate(scorer, loaded.tokenizer, getattr(split, part))
            res["seconds"] = time.perf_counter() - t0
            report[f"{part}/{name}"] = res
            print(_format_row(f"{part} {name}{' (excl. seen)' if args.exclude_seen else ''}", res[key]))
        if part == "test":
            # Cold start: the same test events asked with only the last 1-5 / 6-20 input events.
            cold = cold_start_report(scorers, loaded.tokenizer, split.test)
            report["test/cold_start"] = cold
            for bucket, rows in cold.items():
                print(f"test cold start, last {bucket} events: " + "  ".join(
                    f"{name} HR@10={r['hr@10']:.4f}" for name, r in rows.items()) + f" users={next(iter(rows.values()))['users']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from training.embedding import embed_users, store_embeddings
    from userenc.checkpoint import load_checkpoint

    _threads(args)
    if not args.out and not args.to_store:
        raise ValueError("say where embeddings go: --out FILE.npz and/or --to-store")
    loaded = load_checkpoint(args.checkpoint)
    source = source_from_args(args)
    try:
        t0 = time.perf_counter()
        users, vectors = embed_users(loaded, source.dataset.histories, args.batch_size, args.bf16)
        seconds = time.perf_counter() - t0
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp.npz")
            np.savez(tmp, user_ids=np.asarray(users), embeddings=vectors)
            tmp.chmod(0o600)  # it names users
            tmp.replace(out)
            print(f"embedded {len(users)} users ({vectors.shape[1]}-d) in {seconds:.1f}s -> {out}")
        if args.to_store:
            store = source.store
            if store is None:
                from store import Store

                store = source.store = Store.open()
            stored = store_embeddings(store, loaded, users, vectors)
            print(f"embedded {len(users)} users ({vectors.shape[1]}-d) in {seconds:.1f}s -> store ({stored} sealed, indexed as {loaded.version})")
    finally:
        source.close()
    return 0
