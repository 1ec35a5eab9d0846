"""Training settings: light to import (no torch), so the CLI can build its parser quickly."""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import asdict, dataclass, field
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
    # With a time budget: after every epoch, fit the cosine schedule to the epochs that fit in
    # it, so the learning rate still anneals (timing-dependent, hence off by default).
    fit_schedule_to_budget: bool = False
    grad_clip: float = 1.0
    # Events of each user's tail never trained on (1: leave-one-out; see training/split.py).
    holdout: int = 1
    # Crop augmentation: each epoch, this share of the training windows starts at a random later
    # event, so short contexts are not always the start of a history (cold-start reads the LAST
    # few events of a long history; see training/split.crop_starts). 0: off.
    crop_prob: float = 0.0
    # The forward pass under bf16 autocast (matrix products in bf16, losses and weights fp32):
    # faster where the hardware has bf16 dot products (GPUs; CPUs with AVX512-BF16 or AMX).
    bf16: bool = False
    # torch.compile the training step (forward and backward; dynamic shapes, so batches of any
    # length reuse one graph): fuses the many small elementwise ops and the catalogue softmax.
    # The first batches pay the compile (tens of seconds; cached on disk across runs).
    compile: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop_prob < 1.0:
            raise ValueError("--crop-prob must be in [0, 1)")


@dataclass(slots=True)
class AdapterTrainConfig:
    """Stage 2 (USER-LLM adapter) training settings."""
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    gate_lr_mult: float = 10.0  # the cross blocks' tanh gates (see train_adapter._optimizer)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float = 0.0  # 0: no budget; else the schedule is fitted to it after a probe
    per_user: int = 2  # training examples per user and task (random prefixes)
    # History lengths (events) a training example reads, drawn per example; the encoder and
    # the text prompt see the same events.
    lengths: list[int] = field(default_factory=lambda: [50, 200, 500])
    text_budget: int = 8160  # prompt tokens at most (text arm); SmolLM2's context is 8192
    valid_examples: int = 256
    eval_every: int = 0  # validation every N steps (0: at the end of each epoch)
    validate_first: bool = False  # also validate the untrained model (step 0)
    # With item hints: next-movie training examples only where the hints hold the answer
    # (training/hint_examples.py).
    hinted_next_movie: bool = True
    # The training forward under bf16 autocast (the frozen LLM's products included; weights,
    # losses and validation stay fp32, as the engine serves). Fast only with bf16 dot products.
    bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ARMS = ("userllm", "text", "none")
STRATEGIES = ("proj", "enc", "lora", "full", "zeroshot")
INTEGRATIONS = {"xattn": "cross", "softprompt": "soft_prompt"}


@dataclass(slots=True)
class AdapterConfig:
    arm: str = "userllm"
    strategy: str = "enc"
    integration: str = "xattn"
    cross_every_n: int = 6
    num_user_tokens: int = 4  # K
    # M item-hint tokens after the K (userenc/item_hints.py): the encoder's top M next items,
    # each as the mean LLM input embedding of its title; the user tokens then take the LLM's
    # width. 0: none.
    item_hints: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    tasks: list[str] = field(default_factory=lambda: ["next_movie", "genre_history"])

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {tuple(INTEGRATIONS)}, "
                             f"got {self.integration!r}")
        if self.arm == "userllm":
            if self.strategy == "zeroshot":
                raise ValueError("the userllm arm has nothing to read its user tokens without "
                                 "training: choose proj, enc, lora or full")
            if self.num_user_tokens < 1:
                raise ValueError("num_user_tokens (K) must be >= 1")
            if self.item_hints < 0:
                raise ValueError("item_hints (M) must be >= 0")
            if self.integration == "xattn" and self.cross_every_n < 1:
                raise ValueError("cross_every_n must be >= 1 for xattn")
        elif self.item_hints:
            raise ValueError(f"the {self.arm} arm has no encoder to give item hints")
        elif self.strategy not in ("lora", "full", "zeroshot"):
            raise ValueError(f"the {self.arm} arm has no encoder: strategy lora, full or zeroshot")

    @property
    def uses_encoder(self) -> bool:
        return self.arm == "userllm"

    @property
    def uses_lora(self) -> bool:
        return self.strategy == "lora"

    def llm_config(self, user_dim: int | None):  # -> llm.adapter.LLMAdapterConfig
        from llm.adapter import LLMAdapterConfig, LoraSettings

        lora = LoraSettings(self.lora_r, self.lora_alpha) if self.uses_lora else None
        if not self.uses_encoder:
            return LLMAdapterConfig("none", 0, None, lora, self.strategy == "full")
        n = self.cross_every_n if self.integration == "xattn" else 0
        return LLMAdapterConfig(INTEGRATIONS[self.integration], n, user_dim, lora,
                                self.strategy == "full")

    def to_dict(self) -> dict:
        return asdict(self)


def train_config_from(args: Any) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if getattr(args, k, None) is not None})


def encoder_config_from(args: Any) -> EncoderConfig:
    return EncoderConfig(**{k: getattr(args, k) for k in EncoderConfig.__dataclass_fields__ if k != "vocab_sizes" and getattr(args, k, None) is not None})


def env_threads(default: int | None = None) -> int:
    return int(os.environ.get("USERLLM_THREADS", default or os.cpu_count() or 1))


SMOLLM2_GGUF = Path("models") / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """USERLLM_MODEL, else SmolLM2-135M-Instruct in ../shared beside the checkout."""
    return os.environ.get("USERLLM_MODEL") or str(
        Path(__file__).resolve().parents[1].parent / "shared" / SMOLLM2_GGUF)
