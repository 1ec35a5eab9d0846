"""Encoder pretraining: next-event prediction on leave-one-out training histories.

AdamW with linear warm-up and cosine decay, validation (full ranking NDCG@10) after every
epoch with early stopping, the best model saved as a checkpoint folder, and the latest
training state beside it for `--resume`. Under torchrun (DDP: gloo on CPU, NCCL on GPU) every
rank draws the same global batches of `batch_size x world size` windows and trains on its slice
of each, its loss weighted by its share of the batch's target events, so a step is the step one
process would take on the whole global batch (up to float rounding); rank 0 validates and writes.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model
from tqdm import tqdm

from training import distributed as dist
from training.config import TrainConfig
from training.evaluate import evaluate, model_scorer
from training.device_windows import DeviceWindows
from training.split import Split, crop_starts, data_fingerprint, leave_one_out, windows
from userenc.checkpoint import recover_folder, save_checkpoint
from userenc.config import EncoderConfig
from userenc.events import Event
from userenc.model import UserEncoder
from userenc.spec import FeatureSpec
from userenc.tokenize import EventTokenizer


@dataclass(slots=True)
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_valid: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    model: UserEncoder | None = None  # the final weights in memory (every rank's own copy)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CosineSchedule:
    """Linear warm-up then cosine decay to 0 at total_steps (which a time budget may shorten)."""

    def __init__(self, total_steps: int, warmup: int) -> None:
        self.total_steps, self.warmup = total_steps, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def planned_epochs(epoch: int, seconds: float, epoch_seconds: float, max_minutes: float,
                   max_epochs: int) -> int:
    """Epochs that fit a time budget: those done plus what is left at the given pace."""
    left = 60 * max_minutes - seconds
    return max(epoch, min(max_epochs, epoch + int(left / max(epoch_seconds, 1e-9))))


def steady_epoch_seconds(history: list[dict[str, Any]]) -> float:
    """The pace a budget plan uses, refitted after every epoch: the mean of the epochs after the
    first (epoch 1 pays start-up costs: 26 s against an 18 s mean in the 14-minute ML-1M runs),
    or epoch 1 alone. One epoch's pace was not enough either: a plan fixed after epoch 2 (46 s)
    left 105 s of a 14-minute budget unused when later epochs took 35-40 s."""
    ends = [row["seconds"] for row in history]
    if len(ends) < 2:
        return ends[0] if ends else 0.0
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    return CosineSchedule(total_steps, warmup)


def recover_run(*folders: Path) -> None:
    """Before a run reads what it resumes from: undo what a kill inside a checkpoint write left
    of these folders (rank 0 does it; the other ranks wait)."""
    if dist.rank() == 0:
        for folder in folders:
            recover_folder(folder)
    dist.barrier()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast can be fast here: GPUs, and CPUs with bf16 dot products
    (AVX512-BF16, AMX). Elsewhere oneDNN emulates it: measured ~10x slower steps than fp32 on a
    2-core AMD EPYC without AVX-512."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compiled_step(loss_module: torch.nn.Module) -> Callable[..., Any]:
    """`loss_module` under torch.compile with dynamic shapes, so windows of any length share
    one graph (a few recompiles at most, for 0/1-sized and boolean-guarded cases). Capturing
    scalar and data-dependent-shape ops keeps the padding mask and the valid-position
    selection inside the graph instead of splitting it there."""
    compiled = torch.compile(loss_module, dynamic=True)

    def step(ids: dict[str, torch.Tensor], valid: torch.Tensor) -> Any:
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            return compiled(ids, valid)
    return step


def training_data(histories: dict[str, list[Event]], spec: FeatureSpec, cfg: EncoderConfig, holdout: int,
                  device: torch.device) -> tuple[Split, EventTokenizer, DeviceWindows]:
    """The split, the tokenizer (vocabularies from the training part only; sets cfg.vocab_sizes)
    and every training window padded on `device`: what a run trains on, also for benches."""
    split = leave_one_out(histories, holdout)
    tokenizer = EventTokenizer.fit(spec, split.train.values())
    cfg.vocab_sizes = {f.name: tokenizer.vocab_size(f) for f in spec.features}
    items = [w for user in sorted(split.train) for w in windows(tokenizer.encode(split.train[user]), cfg.max_len)]
    return split, tokenizer, DeviceWindows.build(items, spec, cfg.max_len, device)


def _batches(lengths: "list[int] | np.ndarray", batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches (window indices) of similar lengths (less padding): shuffle, sort within
    chunks of 50 batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=lambda j: lengths[j])
        batches += [[int(j) for j in part[k : k + batch_size]] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _training_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer moments keyed by parameter name (safetensors holds flat tensors only)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                out[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().clone()
    out["rng.torch"] = torch.get_rng_state()
    return out


def _restore_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key.startswith("opt."):
            name, slot = key[4:].rsplit(".", 1)
            opt.state[params[name]][slot] = value.to(params[name].device) if slot != "step" else value
    torch.set_rng_state(state["rng.torch"])


def train_encoder(
    histories: dict[str, list[Event]],
    spec: FeatureSpec,
    cfg: EncoderConfig,
    tcfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = True,
    files: dict[str, str] | None = None,
) -> TrainResult:
    """Train and write the best model to `out` (a checkpoint folder); `manifest_extra` and
    `files` (e.g. the erasure section and keyed user list) go into every checkpoint written."""
    out = Path(out)
    seed_everything(tcfg.seed)
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    split, tokenizer, data = training_data(histories, spec, cfg, tcfg.holdout, device)
    model = UserEncoder(spec, cfg, tokenizer.item_attributes)
    model.to(device)
    world, global_batch = dist.world_size(), tcfg.batch_size * dist.world_size()
    steps_per_epoch = math.ceil(len(data) / global_batch)
    total_steps = steps_per_epoch * tcfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    # Warm-up is a fraction of the run, but never longer than one epoch: with a large --epochs
    # and a time budget, a fraction of the nominal run would never finish warming up.
    schedule = CosineSchedule(total_steps, max(1, min(int(tcfg.warmup_frac * total_steps), steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    wrapped = dist.wrap(model)
    step_loss = compiled_step(wrapped) if tcfg.compile else wrapped
    if tcfg.bf16 and not native_bf16(device) and dist.rank() == 0:
        # Still honoured (the numerics are what was asked for), but the operator should know.
        print("warning: bf16 autocast on a CPU without bf16 dot products (AVX512-BF16/AMX) runs "
              "several times slower than fp32", file=sys.stderr, flush=True)

    state_dir = out.with_name(out.name + ".last")
    recover_run(out, state_dir)
    meta: dict[str, Any] = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "seconds": 0.0, "planned_epochs": tcfg.epochs}
    if resume and (state_dir / "state.json").is_file():
        meta = json.loads((state_dir / "state.json").read_text())
        load_model(model, str(state_dir / "model.safetensors"))
        _restore_state(model, opt, load_file(str(state_dir / "training_state.safetensors")))
        schedule.total_steps = steps_per_epoch * meta.get("planned_epochs", tcfg.epochs)
        # Put the schedule at the resumed step without stepping it (no optimizer step happened).
        sched.last_epoch = meta["epoch"] * steps_per_epoch
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * schedule(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
    if resume and dist.rank() == 0:
        # One line even when quiet: an operator (and the kill tests) can see what was kept.
        # Nothing saved (killed before its first epoch ended) means resuming is starting.
        print(f"resuming {out.name} after epoch {meta['epoch']}" if meta["epoch"]
              else f"nothing to resume in {state_dir}: starting from epoch 1", flush=True)

    manifest = {
        "data_source": manifest_extra.get("data_source") if manifest_extra else None,
        "data_sha256": data_fingerprint(histories),
        "users": len(histories),
        "spec": spec.name,
        "train_config": asdict(tcfg),
        "versions": {"torch": torch.__version__, "userllm": "0.1.0"},
    } | (manifest_extra or {})
    scorer = model_scorer(model, tokenizer)
    started = time.perf_counter() - meta["seconds"]
    for epoch in range(meta["epoch"] + 1, tcfg.epochs + 1):
        model.train()
        # The same global batches on every rank; each trains on its slice (a batch too small to
        # give every rank a window is dropped, or the ranks' step counts would part).
        rng = np.random.default_rng([tcfg.seed, epoch])
        epoch_lengths = data.lengths - crop_starts(data.lengths, tcfg.crop_prob, rng)
        batches = [(np.array(b[dist.rank()::world]), int(epoch_lengths[b].sum()) - len(b))
                   for b in _batches(epoch_lengths, global_batch, rng) if len(b) >= world]
        bar = tqdm(batches, desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch", disable=not progress or dist.rank() != 0, dynamic_ncols=True, mininterval=1.0)
        # The loss stays on the device until the epoch ends (or the bar shows it): no host
        # sync per step.
        seen_events, t0, loss_sum, steps = 0, time.perf_counter(), torch.zeros((), dtype=torch.float64, device=device), 0
        for rows, global_targets in bar:
            ids, valid = data.batch(rows, epoch_lengths[rows])
            targets = int(epoch_lengths[rows].sum()) - len(rows)
            # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of
            # the global batch's targets makes that average the global batch's mean.
            share = world * targets / max(1, global_targets)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
                loss, _ = step_loss(ids, valid)
            loss = loss * share
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            steps += 1
            seen_events += targets + len(rows)
            if not bar.disable and steps % 20 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / steps:.3f}", ev_s=f"{seen_events / (time.perf_counter() - t0):.0f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        train_loss = dist.mean(float(loss_sum) / steps if steps else 0.0)
        stop = False
        if dist.rank() == 0:
            model.eval()
            valid_metrics = evaluate(scorer, tokenizer, split.valid)
            ndcg = valid_metrics["all"]["ndcg@10"]
            row = {"epoch": epoch, "train_loss": train_loss, "valid": valid_metrics["all"], "seconds": time.perf_counter() - started}
            meta["history"].append(row)
            if progress:
                tqdm.write(f"epoch {epoch}: loss {train_loss:.4f}  valid HR@10 {valid_metrics['all']['hr@10']:.4f}  NDCG@10 {ndcg:.4f}")
            if ndcg > meta["best_ndcg"]:
                meta.update(best_ndcg=ndcg, best_epoch=epoch, bad_epochs=0, best_valid=valid_metrics["all"])
                save_checkpoint(out, model, tokenizer, manifest | {"epoch": epoch, "metrics": {"valid": valid_metrics["all"]}}, files=files)
            else:
                meta["bad_epochs"] += 1
            meta["epoch"], meta["seconds"] = epoch, time.perf_counter() - started
            if tcfg.max_minutes and tcfg.fit_schedule_to_budget:
                # Refitted every epoch: the cosine's end moves by an epoch or so as the pace
                # settles, a small step in the learning rate, against a budget left unused.
                meta["planned_epochs"] = planned_epochs(epoch, meta["seconds"], steady_epoch_seconds(meta["history"]),
                                                        tcfg.max_minutes, tcfg.epochs)
            over_time = bool(tcfg.max_minutes) and meta["seconds"] > 60 * tcfg.max_minutes
            stop = epoch >= meta["planned_epochs"] or meta["bad_epochs"] >= tcfg.patience or over_time
            # The training state goes inside the same atomic write as the weights: a kill leaves
            # either the previous epoch's pair or this one's, never weights without their state.
            save_checkpoint(state_dir, model, tokenizer, manifest, extra=_training_state(model, opt),
                            files=(files or {}) | {"state.json": json.dumps(meta, indent=1)})
        planned = dist.broadcast_int(meta["planned_epochs"])
        schedule.total_steps = steps_per_epoch * planned
        if dist.broadcast_flag(stop):
            break
    dist.barrier()
    return TrainResult(out, meta["best_epoch"], meta.get("best_valid", {}), meta["history"], meta["seconds"], model)
