"""Subcommand: generate (a personalized answer for one stored user)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt for a stored user, through their user tokens and the trained adapter")
    p.add_argument("prompt", help="what the user asks")
    p.add_argument("--user", required=True, help="the user's external id (its history comes from the store)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: $USERLLM_HOME/runs/adapter)")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    p.add_argument("--encoder", default=None, help="the adapter's encoder checkpoint, if it moved")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    add_quantize_args(p)
    p.set_defaults(func=cmd_generate)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """--quantize / --dequantize: how the base model's weights are held (llm/quantize.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quantize", choices=("int8", "int4", "gguf"), default=None,
                   help="base weights: int8/int4 quantized at load, or a GGUF's own blocks "
                        "(the default for a .gguf model); cross blocks stay full precision")
    g.add_argument("--dequantize", dest="quantize", action="store_const", const="none",
                   help="de-quantize a GGUF model to full precision")


def cmd_generate(args: argparse.Namespace) -> int:
    from store.db import resolve_home

    if args.max_tokens <= 0 or args.temperature < 0:
        raise ValueError("--max-tokens must be > 0 and --temperature >= 0")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    adapter = Path(args.adapter) if args.adapter else resolve_home() / "runs" / "adapter"
    if not (adapter / "adapter.json").is_file():
        raise FileNotFoundError(f"no adapter at {str(adapter)!r} (train one with `userllm train-adapter`, or give --adapter)")
    from api.personalize import Personalizer
    from llm.engine.sampling_params import SamplingParams
    from store import Store

    threads = int(os.environ.get("USERLLM_THREADS", os.cpu_count() or 1))
    import torch

    torch.set_num_threads(threads)
    p = Personalizer.load(adapter, args.model, args.encoder, kv_cache_bytes=128 << 20, max_num_seqs=4,
                          quantize=args.quantize)
    try:
        store = Store.open()
        try:  # the user's tokens, from the store's sealed cache while their history is unchanged
            tokens, _ = p.cached_user_tokens(store, args.user)
        finally:
            store.close()
        if tokens is None:
            print("note: this user has no events: answering without personalization", file=sys.stderr)
        sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        for out in p.stream(p.messages(args.prompt), tokens, sampling):
            print(out.new_text, end="", flush=True)
        print()
    finally:
        p.close()
    return 0
