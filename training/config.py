"""Training settings: light to import (no torch), so the CLI can build its parser quickly."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from userenc.config import EncoderConfig


@dataclass(slots=True)
class TrainConfig:
    epochs: int = 25  # ML-1M (3k users): ~30 s an epoch on 2 cores, so the default run stays under 15 min
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    patience: int = 4
    seed: int = 0
    max_minutes: float = 0.0  # 0: no time budget; else stop after the epoch that crosses it
    # With a time budget: after epoch 1, shrink the cosine schedule to the epochs that fit in it,
    # so the learning rate still anneals (timing-dependent, hence off by default).
    fit_schedule_to_budget: bool = False
    grad_clip: float = 1.0


def train_config_from(args: Any) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if getattr(args, k, None) is not None})


def encoder_config_from(args: Any) -> EncoderConfig:
    return EncoderConfig(**{k: getattr(args, k) for k in EncoderConfig.__dataclass_fields__ if k != "vocab_sizes" and getattr(args, k, None) is not None})


def env_threads(default: int | None = None) -> int:
    return int(os.environ.get("USERLLM_THREADS", default or os.cpu_count() or 1))
