"""Subcommand: train-adapter (USER-LLM stage 2)."""
from __future__ import annotations

import argparse
import sys

from api.train_cli import _positive, add_source_args, data_source_name, source_from_args
from training.config import AdapterConfig, AdapterTrainConfig, default_model_path, env_threads
from training.tasks import TASKS

STRATEGY_HELP = ("proj: user-token head + cross blocks; enc: + the encoder; lora: + LoRA on the "
                 "LLM's attention; full: + every LLM weight; zeroshot (text/none arms): nothing")
DEFAULT_TASKS = {"movielens": "next_movie,genre_history", "amazon": "review",
                 "jsonl": "genre_history", "csv": "genre_history"}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    a, t = AdapterConfig(), AdapterTrainConfig()
    p = sub.add_parser("train-adapter", help="train the USER-LLM adapter (stage 2, the LLM frozen)")
    add_source_args(p)
    p.add_argument("--encoder", default=None, help="encoder checkpoint folder (userllm arm; the others take it for its split)")
    p.add_argument("--model", default=None, help="base LLM: a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct in ../shared, or USERLLM_MODEL)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--arm", choices=("userllm", "text", "none"), default=a.arm, help="userllm: user tokens; text: history pasted as text; none: the question alone")
    p.add_argument("--strategy", choices=("proj", "enc", "lora", "full", "zeroshot"), default=None, help=STRATEGY_HELP + " (default: enc for userllm, lora otherwise)")
    p.add_argument("--integration", choices=("xattn", "softprompt"), default=a.integration)
    p.add_argument("--cross-every", dest="cross_every_n", type=_positive(int), default=a.cross_every_n, help="a gated cross-attention block before every n-th decoder layer")
    p.add_argument("--user-tokens", dest="num_user_tokens", type=_positive(int), default=a.num_user_tokens, help="K: user tokens from the Perceiver")
    p.add_argument("--item-hints", dest="item_hints", type=int, default=a.item_hints, help="M: the encoder's top-M next items as extra user tokens, each its title's mean LLM embedding (0: none)")
    p.add_argument("--lora-rank", dest="lora_r", type=_positive(int), default=a.lora_r)
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)} (default per format)")
    p.add_argument("--epochs", type=_positive(int), default=t.epochs)
    p.add_argument("--batch-size", dest="batch_size", type=_positive(int), default=t.batch_size)
    p.add_argument("--lr", type=_positive(float), default=t.lr)
    p.add_argument("--per-user", dest="per_user", type=_positive(int), default=t.per_user, help="training examples per user and task")
    p.add_argument("--lengths", type=_ints, default=t.lengths, help="history lengths (events) training examples read, e.g. 50,200,500")
    p.add_argument("--text-budget", dest="text_budget", type=_positive(int), default=t.text_budget, help="prompt tokens at most (text arm)")
    p.add_argument("--valid-examples", dest="valid_examples", type=_positive(int), default=t.valid_examples)
    p.add_argument("--eval-every", dest="eval_every", type=int, default=t.eval_every, help="validate every N steps (0: each epoch)")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, default=t.max_minutes, help="time budget; the schedule is fitted to it")
    p.add_argument("--bf16", action="store_true", help="training forward under bf16 autocast (faster with bf16 hardware: GPUs, CPUs with AVX512-BF16/AMX; validation stays fp32)")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--resume", action="store_true", help="continue from <out>.last")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_adapter)


def configs_from(args: argparse.Namespace) -> tuple[AdapterConfig, AdapterTrainConfig]:
    strategy = args.strategy or ("enc" if args.arm == "userllm" else "lora")
    tasks = [x.strip() for x in (args.tasks or DEFAULT_TASKS[args.format if not args.from_store else "movielens"]).split(",") if x.strip()]
    acfg = AdapterConfig(arm=args.arm, strategy=strategy, integration=args.integration, cross_every_n=args.cross_every_n,
                         num_user_tokens=args.num_user_tokens, item_hints=args.item_hints, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, tasks=tasks)
    tcfg = AdapterTrainConfig(**{k: getattr(args, k) for k in AdapterTrainConfig.__dataclass_fields__ if hasattr(args, k)})
    if tcfg.max_minutes < 0:
        raise ValueError("--max-minutes must be >= 0")
    return acfg, tcfg


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from training import distributed as dist
    from training.train_adapter import train_adapter

    if args.threads is not None and args.threads <= 0:
        raise ValueError("--threads must be > 0")
    torch.set_num_threads(args.threads or env_threads())
    acfg, tcfg = configs_from(args)
    model = args.model or default_model_path()
    if not Path(model).exists():
        raise FileNotFoundError(f"base model {model!r} does not exist (give --model, or see the README for where SmolLM2 comes from)")
    if args.encoder is not None and not (Path(args.encoder) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{args.encoder!r} is not an encoder checkpoint (model.safetensors missing)")
    dist.init()
    source = None
    try:
        source = source_from_args(args)
        for note in source.notes:
            print(note, file=sys.stderr)
        erasure, files = source.erasure_manifest_with(args.encoder)
        result = train_adapter(source.dataset.histories, model, args.encoder, acfg, tcfg, args.out, resume=args.resume,
                               manifest_extra={"data_source": data_source_name(args)} | erasure, files=files, progress=not args.quiet)
    finally:
        if source is not None:
            source.close()
        dist.shutdown()
    if dist.rank() == 0:
        counts = result.parameters
        print(f"{result.steps} steps in {result.seconds:.0f}s; best valid loss {result.best_loss:.4f}; trained {counts['trained']:,} parameters "
              f"(encoder {counts['encoder']:,}, user modules {counts['user_modules']:,}, LoRA {counts['lora']:,}, LLM {counts['llm_base']:,}); adapter {result.checkpoint}")
    return 0
