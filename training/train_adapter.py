"""Stage-2 training: the USER-LLM adapter (or a text / no-user baseline) on task examples.

The base LLM is loaded through llm/'s own model (the one the engine serves) and stays frozen
except for what the strategy trains (training/userllm.py). Examples come from the encoder's
split (training/tasks.py): random prefixes of each user's training part; validation answers
are the held-out validation events. AdamW with warm-up and cosine decay; with a time budget
the schedule is fitted to it after a short probe (so the learning rate still anneals). The
best model by validation loss goes to `out`, the latest state to `<out>.last` (--resume).
Under torchrun each rank trains on its shard of the batches (DDP); rank 0 validates and writes.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from training import distributed as dist
from training.adapter_checkpoint import encoder_with_tokens, save_adapter, weights_sha256
from training.adapter_data import Encoded, collate, encode_examples, length_batches
from training.config import AdapterConfig, AdapterTrainConfig
from training.split import data_fingerprint, encoder_holdout
from training.hint_examples import hinted_training_examples
from training.title_table import title_table
from training.tasks import Catalogue, check_tasks, task_split, train_examples, valid_examples
from training.train_encoder import (
    CosineSchedule,
    _restore_state,
    _training_state,
    native_bf16,
    recover_run,
    seed_everything,
)
from training.prompts import QUESTIONS, SYSTEM
from training.userllm import UserLLM, init_hint_reader, parameter_counts
from userenc.events import Event

PROBE_STEPS = 8  # steps timed before a time budget fixes the schedule
WARM_STEPS = 2  # of which the first ones are not counted


@dataclass(slots=True)
class AdapterResult:
    checkpoint: Path
    best_loss: float
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Stage2:
    """Everything a run needs, built once (also what evaluation and tests reuse)."""
    model: UserLLM
    tokenizer: Any  # the LLM's
    enc_tokenizer: Any  # the encoder's EventTokenizer, or None
    enc_max_len: int
    holdout: int
    catalogue: Catalogue
    end_token: int
    pad_token: int
    meta: dict[str, Any]  # adapter.json's base_model / encoder sections


def build_stage2(model_path: str | Path, encoder_dir: str | Path | None, acfg: AdapterConfig,
                 histories: dict[str, list[Event]], seed: int = 0,
                 device: str | torch.device = "cpu") -> Stage2:
    from llm.adapter import checkpoint_sha256
    from llm.loader import build_model, read_checkpoint

    seed_everything(seed)
    ckpt = read_checkpoint(model_path)
    # Hint tokens are rows of the LLM's embedding table: the user tokens take its width.
    hint_dim = int(ckpt.hf_config.hidden_size) if acfg.item_hints else None
    enc = holdout_src = None
    if encoder_dir is not None:
        holdout_src = encoder_with_tokens(encoder_dir, acfg.num_user_tokens, device,
                                          acfg.item_hints, hint_dim)
        enc = holdout_src if acfg.uses_encoder else None
    elif acfg.uses_encoder:
        raise ValueError("the userllm arm needs an encoder checkpoint (--encoder)")
    holdout = encoder_holdout(holdout_src.manifest) if holdout_src else 1
    check_tasks(acfg.tasks, holdout)
    catalogue = _catalogue(histories, holdout)
    user_dim = enc.model.cfg.out_dim if enc is not None else None
    llm = build_model(ckpt.hf_config, ckpt.state_dict, seed=seed,
                      **acfg.llm_config(user_dim).load_kwargs()).to(device)
    tok = ckpt.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    end = end if end is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    if enc is not None and enc.model.hints is not None:
        items = enc.tokenizer.vocabs[enc.tokenizer.spec.item.name]
        enc.model.hints.table.copy_(title_table(items, catalogue.titles, tok,
                                                llm.model.embed_tokens.weight))
    if acfg.item_hints and acfg.integration == "xattn":
        probe = tok(f"{SYSTEM} {QUESTIONS['next_movie']}", return_tensors="pt")["input_ids"]
        init_hint_reader(llm, probe)
    model = UserLLM(llm, enc.model if enc is not None else None, acfg)
    meta = {"base_model": {"path": str(Path(model_path).resolve()),
                           "sha256": checkpoint_sha256(model_path)},
            "encoder": None}
    if enc is not None:
        meta["encoder"] = {"checkpoint": str(Path(encoder_dir).resolve()),
                           "weights_sha256": weights_sha256(encoder_dir),
                           "num_user_tokens": acfg.num_user_tokens,
                           "item_hints": acfg.item_hints,
                           "out_dim": enc.model.cfg.out_dim,
                           "holdout": holdout}
    return Stage2(model, tok, enc.tokenizer if enc else None,
                  enc.model.cfg.max_len if enc else 0, holdout,
                  catalogue, int(end), int(pad), meta)


def _catalogue(histories: dict[str, list[Event]], holdout: int) -> Catalogue:
    return Catalogue.from_histories(histories.values(),
                                    ranked_by=task_split(histories, holdout).train.values())


def _optimizer(model: UserLLM, tcfg: AdapterTrainConfig) -> torch.optim.Optimizer:
    """AdamW; the cross blocks' gates get gate_lr_mult x the learning rate. They start at 0 and
    Adam moves a parameter about lr per step, so at lr 1e-3 a gate would need ~500 steps to
    open (Flamingo trains for far longer than a CPU budget allows)."""
    gates, rest = [], []
    for name, p in model.trained_parameters().items():
        (gates if name.rsplit(".", 1)[-1] in ("gate_attn", "gate_mlp") else rest).append(p)
    groups = [{"params": rest, "base_lr": tcfg.lr}]
    if gates:
        groups.append({"params": gates, "base_lr": tcfg.lr * tcfg.gate_lr_mult,
                       "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tcfg.lr,
                             weight_decay=tcfg.weight_decay)


def _loss(model, items: list[Encoded], s2: Stage2, device, wrapped=None) -> torch.Tensor:
    batch = collate(items, s2.pad_token, s2.enc_tokenizer, s2.enc_max_len, device)
    return (wrapped or model)(*batch.args())


@torch.no_grad()
def validation_loss(model: UserLLM, items: list[Encoded], s2: Stage2, device,
                    batch_size: int = 16) -> dict[str, float]:
    """Mean answer loss per task and overall; each example weighs the same (its own loss is
    the mean over its answer tokens)."""
    model.eval()
    per_task: dict[str, list[float]] = {}
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = collate(chunk, s2.pad_token, s2.enc_tokenizer, s2.enc_max_len, device)
        token_loss = model(*batch.args(), reduce=False)
        sums = torch.zeros(len(chunk)).index_add_(0, batch.label_rows.cpu(), token_loss.cpu())
        for it, total in zip(chunk, sums.tolist()):
            per_task.setdefault(it.task, []).append(total / len(it.answer))
    out = {t: float(np.mean(v)) for t, v in per_task.items()}
    out["all"] = float(np.mean([x for v in per_task.values() for x in v])) if per_task else 0.0
    return out


def train_adapter(histories: dict[str, list[Event]], model_path: str | Path,
                  encoder_dir: str | Path | None, acfg: AdapterConfig,
                  tcfg: AdapterTrainConfig, out: str | Path, resume: bool = False,
                  manifest_extra: dict[str, Any] | None = None,
                  files: dict[str, str] | None = None, progress: bool = True) -> AdapterResult:
    out = Path(out)
    device = (torch.device("cuda", dist.local_rank()) if torch.cuda.is_available()
              else torch.device("cpu"))
    s2 = build_stage2(model_path, encoder_dir, acfg, histories, tcfg.seed, device)
    model = s2.model
    lengths = sorted({min(n, s2.enc_max_len) if s2.enc_max_len else n for n in tcfg.lengths})
    split = task_split(histories, s2.holdout)
    examples = train_examples(split.train, acfg.tasks, s2.catalogue, tcfg.per_user, lengths,
                              tcfg.seed)
    if not examples:
        raise ValueError("no training examples: the histories are too short for these tasks")
    rng = np.random.default_rng(tcfg.seed)
    hint_stats: dict[str, int] = {}
    if acfg.item_hints and "next_movie" in acfg.tasks and tcfg.hinted_next_movie:
        examples, hint_stats = hinted_training_examples(
            examples, split.train, model.encoder, s2.enc_tokenizer, s2.catalogue,
            tcfg.per_user, lengths, tcfg.seed)
        rng.shuffle(examples)
        if progress and dist.rank() == 0:
            tqdm.write(f"next-movie examples answered by the hints: {hint_stats}")
    valid_ex = valid_examples(split, acfg.tasks, s2.catalogue, max(lengths))
    if len(valid_ex) > tcfg.valid_examples:
        keep = sorted(rng.choice(len(valid_ex), tcfg.valid_examples, replace=False).tolist())
        valid_ex = [valid_ex[i] for i in keep]
    enc = lambda exs: encode_examples(exs, acfg.arm, s2.tokenizer, s2.end_token,  # noqa: E731
                                      tcfg.text_budget, s2.enc_tokenizer)
    items, valid_items = dist.shard(enc(examples)), enc(valid_ex)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(model, tcfg) if params else None
    steps_per_epoch = math.ceil(len(items) / tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs
    schedule = CosineSchedule(total, max(1, int(tcfg.warmup_frac * total)))
    wrapped = model
    if dist.world_size() > 1 and params:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank()] if device.type == "cuda" else None,
            find_unused_parameters=True)

    if tcfg.bf16 and not native_bf16(device) and dist.rank() == 0:
        print("warning: bf16 autocast on a CPU without bf16 dot products (AVX512-BF16/AMX) runs "
              "several times slower than fp32", file=sys.stderr, flush=True)

    state_dir = out.with_name(out.name + ".last")
    recover_run(out, state_dir)
    meta: dict[str, Any] = {"step": 0, "best_loss": math.inf, "history": [], "seconds": 0.0,
                            "planned_steps": total, "warmup": schedule.warmup}
    if resume and (state_dir / "state.json").is_file():
        meta = json.loads((state_dir / "state.json").read_text())
        state = load_file(str(state_dir / "training_state.safetensors"))
        trained = model.trained_parameters()
        for name, t in state.items():
            if name.startswith("param."):
                with torch.no_grad():
                    trained[name[6:]].copy_(t)
        if opt is not None:
            _restore_state(model, opt, {k: v for k, v in state.items() if not k.startswith("param.")})
    elif resume and progress and dist.rank() == 0:
        # Killed before its first validation: nothing was saved, so resuming is starting.
        tqdm.write(f"nothing to resume in {state_dir}: starting from step 0")
    schedule.total_steps, schedule.warmup = meta["planned_steps"], meta["warmup"]

    manifest = {
        "kind": "adapter", "data_sha256": data_fingerprint(histories),
        "users": len(histories), "tasks": acfg.tasks, "adapter_config": acfg.to_dict(),
        "train_config": tcfg.to_dict(), "parameters": parameter_counts(model),
        "examples": {"train": len(examples), "valid": len(valid_ex)} | hint_stats,
        "versions": {"torch": torch.__version__, "userllm": "0.1.0"},
    } | s2.meta | (manifest_extra or {})

    def checkpoint(folder: Path, extra: bool) -> None:
        state, written = None, files
        if extra:  # the training state and state.json go in the same atomic write as the weights
            state = {f"param.{n}": p for n, p in model.trained_parameters().items()}
            if opt is not None:
                state |= _training_state(model, opt)
            written = (files or {}) | {"state.json": json.dumps(meta, indent=1)}
        save_adapter(folder, model, s2.meta, manifest | {"step": meta["step"]}, written, state)

    def validate() -> None:
        if dist.rank() != 0:
            return
        losses = validation_loss(model, valid_items, s2, device)
        meta["history"].append({"step": meta["step"], "valid_loss": losses,
                                "seconds": round(time.perf_counter() - started, 1)})
        if progress:
            tqdm.write(f"step {meta['step']}: valid loss " +
                       " ".join(f"{k} {v:.3f}" for k, v in losses.items()))
        if losses["all"] < meta["best_loss"]:
            meta["best_loss"] = losses["all"]
            manifest["metrics"] = {"valid_loss": losses}
            checkpoint(out, extra=False)
        checkpoint(state_dir, extra=True)

    started = time.perf_counter() - meta["seconds"]
    if meta["step"] == 0 and (opt is None or tcfg.validate_first):
        validate()  # zero-shot: the base model is the only candidate
    epoch = meta["step"] // steps_per_epoch
    bar = tqdm(total=meta["planned_steps"], initial=meta["step"], unit="step",
               disable=not progress or dist.rank() != 0, dynamic_ncols=True, mininterval=1.0)
    losses: list[float] = []
    while meta["step"] < meta["planned_steps"] and opt is not None:
        batches = length_batches(items, tcfg.batch_size,
                                 np.random.default_rng([tcfg.seed, epoch, dist.rank()]))
        for batch in batches[meta["step"] - epoch * steps_per_epoch:]:
            model.train()
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * schedule(meta["step"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
                loss = _loss(model, [items[i] for i in batch], s2, device, wrapped)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            meta["step"] += 1
            meta["seconds"] = time.perf_counter() - started
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}",
                            lr=f"{opt.param_groups[0]['lr']:.1e}")
            if meta["step"] == WARM_STEPS:
                meta["warm_seconds"] = meta["seconds"]
            if meta["step"] == PROBE_STEPS and tcfg.max_minutes and meta["planned_steps"] > PROBE_STEPS:
                # Time the steps after the first ones (allocations, first-call overheads): a
                # slow start must not shrink the schedule.
                warm = meta.get("warm_seconds")  # absent in a state saved before it was kept
                per_step = ((meta["seconds"] - warm) / (PROBE_STEPS - WARM_STEPS) if warm is not None
                            else meta["seconds"] / PROBE_STEPS)
                left = max(0.0, 60 * tcfg.max_minutes - meta["seconds"])
                fit = PROBE_STEPS + int(left / per_step)
                meta["planned_steps"] = dist.broadcast_int(max(PROBE_STEPS + 1, min(total, fit)))
                schedule.total_steps = meta["planned_steps"]
                schedule.warmup = meta["warmup"] = max(1, int(tcfg.warmup_frac * meta["planned_steps"]))
                bar.total = meta["planned_steps"]
            end_of_epoch = meta["step"] % steps_per_epoch == 0
            if (tcfg.eval_every and meta["step"] % tcfg.eval_every == 0) or end_of_epoch \
                    or meta["step"] >= meta["planned_steps"]:
                validate()
            if meta["step"] >= meta["planned_steps"]:
                break
        epoch += 1
    bar.close()
    dist.barrier()
    return AdapterResult(out, meta["best_loss"], meta["step"], meta["seconds"], meta["history"],
                         parameter_counts(model))
